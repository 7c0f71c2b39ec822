"""The self-training step (cluda.uda): terms per family, pseudo-labels / ClassMix as the step uses
them, the entropy HR crop, the step generator. Tiny MiT-B0 models on 64 x 64 crops."""
import math

import pytest
import torch
from torch import nn

import cluda.losses as losses
from cluda.losses import ContrastiveLoss
from cluda.models import HRDA, build_imnet_encoder, build_segmentor
from cluda.teacher import make_teacher
from cluda.uda import TrainForward, UDAStep, entropy_crop_box, step_generator, step_seed

THING, STUFF = (11, 13, 6), (0, 2, 8, 10)


def tiny_model(hrda=False, weight_head=True):
    seg = build_segmentor("mit_b0", num_classes=19, channels=16, embed_dim=16, aspp_channels=8,
                          drop_path_rate=0.0)
    if not hrda:
        return seg
    return HRDA(seg, hr_crop_size=32, hr_slide_size=32, hr_slide_stride=16, head_channels=8,
                feature_weight_head=weight_head)


def blocky_labels(gen, b=2, h=64, w=64, block=32):
    """Labels constant on block x block squares (stuff and thing classes; the top-left one a
    car), so the last encoder stage (stride 32) has thing cells for the feature distance; a
    small stripe of another class and a few ignored pixels on top."""
    classes = torch.tensor(THING + STUFF)
    idx = torch.randint(len(classes), (b, h // block, w // block), generator=gen)
    lab = classes[idx].repeat_interleave(block, 1).repeat_interleave(block, 2)
    lab[:, :32, :32] = 13
    lab[:, 40:44, :] = 1
    lab[:, 20:22, 20:24] = 255
    if h >= 128:  # HRDA's LR view halves the crop: make the first 64 x 64 cell a thing cell too
        lab[:, :64, :64] = 13
        lab[:, :16, :16] = 11
        lab[:, 40:44, :] = 1
    return lab


def batch(seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, size, size, generator=g), blocky_labels(g, h=size, w=size),
            torch.randn(2, 3, size, size, generator=g))


FAMILIES = {
    # name: (hrda, UDAStep kwargs, expected terms)
    "source_only": (False, dict(self_training=False), {"src.ce"}),
    "daformer": (False, dict(fd_lambda=0.005), {"src.ce", "src.fd", "mix.ce"}),
    "daformer_cluda": (False, dict(fd_lambda=0.005, cl=True), {"src.ce", "src.fd", "src.cl", "mix.ce", "mix.cl"}),
    "hrda": (True, dict(fd_lambda=0.005), {"src.ce", "src.fd", "mix.ce"}),
    "hrda_cluda": (True, dict(fd_lambda=0.005, cl=True, hr_crop="entropy"),
                   {"src.ce", "src.fd", "src.cl", "mix.ce", "mix.cl"}),
    # The released code's objective (cl.objective: released) in the same step.
    "daformer_cluda_released": (False, dict(cl=True, objective="released"),
                                {"src.ce", "src.cl", "mix.ce", "mix.cl"}),
    "hrda_cluda_released": (True, dict(cl=True, objective="released"),
                            {"src.ce", "src.cl", "mix.ce", "mix.cl"}),
}


def make_step(cl=False, objective="paper", **kw):
    contrastive = ContrastiveLoss(impl="torch", objective=objective) if cl else None
    kw.setdefault("pseudo_threshold", 0.06)  # a random teacher is barely above 1/19
    return UDAStep(contrastive=contrastive, ignore_top=4, ignore_bottom=8, **kw)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_terms_present_nonzero_and_backward(family, monkeypatch):
    hrda, kw, expected = FAMILIES[family]
    # The released 65 x 65 grid makes N = 2 * 4225 rows, minutes on a CPU; a smaller grid runs
    # the same code (tests/test_losses_released.py checks the real grid).
    monkeypatch.setattr(losses, "RELEASED_FEAT_SIZE", (17, 17))
    torch.manual_seed(0)
    model = tiny_model(hrda, weight_head=kw.get("cl", False))  # HRDA without CLUDA: no delta
    imnet = build_imnet_encoder(model.segmentor.encoder if hrda else model.encoder)
    with torch.no_grad():  # the student has moved away from its ImageNet copy: FD > 0
        for p in (model.segmentor.encoder if hrda else model.encoder).parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher = make_teacher(model)
    step = make_step(**kw)
    src, lab, tgt = batch(size=128 if hrda else 64)
    res = step(TrainForward(model), teacher, src, lab, tgt, it=0, imnet=imnet)
    assert set(res.losses) == expected == set(step.term_names(0))
    for name, v in res.losses.items():
        assert v.dim() == 0 and math.isfinite(v.item()) and v.item() > 0, (name, v)
    if step.self_training:
        assert 0 < res.stats["pasted"] < 1 and 0 <= res.stats["gamma"] <= 1
    sum(res.losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if family.startswith("hrda_cluda"):  # the weighted CLUDA-MR trains the feature-weight head
        assert model.feature_weight_head.classifier.weight.grad.abs().sum() > 0


def test_warmup_has_no_target_terms_and_needs_no_teacher():
    step = make_step(cl=True, start_iter=3)
    model = tiny_model()
    src, lab, tgt = batch()
    res = step(TrainForward(model), None, src, lab, tgt, it=2)
    assert set(res.losses) == {"src.ce", "src.cl"} and res.stats == {}
    with pytest.raises(AssertionError, match="teacher and target_img are needed"):
        step(TrainForward(model), None, src, lab, tgt, it=3)
    assert step.term_names(2) == ["src.ce", "src.cl"]
    assert step.term_names(3) == ["src.ce", "src.cl", "mix.ce", "mix.cl"]


def test_cl_weight_scales_only_the_cl_terms():
    src, lab, tgt = batch(1)
    model = tiny_model().eval()  # no dropout: two calls see the same network
    teacher = make_teacher(model)
    out = {}
    for w in (1.0, 0.25):
        out[w] = make_step(cl=True, cl_weight=w)(TrainForward(model), teacher, src, lab, tgt, it=5).losses
    for k in ("src.cl", "mix.cl"):
        assert torch.allclose(out[0.25][k], 0.25 * out[1.0][k], rtol=1e-5)
    for k in ("src.ce", "mix.ce"):
        assert torch.equal(out[0.25][k], out[1.0][k])


class FixedTeacher(nn.Module):
    """A teacher whose prediction is given: confident class 5 on the left half of the image,
    uniform on the right half."""

    def inference(self, img, mode="whole"):
        b, _, h, w = img.shape
        logits = torch.zeros(b, 19, h, w)
        logits[:, 5, :, : w // 2] = 20.0
        return logits


def test_pseudo_labels_gamma_and_margins_as_used_by_the_step():
    step = make_step(pseudo_threshold=0.968)
    src, lab, tgt = batch(2)
    pl, logits = step.pseudo_labels(FixedTeacher(), tgt)
    assert logits.shape == (2, 19, 64, 64)
    assert pl.gamma.item() == pytest.approx(0.5)  # the confident half
    assert (pl.labels[:, :, :32] == 5).all()
    # rows 0..3 and the last 8 rows have weight 0, the rest Gamma
    assert (pl.weights[:, :4] == 0).all() and (pl.weights[:, -8:] == 0).all()
    assert torch.allclose(pl.weights[:, 4:-8], torch.full_like(pl.weights[:, 4:-8], 0.5))

    mixed, pasted = step.mix_batch(src, lab, tgt, pl, generator=step_generator(0, 7))
    # ClassMix: per image, ceil(n / 2) of the n source classes are pasted, whole classes only
    for b in range(2):
        present = [c for c in torch.unique(lab[b]).tolist() if c != 255]
        chosen = torch.unique(lab[b][pasted[b]]).tolist()
        assert len(chosen) == (len(present) + 1) // 2
        assert torch.equal(pasted[b], torch.isin(lab[b], torch.tensor(chosen)))
    assert torch.equal(mixed.labels[pasted], lab[pasted])
    assert torch.equal(mixed.labels[~pasted], pl.labels[~pasted])
    assert (mixed.weights[pasted] == 1).all()
    assert torch.equal(mixed.weights[~pasted], pl.weights[~pasted])
    # the image is augmented, so it is neither the plain mix nor the target
    plain = torch.where(pasted[:, None], src, tgt)
    assert mixed.image.shape == src.shape and not torch.allclose(mixed.image, plain)
    # same generator state -> same mix; the step generator depends on (seed, it, rank)
    again, pasted2 = step.mix_batch(src, lab, tgt, pl, generator=step_generator(0, 7))
    assert torch.equal(pasted, pasted2) and torch.equal(again.image, mixed.image)


def test_teacher_predicts_with_batch_bn_statistics_and_no_dropout():
    torch.manual_seed(0)
    teacher = make_teacher(tiny_model())  # eval mode
    src, lab, tgt = batch(5)
    step = make_step(teacher_bn="batch")
    stats = {k: v.clone() for k, v in teacher.state_dict().items() if v.is_floating_point()}
    _, both = step.pseudo_labels(teacher, tgt)
    _, again = step.pseudo_labels(teacher, tgt)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in stats.items())  # stats kept
    _, alone = step.pseudo_labels(teacher, tgt[:1])
    assert torch.equal(both, again)  # dropout and drop path are off
    assert not torch.allclose(both[:1], alone, atol=1e-4)  # BN uses this batch's statistics
    assert not teacher.training and not any(m.training for m in teacher.modules())  # restored
    assert all(m.momentum == 0.1 for m in teacher.modules() if isinstance(m, nn.BatchNorm2d))
    running = make_step(teacher_bn="running")
    _, both = running.pseudo_labels(teacher, tgt)
    _, alone = running.pseudo_labels(teacher, tgt[:1])
    assert torch.allclose(both[:1], alone, atol=1e-5)  # eval mode: per-image predictions
    with pytest.raises(AssertionError, match="sync"):
        make_step(teacher_bn="sync")


def test_no_mixing_trains_on_the_pseudo_labelled_target():
    step = make_step(mix="none", jitter_p=0.0, blur_p=0.0, pseudo_threshold=0.968)
    src, lab, tgt = batch(3)
    pl, _ = step.pseudo_labels(FixedTeacher(), tgt)
    mixed, pasted = step.mix_batch(src, lab, tgt, pl, generator=step_generator(0, 0))
    assert not pasted.any()
    assert torch.equal(mixed.labels, pl.labels) and torch.equal(mixed.weights, pl.weights)
    assert torch.allclose(mixed.image, tgt, atol=1e-5)  # no jitter, no blur


def test_step_generator_depends_on_seed_iteration_rank():
    draws = lambda *a: torch.rand(4, generator=step_generator(*a))
    assert torch.equal(draws(0, 5, 0), draws(0, 5, 0))
    others = [draws(1, 5, 0), draws(0, 6, 0), draws(0, 5, 1)]
    assert all(not torch.equal(draws(0, 5, 0), o) for o in others)
    assert step_seed(0, 5, 1) != step_seed(0, 5, 1, stream=1)
    with pytest.raises(AssertionError):
        step_seed(0, -1)


def test_entropy_crop_box_finds_the_uncertain_region():
    probs = torch.zeros(2, 19, 64, 96)
    probs[:, 3] = 1.0  # certain everywhere ...
    probs[:, :, 16:48, 40:72] = 1.0 / 19  # ... but a 32 x 32 uniform square, corners on 8
    assert entropy_crop_box(probs, (32, 32), divisible=8) == (16, 48, 40, 72)
    # excluding those pixels (pasted source) moves the crop off them
    exclude = torch.zeros(2, 64, 96, dtype=torch.bool)
    exclude[:, 16:48, 40:72] = True
    probs[:, :, 0:16, 0:32] = 1.0 / 19
    y1, y2, x1, x2 = entropy_crop_box(probs, (16, 32), divisible=8, exclude=exclude)
    assert (y1, x1) == (0, 0) and (y2 - y1, x2 - x1) == (16, 32)
    with pytest.raises(AssertionError, match="multiple of 8"):
        entropy_crop_box(probs, (20, 32), divisible=8)


def test_losses_fall_on_a_fixed_batch():
    torch.manual_seed(1)
    model = tiny_model()
    teacher = make_teacher(model)
    step = make_step(cl=True)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    src, lab, tgt = batch(4)
    totals = []
    for _ in range(10):
        res = step(TrainForward(model), teacher, src, lab, tgt, it=0)  # same mix every time
        loss = sum(res.losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(loss.item())
    assert totals[-1] < 0.85 * totals[0] and totals[-1] == min(totals), totals


def test_bad_settings_and_inputs_are_asserted():
    # The config refuses bad settings (cluda.config.validate); inside they are asserts.
    with pytest.raises(AssertionError, match="cut"):
        UDAStep(mix="cut")
    with pytest.raises(AssertionError, match="'hr'"):
        UDAStep(multires="hr")
    step = make_step(fd_lambda=0.005)
    src, lab, tgt = batch()
    with pytest.raises(AssertionError, match="Segmentor"):
        step(tiny_model(), None, src, lab, tgt, it=0)
    with pytest.raises(AssertionError, match="needs the frozen ImageNet encoder"):
        step(TrainForward(tiny_model()), None, src, lab, tgt, it=0)
    with pytest.raises(AssertionError):
        make_step()(TrainForward(tiny_model()), None, src, lab[:, :32], tgt, it=0)

"""MIC (masked image consistency): the block mask, the masked term of the self-training step on
tiny models (its value recomputed by hand, gradients to the student only, HRDA's crop and CE mix,
the optional masked CL term), its config section, and train.py with it on (terms logged, exact
resume, the demo)."""
import math

import pytest
import torch

import train
from cluda.build import build_uda_step
from cluda.config import ConfigError, load_experiment
from cluda.losses import ContrastiveLoss, weighted_cross_entropy
from cluda.masking import block_mask, mask_images
from cluda.models import crop
from cluda.teacher import make_teacher
from cluda.uda import step_generator, TrainForward, UDAStep
from test_train import HRDA, _tensors_equal, read_csv, run
from test_uda import batch, make_step, tiny_model


# ---- the block mask --------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [0.3, 0.7])
def test_block_mask_withholds_the_ratio_of_blocks(ratio):
    g = torch.Generator().manual_seed(0)
    mask = block_mask(4, 320, 640, block_size=5, ratio=ratio, generator=g)  # 4 x 64 x 128 blocks
    assert mask.shape == (4, 1, 320, 640) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    # 32,768 independent blocks: the withheld share is within 5 standard errors of the ratio
    withheld = 1 - mask.mean().item()
    assert abs(withheld - ratio) < 5 * math.sqrt(ratio * (1 - ratio) / 32768), withheld
    assert block_mask(2, 64, 64, block_size=8, ratio=0.0, generator=g).min() == 1
    assert block_mask(2, 64, 64, block_size=8, ratio=1.0, generator=g).max() == 0


@pytest.mark.parametrize("size", [(64, 96), (70, 45)])
def test_block_mask_is_constant_on_blocks_aligned_to_the_corner(size):
    h, w = size
    b = 16
    mask = block_mask(3, h, w, block_size=b, ratio=0.5, generator=torch.Generator().manual_seed(1))
    gh, gw = math.ceil(h / b), math.ceil(w / b)
    cells = mask[:, 0, ::b, ::b]  # the value at each block's top-left pixel
    assert cells.shape == (3, gh, gw)
    expected = cells.repeat_interleave(b, 1).repeat_interleave(b, 2)[:, :h, :w]
    assert torch.equal(mask[:, 0], expected)  # every pixel takes its block's value
    # the blocks are not all alike (a mask constant per image would pass the line above)
    assert 0 < cells.mean() < 1 and (cells[0] != cells[1]).any()


def test_block_mask_is_a_function_of_the_generator_state():
    def draw(seed):
        return block_mask(2, 48, 80, block_size=8, ratio=0.7, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))
    # the step generator: the same (seed, iteration, rank) gives the same mask, another does not
    same = [block_mask(1, 64, 64, block_size=8, generator=step_generator(0, 7, 0)) for _ in range(2)]
    assert torch.equal(*same)
    assert not torch.equal(same[0], block_mask(1, 64, 64, block_size=8, generator=step_generator(0, 8, 0)))
    # the global RNG is neither used nor moved
    state = torch.get_rng_state()
    draw(3)
    assert torch.equal(state, torch.get_rng_state())


def test_mask_images_zeroes_the_withheld_blocks_only():
    g = torch.Generator().manual_seed(2)
    img = torch.randn(2, 3, 40, 56, generator=g)
    before = img.clone()
    out = mask_images(img, block_size=8, ratio=0.7, generator=torch.Generator().manual_seed(5))
    mask = block_mask(2, 40, 56, block_size=8, ratio=0.7, generator=torch.Generator().manual_seed(5))
    assert torch.equal(img, before)  # not modified in place
    assert torch.equal(out, img * mask)
    assert (out[mask.expand_as(out) == 0] == 0).all()
    assert torch.equal(out[mask.expand_as(out) == 1], img[mask.expand_as(img) == 1])


def test_mask_bad_arguments():
    with pytest.raises(AssertionError, match="ratio must lie in"):
        block_mask(1, 8, 8, ratio=1.5)
    with pytest.raises(AssertionError, match="block_size must be a positive integer"):
        block_mask(1, 8, 8, block_size=0)
    with pytest.raises(AssertionError, match="must be >= 1"):
        block_mask(0, 8, 8)
    with pytest.raises(AssertionError, match="floating-point"):
        mask_images(torch.zeros(1, 3, 8, 8, dtype=torch.long))
    with pytest.raises(AssertionError, match=r"\(B, C, H, W\)"):
        mask_images(torch.zeros(3, 8, 8))


# ---- the term in the self-training step -----------------------------------------------------

class RecordingForward(TrainForward):
    """TrainForward that remembers each call's image and detail box."""

    def __init__(self, model):
        super().__init__(model)
        self.calls = []

    def forward(self, img, *, box=None, with_delta=True):
        self.calls.append((img.detach().clone(), box))
        return super().forward(img, box=box, with_delta=with_delta)


def _no_aug(block=16, **kw):
    # Without colour jitter and blur, the masked image is the target crop times a block mask.
    return make_step(mic=True, mic_block_size=block, jitter_p=0.0, blur_p=0.0, **kw)


def test_mic_term_is_the_masked_crops_ce_against_the_unmasked_crops_pseudo_labels():
    torch.manual_seed(0)
    model = tiny_model().eval()  # no dropout: the forward can be repeated exactly
    teacher = make_teacher(model)
    teacher.requires_grad_(True)  # even so, no gradient may reach it
    step = _no_aug(mic_weight=0.5)
    src, lab, tgt = batch(3)
    net = RecordingForward(model)
    res = step(net, teacher, src, lab, tgt, it=4)
    assert list(res.losses) == ["src.ce", "mix.ce", "mic.ce"] == step.term_names(4)
    assert len(net.calls) == 3  # source, mixed, masked
    masked = net.calls[2][0]
    # the input: the target crop with 16 x 16 blocks zeroed, about 70 % of them
    kept = (masked != 0).any(dim=1)  # (B, H, W)
    cells = kept[:, ::16, ::16].float()
    assert torch.equal(kept.float(), cells.repeat_interleave(16, 1).repeat_interleave(16, 2))
    # (strong_augment's denormalise / renormalise round trip costs a few ulps)
    assert torch.allclose(masked, tgt * kept[:, None], atol=1e-5, rtol=0)
    assert 0 < cells.mean() < 1
    # the value: 0.5 x pixel-weighted CE against the teacher's pseudo-labels of the *unmasked*
    # crop, with their confidence weights (Gamma, 0 in the ignored top / bottom rows)
    pl, _ = step.pseudo_labels(teacher, tgt)
    assert pl.weights[:, :4].max() == 0 and pl.weights[:, -8:].max() == 0 and pl.weights.max() > 0
    logits, _, _ = model.forward_with_features(masked)
    expected = 0.5 * weighted_cross_entropy(logits, pl.labels, pl.weights)
    assert torch.allclose(res.losses["mic.ce"], expected, rtol=1e-5)
    # gradients reach the student, never the teacher
    res.losses["mic.ce"].backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.slow
def test_mic_term_with_hrda_uses_its_own_detail_crop_and_the_hr_loss_mix():
    torch.manual_seed(1)
    model = tiny_model(hrda=True, weight_head=False).eval()
    teacher = make_teacher(model)
    # 8 px blocks: 16 in the 32 x 32 detail crop. (A detail crop masked whole is an all-zero input;
    # a fresh network, whose biases are all 0, then has exactly zero activations, and each
    # LayerNorm's backward multiplies the gradient by 1 / sqrt(eps): float32 overflows.)
    step = _no_aug(block=8)
    src, lab, tgt = batch(4, size=128)
    net = RecordingForward(model)
    res = step(net, teacher, src, lab, tgt, it=2)
    masked, box = net.calls[2]
    assert box is not None and box[1] - box[0] == 32 and box[3] - box[2] == 32
    assert box[0] % 8 == 0 and box[2] % 8 == 0 and box[1] <= 128 and box[3] <= 128
    pl, _ = step.pseudo_labels(teacher, tgt)
    out = model(masked, box=box)
    # HRDA's CE: 0.9 x the fused logits' CE + 0.1 x the detail crop's CE on the cropped labels
    expected = (0.9 * weighted_cross_entropy(out.logits, pl.labels, pl.weights)
                + 0.1 * weighted_cross_entropy(out.hr_logits, crop(pl.labels, box), crop(pl.weights, box)))
    assert torch.allclose(res.losses["mic.ce"], expected, rtol=1e-5)
    res.losses["mic.ce"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert model.segmentor.encoder.patch_embed1.proj.weight.grad.abs().sum() > 0
    # the detail box is drawn from the step generator: another iteration, another box (over a few)
    boxes = set()
    for it in range(3, 6):
        net.calls.clear()
        step(net, teacher, src, lab, tgt, it=it)
        boxes.add(net.calls[2][1])
    assert len(boxes) > 1


def test_switching_mic_on_leaves_the_other_terms_and_draws_as_they_were():
    torch.manual_seed(2)
    model = tiny_model().eval()
    teacher = make_teacher(model)
    src, lab, tgt = batch(5)
    off = make_step(cl=True)(TrainForward(model), teacher, src, lab, tgt, it=3)
    net = RecordingForward(model)
    on = make_step(cl=True, mic=True, mic_block_size=16)(net, teacher, src, lab, tgt, it=3)
    assert set(on.losses) == set(off.losses) | {"mic.ce"}
    for k, v in off.losses.items():
        assert torch.equal(on.losses[k], v), k
    assert on.stats == off.stats
    # with the default strong augmentation the kept blocks are jittered / blurred target pixels
    masked = net.calls[2][0]
    kept = (masked != 0).all(dim=1, keepdim=True).expand_as(masked)
    assert kept.any() and not torch.allclose(masked[kept], tgt[kept], atol=1e-3)


def test_mic_weight_scales_only_the_masked_term_and_the_warmup_has_none():
    torch.manual_seed(3)
    model = tiny_model().eval()
    teacher = make_teacher(model)
    src, lab, tgt = batch(6)
    out = {w: make_step(mic=True, mic_block_size=16, mic_weight=w)(TrainForward(model), teacher, src, lab,
                                                                  tgt, it=5).losses
           for w in (1.0, 0.25)}
    assert torch.allclose(out[0.25]["mic.ce"], 0.25 * out[1.0]["mic.ce"], rtol=1e-6)
    assert torch.equal(out[0.25]["mix.ce"], out[1.0]["mix.ce"])
    step = make_step(mic=True, start_iter=3)
    assert step.term_names(2) == ["src.ce"] and step.term_names(3) == ["src.ce", "mix.ce", "mic.ce"]
    assert set(step(TrainForward(model), None, src, lab, tgt, it=2).losses) == {"src.ce"}
    assert "mic.ce" not in UDAStep(self_training=False, mic=True).term_names()


def test_masked_cl_term_has_the_pseudo_labels_and_weights_of_the_masked_ce():
    torch.manual_seed(4)
    model = tiny_model().eval()
    teacher = make_teacher(model)
    step = _no_aug(cl=True, cl_masked=True, cl_weight=0.5)
    src, lab, tgt = batch(7)
    net = RecordingForward(model)
    res = step(net, teacher, src, lab, tgt, it=1)
    assert list(res.losses) == ["src.ce", "src.cl", "mix.ce", "mix.cl", "mic.ce", "mic.cl"]
    pl, _ = step.pseudo_labels(teacher, tgt)
    _, fused, _ = model.forward_with_features(net.calls[2][0])
    expected = 0.5 * ContrastiveLoss(impl="torch")(fused, pl.labels, pl.weights)
    assert res.losses["mic.cl"].item() > 0
    assert torch.allclose(res.losses["mic.cl"], expected, rtol=1e-5)


def test_mic_hrda_cluda_family_terms_and_the_feature_weight_head():
    torch.manual_seed(5)
    model = tiny_model(hrda=True)
    teacher = make_teacher(model)
    step = make_step(cl=True, mic=True, mic_block_size=16, cl_masked=True)
    src, lab, tgt = batch(8, size=128)
    res = step(TrainForward(model), teacher, src, lab, tgt, it=0)
    assert list(res.losses) == ["src.ce", "src.cl", "mix.ce", "mix.cl", "mic.ce", "mic.cl"]
    assert all(math.isfinite(v.item()) and v.item() > 0 for v in res.losses.values())
    sum(res.losses.values()).backward()
    assert model.feature_weight_head.classifier.weight.grad.abs().sum() > 0


# ---- config ---------------------------------------------------------------------------------

def test_mic_section_defaults_overrides_and_checks():
    cfg = load_experiment(None)
    assert (cfg.mic.enabled, cfg.mic.block_size, cfg.mic.ratio, cfg.mic.weight) == (False, 64, 0.7, 1.0)
    assert not cfg.cl.masked and "mic.ce" not in build_uda_step(cfg).term_names()
    cfg = load_experiment(None, ["--mic.enabled=true", "--mic.block_size=32", "--mic.weight=0.5",
                                 "--cl.masked=true"])
    step = build_uda_step(cfg)
    assert (step.mic, step.mic_block_size, step.mic_ratio, step.mic_weight, step.cl_masked) == (
        True, 32, 0.7, 0.5, True)
    assert step.term_names()[-2:] == ["mic.ce", "mic.cl"]
    # the masked CL term alone still gets its contrastive module
    step = build_uda_step(load_experiment(None, ["--mic.enabled=true", "--cl.masked=true",
                                                 "--cl.source=false", "--cl.mixed=false"]))
    assert step.contrastive is not None and step.term_names() == ["src.ce", "src.fd", "mix.ce", "mic.ce", "mic.cl"]
    for overrides, message in [
        (["--mic.enabled=true", "--uda.enabled=false", "--cl.mixed=false"], "mic.enabled needs uda.enabled"),
        (["--mic.ratio=1.5"], r"mic.ratio in \[0, 1\]"),
        (["--mic.block_size=0"], "mic.block_size must be >= 1"),
        (["--mic.weight=-1"], "mic.weight >= 0"),
        (["--cl.masked=true"], "cl.masked needs mic.enabled"),
        (["--mic.enabled=true", "--cl.masked=true", "--cl.source=false", "--cl.mixed=false",
          "--model.hrda.enabled=true", "--model.hrda.feature_weight_head=false", "--data.crop_size=[512,512]"],
         "feature_weight_head"),
        (["--mic.size=3"], "block_size"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_experiment(None, overrides)


# ---- train.py with MIC on ------------------------------------------------------------------

MIC = ["--mic.enabled=true", "--mic.block_size=8"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["daformer_mic", "hrda_mic_cluda"])
def test_train_logs_mic_ce_after_the_warmup(tmp_path, family):
    if family == "daformer_mic":
        extra, terms = MIC + ["--uda.fd=false", "--cl.source=false", "--cl.mixed=false"], ["src.ce", "mix.ce", "mic.ce"]
    else:
        extra = HRDA + MIC + ["--uda.fd=false", "--cl.masked=true", "--train.max_iters=2"]
        terms = ["src.ce", "src.cl", "mix.ce", "mix.cl", "mic.ce", "mic.cl"]
    run(tmp_path, *extra)
    rows = read_csv(tmp_path / "run" / "log.csv")
    assert [c for c in rows[0] if c.startswith(("src.", "mix.", "mic."))] == terms
    assert rows[0]["mic.ce"] == ""  # iteration 1 is the source-only warm-up
    for t in terms:
        assert math.isfinite(float(rows[-1][t])) and float(rows[-1][t]) > 0, (t, rows[-1])
    total = sum(float(rows[-1][t]) for t in terms)
    assert float(rows[-1]["loss"]) == pytest.approx(total, rel=1e-5)


@pytest.mark.slow
def test_resume_with_mic_is_bitwise_identical(tmp_path):
    extra = MIC + ["--cl.masked=true", "--train.max_iters=5", "--uda.start_iter=2", "--data.workers=1",
                   "--train.checkpoint_interval=0"]
    whole = run(tmp_path / "a", *extra)
    run(tmp_path / "b", *extra, "--stop-at=3")
    resumed = run(tmp_path / "b", *extra, "--resume")
    assert _tensors_equal(whole["student"].state_dict(), resumed["student"].state_dict())
    assert _tensors_equal(whole["teacher"].state_dict(), resumed["teacher"].state_dict())
    a, b = read_csv(tmp_path / "a" / "run" / "log.csv"), read_csv(tmp_path / "b" / "run" / "log.csv")
    assert [r["mic.ce"] for r in a] == [r["mic.ce"] for r in b] and a[-1]["mic.ce"] != ""
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert whole["metrics"][19]["mIoU"] == resumed["metrics"][19]["mIoU"]


@pytest.mark.slow
def test_demo_accepts_mic_enabled(tmp_path):
    """The demo config itself (its crops, MiT-B0, its mic section) with MIC switched on, a few
    iterations past its warm-up."""
    cfg = load_experiment(train.DEFAULT_CONFIG, ["--mic.enabled=true"])
    assert cfg.mic.block_size == 8 and cfg.data.crop_size == [128, 128]
    threads = torch.get_num_threads()
    try:
        result = train.main([f"--experiment.work_dir={tmp_path}", "--mic.enabled=true",
                             "--experiment.threads=1", "--train.max_iters=3", "--uda.start_iter=1",
                             "--uda.pseudo_threshold=0.06",  # a 2-iteration network is not confident
                             "--data.batch_size=2", "--data.workers=0", "--data.val.num_samples=2",
                             "--train.tensorboard=false", "--eval.batch_size=2", "--experiment.device=cpu"])
    finally:
        torch.set_num_threads(threads)
    rows = read_csv(tmp_path / "demo" / "log.csv")
    assert float(rows[-1]["mic.ce"]) > 0 and 0 <= result["metrics"][19]["mIoU"] <= 1

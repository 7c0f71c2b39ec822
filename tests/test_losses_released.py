"""objective="released": the released CLUDA code's objective (user0407/CLUDA, `contrastive_loss` and
`multi_resolution_cl`, with the resizes its training step applies), against a direct transcription
of those semantics written here with N x N matrices in float64: the pixel-major feature rows against
image-major labels and weights, 255 as a class, the stuff / thing mask that multiplies only the
positives, w_i * w_j pair weights, the multi-resolution LR + LR->HR terms with delta pair weights,
the box mask times the label (so label 0 inside the box counts as outside), zero HR features outside
the box, the 0.5 factor and the mean over rows.

The 65 x 65 grid is shrunk (monkeypatched) so that the N x N transcription stays small; one test
checks that the real grid is what the op sees."""
import pytest
import torch
import torch.nn.functional as F

import cluda.losses as losses
import kernels
from cluda.data.labels import IGNORE_INDEX, THING_CLASSES
from cluda.losses import ContrastiveLoss, contrastive_loss, multires_contrastive_loss

GRID = (7, 9)
# Road (0), stuff, things and 255, so that every special case of the released code occurs.
POOL = torch.tensor([0, 1, 2, 8, 11, 13, IGNORE_INDEX])


@pytest.fixture
def small_grid(monkeypatch):
    monkeypatch.setattr(losses, "RELEASED_FEAT_SIZE", GRID)
    return GRID


def _labels(*shape, gen):
    return POOL[torch.randint(0, len(POOL), shape, generator=gen)]


# ------------------------------------------------------------------------------------------------
# The transcription
# ------------------------------------------------------------------------------------------------

def _normalised_rows(x):
    """(B, C, h, w) -> the released row order: normalise (B, h*w, C), then cat(unbind(., 1), 0)."""
    b, c = x.shape[:2]
    f = F.normalize(x.permute(0, 2, 3, 1).reshape(b, -1, c), dim=-1)
    return torch.cat(torch.unbind(f, dim=1), dim=0)


def _thing_mask(labels_col):
    """The released "don't compare stuff with things" (N, N) mask, built from the labels."""
    stuff = torch.isin(labels_col, torch.tensor(THING_CLASSES)).logical_not()
    return (stuff == stuff.T).double()


def _contrast(anchor_rows, partner_rows, labels_col, thing, pair_weight):
    """(log_prob * positive mask, positive mask): rows r against partners j, positives same label
    and j != r, negatives other labels; the thing mask and pair weights on log_prob."""
    n = labels_col.shape[0]
    sim = anchor_rows @ partner_rows.T
    logits = sim - sim.max(dim=1, keepdim=True).values.detach()
    same = (labels_col == labels_col.T).double()
    positive = same * (1 - torch.eye(n, dtype=torch.float64))
    negatives = (torch.exp(logits) * (1 - same)).sum(1, keepdim=True)
    log_prob = logits - torch.log(torch.exp(logits) + negatives)
    positive = positive * thing
    if pair_weight is not None:
        log_prob = log_prob * pair_weight
    return log_prob * positive, positive


def released_single(feats, labels, weights, size):
    """The released single-resolution loss on features resized to `size`."""
    f = F.interpolate(feats, size=size, mode="bilinear", align_corners=True)
    lab = F.interpolate(labels[:, None].double(), size=size, mode="nearest").long().reshape(-1, 1)
    pair = None
    if weights is not None:
        pw = F.interpolate(weights[:, None], size=size, mode="bilinear", align_corners=True).reshape(-1, 1)
        pair = pw @ pw.T
    rows = _normalised_rows(f)
    log_prob, positive = _contrast(rows, rows, lab, _thing_mask(lab), pair)
    den = positive.sum(1)
    den[den == 0] = 1
    return -(log_prob.sum(1) / den).mean()


def released_multires(lr, hr, labels, boxes, delta, weights, size):
    """The released HRDA head outputs, training-step resizes and `multi_resolution_cl`."""
    b, _, h, w = lr.shape
    scale = hr.shape[-2] // (boxes[0][1] - boxes[0][0])
    # HRDA head: LR features upsampled to the HR frame, HR features inserted into zeros, the
    # feature weight upsampled, the box mask on the LR grid.
    flr = F.interpolate(lr, scale_factor=scale, mode="bilinear", align_corners=True)
    fhr = torch.zeros_like(flr)
    mask = torch.zeros(b, 1, h, w, dtype=torch.float64)
    for i, (y1, y2, x1, x2) in enumerate(boxes):
        top, left, bh, bw = y1, x1, y2 - y1, x2 - x1
        fhr[i, :, scale * top:scale * (top + bh), scale * left:scale * (left + bw)] = hr[i]
        mask[i, :, top:top + bh, left:left + bw] = 1
    att = F.interpolate(delta, scale_factor=scale, mode="bilinear", align_corners=False)
    # Training step: everything to the fixed grid.
    flr = F.interpolate(flr, size=size, mode="bilinear", align_corners=True)
    fhr = F.interpolate(fhr, size=size, mode="bilinear", align_corners=True)
    att = F.interpolate(att, size=size, mode="bilinear", align_corners=True)
    lbl = F.interpolate(labels[:, None].double(), size=size, mode="nearest").long()
    msk = F.interpolate(mask, size=size, mode="nearest").long()
    hr_lbl = F.interpolate((msk * lbl).double(), size=size, mode="nearest").long()
    # multi_resolution_cl
    lab = lbl.reshape(-1, 1)
    hr_lab = hr_lbl.reshape(-1, 1)
    thing = _thing_mask(lab)
    mix_mask = torch.where(hr_lab == 0, 0, 1)
    mix_lab = mix_mask * hr_lab + (1 - mix_mask) * lab
    a = att.reshape(-1, 1)
    ld = (a @ a.T) * mix_mask.double()
    lr_rows, hr_rows = _normalised_rows(flr), _normalised_rows(fhr)
    lr_cl, positive = _contrast(lr_rows, lr_rows, lab, thing, ld)
    mx_cl, _ = _contrast(lr_rows, hr_rows, mix_lab, thing, 1 - ld)
    log_prob = lr_cl + mx_cl
    if weights is not None:
        pw = F.interpolate(weights[:, None], size=size, mode="bilinear", align_corners=True).reshape(-1, 1)
        log_prob = log_prob * (pw @ pw.T)
    den = positive.sum(1)
    den[den == 0] = 1
    return 0.5 * (-log_prob.sum(1) / den).mean()


# ------------------------------------------------------------------------------------------------
# Single resolution
# ------------------------------------------------------------------------------------------------

def _weights(b, hh, ww, gen):
    """A mixed pixel weight map: Gamma on target pixels, 1 on pasted ones, 0 in a margin."""
    w = torch.where(torch.rand(b, hh, ww, generator=gen) < 0.4, torch.tensor(1.0), torch.tensor(0.63))
    w[:, :2] = 0
    return w.double()


@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("weighted", [False, True])
def test_single_resolution_matches_the_transcription(small_grid, impl, batch, weighted):
    gen = torch.Generator().manual_seed(100 + batch)
    feats = torch.randn(batch, 6, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = _labels(batch, 20, 24, gen=gen)
    weights = _weights(batch, 20, 24, gen) if weighted else None
    loss = contrastive_loss(feats, labels, weights, objective="released", impl=impl)
    f_ref = feats.detach().clone().requires_grad_(True)
    expected = released_single(f_ref, labels, weights, small_grid)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    g = torch.randn((), generator=gen, dtype=torch.float64)
    (g * loss).backward()
    (g * expected).backward()
    torch.testing.assert_close(feats.grad, f_ref.grad, rtol=1e-9, atol=1e-12)


def test_single_resolution_triton_matches_in_float32(small_grid):
    gen = torch.Generator().manual_seed(7)
    feats = torch.randn(2, 6, 5, 6, generator=gen)
    labels = _labels(2, 20, 24, gen=gen)
    weights = _weights(2, 20, 24, gen).float()
    loss = contrastive_loss(feats, labels, weights, objective="released", impl="triton")
    expected = released_single(feats.double(), labels, weights.double(), small_grid)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_batch_two_pairs_features_with_other_pixels_labels(small_grid):
    """At batch 2 the released rows differ from a consistent (image-major) order; at batch 1 they
    do not: the loss must tell the two apart, and so must the transcription."""
    gen = torch.Generator().manual_seed(8)
    labels = _labels(2, 20, 24, gen=gen)
    feats = torch.randn(2, 6, 5, 6, generator=gen, dtype=torch.float64)
    released = contrastive_loss(feats, labels, objective="released", impl="reference")
    resized = F.interpolate(feats, size=small_grid, mode="bilinear", align_corners=True)
    consistent = contrastive_loss(resized, labels, pairs="all", ignore_index=-1, impl="reference")
    assert abs(released.item() - consistent.item()) > 1e-3
    one = contrastive_loss(feats[:1], labels[:1], objective="released", impl="reference")
    one_consistent = contrastive_loss(resized[:1], labels[:1], pairs="all", ignore_index=-1,
                                      impl="reference")
    torch.testing.assert_close(one, one_consistent, rtol=1e-10, atol=1e-12)


def test_released_uses_the_65_by_65_grid(monkeypatch):
    seen = []
    op = kernels.pixel_infonce

    def spy(feats, labels, **kw):
        seen.append((feats.shape[0], kw.get("ignore_index"), kw.get("temperature")))
        return op(feats, labels, **kw)

    monkeypatch.setattr(kernels, "pixel_infonce", spy)
    gen = torch.Generator().manual_seed(9)
    feats = torch.randn(2, 4, 16, 16, generator=gen)
    contrastive_loss(feats, _labels(2, 64, 64, gen=gen), objective="released", impl="torch")
    assert seen == [(2 * 65 * 65, -1, 1.0)]


# ------------------------------------------------------------------------------------------------
# Multi-resolution
# ------------------------------------------------------------------------------------------------

def _multires(batch, gen, dtype=torch.float64):
    lr = torch.randn(batch, 5, 4, 5, generator=gen, dtype=dtype)
    hr = torch.randn(batch, 5, 4, 4, generator=gen, dtype=dtype)
    labels = _labels(batch, 16, 20, gen=gen)
    labels[:, 4:8, 4:8] = 0  # road inside the first box: the released m_r counts it as outside
    delta = torch.sigmoid(torch.randn(batch, 1, 4, 5, generator=gen, dtype=dtype))
    boxes = [(1, 3, 1, 3), (2, 4, 3, 5)][:batch]  # (y1, y2, x1, x2)
    return lr, hr, labels, delta, boxes


@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("weighted", [False, True])
def test_multi_resolution_matches_the_transcription(small_grid, impl, batch, weighted):
    gen = torch.Generator().manual_seed(200 + batch)
    lr, hr, labels, delta, boxes = _multires(batch, gen)
    weights = _weights(batch, 16, 20, gen) if weighted else None
    ins = [t.clone().requires_grad_(True) for t in (lr, hr, delta)]
    refs = [t.clone().requires_grad_(True) for t in (lr, hr, delta)]
    hr_labels = labels[:, 4:12, 4:12]  # given as training passes it; the released loss ignores it
    loss = multires_contrastive_loss(ins[0], labels, ins[1], hr_labels, boxes=boxes, delta=ins[2],
                                     lr_weights=weights, objective="released", impl=impl,
                                     hr_weights=None if weights is None else weights[:, 4:12, 4:12])
    expected = released_multires(refs[0], refs[1], labels, boxes, refs[2], weights, small_grid)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
    g = torch.randn((), generator=gen, dtype=torch.float64)
    (g * loss).backward()
    (g * expected).backward()
    for got, want, name in zip(ins, refs, ("lr_feats", "hr_feats", "delta")):
        assert want.grad.abs().sum() > 0, name
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-8, atol=1e-11, msg=name)


def test_multi_resolution_triton_matches_in_float32(small_grid):
    gen = torch.Generator().manual_seed(11)
    lr, hr, labels, delta, boxes = _multires(2, gen, dtype=torch.float32)
    weights = _weights(2, 16, 20, gen)
    loss = multires_contrastive_loss(lr, labels, hr, None, boxes=boxes, delta=delta,
                                     lr_weights=weights.float(), objective="released", impl="triton")
    expected = released_multires(lr.double(), hr.double(), labels, boxes, delta.double(), weights,
                                 small_grid)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_multi_resolution_one_box_for_the_batch(small_grid):
    gen = torch.Generator().manual_seed(12)
    lr, hr, labels, delta, _ = _multires(2, gen)
    loss = multires_contrastive_loss(lr, labels, hr, None, boxes=(1, 3, 2, 4), delta=delta,
                                     objective="released", impl="reference")
    expected = released_multires(lr, hr, labels, [(1, 3, 2, 4)] * 2, delta, None, small_grid)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# What "released" fixes
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [
    ("pairs", "all"), ("pairs", "stuff"), ("weighting", "pair"), ("temperature", 0.1),
    ("feat_size", [65, 65]), ("ignore_index", -1), ("thing_classes", (11, 12)),
])
def test_released_asserts_the_options_it_fixes(option, value):
    # The config refuses them (cluda.config.validate); inside they are asserts.
    feats = torch.randn(1, 3, 4, 4)
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    with pytest.raises(AssertionError, match=rf"objective='released' fixes {option}"):
        contrastive_loss(feats, labels, objective="released", **{option: value})
    if option != "feat_size":
        with pytest.raises(AssertionError, match=rf"objective='released' fixes {option}"):
            multires_contrastive_loss(feats, labels, feats, labels, boxes=(0, 4, 0, 4),
                                      delta=torch.rand(1, 1, 4, 4), objective="released",
                                      **{option: value})
    with pytest.raises(AssertionError, match=rf"objective='released' fixes {option}"):
        ContrastiveLoss(objective="released", **{option: value})(feats, labels)


def test_released_multires_needs_its_weighted_lr_hr_form():
    feats = torch.randn(1, 3, 4, 4)
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    delta = torch.rand(1, 1, 4, 4)
    with pytest.raises(AssertionError, match="objective='released' fixes weighted"):
        multires_contrastive_loss(feats, labels, feats, labels, boxes=(0, 4, 0, 4), delta=delta,
                                  weighted=False, objective="released")
    with pytest.raises(AssertionError, match="needs hr_feats, boxes and delta"):
        multires_contrastive_loss(feats, labels, None, objective="released")
    with pytest.raises(AssertionError, match="needs hr_feats, boxes and delta"):
        multires_contrastive_loss(feats, labels, feats, labels, boxes=(0, 4, 0, 4),
                                  objective="released")
    with pytest.raises(AssertionError, match="integer multiple"):
        multires_contrastive_loss(feats, labels, torch.randn(1, 3, 5, 5), labels, boxes=(0, 2, 0, 2),
                                  delta=delta, objective="released")
    with pytest.raises(AssertionError, match="original"):
        contrastive_loss(feats, labels, objective="original")


def test_module_carries_the_objective(small_grid):
    gen = torch.Generator().manual_seed(13)
    feats = torch.randn(2, 6, 5, 6, generator=gen, dtype=torch.float64)
    labels = _labels(2, 20, 24, gen=gen)
    module = ContrastiveLoss(objective="released", impl="reference")
    assert "objective='released'" in repr(module)
    torch.testing.assert_close(module(feats, labels), released_single(feats, labels, None, small_grid))
    lr, hr, mlabels, delta, boxes = _multires(2, gen)
    torch.testing.assert_close(module.multires(lr, mlabels, hr, None, boxes=boxes, delta=delta),
                               released_multires(lr, hr, mlabels, boxes, delta, None, small_grid))

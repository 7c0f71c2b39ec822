"""Tests of cluda.losses: every CLUDA term against a brute-force double loop over pixel pairs written
here from the paper's definitions (Eq. 2-5, 7), the pair policies, the weightings, the 1/A
normalisation, the feature resize path, multi-resolution weights, weighted CE and DAFormer's FD."""
import math

import pytest
import torch
import torch.nn.functional as F

from cluda.data.labels import IGNORE_INDEX, THING_CLASSES
from cluda.losses import (ContrastiveLoss, box_mask, contrastive_loss, downscale_label_ratio,
                          feature_distance_loss, multires_contrastive_loss, resample_box,
                          to_feature_grid, weighted_cross_entropy)

THING = set(THING_CLASSES)
# A few stuff (0, 1, 2, 8, 10) and thing (11, 13) classes, plus ignore.
CLASS_POOL = torch.tensor([0, 1, 2, 8, 10, 11, 13, IGNORE_INDEX])
IMPLS = ["reference", "torch", "triton"]  # triton runs under TRITON_INTERPRET=1 on a CPU


def _labels(*shape, gen):
    idx = torch.randint(0, len(CLASS_POOL), shape, generator=gen)
    return CLASS_POOL[idx]


def brute_cl(feats, labels, weights=None, *, tau=1.0, pairs="all", weighting="anchor",
             exclusive=None, num_pixels=None):
    """sum_i w_i L_i / A by a double loop over (anchor, partner) pixels.

    feats (N, C) float64 (requires grad as wanted), labels list of ints, weights (N,) or None,
    exclusive list of bools or None. L_i = 1/|P_i| sum_p u_p [log(exp(s_ip) + sum_n exp(s_in)) - s_ip],
    u_p = w_p for pair weighting else 1. num_pixels = A (default N).
    """
    n = feats.shape[0]
    v = feats / feats.norm(dim=1, keepdim=True)

    def usable(k):
        if labels[k] == IGNORE_INDEX:
            return False
        return not (pairs == "stuff" and labels[k] in THING)

    total = feats.sum() * 0
    for i in range(n):
        if not usable(i):
            continue
        positives, negatives = [], []
        for j in range(n):
            if j == i or not usable(j):
                continue
            if exclusive is not None and exclusive[i] and exclusive[j]:
                continue
            if pairs == "stuff+thing" and (labels[i] in THING) != (labels[j] in THING):
                continue
            s = torch.dot(v[i], v[j]) / tau
            (positives if labels[j] == labels[i] else negatives).append((j, s))
        if not positives:
            continue
        neg = sum((torch.exp(s) for _, s in negatives), feats.new_zeros(()))
        li = feats.new_zeros(())
        for j, s in positives:
            u = weights[j] if (weighting == "pair" and weights is not None) else 1.0
            li = li + u * (torch.log(torch.exp(s) + neg) - s)
        li = li / len(positives)
        total = total + (weights[i] if weights is not None else 1.0) * li
    return total / (num_pixels if num_pixels is not None else n)


def flat(feats):
    """(B, C, h, w) -> (B h w, C) in (b, y, x) order."""
    return feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])


# ------------------------------------------------------------------------------------------------
# Single-resolution terms
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pairs", ["all", "stuff", "stuff+thing"])
def test_source_cl_matches_brute_force_value_and_gradient(impl, pairs):
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 5, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = _labels(2, 3, 4, gen=gen)
    tau = 0.7
    loss = contrastive_loss(feats.float(), labels, temperature=tau, pairs=pairs, impl=impl)
    f64 = flat(feats)
    expected = brute_cl(f64, labels.reshape(-1).tolist(), tau=tau, pairs=pairs)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert float(expected.detach()) > 0
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    g = torch.randn((), generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad(loss * g, feats)
    (grad_ref,) = torch.autograd.grad(expected * g, feats)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("weighting", ["anchor", "pair"])
def test_mixed_cl_matches_brute_force_with_weights(impl, weighting):
    gen = torch.Generator().manual_seed(2)
    feats = torch.randn(2, 6, 3, 3, generator=gen, requires_grad=True)
    labels = _labels(2, 3, 3, gen=gen)
    pasted = torch.rand(2, 3, 3, generator=gen) < 0.5
    gamma = 0.3 + 0.5 * torch.rand((), generator=gen).item()
    weights = torch.where(pasted, torch.ones(2, 3, 3), torch.full((2, 3, 3), gamma))
    loss = contrastive_loss(feats, labels, weights, pairs="stuff+thing", weighting=weighting, impl=impl)
    f64 = flat(feats.detach().double()).requires_grad_(True)
    expected = brute_cl(f64, labels.reshape(-1).tolist(), weights.reshape(-1).double(),
                        pairs="stuff+thing", weighting=weighting)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(flat(feats.grad).double(), f64.grad, rtol=1e-4, atol=1e-6)


def test_anchor_and_pair_weighting_agree_at_unit_weights_and_differ_otherwise():
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 4, 4, 4, generator=gen)
    labels = _labels(2, 4, 4, gen=gen)
    ones = torch.ones(2, 4, 4)
    src = contrastive_loss(feats, labels, impl="reference")
    for weighting in ("anchor", "pair"):
        torch.testing.assert_close(
            contrastive_loss(feats, labels, ones, weighting=weighting, impl="reference"), src)
    weights = 0.1 + torch.rand(2, 4, 4, generator=gen)
    anchor = contrastive_loss(feats, labels, weights, weighting="anchor", impl="reference")
    pair = contrastive_loss(feats, labels, weights, weighting="pair", impl="reference")
    assert abs(float(anchor) - float(pair)) > 1e-4


def test_stuff_thing_policy_has_no_cross_pairs():
    # With no stuff-thing pair, the loss splits exactly into a stuff-only and a thing-only problem.
    gen = torch.Generator().manual_seed(4)
    feats = torch.randn(2, 5, 4, 3, generator=gen)
    labels = _labels(2, 4, 3, gen=gen)
    is_thing = torch.isin(labels, torch.tensor(THING_CLASSES))
    stuff_only = torch.where(is_thing, IGNORE_INDEX, labels)
    thing_only = torch.where(is_thing | (labels == IGNORE_INDEX), labels, IGNORE_INDEX)
    split = contrastive_loss(feats, labels, pairs="stuff+thing", impl="reference")
    parts = (contrastive_loss(feats, stuff_only, pairs="all", impl="reference")
             + contrastive_loss(feats, thing_only, pairs="all", impl="reference"))
    torch.testing.assert_close(split, parts)
    # ... and differs from "all", where stuff and thing pixels are each other's negatives.
    assert abs(float(split) - float(contrastive_loss(feats, labels, pairs="all", impl="reference"))) > 1e-4


def test_stuff_policy_drops_thing_anchors_and_partners():
    gen = torch.Generator().manual_seed(5)
    feats = torch.randn(2, 5, 4, 3, generator=gen, requires_grad=True)
    labels = _labels(2, 4, 3, gen=gen)
    is_thing = torch.isin(labels, torch.tensor(THING_CLASSES))
    assert is_thing.any() and (~is_thing & (labels != IGNORE_INDEX)).any()
    loss = contrastive_loss(feats, labels, pairs="stuff", impl="reference")
    masked = contrastive_loss(feats.detach(), torch.where(is_thing, IGNORE_INDEX, labels), pairs="all",
                              impl="reference")
    torch.testing.assert_close(loss, masked)
    loss.backward()
    g = feats.grad.permute(0, 2, 3, 1)  # (B, h, w, C)
    assert torch.all(g[is_thing] == 0), "thing pixels must take no part in the stuff-only loss"
    assert g[~is_thing & (labels != IGNORE_INDEX)].abs().sum() > 0


def test_normalisation_divides_by_all_feature_pixels():
    # An all-ignored image adds pixels to A but no anchor: the loss shrinks by A_1 / (A_1 + A_2).
    gen = torch.Generator().manual_seed(6)
    feats = torch.randn(1, 4, 3, 5, generator=gen)
    labels = _labels(1, 3, 5, gen=gen)
    alone = contrastive_loss(feats, labels, pairs="all", impl="reference")
    extra = torch.randn(1, 4, 3, 5, generator=gen)
    both = contrastive_loss(torch.cat([feats, extra]),
                            torch.cat([labels, torch.full_like(labels, IGNORE_INDEX)]), pairs="all",
                            impl="reference")
    torch.testing.assert_close(both, alone * 15 / 30)
    # The sum over anchors itself: A * loss equals the brute-force sum.
    expected_sum = brute_cl(flat(feats).double(), labels.reshape(-1).tolist(), num_pixels=1)
    torch.testing.assert_close(alone.double() * 15, expected_sum, rtol=1e-5, atol=1e-6)


def test_labels_follow_the_features_by_nearest_neighbour():
    gen = torch.Generator().manual_seed(7)
    feats = torch.randn(2, 4, 3, 5, generator=gen)
    labels = _labels(2, 9, 10, gen=gen)  # image resolution: 3x and 2x the feature grid
    weights = torch.rand(2, 9, 10, generator=gen)
    f, lab, w = to_feature_grid(feats, labels[:, None], weights)
    assert f is feats and lab.shape == (2, 3, 5) and w.shape == (2, 3, 5)
    rows = torch.tensor([0, 3, 6])  # floor(i * 9 / 3)
    cols = torch.tensor([0, 2, 4, 6, 8])  # floor(j * 10 / 5)
    assert torch.equal(lab, labels[:, rows][:, :, cols])
    assert torch.equal(w, weights[:, rows][:, :, cols])
    loss = contrastive_loss(feats, labels, pairs="all", impl="reference")
    expected = brute_cl(flat(feats).double(), lab.reshape(-1).tolist())
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_feat_size_resizes_features_bilinearly_and_labels_nearest():
    gen = torch.Generator().manual_seed(8)
    feats = torch.randn(1, 4, 5, 7, generator=gen, requires_grad=True)
    labels = _labels(1, 10, 14, gen=gen)
    loss = contrastive_loss(feats, labels, pairs="stuff+thing", feat_size=[3, 4], impl="torch")
    # Hand-resized features: bilinear with half-pixel centres, source coordinate (i + 0.5) * H / h - 0.5.
    small = F.interpolate(feats.detach().double(), size=(3, 4), mode="bilinear", align_corners=False)
    rows = torch.tensor([0, 3, 6])  # floor(i * 10 / 3)
    cols = torch.tensor([0, 3, 7, 10])  # floor(j * 14 / 4)
    lab = labels[:, rows][:, :, cols]
    expected = brute_cl(flat(small), lab.reshape(-1).tolist(), pairs="stuff+thing")
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert feats.grad.abs().sum() > 0
    # The module keeps the same settings.
    module = ContrastiveLoss(pairs="stuff+thing", feat_size=(3, 4), impl="torch")
    torch.testing.assert_close(module(feats.detach(), labels), loss.detach())


def test_all_ignored_batch_gives_zero_with_zero_gradient():
    feats = torch.randn(2, 3, 2, 2, requires_grad=True)
    labels = torch.full((2, 2, 2), IGNORE_INDEX)
    loss = contrastive_loss(feats, labels, impl="reference")
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(feats.grad == 0)


def test_bad_options_are_asserted():
    # The config refuses them (cluda.config.validate, the Literal types); inside they are asserts.
    feats = torch.randn(1, 3, 2, 2)
    labels = torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(AssertionError, match="thing"):
        contrastive_loss(feats, labels, pairs="thing")
    with pytest.raises(AssertionError, match="pixel"):
        contrastive_loss(feats, labels, weighting="pixel")
    with pytest.raises(AssertionError):
        contrastive_loss(feats, labels.float())
    with pytest.raises(AssertionError):
        contrastive_loss(feats, torch.zeros(2, 2, 2, dtype=torch.long))


# ------------------------------------------------------------------------------------------------
# Multi-resolution CLUDA (Eq. 7)
# ------------------------------------------------------------------------------------------------

def _multires_inputs(gen, boxes):
    b, c = 2, 4
    lr = torch.randn(b, c, 4, 5, generator=gen, requires_grad=True)
    hr = torch.randn(b, c, 4, 4, generator=gen, requires_grad=True)
    lr_labels = _labels(b, 8, 10, gen=gen)
    hr_labels = _labels(b, 8, 8, gen=gen)
    delta = torch.sigmoid(torch.randn(b, 1, 4, 5, generator=gen)).requires_grad_(True)
    return lr, hr, lr_labels, hr_labels, delta


def _expected_weights(delta, boxes, hr_size):
    """Anchor weights by hand: delta inside each box, 1 outside (LR); 1 - delta resampled (HR)."""
    lr_w, hr_w = [], []
    for b, (y1, y2, x1, x2) in enumerate(boxes):
        top, left, bh, bw = y1, x1, y2 - y1, x2 - x1
        d = delta[b, 0]
        inside = torch.zeros_like(d, dtype=torch.bool)
        inside[top:top + bh, left:left + bw] = True
        lr_w.append(torch.where(inside, d, torch.ones_like(d)))
        # Bilinear with half-pixel centres, source coordinate (i + 0.5) * n / m - 0.5 clamped to the box.
        up = torch.empty(hr_size, dtype=delta.dtype)
        for y in range(hr_size[0]):
            for x in range(hr_size[1]):
                sy = min(max((y + 0.5) * bh / hr_size[0] - 0.5, 0.0), bh - 1)
                sx = min(max((x + 0.5) * bw / hr_size[1] - 0.5, 0.0), bw - 1)
                y0, x0 = int(sy), int(sx)
                y1, x1 = min(y0 + 1, bh - 1), min(x0 + 1, bw - 1)
                fy, fx = sy - y0, sx - x0
                c = d[top:top + bh, left:left + bw]
                up[y, x] = ((1 - fy) * ((1 - fx) * c[y0, x0] + fx * c[y0, x1])
                            + fy * ((1 - fx) * c[y1, x0] + fx * c[y1, x1]))
        hr_w.append(1 - up)
    return torch.stack(lr_w), torch.stack(hr_w)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("weighting", ["anchor", "pair"])
def test_multires_matches_brute_force(impl, weighting):
    gen = torch.Generator().manual_seed(9)
    # Per image, in LR cells; the HR grid (4 x 4) is 2x the second box, 2x by 4/3x the first.
    boxes = [(1, 3, 2, 5), (0, 2, 0, 2)]  # (y1, y2, x1, x2)
    lr, hr, lr_labels, hr_labels, delta = _multires_inputs(gen, boxes)
    lr_pw = torch.rand(2, 8, 10, generator=gen) + 0.2  # mixed pixel weights
    hr_pw = torch.rand(2, 8, 8, generator=gen) + 0.2
    loss = multires_contrastive_loss(lr, lr_labels, hr, hr_labels, boxes=torch.tensor(boxes), delta=delta,
                                     lr_weights=lr_pw, hr_weights=hr_pw, pairs="stuff+thing",
                                     weighting=weighting, temperature=0.5, impl=impl)
    # Brute force: the same pixels, weights assembled by hand, HR pixels exclusive.
    d64 = delta.detach().double().requires_grad_(True)
    lr_w, hr_w = _expected_weights(d64, boxes, (4, 4))
    _, lr_lab, lr_pw_s = to_feature_grid(lr, lr_labels, lr_pw)
    _, hr_lab, hr_pw_s = to_feature_grid(hr, hr_labels, hr_pw)
    f64 = torch.cat([flat(lr.detach().double()), flat(hr.detach().double())]).requires_grad_(True)
    w = torch.cat([(lr_w * lr_pw_s).reshape(-1), (hr_w * hr_pw_s).reshape(-1)])
    labels = torch.cat([lr_lab.reshape(-1), hr_lab.reshape(-1)]).tolist()
    exclusive = [False] * lr_lab.numel() + [True] * hr_lab.numel()
    expected = brute_cl(f64, labels, w, tau=0.5, pairs="stuff+thing", weighting=weighting,
                        exclusive=exclusive)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(torch.cat([flat(lr.grad), flat(hr.grad)]).double(), f64.grad,
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(delta.grad.double(), d64.grad, rtol=1e-4, atol=1e-6)


def test_multires_has_no_hr_hr_pairs():
    # Only HR pixels carry labels: every HR pixel's partners are HR pixels, which are excluded.
    gen = torch.Generator().manual_seed(10)
    lr, hr, _, hr_labels, delta = _multires_inputs(gen, None)
    lr_labels = torch.full((2, 8, 10), IGNORE_INDEX)
    loss = multires_contrastive_loss(lr, lr_labels, hr, hr_labels, boxes=(0, 2, 0, 2), delta=delta,
                                     pairs="all", impl="reference")
    assert loss.item() == 0.0
    # The same HR pixels as plain (non-exclusive) features do form pairs.
    assert contrastive_loss(hr, hr_labels, pairs="all", impl="reference").item() > 0


def test_multires_weight_layout_and_gradient_to_delta():
    gen = torch.Generator().manual_seed(11)
    boxes = [(2, 4, 1, 3), (1, 3, 3, 5)]  # (y1, y2, x1, x2)
    lr, hr, lr_labels, hr_labels, delta = _multires_inputs(gen, boxes)
    mask = box_mask(boxes, batch=2, size=(4, 5))
    assert mask.shape == (2, 1, 4, 5) and int(mask.sum()) == 8
    assert mask[0, 0, 2:4, 1:3].all() and mask[1, 0, 1:3, 3:5].all()
    # resample_box: bilinear over the box only.
    _, hr_w = _expected_weights(delta.detach(), boxes, (4, 4))
    torch.testing.assert_close(1 - resample_box(delta.detach(), boxes, size=(4, 4))[:, 0], hr_w)
    loss = multires_contrastive_loss(lr, lr_labels, hr, hr_labels, boxes=boxes, delta=delta,
                                     pairs="stuff+thing", impl="torch")
    loss.backward()
    g = delta.grad[:, 0]
    assert torch.all(g[~mask[:, 0]] == 0), "delta outside the HR box must not enter the loss"
    assert g[mask[:, 0]].abs().sum() > 0
    assert lr.grad.abs().sum() > 0 and hr.grad.abs().sum() > 0


def test_multires_unweighted_and_lr_only_modes():
    gen = torch.Generator().manual_seed(12)
    lr, hr, lr_labels, hr_labels, delta = _multires_inputs(gen, None)
    unweighted = multires_contrastive_loss(lr, lr_labels, hr, hr_labels, boxes=(1, 3, 1, 3),
                                           weighted=False, pairs="all", impl="reference")
    _, lr_lab, _ = to_feature_grid(lr, lr_labels)
    _, hr_lab, _ = to_feature_grid(hr, hr_labels)
    f64 = torch.cat([flat(lr.detach().double()), flat(hr.detach().double())])
    labels = torch.cat([lr_lab.reshape(-1), hr_lab.reshape(-1)]).tolist()
    expected = brute_cl(f64, labels, exclusive=[False] * 40 + [True] * 32)
    torch.testing.assert_close(unweighted.double(), expected, rtol=1e-5, atol=1e-6)
    lr_only = multires_contrastive_loss(lr, lr_labels, None, boxes=(1, 3, 1, 3), delta=delta,
                                        impl="reference")
    torch.testing.assert_close(lr_only, contrastive_loss(lr, lr_labels, impl="reference"))
    module = ContrastiveLoss(pairs="all", impl="reference")
    torch.testing.assert_close(module.multires(lr, lr_labels, hr, hr_labels, boxes=(1, 3, 1, 3),
                                               weighted=False), unweighted)


def test_multires_asserts_bad_boxes_and_missing_inputs():
    gen = torch.Generator().manual_seed(13)
    lr, hr, lr_labels, hr_labels, delta = _multires_inputs(gen, None)
    with pytest.raises(AssertionError, match="must lie in the 4 x 5 LR feature grid"):
        multires_contrastive_loss(lr, lr_labels, hr, hr_labels, boxes=(3, 5, 0, 2), delta=delta)
    with pytest.raises(AssertionError, match="one box"):
        multires_contrastive_loss(lr, lr_labels, hr, hr_labels, boxes=[(0, 2, 0, 2)] * 3, delta=delta)
    with pytest.raises(AssertionError, match="delta"):
        multires_contrastive_loss(lr, lr_labels, hr, hr_labels, boxes=(0, 2, 0, 2))
    with pytest.raises(AssertionError, match="hr_weights"):
        multires_contrastive_loss(lr, lr_labels, hr, hr_labels, boxes=(0, 2, 0, 2), delta=delta,
                                  lr_weights=torch.rand(2, 8, 10))


# ------------------------------------------------------------------------------------------------
# Cross-entropy and feature distance
# ------------------------------------------------------------------------------------------------

def test_weighted_cross_entropy_matches_hand_computation():
    gen = torch.Generator().manual_seed(14)
    logits = torch.randn(2, 5, 3, 4, generator=gen, requires_grad=True)
    labels = torch.randint(0, 5, (2, 3, 4), generator=gen)
    labels[0, 1, 2] = IGNORE_INDEX
    weights = torch.rand(2, 3, 4, generator=gen)
    loss = weighted_cross_entropy(logits, labels, weights)
    total = 0.0
    for b in range(2):
        for y in range(3):
            for x in range(4):
                k = int(labels[b, y, x])
                if k == IGNORE_INDEX:
                    continue
                z = logits[b, :, y, x].detach().double()
                nll = math.log(float(torch.exp(z).sum())) - float(z[k])
                total += float(weights[b, y, x]) * nll
    assert loss.item() == pytest.approx(total / 24, rel=1e-6)  # mean over all 24 pixels
    unweighted = weighted_cross_entropy(logits, labels)
    torch.testing.assert_close(unweighted, F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX,
                                                           reduction="sum") / 24)
    # Low-resolution logits are upsampled bilinearly to the labels first.
    up = weighted_cross_entropy(logits, torch.randint(0, 5, (2, 6, 8), generator=gen))
    assert torch.isfinite(up) and up > 0


def test_downscale_label_ratio_hand_example():
    car, person, road, sidewalk = 13, 11, 0, 1
    I = IGNORE_INDEX
    labels = torch.tensor([[
        [car, car, person, person],
        [car, car, person, road],
        [road, road, I, I],
        [sidewalk, sidewalk, I, car],
    ]])
    out = downscale_label_ratio(labels, size=(2, 2))
    # car 4/4 -> car; person 3/4 = 0.75 -> person; road 2/4 -> ignore; ignore 3/4 -> ignore.
    assert out.tolist() == [[[car, person], [I, I]]]
    strict = downscale_label_ratio(labels, size=(2, 2), min_ratio=0.8)
    assert strict.tolist() == [[[car, I], [I, I]]]
    # a value that is no class (the data sets never give one) is never a cell's class
    assert downscale_label_ratio(torch.full((1, 4, 4), 40), size=(2, 2)).tolist() == [[[I, I], [I, I]]]


def test_feature_distance_only_on_thing_cells():
    gen = torch.Generator().manual_seed(15)
    car, person, road, sky = 13, 11, 0, 10
    labels = torch.tensor([[car, sky], [road, person]]).repeat_interleave(4, 0).repeat_interleave(4, 1)
    labels = labels[None]  # (1, 8, 8): four 4x4 blocks on a 2 x 2 feature grid
    feats = torch.randn(1, 6, 2, 2, generator=gen, requires_grad=True)
    imnet = torch.randn(1, 6, 2, 2, generator=gen)
    loss = feature_distance_loss(feats, imnet, labels, lam=0.005)
    d = (feats.detach() - imnet).norm(dim=1)[0]  # (2, 2)
    expected = 0.005 * (d[0, 0] + d[1, 1]) / 2  # car and person cells only
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.all(feats.grad[0, :, 0, 1] == 0) and torch.all(feats.grad[0, :, 1, 0] == 0)
    assert feats.grad[0, :, 0, 0].abs().sum() > 0 and feats.grad[0, :, 1, 1].abs().sum() > 0


def test_feature_distance_without_thing_cells_is_zero_with_graph():
    gen = torch.Generator().manual_seed(16)
    feats = torch.randn(2, 3, 2, 2, generator=gen, requires_grad=True)
    labels = torch.randint(0, 6, (2, 8, 8), generator=gen)  # stuff classes only
    loss = feature_distance_loss(feats, torch.randn(2, 3, 2, 2, generator=gen), labels)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(feats.grad == 0)
    with pytest.raises(AssertionError):
        feature_distance_loss(feats, torch.randn(2, 3, 4, 4), labels)

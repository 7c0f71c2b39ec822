"""The loss terms of CLUDA self-training (Vayyat et al., "CLUDA: Contrastive Learning in
Unsupervised Domain Adaptation for Semantic Segmentation"), on top of DAFormer / HRDA.

Total loss (CLUDA Eq. 6): l_ce^s + l_ce^t + L_CL^s + L_CL^m + lambda * L_FD, where

- L_CL^s (Eq. 3), the source contrastive term: pixel InfoNCE (Eq. 2) over every pixel of the
  source batch's fused decoder features F (B, C, h, w), labels = source labels at the feature
  resolution, all anchor weights 1.
- L_CL^m (Eq. 4-5), the mixed contrastive term: on the ClassMix image's features, labels = source
  labels where pasted and teacher pseudo-labels elsewhere, anchor weights 1 on pasted pixels and
  Gamma (the teacher's confidence ratio) on target pixels. `weighting="anchor"` is the paper's
  sum_i w_i L_i / A; `"pair"` is the original code's weight w_i * w_j on each (anchor, positive)
  pair, i.e. `pos_weight = w` in the op.
- The pair policy (Sec. 5.5): `"all"` (S-S + T-T + S-T pairs), `"stuff"` (S-S only: thing pixels
  are neither anchors nor partners), `"stuff+thing"` (S-S + T-T: no stuff-thing pair).
- Every CL term is normalised by A, the number of feature pixels in the call (the paper's 1/A).
- Multi-resolution CLUDA (Eq. 7, HRDA): LR features of the whole crop and HR features of the
  detail crop in one op call; HR pixels are `exclusive` (no HR-HR pair), anchor weights delta for
  LR pixels inside the detail crop, 1 - delta for HR pixels, 1 for LR pixels outside it.
- l_ce: per-pixel cross-entropy times a pixel weight map, averaged over all pixels (DACS /
  DAFormer Eq. 4-5, mmseg `weight_reduce_loss` with reduction "mean").
- L_FD: DAFormer's ImageNet feature distance (Hoyer et al., CVPR 2022, Sec. 3.3, Eq. 8-9): the L2
  distance between the student's and a frozen ImageNet encoder's last-stage features on feature
  cells whose label is a thing class, averaged over those cells, times lambda = 0.005.

`objective="released"` replays instead what the released CLUDA code (github.com/user0407/CLUDA,
its `contrastive_loss` and `multi_resolution_cl`) computes, which is not Eq. 2-7. On the fused
features resized to 65 x 65 (bilinear, align_corners=True; labels nearest; pixel weights
bilinear), with tau = 1, w_i the mixed pixel weight (1 for the source term) and, for every row r
of its N = B * 65 * 65 rows:

- the feature of row r is pixel-major (row r = p * B + b: pixel p of image b) while its label and
  weights are image-major (row r = b * 65 * 65 + p); at batch 1 the two agree, at batch 2 most
  rows pair one pixel's feature with another pixel's label;
- 255 is an ordinary class; every pair counts (its stuff / thing mask multiplies only positives,
  which never cross the split, so it changes nothing);
- P_r = rows j != r with label_j = label_r, l_rj = log(exp(s_rj) + Neg_r) - s_rj, Neg_r the sum
  of exp(s_rn) over the rows n of other labels, s the cosine of two rows' features;
- single resolution: L = 1/N sum_r 1/|P_r| sum_{j in P_r} w_r w_j l_rj (w_r w_j on positive
  pairs only, rows without a positive count in N);
- multi-resolution: the LR features are upsampled x2 (bilinear, align_corners=True) to the HR
  frame, the HR detail features placed into a zero map of that frame, both then resized to 65 x 65;
  a_r = delta (upsampled x2, align_corners=False, then to 65 x 65), m_r = 1 where the row's label
  inside the detail box is not 0 (the box mask times the label, so "road" inside the box counts as
  outside). Anchors are the LR rows only:
  L = 0.5/N sum_r 1/|P_r| sum_{j in P_r} w_r w_j [a_r a_j m_r l_rj + (1 - a_r a_j m_r) x_rj],
  with x_rj the same term between LR row r and HR row j (s: LR row against HR row; negatives: the
  HR rows of other labels, zero features outside the box included).

The pixel InfoNCE itself, L_i for every pixel without the N x N matrix, is `kernels.pixel_infonce`.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from cluda.data.labels import IGNORE_INDEX, NUM_CLASSES, THING_CLASSES

PAIR_POLICIES = ("all", "stuff", "stuff+thing")
WEIGHTINGS = ("anchor", "pair")
OBJECTIVES = ("paper", "released")
# The released code resizes every fused feature map to this grid before its loss.
RELEASED_FEAT_SIZE = (65, 65)

Box = Tuple[int, int, int, int]  # (top, left, height, width) in LR-feature cells
Boxes = Union[Box, Sequence[Box], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Bringing labels and weights to the feature grid
# ----------------------------------------------------------------------------------------------

def _label_map(labels: torch.Tensor, name: str) -> torch.Tensor:
    """(B, H, W) or (B, 1, H, W) integer tensor -> (B, H, W)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    if labels.dim() == 4 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dim() != 3:
        raise ValueError(f"{name} must be (B, H, W) or (B, 1, H, W), got shape {tuple(labels.shape)}")
    return labels


def _weight_map(weights: torch.Tensor, name: str) -> torch.Tensor:
    """(B, H, W) or (B, 1, H, W) float tensor -> (B, H, W)."""
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor")
    if weights.dim() == 4 and weights.shape[1] == 1:
        weights = weights[:, 0]
    if weights.dim() != 3:
        raise ValueError(f"{name} must be (B, H, W) or (B, 1, H, W), got shape {tuple(weights.shape)}")
    return weights


def _check_feats(feats: torch.Tensor, name: str) -> None:
    if not isinstance(feats, torch.Tensor) or not feats.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor")
    if feats.dim() != 4:
        raise ValueError(f"{name} must be (B, C, h, w), got shape {tuple(feats.shape)}")


def _nearest(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, H, W) labels or weights -> (B, *size), nearest neighbour (mmseg / F.interpolate's
    'nearest': source index floor(dst * H / h))."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    # Label ids (<= 255 in practice) are exact in float32.
    y = F.interpolate(x[:, None].float(), size=tuple(size), mode="nearest")[:, 0]
    return y.to(x.dtype)


def to_feature_grid(feats: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor] = None,
                    *, feat_size: Optional[Sequence[int]] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Puts features, labels and pixel weights on one grid for the contrastive loss.

    `feat_size=None` keeps the fused features at their native resolution (the point of the fused
    kernel) and resizes labels / weights to it by nearest neighbour. `feat_size=[h, w]` resizes the
    features bilinearly (align_corners=False) to (h, w), the original CLUDA code's 65 x 65, and the
    labels / weights by nearest neighbour to the same size.

    Args:
        feats: (B, C, h, w) fused decoder features.
        labels: (B, H, W) or (B, 1, H, W) integer labels at any resolution.
        weights: optional (B, H, W) or (B, 1, H, W) per-pixel weights at the labels' resolution.
        feat_size: None, or the (h, w) the features are resized to.

    Returns:
        feats (B, C, h', w'), labels (B, h', w') int64, weights (B, h', w') float32 or None.
    """
    _check_feats(feats, "feats")
    labels = _label_map(labels, "labels")
    if labels.shape[0] != feats.shape[0]:
        raise ValueError(f"labels hold {labels.shape[0]} images, feats {feats.shape[0]}")
    if weights is not None:
        weights = _weight_map(weights, "weights")
        if weights.shape != labels.shape:
            raise ValueError(f"weights shape {tuple(weights.shape)} != labels shape {tuple(labels.shape)}")
    if feat_size is not None:
        feat_size = tuple(int(s) for s in feat_size)
        if len(feat_size) != 2 or min(feat_size) < 1:
            raise ValueError(f"feat_size must be None or [h, w] with h, w >= 1, got {feat_size}")
        if tuple(feats.shape[-2:]) != feat_size:
            feats = F.interpolate(feats, size=feat_size, mode="bilinear", align_corners=False)
    size = feats.shape[-2:]
    labels = _nearest(labels.long(), size)
    if weights is not None:
        weights = _nearest(weights.float(), size)
    return feats, labels, weights


def _flatten(feats: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B * h * w, C), pixel order (b, y, x)."""
    return feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])


# ----------------------------------------------------------------------------------------------
# Contrastive terms
# ----------------------------------------------------------------------------------------------

def _check_options(pairs: str, weighting: str, temperature: float, objective: str = "paper") -> None:
    if pairs not in PAIR_POLICIES:
        raise ValueError(f"pairs must be one of {PAIR_POLICIES}, got {pairs!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


# The arguments objective="released" fixes: (name, the default it must keep, what the released
# code does instead).
_RELEASED_FIXED = (
    ("temperature", 1.0, "tau = 1"),
    ("pairs", "stuff+thing", "all pairs"),
    ("weighting", "anchor", "w_i * w_j on positive pairs"),
    ("feat_size", None, "features resized to 65 x 65"),
    ("thing_classes", tuple(THING_CLASSES), "a stuff / thing mask without effect"),
    ("ignore_index", IGNORE_INDEX, "255 as an ordinary class"),
    ("weighted", True, "its delta-weighted multi-resolution loss only"),
)


def _check_released(**given) -> None:
    """ValueError unless every argument the released objective fixes is at its default."""
    for name, default, what in _RELEASED_FIXED:
        if name not in given:
            continue
        value = given[name]
        if name == "thing_classes":
            value = tuple(int(c) for c in value)
        if value != default:
            raise ValueError(f"objective='released' fixes {name} ({what}): leave it at its default "
                             f"{default!r}, got {given[name]!r}")


def _infonce_sum(feats: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor], *,
                 exclusive: Optional[torch.Tensor], temperature: float, pairs: str, weighting: str,
                 thing_classes: Sequence[int], ignore_index: int, impl: str,
                 variant: Optional[str] = None) -> torch.Tensor:
    """sum_i w_i L_i / A over flat pixels: feats (N, C), labels (N,), weights (N,) or None."""
    n = feats.shape[0]
    if pairs == "all":
        groups = None
    else:
        is_thing = torch.isin(labels, torch.tensor(list(thing_classes), dtype=labels.dtype,
                                                   device=labels.device))
        if pairs == "stuff":
            # Thing pixels are neither anchors nor partners; they still count in A.
            labels = torch.where(is_thing, torch.full_like(labels, ignore_index), labels)
            groups = None
        else:
            groups = is_thing.long()
    pos_weight = weights if (weighting == "pair" and weights is not None) else None
    per_anchor = kernels.pixel_infonce(feats, labels, temperature=temperature, groups=groups,
                                       exclusive=exclusive, pos_weight=pos_weight,
                                       ignore_index=ignore_index, impl=impl,
                                       variant=variant)  # (N,) float32
    if weights is not None:
        per_anchor = weights.float() * per_anchor
    return per_anchor.sum() / max(n, 1)


def contrastive_loss(feats: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor] = None,
                     *, temperature: float = 1.0, pairs: str = "stuff+thing", weighting: str = "anchor",
                     feat_size: Optional[Sequence[int]] = None,
                     thing_classes: Sequence[int] = THING_CLASSES, ignore_index: int = IGNORE_INDEX,
                     impl: str = "auto", variant: Optional[str] = None,
                     objective: str = "paper") -> torch.Tensor:
    """Source (Eq. 3) or mixed (Eq. 4-5) CLUDA contrastive loss over a whole batch, in one op call.

    L = (1 / A) * sum_i w_i L_i, with L_i the pixel InfoNCE of Eq. 2 (`kernels.pixel_infonce`),
    A = B * h * w the number of feature pixels and w_i = 1 (source) or the mixed pixel weight
    (1 on pasted source pixels, Gamma on target pixels).

    Args:
        feats: (B, C, h, w) fused decoder features (before dropout and the classifier).
        labels: (B, H, W) or (B, 1, H, W) integer labels (source labels, or the mixed labels);
            brought to the feature grid by nearest neighbour. `ignore_index` pixels are no anchor
            and no partner.
        weights: None for the source term (all 1), or the (B, H, W) mixed pixel weight map at the
            labels' resolution (`cluda.augment.mix(...).weights`).
        temperature: tau in s_ij = v_i . v_j / tau (the original code: 1).
        pairs: "all" (S-S + T-T + S-T), "stuff" (S-S) or "stuff+thing" (S-S + T-T), Sec. 5.5.
        weighting: "anchor" (the paper: w_i L_i) or "pair" (the original code: w_i * w_p on each
            positive pair, via the op's pos_weight). Irrelevant when weights is None.
        feat_size: None (native resolution) or [h, w] to resize the features to (65 x 65 in the
            original code); see `to_feature_grid`.
        thing_classes: label ids of the thing classes (Cityscapes train ids by default).
        ignore_index: label value of ignored pixels.
        impl: passed to `kernels.pixel_infonce` ("auto", "triton", "torch", "reference").
        variant: passed to `kernels.pixel_infonce`: the Triton launch preset (None: the default).
        objective: "paper" (Eq. 2-5) or "released": the released code's objective (see the module
            docstring), which fixes temperature, pairs, weighting, feat_size, thing_classes and
            ignore_index: those must keep their defaults (ValueError otherwise).

    Returns:
        0-dim float32 loss, differentiable w.r.t. feats (and weights if they require grad).
    """
    _check_options(pairs, weighting, temperature, objective)
    if objective == "released":
        _check_released(temperature=temperature, pairs=pairs, weighting=weighting,
                        feat_size=feat_size, thing_classes=thing_classes, ignore_index=ignore_index)
        return _released_contrastive_loss(feats, labels, weights, impl=impl, variant=variant)
    feats, labels, weights = to_feature_grid(feats, labels, weights, feat_size=feat_size)
    return _infonce_sum(_flatten(feats), labels.reshape(-1),
                        None if weights is None else weights.reshape(-1), exclusive=None,
                        temperature=temperature, pairs=pairs, weighting=weighting,
                        thing_classes=thing_classes, ignore_index=ignore_index, impl=impl,
                        variant=variant)


def _parse_boxes(boxes: Boxes, batch: int, h: int, w: int) -> List[Box]:
    """One (top, left, height, width) box per image, checked to lie inside the (h, w) LR grid."""
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.tolist()
    boxes = list(boxes)
    if len(boxes) == 4 and all(isinstance(v, (int, float)) for v in boxes):
        boxes = [tuple(boxes)] * batch  # one box for the whole batch
    if len(boxes) != batch:
        raise ValueError(f"need one box for the batch or one per image ({batch}), got {len(boxes)}")
    out = []
    for box in boxes:
        if len(box) != 4 or any(float(v) != int(v) for v in box):
            raise ValueError(f"a box is (top, left, height, width) in integer LR-feature cells, got {box}")
        top, left, bh, bw = (int(v) for v in box)
        if bh < 1 or bw < 1 or top < 0 or left < 0 or top + bh > h or left + bw > w:
            raise ValueError(f"box {box} (top, left, height, width) does not fit the {h} x {w} LR feature grid")
        out.append((top, left, bh, bw))
    return out


def box_mask(boxes: Boxes, *, batch: int, size: Sequence[int], device=None) -> torch.Tensor:
    """(B, 1, h, w) bool mask, True inside each image's (top, left, height, width) box.

    Args:
        boxes: one box for all images, a sequence of B boxes or a (B, 4) integer tensor.
        batch: B.
        size: (h, w) of the LR feature grid.
        device: device of the mask.
    """
    h, w = size
    mask = torch.zeros(batch, 1, h, w, dtype=torch.bool, device=device)
    for b, (top, left, bh, bw) in enumerate(_parse_boxes(boxes, batch, h, w)):
        mask[b, 0, top:top + bh, left:left + bw] = True
    return mask


def resample_box(x: torch.Tensor, boxes: Boxes, *, size: Sequence[int]) -> torch.Tensor:
    """Bilinearly resamples the box region of an LR map onto the HR grid that covers it.

    Each image's box is cropped and resized to `size` with `F.interpolate(..., mode="bilinear",
    align_corners=False)`: HR pixel (y, x) reads the crop at (y + 0.5) * bh / hh - 0.5, clamped to
    the crop. So an HR pixel's value depends only on cells inside the box (the LR cells it lies
    under and their in-box neighbours). Differentiable w.r.t. x.

    Args:
        x: (B, K, h, w) LR map (e.g. delta).
        boxes: one box for all images, a sequence of B boxes or a (B, 4) tensor, in LR cells.
        size: (hh, ww) of the HR grid.

    Returns:
        (B, K, hh, ww).
    """
    b, _, h, w = x.shape
    out = []
    for i, (top, left, bh, bw) in enumerate(_parse_boxes(boxes, b, h, w)):
        crop = x[i:i + 1, :, top:top + bh, left:left + bw]
        out.append(F.interpolate(crop, size=tuple(size), mode="bilinear", align_corners=False))
    return torch.cat(out)


def multires_contrastive_loss(lr_feats: torch.Tensor, lr_labels: torch.Tensor,
                              hr_feats: Optional[torch.Tensor] = None,
                              hr_labels: Optional[torch.Tensor] = None, *,
                              boxes: Optional[Boxes] = None, delta: Optional[torch.Tensor] = None,
                              lr_weights: Optional[torch.Tensor] = None,
                              hr_weights: Optional[torch.Tensor] = None, weighted: bool = True,
                              temperature: float = 1.0, pairs: str = "stuff+thing",
                              weighting: str = "anchor", thing_classes: Sequence[int] = THING_CLASSES,
                              ignore_index: int = IGNORE_INDEX, impl: str = "auto",
                              variant: Optional[str] = None, objective: str = "paper") -> torch.Tensor:
    """Multi-resolution CLUDA (Eq. 7) on HRDA's LR context and HR detail features, one op call.

    Pixels: the B * h_lr * w_lr LR pixels, then the B * h_hr * w_hr HR pixels. HR pixels are
    exclusive (an HR pixel pairs only with LR pixels), so the contrast links the two scales. Anchor
    weights: delta on LR pixels inside the image's HR box, 1 - delta (delta resampled onto the HR
    grid by `resample_box`) on HR pixels, 1 on LR pixels outside the box; times the pixel weights
    (1 / Gamma) for the mixed term. L = sum_i w_i L_i / A with A = all LR + HR pixels.

    Modes: `hr_feats=None` is the paper's "LR only" (the plain contrastive loss on the LR
    features, times lr_weights); `weighted=False` is "LR + HR" (all delta weights 1);
    `weighted=True` is the learned weighting.

    Args:
        lr_feats: (B, C, h_lr, w_lr) fused features of the whole (downscaled) training crop.
        lr_labels: (B, H, W) or (B, 1, H, W) labels of the whole crop (nearest to the LR grid).
        hr_feats: (B, C, h_hr, w_hr) fused features of the HR detail crop, or None (LR only).
        hr_labels: labels of the detail crop (nearest to the HR grid); needed with hr_feats.
        boxes: each image's detail crop as (top, left, height, width) in LR-feature cells: one
            box for the batch, a sequence of B boxes or a (B, 4) integer tensor.
        delta: (B, 1, h_lr, w_lr) map in (0, 1) from the feature-weight head; needed when
            weighted. Gradients flow into it.
        lr_weights: optional pixel weights of the whole crop (mixed term), at lr_labels' size.
        hr_weights: optional pixel weights of the detail crop, at hr_labels' size; give both or
            neither when hr_feats is set.
        weighted: use delta / 1 - delta (True) or weight 1 everywhere (False).
        temperature, pairs, weighting, thing_classes, ignore_index, impl, variant: as
            `contrastive_loss`.
        objective: "paper" (Eq. 7) or "released": the released code's multi-resolution objective
            (see the module docstring; four op calls). It needs hr_feats, boxes and delta, reads
            the labels and weights of the whole crop only (hr_labels / hr_weights are not used:
            the released code takes the HR pixels' labels from the whole crop on its 65 x 65
            grid), and fixes weighted and the options `contrastive_loss` lists (ValueError unless
            they keep their defaults).

    Returns:
        0-dim float32 loss, differentiable w.r.t. lr_feats, hr_feats and delta.
    """
    _check_options(pairs, weighting, temperature, objective)
    if objective == "released":
        _check_released(temperature=temperature, pairs=pairs, weighting=weighting,
                        thing_classes=thing_classes, ignore_index=ignore_index, weighted=weighted)
        if hr_feats is None or boxes is None or delta is None:
            raise ValueError("objective='released' multi-resolution CL needs hr_feats, boxes and "
                             "delta (the released code has only its delta-weighted LR + HR loss)")
        return _released_multires_loss(lr_feats, lr_labels, hr_feats, boxes=boxes, delta=delta,
                                       weights=lr_weights, impl=impl, variant=variant)
    common = dict(temperature=temperature, pairs=pairs, weighting=weighting,
                  thing_classes=thing_classes, ignore_index=ignore_index, impl=impl, variant=variant)
    if hr_feats is None:
        return contrastive_loss(lr_feats, lr_labels, lr_weights, **common)
    if hr_labels is None or boxes is None:
        raise ValueError("multi-resolution CL with hr_feats needs hr_labels and boxes")
    if (lr_weights is None) != (hr_weights is None):
        raise ValueError("give both lr_weights and hr_weights (mixed term) or neither (source term)")
    lr_feats, lr_labels, lr_weights = to_feature_grid(lr_feats, lr_labels, lr_weights)
    hr_feats, hr_labels, hr_weights = to_feature_grid(hr_feats, hr_labels, hr_weights)
    (b, c, h, w), (hh, ww) = lr_feats.shape, hr_feats.shape[-2:]
    if hr_feats.shape[:2] != (b, c):
        raise ValueError(f"hr_feats {tuple(hr_feats.shape)} must share batch and channels with "
                         f"lr_feats {tuple(lr_feats.shape)}")
    if weighted:
        if delta is None:
            raise ValueError("weighted multi-resolution CL needs delta (or pass weighted=False)")
        if not isinstance(delta, torch.Tensor) or tuple(delta.shape) != (b, 1, h, w):
            raise ValueError(f"delta must be (B, 1, h_lr, w_lr) = {(b, 1, h, w)}, got "
                             f"{tuple(getattr(delta, 'shape', ()))}")
        inside = box_mask(boxes, batch=b, size=(h, w), device=lr_feats.device)  # (B, 1, h, w)
        delta = delta.float()
        lr_w = torch.where(inside, delta, torch.ones_like(delta))[:, 0]          # (B, h, w)
        hr_w = 1 - resample_box(delta, boxes, size=(hh, ww))[:, 0]              # (B, hh, ww)
    else:
        _parse_boxes(boxes, b, h, w)  # still reject a box that does not fit
        lr_w = torch.ones(b, h, w, device=lr_feats.device)
        hr_w = torch.ones(b, hh, ww, device=lr_feats.device)
    if lr_weights is not None:
        lr_w = lr_w * lr_weights
        hr_w = hr_w * hr_weights
    feats = torch.cat([_flatten(lr_feats), _flatten(hr_feats).to(lr_feats.dtype)])  # (N_lr + N_hr, C)
    labels = torch.cat([lr_labels.reshape(-1), hr_labels.reshape(-1)])
    weights = torch.cat([lr_w.reshape(-1), hr_w.reshape(-1)])
    exclusive = torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device)
    exclusive[lr_labels.numel():] = True
    return _infonce_sum(feats, labels, weights, exclusive=exclusive, temperature=temperature,
                        pairs=pairs, weighting=weighting, thing_classes=thing_classes,
                        ignore_index=ignore_index, impl=impl, variant=variant)


# ----------------------------------------------------------------------------------------------
# The released code's objective (objective="released")
# ----------------------------------------------------------------------------------------------

def _released_grid(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The released code's resize of features and weight maps: bilinear, align_corners=True."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def _pixel_major(feats: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (h * w * B, C), row p * B + b = pixel p of image b: the order of the
    released code's `torch.cat(torch.unbind(feats, 1), 0)` on (B, h * w, C) features."""
    return feats.flatten(2).permute(2, 0, 1).reshape(-1, feats.shape[1])


# Labels are never negative, so -1 as the op's ignore_index makes every label, 255 included, a
# class of its own, as in the released code.
_NO_IGNORE = -1


def _released_contrastive_loss(feats: torch.Tensor, labels: torch.Tensor,
                               weights: Optional[torch.Tensor], *, impl: str,
                               variant: Optional[str]) -> torch.Tensor:
    """The released single-resolution loss (module docstring) as one op call: the features in the
    released row order (pixel-major), labels and weights in theirs (image-major), u = w."""
    _check_feats(feats, "feats")
    labels = _label_map(labels, "labels")
    if labels.shape[0] != feats.shape[0]:
        raise ValueError(f"labels hold {labels.shape[0]} images, feats {feats.shape[0]}")
    size = RELEASED_FEAT_SIZE
    feats = _released_grid(feats, size)                          # (B, C, 65, 65)
    rows = _pixel_major(feats)                                   # (N, C)
    row_labels = _nearest(labels.long(), size).reshape(-1)       # (N,) image-major
    w = None
    if weights is not None:
        weights = _weight_map(weights, "weights")
        if weights.shape != labels.shape:
            raise ValueError(f"weights shape {tuple(weights.shape)} != labels shape {tuple(labels.shape)}")
        dtype = torch.float64 if feats.dtype == torch.float64 else torch.float32
        w = _released_grid(weights[:, None].to(dtype), size).reshape(-1)  # (N,) image-major
    per_row = kernels.pixel_infonce(rows, row_labels, temperature=1.0, pos_weight=w,
                                    ignore_index=_NO_IGNORE, impl=impl, variant=variant)
    if w is not None:
        per_row = w.to(per_row.dtype) * per_row
    return per_row.sum() / row_labels.numel()


def _released_multires_loss(lr_feats: torch.Tensor, lr_labels: torch.Tensor, hr_feats: torch.Tensor,
                            *, boxes: Boxes, delta: torch.Tensor, weights: Optional[torch.Tensor],
                            impl: str, variant: Optional[str]) -> torch.Tensor:
    """The released multi-resolution loss (module docstring) with four calls of the op.

    Per LR anchor r the op sums u_j l_rj over the positives P_r for a partner weight u. The LR
    term is one call (u = w * a, anchor weight w_r a_r m_r). The LR -> HR term pairs each LR row
    with the HR rows only (the LR rows `exclusive`); its weight w_r w_j (1 - a_r a_j m_r) is
    w_r w_j - (w_r a_r m_r)(w_j a_j): two calls, u = w and u = w * a. Those calls count HR row r
    (which carries row r's label) as a positive of anchor r, which the released code leaves out
    (the diagonal of its N x N mask), so its term u_r x_rr is taken off again. x_rr needs Neg_r,
    which a fourth call gives: with one zero-feature partner per label holding all the positive
    weight, (|P_r| + 1) L_r = log(Neg_r + K) for K labels (the K - 1 zero partners of other
    labels add exp(0) = 1 each to the negatives).
    """
    _check_feats(lr_feats, "lr_feats")
    _check_feats(hr_feats, "hr_feats")
    lr_labels = _label_map(lr_labels, "lr_labels")
    b, c, h, w = lr_feats.shape
    hh, ww = hr_feats.shape[-2:]
    if hr_feats.shape[:2] != (b, c) or lr_labels.shape[0] != b:
        raise ValueError(f"hr_feats {tuple(hr_feats.shape)} and lr_labels {tuple(lr_labels.shape)} "
                         f"must share the batch (and channels) of lr_feats {tuple(lr_feats.shape)}")
    if not isinstance(delta, torch.Tensor) or tuple(delta.shape) != (b, 1, h, w):
        raise ValueError(f"delta must be (B, 1, h_lr, w_lr) = {(b, 1, h, w)}, got "
                         f"{tuple(getattr(delta, 'shape', ()))}")
    box_list = _parse_boxes(boxes, b, h, w)
    scale = hh // box_list[0][2]
    if any(bh * scale != hh or bw * scale != ww for _, _, bh, bw in box_list):
        raise ValueError(f"objective='released' needs the {hh} x {ww} HR features to be an integer "
                         f"multiple of every detail box (in LR cells), got {box_list}")
    if weights is not None:
        weights = _weight_map(weights, "lr_weights")
        if weights.shape != lr_labels.shape:
            raise ValueError(f"lr_weights shape {tuple(weights.shape)} != lr_labels shape "
                             f"{tuple(lr_labels.shape)}")
    dtype = torch.float64 if lr_feats.dtype == torch.float64 else torch.float32  # of the weights
    dev = lr_feats.device
    size = RELEASED_FEAT_SIZE
    frame = (h * scale, w * scale)  # the HR frame on the stride-4 grid

    # The released code's maps: LR features upsampled to the HR frame, HR features placed into a
    # zero map of it, delta upsampled as HRDA's head resizes it; then all of them to 65 x 65.
    lr_frame = F.interpolate(lr_feats, size=frame, mode="bilinear", align_corners=True)
    hr_frame = torch.cat([F.pad(hr_feats[i:i + 1], (scale * left, frame[1] - scale * (left + bw),
                                                     scale * top, frame[0] - scale * (top + bh)))
                          for i, (top, left, bh, bw) in enumerate(box_list)])
    att = F.interpolate(delta.to(dtype), size=frame, mode="bilinear", align_corners=False)
    lr_rows = _pixel_major(_released_grid(lr_frame, size))                      # (N, C)
    hr_rows = _pixel_major(_released_grid(hr_frame, size)).to(lr_rows.dtype)  # (N, C)
    a = _released_grid(att, size).reshape(-1)                                   # (N,) image-major
    labels = _nearest(lr_labels.long(), size)                                   # (B, 65, 65)
    in_box = _nearest(box_mask(box_list, batch=b, size=(h, w), device=dev)[:, 0].long(), size)
    m = (in_box * labels != 0).reshape(-1).to(dtype)                            # (N,)
    labels = labels.reshape(-1)
    n = labels.numel()
    wt = (torch.ones(n, dtype=dtype, device=dev) if weights is None
          else _released_grid(weights[:, None].to(dtype), size).reshape(-1))   # (N,)
    classes, inverse = torch.unique(labels, return_inverse=True)
    class_size = torch.bincount(inverse)[inverse].to(dtype)                    # (N,) |P_r| + 1
    k = classes.numel()
    op = dict(temperature=1.0, ignore_index=_NO_IGNORE, impl=impl, variant=variant)

    # LR term: anchor weight w_r a_r m_r, partner weight w_j a_j.
    lr_term = wt * a * m * kernels.pixel_infonce(lr_rows, labels, pos_weight=wt * a, **op)

    # LR -> HR term: exclusive LR rows pair with the HR rows only; the HR rows' own results are
    # not used.
    rows = torch.cat([lr_rows, hr_rows])
    row_labels = torch.cat([labels, labels])
    lr_only = torch.arange(2 * n, device=dev) < n
    zeros = torch.zeros(n, dtype=dtype, device=dev)

    def positive_sum(u: torch.Tensor) -> torch.Tensor:
        """(N,) sum of u_j x_rj over the HR rows j labelled like row r, HR row r included."""
        per = kernels.pixel_infonce(rows, row_labels, exclusive=lr_only,
                                    pos_weight=torch.cat([zeros, u]), **op)[:n]
        return class_size * per

    probe = kernels.pixel_infonce(
        torch.cat([rows, rows.new_zeros(k, c)]), torch.cat([row_labels, classes]),
        exclusive=torch.cat([lr_only, torch.zeros(k, dtype=torch.bool, device=dev)]),
        pos_weight=torch.cat([zeros, zeros, torch.ones(k, dtype=dtype, device=dev)]), **op)[:n]
    neg = (torch.exp((class_size + 1) * probe) - k).clamp_min(0)                 # (N,) Neg_r
    v_lr = lr_rows.to(dtype) / lr_rows.to(dtype).norm(dim=1, keepdim=True).clamp_min(1e-12)
    v_hr = hr_rows.to(dtype) / hr_rows.to(dtype).norm(dim=1, keepdim=True).clamp_min(1e-12)
    s_rr = (v_lr * v_hr).sum(1)                                                  # (N,)
    x_rr = torch.log(torch.exp(s_rr) + neg) - s_rr
    cross = (wt * (positive_sum(wt) - wt * x_rr)
             - wt * a * m * (positive_sum(wt * a) - wt * a * x_rr))
    # |P_r| = class size - 1 (0: no positive, the released loss adds nothing for the row).
    cross = torch.where(class_size > 1, cross / (class_size - 1).clamp_min(1), torch.zeros_like(cross))
    return 0.5 * (lr_term + cross).sum() / n


class ContrastiveLoss(nn.Module):
    """The CLUDA contrastive terms with their settings fixed once (from the config).

    `loss(feats, labels)` is the source term (Eq. 3), `loss(feats, mixed_labels, mixed_weights)`
    the mixed term (Eq. 4-5), `loss.multires(...)` the multi-resolution version (Eq. 7).

    Args:
        temperature: tau (the original code: 1).
        pairs: "all", "stuff" or "stuff+thing" (Sec. 5.5).
        weighting: "anchor" (the paper) or "pair" (the original code).
        feat_size: None (native resolution) or [h, w] (65 x 65 in the original code); single-
            resolution terms only.
        thing_classes: label ids of the thing classes.
        ignore_index: label value of ignored pixels.
        impl: `kernels.pixel_infonce` implementation.
        variant: Triton launch preset of `kernels.pixel_infonce` (None: the default).
        objective: "paper" (Eq. 2-7) or "released" (the released code's objective; the options
            it fixes must keep their defaults, see `contrastive_loss`).
    """

    def __init__(self, *, temperature: float = 1.0, pairs: str = "stuff+thing",
                 weighting: str = "anchor", feat_size: Optional[Sequence[int]] = None,
                 thing_classes: Sequence[int] = THING_CLASSES, ignore_index: int = IGNORE_INDEX,
                 impl: str = "auto", variant: Optional[str] = None, objective: str = "paper"):
        super().__init__()
        _check_options(pairs, weighting, temperature, objective)
        if objective == "released":
            _check_released(temperature=temperature, pairs=pairs, weighting=weighting,
                            feat_size=feat_size, thing_classes=thing_classes,
                            ignore_index=ignore_index)
        self.temperature = float(temperature)
        self.pairs = pairs
        self.weighting = weighting
        self.feat_size = None if feat_size is None else tuple(int(s) for s in feat_size)
        self.thing_classes = tuple(int(c) for c in thing_classes)
        self.ignore_index = int(ignore_index)
        self.impl = impl
        self.variant = variant
        self.objective = objective

    def _common(self) -> dict:
        return dict(temperature=self.temperature, pairs=self.pairs, weighting=self.weighting,
                    thing_classes=self.thing_classes, ignore_index=self.ignore_index, impl=self.impl,
                    variant=self.variant, objective=self.objective)

    def forward(self, feats: torch.Tensor, labels: torch.Tensor,
                weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """See `contrastive_loss`."""
        return contrastive_loss(feats, labels, weights, feat_size=self.feat_size, **self._common())

    def multires(self, lr_feats: torch.Tensor, lr_labels: torch.Tensor,
                 hr_feats: Optional[torch.Tensor] = None, hr_labels: Optional[torch.Tensor] = None,
                 *, boxes: Optional[Boxes] = None, delta: Optional[torch.Tensor] = None,
                 lr_weights: Optional[torch.Tensor] = None, hr_weights: Optional[torch.Tensor] = None,
                 weighted: bool = True) -> torch.Tensor:
        """See `multires_contrastive_loss`."""
        return multires_contrastive_loss(lr_feats, lr_labels, hr_feats, hr_labels, boxes=boxes,
                                         delta=delta, lr_weights=lr_weights, hr_weights=hr_weights,
                                         weighted=weighted, **self._common())

    def extra_repr(self) -> str:
        return (f"objective={self.objective!r}, temperature={self.temperature}, pairs={self.pairs!r}, "
                f"weighting={self.weighting!r}, feat_size={self.feat_size}, impl={self.impl!r}, "
                f"variant={self.variant!r}")


# ----------------------------------------------------------------------------------------------
# Cross-entropy and feature distance
# ----------------------------------------------------------------------------------------------

def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                           weights: Optional[torch.Tensor] = None, *,
                           ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Pixel-weighted cross-entropy, mean over all pixels (DACS / DAFormer, CLUDA's l_ce).

    loss = (1 / (B H W)) * sum_pixels w * CE(logits, label), ignored pixels contributing 0 (but
    counted in the mean, as mmseg's `weight_reduce_loss(..., reduction="mean")`). Logits at a
    lower resolution than the labels are upsampled bilinearly (align_corners=False) first, as
    mmseg's decode heads do.

    Args:
        logits: (B, K, h, w) class scores.
        labels: (B, H, W) or (B, 1, H, W) integer labels.
        weights: None (all 1: the source CE) or (B, H, W) pixel weights (the mixed CE's map).
        ignore_index: label value of ignored pixels.

    Returns:
        0-dim float32 loss.
    """
    _check_feats(logits, "logits")
    labels = _label_map(labels, "labels")
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels hold {labels.shape[0]} images, logits {logits.shape[0]}")
    if tuple(logits.shape[-2:]) != tuple(labels.shape[-2:]):
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    ce = F.cross_entropy(logits.float(), labels.long(), ignore_index=ignore_index, reduction="none")
    if weights is not None:
        weights = _weight_map(weights, "weights")
        if weights.shape != labels.shape:
            raise ValueError(f"weights shape {tuple(weights.shape)} != labels shape {tuple(labels.shape)}")
        ce = ce * weights.float()
    return ce.mean()


def downscale_label_ratio(labels: torch.Tensor, *, size: Sequence[int], min_ratio: float = 0.75,
                          num_classes: int = NUM_CLASSES,
                          ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """DAFormer's class-ratio downsampling of a label map to a feature grid.

    Each (H // h) x (W // w) block of pixels becomes one cell; the cell takes the most frequent
    value in the block (the ignore index counting as a value of its own) if that value covers at
    least `min_ratio` of the block, and `ignore_index` otherwise. Rows / columns beyond
    h * (H // h) / w * (W // w) are dropped, as average pooling does.

    Args:
        labels: (B, H, W) or (B, 1, H, W) integer labels in [0, num_classes) or ignore_index.
        size: (h, w) of the feature grid.
        min_ratio: the fraction of the block the majority value must cover (0.75 in DAFormer).
        num_classes: number of classes.
        ignore_index: label value of ignored pixels.

    Returns:
        (B, h, w) int64 labels.
    """
    labels = _label_map(labels, "labels").long()
    bsz, big_h, big_w = labels.shape
    h, w = (int(s) for s in size)
    if h < 1 or w < 1 or big_h < h or big_w < w:
        raise ValueError(f"cannot downscale a {big_h} x {big_w} label map to {h} x {w}")
    sh, sw = big_h // h, big_w // w
    if big_h // sh != h or big_w // sw != w:
        raise ValueError(f"a {big_h} x {big_w} label map has no integer block size giving {h} x {w}")
    valid = (labels == ignore_index) | ((labels >= 0) & (labels < num_classes))
    if not bool(valid.all()):
        raise ValueError(f"labels must lie in [0, {num_classes}) or be {ignore_index}")
    # (B, h, w, sh * sw) blocks, with ignore recoded as class num_classes.
    blocks = labels[:, :h * sh, :w * sw].reshape(bsz, h, sh, w, sw).permute(0, 1, 3, 2, 4)
    blocks = blocks.reshape(bsz, h, w, sh * sw)
    blocks = torch.where(blocks == ignore_index, torch.full_like(blocks, num_classes), blocks)
    # Count per value with one comparison per class: O(N) memory, no atomics.
    counts = torch.stack([(blocks == k).sum(-1) for k in range(num_classes + 1)], dim=-1)
    best_count, best = counts.max(dim=-1)  # (B, h, w)
    out = torch.where(best == num_classes, torch.full_like(best, ignore_index), best)
    return torch.where(best_count >= min_ratio * sh * sw, out, torch.full_like(out, ignore_index))


def feature_distance_loss(feats: torch.Tensor, imnet_feats: torch.Tensor, labels: torch.Tensor, *,
                          lam: float = 0.005, thing_classes: Sequence[int] = THING_CLASSES,
                          min_ratio: float = 0.75, num_classes: int = NUM_CLASSES,
                          ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """DAFormer's thing-class ImageNet feature distance, lambda * L_FD (Hoyer et al., Sec. 3.3).

    d = ||F_student - F_ImageNet||_2 over channels at each cell of the last encoder stage;
    L_FD = mean of d over cells whose class-ratio-downsampled source label
    (`downscale_label_ratio`) is a thing class. With no such cell the loss is 0 and still part of
    the graph (zero gradient), never NaN.

    Args:
        feats: (B, C, h, w) student encoder's last-stage features on the source image.
        imnet_feats: (B, C, h, w) frozen ImageNet encoder's features on the same image (detached).
        labels: (B, H, W) or (B, 1, H, W) source labels at image resolution.
        lam: lambda_FD (0.005 in DAFormer).
        thing_classes: the classes whose cells are regularised.
        min_ratio: class-ratio threshold of the label downsampling.
        num_classes: number of classes.
        ignore_index: label value of ignored pixels.

    Returns:
        0-dim float32 loss lam * L_FD.
    """
    _check_feats(feats, "feats")
    if not isinstance(imnet_feats, torch.Tensor) or imnet_feats.shape != feats.shape:
        raise ValueError(f"imnet_feats must have the student features' shape {tuple(feats.shape)}, "
                         f"got {tuple(getattr(imnet_feats, 'shape', ()))}")
    cell_labels = downscale_label_ratio(labels, size=feats.shape[-2:], min_ratio=min_ratio,
                                        num_classes=num_classes, ignore_index=ignore_index)
    things = torch.tensor(list(thing_classes), dtype=cell_labels.dtype, device=cell_labels.device)
    mask = torch.isin(cell_labels, things)  # (B, h, w)
    dist = torch.linalg.vector_norm(feats.float() - imnet_feats.detach().float(), dim=1)  # (B, h, w)
    # Index the thing cells instead of multiplying by the mask: the norm's gradient at a zero
    # distance elsewhere never enters, and an empty selection sums to a graph-connected 0.
    selected = dist[mask]
    return lam * selected.sum() / mask.sum().clamp_min(1)

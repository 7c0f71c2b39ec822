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

`objective="released"` replays instead what the released CLUDA code computes, which is not
Eq. 2-7: `cluda.losses_released` (its module docstring says what that code does).

The pixel InfoNCE itself, L_i for every pixel without the N x N matrix, is `kernels.pixel_infonce`.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from cluda.data.labels import IGNORE_INDEX, NUM_CLASSES, THING_CLASSES
from cluda.models.hrda import Box

PAIR_POLICIES = ("all", "stuff", "stuff+thing")
WEIGHTINGS = ("anchor", "pair")
OBJECTIVES = ("paper", "released")
# The released code resizes every fused feature map to this grid before its loss.
RELEASED_FEAT_SIZE = (65, 65)

# Detail crops on the LR feature grid: HRDA's (y1, y2, x1, x2) boxes, end-exclusive, in LR cells.
Boxes = Union[Box, Sequence[Box], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Bringing labels and weights to the feature grid
# ----------------------------------------------------------------------------------------------

def _label_map(labels: torch.Tensor) -> torch.Tensor:
    """(B, H, W) or (B, 1, H, W) integer labels -> (B, H, W)."""
    assert not labels.is_floating_point() and labels.dtype != torch.bool, labels.dtype
    if labels.dim() == 4 and labels.shape[1] == 1:
        labels = labels[:, 0]
    assert labels.dim() == 3, f"labels must be (B, H, W) or (B, 1, H, W), got {tuple(labels.shape)}"
    return labels


def _weight_map(weights: torch.Tensor) -> torch.Tensor:
    """(B, H, W) or (B, 1, H, W) float weights -> (B, H, W)."""
    assert weights.is_floating_point(), weights.dtype
    if weights.dim() == 4 and weights.shape[1] == 1:
        weights = weights[:, 0]
    assert weights.dim() == 3, f"weights must be (B, H, W) or (B, 1, H, W), got {tuple(weights.shape)}"
    return weights


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
    labels = _label_map(labels)
    assert feats.dim() == 4 and labels.shape[0] == feats.shape[0], (feats.shape, labels.shape)
    if weights is not None:
        weights = _weight_map(weights)
        assert weights.shape == labels.shape, (weights.shape, labels.shape)
    if feat_size is not None:
        feat_size = tuple(int(s) for s in feat_size)
        if tuple(feats.shape[-2:]) != feat_size:
            feats = F.interpolate(feats, size=feat_size, mode="bilinear", align_corners=False)
    size = feats.shape[-2:]
    labels = _nearest(labels.long(), size)
    if weights is not None:
        weights = _nearest(weights.float(), size)
    return feats, labels, weights


def _pixel_rows(feats: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B * h * w, C), pixel order (b, y, x)."""
    return feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])


# ----------------------------------------------------------------------------------------------
# Contrastive terms
# ----------------------------------------------------------------------------------------------

# The arguments objective="released" fixes: (name, the default it must keep, what the released
# code does instead). `cluda.config.validate` refuses a config that changes one.
_RELEASED_FIXED = (
    ("temperature", 1.0, "tau = 1"),
    ("pairs", "stuff+thing", "all pairs"),
    ("weighting", "anchor", "w_i * w_j on positive pairs"),
    ("feat_size", None, "features resized to 65 x 65"),
    ("thing_classes", tuple(THING_CLASSES), "a stuff / thing mask without effect"),
    ("ignore_index", IGNORE_INDEX, "255 as an ordinary class"),
    ("weighted", True, "its delta-weighted multi-resolution loss only"),
)


def _assert_released(**given) -> None:
    """Every argument the released objective fixes is at its default."""
    for name, default, what in _RELEASED_FIXED:
        if name in given:
            value = tuple(given[name]) if name == "thing_classes" else given[name]
            assert value == default, (f"objective='released' fixes {name} ({what}): leave it at its "
                                      f"default {default!r}, got {given[name]!r}")


def _infonce_sum(feats: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor], *,
                 exclusive: Optional[torch.Tensor], temperature: float, pairs: str, weighting: str,
                 thing_classes: Sequence[int], ignore_index: int, impl: str,
                 variant: Optional[str] = None) -> torch.Tensor:
    """sum_i w_i L_i / A over flat pixels: feats (N, C), labels (N,), weights (N,) or None."""
    assert pairs in PAIR_POLICIES and weighting in WEIGHTINGS, (pairs, weighting)
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
            ignore_index: those must keep their defaults.

    Options are checked where they enter, by `cluda.config.validate`; here they are asserted.

    Returns:
        0-dim float32 loss, differentiable w.r.t. feats (and weights if they require grad).
    """
    assert objective in OBJECTIVES, objective
    if objective == "released":
        _assert_released(temperature=temperature, pairs=pairs, weighting=weighting,
                         feat_size=feat_size, thing_classes=thing_classes, ignore_index=ignore_index)
        from cluda import losses_released  # it reads this module's helpers and grid size

        return losses_released.contrastive_loss(feats, labels, weights, impl=impl, variant=variant)
    feats, labels, weights = to_feature_grid(feats, labels, weights, feat_size=feat_size)
    return _infonce_sum(_pixel_rows(feats), labels.reshape(-1),
                        None if weights is None else weights.reshape(-1), exclusive=None,
                        temperature=temperature, pairs=pairs, weighting=weighting,
                        thing_classes=thing_classes, ignore_index=ignore_index, impl=impl,
                        variant=variant)


def _box_list(boxes: Boxes, batch: int, h: int, w: int) -> List[Box]:
    """One (y1, y2, x1, x2) box per image, inside the (h, w) LR grid."""
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.tolist()
    boxes = list(boxes)
    if len(boxes) == 4 and all(isinstance(v, (int, float)) for v in boxes):
        boxes = [tuple(boxes)] * batch  # one box for the whole batch
    assert len(boxes) == batch, f"need one box for the batch or one per image ({batch}), got {boxes}"
    out = [tuple(int(v) for v in box) for box in boxes]
    assert all(0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w for y1, y2, x1, x2 in out), \
        f"boxes {out} (y1, y2, x1, x2) must lie in the {h} x {w} LR feature grid"
    return out


def box_mask(boxes: Boxes, *, batch: int, size: Sequence[int], device=None) -> torch.Tensor:
    """(B, 1, h, w) bool mask, True inside each image's (y1, y2, x1, x2) box.

    Args:
        boxes: one box for all images, a sequence of B boxes or a (B, 4) integer tensor.
        batch: B.
        size: (h, w) of the LR feature grid.
        device: device of the mask.
    """
    h, w = size
    mask = torch.zeros(batch, 1, h, w, dtype=torch.bool, device=device)
    for b, (y1, y2, x1, x2) in enumerate(_box_list(boxes, batch, h, w)):
        mask[b, 0, y1:y2, x1:x2] = True
    return mask


def resample_box(x: torch.Tensor, boxes: Boxes, *, size: Sequence[int]) -> torch.Tensor:
    """Bilinearly resamples the box region of an LR map onto the HR grid that covers it.

    Each image's box is cropped and resized to `size` with `F.interpolate(..., mode="bilinear",
    align_corners=False)`: HR pixel (y, x) reads the crop at (y + 0.5) * (y2 - y1) / hh - 0.5, clamped to
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
    for i, (y1, y2, x1, x2) in enumerate(_box_list(boxes, b, h, w)):
        crop = x[i:i + 1, :, y1:y2, x1:x2]
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
        boxes: each image's detail crop as (y1, y2, x1, x2) in LR-feature cells (HRDA's
            `HRDAOutput.lr_box`): one box for the batch, a sequence of B boxes or a (B, 4) integer
            tensor.
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
            grid), and fixes weighted and the options `contrastive_loss` lists (they must keep
            their defaults).

    Returns:
        0-dim float32 loss, differentiable w.r.t. lr_feats, hr_feats and delta.
    """
    assert objective in OBJECTIVES, objective
    if objective == "released":
        _assert_released(temperature=temperature, pairs=pairs, weighting=weighting,
                         thing_classes=thing_classes, ignore_index=ignore_index, weighted=weighted)
        assert hr_feats is not None and boxes is not None and delta is not None, \
            "objective='released' multi-resolution CL needs hr_feats, boxes and delta"
        from cluda import losses_released

        return losses_released.multires_loss(lr_feats, lr_labels, hr_feats, boxes=boxes, delta=delta,
                                             weights=lr_weights, impl=impl, variant=variant)
    common = dict(temperature=temperature, pairs=pairs, weighting=weighting,
                  thing_classes=thing_classes, ignore_index=ignore_index, impl=impl, variant=variant)
    if hr_feats is None:
        return contrastive_loss(lr_feats, lr_labels, lr_weights, **common)
    assert hr_labels is not None and boxes is not None, "hr_feats needs hr_labels and boxes"
    assert (lr_weights is None) == (hr_weights is None), "both lr_weights and hr_weights, or neither"
    lr_feats, lr_labels, lr_weights = to_feature_grid(lr_feats, lr_labels, lr_weights)
    hr_feats, hr_labels, hr_weights = to_feature_grid(hr_feats, hr_labels, hr_weights)
    (b, c, h, w), (hh, ww) = lr_feats.shape, hr_feats.shape[-2:]
    assert hr_feats.shape[:2] == (b, c), (hr_feats.shape, lr_feats.shape)
    if weighted:
        assert delta is not None and tuple(delta.shape) == (b, 1, h, w), \
            f"weighted multi-resolution CL needs delta (B, 1, h_lr, w_lr) = {(b, 1, h, w)}"
        inside = box_mask(boxes, batch=b, size=(h, w), device=lr_feats.device)  # (B, 1, h, w)
        delta = delta.float()
        lr_w = torch.where(inside, delta, torch.ones_like(delta))[:, 0]          # (B, h, w)
        hr_w = 1 - resample_box(delta, boxes, size=(hh, ww))[:, 0]              # (B, hh, ww)
    else:
        _box_list(boxes, b, h, w)  # asserts that the boxes fit
        lr_w = torch.ones(b, h, w, device=lr_feats.device)
        hr_w = torch.ones(b, hh, ww, device=lr_feats.device)
    if lr_weights is not None:
        lr_w = lr_w * lr_weights
        hr_w = hr_w * hr_weights
    feats = torch.cat([_pixel_rows(lr_feats), _pixel_rows(hr_feats).to(lr_feats.dtype)])  # (N_lr + N_hr, C)
    labels = torch.cat([lr_labels.reshape(-1), hr_labels.reshape(-1)])
    weights = torch.cat([lr_w.reshape(-1), hr_w.reshape(-1)])
    exclusive = torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device)
    exclusive[lr_labels.numel():] = True
    return _infonce_sum(feats, labels, weights, exclusive=exclusive, temperature=temperature,
                        pairs=pairs, weighting=weighting, thing_classes=thing_classes,
                        ignore_index=ignore_index, impl=impl, variant=variant)


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

    The options come checked from the config (`cluda.config.validate`); the functions assert them.
    """

    def __init__(self, *, temperature: float = 1.0, pairs: str = "stuff+thing",
                 weighting: str = "anchor", feat_size: Optional[Sequence[int]] = None,
                 thing_classes: Sequence[int] = THING_CLASSES, ignore_index: int = IGNORE_INDEX,
                 impl: str = "auto", variant: Optional[str] = None, objective: str = "paper"):
        super().__init__()
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
    labels = _label_map(labels)
    assert logits.dim() == 4 and labels.shape[0] == logits.shape[0], (logits.shape, labels.shape)
    if tuple(logits.shape[-2:]) != tuple(labels.shape[-2:]):
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    ce = F.cross_entropy(logits.float(), labels.long(), ignore_index=ignore_index, reduction="none")
    if weights is not None:
        weights = _weight_map(weights)
        assert weights.shape == labels.shape, (weights.shape, labels.shape)
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
        labels: (B, H, W) or (B, 1, H, W) integer labels in [0, num_classes) or ignore_index
            (other values are never a cell's majority class: such a cell becomes ignore_index).
        size: (h, w) of the feature grid.
        min_ratio: the fraction of the block the majority value must cover (0.75 in DAFormer).
        num_classes: number of classes.
        ignore_index: label value of ignored pixels.

    Returns:
        (B, h, w) int64 labels.
    """
    labels = _label_map(labels).long()
    bsz, big_h, big_w = labels.shape
    h, w = (int(s) for s in size)
    assert 1 <= h <= big_h and 1 <= w <= big_w, f"cannot downscale {big_h} x {big_w} to {h} x {w}"
    sh, sw = big_h // h, big_w // w
    assert big_h // sh == h and big_w // sw == w, f"no integer block gives {h} x {w} from {big_h} x {big_w}"
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
    assert imnet_feats.shape == feats.shape, (imnet_feats.shape, feats.shape)
    cell_labels = downscale_label_ratio(labels, size=feats.shape[-2:], min_ratio=min_ratio,
                                        num_classes=num_classes, ignore_index=ignore_index)
    things = torch.tensor(list(thing_classes), dtype=cell_labels.dtype, device=cell_labels.device)
    mask = torch.isin(cell_labels, things)  # (B, h, w)
    dist = torch.linalg.vector_norm(feats.float() - imnet_feats.detach().float(), dim=1)  # (B, h, w)
    # Index the thing cells instead of multiplying by the mask: the norm's gradient at a zero
    # distance elsewhere never enters, and an empty selection sums to a graph-connected 0.
    selected = dist[mask]
    return lam * selected.sum() / mask.sum().clamp_min(1)

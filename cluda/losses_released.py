"""The contrastive objective the released CLUDA code computes (`cl.objective: released`), which
is not the paper's Eq. 2-7 (`cluda.losses`): the released code (github.com/user0407/CLUDA, its
`contrastive_loss` and `multi_resolution_cl`), replayed with `kernels.pixel_infonce` so that the
two can be compared on one training loop.

On the fused features resized to 65 x 65 (bilinear, align_corners=True; labels nearest; pixel
weights bilinear), with tau = 1, w_i the mixed pixel weight (1 for the source term) and, for
every row r of its N = B * 65 * 65 rows:

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

`cluda.losses.contrastive_loss` / `multires_contrastive_loss` with `objective="released"` call
these; the grid is `cluda.losses.RELEASED_FEAT_SIZE` (65 x 65).
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

import kernels
from cluda import losses

__all__ = ["contrastive_loss", "multires_loss"]


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


def contrastive_loss(feats: torch.Tensor, labels: torch.Tensor,
                               weights: Optional[torch.Tensor], *, impl: str,
                               variant: Optional[str]) -> torch.Tensor:
    """The released single-resolution loss (module docstring) as one op call: the features in the
    released row order (pixel-major), labels and weights in theirs (image-major), u = w."""
    labels = losses._label_map(labels)
    assert feats.dim() == 4 and labels.shape[0] == feats.shape[0], (feats.shape, labels.shape)
    size = losses.RELEASED_FEAT_SIZE
    feats = _released_grid(feats, size)                          # (B, C, 65, 65)
    rows = _pixel_major(feats)                                   # (N, C)
    row_labels = losses._nearest(labels.long(), size).reshape(-1)       # (N,) image-major
    w = None
    if weights is not None:
        weights = losses._weight_map(weights)
        assert weights.shape == labels.shape, (weights.shape, labels.shape)
        dtype = torch.float64 if feats.dtype == torch.float64 else torch.float32
        w = _released_grid(weights[:, None].to(dtype), size).reshape(-1)  # (N,) image-major
    per_row = kernels.pixel_infonce(rows, row_labels, temperature=1.0, pos_weight=w,
                                    ignore_index=_NO_IGNORE, impl=impl, variant=variant)
    if w is not None:
        per_row = w.to(per_row.dtype) * per_row
    return per_row.sum() / row_labels.numel()


def multires_loss(lr_feats: torch.Tensor, lr_labels: torch.Tensor, hr_feats: torch.Tensor,
                            *, boxes: losses.Boxes, delta: torch.Tensor, weights: Optional[torch.Tensor],
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
    lr_labels = losses._label_map(lr_labels)
    b, c, h, w = lr_feats.shape
    hh, ww = hr_feats.shape[-2:]
    assert hr_feats.shape[:2] == (b, c) and lr_labels.shape[0] == b, (hr_feats.shape, lr_labels.shape)
    assert tuple(delta.shape) == (b, 1, h, w), f"delta must be (B, 1, h_lr, w_lr) = {(b, 1, h, w)}"
    box_list = losses._box_list(boxes, b, h, w)
    scale = hh // (box_list[0][1] - box_list[0][0])
    # HRDA's HR features cover the box at a whole multiple of the LR grid's resolution (2).
    assert all((y2 - y1) * scale == hh and (x2 - x1) * scale == ww for y1, y2, x1, x2 in box_list), \
        f"the {hh} x {ww} HR features must be an integer multiple of every detail box {box_list}"
    if weights is not None:
        weights = losses._weight_map(weights)
        assert weights.shape == lr_labels.shape, (weights.shape, lr_labels.shape)
    dtype = torch.float64 if lr_feats.dtype == torch.float64 else torch.float32  # of the weights
    dev = lr_feats.device
    size = losses.RELEASED_FEAT_SIZE
    frame = (h * scale, w * scale)  # the HR frame on the stride-4 grid

    # The released code's maps: LR features upsampled to the HR frame, HR features placed into a
    # zero map of it, delta upsampled as HRDA's head resizes it; then all of them to 65 x 65.
    lr_frame = F.interpolate(lr_feats, size=frame, mode="bilinear", align_corners=True)
    hr_frame = torch.cat([F.pad(hr_feats[i:i + 1], (scale * x1, frame[1] - scale * x2,
                                                     scale * y1, frame[0] - scale * y2))
                          for i, (y1, y2, x1, x2) in enumerate(box_list)])
    att = F.interpolate(delta.to(dtype), size=frame, mode="bilinear", align_corners=False)
    lr_rows = _pixel_major(_released_grid(lr_frame, size))                      # (N, C)
    hr_rows = _pixel_major(_released_grid(hr_frame, size)).to(lr_rows.dtype)  # (N, C)
    a = _released_grid(att, size).reshape(-1)                                   # (N,) image-major
    labels = losses._nearest(lr_labels.long(), size)                                   # (B, 65, 65)
    in_box = losses._nearest(losses.box_mask(box_list, batch=b, size=(h, w), device=dev)[:, 0].long(), size)
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

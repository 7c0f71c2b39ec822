"""O(N) preparation shared by the tiled torch path and the Triton kernels.

DESIGN.md, "Kernel plan", step 1: drop the invalid pixels and stable-sort the rest by (group, label).
After the sort every group and every (group, label) class is a contiguous run of rows, so

- the partners of row r (its eligible pairs) all lie in the column range [group_start, group_end),
- its positives lie in the class range [class_start, class_end) (minus r itself and, for an
  exclusive r, the other exclusive pixels of the class),
- its negatives are the rest of its group range.

A block of consecutive rows therefore only ever visits columns inside
[group_start of its first row, group_end of its last row): pairs across groups (stuff-thing) are
never touched, and the positives sit in diagonal class blocks.
"""
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class SortedPixels:
    """The valid pixels of one loss call, sorted by (group, label), with per-row column ranges.

    Every tensor has one entry per sorted row (n = number of valid pixels) and lives on the
    device of the labels. Ranges are half-open and index sorted rows.

    Attributes:
        index: (n,) int64, original position (in 0..N-1) of each sorted row.
        group_start: (n,) int32, first row of the row's group.
        group_end: (n,) int32, one past the last row of the row's group.
        class_start: (n,) int32, first row of the row's (group, label) class.
        class_end: (n,) int32, one past the last row of that class.
        num_pos: (n,) int32, |P_r|, the number of positives of row r.
        exclusive: (n,) bool, the row's exclusive flag, or None when no pixel is exclusive.
    """

    index: torch.Tensor
    group_start: torch.Tensor
    group_end: torch.Tensor
    class_start: torch.Tensor
    class_end: torch.Tensor
    num_pos: torch.Tensor
    exclusive: Optional[torch.Tensor]

    @property
    def num_rows(self) -> int:
        return self.index.numel()


def _segment_bounds(is_start: torch.Tensor):
    """Start and end (half-open) of the run each position belongs to, given run-start flags (n,)."""
    n = is_start.numel()
    positions = torch.arange(n, device=is_start.device)
    starts = positions[is_start]  # (num_runs,)
    ends = torch.cat([starts[1:], starts.new_tensor([n])])
    run_id = torch.cumsum(is_start.long(), 0) - 1  # (n,)
    return starts[run_id].int(), ends[run_id].int()


def sort_pixels(
    labels: torch.Tensor,
    *,
    groups: Optional[torch.Tensor] = None,
    exclusive: Optional[torch.Tensor] = None,
    ignore_index: int = 255,
) -> SortedPixels:
    """Drop invalid pixels, sort the rest by (group, label) and compute each row's ranges and |P|.

    Args:
        labels: (N,) integer class labels; a pixel is valid iff 0 <= label != ignore_index.
        groups: (N,) integer group ids or None (one group); pairs only form inside a group.
        exclusive: (N,) bool or None; two exclusive pixels never form a pair.
        ignore_index: label value that marks an ignored pixel.

    Returns:
        The `SortedPixels` layout. Inputs are assumed already validated (see `pixel_infonce`).
    """
    device = labels.device
    valid = (labels >= 0) & (labels != ignore_index)
    index = torch.nonzero(valid).squeeze(1)  # (n,) int64
    # Two stable sorts give the lexicographic (group, label) order; ties keep pixel order, so the
    # layout (and with it every summation order) is a deterministic function of the inputs.
    label_sorted = labels[index].long()
    order = torch.sort(label_sorted, stable=True).indices
    index, label_sorted = index[order], label_sorted[order]
    n = index.numel()
    new_group = torch.zeros(n, dtype=torch.bool, device=device)
    new_group[:1] = True
    if groups is not None:
        group_sorted = groups[index].long()
        order = torch.sort(group_sorted, stable=True).indices
        index, label_sorted, group_sorted = index[order], label_sorted[order], group_sorted[order]
        new_group[1:] = group_sorted[1:] != group_sorted[:-1]
    new_class = new_group.clone()
    new_class[1:] |= label_sorted[1:] != label_sorted[:-1]

    group_start, group_end = _segment_bounds(new_group)
    class_start, class_end = _segment_bounds(new_class)
    class_size = class_end - class_start
    if exclusive is None or not bool(exclusive[index].any()):
        ex_sorted = None
        num_pos = class_size - 1
    else:
        ex_sorted = exclusive[index]
        # Exclusive pixels per class from a prefix sum: an exclusive anchor pairs only with the
        # non-exclusive pixels of its class, a non-exclusive anchor with everyone else in it.
        prefix = torch.cat([torch.zeros(1, dtype=torch.long, device=device),
                            torch.cumsum(ex_sorted.long(), 0)])
        ex_in_class = (prefix[class_end.long()] - prefix[class_start.long()]).int()
        num_pos = torch.where(ex_sorted, class_size - ex_in_class, class_size - 1)
    return SortedPixels(
        index=index,
        group_start=group_start.contiguous(),
        group_end=group_end.contiguous(),
        class_start=class_start.contiguous(),
        class_end=class_end.contiguous(),
        num_pos=num_pos.int().contiguous(),
        exclusive=ex_sorted.contiguous() if ex_sorted is not None else None,
    )


def negative_pair_scale(grad: torch.Tensor, q_stat: torch.Tensor, neg_sum: torch.Tensor) -> torch.Tensor:
    """b_i = g_i Q_i / Neg'_i, the backward's factor of e_ij for the negative pairs of anchor i.

    With e_ij = exp(s_ij - 1/tau), Neg'_i = sum_{n in N_i} e_in and
    Q_i = 1/|P_i| sum_p u_p Neg'_i / (e_ip + Neg'_i) (bounded by max u), dL_i/ds_ij = b_i e_ij / g_i
    for j in N_i. Since e_ij <= Neg'_i, the product b_i e_ij stays below |g_i| max u even when
    Neg'_i is tiny; b_i alone may not: Neg'_i is floored at FLT_MIN (a row whose negatives all
    underflowed has Q_i = 0 and every e_ij = 0) and |b_i| capped at a quarter of the dtype's
    largest value, so that b_i + b_j and e_ij (b_i + b_j) stay finite at any temperature.

    Args:
        grad: (n,) upstream gradient g of the sorted rows.
        q_stat: (n,) Q of the sorted rows (0 where P_i is empty), same dtype as grad.
        neg_sum: (n,) Neg' of the sorted rows, same dtype.

    Returns:
        (n,) b in grad's dtype.
    """
    info = torch.finfo(grad.dtype)
    b = grad * q_stat / neg_sum.clamp_min(info.tiny)
    return b.clamp(-info.max / 4, info.max / 4)

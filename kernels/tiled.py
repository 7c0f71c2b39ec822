"""Tiled pure-torch pixel InfoNCE (Eq. 2 of the CLUDA paper): memory O(N * block + N * C).

The rows are the valid pixels sorted by (group, label) (`kernels.layout`). A block of rows is
compared with the columns of its groups only; the similarity block is never kept. Forward keeps
per row only Neg'_i and R'_i; backward recomputes each similarity block. With t_ij = s_ij - 1/tau,
e_ij = exp(t_ij) in [exp(-2/tau), 1] and the primed statistics scaled by exp(-1/tau):

    Neg'_i = sum_{n in N_i} e_in
    L_i    = 1/|P_i| sum_{p in P_i} u_p [log(e_ip + Neg'_i) - t_ip]
    R'_i   = 1/|P_i| sum_{p in P_i} u_p / (e_ip + Neg'_i)

Backward, for upstream g, a_i = g_i / |P_i| and b_i = g_i R'_i (both 0 when P_i is empty):

    G_ij = -a_i u_j Neg'_i / (e_ij + Neg'_i)   (j in P_i),   G_ij = b_i e_ij   (j in N_i)
    dv_i = 1/tau sum_j (G_ij + G_ji) v_j                      (S = V V^T is symmetric)
    du_j = sum_{i: j in P_i} a_i [log(e_ij + Neg'_i) - t_ij]  (the positive relation is symmetric)

so a row block needs only its own and its partners' statistics: no N x N buffer, no atomics.
"""
from typing import Iterator, Optional, Tuple

import torch

from kernels.layout import SortedPixels

# Elements of one (rows x columns) block: a handful of float32 / bool temporaries of this size
# are alive at once, about 100 MiB in all.
DEFAULT_BLOCK_ELEMENTS = 1 << 22


def _row_blocks(layout: SortedPixels, block_rows: int) -> Iterator[Tuple[int, int, int, int, int, int]]:
    """Yield (r0, r1, g0, g1, p0, p1): a block of rows, its group column range and class range."""
    n = layout.num_rows
    gs, ge = layout.group_start.tolist(), layout.group_end.tolist()
    cs, ce = layout.class_start.tolist(), layout.class_end.tolist()
    for r0 in range(0, n, block_rows):
        r1 = min(r0 + block_rows, n)
        # Rows are sorted, so the first row has the smallest starts and the last the largest ends.
        yield r0, r1, gs[r0], ge[r1 - 1], cs[r0], ce[r1 - 1]


class _BlockMasks:
    """Pair masks of rows [r0, r1) against columns [c0, c1), from the sorted ranges."""

    def __init__(self, layout: SortedPixels, r0: int, r1: int, c0: int, c1: int):
        device = layout.index.device
        rows = torch.arange(r0, r1, device=device)[:, None]  # (B, 1)
        cols = torch.arange(c0, c1, device=device)[None, :]  # (1, W)
        in_class = (cols >= layout.class_start[r0:r1, None]) & (cols < layout.class_end[r0:r1, None])
        in_group = (cols >= layout.group_start[r0:r1, None]) & (cols < layout.group_end[r0:r1, None])
        both_excl = None
        if layout.exclusive is not None:
            both_excl = layout.exclusive[r0:r1, None] & layout.exclusive[None, c0:c1]
        self.pos = in_class & (cols != rows)  # (B, W)
        self.neg = in_group & ~in_class  # (B, W)
        if both_excl is not None:
            self.pos &= ~both_excl
            self.neg &= ~both_excl


def _shifted_similarity(v: torch.Tensor, r0: int, r1: int, c0: int, c1: int, inv_tau: float):
    """t = (v_i . v_j - 1) / tau and e = exp(t) for rows [r0, r1) x columns [c0, c1): (B, W) each."""
    t = v[r0:r1] @ v[c0:c1].t()
    t.sub_(1.0).mul_(inv_tau)
    return t, torch.exp(t)


class TiledPixelInfoNCE(torch.autograd.Function):
    """Forward / backward over row blocks; saves v, u, Neg' and R' (O(N) floats) for backward."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, u: Optional[torch.Tensor], layout: SortedPixels,
                inv_tau: float, block_rows: int) -> torch.Tensor:
        n = v.shape[0]
        tiny = torch.finfo(v.dtype).tiny
        neg_sum = v.new_zeros(n)
        loss = v.new_zeros(n)
        r_stat = v.new_zeros(n)
        num_pos = layout.num_pos.to(v.dtype)
        for r0, r1, g0, g1, p0, p1 in _row_blocks(layout, block_rows):
            t, e = _shifted_similarity(v, r0, r1, g0, g1, inv_tau)  # (B, W)
            masks = _BlockMasks(layout, r0, r1, g0, g1)
            neg_blk = torch.where(masks.neg, e, 0.0).sum(1)  # (B,)
            neg_sum[r0:r1] = neg_blk
            # Positives live in the class columns [p0, p1) only.
            sub = slice(p0 - g0, p1 - g0)
            t_p, e_p, pos = t[:, sub], e[:, sub], masks.pos[:, sub]
            denom = (e_p + neg_blk[:, None]).clamp_min(tiny)
            w = u[None, p0:p1] if u is not None else 1.0
            loss[r0:r1] = torch.where(pos, w * (torch.log(denom) - t_p), 0.0).sum(1)
            r_stat[r0:r1] = torch.where(pos, w / denom, 0.0).sum(1)
        scale = torch.where(num_pos > 0, 1.0 / num_pos.clamp_min(1.0), 0.0)
        loss.mul_(scale)
        r_stat.mul_(scale)
        ctx.layout, ctx.inv_tau, ctx.block_rows = layout, inv_tau, block_rows
        ctx.save_for_backward(v, u, neg_sum, r_stat)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        v, u, neg_sum, r_stat = ctx.saved_tensors
        layout, inv_tau = ctx.layout, ctx.inv_tau
        tiny = torch.finfo(v.dtype).tiny
        need_du = u is not None and ctx.needs_input_grad[1]
        g = grad_loss.to(v.dtype)
        num_pos = layout.num_pos.to(v.dtype)
        a = torch.where(num_pos > 0, g / num_pos.clamp_min(1.0), 0.0)  # (n,) g_i / |P_i|
        b = g * r_stat  # (n,) g_i R'_i (R' is 0 for rows without positives)
        dv = torch.zeros_like(v)
        du = torch.zeros_like(u) if need_du else None
        ones = v.new_ones(v.shape[0])
        w = u if u is not None else ones
        for r0, r1, g0, g1, p0, p1 in _row_blocks(layout, ctx.block_rows):
            t, e = _shifted_similarity(v, r0, r1, g0, g1, inv_tau)  # (B, W)
            masks = _BlockMasks(layout, r0, r1, g0, g1)
            # Negative pairs: G_ij + G_ji = (b_i + b_j) e_ij.
            h = torch.where(masks.neg, e * (b[r0:r1, None] + b[None, g0:g1]), 0.0)
            sub = slice(p0 - g0, p1 - g0)
            t_p, e_p, pos = t[:, sub], e[:, sub], masks.pos[:, sub]
            n_i, n_j = neg_sum[r0:r1, None], neg_sum[None, p0:p1]
            d_i = (e_p + n_i).clamp_min(tiny)
            d_j = (e_p + n_j).clamp_min(tiny)
            # Positive pairs: e/(e + Neg') - 1 = -Neg'/(e + Neg') for both orientations.
            h_pos = (a[r0:r1, None] * w[None, p0:p1] * n_i / d_i
                     + a[None, p0:p1] * w[r0:r1, None] * n_j / d_j)
            h[:, sub] -= torch.where(pos, h_pos, 0.0)
            dv[r0:r1] = (h @ v[g0:g1]) * inv_tau
            if need_du:
                du[r0:r1] = torch.where(pos, a[None, p0:p1] * (torch.log(d_j) - t_p), 0.0).sum(1)
        return dv, du, None, None, None


def tiled_pixel_infonce(
    v: torch.Tensor,
    layout: SortedPixels,
    *,
    inv_tau: float,
    pos_weight: Optional[torch.Tensor] = None,
    block_rows: Optional[int] = None,
) -> torch.Tensor:
    """Loss of the sorted rows with the tiled torch path.

    Args:
        v: (n, C) unit features of the sorted valid rows (float32 or float64), contiguous.
        layout: the `SortedPixels` these rows come from.
        inv_tau: 1 / temperature.
        pos_weight: (n,) u of the sorted rows in v's dtype, or None.
        block_rows: rows per block; default keeps a block at about `DEFAULT_BLOCK_ELEMENTS`.

    Returns:
        (n,) loss per sorted row in v's dtype, differentiable w.r.t. v and pos_weight.
    """
    n = v.shape[0]
    if block_rows is None:
        widest = int((layout.group_end - layout.group_start).max()) if n else 1
        block_rows = max(16, DEFAULT_BLOCK_ELEMENTS // max(widest, 1))
    if not isinstance(block_rows, int) or block_rows < 1:
        raise ValueError(f"block_rows must be a positive int, got {block_rows!r}")
    return TiledPixelInfoNCE.apply(v, pos_weight, layout, inv_tau, block_rows)

"""Tiled pure-torch pixel InfoNCE (Eq. 2 of the CLUDA paper): memory O(N * block + N * C).

The rows are the valid pixels sorted by (group, label) (`kernels.layout`). A block of rows is
compared with the columns of its groups only; the similarity block is never kept. Forward keeps
per row only Neg'_i and Q_i; backward recomputes each similarity block. With t_ij = s_ij - 1/tau,
e_ij = exp(t_ij) in [exp(-2/tau), 1] and the primed statistics scaled by exp(-1/tau):

    Neg'_i = sum_{n in N_i} e_in
    L_i    = 1/|P_i| sum_{p in P_i} u_p [log(e_ip + Neg'_i) - t_ip]
    Q_i    = 1/|P_i| sum_{p in P_i} u_p Neg'_i / (e_ip + Neg'_i)       (in [0, max u])

Backward, for upstream g, a_i = g_i / |P_i| and b_i = g_i Q_i / Neg'_i (both 0 when P_i is empty):

    G_ij = -a_i u_j Neg'_i / (e_ij + Neg'_i)   (j in P_i),   G_ij = b_i e_ij   (j in N_i)
    dv_i = 1/tau sum_j (G_ij + G_ji) v_j                      (S = V V^T is symmetric)
    du_j = sum_{i: j in P_i} a_i [log(e_ij + Neg'_i) - t_ij]  (the positive relation is symmetric)

so a row block needs only its own and its partners' statistics: no N x N buffer, no atomics.

Small temperatures (`kernels.layout.negative_pair_scale`): DESIGN.md's
R_i = 1/|P_i| sum_p u_p / (e_ip + Neg'_i) can reach exp(2/tau), past float32's range for
tau < 2/88.7, and is inf where a row's denominators underflow to the FLT_MIN clamp, which would
turn b_i e_ij into inf * 0 = NaN. Q_i is bounded at any tau, and b_i = g_i Q_i / Neg'_i only ever
multiplies e_ij <= Neg'_i (e_ij is one of the terms of Neg'_i), so H stays finite.
"""
from typing import Iterator, Optional, Tuple

import torch

from kernels.layout import SortedPixels, negative_pair_scale

# Elements of one (rows x columns) block: a handful of float32 / bool temporaries of this size
# (16 MiB per float32 one) are alive at once.
DEFAULT_BLOCK_ELEMENTS = 1 << 22


def _row_blocks(layout: SortedPixels, block_rows: int) -> Iterator[Tuple[int, int, int, int, int, int]]:
    """Yield (r0, r1, g0, g1, p0, p1): a block of rows inside one group, the group's columns
    [g0, g1) and the class columns [p0, p1) of the block's rows (the only ones with positives)."""
    n = layout.num_rows
    ge = layout.group_end.tolist()
    cs, ce = layout.class_start.tolist(), layout.class_end.tolist()
    g0 = 0
    while g0 < n:
        g1 = ge[g0]
        for r0 in range(g0, g1, block_rows):
            r1 = min(r0 + block_rows, g1)
            # Rows are sorted, so the first row has the smallest class start, the last the largest end.
            yield r0, r1, g0, g1, cs[r0], ce[r1 - 1]
        g0 = g1


class _Block:
    """Similarities and pair masks of rows [r0, r1) against their group's columns [g0, g1).

    Every column of the group is a partner of every row except (a) the rows' own class columns,
    which lie in [p0, p1) and hold the positives and the row itself, and (b) pairs of two exclusive
    pixels. So only the (B, p1 - p0) class window needs a label mask.
    """

    def __init__(self, v, layout: SortedPixels, inv_tau: float, r0, r1, g0, g1, p0, p1):
        device = v.device
        self.t = v[r0:r1] @ v[g0:g1].t()  # (B, W)
        self.t.sub_(1.0).mul_(inv_tau)  # t = s - 1/tau in [-2/tau, 0]
        self.e = torch.exp(self.t)  # (B, W), in [exp(-2/tau), 1]
        self.both_excl = None
        if layout.exclusive is not None:
            self.both_excl = layout.exclusive[r0:r1, None] & layout.exclusive[None, g0:g1]  # (B, W)
        self.win = slice(p0 - g0, p1 - g0)  # the class window inside [g0, g1)
        rows = torch.arange(r0, r1, device=device)[:, None]  # (B, 1)
        cols = torch.arange(p0, p1, device=device)[None, :]  # (1, Wp)
        self.in_class = (cols >= layout.class_start[r0:r1, None]) & (cols < layout.class_end[r0:r1, None])
        self.pos = self.in_class & (cols != rows)  # (B, Wp)
        if self.both_excl is not None:
            self.pos &= ~self.both_excl[:, self.win]


class TiledPixelInfoNCE(torch.autograd.Function):
    """Forward / backward over row blocks; saves v, u, Neg' and Q (O(N) floats) for backward."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, u: Optional[torch.Tensor], layout: SortedPixels,
                inv_tau: float, block_rows: int) -> torch.Tensor:
        n = v.shape[0]
        tiny = torch.finfo(v.dtype).tiny
        neg_sum = v.new_zeros(n)
        loss = v.new_zeros(n)
        q_stat = v.new_zeros(n)
        for r0, r1, g0, g1, p0, p1 in _row_blocks(layout, block_rows):
            blk = _Block(v, layout, inv_tau, r0, r1, g0, g1, p0, p1)
            e_ok = blk.e if blk.both_excl is None else blk.e.masked_fill(blk.both_excl, 0.0)
            win = blk.win
            # Negatives: the group's columns outside the class window, plus the window's columns
            # of other classes.
            neg_blk = (e_ok[:, :win.start].sum(1) + e_ok[:, win.stop:].sum(1)
                       + e_ok[:, win].masked_fill(blk.in_class, 0.0).sum(1))  # (B,)
            neg_sum[r0:r1] = neg_blk
            t_p, e_p = blk.t[:, win], blk.e[:, win]  # (B, Wp)
            denom = (e_p + neg_blk[:, None]).clamp_min(tiny)
            w = u[None, p0:p1] if u is not None else 1.0
            loss[r0:r1] = torch.where(blk.pos, w * (torch.log(denom) - t_p), 0.0).sum(1)
            q_stat[r0:r1] = torch.where(blk.pos, w * (neg_blk[:, None] / denom), 0.0).sum(1)
        num_pos = layout.num_pos.to(v.dtype)
        scale = torch.where(num_pos > 0, 1.0 / num_pos.clamp_min(1.0), 0.0)
        loss.mul_(scale)
        q_stat.mul_(scale)
        ctx.layout, ctx.inv_tau, ctx.block_rows = layout, inv_tau, block_rows
        ctx.save_for_backward(v, u, neg_sum, q_stat)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        v, u, neg_sum, q_stat = ctx.saved_tensors
        layout, inv_tau = ctx.layout, ctx.inv_tau
        tiny = torch.finfo(v.dtype).tiny
        need_du = u is not None and ctx.needs_input_grad[1]
        g = grad_loss.to(v.dtype)
        num_pos = layout.num_pos.to(v.dtype)
        a = torch.where(num_pos > 0, g / num_pos.clamp_min(1.0), 0.0)  # (n,) g_i / |P_i|
        b = negative_pair_scale(g, q_stat, neg_sum)  # (n,) g_i Q_i / Neg'_i, 0 without positives
        dv = torch.zeros_like(v)
        du = torch.zeros_like(u) if need_du else None
        w = u if u is not None else v.new_ones(v.shape[0])
        for r0, r1, g0, g1, p0, p1 in _row_blocks(layout, ctx.block_rows):
            blk = _Block(v, layout, inv_tau, r0, r1, g0, g1, p0, p1)
            win = blk.win
            # Negative pairs: H_ij = G_ij + G_ji = (b_i + b_j) e_ij; set for every column first,
            # then the class window is overwritten and exclusive pairs are cleared.
            h = blk.e * (b[r0:r1, None] + b[None, g0:g1])  # (B, W)
            t_p, e_p = blk.t[:, win], blk.e[:, win]  # (B, Wp)
            n_i, n_j = neg_sum[r0:r1, None], neg_sum[None, p0:p1]
            d_i = (e_p + n_i).clamp_min(tiny)  # e_ij + Neg'_i
            d_j = (e_p + n_j).clamp_min(tiny)  # e_ij + Neg'_j
            # Positive pairs: e/(e + Neg') - 1 = -Neg'/(e + Neg') for both orientations.
            h_pos = -(a[r0:r1, None] * w[None, p0:p1] * n_i / d_i
                      + a[None, p0:p1] * w[r0:r1, None] * n_j / d_j)
            h[:, win] = torch.where(blk.in_class, torch.where(blk.pos, h_pos, 0.0), h[:, win])
            if blk.both_excl is not None:
                h.masked_fill_(blk.both_excl, 0.0)
            dv[r0:r1] = (h @ v[g0:g1]) * inv_tau
            if need_du:
                du[r0:r1] = torch.where(blk.pos, a[None, p0:p1] * (torch.log(d_j) - t_p), 0.0).sum(1)
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

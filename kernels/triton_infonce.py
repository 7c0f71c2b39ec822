"""Fused Triton kernels for the pixel InfoNCE loss (CLUDA Eq. 2): no N x N buffer, no atomics.

The rows are the valid pixels sorted by (group, label) (`kernels.layout`), so a block of rows only
visits the columns of its groups, and its positives sit in the class columns. Two kernels:

- `_infonce_fwd_kernel`, one program per BLOCK_M rows. Pass 1 sums the negatives of its rows over
  the group columns (skipping the columns that lie in the class of every row of the block: they
  hold no negative); pass 2 walks the class columns only and forms L and R from Neg.
- `_infonce_bwd_kernel`, one program per (BLOCK_M rows, BLOCK_D channels of the gradient). It
  recomputes each similarity tile, forms H = G + G^T elementwise from per-row statistics of both
  sides and accumulates dV_I += H_IJ V_J / tau (and du for the positive weights).

Per row only O(1) floats are stored (Neg', R', plus the O(1) ints of the layout); backward saves
v, u, Neg' and R'. Inputs are float16 / bfloat16 / float32, accumulation is float32. The launchers
take the block sizes as parameters (issue 3 tunes them on a GPU). On a CPU this module runs only
under Triton's interpreter (TRITON_INTERPRET=1 set before the import).
"""
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from kernels.layout import SortedPixels

# Triton picks the interpreter when a kernel is defined, i.e. when this module is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _shifted_similarity(v_ptr, rows, cols, row_mask, col_mask, C, inv_tau,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    # t_IJ = (v_I . v_J - 1) / tau for rows I x columns J: a (BLOCK_M, BLOCK_N) float32 tile in
    # [-2/tau, 0] (v is unit length), built from BLOCK_C-wide chunks of the channels.
    # rows / cols are int64 so that row * C cannot overflow.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        c_mask = cc < C
        v_i = tl.load(v_ptr + rows[:, None] * C + cc[None, :],
                      mask=row_mask[:, None] & c_mask[None, :], other=0.0)  # (BLOCK_M, BLOCK_C)
        v_jt = tl.load(v_ptr + cols[None, :] * C + cc[:, None],
                       mask=col_mask[None, :] & c_mask[:, None], other=0.0)  # (BLOCK_C, BLOCK_N)
        acc = tl.dot(v_i, v_jt, acc, input_precision=DOT_PRECISION)
    return (acc - 1.0) * inv_tau


@triton.jit
def _negatives_tile(v_ptr, ex_ptr, rows, row_mask, gs, ge, cs, ce, ex_i, n0, col_end, C, inv_tau,
                    HAS_EXCLUSIVE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_C: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # sum_{j in [n0, n0 + BLOCK_N), j < col_end, j in N_i} e_ij for each row i: (BLOCK_M,).
    cols = n0 + tl.arange(0, BLOCK_N)
    col_mask = cols < col_end
    e = tl.exp(_shifted_similarity(v_ptr, rows, cols.to(tl.int64), row_mask, col_mask, C, inv_tau,
                                   BLOCK_M, BLOCK_N, BLOCK_C, DOT_PRECISION))
    c = cols[None, :]
    # A negative is in the row's group range and outside its class range.
    is_neg = (c >= gs[:, None]) & (c < ge[:, None]) & ((c < cs[:, None]) | (c >= ce[:, None]))
    is_neg = is_neg & row_mask[:, None] & col_mask[None, :]
    if HAS_EXCLUSIVE:
        ex_j = tl.load(ex_ptr + cols, mask=col_mask, other=0) != 0
        is_neg = is_neg & ~(ex_i[:, None] & ex_j[None, :])
    return tl.sum(tl.where(is_neg, e, 0.0), axis=1)


@triton.jit
def _infonce_fwd_kernel(
    v_ptr, u_ptr, gs_ptr, ge_ptr, cs_ptr, ce_ptr, np_ptr, ex_ptr,  # inputs, (n, C) and (n,)
    neg_ptr, loss_ptr, r_ptr,  # outputs, (n,) float32
    n, C, inv_tau,
    HAS_WEIGHT: tl.constexpr, HAS_EXCLUSIVE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # With t_ij = s_ij - 1/tau and e_ij = exp(t_ij) in [exp(-2/tau), 1] (no running max needed),
    # the statistics are those of DESIGN.md scaled by exp(-1/tau), which cancels in L:
    #   Neg'_i = sum_{n in N_i} e_in                                           (pass 1)
    #   L_i    = 1/|P_i| sum_{p in P_i} u_p [log(e_ip + Neg'_i) - t_ip]        (pass 2)
    #   R'_i   = 1/|P_i| sum_{p in P_i} u_p / (e_ip + Neg'_i)                  (pass 2, for backward)
    # and L_i = R'_i = 0 when P_i is empty. The denominators are clamped at FLT_MIN, which only
    # matters when exp(-2/tau) underflows (tau < 2/87).
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n
    rows64 = rows.to(tl.int64)
    gs = tl.load(gs_ptr + rows, mask=row_mask, other=0)
    ge = tl.load(ge_ptr + rows, mask=row_mask, other=0)
    cs = tl.load(cs_ptr + rows, mask=row_mask, other=0)
    ce = tl.load(ce_ptr + rows, mask=row_mask, other=0)
    if HAS_EXCLUSIVE:
        ex_i = tl.load(ex_ptr + rows, mask=row_mask, other=0) != 0
    else:
        ex_i = row_mask  # unused
    # The block's columns: the union of its rows' group ranges (rows are sorted, so it is one
    # interval and never reaches into another group's pixels beyond the block's own groups).
    lo = tl.min(tl.where(row_mask, gs, n), axis=0)
    hi = tl.max(tl.where(row_mask, ge, 0), axis=0)

    # ---- pass 1: Neg'_i. Columns in [skip_lo, skip_hi) belong to the class of every row of the
    # block (a block inside one big class, e.g. road): they hold no negative and are skipped.
    skip_lo = tl.max(tl.where(row_mask, cs, 0), axis=0)
    skip_hi = tl.min(tl.where(row_mask, ce, n), axis=0)
    has_common = skip_lo < skip_hi
    skip_lo = tl.where(has_common, skip_lo, hi)
    skip_hi = tl.where(has_common, skip_hi, hi)
    neg = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(lo, skip_lo, BLOCK_N):
        neg += _negatives_tile(v_ptr, ex_ptr, rows64, row_mask, gs, ge, cs, ce, ex_i, n0, skip_lo,
                               C, inv_tau, HAS_EXCLUSIVE, BLOCK_M, BLOCK_N, BLOCK_C, DOT_PRECISION)
    for n0 in range(skip_hi, hi, BLOCK_N):
        neg += _negatives_tile(v_ptr, ex_ptr, rows64, row_mask, gs, ge, cs, ce, ex_i, n0, hi,
                               C, inv_tau, HAS_EXCLUSIVE, BLOCK_M, BLOCK_N, BLOCK_C, DOT_PRECISION)

    # ---- pass 2: L_i and R'_i over the class columns only (the diagonal class blocks).
    p_lo = tl.min(tl.where(row_mask, cs, n), axis=0)
    p_hi = tl.max(tl.where(row_mask, ce, 0), axis=0)
    loss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    r_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(p_lo, p_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < p_hi
        t = _shifted_similarity(v_ptr, rows64, cols.to(tl.int64), row_mask, col_mask, C, inv_tau,
                                BLOCK_M, BLOCK_N, BLOCK_C, DOT_PRECISION)
        e = tl.exp(t)
        c = cols[None, :]
        is_pos = (c >= cs[:, None]) & (c < ce[:, None]) & (c != rows[:, None])
        is_pos = is_pos & row_mask[:, None] & col_mask[None, :]
        if HAS_EXCLUSIVE:
            ex_j = tl.load(ex_ptr + cols, mask=col_mask, other=0) != 0
            is_pos = is_pos & ~(ex_i[:, None] & ex_j[None, :])
        denom = tl.maximum(e + neg[:, None], 1.1754943508222875e-38)
        if HAS_WEIGHT:
            w = tl.load(u_ptr + cols, mask=col_mask, other=0.0)[None, :]
        else:
            w = 1.0
        loss += tl.sum(tl.where(is_pos, w * (tl.log(denom) - t), 0.0), axis=1)
        r_acc += tl.sum(tl.where(is_pos, w / denom, 0.0), axis=1)

    num_pos = tl.load(np_ptr + rows, mask=row_mask, other=0)
    scale = tl.where(num_pos > 0, 1.0 / tl.maximum(num_pos, 1).to(tl.float32), 0.0)
    tl.store(neg_ptr + rows, neg, mask=row_mask)
    tl.store(loss_ptr + rows, loss * scale, mask=row_mask)
    tl.store(r_ptr + rows, r_acc * scale, mask=row_mask)


@triton.jit
def _infonce_bwd_kernel(
    v_ptr, u_ptr, a_ptr, b_ptr, neg_ptr, gs_ptr, ge_ptr, cs_ptr, ce_ptr, ex_ptr,  # inputs
    dv_ptr, du_ptr,  # outputs: (n, C) in v's dtype, (n,) float32
    n, C, inv_tau,
    HAS_WEIGHT: tl.constexpr, HAS_EXCLUSIVE: tl.constexpr, NEED_DU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PRODUCT_PRECISION: tl.constexpr,
):
    # Upstream gradient g enters through a_i = g_i / |P_i| and b_i = g_i R'_i (0 without positives).
    #   G_ij = -a_i u_j Neg'_i / (e_ij + Neg'_i)   for j in P_i   (= dL_i/ds_ij * g_i)
    #   G_ij =  b_i e_ij                           for j in N_i
    #   H_ij = G_ij + G_ji, built from the statistics of row i and column j (the pair relation is
    #          symmetric), dv_i = 1/tau sum_j H_ij v_j   (S = V V^T is symmetric)
    #   du_i = sum_{j: i in P_j} a_j [log(e_ij + Neg'_j) - t_ij]       (u_i as partner of anchor j)
    # Each program owns rows I and the channels [pid_d * BLOCK_D, +BLOCK_D) of dv_I: it recomputes
    # the full-C similarity per tile (one GEMM) and accumulates H_IJ V_J (a second GEMM). Its writes
    # are disjoint from every other program's: no atomics, the result is deterministic.
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n
    rows64 = rows.to(tl.int64)
    gs = tl.load(gs_ptr + rows, mask=row_mask, other=0)
    ge = tl.load(ge_ptr + rows, mask=row_mask, other=0)
    cs = tl.load(cs_ptr + rows, mask=row_mask, other=0)
    ce = tl.load(ce_ptr + rows, mask=row_mask, other=0)
    a_i = tl.load(a_ptr + rows, mask=row_mask, other=0.0)
    b_i = tl.load(b_ptr + rows, mask=row_mask, other=0.0)
    neg_i = tl.load(neg_ptr + rows, mask=row_mask, other=0.0)
    if HAS_WEIGHT:
        u_i = tl.load(u_ptr + rows, mask=row_mask, other=0.0)
    else:
        u_i = tl.full((BLOCK_M,), 1.0, tl.float32)
    if HAS_EXCLUSIVE:
        ex_i = tl.load(ex_ptr + rows, mask=row_mask, other=0) != 0
    else:
        ex_i = row_mask  # unused
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = dd < C
    lo = tl.min(tl.where(row_mask, gs, n), axis=0)
    hi = tl.max(tl.where(row_mask, ge, 0), axis=0)

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    du = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < hi
        cols64 = cols.to(tl.int64)
        t = _shifted_similarity(v_ptr, rows64, cols64, row_mask, col_mask, C, inv_tau,
                                BLOCK_M, BLOCK_N, BLOCK_C, DOT_PRECISION)
        e = tl.exp(t)
        c = cols[None, :]
        in_class = (c >= cs[:, None]) & (c < ce[:, None])
        in_group = (c >= gs[:, None]) & (c < ge[:, None])
        pair_ok = row_mask[:, None] & col_mask[None, :]
        if HAS_EXCLUSIVE:
            ex_j = tl.load(ex_ptr + cols, mask=col_mask, other=0) != 0
            pair_ok = pair_ok & ~(ex_i[:, None] & ex_j[None, :])
        is_pos = in_class & (c != rows[:, None]) & pair_ok
        is_neg = in_group & ~in_class & pair_ok
        a_j = tl.load(a_ptr + cols, mask=col_mask, other=0.0)
        b_j = tl.load(b_ptr + cols, mask=col_mask, other=0.0)
        neg_j = tl.load(neg_ptr + cols, mask=col_mask, other=0.0)
        if HAS_WEIGHT:
            u_j = tl.load(u_ptr + cols, mask=col_mask, other=0.0)
        else:
            u_j = tl.full((BLOCK_N,), 1.0, tl.float32)
        d_i = tl.maximum(e + neg_i[:, None], 1.1754943508222875e-38)  # e_ij + Neg'_i
        d_j = tl.maximum(e + neg_j[None, :], 1.1754943508222875e-38)  # e_ij + Neg'_j
        h_pos = -(a_i[:, None] * u_j[None, :] * neg_i[:, None] / d_i
                  + a_j[None, :] * u_i[:, None] * neg_j[None, :] / d_j)
        h_neg = e * (b_i[:, None] + b_j[None, :])
        h = tl.where(is_pos, h_pos, tl.where(is_neg, h_neg, 0.0))  # (BLOCK_M, BLOCK_N) float32
        v_j = tl.load(v_ptr + cols64[:, None] * C + dd[None, :],
                      mask=col_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        # H stays float32 (its entries can be far below float16's range when g is small).
        acc = tl.dot(h, v_j.to(tl.float32), acc, input_precision=PRODUCT_PRECISION)
        if NEED_DU:
            du += tl.sum(tl.where(is_pos, a_j[None, :] * (tl.log(d_j) - t), 0.0), axis=1)

    dv = acc * inv_tau
    tl.store(dv_ptr + rows64[:, None] * C + dd[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=row_mask[:, None] & d_mask[None, :])
    if NEED_DU:
        # Every channel program computes the same du; the first one writes it.
        tl.store(du_ptr + rows, du, mask=row_mask & (pid_d == 0))


@dataclass(frozen=True)
class TritonConfig:
    """Launch parameters of the kernels (tuned in issue 3).

    The defaults compile for sm_90 without register spills for float16 / bfloat16 (ptxas -v):
    64 x 32 tiles over 8 warps; 64 x 64 tiles spill in backward.

    Args:
        block_m: rows per program (power of two >= 16).
        block_n: columns per tile (power of two >= 16).
        block_c: channels per chunk of the similarity GEMM (power of two >= 16).
        block_d: gradient channels per backward program (power of two >= 16); C > block_d means
            several programs per row block, each recomputing the similarities.
        num_warps: warps per program.
        dot_precision: tl.dot input precision of the similarity GEMM for float32 inputs ("ieee",
            "tf32x3", "tf32"); ignored for float16 / bfloat16 inputs.
        product_precision: precision of the float32 H @ V GEMM in backward; None means "ieee" for
            float32 inputs and "tf32" (10-bit mantissa, float32 range) for float16 / bfloat16.
    """

    block_m: int = 64
    block_n: int = 32
    block_c: Optional[int] = None
    block_d: Optional[int] = None
    num_warps: int = 8
    dot_precision: str = "ieee"
    product_precision: Optional[str] = None

    def resolved(self, num_channels: int, dtype: torch.dtype) -> "TritonConfig":
        """Fill the defaults that depend on C and the dtype, and check every value."""
        c_pow2 = max(16, triton.next_power_of_2(num_channels))
        cfg = TritonConfig(
            block_m=self.block_m,
            block_n=self.block_n,
            block_c=self.block_c if self.block_c is not None else min(c_pow2, 64),
            block_d=self.block_d if self.block_d is not None else min(c_pow2, 128),
            num_warps=self.num_warps,
            dot_precision=self.dot_precision,
            product_precision=(self.product_precision if self.product_precision is not None
                               else ("ieee" if dtype == torch.float32 else "tf32")),
        )
        for name in ("block_m", "block_n", "block_c", "block_d"):
            value = getattr(cfg, name)
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value!r}")
        for name in ("dot_precision", "product_precision"):
            if getattr(cfg, name) not in ("ieee", "tf32", "tf32x3"):
                raise ValueError(f"{name} must be 'ieee', 'tf32' or 'tf32x3', got {getattr(cfg, name)!r}")
        return cfg


class TritonPixelInfoNCE(torch.autograd.Function):
    """Fused forward / backward. Saves for backward v, u and the per-row Neg' and R' (float32)."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, u: Optional[torch.Tensor], layout: SortedPixels,
                inv_tau: float, cfg: TritonConfig) -> torch.Tensor:
        n, num_channels = v.shape
        neg = torch.zeros(n, dtype=torch.float32, device=v.device)
        loss = torch.zeros_like(neg)
        r_stat = torch.zeros_like(neg)
        ex = layout.exclusive.to(torch.int8) if layout.exclusive is not None else None
        if n > 0:
            _infonce_fwd_kernel[(triton.cdiv(n, cfg.block_m),)](
                v, u if u is not None else neg,
                layout.group_start, layout.group_end, layout.class_start, layout.class_end,
                layout.num_pos, ex if ex is not None else layout.num_pos,
                neg, loss, r_stat,
                n, num_channels, inv_tau,
                HAS_WEIGHT=u is not None, HAS_EXCLUSIVE=ex is not None,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c,
                DOT_PRECISION=cfg.dot_precision, num_warps=cfg.num_warps,
            )
        ctx.layout, ctx.ex, ctx.inv_tau, ctx.cfg = layout, ex, inv_tau, cfg
        ctx.save_for_backward(v, u, neg, r_stat)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        v, u, neg, r_stat = ctx.saved_tensors
        layout, ex, cfg = ctx.layout, ctx.ex, ctx.cfg
        n, num_channels = v.shape
        need_du = u is not None and ctx.needs_input_grad[1]
        g = grad_loss.float().contiguous()  # an expanded gradient (from .sum()) has stride 0
        num_pos = layout.num_pos.float()
        a = torch.where(num_pos > 0, g / num_pos.clamp_min(1.0), 0.0)  # (n,) g_i / |P_i|
        b = g * r_stat  # (n,) g_i R'_i
        dv = torch.zeros_like(v)
        du = torch.zeros_like(u) if need_du else None
        if n > 0:
            grid = (triton.cdiv(n, cfg.block_m), triton.cdiv(num_channels, cfg.block_d))
            _infonce_bwd_kernel[grid](
                v, u if u is not None else neg, a, b, neg,
                layout.group_start, layout.group_end, layout.class_start, layout.class_end,
                ex if ex is not None else layout.num_pos,
                dv, du if du is not None else neg,
                n, num_channels, ctx.inv_tau,
                HAS_WEIGHT=u is not None, HAS_EXCLUSIVE=ex is not None, NEED_DU=need_du,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c,
                BLOCK_D=cfg.block_d, DOT_PRECISION=cfg.dot_precision,
                PRODUCT_PRECISION=cfg.product_precision, num_warps=cfg.num_warps,
            )
        return dv, du, None, None, None


def triton_pixel_infonce(
    v: torch.Tensor,
    layout: SortedPixels,
    *,
    inv_tau: float,
    pos_weight: Optional[torch.Tensor] = None,
    config: Optional[TritonConfig] = None,
) -> torch.Tensor:
    """Loss of the sorted rows with the fused Triton kernels.

    Args:
        v: (n, C) unit features of the sorted valid rows, float16 / bfloat16 / float32, on the
            layout's device.
        layout: the `SortedPixels` these rows come from.
        inv_tau: 1 / temperature.
        pos_weight: (n,) u of the sorted rows, or None (ones). Cast to float32.
        config: block sizes and precisions, `TritonConfig()` by default.

    Returns:
        (n,) float32 loss per sorted row, differentiable w.r.t. v and pos_weight.
    """
    if v.dim() != 2 or v.shape[0] != layout.num_rows:
        raise ValueError(f"v must have shape ({layout.num_rows}, C), got {tuple(v.shape)}")
    if v.dtype not in _DTYPES:
        raise TypeError(f"v must be float16, bfloat16 or float32, got {v.dtype}")
    if v.device != layout.index.device:
        raise ValueError(f"v is on {v.device} but the layout is on {layout.index.device}")
    if not v.is_cuda and not INTERPRETED:
        raise ValueError("the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 on a CPU")
    if not v.is_cuda and v.dtype == torch.bfloat16:
        # numpy has no bfloat16: the interpreter would return garbage rather than fail.
        raise TypeError("bfloat16 needs a CUDA device: Triton's CPU interpreter does not support it")
    cfg = (config or TritonConfig()).resolved(v.shape[1], v.dtype)
    u = pos_weight.float().contiguous() if pos_weight is not None else None
    return TritonPixelInfoNCE.apply(v.contiguous(), u, layout, float(inv_tau), cfg)

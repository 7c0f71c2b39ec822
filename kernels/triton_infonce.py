"""Fused Triton kernels for the pixel InfoNCE loss (CLUDA Eq. 2): no N x N buffer, no atomics.

The rows are the valid pixels sorted by (group, label) (`kernels.layout`), so a block of rows only
visits the columns of its groups, and its positives sit in the class columns. The kernels take the
raw features f in their own dtype and fuse the L2 normalisation of DESIGN.md
(v = f / max(||f||, 1e-12)): the host keeps only the (n,) float32 inverse norms rinv, and

    c_ij = (f_i . f_j) rinv_i rinv_j            (cosine, accumulated in float32)
    t_ij = (c_ij - 1) / tau = s_ij - 1/tau,     e_ij = exp(t_ij) in [exp(-2/tau), 1]

Two pairs of kernels. The first:

- `_infonce_fwd_kernel`, one program per BLOCK_M rows. Pass 1 sums the negatives of its rows over
  the group columns (skipping the columns that lie in the class of every row of the block: they
  hold no negative); pass 2 walks the class columns only and forms L and R from Neg.
- `_infonce_bwd_kernel`, one program per (BLOCK_M rows, BLOCK_D channels of the gradient). It
  recomputes each similarity tile, forms H = G + G^T elementwise from per-row statistics of both
  sides, accumulates dV_I += H_IJ V_J / tau and, in the epilogue, applies the normalisation's
  Jacobian, df_i = rinv_i (dv_i - v_i (v_i . dv_i)), with v_i . dv_i = sum_j H_ij c_ij / tau taken
  from the similarity tiles it already has (so a program that owns only BLOCK_D channels still
  knows it). It writes df in the input dtype: no float32 (n, C) tensor exists at any point.

The second, `_split_fwd_kernel` and `_split_bwd_kernel` (see "split-loop kernels" below), compute
the same statistics and gradient with separate loop bodies for negative-only, class and edge
tiles, rows on chip in both passes and each column tile loaded once for both backward GEMMs.

Launch parameters (`TritonConfig`, presets in `VARIANTS`, compared on a GPU by
`bench/gpu_check.sh --kernel`): tile sizes, channel chunk sizes, gradient channels per backward
program (up to all C: the similarity is then computed once per tile in backward),
software-pipelining depth, `resident_rows` (forward: the row block's features are loaded once per
program and stay on chip across the column loop), the precision of the H @ V GEMM (TF32, or
bfloat16 operands), and `split_forward` / `split_backward` (run that pass with a split-loop
kernel, `SplitLaunch`). `python -m kernels.compile_report` compiles any preset for any GPU on a
CPU and reports what it costs.

On-chip limits: the presets were tuned on an H200 (sm_90, 227 KiB of shared memory per program).
A launch that needs more shared memory or threads than the device has (Triton's `OutOfResources`,
raised before anything runs) is retried once with the next smaller configuration
(`_smaller_config`: a split-loop pass without the split kernel, then the forward without resident
rows, the backward with 128 gradient channels per program), with a warning, and the choice is
remembered per device. The default forward's resident rows need 128.5 KiB on sm_80 to sm_89
(`python -m kernels.compile_report --arch 86`): an A100's 163 KiB holds them, the 99 KiB of
sm_86 / sm_89 / sm_120 (RTX 30 / 40 / 50, A6000, L40) do not.

Memory: the op holds the gathered features f (input dtype, saved for backward), their gradient
(input dtype) and O(n) float32 statistics (rinv, proj, Neg', Q, a, b); backward saves f, u,
rinv, proj, Neg' and Q. Inputs are float16 / bfloat16 / float32, accumulation is float32. On a
CPU this module runs only under Triton's interpreter (TRITON_INTERPRET=1 set before the import),
which has no bfloat16.
"""
import os
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from kernels.layout import SortedPixels, negative_pair_scale

# Triton picks the interpreter when a kernel is defined, i.e. when this module is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# v = f / max(||f||, 1e-12), as in the torch paths: rows at or below the clamp are scaled by 1e12
# and get no projection in backward (the clamp's derivative is zero there).
NORM_EPS = 1e-12
# Elements per chunk of the host-side norm computation: float32 temporaries of at most 16 MiB.
_NORM_CHUNK_ELEMENTS = 1 << 22
# `resident_rows` keeps a (block_m, C) tile of features on chip. At 64 KiB (64 x 512 bfloat16) the
# forward program uses 161 KiB of shared memory on sm_90 with its pipelined column tiles; twice
# that would not fit an H100's 227 KiB.
RESIDENT_MAX_TILE_BYTES = 64 * 1024
# The split-loop kernels keep (block_m + num_stages * block_n) x C rows of features in shared
# memory; beyond 227 KiB (sm_90's opt-in maximum) no GPU could launch them.
SPLIT_MAX_SHARED_BYTES = 227 * 1024
# Rows and columns of the split backward's programs over class-straddling row blocks.
GENERAL_BLOCK = 32
# float32 FLT_MIN: the floor of the InfoNCE denominators (a constexpr, so the kernels may read it).
_FLT_MIN = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def _bf16_operand(x, NATIVE_BF16: tl.constexpr):
    # x rounded to bfloat16 for a tensor-core GEMM. The interpreter has no bfloat16 (numpy), so
    # there the rounding (to nearest even) is done on the float32 bits and the value stays float32:
    # the same numbers enter the product, which is then an exact float32 one.
    if NATIVE_BF16:
        return x.to(tl.bfloat16)
    else:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)


@triton.jit
def _raw_similarity(f_ptr, f_i, rows, cols, row_mask, col_mask, C,
                    RESIDENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_C: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # f_I . f_J for rows I x columns J: a (BLOCK_M, BLOCK_N) float32 tile. rows / cols are int64 so
    # that row * C cannot overflow. RESIDENT: f_i is the row block's (BLOCK_M, BLOCK_C >= C) tile,
    # loaded once by the caller, and one GEMM over all channels is done; otherwise f_i is unused and
    # the rows are streamed in BLOCK_C-wide channel chunks with the columns.
    if RESIDENT:
        cc = tl.arange(0, BLOCK_C)
        f_jt = tl.load(f_ptr + cols[None, :] * C + cc[:, None],
                       mask=col_mask[None, :] & (cc < C)[:, None], other=0.0)  # (BLOCK_C, BLOCK_N)
        acc = tl.dot(f_i, f_jt, input_precision=DOT_PRECISION)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            c_mask = cc < C
            f_ic = tl.load(f_ptr + rows[:, None] * C + cc[None, :],
                           mask=row_mask[:, None] & c_mask[None, :], other=0.0)  # (BLOCK_M, BLOCK_C)
            f_jt = tl.load(f_ptr + cols[None, :] * C + cc[:, None],
                           mask=col_mask[None, :] & c_mask[:, None], other=0.0)  # (BLOCK_C, BLOCK_N)
            acc = tl.dot(f_ic, f_jt, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _negatives_tile(f_ptr, f_i, rinv_ptr, ex_ptr, rows, row_mask, rinv_i, gs, ge, cs, ce, ex_i,
                    n0, col_end, C, inv_tau,
                    HAS_EXCLUSIVE: tl.constexpr, RESIDENT: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # sum_{j in [n0, n0 + BLOCK_N), j < col_end, j in N_i} e_ij for each row i: (BLOCK_M,).
    cols = n0 + tl.arange(0, BLOCK_N)
    col_mask = cols < col_end
    rinv_j = tl.load(rinv_ptr + cols, mask=col_mask, other=0.0)
    raw = _raw_similarity(f_ptr, f_i, rows, cols.to(tl.int64), row_mask, col_mask, C,
                          RESIDENT, BLOCK_M, BLOCK_N, BLOCK_C, DOT_PRECISION)
    t = (raw * rinv_i[:, None] * rinv_j[None, :] - 1.0) * inv_tau
    e = tl.exp(t)
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
    f_ptr, rinv_ptr, u_ptr, gs_ptr, ge_ptr, cs_ptr, ce_ptr, np_ptr, ex_ptr,  # inputs, (n, C), (n,)
    neg_ptr, loss_ptr, q_ptr,  # outputs, (n,) float32
    n, C, inv_tau,
    HAS_WEIGHT: tl.constexpr, HAS_EXCLUSIVE: tl.constexpr, RESIDENT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # With t_ij = s_ij - 1/tau and e_ij = exp(t_ij) in [exp(-2/tau), 1] (no running max needed),
    # the statistics are those of DESIGN.md scaled by exp(-1/tau), which cancels in L:
    #   Neg'_i = sum_{n in N_i} e_in                                           (pass 1)
    #   L_i    = 1/|P_i| sum_{p in P_i} u_p [log(e_ip + Neg'_i) - t_ip]        (pass 2)
    #   Q_i    = 1/|P_i| sum_{p in P_i} u_p Neg'_i / (e_ip + Neg'_i)         (pass 2, for backward)
    # and L_i = Q_i = 0 when P_i is empty. Q_i lies in [0, max u] at any tau (DESIGN.md's R_i, Q_i
    # / Neg'_i, overflows float32 for small tau). The denominators are clamped at FLT_MIN, which
    # only matters where exp(t) underflows (tau < 2/87.3, see `kernels.functional`).
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n
    rows64 = rows.to(tl.int64)
    gs = tl.load(gs_ptr + rows, mask=row_mask, other=0)
    ge = tl.load(ge_ptr + rows, mask=row_mask, other=0)
    cs = tl.load(cs_ptr + rows, mask=row_mask, other=0)
    ce = tl.load(ce_ptr + rows, mask=row_mask, other=0)
    rinv_i = tl.load(rinv_ptr + rows, mask=row_mask, other=0.0)
    if HAS_EXCLUSIVE:
        ex_i = tl.load(ex_ptr + rows, mask=row_mask, other=0) != 0
    else:
        ex_i = row_mask  # unused
    if RESIDENT:
        # The row block's features: loaded once, they stay on chip for both passes.
        cc = tl.arange(0, BLOCK_C)
        f_i = tl.load(f_ptr + rows64[:, None] * C + cc[None, :],
                      mask=row_mask[:, None] & (cc < C)[None, :], other=0.0)  # (BLOCK_M, BLOCK_C)
    else:
        f_i = rinv_i  # unused: _raw_similarity streams the rows in channel chunks
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
        neg += _negatives_tile(f_ptr, f_i, rinv_ptr, ex_ptr, rows64, row_mask, rinv_i, gs, ge, cs,
                               ce, ex_i, n0, skip_lo, C, inv_tau, HAS_EXCLUSIVE, RESIDENT,
                               BLOCK_M, BLOCK_N, BLOCK_C, DOT_PRECISION)
    for n0 in range(skip_hi, hi, BLOCK_N):
        neg += _negatives_tile(f_ptr, f_i, rinv_ptr, ex_ptr, rows64, row_mask, rinv_i, gs, ge, cs,
                               ce, ex_i, n0, hi, C, inv_tau, HAS_EXCLUSIVE, RESIDENT,
                               BLOCK_M, BLOCK_N, BLOCK_C, DOT_PRECISION)

    # ---- pass 2: L_i and Q_i over the class columns only (the diagonal class blocks).
    p_lo = tl.min(tl.where(row_mask, cs, n), axis=0)
    p_hi = tl.max(tl.where(row_mask, ce, 0), axis=0)
    loss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    q_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(p_lo, p_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < p_hi
        rinv_j = tl.load(rinv_ptr + cols, mask=col_mask, other=0.0)
        raw = _raw_similarity(f_ptr, f_i, rows64, cols.to(tl.int64), row_mask, col_mask, C,
                              RESIDENT, BLOCK_M, BLOCK_N, BLOCK_C, DOT_PRECISION)
        t = (raw * rinv_i[:, None] * rinv_j[None, :] - 1.0) * inv_tau
        e = tl.exp(t)
        c = cols[None, :]
        is_pos = (c >= cs[:, None]) & (c < ce[:, None]) & (c != rows[:, None])
        is_pos = is_pos & row_mask[:, None] & col_mask[None, :]
        if HAS_EXCLUSIVE:
            ex_j = tl.load(ex_ptr + cols, mask=col_mask, other=0) != 0
            is_pos = is_pos & ~(ex_i[:, None] & ex_j[None, :])
        denom = tl.maximum(e + neg[:, None], _FLT_MIN)
        if HAS_WEIGHT:
            w = tl.load(u_ptr + cols, mask=col_mask, other=0.0)[None, :]
        else:
            w = 1.0
        loss += tl.sum(tl.where(is_pos, w * (tl.log(denom) - t), 0.0), axis=1)
        q_acc += tl.sum(tl.where(is_pos, w * (neg[:, None] / denom), 0.0), axis=1)

    num_pos = tl.load(np_ptr + rows, mask=row_mask, other=0)
    scale = tl.where(num_pos > 0, 1.0 / tl.maximum(num_pos, 1).to(tl.float32), 0.0)
    tl.store(neg_ptr + rows, neg, mask=row_mask)
    tl.store(loss_ptr + rows, loss * scale, mask=row_mask)
    tl.store(q_ptr + rows, q_acc * scale, mask=row_mask)


@triton.jit
def _infonce_bwd_kernel(
    f_ptr, rinv_ptr, proj_ptr, u_ptr, a_ptr, b_ptr, neg_ptr,  # inputs: (n, C), (n,) float32
    gs_ptr, ge_ptr, cs_ptr, ce_ptr, ex_ptr,  # the layout, (n,)
    df_ptr, du_ptr,  # outputs: (n, C) in f's dtype, (n,) float32
    n, C, inv_tau,
    HAS_WEIGHT: tl.constexpr, HAS_EXCLUSIVE: tl.constexpr, NEED_DU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, PRODUCT_BF16: tl.constexpr,
    PRODUCT_PRECISION: tl.constexpr, NATIVE_BF16: tl.constexpr,
):
    # Upstream gradient g enters through a_i = g_i / |P_i| and b_i = g_i Q_i / Neg'_i (0 without
    # positives; kernels.layout.negative_pair_scale keeps it finite at any tau).
    #   G_ij = -a_i u_j Neg'_i / (e_ij + Neg'_i)   for j in P_i   (= dL_i/ds_ij * g_i)
    #   G_ij =  b_i e_ij                           for j in N_i
    #   H_ij = G_ij + G_ji, built from the statistics of row i and column j (the pair relation is
    #          symmetric), dv_i = 1/tau sum_j H_ij v_j = 1/tau sum_j (H_ij rinv_j) f_j
    #   df_i = rinv_i (dv_i - v_i (v_i . dv_i)),  v_i . dv_i = 1/tau sum_j H_ij c_ij
    #          (no projection for a row whose norm was clamped: proj_i = 0)
    #   du_i = sum_{j: i in P_j} a_j [log(e_ij + Neg'_j) - t_ij]       (u_i as partner of anchor j)
    # Each program owns rows I and the channels [pid_d * BLOCK_D, +BLOCK_D) of df_I: it recomputes
    # the full-C similarity per tile (one GEMM, channels streamed in BLOCK_C chunks) and accumulates
    # (H_IJ rinv_J) F_J (a second GEMM). With BLOCK_D >= C one program owns all channels and the
    # similarity is computed once per tile. Its writes are disjoint from every other program's: no
    # atomics, the result is deterministic.
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n
    rows64 = rows.to(tl.int64)
    gs = tl.load(gs_ptr + rows, mask=row_mask, other=0)
    ge = tl.load(ge_ptr + rows, mask=row_mask, other=0)
    cs = tl.load(cs_ptr + rows, mask=row_mask, other=0)
    ce = tl.load(ce_ptr + rows, mask=row_mask, other=0)
    rinv_i = tl.load(rinv_ptr + rows, mask=row_mask, other=0.0)
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
    radial = tl.zeros((BLOCK_M,), dtype=tl.float32)  # sum_j H_ij c_ij
    du = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < hi
        cols64 = cols.to(tl.int64)
        rinv_j = tl.load(rinv_ptr + cols, mask=col_mask, other=0.0)
        raw = _raw_similarity(f_ptr, rinv_i, rows64, cols64, row_mask, col_mask, C,
                              False, BLOCK_M, BLOCK_N, BLOCK_C, DOT_PRECISION)
        cos = raw * rinv_i[:, None] * rinv_j[None, :]
        t = (cos - 1.0) * inv_tau
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
        d_i = tl.maximum(e + neg_i[:, None], _FLT_MIN)  # e_ij + Neg'_i
        d_j = tl.maximum(e + neg_j[None, :], _FLT_MIN)  # e_ij + Neg'_j
        h_pos = -(a_i[:, None] * u_j[None, :] * neg_i[:, None] / d_i
                  + a_j[None, :] * u_i[:, None] * neg_j[None, :] / d_j)
        h_neg = e * (b_i[:, None] + b_j[None, :])
        h = tl.where(is_pos, h_pos, tl.where(is_neg, h_neg, 0.0))  # (BLOCK_M, BLOCK_N) float32
        radial += tl.sum(h * cos, axis=1)
        h = h * rinv_j[None, :]  # turns the product with F_J into one with V_J
        # The column tile's features for this program's channels, (BLOCK_N, BLOCK_D).
        f_j = tl.load(f_ptr + cols64[:, None] * C + dd[None, :],
                      mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        if PRODUCT_BF16:
            # bfloat16 has float32's exponent range, so H's tiny entries (small g) survive.
            acc = tl.dot(_bf16_operand(h, NATIVE_BF16), _bf16_operand(f_j, NATIVE_BF16), acc,
                         input_precision="ieee")
        else:
            # H stays float32 (its entries can be far below float16's range when g is small).
            acc = tl.dot(h, f_j.to(tl.float32), acc, input_precision=PRODUCT_PRECISION)
        if NEED_DU:
            du += tl.sum(tl.where(is_pos, a_j[None, :] * (tl.log(d_j) - t), 0.0), axis=1)

    # ---- epilogue: the normalisation's Jacobian, row by row.
    f_i = tl.load(f_ptr + rows64[:, None] * C + dd[None, :],
                  mask=row_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    proj_i = tl.load(proj_ptr + rows, mask=row_mask, other=0.0)
    v_i = f_i.to(tl.float32) * rinv_i[:, None]
    df = rinv_i[:, None] * (acc - v_i * (radial * proj_i)[:, None]) * inv_tau
    tl.store(df_ptr + rows64[:, None] * C + dd[None, :], df.to(df_ptr.dtype.element_ty),
             mask=row_mask[:, None] & d_mask[None, :])
    if NEED_DU:
        # Every channel program computes the same du; the first one writes it.
        tl.store(du_ptr + rows, du, mask=row_mask & (pid_d == 0))


# ---- split-loop kernels -------------------------------------------------------------------------
#
# The same op as the two kernels above, reorganised around the tile kinds of a sorted layout. Rows
# are sorted by (group, label), so almost every row block lies inside one class: its rows share
# the group range [gs, ge) and the class range [cs, ce), and its columns fall into
#
#   negative-only tiles  [gs, cs) and [ce, ge): every pair is a negative (no label mask, no
#                        division: forward adds e, backward forms H = e (b_i + b_j));
#   class tiles          [cs, ce): every pair is a positive except i == j, which only the tiles
#                        on the block's diagonal hold;
#   edge tiles           the last, partial tile of a range and the diagonal tiles: the same bodies
#                        with column / diagonal masks.
#
# A launch covers a list of row blocks (`blocks_ptr`): the "uniform" blocks (one class) run the
# specialisation UNIFORM=True (forward: one loop over all full negative-only tiles, one over their
# two edge tiles, one over the full class tiles, one over the diagonal and edge class tiles;
# backward: one loop over all of them whose body branches on the tile's kind); the others (a
# block that straddles a class or group boundary) run UNIFORM=False, the per-row masked body over
# the block's whole column range, as the kernels above (the backward in 32-row sub-blocks). Every
# program writes only its own rows: no atomics, deterministic. Blocks are listed longest column
# range first, so that the big blocks do not run last (the tail).
#
# Work per pair: e = exp2(raw * a_i * rinv_j - K) with K = log2(e) / tau and a_i = rinv_i K
# folded once per row (one FMUL, one FFMA, one MUFU), losses in log2 units scaled by ln 2 once
# per row, 2-D accumulators reduced after the loops. C is a compile-time constant (C_PAD its
# power-of-two padding), and each column tile is addressed from one scalar row offset.
# The backward keeps its row block (BLOCK_M x C_PAD) resident, loads each column tile once and
# feeds it to both GEMMs (S = F_I F_J^T, then dV_I += (H rinv_J) F_J); it owns all C channels, so
# v_i . dv_i for the normalisation's Jacobian comes from the accumulator in the epilogue,
# rinv_i (f_i . acc_i), instead of per pair.

LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _log2(x, NATIVE: tl.constexpr):
    # log2(x) for x >= FLT_MIN: the MUFU instruction when compiled (Triton's own log2 is a
    # polynomial of about a dozen FMAs per element), numpy's under the interpreter.
    if NATIVE:
        y = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x],
                                      dtype=tl.float32, is_pure=True, pack=1)
    else:
        y = tl.log2(x)
    return y


@triton.jit
def _load_tile(f_ptr, r0, end, C: tl.constexpr, C_PAD: tl.constexpr, BLOCK: tl.constexpr,
               MASKED: tl.constexpr):
    # (BLOCK, C_PAD) features of rows [r0, r0 + BLOCK): zero at rows >= end (MASKED) and channels
    # >= C. The int64 part of the address is one scalar per tile; the tile's offsets are int32.
    rr = tl.arange(0, BLOCK)
    cc = tl.arange(0, C_PAD)
    ptrs = f_ptr + tl.cast(r0, tl.int64) * C + (rr[:, None] * C + cc[None, :])
    if MASKED:
        if C_PAD == C:
            tile = tl.load(ptrs, mask=(r0 + rr < end)[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=(r0 + rr < end)[:, None] & (cc < C)[None, :], other=0.0)
    else:
        if C_PAD == C:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=(cc < C)[None, :], other=0.0)
    return tile


@triton.jit
def _load_cols(f_ptr, f_desc, n0, end, C: tl.constexpr, C_PAD: tl.constexpr,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr):
    # The column tile [n0, n0 + BLOCK_N) x C_PAD. TMA: one tensor-descriptor copy (block
    # [BLOCK_N, C_PAD] over the (n, C) features; zeros past n and C, but rows in [end, n) are
    # loaded: every caller zeroes their pairs through a mask or through rinv_j = 0).
    if TMA:
        tile = f_desc.load([n0, 0])
    else:
        tile = _load_tile(f_ptr, n0, end, C, C_PAD, BLOCK_N, MASKED)
    return tile


@triton.jit
def _load_vec(ptr, r0, end, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    # (BLOCK,) entries [r0, r0 + BLOCK) of a per-row vector, 0 at >= end (MASKED).
    idx = r0 + tl.arange(0, BLOCK)
    if MASKED:
        x = tl.load(ptr + idx, mask=idx < end, other=0)
    else:
        x = tl.load(ptr + idx)
    return x


@triton.jit
def _exp2_tile(f_i, f_j, a_i, r_j, off2, DOT_PRECISION: tl.constexpr):
    # t2 = log2(e) (s_ij - 1/tau) and e_ij = 2^t2, both (BLOCK_M, BLOCK_N) float32.
    raw = tl.dot(f_i, tl.trans(f_j), input_precision=DOT_PRECISION)
    t2 = raw * a_i[:, None] * r_j[None, :] - off2
    return t2, tl.exp2(t2)


@triton.jit
def _product(acc, hr, f_j, PRODUCT_BF16: tl.constexpr, PRODUCT_PRECISION: tl.constexpr,
             NATIVE_BF16: tl.constexpr):
    # acc (BLOCK_M, C_PAD) += hr (BLOCK_M, BLOCK_N) @ f_j (BLOCK_N, C_PAD), float32 accumulation.
    if PRODUCT_BF16:
        acc = tl.dot(_bf16_operand(hr, NATIVE_BF16), _bf16_operand(f_j, NATIVE_BF16), acc,
                     input_precision="ieee")
    else:
        acc = tl.dot(hr, f_j.to(tl.float32), acc, input_precision=PRODUCT_PRECISION)
    return acc


@triton.jit
def _split_fwd_neg_tile(acc, f_i, f_ptr, f_desc, rinv_ptr, ex_ptr, a_i, ex_i, off2, n0, end,
                        C: tl.constexpr, C_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                        HAS_EXCLUSIVE: tl.constexpr, MASKED: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, TMA: tl.constexpr):
    # acc (BLOCK_M, BLOCK_N) += e over a negative-only tile [n0, n0 + BLOCK_N) (cut at end).
    f_j = _load_cols(f_ptr, f_desc, n0, end, C, C_PAD, BLOCK_N, MASKED, TMA)
    r_j = _load_vec(rinv_ptr, n0, end, BLOCK_N, MASKED)
    t2, e = _exp2_tile(f_i, f_j, a_i, r_j, off2, DOT_PRECISION)
    if HAS_EXCLUSIVE:
        ex_j = _load_vec(ex_ptr, n0, end, BLOCK_N, MASKED) != 0
        e = tl.where(ex_i[:, None] & ex_j[None, :], 0.0, e)
    if MASKED:
        e = tl.where((n0 + tl.arange(0, BLOCK_N) < end)[None, :], e, 0.0)
    return acc + e


@triton.jit
def _split_fwd_class_tile(l_acc, q_acc, f_i, f_ptr, f_desc, rinv_ptr, u_ptr, ex_ptr, a_i, neg_i,
                          ex_i, rows, off2, n0, end, C: tl.constexpr, C_PAD: tl.constexpr,
                          BLOCK_N: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                          HAS_EXCLUSIVE: tl.constexpr, MASKED: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, NATIVE: tl.constexpr, TMA: tl.constexpr):
    # Over a class tile: l_acc += u_j (log2(e_ij + Neg'_i) - t2_ij), q_acc += u_j Neg'_i /
    # (e_ij + Neg'_i), both (BLOCK_M, BLOCK_N). MASKED: the diagonal (i == j) and the columns
    # past end.
    f_j = _load_cols(f_ptr, f_desc, n0, end, C, C_PAD, BLOCK_N, MASKED, TMA)
    r_j = _load_vec(rinv_ptr, n0, end, BLOCK_N, MASKED)
    t2, e = _exp2_tile(f_i, f_j, a_i, r_j, off2, DOT_PRECISION)
    denom = tl.maximum(e + neg_i[:, None], _FLT_MIN)
    l_term = _log2(denom, NATIVE) - t2
    q_term = tl.fdiv(neg_i[:, None], denom)
    if HAS_WEIGHT:
        w = _load_vec(u_ptr, n0, end, BLOCK_N, MASKED)[None, :]
        l_term = l_term * w
        q_term = q_term * w
    if MASKED:
        cols = n0 + tl.arange(0, BLOCK_N)
        ok = (cols < end)[None, :] & (cols[None, :] != rows[:, None])
        if HAS_EXCLUSIVE:
            ex_j = _load_vec(ex_ptr, n0, end, BLOCK_N, MASKED) != 0
            ok = ok & ~(ex_i[:, None] & ex_j[None, :])
        l_term = tl.where(ok, l_term, 0.0)
        q_term = tl.where(ok, q_term, 0.0)
    elif HAS_EXCLUSIVE:
        ex_j = _load_vec(ex_ptr, n0, end, BLOCK_N, MASKED) != 0
        both = ex_i[:, None] & ex_j[None, :]
        l_term = tl.where(both, 0.0, l_term)
        q_term = tl.where(both, 0.0, q_term)
    return l_acc + l_term, q_acc + q_term


@triton.jit
def _split_fwd_general_tile(acc, l_acc, f_i, f_ptr, f_desc, rinv_ptr, u_ptr, ex_ptr, a_i, neg_i,
                            ex_i, rows, row_mask, gs, ge, cs, ce, off2, n0, end, C: tl.constexpr,
                            C_PAD: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                            HAS_EXCLUSIVE: tl.constexpr, PASS: tl.constexpr,
                            DOT_PRECISION: tl.constexpr, NATIVE: tl.constexpr, TMA: tl.constexpr):
    # A tile of a block that straddles classes: every pair masked by its rows' own ranges. PASS 1
    # adds the negatives' e to acc (l_acc unused); PASS 2 adds the positives' loss terms to
    # l_acc and their Q terms to acc.
    f_j = _load_cols(f_ptr, f_desc, n0, end, C, C_PAD, BLOCK_N, True, TMA)
    r_j = _load_vec(rinv_ptr, n0, end, BLOCK_N, True)
    t2, e = _exp2_tile(f_i, f_j, a_i, r_j, off2, DOT_PRECISION)
    c = n0 + tl.arange(0, BLOCK_N)[None, :]
    ok = row_mask[:, None] & (c < end)
    if HAS_EXCLUSIVE:
        ex_j = _load_vec(ex_ptr, n0, end, BLOCK_N, True) != 0
        ok = ok & ~(ex_i[:, None] & ex_j[None, :])
    in_class = (c >= cs[:, None]) & (c < ce[:, None])
    if PASS == 1:
        is_neg = ok & (c >= gs[:, None]) & (c < ge[:, None]) & ~in_class
        acc += tl.where(is_neg, e, 0.0)
    else:
        is_pos = ok & in_class & (c != rows[:, None])
        denom = tl.maximum(e + neg_i[:, None], _FLT_MIN)
        l_term = _log2(denom, NATIVE) - t2
        q_term = tl.fdiv(neg_i[:, None], denom)
        if HAS_WEIGHT:
            w = _load_vec(u_ptr, n0, end, BLOCK_N, True)[None, :]
            l_term = l_term * w
            q_term = q_term * w
        l_acc += tl.where(is_pos, l_term, 0.0)
        acc += tl.where(is_pos, q_term, 0.0)
    return acc, l_acc


@triton.jit
def _split_fwd_kernel(
    f_ptr, rinv_ptr, u_ptr, gs_ptr, ge_ptr, cs_ptr, ce_ptr, np_ptr, ex_ptr,  # inputs, (n, C), (n,)
    blocks_ptr,  # (programs,) int32: the row blocks this launch covers
    f_desc,  # TMA: a tensor descriptor of f with block [BLOCK_N, C_PAD]; otherwise unused
    neg_ptr, loss_ptr, q_ptr,  # outputs, (n,) float32
    n, scale2,  # scale2 = log2(e) / tau
    C: tl.constexpr, C_PAD: tl.constexpr, UNIFORM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_EXCLUSIVE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    NATIVE: tl.constexpr, TMA: tl.constexpr,
):
    # NATIVE: compiled for a GPU (False under the interpreter). TMA: column tiles through f_desc.
    # The statistics of `_infonce_fwd_kernel` (Neg', L, Q), with t2 = log2(e) t:
    #   Neg'_i = sum_{n in N_i} 2^t2_in                                          (negative tiles)
    #   L_i    = ln2 / |P_i| sum_{p in P_i} u_p [log2(2^t2_ip + Neg'_i) - t2_ip]  (class tiles)
    #   Q_i    = 1/|P_i| sum_{p in P_i} u_p Neg'_i / (2^t2_ip + Neg'_i)
    r0 = tl.load(blocks_ptr + tl.program_id(0)) * BLOCK_M
    rows = r0 + tl.arange(0, BLOCK_M)
    row_mask = rows < n
    r_end = tl.minimum(r0 + BLOCK_M, n)
    a_i = _load_vec(rinv_ptr, r0, n, BLOCK_M, True) * scale2
    if HAS_EXCLUSIVE:
        ex_i = _load_vec(ex_ptr, r0, n, BLOCK_M, True) != 0
    else:
        ex_i = row_mask  # unused
    # The row block's features stay on chip for the whole program.
    f_i = _load_tile(f_ptr, r0, n, C, C_PAD, BLOCK_M, True)
    neg_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if UNIFORM:
        gs = tl.load(gs_ptr + r0)
        ge = tl.load(ge_ptr + r0)
        cs = tl.load(cs_ptr + r0)
        ce = tl.load(ce_ptr + r0)
        # Negative-only tiles: the full ones of [gs, cs) then of [ce, ge) in one loop, then the
        # two partial ones at the ends of those ranges (empty ones contribute nothing).
        k1 = (cs - gs) // BLOCK_N
        k2 = (ge - ce) // BLOCK_N
        for k in range(0, k1 + k2):
            n0 = tl.where(k < k1, gs + k * BLOCK_N, ce + (k - k1) * BLOCK_N)
            neg_acc = _split_fwd_neg_tile(neg_acc, f_i, f_ptr, f_desc, rinv_ptr, ex_ptr, a_i, ex_i,
                                          scale2, n0, n, C, C_PAD, BLOCK_N, HAS_EXCLUSIVE, False,
                                          DOT_PRECISION, TMA)
        for k in range(0, 2):
            n0 = tl.where(k == 0, gs + k1 * BLOCK_N, ce + k2 * BLOCK_N)
            end = tl.where(k == 0, cs, ge)
            neg_acc = _split_fwd_neg_tile(neg_acc, f_i, f_ptr, f_desc, rinv_ptr, ex_ptr, a_i, ex_i,
                                          scale2, n0, end, C, C_PAD, BLOCK_N, HAS_EXCLUSIVE, True,
                                          DOT_PRECISION, TMA)
        neg = tl.sum(neg_acc, axis=1)
        l_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        q_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # Class tiles [cs, ce). Tiles are aligned at cs; those overlapping the block's own rows
        # [r0, r_end) hold the diagonal: [d_lo, d_hi). Full tiles before and after them run
        # unmasked; the diagonal tiles and the last partial tile run masked.
        d_lo = cs + (r0 - cs) // BLOCK_N * BLOCK_N
        d_hi = tl.minimum(d_lo + tl.cdiv(r_end - d_lo, BLOCK_N) * BLOCK_N, ce)
        k_a = (d_lo - cs) // BLOCK_N
        k_c = (ce - d_hi) // BLOCK_N
        c_full = d_hi + k_c * BLOCK_N
        for k in range(0, k_a + k_c):
            n0 = tl.where(k < k_a, cs + k * BLOCK_N, d_hi + (k - k_a) * BLOCK_N)
            l_acc, q_acc = _split_fwd_class_tile(l_acc, q_acc, f_i, f_ptr, f_desc, rinv_ptr, u_ptr,
                                                 ex_ptr, a_i, neg, ex_i, rows, scale2, n0, n, C,
                                                 C_PAD, BLOCK_N, HAS_WEIGHT, HAS_EXCLUSIVE, False,
                                                 DOT_PRECISION, NATIVE, TMA)
        k_b = tl.cdiv(d_hi - d_lo, BLOCK_N)
        for k in range(0, k_b + 1):
            n0 = tl.where(k < k_b, d_lo + k * BLOCK_N, c_full)
            end = tl.where(k < k_b, d_hi, ce)
            l_acc, q_acc = _split_fwd_class_tile(l_acc, q_acc, f_i, f_ptr, f_desc, rinv_ptr, u_ptr,
                                                 ex_ptr, a_i, neg, ex_i, rows, scale2, n0, end, C,
                                                 C_PAD, BLOCK_N, HAS_WEIGHT, HAS_EXCLUSIVE, True,
                                                 DOT_PRECISION, NATIVE, TMA)
    else:
        gs = _load_vec(gs_ptr, r0, n, BLOCK_M, True)
        ge = _load_vec(ge_ptr, r0, n, BLOCK_M, True)
        cs = _load_vec(cs_ptr, r0, n, BLOCK_M, True)
        ce = _load_vec(ce_ptr, r0, n, BLOCK_M, True)
        lo = tl.min(tl.where(row_mask, gs, n), axis=0)
        hi = tl.max(tl.where(row_mask, ge, 0), axis=0)
        neg = tl.zeros((BLOCK_M,), dtype=tl.float32)
        l_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            neg_acc, l_acc = _split_fwd_general_tile(neg_acc, l_acc, f_i, f_ptr, f_desc, rinv_ptr,
                                                     u_ptr, ex_ptr, a_i, neg, ex_i, rows, row_mask,
                                                     gs, ge, cs, ce, scale2, n0, hi, C, C_PAD,
                                                     BLOCK_N, HAS_WEIGHT, HAS_EXCLUSIVE, 1,
                                                     DOT_PRECISION, NATIVE, TMA)
        neg = tl.sum(neg_acc, axis=1)
        q_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        p_lo = tl.min(tl.where(row_mask, cs, n), axis=0)
        p_hi = tl.max(tl.where(row_mask, ce, 0), axis=0)
        for n0 in range(p_lo, p_hi, BLOCK_N):
            q_acc, l_acc = _split_fwd_general_tile(q_acc, l_acc, f_i, f_ptr, f_desc, rinv_ptr,
                                                   u_ptr, ex_ptr, a_i, neg, ex_i, rows, row_mask,
                                                   gs, ge, cs, ce, scale2, n0, p_hi, C, C_PAD,
                                                   BLOCK_N, HAS_WEIGHT, HAS_EXCLUSIVE, 2,
                                                   DOT_PRECISION, NATIVE, TMA)
    num_pos = _load_vec(np_ptr, r0, n, BLOCK_M, True)
    scale = tl.where(num_pos > 0, 1.0 / tl.maximum(num_pos, 1).to(tl.float32), 0.0)
    tl.store(neg_ptr + rows, neg, mask=row_mask)
    tl.store(loss_ptr + rows, tl.sum(l_acc, axis=1) * (scale * _LN2), mask=row_mask)
    tl.store(q_ptr + rows, tl.sum(q_acc, axis=1) * scale, mask=row_mask)


@triton.jit
def _split_bwd_pos_terms(e, t2, neg_i, neg_j, ca_i, car_j, u_i, ur_j, HAS_WEIGHT: tl.constexpr,
                         NATIVE: tl.constexpr):
    # H_ij rinv_j of positive pairs, -(a_i u_j Neg'_i / d_i + a_j u_i Neg'_j / d_j) rinv_j with
    # d_i = e_ij + Neg'_i, d_j = e_ij + Neg'_j (ca = a Neg', car = ca rinv, ur = u rinv), and the
    # log term of du, log2(d_j) - t2.
    d_i = tl.maximum(e + neg_i[:, None], _FLT_MIN)
    d_j = tl.maximum(e + neg_j[None, :], _FLT_MIN)
    if HAS_WEIGHT:
        hr = -(tl.fdiv(ca_i[:, None] * ur_j[None, :], d_i)
               + tl.fdiv(car_j[None, :] * u_i[:, None], d_j))
    else:
        hr = -(tl.fdiv(ca_i[:, None] * ur_j[None, :], d_i) + tl.fdiv(car_j[None, :], d_j))
    return hr, _log2(d_j, NATIVE) - t2


@triton.jit
def _split_bwd_uniform_tile(acc, du_acc, f_i, f_ptr, f_desc, rinv_ptr, br_ptr, ur_ptr, neg_ptr,
                            car_ptr, a_ptr, ex_ptr, a_i, b_i, neg_i, ca_i, u_i, ex_i, rows, r0,
                            r_end, off2, n, n0, end, IS_CLASS, C: tl.constexpr, C_PAD: tl.constexpr,
                            BLOCK_N: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                            HAS_EXCLUSIVE: tl.constexpr, NEED_DU: tl.constexpr,
                            DOT_PRECISION: tl.constexpr, PRODUCT_BF16: tl.constexpr,
                            PRODUCT_PRECISION: tl.constexpr, NATIVE_BF16: tl.constexpr,
                            TMA: tl.constexpr):
    # One column tile [n0, n0 + BLOCK_N) of a uniform block, cut at end; IS_CLASS (a scalar, the
    # same for the whole tile) picks the body after the shared similarity GEMM:
    #   negative-only: H_ij rinv_j = e_ij (b_i rinv_j + br_j); the columns past end were loaded
    #                  with rinv_j = br_j = 0, so they add nothing: no mask at all.
    #   class:         the positive formula; the diagonal tiles and the partial last tile mask
    #                  i == j and the columns past end, the others run unmasked.
    # One loop over every tile keeps the (BLOCK_M, C_PAD) accumulator in one place: split over
    # several loops, ptxas serialised every wgmma of the kernel.
    f_j = _load_cols(f_ptr, f_desc, n0, n, C, C_PAD, BLOCK_N, True, TMA)  # both GEMMs
    r_j = _load_vec(rinv_ptr, n0, end, BLOCK_N, True)
    t2, e = _exp2_tile(f_i, f_j, a_i, r_j, off2, DOT_PRECISION)
    if IS_CLASS:
        neg_j = _load_vec(neg_ptr, n0, end, BLOCK_N, True)
        car_j = _load_vec(car_ptr, n0, end, BLOCK_N, True)
        if HAS_WEIGHT:
            ur_j = _load_vec(ur_ptr, n0, end, BLOCK_N, True)
        else:
            ur_j = r_j
        hr, log_term = _split_bwd_pos_terms(e, t2, neg_i, neg_j, ca_i, car_j, u_i, ur_j,
                                            HAS_WEIGHT, NATIVE_BF16)
        cols = n0 + tl.arange(0, BLOCK_N)
        if (n0 + BLOCK_N > end) | ((n0 < r_end) & (n0 + BLOCK_N > r0)):
            ok = (cols < end)[None, :] & (cols[None, :] != rows[:, None])
        else:
            ok = (cols >= 0)[None, :] & (rows >= 0)[:, None]
        if HAS_EXCLUSIVE:
            ex_j = _load_vec(ex_ptr, n0, end, BLOCK_N, True) != 0
            ok = ok & ~(ex_i[:, None] & ex_j[None, :])
        hr = tl.where(ok, hr, 0.0)
        if NEED_DU:
            a_j = _load_vec(a_ptr, n0, end, BLOCK_N, True)
            du_acc += tl.where(ok, a_j[None, :] * log_term, 0.0)
    else:
        br_j = _load_vec(br_ptr, n0, end, BLOCK_N, True)
        hr = e * (b_i[:, None] * r_j[None, :] + br_j[None, :])
        if HAS_EXCLUSIVE:
            ex_j = _load_vec(ex_ptr, n0, end, BLOCK_N, True) != 0
            hr = tl.where(ex_i[:, None] & ex_j[None, :], 0.0, hr)
    acc = _product(acc, hr, f_j, PRODUCT_BF16, PRODUCT_PRECISION, NATIVE_BF16)
    return acc, du_acc


@triton.jit
def _split_bwd_general_tile(acc, du_acc, f_i, f_ptr, f_desc, rinv_ptr, br_ptr, ur_ptr, neg_ptr,
                            car_ptr, a_ptr, ex_ptr, a_i, b_i, neg_i, ca_i, u_i, ex_i, rows,
                            row_mask, gs, ge, cs, ce, p_lo, p_hi, off2, n, n0, end, C: tl.constexpr,
                            C_PAD: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                            HAS_EXCLUSIVE: tl.constexpr, NEED_DU: tl.constexpr,
                            DOT_PRECISION: tl.constexpr, PRODUCT_BF16: tl.constexpr,
                            PRODUCT_PRECISION: tl.constexpr, NATIVE_BF16: tl.constexpr,
                            TMA: tl.constexpr):
    # A tile of a block that straddles classes: each pair masked by its row's own ranges. Tiles
    # outside the block's class columns [p_lo, p_hi) hold no positive and skip that formula.
    f_j = _load_cols(f_ptr, f_desc, n0, n, C, C_PAD, BLOCK_N, True, TMA)
    r_j = _load_vec(rinv_ptr, n0, end, BLOCK_N, True)
    br_j = _load_vec(br_ptr, n0, end, BLOCK_N, True)
    t2, e = _exp2_tile(f_i, f_j, a_i, r_j, off2, DOT_PRECISION)
    c = n0 + tl.arange(0, BLOCK_N)[None, :]
    ok = row_mask[:, None] & (c < end)
    if HAS_EXCLUSIVE:
        ex_j = _load_vec(ex_ptr, n0, end, BLOCK_N, True) != 0
        ok = ok & ~(ex_i[:, None] & ex_j[None, :])
    in_group = (c >= gs[:, None]) & (c < ge[:, None])
    h_neg = e * (b_i[:, None] * r_j[None, :] + br_j[None, :])
    if (n0 < p_hi) & (n0 + BLOCK_N > p_lo):
        neg_j = _load_vec(neg_ptr, n0, end, BLOCK_N, True)
        car_j = _load_vec(car_ptr, n0, end, BLOCK_N, True)
        if HAS_WEIGHT:
            ur_j = _load_vec(ur_ptr, n0, end, BLOCK_N, True)
        else:
            ur_j = r_j
        in_class = (c >= cs[:, None]) & (c < ce[:, None])
        is_pos = ok & in_class & (c != rows[:, None])
        is_neg = ok & in_group & ~in_class
        h_pos, log_term = _split_bwd_pos_terms(e, t2, neg_i, neg_j, ca_i, car_j, u_i, ur_j,
                                               HAS_WEIGHT, NATIVE_BF16)
        hr = tl.where(is_pos, h_pos, tl.where(is_neg, h_neg, 0.0))
        if NEED_DU:
            a_j = _load_vec(a_ptr, n0, end, BLOCK_N, True)
            du_acc += tl.where(is_pos, a_j[None, :] * log_term, 0.0)
    else:
        hr = tl.where(ok & in_group, h_neg, 0.0)
    acc = _product(acc, hr, f_j, PRODUCT_BF16, PRODUCT_PRECISION, NATIVE_BF16)
    return acc, du_acc


@triton.jit
def _split_bwd_kernel(
    f_ptr, rinv_ptr, proj_ptr, b_ptr, br_ptr, u_ptr, ur_ptr, neg_ptr, ca_ptr, car_ptr, a_ptr,
    gs_ptr, ge_ptr, cs_ptr, ce_ptr, ex_ptr,  # inputs: (n, C) features, (n,) float32 / layout
    blocks_ptr,  # (programs,) int32: the row blocks this launch covers
    f_desc,  # TMA: a tensor descriptor of f with block [BLOCK_N, C_PAD]; otherwise unused
    df_ptr, du_ptr,  # outputs: (n, C) in f's dtype, (n,) float32
    n, scale2, inv_tau,  # scale2 = log2(e) / tau
    C: tl.constexpr, C_PAD: tl.constexpr, UNIFORM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_EXCLUSIVE: tl.constexpr, NEED_DU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PRODUCT_BF16: tl.constexpr, PRODUCT_PRECISION: tl.constexpr, NATIVE_BF16: tl.constexpr,
    TMA: tl.constexpr,
):
    # The gradient of `_infonce_bwd_kernel` (same H = G + G^T), with per-row host vectors
    # b = g Q / Neg' (kernels.layout.negative_pair_scale), br = b rinv, a = g / |P|, ca = a Neg',
    # car = ca rinv, ur = u rinv:
    #   negative pair:  H_ij rinv_j = e_ij (b_i rinv_j + br_j)
    #   positive pair:  H_ij rinv_j = -(ca_i ur_j / (e_ij + Neg'_i) + car_j u_i / (e_ij + Neg'_j))
    #   acc_i = sum_j (H_ij rinv_j) f_j = tau dv_i,   v_i . acc_i = rinv_i (f_i . acc_i)
    #   df_i  = rinv_i / tau (acc_i - v_i (v_i . acc_i))   (no projection where proj_i = 0)
    #   du_i  = ln2 sum_{j: i in P_j} a_j [log2(e_ij + Neg'_j) - t2_ij]
    r0 = tl.load(blocks_ptr + tl.program_id(0)) * BLOCK_M
    rows = r0 + tl.arange(0, BLOCK_M)
    row_mask = rows < n
    r_end = tl.minimum(r0 + BLOCK_M, n)
    rinv_i = _load_vec(rinv_ptr, r0, n, BLOCK_M, True)
    a_i = rinv_i * scale2
    b_i = _load_vec(b_ptr, r0, n, BLOCK_M, True)
    neg_i = _load_vec(neg_ptr, r0, n, BLOCK_M, True)
    ca_i = _load_vec(ca_ptr, r0, n, BLOCK_M, True)
    if HAS_WEIGHT:
        u_i = _load_vec(u_ptr, r0, n, BLOCK_M, True)
    else:
        u_i = rinv_i  # unused
    if HAS_EXCLUSIVE:
        ex_i = _load_vec(ex_ptr, r0, n, BLOCK_M, True) != 0
    else:
        ex_i = row_mask  # unused
    # The row block's features stay on chip; every column tile is loaded once for both GEMMs.
    f_i = _load_tile(f_ptr, r0, n, C, C_PAD, BLOCK_M, True)
    acc = tl.zeros((BLOCK_M, C_PAD), dtype=tl.float32)
    du_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if UNIFORM:
        gs = tl.load(gs_ptr + r0)
        ge = tl.load(ge_ptr + r0)
        cs = tl.load(cs_ptr + r0)
        ce = tl.load(ce_ptr + r0)
        # Tiles k of [gs, cs), then of [ce, ge) (negative-only), then of [cs, ce) (class), each
        # range cut into BLOCK_N-wide tiles from its start.
        t1 = tl.cdiv(cs - gs, BLOCK_N)
        t2 = t1 + tl.cdiv(ge - ce, BLOCK_N)
        t3 = t2 + tl.cdiv(ce - cs, BLOCK_N)
        for k in range(0, t3):
            n0 = tl.where(k < t1, gs + k * BLOCK_N,
                          tl.where(k < t2, ce + (k - t1) * BLOCK_N, cs + (k - t2) * BLOCK_N))
            end = tl.where(k < t1, cs, tl.where(k < t2, ge, ce))
            acc, du_acc = _split_bwd_uniform_tile(acc, du_acc, f_i, f_ptr, f_desc, rinv_ptr, br_ptr,
                                                  ur_ptr, neg_ptr, car_ptr, a_ptr, ex_ptr, a_i, b_i,
                                                  neg_i, ca_i, u_i, ex_i, rows, r0, r_end, scale2,
                                                  n, n0, end, k >= t2, C, C_PAD, BLOCK_N,
                                                  HAS_WEIGHT, HAS_EXCLUSIVE, NEED_DU, DOT_PRECISION,
                                                  PRODUCT_BF16, PRODUCT_PRECISION, NATIVE_BF16, TMA)
    else:
        gs = _load_vec(gs_ptr, r0, n, BLOCK_M, True)
        ge = _load_vec(ge_ptr, r0, n, BLOCK_M, True)
        cs = _load_vec(cs_ptr, r0, n, BLOCK_M, True)
        ce = _load_vec(ce_ptr, r0, n, BLOCK_M, True)
        lo = tl.min(tl.where(row_mask, gs, n), axis=0)
        hi = tl.max(tl.where(row_mask, ge, 0), axis=0)
        p_lo = tl.min(tl.where(row_mask, cs, n), axis=0)
        p_hi = tl.max(tl.where(row_mask, ce, 0), axis=0)
        for n0 in range(lo, hi, BLOCK_N):
            acc, du_acc = _split_bwd_general_tile(acc, du_acc, f_i, f_ptr, f_desc, rinv_ptr, br_ptr,
                                                  ur_ptr, neg_ptr, car_ptr, a_ptr, ex_ptr, a_i, b_i,
                                                  neg_i, ca_i, u_i, ex_i, rows, row_mask, gs, ge,
                                                  cs, ce, p_lo, p_hi, scale2, n, n0, hi, C, C_PAD,
                                                  BLOCK_N, HAS_WEIGHT, HAS_EXCLUSIVE, NEED_DU,
                                                  DOT_PRECISION, PRODUCT_BF16, PRODUCT_PRECISION,
                                                  NATIVE_BF16, TMA)

    # ---- epilogue: the normalisation's Jacobian from the accumulator.
    # f_i is loaded again (from L2) rather than kept: holding it in registers across the loops
    # would cost 64 registers per thread at 64 x 512 and spill the accumulator.
    proj_i = _load_vec(proj_ptr, r0, n, BLOCK_M, True)
    v_i = _load_tile(f_ptr, r0, n, C, C_PAD, BLOCK_M, True).to(tl.float32) * rinv_i[:, None]
    radial = tl.sum(v_i * acc, axis=1)  # v_i . acc_i
    df = (acc - v_i * (radial * proj_i)[:, None]) * (rinv_i * inv_tau)[:, None]
    cc = tl.arange(0, C_PAD)
    ptrs = df_ptr + tl.cast(r0, tl.int64) * C + (tl.arange(0, BLOCK_M)[:, None] * C + cc[None, :])
    if C_PAD == C:
        tl.store(ptrs, df.to(df_ptr.dtype.element_ty), mask=row_mask[:, None])
    else:
        tl.store(ptrs, df.to(df_ptr.dtype.element_ty), mask=row_mask[:, None] & (cc < C)[None, :])
    if NEED_DU:
        tl.store(du_ptr + rows, tl.sum(du_acc, axis=1) * _LN2, mask=row_mask)


_PRECISIONS = ("ieee", "tf32", "tf32x3")
# A backward program holds a (block_m, block_d) float32 accumulator in registers: at 64 x 512 that
# is already 128 registers per thread over 8 warps.
MAX_BLOCK_D = 512


def _check_pow2(name: str, value, minimum: int = 16) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class SplitLaunch:
    """Launch geometry of one split-loop kernel (`_split_fwd_kernel` / `_split_bwd_kernel`).

    Args:
        block_m: rows per program (power of two >= 16). The program keeps (block_m, C rounded up)
            features on chip, and the backward a (block_m, C rounded up) float32 accumulator.
        block_n: columns per tile (power of two >= 16).
        num_warps: warps per program (power of two).
        num_stages: software-pipelining depth of the column loops (None: Triton's default).
        tma: load the column tiles with a tensor descriptor (Hopper's TMA: one copy per tile, no
            per-thread addresses), where the row stride is a multiple of 16 bytes (`resolved`
            turns it off otherwise) and the device is a Hopper or later (older ones run the
            pointer loads).
    """

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: Optional[int] = 2
    tma: bool = False

    def check(self, name: str) -> None:
        """Raise ValueError naming `name` on a bad value."""
        _check_pow2(f"{name}.block_m", self.block_m)
        _check_pow2(f"{name}.block_n", self.block_n)
        _check_pow2(f"{name}.num_warps", self.num_warps, minimum=1)
        if self.num_stages is not None and (isinstance(self.num_stages, bool)
                                            or not isinstance(self.num_stages, int)
                                            or self.num_stages < 1):
            raise ValueError(f"{name}.num_stages must be None or an int >= 1, "
                             f"got {self.num_stages!r}")
        if not isinstance(self.tma, bool):
            raise TypeError(f"{name}.tma must be a bool, got {self.tma!r}")

    def launch_options(self) -> dict:
        """num_warps / num_stages keyword arguments of a kernel launch."""
        options = {"num_warps": self.num_warps}
        if self.num_stages is not None:
            options["num_stages"] = self.num_stages
        return options

    def general_backward(self) -> "SplitLaunch":
        """The launch of the backward's general (class-straddling) blocks: at most GENERAL_BLOCK
        rows and columns. Their per-row masks and both pair formulas beside a (64, 512) float32
        accumulator spill inside the loop on sm_90 and sm_80 (compile_report); 32-row programs
        do not, and these blocks hold about 2 % of the pairs at N = 131,072."""
        return replace(self, block_m=min(self.block_m, GENERAL_BLOCK),
                       block_n=min(self.block_n, GENERAL_BLOCK))


@dataclass(frozen=True)
class TritonConfig:
    """Launch parameters of the kernels (`VARIANTS` holds the presets; bench/NOTES.md their GPU measurements).

    The defaults are the streamed launch: 64 x 32 tiles over 8 warps, channels streamed in chunks
    of 64 for the similarity and 128 gradient channels per backward program. tests/test_pixel_infonce_slow.py
    compiles every preset for sm_90 and reports registers and spills.

    Args:
        block_m: rows per program (power of two >= 16).
        block_n: columns per tile (power of two >= 16).
        block_c: channels per chunk of the similarity GEMM when the channels are streamed
            (power of two >= 16); default min(64, C rounded up to a power of two).
        block_d: gradient channels per backward program (power of two, 16 to MAX_BLOCK_D, capped
            at C rounded up). C > block_d means several programs per row block, each recomputing
            the similarities; block_d >= C means one program per row block that computes each
            similarity tile once. Default min(128, C rounded up).
        num_warps: warps per program (power of two).
        num_stages: software-pipelining depth of the loads in the column loop, or None for
            Triton's default.
        resident_rows: forward only: load the row block's features once per program (all C
            channels) and keep them on chip across both column passes, so that each tile loads
            only its columns. Applies while a (block_m, C rounded up) tile of the input dtype fits
            RESIDENT_MAX_TILE_BYTES (C <= 512 for 16-bit inputs at block_m = 64); otherwise the
            channels are streamed as without it. `resolved` says which.
        dot_precision: tl.dot input precision of the similarity GEMM for float32 inputs ("ieee",
            "tf32x3", "tf32"); ignored for float16 / bfloat16 inputs.
        split_forward / split_backward: a `SplitLaunch` to run that pass with the split-loop
            kernel (separate loops for negative-only, class and edge tiles, rows resident, one
            load of each column tile; see "split-loop kernels" above), or None for the kernel
            the other fields configure. Applies while the (block_m, C rounded up) row tile fits
            RESIDENT_MAX_TILE_BYTES and C rounded up is at most MAX_BLOCK_D (the backward owns
            every channel); `resolved` sets it to None otherwise, and a launch that runs out of
            on-chip resources falls back to the other kernel.
        product_precision: precision of the H @ V GEMM in backward: "ieee", "tf32", "tf32x3"
            (float32 H and features) or "bf16" (both operands rounded to bfloat16, the full
            tensor-core rate; bfloat16 keeps float32's range, so small H entries survive). None
            means "ieee" for float32 inputs and "tf32" (10-bit mantissa, float32 range) for
            float16 / bfloat16.
    """

    block_m: int = 64
    block_n: int = 32
    block_c: Optional[int] = None
    block_d: Optional[int] = None
    num_warps: int = 8
    num_stages: Optional[int] = None
    resident_rows: bool = False
    dot_precision: str = "ieee"
    product_precision: Optional[str] = None
    split_forward: Optional[SplitLaunch] = None
    split_backward: Optional[SplitLaunch] = None

    def resolved(self, num_channels: int, dtype: torch.dtype) -> "TritonConfig":
        """Fill the defaults that depend on C and the dtype, and check every value."""
        if dtype not in _DTYPES:
            raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
        _check_pow2("block_m", self.block_m)
        _check_pow2("block_n", self.block_n)
        for name in ("block_c", "block_d"):
            if getattr(self, name) is not None:
                _check_pow2(name, getattr(self, name))
        if self.block_d is not None and self.block_d > MAX_BLOCK_D:
            raise ValueError(f"block_d must be at most {MAX_BLOCK_D}, got {self.block_d}")
        _check_pow2("num_warps", self.num_warps, minimum=1)
        if self.num_stages is not None and (isinstance(self.num_stages, bool)
                                            or not isinstance(self.num_stages, int)
                                            or self.num_stages < 1):
            raise ValueError(f"num_stages must be None or an int >= 1, got {self.num_stages!r}")
        if not isinstance(self.resident_rows, bool):
            raise TypeError(f"resident_rows must be a bool, got {self.resident_rows!r}")
        if self.dot_precision not in _PRECISIONS:
            raise ValueError(f"dot_precision must be one of {_PRECISIONS}, got {self.dot_precision!r}")
        if self.product_precision not in (None,) + _PRECISIONS + ("bf16",):
            raise ValueError(f"product_precision must be None or one of {_PRECISIONS + ('bf16',)}, "
                             f"got {self.product_precision!r}")
        for name in ("split_forward", "split_backward"):
            launch = getattr(self, name)
            if launch is not None:
                if not isinstance(launch, SplitLaunch):
                    raise TypeError(f"{name} must be None or a SplitLaunch, got {launch!r}")
                launch.check(name)
        c_pow2 = max(16, triton.next_power_of_2(num_channels))
        tile_bytes = self.block_m * c_pow2 * torch.finfo(dtype).bits // 8

        item = torch.finfo(dtype).bits // 8

        def split_fits(launch: Optional[SplitLaunch]) -> Optional[SplitLaunch]:
            # The row block plus the pipelined column tiles must fit the largest shared memory
            # of any GPU (227 KiB); a smaller one refuses the launch and `_launch` falls back.
            if launch is None or c_pow2 > MAX_BLOCK_D:
                return None
            tiles = launch.block_m + max(launch.num_stages or 2, 1) * launch.block_n
            if tiles * c_pow2 * item > SPLIT_MAX_SHARED_BYTES:
                return None
            return replace(launch, tma=launch.tma and (num_channels * item) % 16 == 0)

        return replace(
            self,
            split_forward=split_fits(self.split_forward),
            split_backward=split_fits(self.split_backward),
            block_c=min(self.block_c if self.block_c is not None else 64, c_pow2),
            block_d=min(self.block_d if self.block_d is not None else 128, c_pow2),
            resident_rows=self.resident_rows and tile_bytes <= RESIDENT_MAX_TILE_BYTES,
            product_precision=(self.product_precision if self.product_precision is not None
                               else ("ieee" if dtype == torch.float32 else "tf32")),
        )

    def forward_block_c(self, num_channels: int) -> int:
        """BLOCK_C of the forward kernel (of a resolved config): all channels when resident."""
        return max(16, triton.next_power_of_2(num_channels)) if self.resident_rows else self.block_c

    def launch_options(self) -> dict:
        """num_warps / num_stages keyword arguments of a kernel launch."""
        options = {"num_warps": self.num_warps}
        if self.num_stages is not None:
            options["num_stages"] = self.num_stages
        return options


def _bf16_product(dtype: torch.dtype) -> Optional[str]:
    """bfloat16 operands for the H @ V GEMM of bfloat16 inputs, whose features are already
    bfloat16 (only H is rounded, to the inputs' own 2**-9). float16 and float32 inputs keep the
    default: rounding their features to bfloat16 too would make the product the largest error of
    the gradient (measured 4e-3 relative for float16 inputs against 8e-4 with TF32)."""
    return "bf16" if dtype == torch.bfloat16 else None


def _resident_rows(dtype: torch.dtype) -> bool:
    """Resident row blocks for 16-bit inputs only. float32 inputs stream their channels: with the
    "ieee" similarity GEMM on the FMA units a resident 64 x 256 float32 block made the forward
    6.2x slower on an H200 (53.7 ms against 8.6 ms at N = 8,450, C = 256; bench/NOTES.md, v2)."""
    return dtype in (torch.float16, torch.bfloat16)


def _full_block_d(dtype: torch.dtype) -> Optional[int]:
    """MAX_BLOCK_D gradient channels per backward program for 16-bit inputs. float32 inputs keep
    the default: their "ieee" GEMMs run on the FMA units and, with 512 float32 accumulator channels
    per program, spill inside the column loop on sm_90."""
    return MAX_BLOCK_D if dtype in (torch.float16, torch.bfloat16) else None


def _resident(dtype: torch.dtype) -> TritonConfig:
    """The "resident" preset: 64 x 32 tiles over 8 warps; forward rows on chip across the column
    loop, backward programs owning up to 512 gradient channels (the similarity computed once per
    tile), bfloat16 operands for the H @ V product of bfloat16 inputs. float32 inputs: the
    streamed launch (`TritonConfig()`)."""
    return TritonConfig(block_d=_full_block_d(dtype), resident_rows=_resident_rows(dtype),
                        product_precision=_bf16_product(dtype))


def _split(dtype: torch.dtype, forward: SplitLaunch, backward: SplitLaunch) -> TritonConfig:
    """A split-loop preset for 16-bit inputs ("resident" where the split kernels do not apply
    or a device refuses them); float32 inputs keep the streamed launch."""
    if dtype not in (torch.float16, torch.bfloat16):
        return TritonConfig()
    return replace(_resident(dtype), split_forward=forward, split_backward=backward)


# Split-loop launches. Hopper (sm_90, 227 KiB): forward 128-row blocks over 8 warps, 32-column
# tiles, 3 stages (224 KiB; each warpgroup owns 64 rows, m64n32 wgmma, 8 B of column features per
# pair from L2); backward 64 x 64 tiles over 8 warps, 2 stages (200 KiB; the similarity at n32 per
# warpgroup, the product at n256). Ampere / Ada (sm_80: 163 KiB, sm_86 / sm_89: 99 KiB): 32-row
# blocks and 32-column tiles, 2 stages (96 KiB). bench/NOTES.md ("Kernel v2") gives their
# compile_report numbers and predictions.
_SPLIT_FWD = SplitLaunch(block_m=128, block_n=32, num_warps=8, num_stages=3)
_SPLIT_BWD = SplitLaunch(block_m=64, block_n=64, num_warps=8, num_stages=2)
_SPLIT_FWD_M32 = SplitLaunch(block_m=32, block_n=32, num_warps=4, num_stages=2)
_SPLIT_BWD_M32 = SplitLaunch(block_m=32, block_n=32, num_warps=8, num_stages=2)

# Launch presets, named by what they do. "resident" and "streamed" were measured on an H200
# (bench/NOTES.md, v2: resident 307 ms forward + backward at N = 131,072, C = 512, bfloat16,
# streamed 923 ms); the split ones are compiled and tested on a CPU, not yet timed on a GPU.
VARIANTS = {
    # The default (measured fastest of the v2 presets on an H200).
    "resident": _resident,
    # Both kernels stream the row block's channels in chunks of 64 and the backward owns 128
    # gradient channels per program: the least shared memory (24-36 KiB), so it fits every GPU;
    # the fallback of the others. bfloat16 operands for H @ V of bfloat16 inputs.
    "streamed": lambda dtype: TritonConfig(product_precision=_bf16_product(dtype)),
    # Split-loop kernels (negative-only, class and edge tiles in their own loop bodies, rows on
    # chip in both passes, each column tile loaded once for both backward GEMMs), for Hopper.
    "split": lambda dtype: _split(dtype, _SPLIT_FWD, _SPLIT_BWD),
    # "split" with the column tiles loaded by TMA (tensor descriptors; Hopper only).
    "split_tma": lambda dtype: _split(dtype, replace(_SPLIT_FWD, tma=True),
                                      replace(_SPLIT_BWD, tma=True)),
    # "split" with 32-row blocks and 32-column tiles: within the 99 KiB of sm_86 / sm_89 and
    # the 163 KiB of an A100 (sm_80).
    "split_m32": lambda dtype: _split(dtype, _SPLIT_FWD_M32, _SPLIT_BWD_M32),
}

# Names of earlier presets, as stored in configs and checkpoints (`cl.triton_variant`): a renamed
# one maps to its new name with a warning, a removed one fails naming its replacement.
RENAMED_VARIANTS = {"bf16prod": "streamed"}
REMOVED_VARIANTS = {
    "v1": ("streamed", "v1 is 'streamed' with a TF32 H @ V product, 1.2x slower on an H200"),
    "fulld": ("resident", "'resident' ran the same backward with a faster forward on an H200"),
    "wide": ("resident", "2.1x slower than 'resident' on an H200"),
    "resident_d256": ("split_m32", "an unmeasured candidate for A100 / RTX GPUs, replaced"),
    "resident_m32": ("split_m32", "an unmeasured candidate for A100 / RTX GPUs, replaced"),
}
_WARNED_RENAMES = set()

# The preset used when no config is given (`pixel_infonce(impl="triton")`): the fastest one a GPU
# measured (H200, 2026-11-27, N = 131,072 and 16,384, C = 512, bfloat16: 3.7x and 2.6x the first's
# forward + backward; bench/NOTES.md, v2). The split presets become the default only once a GPU
# has measured them faster. For float32 inputs it is the streamed launch.
DEFAULT_VARIANT = "resident"


def product_constexprs(cfg: TritonConfig, *, native_bf16: bool) -> dict:
    """The backward kernel's constexprs for the H @ V GEMM of a resolved config."""
    bf16 = cfg.product_precision == "bf16"
    return dict(PRODUCT_BF16=bf16, PRODUCT_PRECISION="ieee" if bf16 else cfg.product_precision,
                NATIVE_BF16=native_bf16)


def resolve_variant(name: str) -> str:
    """The current name of the launch preset `name`.

    A preset's earlier name (RENAMED_VARIANTS) maps to its new one with a warning (once per
    process); a removed preset (REMOVED_VARIANTS) or an unknown name is a ValueError that names
    what to use instead.
    """
    if name in VARIANTS:
        return name
    if name in RENAMED_VARIANTS:
        new = RENAMED_VARIANTS[name]
        if name not in _WARNED_RENAMES:
            _WARNED_RENAMES.add(name)
            warnings.warn(f"Triton launch preset {name!r} is now called {new!r}; using {new!r}",
                          FutureWarning, stacklevel=3)
        return new
    if name in REMOVED_VARIANTS:
        new, why = REMOVED_VARIANTS[name]
        raise ValueError(f"Triton launch preset {name!r} was removed ({why}); use {new!r} "
                         f"(known: {sorted(VARIANTS)})")
    raise ValueError(f"unknown variant {name!r}; known: {sorted(VARIANTS)}")


def variant_config(name: str, dtype: torch.dtype) -> TritonConfig:
    """The preset `name` of `VARIANTS` (or an earlier name of one, see `resolve_variant`) for
    inputs of `dtype` (not yet resolved for C)."""
    return VARIANTS[resolve_variant(name)](dtype)


def _smaller_config(kernel: str, cfg: TritonConfig) -> Optional[TritonConfig]:
    """The configuration to retry `kernel` ("forward" / "backward") with when a launch with the
    resolved `cfg` ran out of on-chip resources, or None when there is no smaller one."""
    if kernel == "forward" and cfg.split_forward is not None:
        return replace(cfg, split_forward=None)  # the kernel the other fields configure
    if kernel == "backward" and cfg.split_backward is not None:
        return replace(cfg, split_backward=None)
    if kernel == "forward" and cfg.resident_rows:
        return replace(cfg, resident_rows=False)  # stream the channels: "streamed"'s smem
    if kernel == "backward" and cfg.block_d > 128:
        return replace(cfg, block_d=128)  # "streamed"'s gradient channels per program
    return None


def _describe(kernel: str, cfg: TritonConfig) -> str:
    """A few words on what a resolved config runs for `kernel`, for the fallback warning."""
    if (cfg.split_forward if kernel == "forward" else cfg.split_backward) is not None:
        return "the split-loop kernel"
    if kernel == "forward":
        return "resident rows" if cfg.resident_rows else "streamed channels"
    return f"block_d={cfg.block_d}"


# (kernel, device, requested config) -> the config that launched there, once a launch fell back.
_FALLBACKS: Dict[Tuple[str, torch.device, TritonConfig], TritonConfig] = {}


def _launch(kernel: str, device: torch.device, cfg: TritonConfig,
            launch: Callable[[TritonConfig], None]) -> TritonConfig:
    """Run `launch(cfg)`, falling back to smaller configs while the device lacks the on-chip
    resources (shared memory, threads) a config needs; returns the config that ran. Triton raises
    `OutOfResources` when it loads the compiled kernel, before the launch, so nothing was written."""
    key = (kernel, device, cfg)
    current = _FALLBACKS.get(key, cfg)
    while True:
        try:
            launch(current)
            return current
        except OutOfResources as exc:
            smaller = _smaller_config(kernel, current)
            if smaller is None:
                raise
            warnings.warn(f"pixel InfoNCE {kernel} kernel: {exc} on {device}; running it with "
                          f"{_describe(kernel, smaller)} instead "
                          "(slower; see kernels/triton_infonce.py, On-chip limits)", RuntimeWarning)
            _FALLBACKS[key] = current = smaller


def _interpreter_can_run(dtype: torch.dtype) -> bool:
    """numpy has no bfloat16: the interpreter would return garbage rather than fail."""
    return dtype != torch.bfloat16


def inverse_norms(f: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """rinv = 1 / max(||f_i||, 1e-12) and proj = (||f_i|| > 1e-12), both (n,) float32.

    The norms are taken in float32 over chunks of rows, so no float32 copy of f larger than 16 MiB
    exists. proj marks the rows whose normalisation has the projection Jacobian (a row at or below
    the clamp is only scaled, like `f / norm.clamp_min(1e-12)` in torch).
    """
    n, num_channels = f.shape
    rinv = torch.empty(n, dtype=torch.float32, device=f.device)
    proj = torch.empty_like(rinv)
    rows = max(1, _NORM_CHUNK_ELEMENTS // max(num_channels, 1))
    for r0 in range(0, n, rows):
        norm = torch.linalg.vector_norm(f[r0:r0 + rows].float(), dim=1)  # (chunk,)
        rinv[r0:r0 + rows] = norm.clamp_min(NORM_EPS).reciprocal()
        proj[r0:r0 + rows] = (norm > NORM_EPS).float()
    return rinv, proj


def _on_device(launch: Optional[SplitLaunch], device: torch.device) -> Optional[SplitLaunch]:
    """`launch` as it runs on `device`: TMA needs Hopper (compute capability 9) or later; before
    it Triton would emulate the descriptor loads with slower code, so the pointer loads run."""
    if launch is None or not launch.tma or device.type != "cuda":
        return launch
    return launch if torch.cuda.get_device_capability(device)[0] >= 9 else replace(launch, tma=False)


def _column_descriptor(f: torch.Tensor, launch: SplitLaunch):
    """The tensor descriptor of f's column tiles for a TMA launch, else f itself (unused)."""
    if not launch.tma:
        return f
    from triton.tools.tensor_descriptor import TensorDescriptor

    n, num_channels = f.shape
    c_pad = max(16, triton.next_power_of_2(num_channels))
    return TensorDescriptor(f, shape=[n, num_channels], strides=[num_channels, 1],
                            block_shape=[launch.block_n, c_pad])


def split_row_blocks(layout: SortedPixels, block_m: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The row blocks of a split-loop launch: (uniform, general), two int32 block index lists.

    A block [k block_m, (k + 1) block_m) is uniform when its valid rows share one class range
    (rows are sorted, so comparing the first and the last row suffices). Each list is ordered by
    the block's column range, widest first, so that the longest programs start first; the order
    changes no result (every program writes only its own rows).
    """
    n = layout.num_rows
    first = torch.arange(0, n, block_m, device=layout.index.device)
    last = (first + block_m).clamp_max(n) - 1
    cs, ce = layout.class_start, layout.class_end
    uniform = (cs[first] == cs[last]) & (ce[first] == ce[last])
    width = (layout.group_end[last] - layout.group_start[first]).long()
    order = torch.sort(-width, stable=True).indices
    ids, uniform = (first // block_m)[order].int(), uniform[order]
    return ids[uniform].contiguous(), ids[~uniform].contiguous()


def split_sub_blocks(blocks: torch.Tensor, block_m: int, sub_m: int, n: int) -> torch.Tensor:
    """The sub_m-row blocks covering the given block_m-row blocks (int32, in their order)."""
    if sub_m == block_m or blocks.numel() == 0:
        return blocks
    ratio = block_m // sub_m
    sub = (blocks[:, None] * ratio + torch.arange(ratio, device=blocks.device, dtype=blocks.dtype))
    sub = sub.reshape(-1)
    return sub[sub * sub_m < n].contiguous()


class TritonPixelInfoNCE(torch.autograd.Function):
    """Fused normalisation, forward and backward.

    Takes the raw sorted features f (input dtype) and saves for backward f itself (no copy), u,
    and the per-row float32 rinv, proj, Neg' and Q. Backward returns df in f's dtype.
    """

    @staticmethod
    def forward(ctx, f: torch.Tensor, u: Optional[torch.Tensor], layout: SortedPixels,
                inv_tau: float, cfg: TritonConfig) -> torch.Tensor:
        n, num_channels = f.shape
        rinv, proj = inverse_norms(f)
        neg = torch.zeros(n, dtype=torch.float32, device=f.device)
        loss = torch.zeros_like(neg)
        q_stat = torch.zeros_like(neg)
        ex = layout.exclusive.to(torch.int8) if layout.exclusive is not None else None

        def launch(c: TritonConfig) -> None:
            sl = _on_device(c.split_forward, f.device)
            if sl is not None:
                for blocks, uniform in zip(split_row_blocks(layout, sl.block_m), (True, False)):
                    if blocks.numel() == 0:
                        continue
                    _split_fwd_kernel[(blocks.numel(),)](
                        f, rinv, u if u is not None else neg,
                        layout.group_start, layout.group_end, layout.class_start,
                        layout.class_end, layout.num_pos, ex if ex is not None else layout.num_pos,
                        blocks, _column_descriptor(f, sl), neg, loss, q_stat, n, inv_tau * LOG2E,
                        C=num_channels, C_PAD=max(16, triton.next_power_of_2(num_channels)),
                        UNIFORM=uniform, HAS_WEIGHT=u is not None, HAS_EXCLUSIVE=ex is not None,
                        BLOCK_M=sl.block_m, BLOCK_N=sl.block_n, DOT_PRECISION=c.dot_precision,
                        NATIVE=not INTERPRETED, TMA=sl.tma, **sl.launch_options(),
                    )
                return
            _infonce_fwd_kernel[(triton.cdiv(n, c.block_m),)](
                f, rinv, u if u is not None else neg,
                layout.group_start, layout.group_end, layout.class_start, layout.class_end,
                layout.num_pos, ex if ex is not None else layout.num_pos,
                neg, loss, q_stat,
                n, num_channels, inv_tau,
                HAS_WEIGHT=u is not None, HAS_EXCLUSIVE=ex is not None,
                RESIDENT=c.resident_rows, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
                BLOCK_C=c.forward_block_c(num_channels), DOT_PRECISION=c.dot_precision,
                **c.launch_options(),
            )

        if n > 0:
            _launch("forward", f.device, cfg, launch)
        ctx.layout, ctx.ex, ctx.inv_tau, ctx.cfg = layout, ex, inv_tau, cfg
        ctx.save_for_backward(f, u, rinv, proj, neg, q_stat)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        f, u, rinv, proj, neg, q_stat = ctx.saved_tensors
        layout, ex, cfg = ctx.layout, ctx.ex, ctx.cfg
        n, num_channels = f.shape
        need_du = u is not None and ctx.needs_input_grad[1]
        g = grad_loss.float().contiguous()  # an expanded gradient (from .sum()) has stride 0
        num_pos = layout.num_pos.float()
        a = torch.where(num_pos > 0, g / num_pos.clamp_min(1.0), 0.0)  # (n,) g_i / |P_i|
        b = negative_pair_scale(g, q_stat, neg)  # (n,) g_i Q_i / Neg'_i
        # Every element is written by the kernel (row blocks x channel blocks cover (n, C)).
        df = torch.empty_like(f)
        du = torch.zeros_like(u) if need_du else None

        def launch(c: TritonConfig) -> None:
            sl = _on_device(c.split_backward, f.device)
            if sl is not None:
                # Per-row products the kernel would otherwise form per pair (see its comment).
                br, ca = b * rinv, a * neg
                car = ca * rinv
                ur = u * rinv if u is not None else rinv
                uniform_blocks, general_blocks = split_row_blocks(layout, sl.block_m)
                # The general blocks run in sub-blocks of GENERAL_BLOCK rows (see its comment).
                gl = sl.general_backward()
                general_blocks = split_sub_blocks(general_blocks, sl.block_m, gl.block_m, n)
                for blocks, uniform, launch in ((uniform_blocks, True, sl),
                                                (general_blocks, False, gl)):
                    if blocks.numel() == 0:
                        continue
                    _split_bwd_kernel[(blocks.numel(),)](
                        f, rinv, proj, b, br, u if u is not None else rinv, ur, neg, ca, car, a,
                        layout.group_start, layout.group_end, layout.class_start,
                        layout.class_end, ex if ex is not None else layout.num_pos,
                        blocks, _column_descriptor(f, launch), df, du if du is not None else neg,
                        n, ctx.inv_tau * LOG2E, ctx.inv_tau,
                        C=num_channels, C_PAD=max(16, triton.next_power_of_2(num_channels)),
                        UNIFORM=uniform, HAS_WEIGHT=u is not None, HAS_EXCLUSIVE=ex is not None,
                        NEED_DU=need_du, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
                        DOT_PRECISION=c.dot_precision, TMA=launch.tma,
                        **product_constexprs(c, native_bf16=not INTERPRETED),
                        **launch.launch_options(),
                    )
                return
            grid = (triton.cdiv(n, c.block_m), triton.cdiv(num_channels, c.block_d))
            _infonce_bwd_kernel[grid](
                f, rinv, proj, u if u is not None else neg, a, b, neg,
                layout.group_start, layout.group_end, layout.class_start, layout.class_end,
                ex if ex is not None else layout.num_pos,
                df, du if du is not None else neg,
                n, num_channels, ctx.inv_tau,
                HAS_WEIGHT=u is not None, HAS_EXCLUSIVE=ex is not None, NEED_DU=need_du,
                BLOCK_M=c.block_m, BLOCK_N=c.block_n,
                BLOCK_C=c.block_c, BLOCK_D=c.block_d, DOT_PRECISION=c.dot_precision,
                **product_constexprs(c, native_bf16=not INTERPRETED), **c.launch_options(),
            )

        if n > 0:
            _launch("backward", f.device, cfg, launch)
        return df, du, None, None, None


def triton_pixel_infonce(
    f: torch.Tensor,
    layout: SortedPixels,
    *,
    inv_tau: float,
    pos_weight: Optional[torch.Tensor] = None,
    config: Optional[TritonConfig] = None,
) -> torch.Tensor:
    """Loss of the sorted rows with the fused Triton kernels (normalisation included).

    Args:
        f: (n, C) raw features of the sorted valid rows, float16 / bfloat16 / float32, on the
            layout's device. They are L2-normalised inside (v = f / max(||f||, 1e-12)).
        layout: the `SortedPixels` these rows come from.
        inv_tau: 1 / temperature.
        pos_weight: (n,) u of the sorted rows, or None (ones). Cast to float32.
        config: launch parameters; default the preset DEFAULT_VARIANT of `VARIANTS`.

    Returns:
        (n,) float32 loss per sorted row, differentiable w.r.t. f (gradient in f's dtype) and
        pos_weight.
    """
    if not isinstance(f, torch.Tensor) or f.dim() != 2 or f.shape[0] != layout.num_rows:
        raise ValueError(f"f must be a tensor of shape ({layout.num_rows}, C), got "
                         f"{tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}")
    if f.dtype not in _DTYPES:
        raise TypeError(f"f must be float16, bfloat16 or float32, got {f.dtype}")
    if f.device != layout.index.device:
        raise ValueError(f"f is on {f.device} but the layout is on {layout.index.device}")
    if not f.is_cuda and not INTERPRETED:
        raise ValueError("the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 on a CPU")
    if not f.is_cuda and not _interpreter_can_run(f.dtype):
        raise TypeError("bfloat16 needs a CUDA device: Triton's CPU interpreter does not support it")
    if config is not None and not isinstance(config, TritonConfig):
        raise TypeError(f"config must be a TritonConfig, got {type(config).__name__}")
    cfg = (config or variant_config(DEFAULT_VARIANT, f.dtype)).resolved(f.shape[1], f.dtype)
    u = pos_weight.float().contiguous() if pos_weight is not None else None
    return TritonPixelInfoNCE.apply(f.contiguous(), u, layout, float(inv_tau), cfg)

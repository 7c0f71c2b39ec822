"""Fused Triton kernels for the pixel InfoNCE loss (CLUDA Eq. 2): no N x N buffer, no atomics.

The rows are the valid pixels sorted by (group, label) (`kernels.layout`), so a block of rows only
visits the columns of its groups, and its positives sit in the class columns. The kernels take the
raw features f in their own dtype and fuse the L2 normalisation of DESIGN.md
(v = f / max(||f||, 1e-12)): the host keeps only the (n,) float32 inverse norms rinv, and

    c_ij = (f_i . f_j) rinv_i rinv_j            (cosine, accumulated in float32)
    t_ij = (c_ij - 1) / tau = s_ij - 1/tau,     e_ij = exp(t_ij) in [exp(-2/tau), 1]

Two kernels:

- `_infonce_fwd_kernel`, one program per BLOCK_M rows. Pass 1 sums the negatives of its rows over
  the group columns (skipping the columns that lie in the class of every row of the block: they
  hold no negative); pass 2 walks the class columns only and forms L and R from Neg.
- `_infonce_bwd_kernel`, one program per (BLOCK_M rows, BLOCK_D channels of the gradient). It
  recomputes each similarity tile, forms H = G + G^T elementwise from per-row statistics of both
  sides, accumulates dV_I += H_IJ V_J / tau and, in the epilogue, applies the normalisation's
  Jacobian, df_i = rinv_i (dv_i - v_i (v_i . dv_i)), with v_i . dv_i = sum_j H_ij c_ij / tau taken
  from the similarity tiles it already has (so a program that owns only BLOCK_D channels still
  knows it). It writes df in the input dtype: no float32 (n, C) tensor exists at any point.

Launch variants (`TritonConfig`, presets in `VARIANTS`, compared on a GPU by bench/gpu_check.sh):
tile sizes, channel chunk sizes, gradient channels per backward program (up to all C: the
similarity is then computed once per tile in backward), software-pipelining depth,
`resident_rows` (forward: the row block's features are loaded once per program and stay on chip
across the column loop) and the precision of the H @ V GEMM (TF32, or bfloat16 operands).

On-chip limits: the presets were tuned on an H200 (sm_90, 227 KiB of shared memory per program).
A launch that needs more shared memory or threads than the device has (Triton's `OutOfResources`,
raised before anything runs) is retried once with the next smaller configuration
(`_smaller_config`: forward without resident rows, backward with 128 gradient channels per
program), with a warning, and the choice is remembered per device. The default forward's resident
rows need 128.5 KiB on sm_80 to sm_89 (`python -m kernels.compile_report --arch 86`): an A100's
163 KiB holds them, the 99 KiB of sm_86 / sm_89 / sm_120 (RTX 30 / 40 / 50, A6000, L40) do not.

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


_PRECISIONS = ("ieee", "tf32", "tf32x3")
# A backward program holds a (block_m, block_d) float32 accumulator in registers: at 64 x 512 that
# is already 128 registers per thread over 8 warps.
MAX_BLOCK_D = 512


def _check_pow2(name: str, value, minimum: int = 16) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class TritonConfig:
    """Launch parameters of the kernels (issue 3 tunes them on a GPU; `VARIANTS` holds presets).

    The defaults are v1's: 64 x 32 tiles over 8 warps, channels streamed in chunks of 64 for the
    similarity and 128 gradient channels per backward program. tests/test_pixel_infonce_slow.py
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
        c_pow2 = max(16, triton.next_power_of_2(num_channels))
        tile_bytes = self.block_m * c_pow2 * torch.finfo(dtype).bits // 8
        return replace(
            self,
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


# Launch presets compared on a GPU by `bench/gpu_check.sh`; bench/NOTES.md (v2) gives each one's
# prediction and measurement. Each maps the input dtype to a config; `TritonConfig()` is "v1" and
# DEFAULT_VARIANT below names the default. Every variant but v1 takes bfloat16 operands for the
# H @ V GEMM of bfloat16 inputs.
VARIANTS = {
    # v1's launch parameters: 64 x 32 tiles, channel chunks of 64, 128 gradient channels per
    # backward program (at C = 512 four programs per row block each recompute the similarity).
    "v1": lambda dtype: TritonConfig(),
    # v1 with the bfloat16 H @ V product for bfloat16 inputs (TF32 runs at half the rate).
    "bf16prod": lambda dtype: TritonConfig(product_precision=_bf16_product(dtype)),
    # Backward owns up to 512 gradient channels per program: at C <= 512 the similarity is
    # computed once per tile in backward instead of C / 128 times.
    "fulld": lambda dtype: TritonConfig(block_d=_full_block_d(dtype),
                                        product_precision=_bf16_product(dtype)),
    # "fulld" plus a forward whose row block stays on chip across the column loop (16-bit inputs;
    # for float32 inputs the preset is v1's launch).
    "resident": lambda dtype: TritonConfig(block_d=_full_block_d(dtype),
                                           resident_rows=_resident_rows(dtype),
                                           product_precision=_bf16_product(dtype)),
    # Square 64 x 64 tiles: 1.5x the FLOPs per byte of the similarity GEMM, 128 gradient channels
    # per backward program as v1. (128 x 64 tiles spill inside the backward loop on sm_90 once
    # pos_weight and exclusive are on.)
    "wide": lambda dtype: TritonConfig(block_m=64, block_n=64,
                                       product_precision=_bf16_product(dtype)),
    # Candidates for GPUs other than the H200, not yet measured (bench/NOTES.md, "Other GPUs"):
    # compiled for sm_80 / sm_86 at C = 512 bfloat16, "resident"'s 512-channel backward spills
    # 38-39 instructions inside its loop, these two none. float32 inputs: v1's launch.
    # "resident" with 256 gradient channels per backward program (the similarity computed twice
    # per tile in backward instead of once, or four times in v1).
    "resident_d256": lambda dtype: TritonConfig(block_d=256 if _resident_rows(dtype) else None,
                                                resident_rows=_resident_rows(dtype),
                                                product_precision=_bf16_product(dtype)),
    # "resident" with 32-row programs: half the accumulators per program, and a resident forward
    # of 96.5 KiB of shared memory that fits the 99 KiB of sm_86 / sm_89 (64 rows need 128.5).
    "resident_m32": lambda dtype: TritonConfig(block_m=32 if _resident_rows(dtype) else 64,
                                               block_d=_full_block_d(dtype),
                                               resident_rows=_resident_rows(dtype),
                                               product_precision=_bf16_product(dtype)),
}


# The preset used when no config is given (`pixel_infonce(impl="triton")`): the fastest of the
# presets measured by bench/gpu_check.sh (H200, 2026-11-27, N = 131,072 and 16,384, C = 512,
# bfloat16: 3.7x and 2.6x v1's forward + backward; bench/NOTES.md, v2). For float32 inputs it is
# v1's launch.
DEFAULT_VARIANT = "resident"


def product_constexprs(cfg: TritonConfig, *, native_bf16: bool) -> dict:
    """The backward kernel's constexprs for the H @ V GEMM of a resolved config."""
    bf16 = cfg.product_precision == "bf16"
    return dict(PRODUCT_BF16=bf16, PRODUCT_PRECISION="ieee" if bf16 else cfg.product_precision,
                NATIVE_BF16=native_bf16)


def variant_config(name: str, dtype: torch.dtype) -> TritonConfig:
    """The preset `name` of `VARIANTS` for inputs of `dtype` (not yet resolved for C)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; known: {sorted(VARIANTS)}")
    return VARIANTS[name](dtype)


def _smaller_config(kernel: str, cfg: TritonConfig) -> Optional[TritonConfig]:
    """The configuration to retry `kernel` ("forward" / "backward") with when a launch with the
    resolved `cfg` ran out of on-chip resources, or None when there is no smaller one."""
    if kernel == "forward" and cfg.resident_rows:
        return replace(cfg, resident_rows=False)  # stream the channels: v1's shared memory
    if kernel == "backward" and cfg.block_d > 128:
        return replace(cfg, block_d=128)  # v1's gradient channels per program
    return None


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
                          f"{'streamed channels' if kernel == 'forward' else 'block_d=128'} instead "
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

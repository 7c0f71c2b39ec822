"""Tests of kernels.pixel_infonce (CLUDA Eq. 2): the reference against a plain double loop, the tiled
torch path and the Triton kernels (under TRITON_INTERPRET=1 on a CPU; every launch variant of
kernels.triton_infonce.VARIANTS) against the reference, the fused normalisation, edge cases, input
errors and determinism. Everything here runs on a CPU in seconds.
"""
import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch

from kernels import pixel_infonce
from kernels.functional import pixel_infonce_with_config
from kernels.layout import sort_pixels
from kernels.tiled import tiled_pixel_infonce

HAS_TRITON_CPU = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON_CPU, reason="needs CUDA or TRITON_INTERPRET=1")
# The launch presets (kernels.triton_infonce.VARIANTS), as impl strings "triton:<name>" understood
# by `evaluate` ("triton" alone is the default, "resident"). Listed here so that collecting the
# tests needs no triton import.
VARIANT_NAMES = ("resident", "streamed", "split", "split_tma", "split_m32")
# Every preset runs the streamed launch for float32 inputs (the bfloat16 product applies to
# bfloat16 inputs, which the interpreter cannot run: test_triton_bf16_product_rounds_like_bfloat16
# forces it on float32; the 512-channel backward, the resident rows and the split kernels apply
# to 16-bit inputs, run in test_triton_float16_interpreter). So `evaluate` knows three launches
# of their kernels in any dtype: "triton:resident_rows" (the streamed launch with resident_rows)
# and "triton:split_loops" / "triton:split_loops_tma" (the split kernels with 16 x 16 tiles).
FLOAT32_VARIANTS = ("triton:resident_rows", "triton:split_loops", "triton:split_loops_tma")
FLOAT16_VARIANTS = tuple(f"triton:{name}" for name in VARIANT_NAMES)


def make_inputs(n, c, num_classes, *, seed, groups=False, exclusive=False, weight=False,
                clustered=False, ignore=True):
    """Fresh random inputs: float64 feats (cast per test), labels with 255 and negative ignores."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    feats = torch.randn(n, c, generator=gen, dtype=torch.float64)
    if clustered:
        # Pull pixels towards a per-class centre so that positives are similar: exercises e_ip near 1.
        centres = torch.randn(num_classes, c, generator=gen, dtype=torch.float64)
        feats = feats * 0.5 + 2.0 * centres[labels]
    if ignore:
        drop = torch.rand(n, generator=gen)
        labels[drop < 0.08] = 255
        labels[(drop >= 0.08) & (drop < 0.12)] = -1
    kwargs = {}
    if groups:
        # Group ids independent of the labels, so that every class is split across groups and
        # sorting by (group, label) matters (int32 on purpose).
        kwargs["groups"] = torch.randint(-1, 2, (n,), generator=gen, dtype=torch.int32)
    if exclusive:
        kwargs["exclusive"] = torch.rand(n, generator=gen) < 0.4
    if weight:
        kwargs["pos_weight"] = torch.rand(n, generator=gen, dtype=torch.float64) + 0.1
    upstream = torch.randn(n, generator=gen, dtype=torch.float64)
    return feats, labels, kwargs, upstream


def evaluate(impl, feats, labels, kwargs, upstream, *, dtype, temperature, config=None):
    """Loss, feats gradient and pos_weight gradient (None without weights) of one implementation
    ("reference", "torch", "triton", "triton:<variant>" for a preset of VARIANTS,
    "triton:resident_rows" for the streamed launch with resident row blocks in any dtype, or
    "triton:split_loops" / "triton:split_loops_tma" for the split kernels in any dtype); `config`,
    a TritonConfig, replaces the one the name gives."""
    f = feats.to(dtype).clone().requires_grad_()
    kw = dict(kwargs)
    u = None
    if "pos_weight" in kw:
        u = kw["pos_weight"].to(torch.float64 if dtype == torch.float64 else torch.float32)
        u = u.clone().requires_grad_()
        kw["pos_weight"] = u
    if impl.startswith("triton:"):
        from kernels.triton_infonce import TritonConfig, variant_config

        name = impl.split(":", 1)[1]
        if config is not None:
            pass
        elif name == "resident_rows":
            config = TritonConfig(resident_rows=True)
        elif name.startswith("split_loops"):
            config = split_config(tma=name.endswith("_tma"))
        else:
            config = variant_config(name, dtype)
        loss = pixel_infonce_with_config(f, labels, temperature=temperature, config=config, **kw)
    else:
        loss = pixel_infonce(f, labels, temperature=temperature, impl=impl, **kw)
    (loss * upstream.to(loss.dtype)).sum().backward()
    return loss.detach(), f.grad, (u.grad if u is not None else None)


def assert_matches(got, ref, *, rtol, atol_scale, what, atol_floor=0.0):
    """Elementwise |got - ref| <= max(atol_scale * max|ref|, atol_floor) + rtol * |ref|."""
    ref = ref.double()
    atol = max(atol_scale * ref.abs().max().item() if ref.numel() else 0.0, atol_floor, 1e-12)
    torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# (N, C, classes, temperature, groups, exclusive, weight, clustered): N not a power of two,
# C in {1, 3, 64, 130}, 1 to 19 classes, every temperature, every option on and off.
CASES = [
    (1, 3, 1, 0.1, False, False, False, False),
    (2, 3, 1, 1.0, False, False, False, False),
    (2, 1, 2, 0.07, False, False, True, False),
    (17, 3, 2, 0.07, True, False, True, False),
    (17, 64, 3, 0.1, False, True, False, True),
    (63, 1, 4, 0.1, True, True, True, False),
    (130, 130, 1, 0.07, False, False, True, True),
    (300, 64, 19, 0.07, True, True, True, True),
    (301, 130, 7, 0.1, False, True, False, False),
    (257, 3, 19, 1.0, True, False, True, True),
    (311, 64, 5, 1.0, False, False, False, True),
    # Two classes of ~140 pixels: whole row blocks inside one class (the skipped diagonal).
    (307, 3, 2, 0.1, False, True, True, False),
]

# Tolerances against a float64 reference. A float32 dot product of unit vectors is off by about
# sqrt(C) * 6e-8 (< 1e-6 for C = 130); t = (s - 1) / tau scales that by 1 / tau (< 1.5e-5 at
# tau = 0.07), exp and log carry it over as a relative / absolute error of the same size, and the
# float32 sums over <= 300 terms add at most a few 1e-6 relative. A loss term log(e + Neg') - t is
# a difference of two numbers of size up to 2 / tau, so it carries an absolute rounding error of
# about 2 / tau * 6e-8 even when the loss itself is ~0. Hence: 1e-4 relative, plus an absolute
# floor of 1e-6 / tau (~5x the bound above). Gradients are sums of terms of both signs that can
# cancel: the same relative bound is taken against the largest entry of the reference. The shared
# normalisation backward, (dv - v (v . dv)) / |f|, cancels to ~0 for C = 1 (v = sign(f)) and leaves
# float32 rounding of about 6e-8 |dv| / |f| with |dv| = O(1 / tau): a floor of 1e-6 / (tau min|f|).
def loss_tol(tau):
    return dict(rtol=1e-4, atol_scale=1e-5, atol_floor=1e-6 / tau)


def grad_tol(tau, feats=None):
    min_norm = feats.norm(dim=1).min().item() if feats is not None and feats.numel() else 1.0
    return dict(rtol=1e-3, atol_scale=1e-4, atol_floor=1e-6 / (tau * min(min_norm, 1.0)))


def _case_id(case):
    n, c, k, tau, grp, excl, w, clu = case
    flags = "".join(ch for ch, on in zip("gewc", (grp, excl, w, clu)) if on)
    return f"N{n}-C{c}-K{k}-tau{tau}-{flags or 'plain'}"


# The cases the float32 variants run (the interpreter is slow): every option, C = 1 (padded to 16
# channels) and 64, a single pixel, and row blocks inside one class (test_triton_block_sizes adds
# resident row blocks at C = 70).
VARIANT_CASES = [CASES[i] for i in (0, 5, 7, 11)]


def _impl_param(impl, *values):
    """pytest.param of (impl, *values), skipped without Triton for the triton impls."""
    marks = [needs_triton] if impl.startswith("triton") else []
    return pytest.param(impl, *values, marks=marks,
                        id="-".join([impl] + [_case_id(v) for v in values]))


@pytest.mark.parametrize("impl, case",
                         [_impl_param(impl, case) for impl in ("torch", "triton") for case in CASES]
                         + [_impl_param(impl, case) for impl in FLOAT32_VARIANTS
                            for case in VARIANT_CASES])
def test_matches_reference(impl, case):
    n, c, k, tau, grp, excl, w, clu = case
    feats, labels, kwargs, upstream = make_inputs(n, c, k, seed=hash(case) % 2**31, groups=grp,
                                                  exclusive=excl, weight=w, clustered=clu)
    ref = evaluate("reference", feats, labels, kwargs, upstream, dtype=torch.float64, temperature=tau)
    got = evaluate(impl, feats, labels, kwargs, upstream, dtype=torch.float32, temperature=tau)
    assert got[0].dtype == torch.float32 and got[0].shape == (n,)
    assert_matches(got[0], ref[0], what="loss", **loss_tol(tau))
    assert_matches(got[1], ref[1], what="feats grad", **grad_tol(tau, feats))
    if w:
        assert_matches(got[2], ref[2], what="pos_weight grad", **grad_tol(tau))
    # The case must not be trivial: with negatives around, some loss and gradient are non-zero
    # (for C = 1, v = sign(f) and the feats gradient is identically zero).
    if n >= 17 and k > 1:
        assert ref[0].abs().max() > 1e-6
        assert ref[1].abs().max() > 1e-8 if c > 1 else ref[2].abs().max() > 1e-6


def test_reference_matches_double_loop():
    """The reference against Eq. 2 written pair by pair with Python floats (no shift, no masks)."""
    n, c, tau = 13, 4, 0.3
    feats, labels, kwargs, _ = make_inputs(n, c, 3, seed=7, groups=True, exclusive=True, weight=True)
    v = feats / feats.norm(dim=1, keepdim=True)
    lab, grp = labels.tolist(), kwargs["groups"].tolist()
    exc, u = kwargs["exclusive"].tolist(), kwargs["pos_weight"].tolist()
    s = [[sum(v[i, k].item() * v[j, k].item() for k in range(c)) / tau for j in range(n)]
         for i in range(n)]

    def valid(i):
        return lab[i] >= 0 and lab[i] != 255

    def eligible(i, j):
        return (i != j and valid(i) and valid(j) and grp[i] == grp[j]
                and not (exc[i] and exc[j]))

    expected = []
    for i in range(n):
        pos = [j for j in range(n) if eligible(i, j) and lab[j] == lab[i]]
        neg_sum = sum(math.exp(s[i][j]) for j in range(n) if eligible(i, j) and lab[j] != lab[i])
        expected.append(sum(u[p] * (math.log(math.exp(s[i][p]) + neg_sum) - s[i][p]) for p in pos)
                        / len(pos) if pos else 0.0)
    got = pixel_infonce(feats, labels, temperature=tau, impl="reference", **kwargs)
    assert sum(e != 0.0 for e in expected) >= 3  # the draw has anchors with positives
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_gradcheck_float64(impl):
    feats, labels, kwargs, _ = make_inputs(14, 5, 3, seed=11, groups=True, exclusive=True,
                                           weight=True, clustered=True)
    groups, exclusive = kwargs["groups"], kwargs["exclusive"]

    def fn(f, u):
        return pixel_infonce(f, labels, temperature=0.5, groups=groups, exclusive=exclusive,
                             pos_weight=u, impl=impl)

    f = feats.clone().requires_grad_()
    u = kwargs["pos_weight"].clone().requires_grad_()
    assert torch.autograd.gradcheck(fn, (f, u), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_tiled_small_blocks():
    """The tiled Function itself, with row blocks that cut through classes and groups."""
    feats, labels, kwargs, _ = make_inputs(23, 4, 3, seed=5, groups=True, exclusive=True,
                                           weight=True)
    layout = sort_pixels(labels, groups=kwargs["groups"], exclusive=kwargs["exclusive"])
    v = torch.nn.functional.normalize(feats[layout.index], dim=1).requires_grad_()
    u = kwargs["pos_weight"][layout.index].clone().requires_grad_()

    def fn(v_, u_):
        return tiled_pixel_infonce(v_, layout, inv_tau=3.0, pos_weight=u_, block_rows=4)

    assert torch.autograd.gradcheck(fn, (v, u), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("block_rows", [1, 7, 64])
def test_tiled_block_size_does_not_change_result(block_rows):
    feats, labels, kwargs, upstream = make_inputs(150, 8, 6, seed=3, groups=True, exclusive=True,
                                                  weight=True)
    layout = sort_pixels(labels, groups=kwargs["groups"], exclusive=kwargs["exclusive"])
    v = torch.nn.functional.normalize(feats[layout.index].float(), dim=1)
    u = kwargs["pos_weight"][layout.index].float()
    outs = []
    for rows in (block_rows, 1000):
        v_, u_ = v.clone().requires_grad_(), u.clone().requires_grad_()
        loss = tiled_pixel_infonce(v_, layout, inv_tau=10.0, pos_weight=u_, block_rows=rows)
        (loss * upstream[layout.index].float()).sum().backward()
        outs.append((loss.detach(), v_.grad, u_.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("blocks, resident, classes", [
    ((16, 16, 16, 16), False, 5), ((16, 32, 16, 64), False, 2), ((32, 64, 16, 32), False, 5),
    # Resident rows: the forward keeps all 70 channels (padded to 128) of its rows on chip and
    # does one GEMM per tile; backward (block_d = 128 >= C) runs one program per row block.
    ((16, 32, None, None), True, 2), ((32, 16, None, None), True, 5)])
def test_triton_block_sizes(blocks, resident, classes):
    """Small tiles: many row blocks, several channel chunks and gradient channel programs; with two
    classes, row blocks that lie inside one class (pass 1 skips their class columns). The Triton
    Function takes the raw sorted features and normalises them itself; the tiled path gets the
    normalisation from torch autograd."""
    from kernels.triton_infonce import TritonConfig, triton_pixel_infonce

    bm, bn, bc, bd = blocks
    feats, labels, kwargs, upstream = make_inputs(201, 70, classes, seed=13, groups=True,
                                                  exclusive=True, weight=True, clustered=True)
    layout = sort_pixels(labels, groups=kwargs["groups"], exclusive=kwargs["exclusive"])
    f = feats[layout.index]
    u = kwargs["pos_weight"][layout.index]
    g = upstream[layout.index]
    ref_f, ref_u = f.clone().requires_grad_(), u.clone().requires_grad_()
    ref = tiled_pixel_infonce(torch.nn.functional.normalize(ref_f, dim=1), layout, inv_tau=10.0,
                              pos_weight=ref_u)
    (ref * g).sum().backward()
    f32, u32 = f.float().requires_grad_(), u.float().requires_grad_()
    cfg = TritonConfig(block_m=bm, block_n=bn, block_c=bc, block_d=bd, resident_rows=resident)
    assert cfg.resolved(70, torch.float32).resident_rows == resident
    loss = triton_pixel_infonce(f32, layout, inv_tau=10.0, pos_weight=u32, config=cfg)
    (loss * g.float()).sum().backward()
    assert_matches(loss, ref, what="loss", **loss_tol(0.1))
    assert_matches(f32.grad, ref_f.grad, what="f grad", **grad_tol(0.1, feats))
    assert_matches(u32.grad, ref_u.grad, what="u grad", **grad_tol(0.1))


@needs_triton
def test_variant_picks_the_triton_preset_and_is_ignored_elsewhere():
    """pixel_infonce(..., variant=name) runs the preset `name` (the same numbers as
    pixel_infonce_with_config with it); the torch and reference paths ignore it; an unknown name
    fails with the known ones."""
    from kernels.triton_infonce import variant_config

    feats, labels, kwargs, upstream = make_inputs(90, 40, 3, seed=21, weight=True)
    f = feats.half()  # float16: the presets differ for 16-bit inputs
    u = kwargs["pos_weight"].float()
    want = pixel_infonce_with_config(f, labels, temperature=0.1, pos_weight=u,
                                     config=variant_config("split", torch.float16))
    got = pixel_infonce(f, labels, temperature=0.1, pos_weight=u, impl="triton", variant="split")
    assert torch.equal(got, want)
    default = pixel_infonce(f, labels, temperature=0.1, pos_weight=u, impl="triton")
    assert not torch.equal(default, want)  # the split kernels sum in another order
    torch.testing.assert_close(default, want)
    torch_path = pixel_infonce(f, labels, temperature=0.1, pos_weight=u, impl="torch")
    assert torch.equal(torch_path, pixel_infonce(f, labels, temperature=0.1, pos_weight=u,
                                                 impl="torch", variant="no such preset"))
    with pytest.raises(ValueError, match=r"unknown variant 'fastest'; known: \['resident'"):
        pixel_infonce(f, labels, temperature=0.1, impl="triton", variant="fastest")
    with pytest.raises(TypeError, match="variant must be None or a preset name"):
        pixel_infonce(f, labels, temperature=0.1, impl="torch", variant=3)


def _sorted_triton_run(n, c, num_classes, *, seed):
    """`run(config)` -> (loss, d feats, d pos_weight) of the Triton op on fixed class-sorted inputs
    (tau 0.1, with pixel weights and an upstream gradient), for comparing launch configs."""
    from kernels import triton_infonce as ti

    feats, labels, kwargs, upstream = make_inputs(n, c, num_classes, seed=seed, weight=True)
    layout = sort_pixels(labels)
    f, u = feats[layout.index].float(), kwargs["pos_weight"][layout.index].float()
    g = upstream[layout.index].float()

    def run(config):
        f1, u1 = f.clone().requires_grad_(), u.clone().requires_grad_()
        loss = ti.triton_pixel_infonce(f1, layout, inv_tau=10.0, pos_weight=u1, config=config)
        (loss * g).sum().backward()
        return loss.detach(), f1.grad, u1.grad
    return run


@needs_triton
def test_triton_launch_falls_back_when_the_device_lacks_shared_memory(monkeypatch):
    """A launch Triton refuses for lack of on-chip resources (the default forward's resident rows
    need 128.5 KiB of shared memory on sm_86 / sm_89, which have 99 KiB) is retried with streamed
    channels (forward) and 128 gradient channels per program (backward), with a warning: the
    result is that of the smaller config, and later calls go straight to it."""
    from triton.runtime.errors import OutOfResources

    from kernels import triton_infonce as ti

    class Refusing:  # the kernel, refusing the launches a smaller GPU could not load
        def __init__(self, kernel, too_large):
            self.kernel, self.too_large, self.refused, self.ran = kernel, too_large, 0, []

        def __getitem__(self, grid):
            def launch(*args, **kw):
                if self.too_large(kw):
                    self.refused += 1
                    raise OutOfResources(131584, 101376, "shared memory")
                self.ran.append(kw)
                return self.kernel[grid](*args, **kw)
            return launch

    run = _sorted_triton_run(150, 130, 4, seed=5)

    large = ti.TritonConfig(block_m=32, block_n=16, block_d=256, resident_rows=True)
    assert large.resolved(130, torch.float32).resident_rows
    want = run(ti.TritonConfig(block_m=32, block_n=16, block_d=128))
    monkeypatch.setattr(ti, "_FALLBACKS", {})
    fwd = Refusing(ti._infonce_fwd_kernel, lambda kw: kw["RESIDENT"])
    bwd = Refusing(ti._infonce_bwd_kernel, lambda kw: kw["BLOCK_D"] > 128)
    monkeypatch.setattr(ti, "_infonce_fwd_kernel", fwd)
    monkeypatch.setattr(ti, "_infonce_bwd_kernel", bwd)
    with pytest.warns(RuntimeWarning, match="out of resource: shared memory") as caught:
        got = run(large)
    assert len(caught) == 2  # one per kernel
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    assert (fwd.refused, bwd.refused) == (1, 1)
    assert not fwd.ran[-1]["RESIDENT"] and bwd.ran[-1]["BLOCK_D"] == 128
    run(large)  # remembered for this device: no second refusal
    assert (fwd.refused, bwd.refused) == (1, 1) and len(fwd.ran) == len(bwd.ran) == 2
    # Nothing smaller left to try: the error reaches the caller.
    bwd.too_large = lambda kw: True
    with pytest.raises(OutOfResources):
        run(large)


@pytest.mark.parametrize("impl", [_impl_param(impl) for impl in ("triton",) + FLOAT16_VARIANTS])
def test_triton_float16_interpreter(impl):
    """float16 inputs: f is rounded to float16 (2**-11 relative), so s moves by ~1e-3 and
    t = (s - 1) / tau by ~1e-2 at tau = 0.1; the loss (an average of log terms) moves by that much.
    The gradient is written in float16 (2**-11 per entry)."""
    feats, labels, kwargs, upstream = make_inputs(150, 32, 4, seed=17, weight=True)
    ref = evaluate("reference", feats, labels, kwargs, upstream, dtype=torch.float64, temperature=0.1)
    got = evaluate(impl, feats, labels, kwargs, upstream, dtype=torch.float16, temperature=0.1)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float16
    assert_matches(got[0], ref[0], rtol=0.0, atol_scale=3e-3, what="loss")
    rel = (got[1].double() - ref[1]).norm() / ref[1].norm()
    assert rel < 3e-2, f"float16 feats grad relative error {rel:.3g}"
    rel_u = (got[2].double() - ref[2]).norm() / ref[2].norm()
    assert rel_u < 3e-2, f"float16 pos_weight grad relative error {rel_u:.3g}"


@needs_triton
def test_triton_bf16_product_rounds_like_bfloat16():
    """The H @ V product with bfloat16 operands (forced for float32 inputs here) moves the gradient
    by about bfloat16's rounding and no more: more than the float32 product (it does round), less
    than 1 % in relative norm. The loss does not depend on it."""
    from kernels.triton_infonce import TritonConfig

    feats, labels, kwargs, upstream = make_inputs(260, 48, 5, seed=23, groups=True, weight=True,
                                                  clustered=True)
    ref = evaluate("reference", feats, labels, kwargs, upstream, dtype=torch.float64, temperature=0.1)
    outs = {}
    for precision in ("ieee", "bf16"):
        f = feats.float().requires_grad_()
        loss = pixel_infonce_with_config(f, labels, temperature=0.1, **kwargs,
                                         config=TritonConfig(product_precision=precision))
        (loss * upstream.float()).sum().backward()
        outs[precision] = (loss.detach(), f.grad)
    torch.testing.assert_close(outs["bf16"][0], outs["ieee"][0], rtol=0, atol=0)
    rel = {k: ((g.double() - ref[1]).norm() / ref[1].norm()).item() for k, (_, g) in outs.items()}
    assert rel["ieee"] < 1e-4 and 1e-5 < rel["bf16"] < 1e-2, rel


@needs_triton
@pytest.mark.parametrize("impl", ["triton", "triton:resident_rows"])
def test_triton_normalisation_clamp_and_scale(impl):
    """The fused normalisation against torch's `f / max(||f||, 1e-12)`: rows of very different
    norms (1e-3 to 1e3), an all-zero row, and rows below the clamp (norm ~1e-14: only scaled by
    1e12, no projection in backward) give the same loss and gradient as the tiled torch path."""
    feats, labels, _, upstream = make_inputs(120, 9, 3, seed=29, clustered=True)
    gen = torch.Generator().manual_seed(30)
    scale = 10.0 ** (6 * torch.rand(120, 1, generator=gen, dtype=torch.float64) - 3)
    feats = feats * scale
    feats[5] = 0.0
    feats[[7, 11, 40]] *= 1e-14 / feats[[7, 11, 40]].norm(dim=1, keepdim=True)
    labels[[0, 5, 7, 11, 40]] = 1  # valid anchors / partners, all in one class
    ref = evaluate("torch", feats, labels, {}, upstream, dtype=torch.float32, temperature=0.5)
    got = evaluate(impl, feats, labels, {}, upstream, dtype=torch.float32, temperature=0.5)
    assert_matches(got[0], ref[0], what="loss", **loss_tol(0.5))
    # Gradients of rows with norm 1e-14 are ~1e14 x those of unit rows: compare row by row,
    # relative to each row's size.
    row_err = (got[1] - ref[1]).double().norm(dim=1) / ref[1].double().norm(dim=1).clamp_min(1e-30)
    assert row_err.max() < 1e-4, row_err.max()
    assert ref[1][[7, 11, 40]].abs().max() > 1e8  # the clamped rows do get the 1e12 scaling


@needs_triton
def test_triton_config_resolution_and_errors():
    from kernels.triton_infonce import DEFAULT_VARIANT, VARIANTS, TritonConfig, variant_config

    assert set(VARIANT_NAMES) == set(VARIANTS) and DEFAULT_VARIANT == "resident"
    assert variant_config("streamed", torch.float16) == TritonConfig()
    cfg = TritonConfig().resolved(70, torch.float32)
    assert (cfg.block_c, cfg.block_d, cfg.product_precision) == (64, 128, "ieee")
    cfg = TritonConfig(block_c=64, block_d=512).resolved(3, torch.float16)  # capped at 16 channels
    assert (cfg.block_c, cfg.block_d, cfg.product_precision) == (16, 16, "tf32")
    cfg = TritonConfig(resident_rows=True).resolved(500, torch.bfloat16)
    assert cfg.resident_rows and cfg.forward_block_c(500) == 512 and cfg.block_c == 64
    # Too wide to stay resident: 64 x 1024 x 2 bytes > 64 KiB; float32 at C = 512 too.
    for c, dtype in ((768, torch.bfloat16), (512, torch.float32)):
        cfg = TritonConfig(resident_rows=True).resolved(c, dtype)
        assert not cfg.resident_rows and cfg.forward_block_c(c) == 64
    full = variant_config("resident", torch.bfloat16).resolved(512, torch.bfloat16)
    assert full.block_d == 512 and full.product_precision == "bf16" and full.resident_rows
    assert full.split_forward is None and full.split_backward is None
    assert variant_config("streamed", torch.bfloat16).resolved(512, torch.bfloat16).block_d == 128
    for name in VARIANT_NAMES:
        assert variant_config(name, torch.float32) == TritonConfig()  # float32: streamed launch
    assert variant_config("resident", torch.float16).resolved(256, torch.float16).resident_rows
    assert TritonConfig(num_stages=2).launch_options() == {"num_warps": 8, "num_stages": 2}
    for bad, error in ((dict(block_m=48), ValueError), (dict(block_d=8), ValueError),
                       (dict(block_d=1024), ValueError), (dict(num_warps=3), ValueError),
                       (dict(num_stages=0), ValueError), (dict(product_precision="fp8"), ValueError),
                       (dict(dot_precision="bf16"), ValueError), (dict(resident_rows=1), TypeError)):
        with pytest.raises(error):
            TritonConfig(**bad).resolved(64, torch.float32)
    with pytest.raises(ValueError, match="unknown variant"):
        variant_config("fastest", torch.float32)
    with pytest.raises(TypeError, match="config"):
        pixel_infonce_with_config(torch.randn(10, 4), torch.randint(0, 3, (10,)),
                                  temperature=0.1, config={"block_m": 64})


# ---- split-loop kernels ----------------------------------------------------------------------
#
# The split-loop kernels ("split" presets) run separate loop bodies for negative-only tiles, class
# tiles and edge tiles of the row blocks that lie in one class ("uniform"), and a masked body for
# the others. Small blocks (16 rows, 16 columns) and two or three large classes give every kind
# of tile at N ~ 200; tile_kinds below counts them from the layout with the kernels' own tiling,
# so a test whose input stopped covering one would say so.


def split_config(*, tma=False, block_m=16, block_n=16):
    """A config that runs both passes with the split-loop kernels in any dtype (the presets keep
    them for 16-bit inputs, which the interpreter cannot run in bfloat16)."""
    from kernels.triton_infonce import SplitLaunch, TritonConfig

    launch = SplitLaunch(block_m=block_m, block_n=block_n, num_warps=4, num_stages=2, tma=tma)
    return TritonConfig(split_forward=launch, split_backward=launch)


def tile_kinds(layout, block_m, block_n):
    """Counts of the tiles the split kernels visit, by kind, summed over the row blocks."""
    from kernels.triton_infonce import split_row_blocks

    uniform, general = split_row_blocks(layout, block_m)
    n = layout.num_rows
    kinds = dict(general_blocks=general.numel(), uniform_blocks=uniform.numel(), neg_full=0,
                 neg_edge=0, class_full=0, class_diagonal=0, class_edge=0)
    for blk in uniform.tolist():
        r0, r_end = blk * block_m, min(blk * block_m + block_m, n)
        gs, ge, cs, ce = (int(x[r0]) for x in (layout.group_start, layout.group_end,
                                               layout.class_start, layout.class_end))
        for lo, hi in ((gs, cs), (ce, ge)):
            kinds["neg_full"] += (hi - lo) // block_n
            kinds["neg_edge"] += (hi - lo) % block_n > 0
        for n0 in range(cs, ce, block_n):
            if n0 < r_end and n0 + block_n > r0:
                kinds["class_diagonal"] += 1
            elif n0 + block_n > ce:
                kinds["class_edge"] += 1
            else:
                kinds["class_full"] += 1
    return kinds


# (N, C, classes, seed, groups, exclusive, weight, tma, block_m, block_n): C = 20 (padded to 32)
# and 16, N not a multiple of the block, two or three large classes (uniform blocks with every
# tile kind) and groups across them (general blocks at every class and group edge); 64-row blocks
# run their general blocks as 32-row sub-blocks (SplitLaunch.general_backward).
SPLIT_CASES = [
    (203, 20, 2, 41, False, False, False, False, 16, 16),
    (230, 16, 3, 42, True, True, True, False, 16, 16),
    (230, 16, 3, 42, True, True, True, True, 16, 16),
    (181, 20, 3, 43, True, False, True, True, 16, 16),
    (301, 16, 2, 46, True, True, True, False, 64, 32),
]


@needs_triton
@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: f"N{c[0]}-C{c[1]}-K{c[2]}-seed{c[3]}"
                         + ("-tma" if c[7] else "") + f"-{c[8]}x{c[9]}")
def test_split_kernels_match_reference(case):
    """Every tile kind of the split kernels against the float64 reference: values, feature and
    pos_weight gradients, random upstream gradient; with groups, exclusive pairs, weights and
    tensor-descriptor (TMA) column loads."""
    n, c, k, seed, grp, excl, w, tma, bm, bn = case
    feats, labels, kwargs, upstream = make_inputs(n, c, k, seed=seed, groups=grp, exclusive=excl,
                                                  weight=w, clustered=True)
    if grp:
        kwargs["groups"] = (torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.2).int()
    layout = sort_pixels(labels, groups=kwargs.get("groups"), exclusive=kwargs.get("exclusive"))
    kinds = tile_kinds(layout, bm, bn)
    assert all(v > 0 for v in kinds.values()), kinds  # every loop body runs
    ref = evaluate("reference", feats, labels, kwargs, upstream, dtype=torch.float64, temperature=0.1)
    got = evaluate("triton:split_loops", feats, labels, kwargs, upstream, dtype=torch.float32,
                   temperature=0.1, config=split_config(tma=tma, block_m=bm, block_n=bn))
    assert_matches(got[0], ref[0], what="loss", **loss_tol(0.1))
    assert_matches(got[1], ref[1], what="feats grad", **grad_tol(0.1, feats))
    if w:
        assert_matches(got[2], ref[2], what="pos_weight grad", **grad_tol(0.1))


@needs_triton
def test_split_kernels_deterministic_and_block_order():
    """Bitwise equal results over two runs, and the same bits whatever order the row blocks are
    launched in (each program writes only its own rows)."""
    from kernels import triton_infonce as ti

    feats, labels, kwargs, upstream = make_inputs(150, 16, 3, seed=44, groups=True, exclusive=True,
                                                  weight=True, clustered=True)
    runs = [evaluate("triton:split_loops", feats, labels, kwargs, upstream, dtype=torch.float32,
                     temperature=0.1) for _ in range(2)]
    real = ti.split_row_blocks
    try:
        ti.split_row_blocks = lambda layout, bm: tuple(x.flip(0) for x in real(layout, bm))
        runs.append(evaluate("triton:split_loops", feats, labels, kwargs, upstream,
                             dtype=torch.float32, temperature=0.1))
    finally:
        ti.split_row_blocks = real
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


def test_split_row_blocks_classify_and_order():
    from kernels.triton_infonce import split_row_blocks

    # Classes of 40, 5 and 30 rows in group 0, then 25 rows of one class in group 1.
    labels = torch.tensor([0] * 40 + [1] * 5 + [2] * 30 + [0] * 25)
    groups = torch.tensor([0] * 75 + [1] * 25)
    layout = sort_pixels(labels, groups=groups)
    uniform, general = split_row_blocks(layout, 16)
    # Blocks of 16 rows: [0,16) [16,32) uniform (class 0); [32,48) straddles 0|1|2; [48,64)
    # uniform (class 2); [64,80) straddles class 2 | group 1; [80,96) [96,100) uniform (group 1).
    assert sorted(uniform.tolist()) == [0, 1, 3, 5, 6] and sorted(general.tolist()) == [2, 4]
    assert uniform.dtype == general.dtype == torch.int32
    assert uniform.tolist()[:3] == [0, 1, 3]  # widest column range (group 0: 75) first


@needs_triton
def test_split_falls_back_to_the_resident_kernels_when_refused(monkeypatch):
    """A device that refuses the split kernels' shared memory runs the kernels the rest of the
    config describes, with a warning, and gets their result."""
    from triton.runtime.errors import OutOfResources

    from kernels import triton_infonce as ti

    run = _sorted_triton_run(120, 24, 3, seed=45)

    base = ti.TritonConfig(block_m=32, block_n=16, block_d=128)
    want = run(base)
    monkeypatch.setattr(ti, "_FALLBACKS", {})

    def refuse(*args, **kwargs):
        raise OutOfResources(229376, 101376, "shared memory")

    class Refused:
        def __getitem__(self, grid):
            return refuse

    monkeypatch.setattr(ti, "_split_fwd_kernel", Refused())
    monkeypatch.setattr(ti, "_split_bwd_kernel", Refused())
    launch = ti.SplitLaunch(block_m=16, block_n=16)
    with pytest.warns(RuntimeWarning, match="out of resource: shared memory") as caught:
        got = run(dataclasses.replace(base, split_forward=launch, split_backward=launch))
    assert len(caught) == 2
    for x, y in zip(got, want):
        assert torch.equal(x, y)


@needs_triton
def test_split_presets_resolve():
    """The split presets use the split kernels for 16-bit inputs at C <= 512 (TMA where rows are
    16-byte multiples), "resident" beyond (C = 768) and the streamed launch for float32."""
    from kernels.triton_infonce import TritonConfig, variant_config

    for name in ("split", "split_tma", "split_m32"):
        assert variant_config(name, torch.float32) == TritonConfig()
        cfg = variant_config(name, torch.bfloat16).resolved(512, torch.bfloat16)
        assert cfg.split_forward is not None and cfg.split_backward is not None
        assert cfg.split_forward.tma == cfg.split_backward.tma == (name == "split_tma")
        wide = variant_config(name, torch.bfloat16).resolved(768, torch.bfloat16)
        assert wide.split_forward is None and wide.split_backward is None and wide.resident_rows is False
        assert wide == variant_config("resident", torch.bfloat16).resolved(768, torch.bfloat16)
    odd = variant_config("split_tma", torch.float16).resolved(100, torch.float16)  # 200 B rows
    assert odd.split_forward is not None and not odd.split_forward.tma
    hopper = variant_config("split", torch.bfloat16).resolved(512, torch.bfloat16)
    assert (hopper.split_forward.block_m, hopper.split_forward.block_n) == (128, 32)
    assert (hopper.split_backward.block_m, hopper.split_backward.block_n) == (64, 64)
    # A launch whose tiles cannot fit any GPU's shared memory is not split.
    from kernels.triton_infonce import SplitLaunch

    big = TritonConfig(split_forward=SplitLaunch(block_m=128, block_n=64, num_stages=3))
    assert big.resolved(512, torch.bfloat16).split_forward is None
    with pytest.raises(ValueError, match="split_backward.block_n"):
        TritonConfig(split_backward=SplitLaunch(block_n=24)).resolved(64, torch.float32)
    with pytest.raises(TypeError, match="split_forward must be None or a SplitLaunch"):
        TritonConfig(split_forward=(64, 64)).resolved(64, torch.float32)


def test_earlier_preset_names_map_or_fail_clearly():
    """Names stored in configs and checkpoints by earlier versions: a renamed preset maps to its
    new name with one warning, a removed one fails naming its replacement."""
    pytest.importorskip("triton")
    from kernels import triton_infonce as ti

    ti._WARNED_RENAMES.discard("bf16prod")
    with pytest.warns(FutureWarning, match="'bf16prod' is now called 'streamed'"):
        assert ti.resolve_variant("bf16prod") == "streamed"
    assert ti.variant_config("bf16prod", torch.bfloat16) == ti.variant_config("streamed",
                                                                              torch.bfloat16)
    for old, new in (("v1", "streamed"), ("fulld", "resident"), ("wide", "resident"),
                     ("resident_d256", "split_m32"), ("resident_m32", "split_m32")):
        with pytest.raises(ValueError, match=rf"preset '{old}' was removed .*; use '{new}'"):
            ti.variant_config(old, torch.bfloat16)
    with pytest.raises(ValueError, match=r"unknown variant 'fastest'; known: \['resident'"):
        ti.resolve_variant("fastest")


def test_earlier_preset_name_in_a_stored_config():
    """cl.triton_variant of a config written by an earlier version: 'bf16prod' still loads (and
    runs 'streamed'), 'wide' is refused with the replacement named."""
    pytest.importorskip("triton")
    from cluda.config import ConfigError
    from cluda.config import load_experiment

    cfg = load_experiment(None, ["--cl.triton_variant=bf16prod"])
    assert cfg.cl.triton_variant == "bf16prod"
    with pytest.raises(ConfigError, match=r"cl\.triton_variant .*'wide' was removed.*use 'resident'"):
        load_experiment(None, ["--cl.triton_variant=wide"])


# ---- small temperatures -------------------------------------------------------------------------
#
# Every path works with e = exp(s - 1/tau) = exp((cos - 1) / tau), which float32 represents down to
# exp(-87.3) (FLT_MIN; a GPU's exp flushes what lies below). A pair whose (1 - cos) / tau exceeds
# ~87 therefore has e = 0 in float32: at tau >= 2 / 87.3 (about 0.023) no pair of unit vectors does,
# for post-ReLU features (cos >= 0) at tau >= 1 / 87.3 (about 0.0115). Below that the results stay
# finite, and they still match the float64 reference where the pairs that matter are representable.


def concentrated_inputs(n, c, k, tau, *, seed, reach=40.0, far=0):
    """Inputs whose pairs all lie within (1 - cos) / tau <= ~reach of each other (float32 represents
    every e), plus `far` pixels pointing the other way ((1 - cos) / tau ~ 2 / tau: e underflows) that
    are anchors with positives but get no upstream gradient. Groups, exclusive and weights on.

    Returns feats (float64), labels, kwargs, upstream (0 on the far pixels), the far mask and the
    largest (1 - cos) / tau among the other pixels."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=gen)
    d = torch.randn(c, generator=gen, dtype=torch.float64)
    d /= d.norm()
    centres = torch.randn(k, c, generator=gen, dtype=torch.float64)
    x = centres[labels] + 0.5 * torch.randn(n, c, generator=gen, dtype=torch.float64)
    x -= (x @ d)[:, None] * d[None, :]  # tangent to the sphere at d

    def spread(scale):
        v = torch.nn.functional.normalize(d[None, :] + scale * x, dim=1)
        return ((1 - v @ v.t()) / tau).max().item()

    scale = math.sqrt(tau)
    for _ in range(3):  # 1 - cos grows about quadratically with the scale
        scale *= math.sqrt(reach / spread(scale))
    widest = spread(scale)
    norms = 0.5 + 1.5 * torch.rand(n, 1, generator=gen, dtype=torch.float64)
    feats = (d[None, :] + scale * x) * norms
    is_far = torch.zeros(n, dtype=torch.bool)
    is_far[torch.randperm(n, generator=gen)[:far]] = True
    # Away from d and from each other: (1 - cos) / tau >= ~0.8 / tau for every pair of theirs.
    feats[is_far] = -0.5 * d[None, :] + torch.randn(far, c, generator=gen, dtype=torch.float64)
    labels[torch.rand(n, generator=gen) < 0.05] = 255
    labels[is_far] = labels[~is_far][: far]  # classes of the near pixels: the far ones have positives
    kwargs = dict(groups=torch.randint(0, 2, (n,), generator=gen),
                  exclusive=torch.rand(n, generator=gen) < 0.3,
                  pos_weight=torch.rand(n, generator=gen, dtype=torch.float64) + 0.1)
    upstream = torch.randn(n, generator=gen, dtype=torch.float64)
    upstream[is_far] = 0.0
    return feats, labels, kwargs, upstream, is_far, widest


@pytest.mark.parametrize("tau", [0.005, 0.002, 0.001])
@pytest.mark.parametrize("impl", [_impl_param(impl) for impl in ("torch", "triton")])
def test_small_temperature_matches_reference(impl, tau):
    """tau far below the range where every pair is representable, on pixels that are: values and
    gradients match the float64 reference. The far pixels' own pairs underflow (their e and the
    denominators of their own loss are 0 in float32); with no upstream gradient on them, the
    reference's gradient does not depend on them either, and before the fix their denominators
    (clamped at FLT_MIN) made R' overflow and every gradient NaN (0 * inf)."""
    feats, labels, kwargs, upstream, is_far, widest = concentrated_inputs(
        150, 16, 5, tau, seed=int(1 / tau), far=4)
    v = torch.nn.functional.normalize(feats, dim=1)
    far_reach = ((1 - v[is_far] @ v.t()) / tau).masked_fill(torch.eye(150)[is_far].bool(), 1e9)
    assert 20 < widest < 80 and far_reach.min() > 110  # near pixels representable, far ones not
    ref = evaluate("reference", feats, labels, kwargs, upstream, dtype=torch.float64, temperature=tau)
    got = evaluate(impl, feats, labels, kwargs, upstream, dtype=torch.float32, temperature=tau)
    for x in got:
        assert torch.isfinite(x).all()
    assert_matches(got[0][~is_far], ref[0][~is_far], what="loss", **loss_tol(tau))
    assert_matches(got[1], ref[1], what="feats grad", **grad_tol(tau, feats))
    assert_matches(got[2], ref[2], what="pos_weight grad", **grad_tol(tau))
    assert ref[1].abs().max() > 1e-3 / tau and ref[0][~is_far].abs().max() > 0.1  # not trivial


def simplex_inputs(num_groups, c, *, seed):
    """Groups of three pixels at 120 degrees from each other (cos = -1/2 for every pair), labels
    (0, 0, 1): each anchor's every partner is at (1 - cos) / tau = 1.5 / tau, so every e is
    exp(-1.5 / tau) and an anchor's loss is u_p log(2) whatever tau (one positive p and one negative
    of equal similarity)."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(num_groups, c, 2, generator=gen, dtype=torch.float64))[0]
    angles = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3], dtype=torch.float64)
    plane = torch.stack([angles.cos(), angles.sin()], 1)  # (3, 2)
    feats = torch.einsum("kd,gcd->gkc", plane, basis).reshape(-1, c)
    feats = feats * (0.5 + torch.rand(feats.shape[0], 1, generator=gen, dtype=torch.float64))
    labels = torch.tensor([0, 0, 1]).repeat(num_groups)
    groups = torch.arange(num_groups).repeat_interleave(3)
    weights = torch.rand(feats.shape[0], generator=gen, dtype=torch.float64) + 0.1
    upstream = torch.randn(feats.shape[0], generator=gen, dtype=torch.float64)
    return feats, labels, dict(groups=groups, pos_weight=weights), upstream


@pytest.mark.parametrize("impl", [_impl_param(impl) for impl in ("torch", "triton")])
def test_temperature_bound_edge_of_float32(impl):
    """Every e at the edge of float32's normal range: (1 - cos) / tau = 85 (e = 1.2e-37, FLT_MIN is
    1.18e-38) still matches the float64 reference. At 110 every e underflows to 0: each anchor's
    loss becomes u_p (log(FLT_MIN) - t_ip) = u_p (110 - 87.3) (the denominators' clamp, as in the
    float32 reference) instead of u_p log(2), and the gradient is 0; both stay finite."""
    feats, labels, kwargs, upstream = simplex_inputs(20, 12, seed=79)
    tau = 1.5 / 85
    ref = evaluate("reference", feats, labels, kwargs, upstream, dtype=torch.float64, temperature=tau)
    got = evaluate(impl, feats, labels, kwargs, upstream, dtype=torch.float32, temperature=tau)
    anchors = labels == 0
    u_partner = kwargs["pos_weight"].view(-1, 3)[:, [1, 0]].reshape(-1)  # (40,) u_p of each anchor
    torch.testing.assert_close(ref[0][anchors], u_partner * math.log(2))
    assert_matches(got[0], ref[0], what="loss", **loss_tol(tau))
    assert_matches(got[1], ref[1], what="feats grad", **grad_tol(tau, feats))
    assert_matches(got[2], ref[2], what="pos_weight grad", **grad_tol(tau))
    assert ref[1].abs().max() > 1.0

    tau = 1.5 / 110
    got = evaluate(impl, feats, labels, kwargs, upstream, dtype=torch.float32, temperature=tau)
    clamped = u_partner * (110 + math.log(torch.finfo(torch.float32).tiny))
    torch.testing.assert_close(got[0][anchors].double(), clamped, rtol=1e-5, atol=1e-3)
    assert torch.isfinite(got[1]).all() and torch.isfinite(got[2]).all()
    assert not got[1].any()


@pytest.mark.parametrize("tau", [0.01, 0.001, 1e-5])
@pytest.mark.parametrize("impl", [_impl_param(impl) for impl in ("reference", "torch", "triton")])
def test_tiny_temperature_stays_finite(impl, tau):
    """Isotropic features far below the bound: most pairs underflow, whole anchors have all their
    denominators at 0. Loss and both gradients stay finite (the loss of such an anchor is not the
    float64 value: log(FLT_MIN) - t_ip, as in the float32 reference)."""
    feats, labels, kwargs, upstream = make_inputs(90, 8, 3, seed=78, groups=True, exclusive=True,
                                                  weight=True)
    loss, grad, grad_u = evaluate(impl, feats, labels, kwargs, upstream, dtype=torch.float32,
                                  temperature=tau)
    for x in (loss, grad, grad_u):
        assert torch.isfinite(x).all()
    assert (loss != 0).any()


# ---- edge cases -------------------------------------------------------------------------------

IMPLS = ["reference", "torch", pytest.param("triton", marks=needs_triton)]


def _loss_and_grad(impl, feats, labels, **kwargs):
    f = feats.clone().requires_grad_()
    loss = pixel_infonce(f, labels, temperature=0.07, impl=impl, **kwargs)
    (loss * torch.rand(loss.shape[0])).sum().backward()
    return loss, f.grad


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_input(impl):
    loss, grad = _loss_and_grad(impl, torch.randn(0, 8), torch.zeros(0, dtype=torch.long))
    assert loss.shape == (0,) and loss.dtype == torch.float32
    assert grad.shape == (0, 8)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored(impl):
    labels = torch.full((37,), 255)
    labels[::3] = -4
    loss, grad = _loss_and_grad(impl, torch.randn(37, 5), labels)
    assert torch.equal(loss, torch.zeros(37)) and torch.equal(grad, torch.zeros(37, 5))


@pytest.mark.parametrize("impl", IMPLS)
def test_no_anchor_with_a_positive(impl):
    # Every valid label unique, or a class whose only other member is exclusive like the anchor.
    labels = torch.randperm(40)
    labels[5] = 255
    exclusive = torch.zeros(40, dtype=torch.bool)
    labels[7], exclusive[[7, 8]] = labels[8], True
    loss, grad = _loss_and_grad(impl, torch.randn(40, 6), labels, exclusive=exclusive)
    assert torch.equal(loss, torch.zeros(40)) and torch.equal(grad, torch.zeros(40, 6))


@pytest.mark.parametrize("impl", IMPLS)
def test_ignored_pixels_get_zero_loss_and_gradient(impl):
    feats, labels, _, _ = make_inputs(60, 7, 3, seed=21)
    loss, grad = _loss_and_grad(impl, feats.float(), labels)
    invalid = (labels < 0) | (labels == 255)
    assert invalid.any() and (loss[~invalid] != 0).any()
    assert torch.all(loss[invalid] == 0) and torch.all(grad[invalid] == 0)
    # Removing the ignored pixels changes nothing for the others.
    loss_valid = pixel_infonce(feats.float()[~invalid], labels[~invalid], temperature=0.07, impl=impl)
    torch.testing.assert_close(loss[~invalid], loss_valid, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_feature_row_and_small_temperature_stay_finite(impl):
    feats = torch.randn(50, 4)
    feats[3] = 0.0  # normalises to the zero vector (norm clamped at 1e-12, gradient 1e12 * dv_3)
    labels = torch.randint(0, 3, (50,))
    for tau in (0.07, 0.03):
        f = feats.clone().requires_grad_()
        loss = pixel_infonce(f, labels, temperature=tau, impl=impl)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(f.grad).all()
        assert (loss != 0).any()


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs(impl):
    feats, labels, kwargs, _ = make_inputs(90, 12, 4, seed=9, groups=True, weight=True)
    feats = feats.float()
    expected = pixel_infonce(feats, labels, temperature=0.1, impl=impl, **kwargs)
    transposed = feats.t().contiguous().t()  # (N, C) view of a (C, N) buffer
    assert not transposed.is_contiguous()
    got = pixel_infonce(transposed, labels, temperature=0.1, impl=impl, **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # Strided slices of everything.
    wide = torch.randn(90, 24)
    wide[:, ::2] = feats
    lab2 = torch.stack([labels, labels], 1)
    grp2 = torch.stack([kwargs["groups"]] * 2, 1)
    w2 = torch.stack([kwargs["pos_weight"]] * 2, 1)
    got = pixel_infonce(wide[:, ::2], lab2[:, 0], temperature=0.1, groups=grp2[:, 1],
                        pos_weight=w2[:, 0], impl=impl)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_label_dtypes_and_ignore_index():
    feats, labels, _, _ = make_inputs(80, 6, 5, seed=4)
    feats = feats.float()
    labels[labels < 0] = 255
    expected = pixel_infonce(feats, labels, temperature=0.1, impl="torch")
    for dtype in (torch.uint8, torch.int16, torch.int32):
        got = pixel_infonce(feats, labels.to(dtype), temperature=0.1, impl="torch")
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # A different ignore index: 255 becomes an ordinary class, 2 is ignored.
    got = pixel_infonce(feats, labels, temperature=0.1, ignore_index=2, impl="torch")
    ref = pixel_infonce(feats, labels, temperature=0.1, ignore_index=2, impl="reference")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert torch.all(got[labels == 2] == 0) and (got[labels == 255] != 0).any()


def test_auto_is_torch_on_cpu():
    feats, labels, kwargs, _ = make_inputs(70, 5, 3, seed=8, groups=True, weight=True)
    a = pixel_infonce(feats.float(), labels, temperature=0.2, impl="auto", **kwargs)
    b = pixel_infonce(feats.float(), labels, temperature=0.2, impl="torch", **kwargs)
    assert torch.equal(a, b)


@pytest.mark.parametrize("impl", [_impl_param(impl) for impl in ("torch", "triton") + FLOAT32_VARIANTS])
def test_deterministic_gradients(impl):
    feats, labels, kwargs, upstream = make_inputs(180, 16, 6, seed=12, groups=True, exclusive=True,
                                                  weight=True)
    runs = [evaluate(impl, feats, labels, kwargs, upstream, dtype=torch.float32, temperature=0.1)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---- input errors -----------------------------------------------------------------------------

def _good():
    return dict(feats=torch.randn(10, 4), labels=torch.randint(0, 3, (10,)), temperature=0.1)


@pytest.mark.parametrize("change, error, words", [
    (dict(feats=torch.randn(10)), ValueError, "feats"),
    (dict(feats=torch.randn(10, 4, 1)), ValueError, "feats"),
    (dict(feats=torch.randn(10, 0)), ValueError, "feats"),
    (dict(feats=torch.randint(0, 3, (10, 4))), TypeError, "feats"),
    (dict(feats=[[0.5] * 4] * 10), TypeError, "feats"),
    (dict(labels=torch.randint(0, 3, (10, 1))), ValueError, "labels"),
    (dict(labels=torch.randint(0, 3, (9,))), ValueError, "labels"),
    (dict(labels=torch.rand(10)), TypeError, "labels"),
    (dict(labels=torch.rand(10) > 0.5), TypeError, "labels"),
    (dict(groups=torch.randint(0, 2, (11,))), ValueError, "groups"),
    (dict(groups=torch.rand(10)), TypeError, "groups"),
    (dict(exclusive=torch.randint(0, 2, (10,))), TypeError, "exclusive"),
    (dict(exclusive=torch.rand(3) > 0.5), ValueError, "exclusive"),
    (dict(pos_weight=torch.randint(1, 3, (10,))), TypeError, "pos_weight"),
    (dict(pos_weight=torch.rand(10, 1)), ValueError, "pos_weight"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-0.5), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature="0.1"), TypeError, "temperature"),
    (dict(ignore_index=255.0), TypeError, "ignore_index"),
    (dict(impl="cuda"), ValueError, "impl"),
])
def test_input_errors(change, error, words):
    args = _good()
    args.update(change)
    feats, labels = args.pop("feats"), args.pop("labels")
    with pytest.raises(error, match=words):
        pixel_infonce(feats, labels, **args)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_feats_and_weights(bad):
    feats = torch.randn(10, 4)
    labels = torch.randint(0, 3, (10,))
    weights = torch.rand(10)
    weights[6] = bad
    with pytest.raises(ValueError, match="pos_weight holds non-finite"):
        pixel_infonce(feats, labels, temperature=0.1, pos_weight=weights)
    feats[4, 2] = bad
    with pytest.raises(ValueError, match="feats holds non-finite"):
        pixel_infonce(feats, labels, temperature=0.1)


def test_import_needs_no_triton():
    """`import kernels` must not import triton (the Triton module is loaded on first use)."""
    code = "import sys, kernels; assert 'triton' not in sys.modules, 'triton imported'"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]


def test_device_mismatch():
    meta = torch.device("meta")  # a second device that needs no hardware
    args = _good()
    for name, value in (("labels", args["labels"].to(meta)),
                        ("groups", torch.zeros(10, dtype=torch.long, device=meta)),
                        ("pos_weight", torch.rand(10, device=meta))):
        kwargs = {} if name == "labels" else {name: value}
        labels = value if name == "labels" else args["labels"]
        with pytest.raises(ValueError, match=f"{name} is on meta"):
            pixel_infonce(args["feats"], labels, temperature=0.1, **kwargs)


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = _good()
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        pixel_infonce(args["feats"], args["labels"], temperature=0.1, impl="triton")


@needs_triton
def test_triton_rejects_float64_and_cpu_bfloat16():
    args = _good()
    with pytest.raises(TypeError, match="float64"):
        pixel_infonce(args["feats"].double(), args["labels"], temperature=0.1, impl="triton")
    if not torch.cuda.is_available():
        with pytest.raises(TypeError, match="bfloat16"):
            pixel_infonce(args["feats"].bfloat16(), args["labels"], temperature=0.1, impl="triton")

"""GPU checks of the fused Triton kernels (skipped without CUDA): float16 / bfloat16 / float32
against a float64 reference, every launch variant's real bfloat16 / float16 code (the interpreter
has no bfloat16) against it, a large N against the tiled torch path, memory, determinism.
"""
import pytest
import torch

from kernels import pixel_infonce
from test_pixel_infonce import (assert_matches, concentrated_inputs, evaluate, grad_tol, loss_tol,
                                make_inputs)

pytestmark = pytest.mark.gpu

# Relative-norm tolerances for half inputs. v is rounded to the input dtype after normalisation
# (2**-11 relative for float16, 2**-8 for bfloat16), which moves s by up to ~1e-3 / 8e-3 and
# t = (s - 1) / tau by that over tau; on this test's draw (the tiled path fed the same rounded v,
# a CPU emulation) that gave relative-norm errors of at most 9e-4 (float16) and 9e-3 (bfloat16) in
# the loss and both gradients for tau in {0.07, 0.1, 1}. The bounds are ~4x those.
HALF_TOL = {torch.float16: 4e-3, torch.bfloat16: 4e-2}


def _to_cuda(feats, labels, kwargs, upstream):
    return (feats.cuda(), labels.cuda(), {k: v.cuda() for k, v in kwargs.items()}, upstream.cuda())


def _rel(got, ref):
    return ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("tau", [0.07, 0.1, 1.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["fp16", "bf16", "fp32"])
def test_triton_matches_reference_on_gpu(dtype, tau):
    inputs = _to_cuda(*make_inputs(3001, 64, 19, seed=31, groups=True, exclusive=True,
                                   weight=True, clustered=True))
    feats, labels, kwargs, upstream = inputs
    feats = feats.to(dtype).double()  # the reference sees exactly the rounded input
    ref = evaluate("reference", feats, labels, kwargs, upstream, dtype=torch.float64, temperature=tau)
    got = evaluate("triton", feats, labels, kwargs, upstream, dtype=dtype, temperature=tau)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    if dtype == torch.float32:
        assert_matches(got[0], ref[0], what="loss", **loss_tol(tau))
        assert_matches(got[1], ref[1], what="feats grad", **grad_tol(tau, feats))
        assert_matches(got[2], ref[2], what="pos_weight grad", **grad_tol(tau))
    else:
        for name, a, b in zip(("loss", "feats grad", "pos_weight grad"), got, ref):
            assert _rel(a, b) < HALF_TOL[dtype], f"{dtype} {name}: relative error {_rel(a, b):.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_triton_large_n_against_tiled_torch(dtype):
    n = 65_536 + 123
    feats, labels, kwargs, upstream = _to_cuda(*make_inputs(n, 64, 19, seed=5, groups=True,
                                                            weight=True, clustered=True))
    feats = feats.to(dtype)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    got = evaluate("triton", feats, labels, kwargs, upstream, dtype=dtype, temperature=0.1)
    torch.cuda.synchronize()
    growth = torch.cuda.max_memory_allocated() - base
    # O(N * C) buffers only (one N x N float32 matrix would be 17 GB): the fused normalisation keeps
    # the gathered features, their gradient and feats.grad, about 3x the features (issue 3's
    # target is 4x + 64 MiB; v1's float32 wrapper took 12x).
    feats_bytes = feats.numel() * feats.element_size()
    assert growth < 4 * feats_bytes + 64 * 2**20, f"peak growth {growth / 2**20:.0f} MiB"
    # The tiled path in float32 on the same rounded input (the rounding of v is the difference).
    ref = evaluate("torch", feats.double(), labels, kwargs, upstream, dtype=torch.float32,
                   temperature=0.1)
    for name, a, b in zip(("loss", "feats grad", "pos_weight grad"), got, ref):
        assert torch.isfinite(a).all()
        assert _rel(a, b) < HALF_TOL[dtype], f"{dtype} {name}: relative error {_rel(a, b):.3g}"


@pytest.mark.parametrize("variant, dtype", [
    ("streamed", torch.bfloat16), ("resident", torch.bfloat16), ("split", torch.bfloat16),
    ("split_tma", torch.bfloat16), ("split_m32", torch.bfloat16), ("resident", torch.float16),
    ("split", torch.float16)])
def test_triton_variants_match_reference_on_gpu(variant, dtype):
    """C = 512: "resident" keeps 64 x 512 rows on chip in forward and owns all 512 gradient
    channels per backward program, the split presets run the split-loop kernels (rows on chip in
    both passes; "split_tma" loads the column tiles by TMA), every preset takes bfloat16 operands
    for H @ V with bfloat16 inputs (float16 keeps TF32). The bound is HALF_TOL: the bfloat16
    product rounds H to the inputs' own 8-bit mantissa (about 4e-3 relative in the gradient,
    measured with float16 inputs under the interpreter)."""
    inputs = _to_cuda(*make_inputs(2500, 512, 19, seed=37, groups=True, exclusive=True,
                                   weight=True, clustered=True))
    feats, labels, kwargs, upstream = inputs
    feats = feats.to(dtype).double()
    ref = evaluate("reference", feats, labels, kwargs, upstream, dtype=torch.float64, temperature=0.1)
    got = evaluate(f"triton:{variant}", feats, labels, kwargs, upstream, dtype=dtype, temperature=0.1)
    assert got[1].dtype == dtype
    for name, a, b in zip(("loss", "feats grad", "pos_weight grad"), got, ref):
        assert torch.isfinite(a).all()
        assert _rel(a, b) < HALF_TOL[dtype], f"{variant} {dtype} {name}: relative error {_rel(a, b):.3g}"


def test_triton_deterministic_and_auto_on_gpu():
    inputs = _to_cuda(*make_inputs(20_000, 64, 19, seed=8, groups=True, exclusive=True,
                                   weight=True))
    feats, labels, kwargs, upstream = inputs
    runs = [evaluate(impl, feats, labels, kwargs, upstream, dtype=torch.float16, temperature=0.1)
            for impl in ("triton", "triton", "auto")]
    for a, b, c in zip(*runs):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_triton_no_positive_and_empty_on_gpu():
    feats = torch.randn(500, 32, device="cuda", dtype=torch.float16, requires_grad=True)
    labels = torch.randperm(500, device="cuda")  # every label unique: no positive anywhere
    loss = pixel_infonce(feats, labels, temperature=0.1, impl="triton")
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(feats.grad, torch.zeros_like(feats))
    empty = torch.randn(0, 32, device="cuda", requires_grad=True)
    loss = pixel_infonce(empty, torch.zeros(0, dtype=torch.long, device="cuda"), temperature=0.1)
    loss.sum().backward()
    assert loss.shape == (0,) and empty.grad.shape == (0, 32)


def test_default_preset_launches_without_fallback_where_it_fits():
    """The default preset at C = 512 bfloat16 (the training call) on this GPU: on devices with the
    shared memory its forward needs (sm_80: 163 KiB, sm_90: 227 KiB) it runs as configured, with no
    fallback warning; on the 99 KiB of sm_86 / sm_89 / sm_120 it falls back once, with a warning,
    and still matches the float32 path."""
    import warnings

    from kernels import triton_infonce as ti

    feats, labels, kwargs, upstream = _to_cuda(*make_inputs(4099, 512, 19, seed=3, groups=True,
                                                            weight=True, clustered=True))
    major, minor = torch.cuda.get_device_capability()
    small_smem = (major, minor) in {(8, 6), (8, 9), (12, 0)}
    ti._FALLBACKS.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = evaluate("triton", feats, labels, kwargs, upstream, dtype=torch.bfloat16, temperature=0.1)
    fallbacks = [w for w in caught if "out of resource" in str(w.message)]
    assert bool(fallbacks) == small_smem, [str(w.message) for w in caught]
    ref = evaluate("torch", feats.to(torch.bfloat16).double(), labels, kwargs, upstream,
                   dtype=torch.float32, temperature=0.1)
    for name, a, b in zip(("loss", "feats grad", "pos_weight grad"), got, ref):
        assert _rel(a, b) < HALF_TOL[torch.bfloat16], f"{name}: relative error {_rel(a, b):.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["fp16", "bf16", "fp32"])
def test_triton_small_temperature_on_gpu(dtype):
    """tau = 0.002 (the CPU test's inputs, larger): pixels whose pairs are representable match the
    float64 reference, far pixels (every e of theirs underflows; no upstream gradient) leave every
    gradient finite. A GPU's exp flushes what the CPU keeps as denormals."""
    tau = 0.002
    feats, labels, kwargs, upstream, is_far, _ = concentrated_inputs(3001, 64, 19, tau, seed=41,
                                                                     far=40)
    feats, labels, kwargs, upstream = _to_cuda(feats.to(dtype).double(), labels, kwargs, upstream)
    is_far = is_far.cuda()
    ref = evaluate("reference", feats, labels, kwargs, upstream, dtype=torch.float64, temperature=tau)
    got = evaluate("triton", feats, labels, kwargs, upstream, dtype=dtype, temperature=tau)
    for x in got:
        assert torch.isfinite(x).all()
    pairs = (("loss", got[0][~is_far], ref[0][~is_far]), ("feats grad", got[1], ref[1]),
             ("pos_weight grad", got[2], ref[2]))
    if dtype == torch.float32:
        assert_matches(pairs[0][1], pairs[0][2], what="loss", **loss_tol(tau))
        assert_matches(got[1], ref[1], what="feats grad", **grad_tol(tau, feats))
        assert_matches(got[2], ref[2], what="pos_weight grad", **grad_tol(tau))
    else:
        for name, a, b in pairs:
            assert _rel(a, b) < HALF_TOL[dtype], f"{dtype} {name}: relative error {_rel(a, b):.3g}"

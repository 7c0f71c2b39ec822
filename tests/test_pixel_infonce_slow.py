"""Slower CPU checks of kernels.pixel_infonce, each in a fresh subprocess:

- the tiled torch path's peak memory at a size where one N x N float32 matrix is over a GiB;
- the Triton kernels compile for real GPUs (sm_80, sm_90) with Triton's own CUDA backend, without a
  GPU and without the interpreter, which accepts code that the compiler would reject.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, env_drop=()) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, env=env, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_tiled_memory_stays_far_below_one_dense_matrix():
    n = 20_000  # one (N, N) float32 matrix: 1.6 GB; the reference builds several
    result = _run(f"""
        import json, resource, torch
        from kernels import pixel_infonce
        torch.manual_seed(0)
        n, c = {n}, 8
        feats = torch.randn(n, c, requires_grad=True)
        labels = torch.randint(0, 19, (n,))
        labels[torch.rand(n) < 0.1] = 255
        weights = torch.rand(n)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        loss = pixel_infonce(feats, labels, temperature=0.1, impl="torch")
        (loss * weights).sum().backward()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(dict(base=base, peak=peak, finite=bool(torch.isfinite(feats.grad).all()),
                              nonzero=bool((loss != 0).any()))))
    """)
    dense = n * n * 4
    assert result["finite"] and result["nonzero"]
    # Growth over the process's footprint before the call: blocks of ~4M elements (a few tens of
    # MB each), not an N x N matrix.
    assert result["peak"] - result["base"] < 0.35 * dense, result


@pytest.mark.slow
def test_triton_kernels_compile_for_gpus():
    pytest.importorskip("triton")
    result = _run("""
        import json
        import torch
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from kernels import triton_infonce as ti

        ints = {name: "*i32" for name in ("gs_ptr", "ge_ptr", "cs_ptr", "ce_ptr")}
        dtypes = {"*fp16": torch.float16, "*bf16": torch.bfloat16, "*fp32": torch.float32}
        done = []
        for arch in (80, 90):
            for vt, dtype in dtypes.items():
                # The default launch configuration for C = 64 and this dtype.
                cfg = ti.TritonConfig().resolved(64, dtype)
                opts = {"num_warps": cfg.num_warps}
                fwd_sig = dict(v_ptr=vt, u_ptr="*fp32", **ints, np_ptr="*i32", ex_ptr="*i8",
                               neg_ptr="*fp32", loss_ptr="*fp32", r_ptr="*fp32",
                               n="i32", C="i32", inv_tau="fp32")
                fwd_const = dict(HAS_WEIGHT=True, HAS_EXCLUSIVE=True, BLOCK_M=cfg.block_m,
                                 BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c,
                                 DOT_PRECISION=cfg.dot_precision)
                bwd_sig = dict(v_ptr=vt, u_ptr="*fp32", a_ptr="*fp32", b_ptr="*fp32",
                               neg_ptr="*fp32", **ints, ex_ptr="*i8", dv_ptr=vt, du_ptr="*fp32",
                               n="i32", C="i32", inv_tau="fp32")
                bwd_const = dict(HAS_WEIGHT=True, HAS_EXCLUSIVE=True, NEED_DU=True,
                                 BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c,
                                 BLOCK_D=cfg.block_d, DOT_PRECISION=cfg.dot_precision,
                                 PRODUCT_PRECISION=cfg.product_precision)
                for fn, sig, const in ((ti._infonce_fwd_kernel, fwd_sig, fwd_const),
                                       (ti._infonce_bwd_kernel, bwd_sig, bwd_const)):
                    sig = dict(sig, **{k: "constexpr" for k in const})
                    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const),
                                            target=GPUTarget("cuda", arch, 32), options=opts)
                    assert len(kernel.asm["cubin"]) > 0
                    done.append(f"{fn.__name__}/{vt}/sm_{arch}")
        print(json.dumps(dict(done=done)))
    """, env_drop=("TRITON_INTERPRET",))
    assert len(result["done"]) == 12

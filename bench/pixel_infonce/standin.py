"""Peak memory of the Triton path around its kernels, on a CPU (`--standin-memory`).

Everything `pixel_infonce(impl="triton")` does around its two N^2 kernels runs for real (gather,
norms, per-row statistics, output buffers, autograd, scatter); the kernels are replaced by
stand-ins that write their outputs (so every page is touched, as the kernels would) and do none of
the N^2 work, so N = 131,072 takes seconds. CUDA's allocator would count the same tensors. The
target is 4 x the features + 64 MiB.
"""
import os
from typing import Dict, Sequence, Tuple

import torch

from bench.pixel_infonce.inputs import make_inputs
from bench.pixel_infonce.providers import make_forward
from bench.utils import measure_call


class _StandInKernel:
    """Takes the place of one `@triton.jit` kernel: `kernel[grid](*args, **meta)` fills the
    kernel's output tensors (every page written, as the kernel would) and does no other work.

    Args:
        jit_fn: the kernel it replaces (for its argument names).
        outputs: names of its output pointer arguments (names absent from the kernel are skipped,
            so one stand-in serves kernel versions with different names).
    """

    def __init__(self, jit_fn, outputs: Sequence[str]):
        self.positions = [jit_fn.arg_names.index(name) for name in outputs
                          if name in jit_fn.arg_names]

    def __getitem__(self, grid):
        def launch(*args, **meta):
            for i in self.positions:
                args[i].fill_(0.5)
        return launch


def standin_memory(n: int, c: int, dtype: torch.dtype, *, seed: int = 0) -> Dict[str, int]:
    """Peak memory growth of `pixel_infonce(impl="triton")` on a CPU with stand-in kernels.

    Everything around the two N^2 kernels runs for real (see the module docstring). Needs
    TRITON_INTERPRET=1 before kernels.triton_infonce is first imported (set here if it was not).

    Args:
        n: pixels N.
        c: channels C.
        dtype: feature dtype (bfloat16 works too: no kernel runs in the interpreter).
        seed: input seed.

    Returns:
        feats_bytes, forward and full (forward + backward) peak growth in bytes, as measured by
        `bench.utils.measure_call` on a warm call.
    """
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from kernels import triton_infonce as ti

    if not ti.INTERPRETED:
        raise RuntimeError("kernels.triton_infonce was imported without TRITON_INTERPRET=1: "
                           "the Triton path cannot run on CPU tensors")
    device = torch.device("cpu")
    saved = {name: getattr(ti, name) for name in ("_infonce_fwd_kernel", "_infonce_bwd_kernel",
                                                   "_interpreter_can_run") if hasattr(ti, name)}
    ti._infonce_fwd_kernel = _StandInKernel(saved["_infonce_fwd_kernel"],
                                            ("neg_ptr", "loss_ptr", "q_ptr"))
    ti._infonce_bwd_kernel = _StandInKernel(saved["_infonce_bwd_kernel"],
                                            ("df_ptr", "dv_ptr", "du_ptr"))
    if "_interpreter_can_run" in saved:  # no kernel runs: bfloat16 is fine
        ti._interpreter_can_run = lambda dtype_: True
    try:
        inp = make_inputs(n, c, dtype, device, seed=seed)
        forward = make_forward("triton", inp)

        def full():
            forward().backward(inp.upstream)

        full()  # warm-up: lazy imports and first-call allocations stay out of the numbers
        _, fwd_peak = measure_call(forward, device, grad_to_none=[inp.feats])
        _, full_peak = measure_call(full, device, grad_to_none=[inp.feats])
    finally:
        for name, value in saved.items():
            setattr(ti, name, value)
    if fwd_peak is None or full_peak is None:
        raise OSError("peak RSS cannot be measured here (needs Linux /proc/self/clear_refs)")
    return dict(feats_bytes=inp.feats.numel() * inp.feats.element_size(), forward=fwd_peak,
                full=full_peak)


def standin_memory_table(results: Sequence[Tuple[int, int, str, Dict[str, int]]]) -> str:
    """Markdown rows of `standin_memory` results: (n, c, dtype name, result) each."""
    lines = ["| N | C | dtype | feats | forward | forward + backward | target 4 x feats + 64 MiB |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    for n, c, dtype, r in results:
        feats = r["feats_bytes"]
        lines.append(f"| {n:,} | {c} | {dtype} | {feats / 2**20:,.0f} MiB | "
                     f"{r['forward'] / 2**20:,.0f} MiB ({r['forward'] / feats:.1f}x) | "
                     f"{r['full'] / 2**20:,.0f} MiB ({r['full'] / feats:.1f}x) | "
                     f"{(4 * feats + 64 * 2**20) / 2**20:,.0f} MiB |")
    return "\n".join(lines)

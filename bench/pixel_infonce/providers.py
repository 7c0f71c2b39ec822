"""The implementations ("providers") the benchmark measures, each as a call that returns the (N,)
per-anchor loss of one cell's inputs:

- reference: the naive N x N matrix in plain torch (`impl="reference"`);
- torch:     the tiled pure-torch path (`impl="torch"`);
- triton:    the fused Triton kernels (`impl="triton"`; CUDA, or Triton's numpy interpreter on a
             CPU for small N: a smoke test of the plumbing, not the kernel's speed);
- compile:   `torch.compile` of the reference (normalisation + `kernels.reference`, without the
             op's input checks), compiled afresh for every cell;
- triton:<preset>: the Triton kernels with a launch preset of `kernels.triton_infonce.VARIANTS`
             (resident, streamed, split, split_tma, split_m32).
"""
from typing import Callable, Optional

import torch

from bench.pixel_infonce.inputs import TEMPERATURE, Inputs

PROVIDERS = ("reference", "torch", "triton", "compile")

# Peak growth of the N x N providers in bytes per N^2, for the size guard. Measured on a CPU (peak
# RSS of fwd+bwd, float32, C = 64, N = 8,192; at N = 2,048 fixed costs add ~20 B): the reference
# peaks in its forward at 32 B per pair (~6 float32 and ~6 bool N x N buffers alive at once),
# torch.compile of it at 8 B per pair. The guard adds 20 % slack; an allocation that fails anyway
# is caught and recorded as OOM.
PEAK_BYTES_PER_PAIR = {"reference": 32.0, "compile": 8.0}


def reference_loss(feats: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """What `torch.compile` compiles: the op's normalisation and the N x N reference, minus the
    input checks (they hold data-dependent branches that would break the graph)."""
    from kernels.reference import reference_pixel_infonce

    f = feats.float()
    v = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (N, C)
    return reference_pixel_infonce(v, labels, temperature=TEMPERATURE, groups=groups)


def is_triton(provider: str) -> bool:
    """"triton" or one of its launch presets "triton:<name>"."""
    return provider == "triton" or provider.startswith("triton:")


def make_forward(provider: str, inp: Inputs) -> Callable[[], torch.Tensor]:
    """A call that returns the (N,) loss of `inp` with the given provider."""
    if provider.startswith("triton:"):
        from kernels.functional import pixel_infonce_with_config
        from kernels.triton_infonce import variant_config

        config = variant_config(provider.split(":", 1)[1], inp.feats.dtype)
        return lambda: pixel_infonce_with_config(inp.feats, inp.labels, temperature=TEMPERATURE,
                                                 groups=inp.groups, config=config)
    if provider == "compile":
        # A fresh compilation per cell: no graph of another shape, no recompile-limit fallback to
        # eager. dynamic=False gives kernels specialised to the shape, as a user would get.
        import torch._functorch.config

        torch._dynamo.reset()
        # The backward pass is timed by calling backward() again on one retained graph, which a
        # compiled backward with donated (reused) buffers refuses.
        torch._functorch.config.donated_buffer = False
        compiled = torch.compile(reference_loss, dynamic=False)
        return lambda: compiled(inp.feats, inp.labels, inp.groups)
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    from kernels import pixel_infonce

    return lambda: pixel_infonce(inp.feats, inp.labels, temperature=TEMPERATURE,
                                 groups=inp.groups, impl=provider)


def predicted_peak_bytes(provider: str, n: int) -> Optional[float]:
    """Predicted peak growth of the N x N providers (None: O(N) providers, not guarded)."""
    per_pair = PEAK_BYTES_PER_PAIR.get(provider)
    return None if per_pair is None else 1.2 * per_pair * float(n) ** 2

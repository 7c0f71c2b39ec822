"""`pixel_infonce`: the public pixel-wise InfoNCE op (Eq. 2 of Vayyat et al., CLUDA).

Validates its inputs, L2-normalises the features (differentiably, in plain torch), and dispatches
to one of three implementations of the same contract (DESIGN.md, "The loss contract"):
`kernels.reference` (the N x N specification), `kernels.tiled` (tiled torch, the CPU default) and
`kernels.triton_infonce` (the fused Triton kernels, the CUDA default, imported lazily so that
`import kernels` needs neither triton nor a GPU).
"""
import importlib
import math
import os
from numbers import Real
from typing import Optional

import torch

from kernels.layout import sort_pixels
from kernels.reference import reference_pixel_infonce
from kernels.tiled import tiled_pixel_infonce

IMPLS = ("auto", "reference", "torch", "triton")
_FEAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_vector(name: str, x, feats: torch.Tensor, kind: str) -> None:
    """Check an optional (N,) per-pixel tensor: type, shape, dtype kind ('int' | 'bool' | 'float'), device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1 or x.shape[0] != feats.shape[0]:
        raise ValueError(f"{name} must have shape (N,) = ({feats.shape[0]},) to match feats "
                         f"{tuple(feats.shape)}, got {tuple(x.shape)}")
    ok = {"int": x.dtype in _INT_DTYPES, "bool": x.dtype == torch.bool,
          "float": x.dtype.is_floating_point}[kind]
    if not ok:
        wanted = {"int": "an integer", "bool": "torch.bool", "float": "a floating"}[kind]
        raise TypeError(f"{name} must have {wanted} dtype, got {x.dtype}")
    if x.device != feats.device:
        raise ValueError(f"{name} is on {x.device} but feats is on {feats.device}")


def _load_triton():
    """Import the Triton module on first use (raises ImportError when triton is unusable)."""
    return importlib.import_module("kernels.triton_infonce")


def _triton_usable_for(feats: torch.Tensor) -> bool:
    if not feats.is_cuda or feats.dtype == torch.float64:
        return False
    try:
        _load_triton()
    except ImportError:
        return False
    return True


def pixel_infonce(
    feats: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    groups: Optional[torch.Tensor] = None,
    exclusive: Optional[torch.Tensor] = None,
    pos_weight: Optional[torch.Tensor] = None,
    ignore_index: int = 255,
    impl: str = "auto",
) -> torch.Tensor:
    """Per-anchor pixel InfoNCE loss (CLUDA Eq. 2) over every eligible pixel pair.

    With v = f / max(||f||, 1e-12) and s_ij = v_i . v_j / temperature:

        eligible(i, j) = i != j, valid(i), valid(j), groups[i] == groups[j],
                         not (exclusive[i] and exclusive[j])
        P_i = {j eligible: labels[j] == labels[i]},  N_i = {j eligible: labels[j] != labels[i]}
        L_i = 1/|P_i| sum_{p in P_i} u_p [log(exp(s_ip) + sum_{n in N_i} exp(s_in)) - s_ip]

    L_i = 0 when i is invalid (label < 0 or == ignore_index) or P_i is empty. Per-anchor weights
    and the normalisation are the caller's: `(w * L).sum() / A`.

    Example:
        >>> feats = torch.randn(4096, 64, requires_grad=True)      # (N, C) pixels x channels
        >>> labels = torch.randint(0, 19, (4096,))                  # 255 = ignored
        >>> loss = pixel_infonce(feats, labels, temperature=0.1)    # (N,) float32
        >>> (loss.sum() / loss.numel()).backward()

    Args:
        feats: (N, C) float16 / bfloat16 / float32 features, any device, any strides. float64 is
            accepted by the "reference" and "torch" paths (for gradchecks) and returns float64.
        labels: (N,) integer labels.
        temperature: tau, a finite float > 0. The shifted exponentials exp(s - 1/tau) stay in
            float32 range for tau >= 2/87 (about 0.023); below that results stay finite but lose
            accuracy.
        groups: (N,) integer group ids (e.g. stuff / thing), or None for one group.
        exclusive: (N,) bool, or None; two exclusive pixels never pair (HR-HR in multi-res CLUDA).
        pos_weight: (N,) floating weight u_j of partner j's positive term, or None (ones).
            Differentiable when it requires grad.
        ignore_index: label of ignored pixels.
        impl: "reference" (N x N matrix, small N only), "torch" (tiled, memory O(N * block + N * C)),
            "triton" (fused kernels; CUDA, or CPU under TRITON_INTERPRET=1) or "auto" (triton for
            CUDA tensors when triton imports, torch otherwise).

    Returns:
        (N,) float32 loss per pixel (float64 for float64 feats), differentiable w.r.t. feats and
        pos_weight. N = 0, all pixels ignored or no anchor with a positive give zeros whose
        gradient is zero.
    """
    # ---- validation at the boundary -------------------------------------------------------
    if not isinstance(feats, torch.Tensor):
        raise TypeError(f"feats must be a torch.Tensor, got {type(feats).__name__}")
    if feats.dim() != 2:
        raise ValueError(f"feats must be 2-D (N, C), got shape {tuple(feats.shape)}")
    if feats.dtype not in _FEAT_DTYPES:
        raise TypeError("feats must be float16, bfloat16 or float32 (float64 for the reference "
                        f"and torch paths), got {feats.dtype}")
    if feats.shape[1] == 0:
        raise ValueError(f"feats must have at least one channel, got shape {tuple(feats.shape)}")
    _check_vector("labels", labels, feats, "int")
    for name, x, kind in (("groups", groups, "int"), ("exclusive", exclusive, "bool"),
                          ("pos_weight", pos_weight, "float")):
        if x is not None:
            _check_vector(name, x, feats, kind)
    if isinstance(temperature, torch.Tensor) and temperature.numel() == 1:
        temperature = temperature.item()
    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature <= 0.0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if feats.numel() and not bool(torch.isfinite(feats).all()):
        raise ValueError("feats holds non-finite values (inf or nan)")
    if pos_weight is not None and pos_weight.numel() and not bool(torch.isfinite(pos_weight).all()):
        raise ValueError("pos_weight holds non-finite values (inf or nan)")

    if impl == "auto":
        impl = "triton" if _triton_usable_for(feats) else "torch"
    if impl == "triton":
        if feats.dtype == torch.float64:
            raise TypeError("impl='triton' takes float16, bfloat16 or float32 feats, got float64")
        if not feats.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"impl='triton' needs a CUDA tensor (feats is on {feats.device}); on "
                             "a CPU it runs only under TRITON_INTERPRET=1 set before import")

    # ---- L2 normalisation, differentiable, in float32 (float64 for float64 input) -------------
    compute_dtype = torch.float64 if feats.dtype == torch.float64 else torch.float32
    f = feats.to(compute_dtype)
    v = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (N, C)

    if impl == "reference":
        return reference_pixel_infonce(v, labels, temperature=temperature, groups=groups,
                                       exclusive=exclusive, pos_weight=pos_weight,
                                       ignore_index=ignore_index)

    layout = sort_pixels(labels, groups=groups, exclusive=exclusive, ignore_index=ignore_index)
    u = pos_weight[layout.index].to(compute_dtype) if pos_weight is not None else None
    if impl == "torch":
        loss_sorted = tiled_pixel_infonce(v[layout.index], layout, inv_tau=1.0 / temperature,
                                          pos_weight=u)
    else:
        triton_module = _load_triton()
        if not feats.is_cuda and not triton_module.INTERPRETED:
            raise ValueError("impl='triton' on a CPU tensor: kernels.triton_infonce was imported "
                             "before TRITON_INTERPRET=1 was set")
        # The kernels take v in the input dtype (tensor-core dot products), accumulate in float32.
        v_sorted = v[layout.index].to(feats.dtype)
        loss_sorted = triton_module.triton_pixel_infonce(v_sorted, layout,
                                                         inv_tau=1.0 / temperature, pos_weight=u)
    # Scatter back to pixel order; invalid pixels keep L = 0 and get no gradient.
    loss = torch.zeros(feats.shape[0], dtype=compute_dtype, device=feats.device)
    return loss.index_put((layout.index,), loss_sorted)

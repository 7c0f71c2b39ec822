"""`pixel_infonce`: the public pixel-wise InfoNCE op (Eq. 2 of Vayyat et al., CLUDA).

Validates its inputs and dispatches to one of three implementations of the same contract
(DESIGN.md, "The loss contract"): `kernels.reference` (the N x N specification), `kernels.tiled`
(tiled torch, the CPU default) and `kernels.triton_infonce` (the fused Triton kernels, the CUDA
default, imported lazily so that `import kernels` needs neither triton nor a GPU).

The L2 normalisation v = f / max(||f||, 1e-12) is differentiable in both cases but done in two
ways. For "reference" and "torch" it is plain torch autograd on a float32 (float64) copy of the
features. For "triton" the features are only gathered into sorted order in their own dtype and
the kernels fuse the normalisation (forward: the cosine from (n,) inverse norms; backward: the
Jacobian applied in the kernel's epilogue), so the op's memory stays about 3x the features.
`pixel_infonce_with_config` is the "triton" path with explicit launch parameters (benchmarks and
tests of the launch variants).
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


# Elements per chunk of the finiteness check: torch.isfinite builds several temporaries of its
# input's size (x == x, x.abs(), x.abs() != inf, their product), which on the whole feature map
# would be the largest allocation of the op (2.5x the features for bfloat16).
_CHECK_CHUNK_ELEMENTS = 1 << 22


def _all_finite(x: torch.Tensor) -> bool:
    """torch.isfinite(x).all() for a 2-D x, over chunks of rows (one host sync in all)."""
    rows = max(1, _CHECK_CHUNK_ELEMENTS // max(x.shape[1], 1))
    flags = [torch.isfinite(x[r0:r0 + rows]).all() for r0 in range(0, x.shape[0], rows)]
    return bool(torch.stack(flags).all()) if flags else True


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
    variant: Optional[str] = None,
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
        temperature: tau, a finite float > 0. Every path computes e = exp(s - 1/tau) =
            exp((cos - 1) / tau) in float32, whose normal range ends at exp(-87.3): a pair with
            (1 - cos) / tau > 87.3 counts as e = 0. So the result is exact (to float32 rounding)
            for any features at tau >= 2 / 87.3 (about 0.023), for non-negative (post-ReLU)
            features at tau >= 1 / 87.3 (about 0.0115), and below that for every anchor whose
            nearest negative, or else each of its positives, lies within that reach (dropped
            pairs are below FLT_MIN of the denominators they join). An anchor farther than that
            from all its partners gets u_p (log(FLT_MIN) - t_ip) per positive and no gradient,
            as in the float32 reference. Loss and gradients are finite at any tau.
        groups: (N,) integer group ids (e.g. stuff / thing), or None for one group.
        exclusive: (N,) bool, or None; two exclusive pixels never pair (HR-HR in multi-res CLUDA).
        pos_weight: (N,) floating weight u_j of partner j's positive term, or None (ones).
            Differentiable when it requires grad.
        ignore_index: label of ignored pixels.
        impl: "reference" (N x N matrix, small N only), "torch" (tiled, memory O(N * block + N * C)),
            "triton" (fused kernels; CUDA, or CPU under TRITON_INTERPRET=1) or "auto" (triton for
            CUDA tensors when triton imports, torch otherwise).
        variant: launch preset of the Triton kernels, a name of `kernels.triton_infonce.VARIANTS`
            (None: its DEFAULT_VARIANT, tuned on an H200); the same result up to rounding, at
            another speed. Ignored by the other paths.

    Returns:
        (N,) float32 loss per pixel (float64 for float64 feats), differentiable w.r.t. feats and
        pos_weight. N = 0, all pixels ignored or no anchor with a positive give zeros whose
        gradient is zero.
    """
    return _pixel_infonce(feats, labels, temperature=temperature, groups=groups,
                          exclusive=exclusive, pos_weight=pos_weight, ignore_index=ignore_index,
                          impl=impl, triton_config=None, variant=variant)


def pixel_infonce_with_config(
    feats: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    config,
    groups: Optional[torch.Tensor] = None,
    exclusive: Optional[torch.Tensor] = None,
    pos_weight: Optional[torch.Tensor] = None,
    ignore_index: int = 255,
) -> torch.Tensor:
    """`pixel_infonce(..., impl="triton")` with explicit launch parameters.

    Same contract, checks and result as `pixel_infonce`; for comparing the launch variants of
    `kernels.triton_infonce.VARIANTS` in benchmarks and tests.

    Args:
        feats, labels, temperature, groups, exclusive, pos_weight, ignore_index: as
            `pixel_infonce`.
        config: a `kernels.triton_infonce.TritonConfig` (e.g. `variant_config(name, dtype)`).

    Returns:
        (N,) float32 loss per pixel, as `pixel_infonce`.
    """
    return _pixel_infonce(feats, labels, temperature=temperature, groups=groups,
                          exclusive=exclusive, pos_weight=pos_weight, ignore_index=ignore_index,
                          impl="triton", triton_config=config, variant=None)


def _pixel_infonce(feats, labels, *, temperature, groups, exclusive, pos_weight, ignore_index,
                   impl, triton_config, variant) -> torch.Tensor:
    """Validation and dispatch behind `pixel_infonce` and `pixel_infonce_with_config`."""
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
    if variant is not None and not isinstance(variant, str):
        raise TypeError(f"variant must be None or a preset name, got {type(variant).__name__}")
    if feats.numel() and not _all_finite(feats):
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

    if impl == "triton":
        layout = sort_pixels(labels, groups=groups, exclusive=exclusive, ignore_index=ignore_index)
        triton_module = _load_triton()
        if not feats.is_cuda and not triton_module.INTERPRETED:
            raise ValueError("impl='triton' on a CPU tensor: kernels.triton_infonce was imported "
                             "before TRITON_INTERPRET=1 was set")
        # The features in sorted order and their own dtype (autograd scatters the gradient back);
        # the kernels normalise them on the fly and return the gradient in the same dtype.
        if variant is not None:
            triton_config = triton_module.variant_config(variant, feats.dtype)
        u = pos_weight[layout.index].float() if pos_weight is not None else None
        loss_sorted = triton_module.triton_pixel_infonce(
            feats[layout.index], layout, inv_tau=1.0 / temperature, pos_weight=u,
            config=triton_config)
        loss = torch.zeros(feats.shape[0], dtype=torch.float32, device=feats.device)
        return loss.index_put((layout.index,), loss_sorted)

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
    loss_sorted = tiled_pixel_infonce(v[layout.index], layout, inv_tau=1.0 / temperature,
                                      pos_weight=u)
    # Scatter back to pixel order; invalid pixels keep L = 0 and get no gradient.
    loss = torch.zeros(feats.shape[0], dtype=compute_dtype, device=feats.device)
    return loss.index_put((layout.index,), loss_sorted)

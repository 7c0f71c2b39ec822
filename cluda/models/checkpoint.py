"""Reading encoder weights from a local checkpoint file.

Checkpoints come in several wrappings: SegFormer's ImageNet files (`mit_b5.pth`) are a raw state
dict; mmcv / mmseg / DAFormer files hold `{"meta": ..., "state_dict": ...}`; DeiT-style files hold
`{"model": ...}`; DataParallel adds `module.` to every key and segmentation checkpoints put the
encoder under `backbone.`. `read_state_dict` undoes all of that and returns a flat
`{name: tensor}` dict; matching it against a model (missing keys, shapes) is the caller's job.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Dict, Sequence, Union

import torch

PathLike = Union[str, "os.PathLike[str]"]

# Keys under which training frameworks nest the weights, tried in this order.
_WRAPPER_KEYS = ("state_dict", "model")


def read_state_dict(
    path: PathLike,
    *,
    strip_prefixes: Sequence[str] = ("module.", "backbone."),
) -> Dict[str, torch.Tensor]:
    """Load a state dict from `path` (`.pth` / `.pt` / `.bin` via `torch.load`, or `.safetensors`).

    Args:
        path: local file.
        strip_prefixes: prefixes removed in order. A prefix that some but not all keys carry (a
            segmentation checkpoint's `backbone.` next to `decode_head.`) selects the keys that
            carry it: the others belong to other parts of the network.

    Returns:
        `{name: tensor}` on the CPU.

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: the file cannot be read or holds no tensor dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path!r}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file  # installed with timm

            obj = load_file(path, device="cpu")
        else:
            # weights_only: a checkpoint is data, never code to run.
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a corrupt or foreign file
        raise ValueError(
            f"could not read checkpoint {path!r} (read with torch.load(weights_only=True): tensors and plain "
            f"containers only): {type(err).__name__}: {err}"
        ) from err

    for key in _WRAPPER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(
            f"checkpoint {path!r} holds no state dict (got {type(obj).__name__}; expected a dict of "
            f"tensors, possibly under one of {list(_WRAPPER_KEYS)})"
        )
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError(f"checkpoint {path!r} holds no tensors (keys: {sorted(obj)[:10]})")

    for prefix in strip_prefixes:
        carrying = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if carrying:
            state = carrying
    return state

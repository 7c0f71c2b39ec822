"""Reading weights from a file, and the one check that they fit a network.

Checkpoints come in several wrappings: SegFormer's ImageNet files (`mit_b5.pth`) are a raw state
dict; mmcv / mmseg / DAFormer files hold `{"meta": ..., "state_dict": ...}`; DeiT-style files hold
`{"model": ...}`; DataParallel adds `module.` to every key and segmentation checkpoints put the
encoder under `backbone.`. `read_state_dict` undoes all of that and returns a flat
`{name: tensor}` dict.

`check_state_dict` / `load_state_checked` (and `check_keys`, for a loader that gets the key lists
from elsewhere, as timm's) are the one check of every loader (MiT's ImageNet weights, timm
checkpoints, `cluda.checkpoint`): one error that names the file and every missing, unexpected and
shape-mismatched key (up to 8 of each), never a partial load.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Dict, List, Sequence, Union

import torch
from torch import nn

from cluda.errors import CheckpointError

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


def _preview(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_keys(what: str, *, missing: Sequence[str] = (), unexpected: Sequence[str] = (),
               mismatched: Sequence[str] = ()) -> None:
    """Raise `CheckpointError` ("<what>: 2 missing key(s): ...; 1 unexpected key(s): ...") unless
    every list is empty.

    Args:
        what: names the file and the network, e.g. "checkpoint 'x.pth' does not fit mit_b5".
        missing: keys the network has and the file lacks.
        unexpected: keys the file has and the network lacks.
        mismatched: "key: checkpoint (shape) vs model (shape)" strings.
    """
    problems: List[str] = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_preview(list(missing))}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_preview(list(unexpected))}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_preview(list(mismatched))}")
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))


def check_state_dict(expected: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor], *,
                     what: str) -> None:
    """`check_keys` for a state dict against `expected` (a network's `state_dict()`)."""
    check_keys(
        what,
        missing=[k for k in expected if k not in state],
        unexpected=[k for k in state if k not in expected],
        mismatched=[f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                    for k in expected if k in state and state[k].shape != expected[k].shape])


def load_state_checked(model: nn.Module, state: Dict[str, torch.Tensor], *, what: str) -> None:
    """`model.load_state_dict(state)` after `check_state_dict`: all of it or nothing."""
    check_state_dict(model.state_dict(), state, what=what)
    model.load_state_dict(state)

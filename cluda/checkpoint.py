"""Checkpoint files: `save_checkpoint` (atomic), `load_checkpoint` (clear errors for a missing,
truncated or foreign file), the config stored in one, and `load_model_from_checkpoint`, the one
loader of a trained network (`train.py --eval-only`, `python -m cluda.evaluate`, `python -m
cluda.predict`); `save_training_state` / `restore_training_state` for `train.py`'s checkpoints
and resume.

A checkpoint written by `train.py` is a dict read back with `torch.load(weights_only=True)`:
"format" (`CHECKPOINT_FORMAT`), "config" (the resolved config as a plain dict), "iteration"
(iterations done), "student" / "teacher" (state dicts; no teacher in source-only runs),
"optimizer", "scheduler", "rng", "best", "evaluated".
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any, Dict, List, Literal, Sequence, Tuple, Union

import torch
from torch import nn

from cluda.build import build_model
from cluda.config import (Config, ConfigError, apply_overrides, from_dict, load_experiment,
                          parse_overrides, to_dict, validate)
from cluda.device import rng_states, set_rng_states
from cluda.errors import CheckpointError
from cluda.fileio import atomic_open
from cluda.models.weights import load_state_checked
from cluda.optim import restore_optimizer
from cluda.runs import flatten

__all__ = ["CHECKPOINT_FORMAT", "save_checkpoint", "load_checkpoint", "config_from_checkpoint",
           "model_config_differences", "load_model_from_checkpoint", "save_training_state",
           "restore_training_state"]

CHECKPOINT_FORMAT = "cluda-checkpoint-v1"


def save_checkpoint(path: Union[str, os.PathLike], state: Dict[str, Any]) -> None:
    """Write `state` (plus the format tag) to `path` atomically.

    Written through `cluda.fileio.atomic_open`: if anything fails on the way, the previous file
    at `path`, if any, is left intact.

    Args:
        path: destination, e.g. `<out>/latest.pt`.
        state: tensors and plain Python containers / numbers / strings (the file is read back with
            `torch.load(weights_only=True)`); should hold "config" (a plain dict) and "iteration".
    """
    with atomic_open(path, "wb") as f:
        torch.save(dict(state, format=CHECKPOINT_FORMAT), f)


def load_checkpoint(path: Union[str, os.PathLike], *, map_location="cpu") -> Dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`.

    Raises:
        FileNotFoundError: no file at `path`.
        CheckpointError (a ValueError): the file is truncated / corrupt, or is not a cluda
            checkpoint; the message names the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # weights_only: a checkpoint is data, never code to run.
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for a truncated or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: the file is truncated, corrupt or not a "
                         f"torch checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a cluda training checkpoint (expected format "
                         f"{CHECKPOINT_FORMAT!r}, found {found!r})")
    missing = [k for k in ("config", "iteration", "student") if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}")
    return state


def config_from_checkpoint(state: Dict[str, Any], *, path: str = "checkpoint",
                           overrides: Sequence[str] = ()) -> Config:
    """The Config stored in a loaded checkpoint, with optional `--section.key=value` overrides."""
    data = state["config"]
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: the stored config is not a mapping")
    data = apply_overrides(copy.deepcopy(data), parse_overrides(overrides), Config)
    try:
        return validate(from_dict(Config, data))
    except ConfigError as err:
        raise ConfigError(f"{path}: stored config: {err}") from None


def model_config_differences(stored: Dict[str, Any], cfg: Config) -> List[str]:
    """Where the `model` section of `cfg` differs from a checkpoint's stored config.

    Args:
        stored: the checkpoint's "config" entry (a plain nested dict; keys it lacks count as the
            schema's defaults).
        cfg: the config the network is about to be built from.

    Returns:
        One "model.key: <value> here, <value> in the checkpoint" string per differing key,
        `model.pretrained` left out (the weights come from the checkpoint anyway).
    """
    used = flatten(to_dict(cfg)["model"], "model.")
    defaults = flatten(to_dict(Config())["model"], "model.")
    raw = stored.get("model") if isinstance(stored, dict) else None
    have = flatten(raw, "model.") if isinstance(raw, dict) else {}
    return [f"{key}: {value!r} here, {have.get(key, defaults.get(key))!r} in the checkpoint"
            for key, value in used.items()
            if key != "model.pretrained" and have.get(key, defaults.get(key)) != value]


def load_model_from_checkpoint(path: Union[str, os.PathLike], *,
                               config: Union[None, str, os.PathLike, Config] = None,
                               overrides: Sequence[str] = (),
                               weights: Literal["student", "teacher"] = "student"
                               ) -> Tuple[nn.Module, Config, Dict[str, Any]]:
    """Rebuild a trained network from a `train.py` checkpoint, reading the file once: the one
    loader of `train.py --eval-only`, `python -m cluda.evaluate` and `python -m cluda.predict`.

    The network is built from the checkpoint's stored config, or from `config` when given (a YAML
    file, e.g. with other data paths on this machine, or a `Config`); `--section.key=value`
    overrides apply to a stored or YAML config. The weights must fit the network exactly
    (`load_state_checked`); when they do not and the model section in use differs from the stored
    one, the error names those keys.

    Args:
        path: a `latest.pt` / `best.pt` written by `train.py`.
        config: None (the stored config), a YAML experiment or a `Config` used instead of it.
        overrides: `--section.key=value` strings (e.g. another eval mode).
        weights: "student" (the trained network, what DAFormer / HRDA evaluate) or "teacher"
            (the EMA network).

    Returns:
        (network in eval mode on the CPU, its Config, info) with info = {"checkpoint": path,
        "iteration": int (-1 if not stored), "weights": str, "model_differences": the model keys
        that differ from the stored config without changing the weights' shapes (e.g.
        `model.hrda.hr_slide_size`)}.

    Raises:
        FileNotFoundError / CheckpointError: see `load_checkpoint`; CheckpointError also for no
            such weights in the file or weights that do not fit the network.
        ConfigError: a bad config file or override.
    """
    path = os.fspath(path)
    if weights not in ("student", "teacher"):
        raise ValueError(f"weights must be 'student' or 'teacher', got {weights!r}")
    state = load_checkpoint(path, map_location="cpu")
    if isinstance(config, Config):
        cfg = validate(config)
    elif config is not None:
        cfg = load_experiment(os.fspath(config), list(overrides))
    else:
        cfg = config_from_checkpoint(state, path=path, overrides=tuple(overrides))
    if state.get(weights) is None:
        hint = " (a source-only run has no teacher; use the student)" if weights == "teacher" else ""
        raise CheckpointError(f"checkpoint {path} holds no {weights} weights{hint}")
    diffs = model_config_differences(state["config"], cfg)
    # The weights come from the checkpoint: never read an ImageNet file for the encoder.
    model = build_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=None)))
    try:
        load_state_checked(model, state[weights], what=f"checkpoint {path} ({weights} weights) does "
                           "not fit the network built from the config")
    except CheckpointError as err:
        if not diffs:
            raise
        where = (f"config {os.fspath(config)} differs" if isinstance(config, (str, os.PathLike))
                 else "the config differs" if config is not None else "the overrides differ")
        raise CheckpointError(f"{err}; {where} from the checkpoint's stored config in "
                              + "; ".join(diffs)) from err
    iteration = state.get("iteration")
    info = {"checkpoint": path, "iteration": int(iteration) if iteration is not None else -1,
            "weights": weights, "model_differences": diffs}
    return model.eval(), cfg, info


def save_training_state(path: str, *, cfg: Config, it_next: int, student: nn.Module,
                        teacher: nn.Module | None, optimizer: torch.optim.Optimizer, scheduler,
                        best: Dict[str, Any], evaluated: bool = True) -> None:
    """Save the training state after `it_next` iterations (atomically): the config, the student,
    the teacher, the optimiser and schedule, the RNG states, the best evaluation so far.
    `evaluated`: False when the file is written before that iteration's evaluation (a resume
    runs it first)."""
    save_checkpoint(path, {
        "config": to_dict(cfg), "iteration": it_next, "student": student.state_dict(),
        "teacher": None if teacher is None else teacher.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": rng_states(), "best": best, "evaluated": evaluated})


def restore_training_state(state: Dict[str, Any], *, path: str, student: nn.Module,
                           teacher: nn.Module | None, optimizer: torch.optim.Optimizer,
                           scheduler) -> Dict[str, Any] | None:
    """Put a checkpoint's training state back: the student and teacher (checked key by key; a
    source-only checkpoint starts the teacher from its student), the optimiser's moments with the
    current config's hyperparameters and schedule (`cluda.optim.restore_optimizer`), the RNG
    states. Returns the checkpoint's best evaluation (None if it has none)."""
    start_iter = int(state["iteration"])
    load_state_checked(student, state["student"], what=f"checkpoint {path} (student)")
    if teacher is not None and state.get("teacher") is not None:
        load_state_checked(teacher, state["teacher"], what=f"checkpoint {path} (teacher)")
    elif teacher is not None:
        teacher.load_state_dict(student.state_dict())
    restore_optimizer(optimizer, scheduler, state, start_iter)
    set_rng_states(state["rng"])
    return dict(state["best"]) if state.get("best") else None

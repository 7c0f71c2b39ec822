"""What the command lines (`python -m cluda.evaluate`, `python -m cluda.predict`) share: config
overrides next to their flags, the flags that are shortcuts for overrides, the output folder
check, and the note when a checkpoint's network is built with other model settings.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from cluda.config import split_overrides
from cluda.errors import InputError

__all__ = ["parse_cli", "flag_overrides", "check_out_dir", "note_model_differences"]


def parse_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
              *, intermixed: bool = False) -> tuple[argparse.Namespace, list[str]]:
    """Parse `argv`: (the parsed flags, the `--section.key=value` config overrides in order;
    `cluda.config.split_overrides`). Anything else the parser does not know is a usage error
    (exit status 2)."""
    rest, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    if intermixed:
        args, extra = parser.parse_known_intermixed_args(rest)
    else:
        args, extra = parser.parse_known_args(rest)
    if extra:
        parser.error(f"unrecognised arguments {extra}; config overrides are --section.key=value")
    return args, overrides


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The common flags as `--section.key=value` overrides (values written as Python literals,
    which `cluda.config.parse_overrides` reads back exactly)."""
    out = []
    for flag, key in (("split", "data.val.split"), ("protocols", "eval.protocols"),
                      ("flip", "eval.flip"), ("scales", "eval.scales"), ("mode", "eval.mode"),
                      ("device", "experiment.device")):
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"--{key}={list(value) if isinstance(value, list) else value!r}")
    return out


def check_out_dir(path: str | os.PathLike) -> Path:
    """An output folder that exists or can be created (checked before any work is done)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"output folder {path} exists and is not a folder")
    return path


def note_model_differences(diffs: Sequence[str]) -> None:
    """Tell the user (stderr) that the network was built with model settings other than the
    stored ones: the weights fit, but inference may differ (e.g. HRDA's HR window size)."""
    if diffs:
        print("note: the model section differs from the checkpoint's stored config (the weights "
              "fit): " + "; ".join(diffs), file=sys.stderr)

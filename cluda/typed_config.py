"""Filling a tree of typed dataclasses from a YAML file and command-line overrides.

As timm's ``train.py``: the YAML file sets values and ``--section.key=value`` on the command line
wins. As nanoGPT's configurator: values are parsed with ``ast.literal_eval`` (a bare word stays a
string), checked against the field's type, and an unknown key fails with the list of known ones.

This module knows nothing of the experiment: the schema (``Config`` and its sections), its
validation and ``load_experiment`` are ``cluda.config``'s, which re-exports these names.
"""
import ast
import dataclasses
import os
import re
import typing
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

import yaml

from cluda.errors import UserError
from cluda.fileio import atomic_open

__all__ = ["ConfigError", "from_dict", "to_dict", "load_config", "split_overrides",
           "parse_overrides", "apply_overrides", "save_yaml"]


class ConfigError(UserError, ValueError):
    """A configuration value or key is wrong; the message names it (a user error: the command
    lines print it as one line, see `cluda.errors`)."""


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, List, tuple, Tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, where: str):
    """Check `value` against the annotation `tp` and return it in canonical form (lists for
    sequences, floats for float fields given an int). Raises ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Union:
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(tp)):
            return None
        if len(options) == 1:  # Optional[X]: X's own message is the most precise
            return _coerce(value, options[0], where)
        for arg in options:
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: expected one of {list(choices)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
            return [_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        elem = args[0] if args else Any
        return [_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp!r} in the schema")


def from_dict(cls, data: Dict[str, Any], where: str = ""):
    """Build the dataclass `cls` from a (possibly partial) nested mapping; missing keys keep their
    defaults, unknown keys raise ConfigError with the list of known keys."""
    if data is None:
        data = {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {', '.join(_join(where, k) for k in unknown)}; known keys"
            f"{' of ' + where if where else ''}: {', '.join(fields)}")
    kwargs = {name: _coerce(value, hints[name], _join(where, name)) for name, value in data.items()}
    return cls(**kwargs)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def to_dict(cfg) -> Dict[str, Any]:
    """Dataclass tree -> plain nested dict (YAML / checkpoint friendly)."""
    return dataclasses.asdict(cfg)


_OVERRIDE = re.compile(r"--[A-Za-z_]\w*(\.\w+)+=")


def split_overrides(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(the other arguments, the `--section.key=value` overrides), each in order.

    Every command line takes its overrides out before argparse sees the rest: argparse reads an
    argument that starts with "-" and holds a space (`--eval.stride=[256, 256]`) as a positional
    one, e.g. as the config path."""
    overrides = [a for a in argv if _OVERRIDE.match(a)]
    return [a for a in argv if not _OVERRIDE.match(a)], overrides


def parse_overrides(args: Sequence[str]) -> Dict[str, Any]:
    """``["--cl.temperature=0.1", "--model.backbone=mit_b0"]`` -> ``{"cl.temperature": 0.1, ...}``.
    Values go through ``ast.literal_eval``; what does not parse (a bare word) stays a string, and
    ``null`` / ``true`` / ``false`` are accepted as in YAML."""
    out = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"override {arg!r} is not of the form --section.key=value")
        key, text = arg[2:].split("=", 1)
        out[key] = _parse_value(text)
    return out


def _parse_value(text: str):
    lowered = text.strip().lower()
    if lowered in ("null", "none", "~"):
        return None
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(data: Dict[str, Any], overrides: Dict[str, Any], cls) -> Dict[str, Any]:
    """Set dotted keys in the nested mapping `data`, checking every path against the schema `cls`
    so a typo fails here with the known keys rather than later."""
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node, node_cls = data, cls
        for depth, part in enumerate(parts):
            fields = {f.name for f in dataclasses.fields(node_cls)}
            where = ".".join(parts[:depth])
            if part not in fields:
                raise ConfigError(f"unknown key {dotted!r}; known keys"
                                  f"{' of ' + where if where else ''}: {', '.join(sorted(fields))}")
            tp = typing.get_type_hints(node_cls)[part]
            if depth == len(parts) - 1:
                node[part] = value
            else:
                if not dataclasses.is_dataclass(tp):
                    raise ConfigError(f"{'.'.join(parts[:depth + 1])} is a value, not a section "
                                      f"(in override {dotted!r})")
                node = node.setdefault(part, {})
                if node is None:
                    node = {}
                node_cls = tp
    return data


def load_config(cls, path: Optional[str] = None, overrides: Sequence[str] = ()):
    """Read the YAML file at `path` (or start from the schema's defaults), apply command-line
    overrides, and return a checked instance of `cls`."""
    data: Dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    data = apply_overrides(data, parse_overrides(overrides), cls)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None


def save_yaml(data: Dict[str, Any], path: str) -> None:
    """Write `data` as YAML atomically (`cluda.fileio.atomic_open`)."""
    with atomic_open(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)

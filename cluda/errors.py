"""User errors, and how the command lines report them.

A *user error* is a problem the person running a command can fix without changing the code: a
missing, truncated or unreadable file, a config value out of range, a device that is not there, a
full or read-only disk. The command lines (`train.py`, `python -m cluda.evaluate`, `python -m
cluda.predict`, `python -m cluda.data.prepare`) print it as one line on stderr,

    error: <what is wrong, naming the file or the config key>

and exit with status 2. Any other exception is a bug: it shows its traceback (status 1). With the
environment variable `CLUDA_DEBUG=1` a user error shows its traceback too (status still 2).

The user errors (`is_user_error`):

- `UserError` and its subclasses, raised where bad input enters the program:
  `cluda.config.ConfigError` (config keys and values), `DataError` (image, label and class
  statistics files), `CheckpointError` (a checkpoint file, or weights that do not fit the
  network), `OutputError` (an output that cannot be written; names the path), `InputError`
  (the command lines' other inputs: image paths, output folders, option values). Those that describe a bad value also subclass `ValueError`, so
  callers that catch ValueError keep working.
- OSErrors about a path the user gave (FileNotFoundError, FileExistsError, PermissionError,
  IsADirectoryError, NotADirectoryError) or about the disk (full, read-only, over quota: `DISK_ERRNOS`).
- Running out of memory (`torch.cuda.OutOfMemoryError`, `MemoryError`): the fix is a smaller
  input, batch or window, not a code change.

A plain ValueError, TypeError, RuntimeError ... is not a user error: the code that checks user
input raises one of the types above, so anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
import traceback
from typing import Any, Callable, Iterator, Optional, Sequence

__all__ = ["UserError", "DataError", "CheckpointError", "OutputError", "NonFiniteError", "InputError",
           "DISK_ERRNOS", "DEBUG_ENV", "EXIT_STATUS_HELP", "is_user_error", "input_errors", "describe",
           "debug_enabled", "run_cli"]

DEBUG_ENV = "CLUDA_DEBUG"

# The epilog every command line's --help ends with.
EXIT_STATUS_HELP = (
    "exit status: 0 done; 2 bad input (an unreadable, truncated or missing file, a bad config\n"
    "value, no CUDA device, a full or read-only disk, too little memory): one line on stderr\n"
    "naming the problem, no traceback (CLUDA_DEBUG=1 shows it), no half-written file.")

# errno values that mean "the disk refused the write", not "the code is wrong".
DISK_ERRNOS = frozenset(getattr(errno, name) for name in
                        ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "EFBIG", "EIO")
                        if hasattr(errno, name))


class UserError(Exception):
    """A problem the user can fix; the message says what is wrong and names the file or key."""


class DataError(UserError, ValueError):
    """An image, label or class-statistics file that cannot be read or does not make sense."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing pieces, truncated, foreign, or does not fit the network."""


class OutputError(UserError, OSError):
    """An output file that cannot be written (disk full, read-only, no permission).

    Args:
        path: the file that was being written (not the hidden temporary it goes through).
        cause: the OSError raised by the system.
    """

    def __init__(self, path: Any, cause: OSError) -> None:
        self.message = f"cannot write {os.fspath(path)}: {cause.strerror or cause}"
        super().__init__(self.message)
        self.errno, self.strerror, self.filename = cause.errno, cause.strerror, os.fspath(path)

    def __str__(self) -> str:  # OSError's own would print "[Errno N] strerror: 'filename'"
        return self.message


class NonFiniteError(UserError, FloatingPointError):
    """Training met a non-finite loss or gradient under `train.nonfinite: stop`: a setting to
    change (lr, cl.temperature, train.amp), not a bug."""


class InputError(UserError):
    """Bad input to a command line the user can fix: an image path, an output folder, an option
    value, a data set that cannot be read (see `input_errors`)."""


_PATH_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                NotADirectoryError)


def _memory_errors() -> tuple:
    kinds: list = [MemoryError]
    try:
        import torch
        kinds.append(torch.cuda.OutOfMemoryError)
    except (ImportError, AttributeError):
        pass
    return tuple(kinds)


def is_user_error(err: BaseException) -> bool:
    """Whether `err` is a user error (see the module docstring) rather than a bug."""
    if isinstance(err, (UserError,) + _PATH_ERRORS + _memory_errors()):
        return True
    return isinstance(err, OSError) and err.errno in DISK_ERRNOS


@contextlib.contextmanager
def input_errors() -> Iterator[None]:
    """Turn the errors that bad files and configs raise while a command line loads its inputs
    (FileNotFoundError, PermissionError, ValueError) into one-line `InputError`s.

    Only the loading steps run inside it, so a bug in the model or the metrics still shows its
    traceback."""
    try:
        yield
    except InputError:
        raise
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
            ValueError) as err:
        raise InputError(" ".join(str(err).split())) from err  # one line


# A DataLoader worker's exception comes back as the same type whose message is the worker's
# whole traceback; its last line is "<qualified type>: <original message>".
_WORKER_MARK = "Original Traceback (most recent call last):"
_TYPE_PREFIX = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt): ")


def describe(err: BaseException) -> str:
    """The one-line message of a user error: the original message of an error re-raised by a
    DataLoader worker, "<reason>: <path>" for a system OSError, whitespace collapsed."""
    text = str(err)
    if _WORKER_MARK in text:
        last = text.rstrip().splitlines()[-1]
        text = _TYPE_PREFIX.sub("", last, count=1)
    elif isinstance(err, OSError) and not isinstance(err, UserError) and err.strerror:
        names = [os.fspath(f) for f in (err.filename, err.filename2) if f is not None]
        text = err.strerror + (f": {' -> '.join(names)}" if names else "")
    if isinstance(err, _memory_errors()):
        text = f"out of memory ({type(err).__name__}): {text}"
    return " ".join(text.split()) or type(err).__name__


def debug_enabled() -> bool:
    """`CLUDA_DEBUG` set to anything but "", "0", "false", "no"."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _close_progress_bars() -> None:
    """Close the tqdm bars an error left open (e.g. training's), so that the error line starts
    on a line of its own instead of after a half-drawn bar."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def run_cli(main: Callable[[Optional[Sequence[str]]], Any],
            argv: Optional[Sequence[str]] = None) -> int:
    """Run a command line's `main(argv)` and turn a user error into one line on stderr and exit
    status 2 (with the traceback first under CLUDA_DEBUG=1). Bugs propagate with their
    traceback; argparse's own exit (status 2 for a usage error) passes through.

    Returns:
        `main`'s return value if it is an int, else 0; 2 after a user error.
    """
    try:
        status = main(argv)
    except Exception as err:  # noqa: BLE001 - re-raised unless it is a user error
        if not is_user_error(err):
            raise
        _close_progress_bars()
        if debug_enabled():
            traceback.print_exc()
        print(f"error: {describe(err)}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) and not isinstance(status, bool) else 0

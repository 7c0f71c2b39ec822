"""Atomic file writes, shared by every module that writes outputs (configs, label PNGs, class
statistics, metric tables, checkpoints).

A file is written to a hidden temporary file beside its destination, flushed and fsynced, then
renamed over the destination with `os.replace` (atomic on POSIX within one file system), and the
folder is fsynced so the rename itself survives a crash. Readers see the old file or the complete
new one, never a half-written one; if anything fails on the way, the temporary file is removed and
the previous file is left intact.

An OSError on the way (disk full, read-only file system, no permission) is raised as
`cluda.errors.OutputError` (an OSError) naming the destination, not the hidden temporary file,
so the command lines report it in one line.
"""
import contextlib
import os
import secrets
from pathlib import Path
from typing import IO, Iterator, List, Mapping, Union

from cluda.errors import DISK_ERRNOS, OutputError

PathLike = Union[str, os.PathLike]

__all__ = ["atomic_open", "atomic_write", "atomic_write_files"]


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _create(tmp: Path) -> int:
    # 0o666 under the umask, like open(): tempfile.mkstemp would make the file private (0o600).
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (best effort: some file systems refuse it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb") -> Iterator[IO]:
    """``with atomic_open(path, "w") as f: ...`` writes `path` atomically when the block ends
    without an exception; on an exception nothing at `path` changes.

    Args:
        path: destination; its parent folders are created.
        mode: "wb" or "w" (text, UTF-8).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a whole file: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_path(path)
        fd = _create(tmp)
    except OSError as err:
        raise OutputError(path, err) from err
    in_block = True
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            in_block = False
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        # The caller's block may raise OSErrors of its own (a file it reads); only the disk's
        # refusals are about writing `path`. Flushing, closing and renaming are ours.
        if isinstance(err, OSError) and not isinstance(err, OutputError) and (
                not in_block or err.errno in DISK_ERRNOS):
            raise OutputError(path, err) from err
        raise
    _fsync_folder(path.parent)


def atomic_write_files(files: Mapping[PathLike, Union[bytes, str]]) -> List[Path]:
    """Write several files so that none is ever seen half-written.

    Every payload first goes to its temporary file; only when all of them are on disk is each
    renamed over its destination. If anything fails before that, the temporary files are removed
    and no destination is touched.

    Args:
        files: {destination path: bytes, or str (written as UTF-8)}; parent folders are created.

    Returns:
        The destination paths, in the order given.
    """
    payloads = []
    for path, data in files.items():
        if isinstance(data, str):
            data = data.encode("utf-8")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload for {path} must be bytes or str, got {type(data).__name__}")
        payloads.append((Path(path), data))
    temps = []
    path = None
    try:
        for path, data in payloads:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = _temp_path(path)
            fd = _create(tmp)
            temps.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        while temps:
            tmp, path = temps[0]
            os.replace(tmp, path)
            temps.pop(0)
    except OSError as err:
        raise OutputError(path, err) from err
    finally:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    for folder in {path.parent for path, _ in payloads}:
        _fsync_folder(folder)
    return [path for path, _ in payloads]


def atomic_write(path: PathLike, data: Union[bytes, str]) -> Path:
    """Write one file atomically (see `atomic_write_files`)."""
    return atomic_write_files({path: data})[0]

"""The run folder (`experiment.work_dir / experiment.name`): what protects it and what it records.

- A folder that holds a run (any of its outputs, `RUN_FILES`) is not started in again unless the
  run is resumed (`--resume`) or replaced (`--overwrite`, which removes the previous run's outputs
  and nothing else, and only once every start-up check has passed).
- One training process per folder: `RunFolder` holds an exclusive `fcntl.flock` on
  `<folder>/.lock` for the run's lifetime. The kernel drops the lock when the process ends, however
  it ends, so a killed run never leaves a stale lock behind.
- Temporary files of atomic writes (`cluda.fileio`) left by a killed process are removed.
- A resume compares the config with the one stored in the checkpoint (`config_changes`): run
  control (devices, threads, intervals, evaluation settings) may change freely, `train.max_iters`
  rebuilds the learning-rate schedule, anything else needs `--allow-changes`; the previous config
  is then kept as `config.until_<iteration>.yaml`, so the folder always records what ran.
"""
import errno
import fcntl
import os
import re
import shutil
from typing import Any, Dict, List, Optional, Tuple

from cluda.config import Config, ConfigError, to_dict

__all__ = ["check_resume", "RUN_FILES", "FREE_ON_RESUME", "RunFolder", "history_name", "flatten", "config_changes",
           "needs_permission", "describe"]

# What train.py writes into a run folder ("tb" is a folder; config.until_*.yaml are matched apart).
RUN_FILES = ("config.yaml", "log.csv", "eval.csv", "curves.png", "latest.pt", "best.pt",
             "val_latest.md", "val_latest.csv", "val_best.md", "val_best.csv", "tb")
_HISTORY = re.compile(r"^config\.until_\d+\.yaml$")
# cluda.fileio's temporary names: .<name>.<pid>.<8 hex digits>.tmp
_TEMPORARY = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")

# Keys a resume may change without --allow-changes: they decide where and how fast the run goes
# and how it is evaluated, not what it trains. (train.max_iters is handled apart: the schedule.)
FREE_ON_RESUME = ("experiment.name", "experiment.work_dir", "experiment.device", "experiment.threads",
                  "experiment.deterministic", "data.workers", "data.val.", "model.pretrained",
                  "cl.impl", "cl.triton_variant", "train.log_interval", "train.eval_interval",
                  "train.checkpoint_interval", "train.tensorboard", "train.max_iters", "eval.")


def history_name(iteration: int) -> str:
    """File name under which a config that ran until `iteration` is kept."""
    return f"config.until_{iteration}.yaml"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunFolder:
    """The output folder of one training run, locked for this process.

    Args:
        path: the folder (created if missing).
        resume: the run is resumed (the folder may hold a run).
        overwrite: the folder may hold a run, whose outputs `clear()` removes.

    Raises:
        ConfigError: the folder holds a run and neither `resume` nor `overwrite` is set, or another
            process is training in it.
    """

    def __init__(self, path: str, *, resume: bool, overwrite: bool) -> None:
        self.path = path
        try:
            os.makedirs(path, exist_ok=True)
            self._lock = open(os.path.join(path, ".lock"), "a+")
        except OSError as err:
            raise ConfigError(f"cannot use run folder {path}: {err.strerror or err}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            self._lock.close()
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"another process is training in {path} (it holds {path}/.lock); "
                                  "wait for it to end or choose another experiment.name") from None
            raise
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"{os.getpid()}\n")
        self._lock.flush()
        found = self.outputs()
        if found and not (resume or overwrite):
            self.release()
            raise ConfigError(
                f"{path} holds a run ({', '.join(found[:4])}{' ...' if len(found) > 4 else ''}): "
                "add --resume to continue it, --overwrite to replace it, or choose another "
                "experiment.name")
        self.removed_temporaries = self._remove_stale_temporaries()

    def outputs(self) -> List[str]:
        """Names of the run outputs present in the folder."""
        names = sorted(os.listdir(self.path))
        return [n for n in names if n in RUN_FILES or _HISTORY.match(n)]

    def _remove_stale_temporaries(self) -> List[str]:
        """Remove temporary files of atomic writes whose writer process is gone."""
        removed = []
        for name in sorted(os.listdir(self.path)):
            m = _TEMPORARY.match(name)
            if m and not _pid_alive(int(m.group(1))):
                try:
                    os.unlink(os.path.join(self.path, name))
                    removed.append(name)
                except FileNotFoundError:
                    pass
        return removed

    def clear(self) -> List[str]:
        """Remove the previous run's outputs (for --overwrite); other files stay. Returns them."""
        found = self.outputs()
        for name in found:
            p = os.path.join(self.path, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
        return found

    def release(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (lists stay values)."""
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def config_changes(stored: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    """{dotted key: (stored value, new value)} for every key whose value differs."""
    a, b = flatten(stored), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def needs_permission(changes: Dict[str, Tuple[Any, Any]]) -> List[str]:
    """The changed keys a resume may not take without --allow-changes."""
    def free(key: str) -> bool:
        return any(key == f or (f.endswith(".") and key.startswith(f)) for f in FREE_ON_RESUME)
    return [k for k in changes if not free(k)]


def describe(changes: Dict[str, Tuple[Any, Any]], keys: Optional[List[str]] = None) -> str:
    """"optim.lr 6e-05 -> 0.0001, train.max_iters 16 -> 24"."""
    keys = list(changes) if keys is None else keys
    return ", ".join(f"{k} {changes[k][0]!r} -> {changes[k][1]!r}" for k in keys)


def check_resume(cfg: Config, stored: Config, *, path: str, allow_changes: bool,
                 start_iter: int) -> Dict:
    """The config changes of a resume ({key: (stored, new)}); raises ConfigError for changes that
    need --allow-changes without it, and for a schedule that already ended."""
    changes = config_changes(to_dict(stored), to_dict(cfg))
    gated = needs_permission(changes)
    if gated and not allow_changes:
        raise ConfigError(
            f"cannot resume from {path}: the config differs from the checkpoint's in "
            f"{describe(changes, gated)}; add --allow-changes to resume with them (they apply "
            f"from iteration {start_iter + 1}; the previous config is kept as "
            f"{history_name(start_iter)}), or start a new run (another experiment.name, or "
            "--overwrite)")
    if start_iter > cfg.train.max_iters:
        raise ConfigError(f"cannot resume from {path}: it has done {start_iter} iterations, more than "
                          f"train.max_iters {cfg.train.max_iters}")
    return changes

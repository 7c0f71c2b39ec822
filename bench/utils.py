"""Shared benchmark plumbing: device and revision stamps, one measured call (time and peak memory),
timing statistics, the matrix-multiply rate of the device, and the results CSV.

Peak memory is the growth above what is allocated when the call starts:

- CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, minus
  `memory_allocated` at the start (tensors only; the caching allocator's reserve is not counted).
- CPU: the process's peak resident set size. Linux resets the high-water mark VmHWM to the current
  RSS when "5" is written to /proc/self/clear_refs (Linux >= 4.0); freed heap memory is first handed
  back to the OS with glibc's `malloc_trim(0)`, so that memory freed by an earlier call and still
  held by malloc cannot hide a new allocation. The peak is VmHWM after the call minus VmRSS before
  it. It counts every page the process touches (also a library loaded during the call), so the
  call is warmed up first.
"""
import csv
import ctypes
import ctypes.util
import gc
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# Stamps: what ran where


def device_name(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3' on CUDA; on a CPU the model name and the usable core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model} CPU, {cores} cores"


def git_revision(root: Path = REPO_ROOT) -> str:
    """Short hash of HEAD, with '+dirty' when the measured code (kernels/, bench/ without
    bench/results/) differs from HEAD or holds untracked files.

    Only those paths count: other parts of the tree do not change what is measured. The variable
    CLUDA_GIT_REV wins (for a copy of the tree without .git, e.g. on the device machine), and
    'unknown' is returned when git cannot answer.
    """
    override = os.environ.get("CLUDA_GIT_REV")
    if override:
        return override
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, check=True,
                             capture_output=True, text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "kernels", "bench", ":(exclude)bench/results"],
            cwd=root, check=True, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def library_versions() -> Dict[str, str]:
    """torch and triton versions ('-' when triton does not import)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    return {"torch": torch.__version__, "triton": triton_version}


# ---------------------------------------------------------------------------------------------
# Peak memory of one call


def _status_kib(key: str) -> int:
    """A 'VmRSS' / 'VmHWM' line of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {key} line")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the OS does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_LIBC = None


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS (glibc only; a no-op elsewhere)."""
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        _LIBC = ctypes.CDLL(name) if name else False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def cpu_peak_rss_supported() -> bool:
    return Path("/proc/self/status").exists() and _reset_peak_rss()


def measure_call(fn: Callable[[], object], device: torch.device,
                 grad_to_none: Sequence[torch.Tensor] = ()) -> Tuple[float, Optional[int]]:
    """Run `fn` once; return (wall seconds, peak memory growth in bytes or None if unmeasurable).

    Args:
        fn: the call to measure; its return value is dropped.
        device: where the call runs (CUDA: allocator statistics; CPU: peak RSS).
        grad_to_none: tensors whose .grad is cleared first, so a call that accumulates a gradient
            allocates it afresh (as in training, where gradients are zeroed to None).
    """
    for t in grad_to_none:
        t.grad = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        return seconds, torch.cuda.max_memory_allocated(device) - base
    _malloc_trim()
    can_reset = cpu_peak_rss_supported()
    base_kib = _status_kib("VmRSS") if can_reset else 0
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    if not can_reset:
        return seconds, None
    return seconds, max(0, _status_kib("VmHWM") - base_kib) * 1024


# ---------------------------------------------------------------------------------------------
# Timing


@dataclass(frozen=True)
class Timing:
    """Median and 20 / 80 % quantiles of one call, in milliseconds.

    Attributes:
        reps: timed calls behind the quantiles (None for do_bench, which picks its own count).
        timer: how the calls were timed.
    """

    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: Optional[int]
    timer: str


def timing_from_samples(samples_s: Iterable[float], timer: str) -> Timing:
    """Median and 20 / 80 % quantiles (numpy's linear interpolation) of call times in seconds."""
    values_ms = np.asarray(list(samples_s), dtype=np.float64) * 1e3
    if values_ms.size == 0:
        raise ValueError("timing_from_samples needs at least one sample")
    median, p20, p80 = (float(q) for q in np.quantile(values_ms, [0.5, 0.2, 0.8]))
    return Timing(median, p20, p80, int(values_ms.size), timer)


def _timed_call(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def time_calls(fn: Callable[[], object], device: torch.device, *, first_call_s: float,
               reps_time_s: float, min_reps: int, max_reps: int, slow_call_s: float,
               grad_to_none: Sequence[torch.Tensor] = ()) -> Timing:
    """Time `fn` after it has run at least once (warm: JIT compiled, first_call_s measured).

    A fast CUDA call (first_call_s < slow_call_s) goes to `triton.testing.do_bench` (25 ms of
    warm-up, 100 ms of repetitions, L2 flushed between calls). Otherwise `fn` runs
    clamp(reps_time_s / first_call_s, min_reps, max_reps) times under `time.perf_counter` (after a
    CUDA synchronize); a slow call's first, already measured, run counts as one of them, so that a
    multi-second cell costs few calls.

    Args:
        fn: the call; its return value is dropped.
        device: the device it runs on.
        first_call_s: wall time of the warm call that was just measured.
        reps_time_s: about how long to spend on repetitions.
        min_reps / max_reps: bounds on the number of timed calls.
        slow_call_s: calls at least this long count the first run and skip do_bench.
        grad_to_none: tensors whose .grad is cleared before every call (outside the timer).
    """
    if device.type == "cuda" and first_call_s < slow_call_s:
        from triton.testing import do_bench
        median, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=list(grad_to_none))
        return Timing(median, p20, p80, None, "do_bench")
    reps = max(min_reps, min(max_reps, math.ceil(reps_time_s / max(first_call_s, 1e-9))))
    samples = [first_call_s] if first_call_s >= slow_call_s else []
    while len(samples) < reps:
        for t in grad_to_none:
            t.grad = None
        samples.append(_timed_call(fn, device))
    return timing_from_samples(samples, "perf_counter" + ("+sync" if device.type == "cuda" else ""))


# ---------------------------------------------------------------------------------------------
# The device's matrix-multiply rate


def matmul_tflops(device: torch.device, kind: str, size: Optional[int] = None) -> float:
    """Dense (size x size) @ (size x size) rate in TFLOP/s on random inputs.

    Args:
        device: where to multiply.
        kind: "bf16", "fp16", "fp32" (IEEE float32) or "tf32" (float32 inputs with TF32 tensor
            cores; CUDA only).
        size: matrix size; 8192 on CUDA and 1024 on a CPU by default.
    """
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
              "tf32": torch.float32}
    if kind not in dtypes:
        raise ValueError(f"kind must be one of {sorted(dtypes)}, got {kind!r}")
    if kind == "tf32" and device.type != "cuda":
        raise ValueError("TF32 matrix multiplies exist only on CUDA devices")
    size = size or (8192 if device.type == "cuda" else 1024)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=gen, device=device).to(dtypes[kind])
    b = torch.randn(size, size, generator=gen, device=device).to(dtypes[kind])
    flops = 2.0 * size ** 3
    if device.type == "cuda":
        from triton.testing import do_bench
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = kind == "tf32"
        try:
            ms = do_bench(lambda: torch.mm(a, b), quantiles=[0.5])
            ms = ms[0] if isinstance(ms, (list, tuple)) else ms  # one quantile: a float
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        return flops / (ms * 1e-3) / 1e12
    torch.mm(a, b)  # warm-up
    samples = [_timed_call(lambda: torch.mm(a, b), device) for _ in range(5)]
    return flops / timing_from_samples(samples, "perf_counter").median_ms * 1e3 / 1e12


# ---------------------------------------------------------------------------------------------
# Results CSV


def append_rows(path: Path, rows: Sequence[Dict[str, object]], columns: Sequence[str]) -> None:
    """Append rows to a CSV, writing the header when the file is new.

    Raises:
        ValueError: the file exists with other columns, or a row has a key outside `columns`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size > 0:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != list(columns):
            raise ValueError(f"{path} has columns {header}, this script writes {list(columns)}: "
                             "move the file away or pass another --out")
        new = False
    else:
        new = True
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="raise")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


def read_rows(path: Path) -> List[Dict[str, str]]:
    """All rows of a results CSV as dicts of strings."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no results file at {path}")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def merge_rows(source: Path, target: Path, columns: Sequence[str], key: Sequence[str]) -> int:
    """Append the rows of `source` (a results CSV, e.g. a GPU run's) that `target` does not hold
    yet, a row being identified by its values of `key`; return how many were appended.

    Raises:
        FileNotFoundError: `source` does not exist.
        ValueError: either file has other columns than `columns`.
    """
    source, target = Path(source), Path(target)
    incoming = read_rows(source)
    if incoming and list(incoming[0]) != list(columns):
        raise ValueError(f"{source} has columns {list(incoming[0])}, expected {list(columns)}")
    have = {tuple(r[k] for k in key) for r in read_rows(target)} if target.exists() else set()
    new = [r for r in incoming if tuple(r[k] for k in key) not in have]
    append_rows(target, new, columns)
    print(f"merged {len(new)} of {len(incoming)} rows from {source} into {target}", flush=True)
    return len(new)

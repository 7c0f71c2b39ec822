"""One benchmark cell measured: every pass (forward, backward through one retained graph, and
both) of one provider at one (N, C, dtype), its time (`bench.utils.time_calls`: `do_bench` on
CUDA, repeated `perf_counter` calls otherwise), peak memory growth (`bench.utils.measure_call`),
useful TFLOP/s and its share of the device's matmul rate, and the bitwise determinism of the
gradients. Guards skip a cell before it runs when its N x N buffers cannot fit, the time budget
is spent or its call is predicted (N^2 scaling) to take too long; an OOM, a guard or a failure is
a status in the cell's rows, not a crash.

Useful FLOPs count 2 r N^2 C for forward, 4 r N^2 C for backward and 6 r N^2 C for both, with r
the fraction of ordered pixel pairs that are eligible (same group, both valid, i != j), computed
from the labels.
"""
import gc
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from bench.pixel_infonce.inputs import DTYPES, Inputs, make_inputs
from bench.pixel_infonce.providers import PROVIDERS, is_triton, make_forward, predicted_peak_bytes
from bench.utils import Timing, measure_call, time_calls

PASSES = ("fwd", "bwd", "full")  # report order; "full" = forward + backward
PASS_FLOP_FACTOR = {"fwd": 2.0, "bwd": 4.0, "full": 6.0}
INTERPRETER_NOTE = "TRITON_INTERPRET=1: numpy interpreter, not the kernel's speed"


@dataclass(frozen=True)
class Cell:
    """One point of the sweep: a provider (`providers.PROVIDERS` or "triton:<preset>") at N
    pixels, C channels and a dtype name of `inputs.DTYPES`."""

    provider: str
    n: int
    c: int
    dtype: str


@dataclass
class Settings:
    """How each cell is measured (the command line's --help gives each value).

    Attributes:
        device: where the cells run.
        passes: which of PASSES to measure.
        warmup: untimed forward + backward calls per cell.
        reps_time_s, min_reps, max_reps, slow_call_s: the timer's settings (`time_calls`).
        max_call_s: skip a cell whose forward + backward is predicted to take longer.
        det_max_s: check determinism when forward + backward takes at most this long (< 0: never).
        mem_limit_bytes: memory the N x N providers may use (`memory_limit`).
        budget_s: start no cell after this many seconds from `start` (None: no budget).
        interp_max_n: largest N for the Triton interpreter on a CPU.
        start: `time.monotonic()` at the start of the sweep.
    """

    device: torch.device
    passes: Tuple[str, ...]
    warmup: int
    reps_time_s: float
    min_reps: int
    max_reps: int
    slow_call_s: float
    max_call_s: float
    det_max_s: float
    mem_limit_bytes: float
    budget_s: Optional[float]
    interp_max_n: int
    start: float


def memory_limit(device: torch.device, max_mem_gib: Optional[float]) -> float:
    """Bytes the N x N providers may use: `max_mem_gib`, else 90 % of the free GPU memory or 70 %
    of the CPU's MemAvailable."""
    if max_mem_gib is not None:
        return max_mem_gib * 2**30
    if device.type == "cuda":
        return 0.9 * torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return 0.7 * int(line.split()[1]) * 1024
    raise OSError("cannot read MemAvailable from /proc/meminfo; pass --max-mem-gib")


def cell_priority(cell: Cell) -> tuple:
    """Sort key: the kernel's target cells first (`report.targets`), then the Triton kernel
    everywhere, then the torch baselines, then torch.compile (a fresh compilation per cell) and
    the largest N elsewhere."""
    target = cell.c == 512 and cell.dtype == "bfloat16"
    if target and (cell.n == 16384 or (cell.provider == "triton" and cell.n == 131072)):
        tier = 0
    elif target and cell.provider == "triton" and cell.n == 524288:
        tier = 1
    elif cell.provider == "triton" and cell.n < 524288:
        tier = 2
    elif cell.provider in ("reference", "torch"):
        tier = 3
    else:
        tier = 4
    return (tier, cell.dtype != "bfloat16", abs(cell.c - 512), cell.c, cell.n,
            PROVIDERS.index(cell.provider))


class History:
    """Measured full-pass seconds per (provider, C, dtype), to predict a larger N's call time."""

    def __init__(self):
        self._seconds: Dict[tuple, Dict[int, float]] = {}

    def add(self, cell: Cell, seconds: float) -> None:
        self._seconds.setdefault((cell.provider, cell.c, cell.dtype), {})[cell.n] = seconds

    def predict(self, cell: Cell) -> Optional[float]:
        """Seconds of one forward + backward, scaled as N^2 from the largest measured N."""
        known = self._seconds.get((cell.provider, cell.c, cell.dtype))
        if not known:
            return None
        n_ref = max(known)
        return known[n_ref] * (cell.n / n_ref) ** 2


def guard(cell: Cell, settings: Settings, history: History) -> Optional[str]:
    """A status that skips the cell before it runs, or None."""
    if is_triton(cell.provider) and settings.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "skipped (no CUDA and TRITON_INTERPRET unset)"
        if cell.n > settings.interp_max_n:
            return f"skipped (interpreter: N > {settings.interp_max_n})"
    peak = predicted_peak_bytes(cell.provider, cell.n)
    if peak is not None and peak > settings.mem_limit_bytes:
        return f"OOM (predicted {peak / 2**30:.1f} GiB)"
    predicted = history.predict(cell)
    if settings.budget_s is not None:
        elapsed = time.monotonic() - settings.start
        # A cell costs about 7 forward + backward calls when its calls are slow.
        if elapsed + 7.0 * (predicted or 0.0) > settings.budget_s:
            return "skipped (time budget)"
    if predicted is not None and predicted > settings.max_call_s:
        return f"skipped (predicted {predicted:.0f} s per call)"
    return None


def _is_oom(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or a CPU allocation failure."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _failure_status(exc: BaseException, during: str) -> str:
    if _is_oom(exc):
        return "OOM"
    message = " ".join(str(exc).split())[:160]
    prefix = "compile failed" if during == "compile" else "error"
    return f"{prefix}: {type(exc).__name__}: {message}"


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def grads_bitwise_equal(full: Callable[[], None], feats: torch.Tensor) -> bool:
    """Two forward + backward passes on the same inputs give bitwise equal feats gradients."""
    grads = []
    for _ in range(2):
        feats.grad = None
        full()
        grads.append(feats.grad.detach().clone())
    feats.grad = None
    return torch.equal(grads[0], grads[1])


def _run_pass(name: str, forward: Callable[[], torch.Tensor], inp: Inputs, settings: Settings,
              interpreted: bool) -> Tuple[Timing, Optional[int]]:
    """Peak memory of one warm call of the pass, then its timing."""
    if name == "fwd":
        fn = forward
    elif name == "full":
        def fn():
            forward().backward(inp.upstream)
    else:  # "bwd": backward through one retained graph
        loss = forward()

        def fn():
            loss.backward(inp.upstream, retain_graph=True)
    device = settings.device
    first_s, peak = measure_call(fn, device, grad_to_none=[inp.feats])
    if interpreted:  # one call is enough for a smoke test: the numbers are the interpreter's
        timing = time_calls(fn, device, first_call_s=first_s, reps_time_s=0.0, min_reps=1,
                            max_reps=1, slow_call_s=0.0, grad_to_none=[inp.feats])
    else:
        timing = time_calls(fn, device, first_call_s=first_s, reps_time_s=settings.reps_time_s,
                            min_reps=settings.min_reps, max_reps=settings.max_reps,
                            slow_call_s=settings.slow_call_s, grad_to_none=[inp.feats])
    inp.feats.grad = None
    return timing, peak


def run_cell(cell: Cell, settings: Settings, history: History,
             base_row: Dict[str, object], matmul: Dict[str, Tuple[str, float]]) -> List[Dict[str, object]]:
    """Measure every pass of one cell; one row per pass, whatever happens.

    Args:
        cell: provider, N, C, dtype.
        settings: measurement settings and guards.
        history: full-pass times measured so far (read for the time guard, updated here).
        base_row: the run's columns (date, device, revision, versions).
        matmul: dtype name -> (matmul kind, TFLOP/s) measured in this run.
    """
    kind, mm_rate = matmul[cell.dtype]
    rows = {p: dict(base_row, provider=cell.provider, n=cell.n, c=cell.c, dtype=cell.dtype,
                    **{"pass": p}, matmul_kind=kind, matmul_tflops=f"{mm_rate:.4g}", status="",
                    note="")
            for p in settings.passes}
    interpreted = is_triton(cell.provider) and settings.device.type == "cpu"

    def finish(status: str) -> List[Dict[str, object]]:
        for row in rows.values():
            row["status"] = row["status"] or status
        return [rows[p] for p in PASSES if p in rows]

    skip = guard(cell, settings, history)
    if skip:
        return finish(skip)
    device = settings.device
    inp = forward = None
    try:
        inp = make_inputs(cell.n, cell.c, DTYPES[cell.dtype], device)
        for row in rows.values():
            row["pair_fraction"] = f"{inp.pair_fraction:.4f}"
        forward = make_forward(cell.provider, inp)
        warm_full = "full" in settings.passes or "bwd" in settings.passes
        start = time.perf_counter()
        try:
            for _ in range(0 if interpreted else settings.warmup):
                inp.feats.grad = None
                loss = forward()
                if warm_full:
                    loss.backward(inp.upstream)
                del loss
        except Exception as exc:  # noqa: BLE001 - a failing provider is a result
            traceback.print_exc()
            return finish(_failure_status(exc, "compile" if cell.provider == "compile" else "run"))
        if cell.provider == "compile" and settings.warmup:
            for row in rows.values():
                row["note"] = (f"compile + first call {time.perf_counter() - start:.1f} s, "
                               "donated buffers off")
        # "full" first: it is the headline number and the one the time guard learns from.
        for name in sorted(settings.passes, key=lambda p: p != "full"):
            row = rows[name]
            try:
                timing, peak = _run_pass(name, forward, inp, settings, interpreted)
            except Exception as exc:  # noqa: BLE001 - an OOM or a failure is a result
                if not _is_oom(exc):
                    traceback.print_exc()
                row["status"] = _failure_status(exc, "run")
                inp.feats.grad = None
                _free(device)
                continue
            flops = PASS_FLOP_FACTOR[name] * inp.pair_fraction * float(cell.n) ** 2 * cell.c
            tflops = flops / (timing.median_ms * 1e-3) / 1e12
            row.update(median_ms=f"{timing.median_ms:.4g}", p20_ms=f"{timing.p20_ms:.4g}",
                       p80_ms=f"{timing.p80_ms:.4g}", reps=timing.reps, timer=timing.timer,
                       peak_mem_mib="" if peak is None else f"{peak / 2**20:.1f}",
                       tflops=f"{tflops:.4g}", share_of_matmul=f"{tflops / mm_rate:.4g}",
                       status="ok")
            if interpreted:
                row["note"] = INTERPRETER_NOTE
            if name == "full":
                history.add(cell, timing.median_ms * 1e-3)
                if not interpreted and timing.median_ms * 1e-3 <= settings.det_max_s:
                    def full():
                        forward().backward(inp.upstream)
                    row["deterministic"] = "yes" if grads_bitwise_equal(full, inp.feats) else "no"
    except Exception as exc:  # noqa: BLE001 - e.g. an OOM while building the inputs
        if not _is_oom(exc):
            traceback.print_exc()
        return finish(_failure_status(exc, "run"))
    finally:
        inp = forward = None  # drop the cell's tensors before the next cell
        _free(device)
    return finish("ok")

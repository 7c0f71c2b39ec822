"""Benchmark of `kernels.pixel_infonce` (CLUDA Eq. 2, issue 3): time, peak memory and useful
TFLOP/s of forward, backward and both, for each implementation ("provider"):

- reference: the naive N x N matrix in plain torch (`impl="reference"`);
- torch:     the tiled pure-torch path (`impl="torch"`);
- triton:    the fused Triton kernels (`impl="triton"`; CUDA, or Triton's numpy interpreter on a
             CPU for N <= --interp-max-n: a smoke test of the plumbing, not the kernel's speed);
- compile:   `torch.compile` of the reference (normalisation + `kernels.reference`, without the
             op's input checks), compiled afresh for every cell; a failure is recorded as such;
- triton:<variant>: the Triton kernels with a launch preset of `kernels.triton_infonce.VARIANTS`
             (`--variants`: the comparison a GPU session picks the default from).

Inputs look like Cityscapes at the decoder's resolution: 19 classes drawn with Cityscapes' pixel
frequencies, 10 % ignored pixels, the stuff / thing groups of CLUDA Sec. 5.5, and ReLU features
around class means (cosine similarity about 0.68 inside a class, 0.32 across), so the similarities
look like a trained model's rather than isotropic noise.

Useful FLOPs count 2 r N^2 C for forward, 4 r N^2 C for backward and 6 r N^2 C for both, with
r the fraction of ordered pixel pairs that are eligible (same group, both valid, i != j),
computed from the labels. Each rate is also given as a share of the matrix-multiply rate measured
on the same device in the same run (bfloat16 rows: bf16 mm; float32 rows: TF32 mm on CUDA, fp32 mm
on a CPU). Peak memory is the growth above the inputs (see bench/utils.py for how it is measured).
An OOM, a size guard ("OOM (predicted X GiB)"), a time guard or a compile failure is a result
recorded in the row, not a crash.

Usage (from the repository root):
    python -m bench.bench_pixel_infonce --quick                  # small CPU sweep, < 1 min
    python -m bench.bench_pixel_infonce --budget-s 300           # the GPU sweep
    python -m bench.bench_pixel_infonce --variants all --n 131072,16384 --c 512 --dtype bfloat16
                                                                 # the launch variants (GPU)
    python -m bench.bench_pixel_infonce --standin-memory         # the Triton path's wrapper
                                                                 # memory on a CPU (see below)
    python -m bench.bench_pixel_infonce --report-only            # rebuild .md / .png from the CSV
    python -m bench.bench_pixel_infonce --merge OTHER.csv         # add another run's rows (a GPU's)

Rows are appended to OUT/pixel_infonce.csv (default OUT: bench/results); OUT/pixel_infonce.md is
rebuilt from the whole CSV (one section per run, newest first) and OUT/pixel_infonce.png plots the
newest run's device (the latest measurement of each cell on it).

`--standin-memory` measures, on a CPU, the peak memory of everything the "triton" path does around
its two N^2 kernels (gather, norms, per-row statistics, output buffers, autograd, scatter): the
kernels are replaced by stand-ins that write their outputs (so every page is touched, as the
kernels would) and do none of the N^2 work, so N = 131,072 takes seconds. CUDA's allocator would
count the same tensors. It prints peak growth of forward and of forward + backward against the
issue's target, 4 x the features + 64 MiB.
"""
import argparse
import gc
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.utils import (REPO_ROOT, Timing, append_rows, device_name, git_revision,
                         library_versions, matmul_tflops, measure_call, read_rows, time_calls)
from bench.utils import merge_rows as utils_merge_rows
from cluda.data.labels import IGNORE_INDEX, NUM_CLASSES, THING_CLASSES

# ---------------------------------------------------------------------------------------------
# Inputs

# Share of all pixels of Cityscapes' gtFine training set per train id, in percent (the public
# per-class pixel statistics of the data set; the 19 classes hold about 88.5 %, the rest is void).
# Road, building, vegetation, car, sidewalk and sky dominate; motorcycle is the rarest.
CITYSCAPES_CLASS_PERCENT = (
    32.7, 5.3, 20.1, 0.59, 0.77, 1.12, 0.18, 0.50, 14.3, 0.98, 3.5, 1.1, 0.13, 6.0, 0.24, 0.23,
    0.19, 0.085, 0.40,
)
IGNORE_FRACTION = 0.10
FEATURE_NOISE = 0.8  # std of the noise around a class mean of unit-variance entries
TEMPERATURE = 0.1  # affects only the values of exp(), not the work

INPUTS_NOTE = (
    "Inputs: labels drawn with Cityscapes' per-class pixel frequencies (road 37 %, building 23 %, "
    "vegetation 16 %, car 7 %, sidewalk 6 %, sky 4 % of the labelled pixels, ...), 10 % ignored, "
    "groups = stuff / thing, features relu(class mean + 0.8 noise) (cosine ~0.68 within a class, "
    f"~0.32 across), temperature {TEMPERATURE}, random positive upstream gradient."
)


@dataclass
class Inputs:
    """One benchmark cell's inputs.

    Attributes:
        feats: (N, C) leaf features in the cell's dtype, requires_grad.
        labels: (N,) int64 train ids, IGNORE_INDEX for ignored pixels.
        groups: (N,) int64, 1 for thing classes, 0 otherwise.
        upstream: (N,) float32 gradient of the per-anchor loss (weights like Gamma / A).
        pair_fraction: r, eligible ordered pairs / N^2.
    """

    feats: torch.Tensor
    labels: torch.Tensor
    groups: torch.Tensor
    upstream: torch.Tensor
    pair_fraction: float


def class_probabilities() -> torch.Tensor:
    """(19,) float64 probability of each train id among the labelled pixels."""
    p = torch.tensor(CITYSCAPES_CLASS_PERCENT, dtype=torch.float64)
    return p / p.sum()


def stuff_thing_groups(labels: torch.Tensor) -> torch.Tensor:
    """(N,) int64 group id: 1 for THING_CLASSES, 0 for stuff (and for ignored pixels)."""
    table = torch.zeros(max(IGNORE_INDEX, NUM_CLASSES) + 1, dtype=torch.long, device=labels.device)
    table[list(THING_CLASSES)] = 1
    return table[labels.clamp(0, IGNORE_INDEX)]


def pair_fraction(labels: torch.Tensor, groups: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> float:
    """r = #{(i, j): i != j, both valid, same group} / N^2 for (N,) labels and groups (ids >= 0)."""
    n = labels.numel()
    if n == 0:
        return 0.0
    valid = (labels >= 0) & (labels != ignore_index)
    counts = torch.bincount(groups[valid]).double()
    return float((counts * (counts - 1)).sum()) / float(n) ** 2


def make_inputs(n: int, c: int, dtype: torch.dtype, device: torch.device, *, seed: int = 0) -> Inputs:
    """Cityscapes-like inputs (see INPUTS_NOTE), drawn on `device` from a seeded generator.

    Args:
        n: number of pixels N (ignored ones included).
        c: channels C.
        dtype: dtype of the features.
        device: where to build them.
        seed: generator seed (the same seed gives the same inputs on the same device).
    """
    if n < 1 or c < 1:
        raise ValueError(f"need n >= 1 and c >= 1, got n={n}, c={c}")
    gen = torch.Generator(device=device).manual_seed(seed)
    probs = class_probabilities().to(device=device, dtype=torch.float32)
    labels = torch.multinomial(probs, n, replacement=True, generator=gen)  # (N,)
    ignored = torch.rand(n, generator=gen, device=device) < IGNORE_FRACTION
    # One mean per class plus one for the void pixels, which still have features.
    means = torch.randn(NUM_CLASSES + 1, c, generator=gen, device=device)  # (20, C)
    cls = torch.where(ignored, torch.full_like(labels, NUM_CLASSES), labels)
    noise = torch.randn(n, c, generator=gen, device=device)
    feats = torch.relu(noise.mul_(FEATURE_NOISE).add_(means[cls]))  # (N, C), like post-ReLU features
    del noise
    labels = labels.masked_fill(ignored, IGNORE_INDEX)
    groups = stuff_thing_groups(labels)
    upstream = torch.rand(n, generator=gen, device=device)
    return Inputs(feats=feats.to(dtype).requires_grad_(), labels=labels, groups=groups,
                  upstream=upstream, pair_fraction=pair_fraction(labels, groups))


# ---------------------------------------------------------------------------------------------
# Providers

PROVIDERS = ("reference", "torch", "triton", "compile")
PASSES = ("fwd", "bwd", "full")  # report order; "full" = forward + backward
PASS_FLOP_FACTOR = {"fwd": 2.0, "bwd": 4.0, "full": 6.0}
INTERPRETER_NOTE = "TRITON_INTERPRET=1: numpy interpreter, not the kernel's speed"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Peak growth of the N x N providers in bytes per N^2, for the size guard. Measured on a CPU (peak
# RSS of fwd+bwd, float32, C = 64, N = 8,192; at N = 2,048 fixed costs add ~20 B): the reference
# peaks in its forward at 32 B per pair (~6 float32 and ~6 bool N x N buffers alive at once),
# torch.compile of it at 8 B per pair. The guard adds 20 % slack; an allocation that fails anyway
# is caught and recorded as OOM.
PEAK_BYTES_PER_PAIR = {"reference": 32.0, "compile": 8.0}


def reference_loss(feats: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """What `torch.compile` compiles: the op's normalisation and the N x N reference, minus the
    input checks (they hold data-dependent branches that would break the graph)."""
    from kernels.reference import reference_pixel_infonce

    f = feats.float()
    v = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (N, C)
    return reference_pixel_infonce(v, labels, temperature=TEMPERATURE, groups=groups)


def is_triton(provider: str) -> bool:
    """"triton" or one of its launch variants "triton:<name>"."""
    return provider == "triton" or provider.startswith("triton:")


def make_forward(provider: str, inp: Inputs) -> Callable[[], torch.Tensor]:
    """A call that returns the (N,) loss of `inp` with the given provider."""
    if provider.startswith("triton:"):
        from kernels.functional import pixel_infonce_with_config
        from kernels.triton_infonce import variant_config

        config = variant_config(provider.split(":", 1)[1], inp.feats.dtype)
        return lambda: pixel_infonce_with_config(inp.feats, inp.labels, temperature=TEMPERATURE,
                                                 groups=inp.groups, config=config)
    if provider == "compile":
        # A fresh compilation per cell: no graph of another shape, no recompile-limit fallback to
        # eager. dynamic=False gives kernels specialised to the shape, as a user would get.
        import torch._functorch.config

        torch._dynamo.reset()
        # The backward pass is timed by calling backward() again on one retained graph, which a
        # compiled backward with donated (reused) buffers refuses.
        torch._functorch.config.donated_buffer = False
        compiled = torch.compile(reference_loss, dynamic=False)
        return lambda: compiled(inp.feats, inp.labels, inp.groups)
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    from kernels import pixel_infonce

    return lambda: pixel_infonce(inp.feats, inp.labels, temperature=TEMPERATURE,
                                 groups=inp.groups, impl=provider)


def predicted_peak_bytes(provider: str, n: int) -> Optional[float]:
    """Predicted peak growth of the N x N providers (None: O(N) providers, not guarded)."""
    per_pair = PEAK_BYTES_PER_PAIR.get(provider)
    return None if per_pair is None else 1.2 * per_pair * float(n) ** 2


def grads_bitwise_equal(full: Callable[[], None], feats: torch.Tensor) -> bool:
    """Two forward + backward passes on the same inputs give bitwise equal feats gradients."""
    grads = []
    for _ in range(2):
        feats.grad = None
        full()
        grads.append(feats.grad.detach().clone())
    feats.grad = None
    return torch.equal(grads[0], grads[1])


# ---------------------------------------------------------------------------------------------
# Sweep


@dataclass(frozen=True)
class Cell:
    provider: str
    n: int
    c: int
    dtype: str


@dataclass
class Settings:
    """How each cell is measured (see `main`'s --help for each value)."""

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


# Presets. GPU: the sweep; the time budget and the guards decide how much of it runs, in
# the order of `cell_priority`. QUICK: a CPU sweep that finishes in well under a minute (compile is
# left out: its first, cold compilation alone takes ~20 s on a 2-core CPU; add it with --providers).
# QUICK uses one CPU thread: on a shared machine two OpenMP threads stall for hundreds of ms
# whenever another process holds the second core, which swamps the small cells.
GPU_PRESET = dict(n=(8450, 16384, 32768, 65536, 131072, 524288), c=(256, 512, 768),
                  dtype=("bfloat16", "float32"), providers=("triton", "reference", "torch", "compile"),
                  reps_time_s=1.0, min_reps=2, max_reps=20, max_call_s=30.0, threads=None)
STANDIN_PRESET = dict(n=(131072,), c=(512,), dtype=("bfloat16", "float32"))
QUICK_PRESET = dict(n=(512, 1024, 4096), c=(64,), dtype=("float32",),
                    providers=("reference", "torch", "triton"),
                    reps_time_s=0.2, min_reps=3, max_reps=10, max_call_s=20.0, threads=1)


def cell_priority(cell: Cell) -> tuple:
    """Sort key: the issue's target cells first, then the Triton kernel everywhere, then the torch
    baselines, then torch.compile (a fresh compilation per cell) and the largest N elsewhere."""
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


def _guard(cell: Cell, settings: Settings, history: History) -> Optional[str]:
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

    skip = _guard(cell, settings, history)
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


# ---------------------------------------------------------------------------------------------
# Reports

COLUMNS = ("date", "device", "git_rev", "torch", "triton", "threads", "provider", "n", "c",
           "dtype", "pass", "pair_fraction", "median_ms", "p20_ms", "p80_ms", "reps", "timer",
           "peak_mem_mib", "tflops", "matmul_kind", "matmul_tflops", "share_of_matmul",
           "deterministic", "status", "note")
RUN_KEY = ("date", "device", "git_rev")
CSV_NAME, MD_NAME, PNG_NAME = "pixel_infonce.csv", "pixel_infonce.md", "pixel_infonce.png"


def _f(row: Dict[str, str], key: str) -> Optional[float]:
    value = row.get(key, "")
    try:
        return float(value) if value not in ("", None) else None
    except ValueError:
        return None


def group_runs(rows: Sequence[Dict[str, str]]) -> List[List[Dict[str, str]]]:
    """Rows grouped by run (date, device, revision), newest run first."""
    runs: Dict[tuple, List[Dict[str, str]]] = {}
    for row in rows:
        runs.setdefault(tuple(row[k] for k in RUN_KEY), []).append(row)
    return [runs[k] for k in sorted(runs, key=lambda k: k[0], reverse=True)]


def _cells(run: Sequence[Dict[str, str]]) -> Dict[tuple, Dict[str, Dict[str, str]]]:
    """(provider, n, c, dtype) -> pass -> row, in table order (C, dtype, N, provider)."""
    cells: Dict[tuple, Dict[str, Dict[str, str]]] = {}
    for row in run:
        cells.setdefault((row["provider"], int(row["n"]), int(row["c"]), row["dtype"]), {})[row["pass"]] = row
    order = sorted(cells, key=lambda k: (k[2], k[3], k[1], PROVIDERS.index(k[0]) if k[0] in PROVIDERS else 9))
    return {k: cells[k] for k in order}


def _num(x: float) -> str:
    """4 significant digits, without an exponent for large values (104,300 rather than 1.043e+05)."""
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def _ms(row: Optional[Dict[str, str]], spread: bool = False) -> str:
    if row is None or _f(row, "median_ms") is None:
        return "-"
    text = _num(_f(row, "median_ms"))
    if spread and _f(row, "p20_ms") is not None and _f(row, "p80_ms") is not None:
        text += f" [{_num(_f(row, 'p20_ms'))}, {_num(_f(row, 'p80_ms'))}]"
    return text


def _mib(row: Optional[Dict[str, str]]) -> str:
    value = None if row is None else _f(row, "peak_mem_mib")
    return "-" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _status(passes: Dict[str, Dict[str, str]]) -> str:
    statuses = {p: r["status"] for p, r in passes.items()}
    if len(set(statuses.values())) == 1:
        return next(iter(statuses.values()))
    return "; ".join(f"{p}: {statuses[p]}" for p in PASSES if p in statuses)


def _pick(run, provider, n, c, dtype, pass_="full") -> Optional[Dict[str, str]]:
    for row in run:
        if (row["provider"], int(row["n"]), int(row["c"]), row["dtype"], row["pass"]) == (
                provider, n, c, dtype, pass_):
            return row
    return None


def targets(run: Sequence[Dict[str, str]]) -> List[Tuple[str, str, str]]:
    """Issue 3's GPU targets as (target, measurement, verdict: met / missed / not measured).

    Empty when the run holds none of the target cells (a CPU run, say)."""
    tri_big = _pick(run, "triton", 131072, 512, "bfloat16")
    tri_mid = _pick(run, "triton", 16384, 512, "bfloat16")
    tri_huge = _pick(run, "triton", 524288, 512, "bfloat16")
    if tri_big is None and tri_mid is None and tri_huge is None:
        return []

    def ok(row):
        return row is not None and row["status"] == "ok"

    out = []
    # Memory: peak growth of any pass at N = 131,072, C = 512, bf16 <= 4 x feats + 64 MiB.
    limit = 4 * 131072 * 512 * 2 / 2**20 + 64
    peaks = [_f(r, "peak_mem_mib") for r in (_pick(run, "triton", 131072, 512, "bfloat16", p)
                                              for p in PASSES) if ok(r)]
    peaks = [p for p in peaks if p is not None]
    out.append((f"memory: triton peak growth at N=131,072, C=512, bf16 <= {limit:.0f} MiB",
                f"{max(peaks):.0f} MiB" if peaks else "-",
                ("met" if max(peaks) <= limit else "missed") if peaks else "not measured"))
    share = _f(tri_big, "share_of_matmul") if ok(tri_big) else None
    out.append(("speed: triton fwd+bwd at N=131,072, C=512, bf16 >= 40 % of bf16 mm",
                f"{100 * share:.1f} % ({_f(tri_big, 'tflops'):.1f} TFLOP/s)" if share else "-",
                ("met" if share >= 0.40 else "missed") if share else "not measured"))
    for other, factor in (("reference", 5.0), ("compile", 2.0)):
        base = _pick(run, other, 16384, 512, "bfloat16")
        if ok(tri_mid) and ok(base):
            ratio = _f(base, "median_ms") / _f(tri_mid, "median_ms")
            measured, verdict = f"{ratio:.2f}x", "met" if ratio >= factor else "missed"
        else:
            why = base["status"] if base is not None and not ok(base) else "-"
            measured, verdict = why, "not measured"
        out.append((f"speed: triton fwd+bwd at N=16,384, C=512, bf16 >= {factor:g}x faster than "
                    f"{other}", measured, verdict))
    out.append(("scale: triton fwd+bwd at N=524,288, C=512, bf16 runs",
                f"{_ms(tri_huge)} ms" if ok(tri_huge) else (tri_huge or {}).get("status", "-"),
                "met" if ok(tri_huge) else "missed" if tri_huge is not None and
                tri_huge["status"].startswith(("OOM", "error")) else "not measured"))
    det = [r["deterministic"] for r in run if r["provider"] == "triton" and r["deterministic"]]
    out.append(("determinism: triton gradients bitwise equal over two runs",
                f"{det.count('yes')} of {len(det)} cells" if det else "-",
                ("met" if all(d == "yes" for d in det) else "missed") if det else "not measured"))
    return out


def run_markdown(run: Sequence[Dict[str, str]]) -> str:
    """One run's section: stamps, matmul rates, targets (GPU runs), the table."""
    first = run[0]
    rates = {}
    for row in run:
        if row["matmul_kind"]:
            rates[row["matmul_kind"]] = _f(row, "matmul_tflops")
    lines = [f"## {first['device']} · {first['date']} · rev {first['git_rev']}", "",
             f"torch {first['torch']}, triton {first['triton']}, torch CPU threads: "
             f"{first['threads']}. Matrix-multiply rate measured in this run: "
             + ", ".join(f"{k} {v:.4g} TFLOP/s" for k, v in sorted(rates.items())) + ".", ""]
    goals = targets(run)
    if goals:
        lines += ["| target (issue 3) | measured | verdict |", "|---|---|---|"]
        lines += [f"| {t} | {m} | {v} |" for t, m, v in goals]
        lines.append("")
    lines += ["| provider | N | C | dtype | r | fwd ms | bwd ms | fwd+bwd ms | peak MiB fwd / bwd / "
              "fwd+bwd | TFLOP/s | % mm | det. | timer | status |",
              "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for (provider, n, c, dtype), passes in _cells(run).items():
        full = passes.get("full")
        tflops = _f(full, "tflops") if full else None
        share = _f(full, "share_of_matmul") if full else None
        any_row = next(iter(passes.values()))
        lines.append("| " + " | ".join([
            provider, f"{n:,}", str(c), dtype, any_row["pair_fraction"] or "-",
            _ms(passes.get("fwd")), _ms(passes.get("bwd")), _ms(full, spread=True),
            " / ".join(_mib(passes.get(p)) for p in PASSES),
            "-" if tflops is None else f"{tflops:.3g}",
            "-" if share is None else f"{100 * share:.1f}",
            (full or {}).get("deterministic") or "-",
            (full or any_row).get("timer") or "-",
            _status(passes) + (f" ({any_row['note']})" if any_row["note"] else ""),
        ]) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(rows: Sequence[Dict[str, str]], path: Path) -> None:
    """Every run of the CSV, newest first."""
    parts = ["# pixel_infonce benchmark", "",
             "Written by `python -m bench.bench_pixel_infonce` from `pixel_infonce.csv` (one section "
             "per run, newest first). See bench/NOTES.md for the kernel versions.", "",
             INPUTS_NOTE, "",
             "Times: median in ms, fwd+bwd with [p20, p80]. Memory: peak growth above the inputs "
             "in MiB (CUDA: max_memory_allocated; CPU: peak RSS). TFLOP/s: useful 6 r N^2 C over "
             "the fwd+bwd median; % mm: its share of the matmul rate of the row's dtype (float32: "
             "TF32 on CUDA). det.: two forward + backward passes give bitwise equal gradients.", ""]
    parts += [run_markdown(run) for run in group_runs(rows)]
    Path(path).write_text("\n".join(parts))


def latest_on_device(rows: Sequence[Dict[str, str]], device: str) -> List[Dict[str, str]]:
    """The newest row of each (provider, N, C, dtype, pass) measured on `device`."""
    latest: Dict[tuple, Dict[str, str]] = {}
    for row in sorted((r for r in rows if r["device"] == device), key=lambda r: r["date"]):
        latest[tuple(row[k] for k in ("provider", "n", "c", "dtype", "pass"))] = row
    return list(latest.values())


def write_plot(run: Sequence[Dict[str, str]], path: Path) -> None:
    """Time and peak memory of forward + backward against N, log-log, one line per provider and
    one column per (C, dtype) in `run` (rows of one device)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    panels = sorted({(int(r["c"]), r["dtype"]) for r in run})
    fig, axes = plt.subplots(2, len(panels), figsize=(max(6.0, 4.2 * len(panels)), 7.5),
                             squeeze=False)
    colours = dict(zip(PROVIDERS, ("tab:gray", "tab:blue", "tab:red", "tab:green")))
    for col, (c, dtype) in enumerate(panels):
        for provider in PROVIDERS:
            points = sorted((int(r["n"]), _f(r, "median_ms"), _f(r, "peak_mem_mib")) for r in run
                            if r["provider"] == provider and int(r["c"]) == c and r["dtype"] == dtype
                            and r["pass"] == "full" and r["status"] == "ok"
                            and r["note"] != INTERPRETER_NOTE)
            if not points:
                continue
            ns = [p[0] for p in points]
            axes[0][col].plot(ns, [p[1] for p in points], "o-", color=colours[provider], label=provider)
            mem = [(p[0], p[2]) for p in points if p[2] is not None and p[2] > 0]
            if mem:
                axes[1][col].plot(*zip(*mem), "o-", color=colours[provider], label=provider)
        axes[0][col].set_title(f"C={c}, {dtype}")
        axes[0][col].set_ylabel("fwd+bwd median (ms)")
        axes[1][col].set_ylabel("peak memory growth (MiB)")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("N (pixels)")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    dates = sorted({r["date"] for r in run})
    revs = ", ".join(sorted({r["git_rev"] for r in run}))
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    fig.suptitle(f"pixel_infonce fwd+bwd: {run[0]['device']}\n{when}, rev {revs}\n"
                 "(Triton interpreter runs not plotted)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(run: Sequence[Dict[str, str]]) -> str:
    """A short text table: the targets (GPU runs) and the forward + backward rows (on a GPU, the
    C = 512 bfloat16 slice only)."""
    lines = []
    goals = targets(run)
    if goals:
        width = max(len(t) for t, _, _ in goals)
        lines += [f"{t:<{width}}  {m:>24}  {v}" for t, m, v in goals] + [""]
    full = [r for r in run if r["pass"] == "full"]
    slice_ = [r for r in full if r["c"] == "512" and r["dtype"] == "bfloat16"]
    if slice_:
        full = slice_
        lines.append("fwd+bwd, C=512 bfloat16 (all cells in pixel_infonce.md):")
    lines.append(f"{'provider':<10} {'N':>8} {'C':>4} {'dtype':<9} {'ms':>10} {'MiB':>8} "
                 f"{'TFLOP/s':>8} {'%mm':>6}  status")
    for row in sorted(full, key=lambda r: (int(r["c"]), r["dtype"], int(r["n"]), r["provider"])):
        share = _f(row, "share_of_matmul")
        lines.append(f"{row['provider']:<10} {int(row['n']):>8} {row['c']:>4} {row['dtype']:<9} "
                     f"{_ms(row):>10} {_mib(row):>8} {row['tflops'] or '-':>8} "
                     f"{'-' if share is None else f'{100 * share:.1f}':>6}  {row['status']}"
                     + (" (interpreter)" if row["note"] == INTERPRETER_NOTE else ""))
    return "\n".join(lines)


def variants_summary(run: Sequence[Dict[str, str]]) -> str:
    """The launch-variant comparison of a run: every "triton:<variant>" cell with its fwd, bwd and
    fwd+bwd medians, and per (N, C, dtype) the fastest fwd+bwd with its speed-up over the default
    preset ("resident") when that ran too."""
    rows = [r for r in run if r["provider"].startswith("triton:")]
    if not rows:
        return "no launch-variant rows in this run"
    lines = ["== launch variants (kernels.triton_infonce.VARIANTS): medians in ms, fwd+bwd "
             "TFLOP/s and % of the matmul rate, peak MiB of fwd+bwd",
             f"{'variant':<21} {'N':>8} {'C':>4} {'dtype':<9} {'fwd':>9} {'bwd':>9} "
             f"{'fwd+bwd':>9} {'TFLOP/s':>8} {'%mm':>6} {'MiB':>7} {'det':>4}  status"]
    verdicts = []
    for (provider_n_c_d, passes) in _cells(rows).items():
        provider, n, c, dtype = provider_n_c_d
        full = passes.get("full")
        share = _f(full, "share_of_matmul") if full else None
        lines.append(f"{provider:<21} {n:>8} {c:>4} {dtype:<9} {_ms(passes.get('fwd')):>9} "
                     f"{_ms(passes.get('bwd')):>9} {_ms(full):>9} "
                     f"{(full or {}).get('tflops') or '-':>8} "
                     f"{'-' if share is None else f'{100 * share:.1f}':>6} {_mib(full):>7} "
                     f"{(full or {}).get('deterministic') or '-':>4}  {_status(passes)}")
    groups = sorted({(int(r["n"]), int(r["c"]), r["dtype"]) for r in rows})
    for n, c, dtype in groups:
        timed = {r["provider"]: _f(r, "median_ms") for r in rows
                 if (int(r["n"]), int(r["c"]), r["dtype"], r["pass"]) == (n, c, dtype, "full")
                 and r["status"] == "ok" and _f(r, "median_ms")}
        if not timed:
            continue
        best = min(timed, key=timed.get)
        base = timed.get("triton:resident")
        ratio = f", {base / timed[best]:.2f}x resident" if base and best != "triton:resident" else ""
        verdicts.append(f"fastest fwd+bwd at N={n:,}, C={c}, {dtype}: {best} "
                        f"({_num(timed[best])} ms{ratio})")
    return "\n".join(lines + verdicts)


def merge_rows(source: Path, target: Path) -> int:
    """Append the rows of `source` (a results CSV) that `target` does not hold yet; return how many
    (`bench.utils.merge_rows` keyed on the run and the cell)."""
    return utils_merge_rows(source, target, COLUMNS,
                            ("date", "device", "git_rev", "provider", "n", "c", "dtype", "pass"))


def write_reports(out: Path) -> List[Dict[str, str]]:
    """Rebuild the Markdown (all runs) and the plot (the newest run's device) from OUT's CSV;
    return the newest run."""
    rows = read_rows(out / CSV_NAME)
    if not rows:
        raise ValueError(f"{out / CSV_NAME} holds no rows")
    write_markdown(rows, out / MD_NAME)
    newest = group_runs(rows)[0]
    write_plot(latest_on_device(rows, newest[0]["device"]), out / PNG_NAME)
    return newest


# ---------------------------------------------------------------------------------------------
# Memory of the Triton path around its kernels, on a CPU


class _StandInKernel:
    """Takes the place of one `@triton.jit` kernel: `kernel[grid](*args, **meta)` fills the
    kernel's output tensors (every page written, as the kernel would) and does no other work.

    Args:
        jit_fn: the kernel it replaces (for its argument names).
        outputs: names of its output pointer arguments (names absent from the kernel are skipped,
            so one stand-in serves kernel versions with different names).
    """

    def __init__(self, jit_fn, outputs: Sequence[str]):
        self.positions = [jit_fn.arg_names.index(name) for name in outputs
                          if name in jit_fn.arg_names]

    def __getitem__(self, grid):
        def launch(*args, **meta):
            for i in self.positions:
                args[i].fill_(0.5)
        return launch


def standin_memory(n: int, c: int, dtype: torch.dtype, *, seed: int = 0) -> Dict[str, int]:
    """Peak memory growth of `pixel_infonce(impl="triton")` on a CPU with stand-in kernels.

    Everything around the two N^2 kernels runs for real (see the module docstring). Needs
    TRITON_INTERPRET=1 before kernels.triton_infonce is first imported (set here if it was not).

    Args:
        n: pixels N.
        c: channels C.
        dtype: feature dtype (bfloat16 works too: no kernel runs in the interpreter).
        seed: input seed.

    Returns:
        feats_bytes, forward and full (forward + backward) peak growth in bytes, as measured by
        `bench.utils.measure_call` on a warm call.
    """
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from kernels import triton_infonce as ti

    if not ti.INTERPRETED:
        raise RuntimeError("kernels.triton_infonce was imported without TRITON_INTERPRET=1: "
                           "the Triton path cannot run on CPU tensors")
    device = torch.device("cpu")
    saved = {name: getattr(ti, name) for name in ("_infonce_fwd_kernel", "_infonce_bwd_kernel",
                                                   "_interpreter_can_run") if hasattr(ti, name)}
    ti._infonce_fwd_kernel = _StandInKernel(saved["_infonce_fwd_kernel"],
                                            ("neg_ptr", "loss_ptr", "q_ptr"))
    ti._infonce_bwd_kernel = _StandInKernel(saved["_infonce_bwd_kernel"],
                                            ("df_ptr", "dv_ptr", "du_ptr"))
    if "_interpreter_can_run" in saved:  # no kernel runs: bfloat16 is fine
        ti._interpreter_can_run = lambda dtype_: True
    try:
        inp = make_inputs(n, c, dtype, device, seed=seed)
        forward = make_forward("triton", inp)

        def full():
            forward().backward(inp.upstream)

        full()  # warm-up: lazy imports and first-call allocations stay out of the numbers
        _, fwd_peak = measure_call(forward, device, grad_to_none=[inp.feats])
        _, full_peak = measure_call(full, device, grad_to_none=[inp.feats])
    finally:
        for name, value in saved.items():
            setattr(ti, name, value)
    if fwd_peak is None or full_peak is None:
        raise OSError("peak RSS cannot be measured here (needs Linux /proc/self/clear_refs)")
    return dict(feats_bytes=inp.feats.numel() * inp.feats.element_size(), forward=fwd_peak,
                full=full_peak)


def standin_memory_table(results: Sequence[Tuple[int, int, str, Dict[str, int]]]) -> str:
    """Markdown rows of `standin_memory` results: (n, c, dtype name, result) each."""
    lines = ["| N | C | dtype | feats | forward | forward + backward | target 4 x feats + 64 MiB |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    for n, c, dtype, r in results:
        feats = r["feats_bytes"]
        lines.append(f"| {n:,} | {c} | {dtype} | {feats / 2**20:,.0f} MiB | "
                     f"{r['forward'] / 2**20:,.0f} MiB ({r['forward'] / feats:.1f}x) | "
                     f"{r['full'] / 2**20:,.0f} MiB ({r['full'] / feats:.1f}x) | "
                     f"{(4 * feats + 64 * 2**20) / 2**20:,.0f} MiB |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


class _Terminated(BaseException):
    """SIGTERM (e.g. from `timeout`): stop the sweep and still write the reports."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def _csv_list(kind):
    def parse(text: str):
        try:
            return tuple(kind(x.strip().replace("_", "")) if kind is int else kind(x.strip())
                         for x in text.split(",") if x.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not a comma-separated list of {kind.__name__}: {text!r}") from exc
    return parse


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small CPU sweep (well under a minute)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results",
                   help="folder for pixel_infonce.{csv,md,png} (default: bench/results)")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild the Markdown and the plot from OUT's CSV and print the summary")
    p.add_argument("--merge", type=Path, metavar="CSV",
                   help="append the rows of another results CSV (e.g. a GPU run's) to OUT's, "
                        "skipping rows already there, then rebuild the reports")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when available")
    p.add_argument("--n", type=_csv_list(int), help="pixel counts N, e.g. 8450,16384")
    p.add_argument("--c", type=_csv_list(int), help="channel counts C, e.g. 256,512")
    p.add_argument("--dtype", type=_csv_list(str), help=f"feature dtypes from {tuple(DTYPES)}")
    p.add_argument("--providers", type=_csv_list(str), help=f"from {PROVIDERS}")
    p.add_argument("--passes", type=_csv_list(str), default=PASSES, help=f"from {PASSES}")
    p.add_argument("--warmup", type=int, default=1, help="untimed fwd+bwd calls per cell")
    p.add_argument("--reps-time", type=float, help="seconds of timed repetitions per pass")
    p.add_argument("--min-reps", type=int, help="fewest timed calls per pass (perf_counter timer)")
    p.add_argument("--max-reps", type=int, help="most timed calls per pass (perf_counter timer)")
    p.add_argument("--slow-call-s", type=float, default=0.5,
                   help="a call this slow counts its memory run as a timing sample, skips do_bench")
    p.add_argument("--max-call-s", type=float,
                   help="skip a cell whose fwd+bwd is predicted (N^2 scaling) to take longer")
    p.add_argument("--det-max-s", type=float, default=2.0,
                   help="run the determinism check when fwd+bwd takes at most this long")
    p.add_argument("--no-det", action="store_true", help="skip the determinism check")
    p.add_argument("--budget-s", type=float, help="stop starting cells after this many seconds")
    p.add_argument("--max-mem-gib", type=float,
                   help="memory the N x N providers may use (default: 90 %% of free GPU memory, "
                        "70 %% of the CPU's MemAvailable)")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default: torch's own; --quick: 1)")
    p.add_argument("--interp-max-n", type=int, default=512,
                   help="largest N for the Triton interpreter on a CPU")
    p.add_argument("--variants", type=_csv_list(str),
                   help="compare launch variants of the Triton kernels instead of providers: "
                        "comma-separated names of kernels.triton_infonce.VARIANTS, or 'all'")
    p.add_argument("--standin-memory", action="store_true",
                   help="measure the Triton path's memory around stand-in kernels on a CPU "
                        "(default --n 131072 --c 512 --dtype bfloat16,float32) and exit")
    args = p.parse_args(argv)
    if args.standin_memory:
        args.n, args.c = args.n or STANDIN_PRESET["n"], args.c or STANDIN_PRESET["c"]
        args.dtype = args.dtype or STANDIN_PRESET["dtype"]
    preset = QUICK_PRESET if args.quick else GPU_PRESET
    for key, attr in (("n", "n"), ("c", "c"), ("dtype", "dtype"), ("providers", "providers"),
                      ("reps_time_s", "reps_time"), ("min_reps", "min_reps"),
                      ("max_reps", "max_reps"), ("max_call_s", "max_call_s"),
                      ("threads", "threads")):
        if getattr(args, attr) is None:
            setattr(args, attr, preset[key])
    for name, values, allowed in (("--dtype", args.dtype, DTYPES), ("--providers", args.providers, PROVIDERS),
                                  ("--passes", args.passes, PASSES)):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            p.error(f"{name}: {bad or 'empty'} not in {tuple(allowed)}")
    if any(v < 1 for v in args.n + args.c):
        p.error("--n and --c take positive integers")
    if args.threads is not None and args.threads < 1:
        p.error("--threads takes a positive integer")
    if args.min_reps < 1 or args.max_reps < args.min_reps or args.warmup < 0:
        p.error("need --min-reps >= 1, --max-reps >= --min-reps and --warmup >= 0")
    return args


def _memory_limit(device: torch.device, max_mem_gib: Optional[float]) -> float:
    if max_mem_gib is not None:
        return max_mem_gib * 2**30
    if device.type == "cuda":
        return 0.9 * torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return 0.7 * int(line.split()[1]) * 1024
    raise OSError("cannot read MemAvailable from /proc/meminfo; pass --max-mem-gib")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    out: Path = args.out
    if args.merge is not None:
        merge_rows(args.merge, out / CSV_NAME)
    if args.report_only or args.merge is not None:
        print(summary(write_reports(out)))
        return 0
    if args.standin_memory:
        results = []
        for n in args.n:
            for c in args.c:
                for dtype in args.dtype:
                    results.append((n, c, dtype, standin_memory(n, c, DTYPES[dtype])))
                    print(standin_memory_table(results[-1:]).splitlines()[-1], flush=True)
        print(f"peak growth on this CPU ({device_name(torch.device('cpu'))}), stand-in kernels:")
        print(standin_memory_table(results))
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if device.type == "cpu":
        # Triton picks its interpreter when a kernel is defined, i.e. on the first import of
        # kernels.triton_infonce, which happens inside the first triton cell.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    signal.signal(signal.SIGTERM, _on_sigterm)

    settings = Settings(device=device, passes=tuple(p for p in PASSES if p in args.passes),
                        warmup=args.warmup, reps_time_s=args.reps_time, min_reps=args.min_reps,
                        max_reps=args.max_reps, slow_call_s=args.slow_call_s,
                        max_call_s=args.max_call_s, det_max_s=-1.0 if args.no_det else args.det_max_s,
                        mem_limit_bytes=_memory_limit(device, args.max_mem_gib),
                        budget_s=args.budget_s, interp_max_n=args.interp_max_n,
                        start=time.monotonic())
    base_row = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                    device=device_name(device), git_rev=git_revision(), threads=torch.get_num_threads(),
                    **library_versions())
    print(f"{base_row['device']} | {base_row['date']} | rev {base_row['git_rev']} | "
          f"torch {base_row['torch']} | triton {base_row['triton']}", flush=True)

    # The matmul rate each dtype's share is taken of (float32: TF32 on CUDA, as the issue asks).
    matmul = {}
    for dtype in args.dtype:
        kind = {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, "tf32" if device.type == "cuda" else "fp32")
        matmul[dtype] = (kind, matmul_tflops(device, kind))
        print(f"matmul {kind}: {matmul[dtype][1]:.4g} TFLOP/s", flush=True)

    if args.variants:
        # Every variant at the largest N first (the headline), then the next N, and so on.
        from kernels.triton_infonce import VARIANTS, resolve_variant

        try:  # an earlier preset name maps to its new one (a warning) or names its replacement
            names = (tuple(VARIANTS) if args.variants == ("all",)
                     else tuple(resolve_variant(v) for v in args.variants))
        except ValueError as exc:
            raise ValueError(f"--variants: {exc}") from None
        cells = [Cell(f"triton:{v}", n, c, d) for n in sorted(args.n, reverse=True)
                 for c in args.c for d in args.dtype for v in names]
    else:
        cells = [Cell(p, n, c, d) for p in args.providers for n in args.n for c in args.c
                 for d in args.dtype]
        cells.sort(key=cell_priority)
    if device.type == "cpu" and any(is_triton(x.provider) for x in cells):
        # On a CPU the kernels run in Triton's interpreter: a smoke test at small N only.
        cells = [x for x in cells if not is_triton(x.provider) or x.n <= args.interp_max_n]
        print(f"triton on a CPU: interpreter smoke cells for N <= {args.interp_max_n} only", flush=True)
    history = History()
    csv_path = out / CSV_NAME
    try:
        for i, cell in enumerate(cells):
            rows = run_cell(cell, settings, history, base_row, matmul)
            append_rows(csv_path, rows, COLUMNS)
            for row in rows:
                print(f"[{i + 1}/{len(cells)}] {cell.provider} N={cell.n} C={cell.c} {cell.dtype} "
                      f"{row['pass']}: {_ms(row, spread=True)} ms, {_mib(row)} MiB, "
                      f"{row.get('tflops') or '-'} TFLOP/s, det {row.get('deterministic') or '-'}, "
                      f"{row['status']}", flush=True)
    except (_Terminated, KeyboardInterrupt):
        print("interrupted: writing the reports of the cells measured so far", flush=True)
    if not csv_path.exists():
        print("no cell was measured", flush=True)
        return 1
    newest = write_reports(out)
    print(variants_summary(newest) if args.variants else summary(newest), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of `kernels.pixel_infonce` (CLUDA Eq. 2): time, peak memory and useful TFLOP/s of
forward, backward and both, for each implementation ("provider": reference, torch, triton,
compile, or triton:<launch preset>; see bench/pixel_infonce/providers.py), on Cityscapes-like
inputs (bench/pixel_infonce/inputs.py).

Each rate is also given as a share of the matrix-multiply rate measured on the same device in the
same run (bfloat16 rows: bf16 mm; float32 rows: TF32 mm on CUDA, fp32 mm on a CPU). Peak memory
is the growth above the inputs (bench/utils.py says how it is measured). An OOM, a size guard
("OOM (predicted X GiB)"), a time guard or a compile failure is a result recorded in the row, not
a crash (bench/pixel_infonce/runner.py).

Usage (from the repository root):
    python -m bench.bench_pixel_infonce --quick                  # small CPU sweep, < 1 min
    python -m bench.bench_pixel_infonce --budget-s 300           # the full sweep, on a GPU
    python -m bench.bench_pixel_infonce --variants all --n 131072,16384 --c 512 --dtype bfloat16
                                                                 # the launch presets (GPU)
    python -m bench.bench_pixel_infonce --standin-memory         # the Triton path's wrapper
                                                                 # memory on a CPU
    python -m bench.bench_pixel_infonce --report-only            # rebuild .md / .png from the CSV
    python -m bench.bench_pixel_infonce --merge OTHER.csv         # add another run's rows (a GPU's)

Rows are appended to OUT/pixel_infonce.csv (default OUT: bench/results); OUT/pixel_infonce.md is
rebuilt from the whole CSV (one section per run, newest first) and OUT/pixel_infonce.png plots the
newest run's device (the latest measurement of each cell on it): bench/pixel_infonce/report.py.

`--standin-memory` measures, on a CPU, the peak memory of everything the "triton" path does around
its two N^2 kernels, with stand-in kernels that do none of the N^2 work
(bench/pixel_infonce/standin.py), and prints peak growth of forward and of forward + backward
against the target, 4 x the features + 64 MiB.
"""
import argparse
import os
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.pixel_infonce.inputs import DTYPES
from bench.pixel_infonce.providers import PROVIDERS, is_triton
from bench.pixel_infonce.report import (COLUMNS, CSV_NAME, merge_rows, progress_line, summary,
                                        variants_summary, write_reports)
from bench.pixel_infonce.runner import (PASSES, Cell, History, Settings, cell_priority,
                                        memory_limit, run_cell)
from bench.pixel_infonce.standin import standin_memory, standin_memory_table
from bench.utils import REPO_ROOT, append_rows, device_name, git_revision, library_versions, matmul_tflops

# Sweeps, named by what they measure. FULL_SWEEP (the default, for a GPU): the kernel's target
# sweep; the time budget and the guards decide how much of it runs, in the order of
# `cell_priority`. QUICK_SWEEP (--quick): a CPU sweep that finishes in well under a minute
# (compile is left out: its first, cold compilation alone takes ~20 s on a 2-core CPU; add it with
# --providers); one CPU thread, because on a shared machine two OpenMP threads stall for hundreds
# of ms whenever another process holds the second core, which swamps the small cells.
# STANDIN_CELLS: the cells of --standin-memory.
FULL_SWEEP = dict(n=(8450, 16384, 32768, 65536, 131072, 524288), c=(256, 512, 768),
                  dtype=("bfloat16", "float32"), providers=("triton", "reference", "torch", "compile"),
                  reps_time_s=1.0, min_reps=2, max_reps=20, max_call_s=30.0, threads=None)
QUICK_SWEEP = dict(n=(512, 1024, 4096), c=(64,), dtype=("float32",),
                   providers=("reference", "torch", "triton"),
                   reps_time_s=0.2, min_reps=3, max_reps=10, max_call_s=20.0, threads=1)
STANDIN_CELLS = dict(n=(131072,), c=(512,), dtype=("bfloat16", "float32"))


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
            raise argparse.ArgumentTypeError(
                f"not a comma-separated list of {kind.__name__}: {text!r}") from exc
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
                   help="compare launch presets of the Triton kernels instead of providers: "
                        "comma-separated names of kernels.triton_infonce.VARIANTS (resident, "
                        "streamed, split, split_tma, split_m32), or 'all'")
    p.add_argument("--standin-memory", action="store_true",
                   help="measure the Triton path's memory around stand-in kernels on a CPU "
                        "(default --n 131072 --c 512 --dtype bfloat16,float32) and exit")
    args = p.parse_args(argv)
    if args.standin_memory:
        args.n, args.c = args.n or STANDIN_CELLS["n"], args.c or STANDIN_CELLS["c"]
        args.dtype = args.dtype or STANDIN_CELLS["dtype"]
    preset = QUICK_SWEEP if args.quick else FULL_SWEEP
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


def standin(args: argparse.Namespace) -> int:
    """--standin-memory: every (N, C, dtype) of the arguments, a table row printed as it is done."""
    results = []
    for n in args.n:
        for c in args.c:
            for dtype in args.dtype:
                results.append((n, c, dtype, standin_memory(n, c, DTYPES[dtype])))
                print(standin_memory_table(results[-1:]).splitlines()[-1], flush=True)
    print(f"peak growth on this CPU ({device_name(torch.device('cpu'))}), stand-in kernels:")
    print(standin_memory_table(results))
    return 0


def plan_cells(args: argparse.Namespace, device: torch.device) -> List[Cell]:
    """The cells of a sweep in the order they run: with --variants every launch preset at the
    largest N first (the headline), then the next N; otherwise by `cell_priority`. On a CPU the
    Triton cells run in the interpreter: a smoke test at N <= --interp-max-n only."""
    if args.variants:
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
        cells = [x for x in cells if not is_triton(x.provider) or x.n <= args.interp_max_n]
        print(f"triton on a CPU: interpreter smoke cells for N <= {args.interp_max_n} only", flush=True)
    return cells


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    out: Path = args.out
    if args.merge is not None:
        merge_rows(args.merge, out / CSV_NAME)
    if args.report_only or args.merge is not None:
        print(summary(write_reports(out)))
        return 0
    if args.standin_memory:
        return standin(args)
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
                        mem_limit_bytes=memory_limit(device, args.max_mem_gib),
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

    cells = plan_cells(args, device)
    history = History()
    csv_path = out / CSV_NAME
    try:
        for i, cell in enumerate(cells):
            rows = run_cell(cell, settings, history, base_row, matmul)
            append_rows(csv_path, rows, COLUMNS)
            for row in rows:
                print(f"[{i + 1}/{len(cells)}] {progress_line(row)}", flush=True)
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

"""Training step time and memory of the paper's configurations (issue 6): what one iteration of
`train.py` costs on this device, and what CLUDA's contrastive terms add to DAFormer / HRDA.

Each case runs the real training loop (`train.train`: data loading, teacher pseudo-labels,
ClassMix, every loss term, the optimiser step, EMA) for a few iterations of a paper config on the
procedural synthetic pair, at the config's own crop size and batch size, so no data set or weight
file is needed: the network is built from scratch (`model.pretrained=null`; the speed is the same),
rare class sampling is off (it only changes which images are drawn), and no evaluation runs. The
synthetic scenes are (crop height, 2 x crop width), Cityscapes' aspect at the crop's scale.

Per case: seconds per iteration (median and 20 / 80 % quantiles over the log windows after the
first, which holds cuDNN / Triton warm-up), of which the median time waiting for the data loader
(`train.py` logs it; the synthetic scenes are drawn on the CPU by `data.workers` processes, so a
data time near the s/it means the loader, not the device, sets the pace), the first window's
seconds per iteration, and peak memory (CUDA: `torch.cuda.max_memory_allocated`; CPU: peak RSS of
the process so far, which only grows). An OOM or a failure is recorded as the case's status, not a
crash.

Usage (from the repository root):
    python -m bench.train_steps                    # the GPU cases below, 25 iterations each
    python -m bench.train_steps --cases daformer,daformer_cluda --iters 20
    python -m bench.train_steps --quick            # the demo config made tiny, CPU, < 1 min
    python -m bench.train_steps --report-only      # rebuild the Markdown from the CSV
    python -m bench.train_steps --merge OTHER.csv  # add another run's rows (a GPU's)

Rows are appended to OUT/train_steps.csv (device, date, git revision; default OUT: bench/results)
and OUT/train_steps.md is rebuilt from the whole CSV.
"""
import argparse
import os
import resource
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.utils import (REPO_ROOT, append_rows, device_name, git_revision, library_versions,
                         merge_rows, read_rows, timing_from_samples)
from cluda.experiment import load_experiment, resolve_device

# name -> (config, extra overrides, what it shows)
CASES = {
    "daformer": ("configs/gta2cs_daformer.yaml", (), "DAFormer, no contrastive term"),
    "daformer_cluda": ("configs/gta2cs_daformer_cluda.yaml", (),
                       "DAFormer + CLUDA, InfoNCE at the full fused resolution (128 x 128)"),
    "daformer_cluda_65": ("configs/gta2cs_daformer_cluda.yaml", ("--cl.feat_size=[65,65]",),
                          "DAFormer + CLUDA at the original code's 65 x 65"),
    "hrda": ("configs/gta2cs_hrda.yaml", (), "HRDA, no contrastive term"),
    "hrda_cluda": ("configs/gta2cs_hrda_cluda.yaml", (),
                   "HRDA + CLUDA-MR, LR and HR features in one InfoNCE call"),
}
# Each CLUDA case right after its baseline, so that a time budget that stops the run early still
# leaves side-by-side pairs; the 65 x 65 variant last.
GPU_CASES = ("daformer", "daformer_cluda", "hrda", "hrda_cluda", "daformer_cluda_65")
# --quick: the demo config (MiT-B0, synthetic) made tiny, on the CPU; CL on and off.
QUICK_CASES = {
    "demo_tiny": ("configs/demo.yaml", (), "demo config, 64 x 64 crops, batch 2"),
    "demo_tiny_no_cl": ("configs/demo.yaml", ("--cl.source=false", "--cl.mixed=false"),
                        "the same without the contrastive terms"),
}
QUICK_OVERRIDES = ("--data.crop_size=[64,64]", "--data.batch_size=2", "--experiment.device=cpu",
                   "--experiment.threads=1", "--uda.start_iter=0", "--cl.impl=torch")

COLUMNS = ("date", "device", "git_rev", "torch", "case", "config", "overrides", "crop", "batch",
           "iters", "windows", "sec_per_it", "p20_s", "p80_s", "data_s", "first_window_sec_per_it",
           "peak_mem_mib", "mem_kind", "status", "note")
CSV_NAME, MD_NAME = "train_steps.csv", "train_steps.md"


def synthetic_overrides(config: str, *, iters: int, log_interval: int, workers: int,
                        work_dir: str, name: str, given: Sequence[str] = ()) -> List[str]:
    """The overrides that turn a paper config into a short run on the synthetic pair (scenes
    sized for the crop that the config with the `given` overrides trains on)."""
    cfg = load_experiment(str(REPO_ROOT / config), list(given))
    h, w = cfg.data.crop_size
    size = f"[{h},{2 * w}]"
    out = [f"--experiment.work_dir={work_dir}", f"--experiment.name={name}",
           "--model.pretrained=null", "--data.rcs=false", f"--data.workers={workers}",
           f"--train.log_interval={log_interval}", "--train.eval_interval=0",
           "--train.checkpoint_interval=0", "--train.tensorboard=false"]
    for role, samples in (("source", 4 * iters + 8), ("target", 4 * iters + 8), ("val", 1)):
        out += [f"--data.{role}.kind=synthetic", f"--data.{role}.root=null",
                f"--data.{role}.scale=null", f"--data.{role}.size={size}",
                f"--data.{role}.num_samples={samples}", f"--data.{role}.max_images=null"]
    return out


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(name: str, config: str, extra: Sequence[str], *, iters: int, log_interval: int,
             workers: int, base_row: Dict[str, object], common: Sequence[str] = ()) -> Dict[str, object]:
    """Train `iters` iterations of one case and return its row (status "ok" or what went wrong)."""
    import train  # the repository root's train.py (cwd or the path set above)

    row = dict(base_row, case=name, config=config, overrides=" ".join(list(common) + list(extra)),
               iters=iters, status="", note="")
    with tempfile.TemporaryDirectory(prefix="train_steps_") as work_dir:
        given = list(common) + list(extra)
        try:
            overrides = synthetic_overrides(config, iters=iters, log_interval=log_interval,
                                            workers=workers, work_dir=work_dir, name=name,
                                            given=given) + given
            cfg = load_experiment(str(REPO_ROOT / config), overrides)
            row.update(crop="x".join(map(str, cfg.data.crop_size)), batch=cfg.data.batch_size)
            device = resolve_device(cfg, 0)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            out_dir = train.train(cfg, stop_at=iters)["out_dir"]  # the networks are freed here
            windows = read_rows(Path(out_dir) / "log.csv")
            secs = [float(w["sec_per_it"]) for w in windows]
            data = [float(w["data_sec_per_it"]) for w in windows]
        except Exception as exc:  # noqa: BLE001 - an OOM or a failure is the case's result
            oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)
            if not oom:
                traceback.print_exc()
            row["status"] = "OOM" if oom else f"error: {type(exc).__name__}: {str(exc)[:120]}"
            return row
    row.update(windows=len(secs), first_window_sec_per_it=f"{secs[0]:.4g}",
               peak_mem_mib=f"{_peak_mib(device):.0f}",
               mem_kind="cuda max allocated" if device.type == "cuda" else "peak RSS")
    t = timing_from_samples(secs[1:] or secs, "log windows")  # quantiles in ms
    d = timing_from_samples(data[1:] or data, "log windows")
    row.update(sec_per_it=f"{t.median_ms / 1e3:.4g}", p20_s=f"{t.p20_ms / 1e3:.4g}",
               p80_s=f"{t.p80_ms / 1e3:.4g}", data_s=f"{d.median_ms / 1e3:.4g}",
               status="ok", note="" if secs[1:] else "one log window: includes warm-up")
    return row


# ---------------------------------------------------------------------------------------------
# Reports


def markdown(rows: Sequence[Dict[str, str]]) -> str:
    """One section per run (newest first), with each CLUDA case's cost over its baseline."""
    runs: Dict[tuple, List[Dict[str, str]]] = {}
    for r in rows:
        runs.setdefault((r["date"], r["device"], r["git_rev"]), []).append(r)
    lines = ["# Training step time", "",
             "Written by `python -m bench.train_steps` from `train_steps.csv` (one section per run, "
             "newest first). Each case trains a paper config on the synthetic pair at the config's "
             "crop and batch size, from scratch, without rare class sampling or evaluation. "
             "s/it: median [p20, p80] over the log windows after the first; first: the first "
             "window, with warm-up; data: of s/it, the median time spent waiting for the data loader "
             "(near s/it: the run measures the loader, not the device). "
             "Memory: CUDA max allocated, or the process's peak RSS on a CPU.",
             ""]
    for (date, device, rev), run in sorted(runs.items(), key=lambda kv: kv[0][0], reverse=True):
        lines += [f"## {device} · {date} · rev {rev}", "", f"torch {run[0]['torch']}", "",
                  "| case | config | overrides | crop | batch | iters | s/it | data | first | peak MiB | status |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
        by_case = {r["case"]: r for r in run}
        for r in run:
            spread = f" [{r['p20_s']}, {r['p80_s']}]" if r["sec_per_it"] else ""
            lines.append(f"| {r['case']} | {r['config']} | {r['overrides'] or '-'} | {r['crop'] or '-'} "
                         f"| {r['batch'] or '-'} | {r['iters']} | {r['sec_per_it'] or '-'}{spread} "
                         f"| {r['data_s'] or '-'} | {r['first_window_sec_per_it'] or '-'} "
                         f"| {r['peak_mem_mib'] or '-'} "
                         f"| {r['status']} |")
        ratios = []
        for case, base in (("daformer_cluda", "daformer"), ("daformer_cluda_65", "daformer"),
                           ("hrda_cluda", "hrda"), ("demo_tiny", "demo_tiny_no_cl")):
            a, b = by_case.get(case), by_case.get(base)
            if a and b and a["sec_per_it"] and b["sec_per_it"]:
                ratios.append(f"{case} / {base}: {float(a['sec_per_it']) / float(b['sec_per_it']):.2f}x "
                              "time per iteration")
        if ratios:
            lines += ["", "Cost of the contrastive terms, side by side in this run: " + "; ".join(ratios) + "."]
        lines.append("")
    return "\n".join(lines)


def write_markdown(out: Path) -> None:
    from cluda.fileio import atomic_write

    atomic_write(out / MD_NAME, markdown(read_rows(out / CSV_NAME)))


def summary(rows: Sequence[Dict[str, object]]) -> str:
    head = (f"{'case':<20} {'crop':>9} {'batch':>5} {'s/it':>9} {'data':>9} {'first':>9} "
            f"{'peak MiB':>9}  status")
    body = [f"{r['case']:<20} {r.get('crop') or '-':>9} {r.get('batch') or '-':>5} "
            f"{r.get('sec_per_it') or '-':>9} {r.get('data_s') or '-':>9} "
            f"{r.get('first_window_sec_per_it') or '-':>9} "
            f"{r.get('peak_mem_mib') or '-':>9}  {r['status']}" for r in rows]
    return "\n".join([head] + body)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=None,
                   help=f"comma-separated, from {sorted(CASES)} (default: {','.join(GPU_CASES)})")
    p.add_argument("--iters", type=int, default=25, help="iterations per case (default 25)")
    p.add_argument("--log-interval", type=int, default=5, help="iterations per timing window")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers (default: cores - 2, at most 8)")
    p.add_argument("--quick", action="store_true", help="the tiny demo cases on the CPU")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no case after this many seconds")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    p.add_argument("--report-only", action="store_true", help="rebuild the Markdown from the CSV")
    p.add_argument("--merge", type=Path, metavar="CSV",
                   help="append the rows of another run's train_steps.csv, then rebuild the Markdown")
    args = p.parse_args(argv)
    known = dict(CASES, **QUICK_CASES)
    default = QUICK_CASES if args.quick else GPU_CASES
    args.cases = list(default) if args.cases is None else [c for c in args.cases.split(",") if c]
    unknown = [c for c in args.cases if c not in known]
    if unknown:
        p.error(f"unknown case(s) {unknown}; known: {sorted(known)}")
    if args.iters < 2 or args.log_interval < 1:
        p.error("need --iters >= 2 and --log-interval >= 1")
    if args.quick:
        args.iters, args.log_interval = min(args.iters, 4), min(args.log_interval, 2)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.merge is not None:
        merge_rows(args.merge, out / CSV_NAME, COLUMNS, ("date", "device", "git_rev", "case"))
    if args.report_only or args.merge is not None:
        write_markdown(out)
        print(summary(read_rows(out / CSV_NAME)))
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = args.workers if args.workers is not None else (0 if args.quick else
                                                            max(1, min(8, cores - 2)))
    probe = load_experiment(str(REPO_ROOT / "configs" / "demo.yaml"),
                            ["--experiment.device=cpu"] if args.quick else [])
    device = resolve_device(probe, 0)
    base = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                device=device_name(device), git_rev=git_revision(),
                torch=library_versions()["torch"])
    known = dict(CASES, **QUICK_CASES)
    common = QUICK_OVERRIDES if args.quick else ()
    start, rows = time.monotonic(), []
    for name in args.cases:
        config, extra, what = known[name]
        if args.budget_s is not None and time.monotonic() - start > args.budget_s:
            row = dict(base, case=name, config=config, overrides=" ".join(list(common) + list(extra)),
                       iters=args.iters, status="skipped (time budget)", note=what)
        else:
            print(f"== {name}: {what} ({config}, {args.iters} iterations)", flush=True)
            row = run_case(name, config, extra, iters=args.iters, log_interval=args.log_interval,
                           workers=workers, base_row=base, common=common)
            row["note"] = "; ".join(x for x in (what, row["note"]) if x)
        rows.append(row)
        append_rows(out / CSV_NAME, [row], COLUMNS)
    write_markdown(out)
    print(summary(rows))
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

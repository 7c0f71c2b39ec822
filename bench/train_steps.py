"""Training step time and memory of the paper's configurations: what one iteration of
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
the process so far, which only grows). On CUDA also the host-device synchronisations per step
(`torch.cuda.set_sync_debug_mode`) and the Triton kernels compiled after the first window. An OOM
or a failure is recorded as the case's status, not a crash.

The inference case (`eval_hrda_slide`) times one 1024 x 2048 image through the config's
evaluation mode. `--stability N` trains HRDA + CLUDA for N iterations and checks the run: every
term finite, the loss going down, the per-window peak memory flat after iteration 50.

A SIGTERM (the time limits of bench/gpu_check.sh) stops the case in progress with the log windows
it wrote so far (status "stopped (time limit) after K of N iterations", the stability verdict on
those windows) and skips the rest; the rows and the Markdown are still written.

Usage (from the repository root):
    python -m bench.train_steps                    # the GPU cases below, 25 iterations each
    python -m bench.train_steps --cases daformer,daformer_cluda --iters 20
    python -m bench.train_steps --quick            # the demo config made tiny, CPU, < 1 min
    python -m bench.train_steps --cases hrda --stability 300    # one case and the stability run
    python -m bench.train_steps --cases "" --stability 300      # the stability run alone
    python -m bench.train_steps --report-only      # rebuild the Markdown from the CSV
    python -m bench.train_steps --merge OTHER.csv  # add another run's rows (a GPU's)

Rows are appended to OUT/train_steps.csv (device, date, git revision; default OUT: bench/results)
and OUT/train_steps.md is rebuilt from the whole CSV.
"""
import argparse
import math
import os
import signal
import statistics
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.utils import (REPO_ROOT, append_rows, device_name, git_revision, library_versions,
                         merge_rows, read_rows, timing_from_samples)
from cluda.config import load_experiment
from cluda.device import resolve_device

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

# The evaluation case: one image of Cityscapes' full size through the config's inference
# (HRDA: sliding HR windows fused with the LR view), timed after a warm-up call.
EVAL_CASES = {
    "eval_hrda_slide": ("configs/gta2cs_hrda_cluda.yaml", (), (1024, 2048),
                        "HRDA + CLUDA inference of one 1024 x 2048 image (eval.mode slide)"),
}
QUICK_EVAL_CASES = {
    "eval_demo_tiny": ("configs/demo.yaml", ("--eval.mode=slide", "--eval.crop_size=[64,64]",
                                             "--eval.stride=[32,32]"), (64, 128),
                       "demo config, sliding-window inference of one 64 x 128 image"),
}
# --stability N: the HRDA + CLUDA config trained N iterations on the synthetic scenes at full size.
STABILITY_CASE = "hrda_cluda"
STABILITY_SETTLE_ITER = 50  # memory must not grow after this iteration

COLUMNS = ("date", "device", "git_rev", "torch", "case", "config", "overrides", "crop", "batch",
           "iters", "windows", "sec_per_it", "p20_s", "p80_s", "data_s", "first_window_sec_per_it",
           "peak_mem_mib", "mem_kind", "mem_growth_mib", "syncs_per_it", "late_compiles", "status",
           "note")
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


def triton_compiled() -> Optional[int]:
    """How many compiled kernels the pixel InfoNCE Triton functions hold (None where nothing is
    compiled: no Triton, or the CPU interpreter). A count that still grows after the first
    iterations means the varying pixel count N recompiles the kernels."""
    try:
        from kernels import triton_infonce
    except ImportError:
        return None
    total, found = 0, False
    for obj in vars(triton_infonce).values():
        fn = obj
        while fn is not None and not hasattr(fn, "device_caches"):
            fn = getattr(fn, "fn", None)  # autotuners and heuristics wrap the JITFunction
        if fn is None:
            continue
        found = True
        total += sum(len(entry[0]) for entry in fn.device_caches.values())
    return total if found else None


class StepProbe:
    """Wraps `train.train_step` for one case: on CUDA it counts the host-device synchronisations
    of each step (`torch.cuda.set_sync_debug_mode("warn")` turns each into a warning) and notes the
    Triton kernel count after the warm-up iterations, so that later compilations show."""

    def __init__(self, step_fn, device: torch.device, *, warmup: int) -> None:
        self.step_fn, self.device, self.warmup = step_fn, device, warmup
        self.calls, self.syncs, self.compiled_after_warmup = 0, [], None

    def __call__(self, **kw):
        self.calls += 1
        if self.calls == self.warmup + 1:
            self.compiled_after_warmup = triton_compiled()
        if self.device.type != "cuda" or self.calls <= self.warmup:
            return self.step_fn(**kw)
        import warnings

        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                logs = self.step_fn(**kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        self.syncs.append(sum("synchroniz" in str(w.message) for w in caught))
        return logs

    def late_compiles(self) -> Optional[int]:
        now = triton_compiled()
        if now is None or self.compiled_after_warmup is None:
            return None
        return now - self.compiled_after_warmup


def stability_verdict(windows: Sequence[Dict[str, str]], *, settle_iter: int) -> Tuple[str, str, float]:
    """(status, note, memory growth in MiB) of a long run's log windows: every term finite and
    no step skipped, the loss lower in the last third of the windows than in the first, and the
    per-window peak memory after `settle_iter` no higher than at the first window after it."""
    problems = []
    losses = [float(w["loss"]) for w in windows]
    if not all(math.isfinite(v) for v in losses) or any(float(w.get("skipped") or 0) for w in windows):
        problems.append("non-finite loss or skipped steps")
    third = max(1, len(losses) // 3)
    first, last = statistics.mean(losses[:third]), statistics.mean(losses[-third:])
    if not last < first:
        problems.append(f"loss not going down ({first:.3f} -> {last:.3f})")
    mem = [float(w["mem_mib"]) for w in windows if int(w["iteration"]) > settle_iter and w.get("mem_mib")]
    growth = max(mem) - mem[0] if mem else math.nan
    if mem and growth > max(64.0, 0.01 * mem[0]):
        problems.append(f"memory grows by {growth:.0f} MiB after iteration {settle_iter}")
    note = f"loss {first:.3f} -> {last:.3f} (first / last third of the windows)"
    return ("ok" if not problems else "unstable: " + "; ".join(problems)), note, growth


class Stopped(BaseException):
    """SIGTERM (e.g. from `timeout`): stop the run, keep what was measured (a BaseException, so
    that the `except Exception` of a failing case does not swallow it)."""


_STOP = {"requested": False, "pid": None}


def _on_sigterm(signum, frame):
    if os.getpid() != _STOP["pid"]:  # a process forked with this handler: not the run's to stop
        return
    _STOP["requested"] = True
    signal.signal(signum, signal.SIG_IGN)  # once: the rows and the report still get written
    raise Stopped()


def _logged_windows(work_dir: str) -> List[Dict[str, str]]:
    """The log windows `train.py` wrote under `work_dir` so far (its run folder's log.csv)."""
    logs = sorted(Path(work_dir).rglob("log.csv"))
    return read_rows(logs[0]) if logs else []


def run_case(name: str, config: str, extra: Sequence[str], *, iters: int, log_interval: int,
             workers: int, base_row: Dict[str, object], common: Sequence[str] = (),
             stability: bool = False) -> Dict[str, object]:
    """Train `iters` iterations of one case and return its row (status "ok" or what went wrong).
    `stability`: judge the run with `stability_verdict` instead of reporting "ok". A SIGTERM
    (`Stopped`) ends the case early with the log windows written so far and status "stopped
    (time limit) ..."."""
    import train  # the repository root's train.py (cwd or the path set above)

    row = dict(base_row, case=name, config=config, overrides=" ".join(list(common) + list(extra)),
               iters=iters, status="", note="")
    stopped, device, probe = False, None, None
    with tempfile.TemporaryDirectory(prefix="train_steps_") as work_dir:
        given = list(common) + list(extra)
        try:
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
                probe = StepProbe(train.train_step, device, warmup=min(log_interval, iters - 1))
                train.train_step = probe
                try:
                    train.train(cfg, stop_at=iters)  # the networks are freed here
                finally:
                    train.train_step = probe.step_fn
            except Exception as exc:  # noqa: BLE001 - an OOM or a failure is the case's result
                # `timeout` signals the whole process group: a data-loader worker that the signal
                # ended first makes the loader raise here.
                if _STOP["requested"]:
                    raise Stopped() from exc
                oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)
                if not oom:
                    traceback.print_exc()
                row["status"] = "OOM" if oom else f"error: {type(exc).__name__}: {str(exc)[:120]}"
                return row
        except Stopped:
            stopped = True
        windows = _logged_windows(work_dir)
    if stopped:
        done = int(windows[-1]["iteration"]) if windows else 0
        row["status"] = (f"stopped (time limit) after {done} of {iters} iterations" if windows else
                         "stopped (time limit) before the first log window")
        if not windows:
            return row
    secs = [float(w["sec_per_it"]) for w in windows]
    data = [float(w["data_sec_per_it"]) for w in windows]
    row.update(windows=len(secs), first_window_sec_per_it=f"{secs[0]:.4g}",
               peak_mem_mib=f"{max(float(w['mem_mib']) for w in windows):.0f}",  # train.py resets per window
               mem_kind="cuda max allocated" if device.type == "cuda" else "peak RSS")
    t = timing_from_samples(secs[1:] or secs, "log windows")  # quantiles in ms
    d = timing_from_samples(data[1:] or data, "log windows")
    row.update(sec_per_it=f"{t.median_ms / 1e3:.4g}", p20_s=f"{t.p20_ms / 1e3:.4g}",
               p80_s=f"{t.p80_ms / 1e3:.4g}", data_s=f"{d.median_ms / 1e3:.4g}",
               status=row["status"] or "ok", note="" if secs[1:] else "one log window: includes warm-up")
    if probe.syncs:
        row["syncs_per_it"] = f"{statistics.median(probe.syncs):g}"
    late = probe.late_compiles()
    row["late_compiles"] = "" if late is None else late
    if stability and (not stopped or len(windows) >= 3):
        status, note, growth = stability_verdict(windows, settle_iter=STABILITY_SETTLE_ITER)
        if stopped:  # the verdict on the windows so far
            status = row["status"] if status == "ok" else f"{status}; {row['status']}"
            note = f"so far: {note}"
        row.update(status=status, note=note, mem_growth_mib="" if math.isnan(growth) else f"{growth:.0f}")
    return row


def run_eval_case(name: str, config: str, extra: Sequence[str], size: Tuple[int, int], *,
                  base_row: Dict[str, object], common: Sequence[str] = (), reps: int = 3) -> Dict[str, object]:
    """Time the config's inference (`eval.mode`, test-time augmentation as configured) on one
    image of `size` (a random image: the time does not depend on its content): a warm-up call,
    then the median of `reps` calls, and the peak memory. Returns its row."""
    from cluda.build import build_model
    from cluda.inference import make_predict_fn
    from train import autocast, peak_memory_mib

    given = ["--model.pretrained=null"] + list(common) + list(extra)
    row = dict(base_row, case=name, config=config, overrides=" ".join(given), iters=reps,
               crop="x".join(map(str, size)), batch=1, status="", note="")
    try:
        cfg = load_experiment(str(REPO_ROOT / config), given)
        device = resolve_device(cfg, 0)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        model = build_model(cfg).to(device).eval()
        predict = make_predict_fn(model, cfg)
        img = torch.randn(1, 3, *size, device=device)
        secs = []
        with torch.no_grad(), autocast(cfg, device):
            for i in range(reps + 1):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                predict(img).argmax(1)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i:  # the first call warms up (cuDNN autotuning, Triton)
                    secs.append(time.perf_counter() - t0)
        t = timing_from_samples(secs, "calls")
        row.update(windows=len(secs), sec_per_it=f"{t.median_ms / 1e3:.4g}", p20_s=f"{t.p20_ms / 1e3:.4g}",
                   p80_s=f"{t.p80_ms / 1e3:.4g}", peak_mem_mib=f"{peak_memory_mib(device):.0f}",
                   mem_kind="cuda max allocated" if device.type == "cuda" else "peak RSS",
                   status="ok", note=f"seconds per image, eval.mode {cfg.eval.mode}")
    except Exception as exc:  # noqa: BLE001 - an OOM or a failure is the case's result
        oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)
        if not oom:
            traceback.print_exc()
        row["status"] = "OOM" if oom else f"error: {type(exc).__name__}: {str(exc)[:120]}"
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
             "Memory: CUDA max allocated, or the process's peak RSS on a CPU. syncs: host-device "
             "synchronisations per step (CUDA); late compiles: Triton kernels compiled after the "
             "first log window (the pixel count changes every step; this should be 0). "
             "Stability rows: memory growth after iteration 50 and the loss trend.",
             ""]
    for (date, device, rev), run in sorted(runs.items(), key=lambda kv: kv[0][0], reverse=True):
        lines += [f"## {device} · {date} · rev {rev}", "", f"torch {run[0]['torch']}", "",
                  "| case | config | overrides | crop | batch | iters | s/it | data | first | peak MiB "
                  "| syncs | late compiles | status |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        by_case = {r["case"]: r for r in run}
        for r in run:
            spread = f" [{r['p20_s']}, {r['p80_s']}]" if r["sec_per_it"] else ""
            lines.append(f"| {r['case']} | {r['config']} | {r['overrides'] or '-'} | {r['crop'] or '-'} "
                         f"| {r['batch'] or '-'} | {r['iters']} | {r['sec_per_it'] or '-'}{spread} "
                         f"| {r['data_s'] or '-'} | {r['first_window_sec_per_it'] or '-'} "
                         f"| {r['peak_mem_mib'] or '-'} | {r.get('syncs_per_it') or '-'} "
                         f"| {r.get('late_compiles') or '-'} "
                         f"| {r['status']}{' (growth ' + r['mem_growth_mib'] + ' MiB)' if r.get('mem_growth_mib') else ''} |")
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
    p.add_argument("--stability", type=int, default=None, metavar="N",
                   help=f"also train {STABILITY_CASE} (--quick: demo_tiny) for N iterations and "
                        "check it: finite, loss going down, memory flat after iteration "
                        f"{STABILITY_SETTLE_ITER} (e.g. 300)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no case after this many seconds")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    p.add_argument("--report-only", action="store_true", help="rebuild the Markdown from the CSV")
    p.add_argument("--merge", type=Path, metavar="CSV",
                   help="append the rows of another run's train_steps.csv, then rebuild the Markdown")
    args = p.parse_args(argv)
    known = {**CASES, **QUICK_CASES, **EVAL_CASES, **QUICK_EVAL_CASES}
    default = [*QUICK_CASES, *QUICK_EVAL_CASES] if args.quick else [*GPU_CASES, *EVAL_CASES]
    args.cases = list(default) if args.cases is None else [c for c in args.cases.split(",") if c]
    unknown = [c for c in args.cases if c not in known]
    if unknown:
        p.error(f"unknown case(s) {unknown}; known: {sorted(known)}")
    if args.iters < 2 or args.log_interval < 1:
        p.error("need --iters >= 2 and --log-interval >= 1")
    if args.stability is not None and args.stability < 3:
        p.error("--stability needs at least 3 iterations")
    if not args.cases and args.stability is None:
        p.error("--cases is empty and no --stability: nothing to run")
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
    common = QUICK_OVERRIDES if args.quick else ()
    # (row name, case, iterations, log interval, stability check)
    plan = [(name, name, args.iters, args.log_interval, False) for name in args.cases]
    if args.stability is not None:
        case = "demo_tiny" if args.quick else STABILITY_CASE
        plan.append((f"stability_{case}", case, args.stability,
                     max(1, min(10, args.stability // 10)), True))
    # SIGTERM (gpu_check.sh's time limits) stops the case in progress with what it measured and
    # skips the rest; the rows and the Markdown are still written.
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    _STOP.update(requested=False, pid=os.getpid())
    start, rows = time.monotonic(), []
    try:
        for row_name, name, iters, interval, stability in plan:
            if name in EVAL_CASES or name in QUICK_EVAL_CASES:
                config, extra, size, what = {**EVAL_CASES, **QUICK_EVAL_CASES}[name]
            else:
                (config, extra, what), size = {**CASES, **QUICK_CASES}[name], None
            skipped = dict(base, case=row_name, config=config, iters=iters, note=what,
                           overrides=" ".join(list(common) + list(extra)))
            try:
                if _STOP["requested"]:
                    row = dict(skipped, status="skipped (time limit)")
                elif args.budget_s is not None and time.monotonic() - start > args.budget_s:
                    row = dict(skipped, status="skipped (time budget)")
                elif size is not None:
                    print(f"== {row_name}: {what} ({config})", flush=True)
                    row = run_eval_case(row_name, config, extra, size, base_row=base,
                                        common=[c for c in common if not c.startswith(("--data.", "--uda."))])
                    row["note"] = "; ".join(x for x in (what, row["note"]) if x)
                else:
                    print(f"== {row_name}: {what} ({config}, {iters} iterations)", flush=True)
                    row = run_case(row_name, config, extra, iters=iters, log_interval=interval,
                                   workers=workers, base_row=base, common=common, stability=stability)
                    row["note"] = "; ".join(x for x in (what, row["note"]) if x)
            except Stopped:
                row = dict(skipped, status="stopped (time limit)")
            rows.append(row)
            append_rows(out / CSV_NAME, [row], COLUMNS)
    finally:
        signal.signal(signal.SIGTERM, previous)
    write_markdown(out)
    print(summary(rows))
    return 0 if all(r["status"] == "ok" or r["status"].startswith(("skipped", "stopped"))
                    for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

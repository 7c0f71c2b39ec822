"""Ablation on the synthetic pair: does CLUDA help DAFormer self-training there?

Every run is `configs/demo.yaml` (MiT-B0 from scratch, 128 x 128 crops of 128 x 256 synthetic
scenes, 250 source-only warm-up iterations then 250 self-training iterations, batch 4 + 4) with
one method's switches and one seed (`experiment.seed`: initial weights, data order, ClassMix and
augmentation draws); the scenes themselves are the same for every run. Methods:

- source only: source cross-entropy for all iterations (no teacher, no target data);
- DAFormer: warm-up, then ClassMix self-training with the EMA teacher (no contrastive term);
- DAFormer + CLUDA: the demo itself: source CL (Eq. 3) from the start, mixed CL (Eq. 4-5) with
  the self-training, at the full fused-feature resolution (32 x 32 per crop);
- DAFormer + CLUDA, CL at 16 x 16: the fused features bilinearly resized before the loss, as the
  original code's 65 x 65. That resize takes 128 x 128 features (512 crops) to 65 x 65, a factor
  of about 0.5; 65 x 65 is larger than the demo's 32 x 32, so the same factor is applied: 16 x 16;
- DAFormer + CLUDA, CL after the warm-up: a diagnostic. The warm-up is DAFormer's (source CE
  only; the same run, bitwise at the same torch thread count), and both CL terms join with the
  self-training. The paper's
  networks start from ImageNet weights, where the source CL never acts on a random network.
- DAFormer + CLUDA, tau 0.1: a diagnostic. The demo's temperature is the original code's 1, with
  which the cosine logits stay in [-1, 1] and the source CL loss hardly moves; 0.1 (a common
  supervised-contrastive choice) lets the term actually shape the features.
- DAFormer + CLUDA, all pairs: `cl.pairs=all`, stuff-thing pairs included (the paper's
  S-S + T-T + S-T, and what the released code trains with);
- DAFormer + CLUDA, pair weighting: `cl.weighting=pair`, the mixed term's weights w_i * w_j on
  each positive pair (the released code) instead of w_i on the anchor (the paper);
- DAFormer + CLUDA, CL weight 0.1: `cl.weight=0.1`, both CL terms scaled down tenfold;
- DAFormer + CLUDA, released objective at 16x16: `cl.objective=released`, what the released code
  computes (`cluda.losses`: pixel-major features against image-major labels, 255 a class, all
  pairs, w_i * w_j on positives, tau 1) on features resized to a fixed grid. The released grid,
  65 x 65, is the release's resize of 128 x 128 fused maps (512 crops); on the demo's 32 x 32 maps
  it would be an upsampling to 4x the pixels (16x the pairs, about 20x the run time on this CPU),
  so these runs scale it like the "CL at 16x16" row (`cluda.losses.RELEASED_FEAT_SIZE`
  patched to 16 x 16 for the run), which is the same objective's paper counterpart.
- DAFormer + MIC: DAFormer with MIC's masked-image consistency term (Hoyer et al., CVPR 2023)
  from the start of the self-training: the demo's `mic` section (8 px blocks on the 128 x 128
  crops, MIC's 64 px on 1024 crops scaled down; ratio 0.7; weight 1);
- DAFormer + MIC + CLUDA: the demo with MIC switched on as well.

The score is the target (synthetic "camera" look) validation mIoU over 19 classes at the last
iteration, reported as mean and sample standard deviation over seeds.

    python -m bench.ablation [--seeds 0 1 2] [--methods ...] [--work-dir work_dirs/ablation]

Writes `bench/results/ablation.csv` (one row per run, rewritten after each run from the file's
current rows, so two harnesses with different --methods / --seeds can run side by side; a
(method, seed) already in it is skipped unless --rerun, so an interrupted ablation continues;
each row records the git revision and torch thread count it ran with) and
`bench/results/ablation.md` (the table, with device, date and git revision).
"""
import argparse
import csv
import datetime
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from unittest import mock

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cluda.losses  # noqa: E402  (the repository root must be importable first)
import train  # noqa: E402
from bench.utils import device_name  # noqa: E402
from cluda.fileio import atomic_open, atomic_write  # noqa: E402

DEMO = REPO / "configs" / "demo.yaml"
NO_CL = ["--cl.source=false", "--cl.mixed=false"]
# The released objective's fixed grid for methods that use it (see the module docstring).
RELEASED_GRID = {"DAFormer + CLUDA, released objective at 16x16": (16, 16)}
# method: (overrides, overrides of a separate warm-up phase or None). A separate warm-up runs
# until uda.start_iter with its own switches and the method resumes from its checkpoint.
METHODS: Dict[str, Tuple[List[str], Optional[List[str]]]] = {
    "source only": (["--uda.enabled=false"] + NO_CL, None),
    "DAFormer": (NO_CL, None),
    "DAFormer + CLUDA": ([], None),
    "DAFormer + CLUDA, CL at 16x16": (["--cl.feat_size=[16,16]"], None),
    "DAFormer + CLUDA, CL after the warm-up": ([], NO_CL),
    "DAFormer + CLUDA, tau 0.1": (["--cl.temperature=0.1"], None),
    "DAFormer + CLUDA, all pairs": (["--cl.pairs=all"], None),
    "DAFormer + CLUDA, pair weighting": (["--cl.weighting=pair"], None),
    "DAFormer + CLUDA, CL weight 0.1": (["--cl.weight=0.1"], None),
    "DAFormer + CLUDA, released objective at 16x16": (["--cl.objective=released"], None),
    "DAFormer + MIC": (NO_CL + ["--mic.enabled=true"], None),
    "DAFormer + MIC + CLUDA": (["--mic.enabled=true"], None),
}
COLUMNS = ["method", "seed", "mIoU", "mIoU_warmup_end", "iterations", "wall_s", "threads", "device",
           "date", "revision"]


def revision() -> str:
    """Short HEAD hash, '+dirty' when the code a run depends on differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "cluda", "kernels", "train.py",
                                "configs/demo.yaml"], cwd=REPO, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def slug(method: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in method.lower()).strip("_")


def run_one(method: str, seed: int, work_dir: str, extra: List[str], start_iter: int) -> Dict[str, object]:
    name = f"{slug(method)}_seed{seed}"
    base = [str(DEMO), f"--experiment.seed={seed}", f"--experiment.work_dir={work_dir}",
            f"--experiment.name={name}", "--train.tensorboard=false"]
    overrides, warmup = METHODS[method]
    t0 = time.time()
    grid = RELEASED_GRID.get(method, cluda.losses.RELEASED_FEAT_SIZE)
    # --overwrite: a method's run folder is the harness's own; a rerun replaces it
    with mock.patch.object(cluda.losses, "RELEASED_FEAT_SIZE", grid):
        if warmup is None:
            result = train.main(base + overrides + extra + ["--overwrite"])
        else:
            train.main(base + warmup + extra + [f"--stop-at={start_iter}", "--overwrite"])
            # the method's switches differ from the warm-up's: a deliberate change on resume
            result = train.main(base + overrides + extra + ["--resume", "--allow-changes"])
    wall = time.time() - t0
    warm = ""
    with open(Path(work_dir) / name / "eval.csv", newline="") as f:
        for row in csv.DictReader(f):
            if int(row["iteration"]) == start_iter:
                warm = float(row["mIoU19"])
    return {"method": method, "seed": seed, "mIoU": result["metrics"][19]["mIoU"],
            "mIoU_warmup_end": warm, "iterations": result["iteration"], "wall_s": round(wall, 1)}


def read_rows(path: Path) -> List[Dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: List[Dict[str, object]]) -> None:
    with atomic_open(path, "w") as f:
        w = csv.DictWriter(f, COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def table(rows: List[Dict[str, str]]) -> str:
    lines = ["| method | target mIoU (%) mean | std | seeds | per seed | mIoU at warm-up end |",
             "|---|---:|---:|---:|---|---:|"]
    for method in METHODS:
        runs = sorted((r for r in rows if r["method"] == method), key=lambda r: int(r["seed"]))
        if not runs:
            continue
        vals = [100 * float(r["mIoU"]) for r in runs]
        warm = [100 * float(r["mIoU_warmup_end"]) for r in runs if r["mIoU_warmup_end"] not in ("", None)]
        std = statistics.stdev(vals) if len(vals) > 1 else math.nan
        lines.append(f"| {method} | {statistics.mean(vals):.2f} | {std:.2f} | {len(vals)} | "
                     + ", ".join(f"{v:.1f}" for v in vals) + " | "
                     + (f"{statistics.mean(warm):.2f}" if warm else "n/a") + " |")
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, rows: List[Dict[str, str]], note: str, *, val_images: int) -> None:
    stamps = sorted({(r["device"], r["revision"]) for r in rows})
    dates = sorted(r["date"] for r in rows)
    text = ("# Ablation on the synthetic pair (configs/demo.yaml)\n\n"
            f"Target validation mIoU (19 classes, {val_images} synthetic 'camera look' scenes) after the last "
            "iteration; mean and sample standard deviation over seeds. Produced by "
            "`python -m bench.ablation`; see its docstring for the methods.\n\n"
            + table(rows)
            + "\nDevice / revision: " + "; ".join(f"{d}, {r}" for d, r in stamps)
            + (f". Runs from {dates[0]} to {dates[-1]}." if dates else ".") + "\n"
            + (f"\n{note}\n" if note else ""))
    atomic_write(path, text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--work-dir", default=str(REPO / "work_dirs" / "ablation"))
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--note", default="", help="text appended to the Markdown file")
    parser.add_argument("--rerun", action="store_true", help="run (method, seed) pairs already in the CSV again")
    parser.add_argument("overrides", nargs="*", help="--section.key=value for every run (e.g. a "
                        "shorter --train.max_iters for a smoke test)")
    args, unknown = parser.parse_known_args(argv)
    extra = list(args.overrides) + unknown
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "ablation.csv", out / "ablation.md"
    rev, device = revision(), device_name(torch.device("cpu"))
    # Read once: the YAML may change on disk while the runs go on.
    demo = train.load_experiment(str(DEMO), extra)
    rows = read_rows(csv_path)
    for seed in args.seeds:
        for method in args.methods:
            if not args.rerun and any(r["method"] == method and int(r["seed"]) == seed for r in rows):
                print(f"skip {method}, seed {seed}: already in {csv_path}")
                continue
            row = run_one(method, seed, args.work_dir, extra, demo.uda.start_iter)
            row.update(device=device, date=datetime.datetime.now().isoformat(timespec="seconds"),
                       revision=rev, threads=torch.get_num_threads())
            rows = read_rows(csv_path)  # another harness may have added rows meanwhile
            rows = [r for r in rows if not (r["method"] == method and int(r["seed"]) == seed)] + [row]
            write_rows(csv_path, rows)
            print(f"{method}, seed {seed}: target mIoU {100 * row['mIoU']:.2f} ({row['wall_s']} s)")
    rows = read_rows(csv_path)
    write_markdown(md_path, rows, args.note, val_images=demo.data.val.num_samples)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

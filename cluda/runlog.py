"""What a training run records besides its checkpoints: the CSV logs (`log.csv`, `eval.csv`), the
curves figure, TensorBoard events (when installed and `train.tensorboard`) and the memory column.
"""
from __future__ import annotations

import csv
import os
import resource
from typing import Dict, List, Optional, Sequence

import torch

from cluda.config import Config
from cluda.errors import OutputError
from cluda.fileio import atomic_open

__all__ = ["CSVLog", "plot_curves", "peak_memory_mib", "open_tensorboard", "eval_row", "class_names"]


class CSVLog:
    """Rows of floats with a fixed header, appended to `path`. A row is labelled with the number
    of iterations done; on resume from a checkpoint after `keep_until` iterations, later rows
    (written by the interrupted run after its checkpoint) are dropped."""

    def __init__(self, path: str, columns: Sequence[str], *, keep_until: Optional[int] = None):
        self.path, self.columns = path, ["iteration"] + list(columns)
        rows = []
        if keep_until is not None and os.path.isfile(path):
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= keep_until]
        with atomic_open(path, "w") as f:  # a crash here leaves the interrupted run's log whole
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def append(self, it: int, values: Dict[str, float]) -> None:
        try:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(dict(values, iteration=it))
        except OSError as err:  # a full or read-only disk: name the log, in one line
            raise OutputError(self.path, err) from err

    def read(self) -> List[Dict[str, float]]:
        with open(self.path, newline="") as f:
            return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]


def plot_curves(train_log: CSVLog, eval_log: CSVLog, path: str, *, main_metric: str) -> None:
    """PNG of the loss terms and the target mIoU against the iteration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, evals = train_log.read(), eval_log.read()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for col in train_log.columns[1:]:
        if col.startswith(("src.", "mix.", "mic.")) or col == "loss":
            pts = [(r["iteration"], r[col]) for r in rows if col in r]
            if pts:
                ax1.plot(*zip(*pts), label=col, lw=1.5 if col == "loss" else 1)
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("loss (mean over the log interval)")
    ax1.legend(fontsize=8)
    pts = [(r["iteration"], 100 * r[main_metric]) for r in evals if main_metric in r]
    if pts:
        ax2.plot(*zip(*pts), marker="o")
    ax2.set_xlabel("iteration")
    ax2.set_ylabel(f"target {main_metric} (%)")
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def peak_memory_mib(device: torch.device, *, reset: bool = False) -> float:
    """Peak memory: on CUDA the most allocated by tensors since the last reset (`reset`: start a
    new window), on the CPU the process's peak resident set so far (it only grows)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def open_tensorboard(out_dir: str, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(os.path.join(out_dir, "tb"))


def eval_row(metrics: Dict[int, Dict]) -> Dict[str, float]:
    row = {}
    for p, m in metrics.items():
        row[f"mIoU{p}"] = m["mIoU"]
    first = next(iter(metrics.values()))
    row.update({f"IoU.{name}": v for name, v in first["iou"].items()})
    return row


def class_names(cfg: Config) -> List[str]:
    from cluda.data.labels import CLASS_NAMES, PROTOCOLS
    return [CLASS_NAMES[c] for c in sorted(PROTOCOLS[cfg.eval.protocols[0]])]

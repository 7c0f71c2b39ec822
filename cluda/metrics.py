"""Segmentation metrics: confusion matrix, per-class IoU / accuracy, mIoU, and their tables.

The metric is the one every UDA segmentation paper reports (CLUDA, Vayyat et al., Table 1 and
Table 2; DAFormer; HRDA), the Cityscapes benchmark's class IoU:

    IoU_c = TP_c / (TP_c + FP_c + FN_c)          mIoU = mean of IoU_c over the protocol's classes

accumulated over the whole split in one K x K confusion matrix M (rows = ground truth, columns =
prediction; pixels whose label is 255 or outside [0, K) are not counted), so TP_c = M[c, c],
FN_c = sum_j M[c, j] - TP_c, FP_c = sum_i M[i, c] - TP_c.

Protocols (`cluda.data.labels.PROTOCOLS`): 19 classes for GTA -> Cityscapes; SYNTHIA -> Cityscapes
reports mIoU over 16 classes (no terrain, truck, train) and 13 (also no wall, fence, pole). As in
DAFormer / HRDA (mmseg), the per-class IoU always comes from the full K x K matrix and the protocol
only chooses which classes are averaged: a road pixel predicted as terrain still counts against
road in the 16-class protocol.

Absent classes (the convention, everywhere in this module):

- IoU_c is NaN when class c occurs in neither the ground truth nor the prediction (0 / 0). It is
  reported as absent ("n/a" in tables) and left out of mIoU, not counted as 0. A class that is
  predicted but never occurs in the ground truth has IoU 0 and does count.
- Acc_c = TP_c / (TP_c + FN_c) (per-class recall) is NaN when c never occurs in the ground truth,
  and is left out of mAcc.
- aAcc (overall pixel accuracy) = sum_c TP_c / sum_c (TP_c + FN_c) over the protocol's classes.
- Every value in the metrics dict is a fraction in [0, 1]; the tables print percentages.
"""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from cluda.data.labels import CLASS_NAMES, IGNORE_INDEX, PROTOCOLS
from cluda.fileio import atomic_write_files

__all__ = ["ConfusionMatrix", "compute_metrics", "format_table", "render_metrics", "write_metrics"]


# --------------------------------------------------------------------------------------------
# Confusion matrix
# --------------------------------------------------------------------------------------------

class ConfusionMatrix:
    """A K x K int64 confusion matrix accumulated on the device with `torch.bincount`.

    `matrix[i, j]` counts pixels whose ground truth is class i and whose prediction is class j.
    Pixels whose target is IGNORE_INDEX (255) or any value outside [0, K) are skipped. The matrix
    is a plain tensor, so data-parallel evaluation sums it across ranks with
    `torch.distributed.all_reduce(cm.matrix)` before `compute_metrics`.

    Args:
        num_classes: K, the number of classes the model predicts.
        device: where the matrix lives (put it where the predictions are, to avoid copies).
    """

    def __init__(self, num_classes: int, *, device: torch.device | str = "cpu") -> None:
        assert num_classes >= 1, f"num_classes must be >= 1, got {num_classes}"
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def reset(self) -> None:
        """Set every count back to zero (in place, so references to `.matrix` stay valid)."""
        self.matrix.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch of predictions.

        Args:
            pred: integer class ids in [0, K), any shape, e.g. (B, H, W).
            target: integer ground truth of the same shape; 255 and values outside [0, K) are
                skipped.
        """
        assert not (pred.is_floating_point() or target.is_floating_point()), \
            f"pred and target must hold integer class ids, got {pred.dtype}, {target.dtype}"
        assert pred.shape == target.shape, f"pred and target shapes differ: {pred.shape}, {target.shape}"
        k = self.num_classes
        pred = pred.to(self.device, torch.int64).reshape(-1)
        target = target.to(self.device, torch.int64).reshape(-1)
        valid = (target >= 0) & (target < k) & (target != IGNORE_INDEX)
        pred = pred[valid]
        target = target[valid]
        assert not pred.numel() or (pred.min() >= 0 and pred.max() < k), \
            f"pred holds class ids outside [0, {k})"
        # One bin per (ground truth, prediction) pair: row-major index target * K + pred.
        counts = torch.bincount(target * k + pred, minlength=k * k)
        self.matrix += counts.reshape(k, k)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------

def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def compute_metrics(matrix: torch.Tensor | np.ndarray, *, protocol: int = 19) -> dict[str, Any]:
    """Per-class IoU and accuracy, mIoU, mAcc and aAcc of a confusion matrix for one protocol.

    Args:
        matrix: (K, K) non-negative integer counts, rows = ground truth, columns = prediction
            (`ConfusionMatrix.matrix`, any device, or a numpy array). K must cover the
            protocol's train ids.
        protocol: a key of `cluda.data.labels.PROTOCOLS`: 19, 16 or 13.

    Returns:
        A dict: `protocol` (int); `class_ids` (train ids averaged, Table 1 order); `class_names`;
        `iou` and `acc` ({class name: float}, NaN for an absent class, see the module docstring);
        `mIoU`, `mAcc`, `aAcc` (floats in [0, 1], NaN if nothing was counted); `num_pixels`
        (ground-truth pixels of the protocol's classes). All values are plain Python objects.
    """
    if isinstance(matrix, np.ndarray):
        matrix = torch.from_numpy(matrix)
    class_ids = PROTOCOLS[protocol]
    k = matrix.shape[0]
    assert matrix.shape == (k, k) and not matrix.is_floating_point(), \
        f"matrix must be square integer counts, got {matrix.dtype} {tuple(matrix.shape)}"
    assert max(class_ids) < k, f"the {protocol}-class protocol needs train ids up to {max(class_ids)}"
    m = matrix.detach().to("cpu", torch.float64)  # exact for counts below 2**53
    tp = m.diagonal()
    gt = m.sum(dim=1)      # TP + FN per class
    predicted = m.sum(dim=0)  # TP + FP per class
    union = gt + predicted - tp
    iou, acc = {}, {}
    for c in class_ids:
        name = CLASS_NAMES[c]
        iou[name] = float(tp[c] / union[c]) if union[c] > 0 else float("nan")
        acc[name] = float(tp[c] / gt[c]) if gt[c] > 0 else float("nan")
    idx = torch.tensor(class_ids)
    num_pixels = float(gt[idx].sum())
    return {
        "protocol": protocol,
        "class_ids": tuple(class_ids),
        "class_names": tuple(CLASS_NAMES[c] for c in class_ids),
        "iou": iou,
        "acc": acc,
        "mIoU": _nanmean(list(iou.values())),
        "mAcc": _nanmean(list(acc.values())),
        "aAcc": float(tp[idx].sum()) / num_pixels if num_pixels > 0 else float("nan"),
        "num_pixels": int(num_pixels),
    }


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

def _as_rows(metrics: Mapping[str, Any]) -> tuple[list[tuple[str | None, Mapping[str, Any]]], int]:
    """A single metrics dict -> [(None, metrics)]; {row name: metrics} -> [(name, metrics), ...],
    and their protocol (one for every row)."""
    rows = [(None, metrics)] if "iou" in metrics else list(metrics.items())
    protocols = {m["protocol"] for _, m in rows}
    assert len(protocols) == 1, f"all rows of one table must use the same protocol, got {protocols}"
    return rows, protocols.pop()


def _percent(value: float, digits: int) -> str:
    return "n/a" if math.isnan(value) else f"{100.0 * value:.{digits}f}"


def format_table(metrics: Mapping[str, Any], *, fmt: str = "markdown", metric: str = "iou",
                 digits: int = 1) -> str:
    """The per-class table in the column order of the CLUDA paper's Table 1.

    Columns: road, sidewalk, building, wall, fence, pole, traffic light, traffic sign, vegetation,
    terrain, sky, person, rider, car, truck, bus, train, motorcycle, bicycle (the 16- and 13-class
    protocols leave out the classes they do not score), then mIoU (`metric="iou"`) or mAcc and
    aAcc (`metric="acc"`). Values are percentages; absent classes print "n/a".

    Args:
        metrics: one dict from `compute_metrics` (one row), or {row name: metrics dict} (one row
            per entry, with a leading "method" column), all of one protocol.
        fmt: "markdown" (a padded pipe table, readable in a terminal too) or "csv".
        metric: "iou" or "acc".
        digits: decimals of the percentages.
    """
    assert fmt in ("markdown", "csv") and metric in ("iou", "acc"), (fmt, metric)
    rows, protocol = _as_rows(metrics)
    # Train ids are numbered in Table 1's column order, so sorting by id gives that order.
    class_ids = sorted(PROTOCOLS[protocol])
    names = [CLASS_NAMES[c] for c in class_ids]
    summary = ["mIoU"] if metric == "iou" else ["mAcc", "aAcc"]
    named = rows[0][0] is not None
    header = (["method"] if named else []) + names + summary
    body = []
    for row_name, m in rows:
        cells = [str(row_name)] if named else []
        cells += [_percent(m[metric][n], digits) for n in names]
        cells += [_percent(m[s], digits) for s in summary]
        body.append(cells)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(body)
        return buf.getvalue()
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    # The method column is left-aligned, numbers are right-aligned ("---:").
    rule = ["-" * (w + 2) if named and i == 0 else "-" * (w + 1) + ":"
            for i, w in enumerate(widths)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join(rule) + "|"]
    for cells in body:
        parts = [c.ljust(w) if named and i == 0 else c.rjust(w)
                 for i, (c, w) in enumerate(zip(cells, widths))]
        lines.append("| " + " | ".join(parts) + " |")
    return "\n".join(lines) + "\n"


def render_metrics(metrics: Mapping[str, Any], *, details: Sequence[str] = ()) -> dict[str, str]:
    """The Markdown and CSV texts that `write_metrics` writes, rendered without touching disk.

    Args:
        metrics: as `format_table`.
        details: lines put under the Markdown title (what was evaluated, and how).

    Returns:
        {"markdown": text, "csv": text}.
    """
    rows, protocol = _as_rows(metrics)
    pixels = ", ".join(f"{name}: {m['num_pixels']}" if name is not None else str(m["num_pixels"])
                       for name, m in rows)
    header = f"# Evaluation, {protocol}-class protocol\n\n"
    if details:
        header += "".join(f"- {line}\n" for line in details) + "\n"
    markdown = (
        header
        + "Per-class IoU (%), columns in the order of the CLUDA paper's Table 1.\n\n"
        + format_table(metrics, fmt="markdown", metric="iou")
        + "\nPer-class accuracy (%), mean accuracy and overall pixel accuracy.\n\n"
        + format_table(metrics, fmt="markdown", metric="acc")
        + "\nn/a: IoU of a class that occurs in neither the ground truth nor the prediction, "
          "accuracy of a class absent from the ground truth; such classes are left out of the "
          f"means.\nGround-truth pixels scored: {pixels}.\n"
    )
    return {"markdown": markdown, "csv": format_table(metrics, fmt="csv", metric="iou", digits=2)}


def write_metrics(metrics: Mapping[str, Any], out_dir: str | os.PathLike, stem: str, *,
                  details: Sequence[str] = ()) -> dict[str, Path]:
    """Write the tables as `<out_dir>/<stem>.md` and `<out_dir>/<stem>.csv`, atomically.

    The Markdown file holds the IoU table (Table 1 order, with mIoU), the accuracy table (with
    mAcc and aAcc) and the absent-class convention; the CSV file holds the IoU table in CSV with
    two decimals. Both files are rendered first and then each is written to a temporary file and
    renamed over its destination, so a failure leaves any earlier files untouched.

    Args:
        metrics: as `format_table`.
        out_dir: directory (created if missing).
        stem: file name without extension, no path separators.
        details: lines put under the Markdown title (see `render_metrics`).

    Returns:
        {"markdown": path, "csv": path}.
    """
    assert stem not in ("", ".", "..") and os.sep not in stem and "/" not in stem, stem
    texts = render_metrics(metrics, details=details)
    out_dir = Path(out_dir)
    paths = {"markdown": out_dir / f"{stem}.md", "csv": out_dir / f"{stem}.csv"}
    atomic_write_files({paths[k]: texts[k] for k in paths})
    return paths

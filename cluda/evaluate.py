"""Semantic segmentation evaluation: confusion matrix, per-class IoU / accuracy, mIoU tables.

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

Test-time augmentation (`predict_probs`) follows mmseg's `aug_test`: logits of each view are
resized bilinearly to the label's resolution, turned into softmax probabilities, un-flipped, and
the probabilities are averaged over the views.

Command line (`main`, see `--help`):

    python -m cluda.evaluate --checkpoint CKPT [--config C] [--split val]
        [--weights student|teacher] [--protocols 19 16 13] [--flip] [--scales 0.75 1.0 1.25]
        [--mode whole|slide] [--out DIR] [--device cpu|cuda] [--section.key=value ...]

rebuilds the network from the checkpoint (`cluda.experiment.load_model_from_checkpoint`, also
used by `cluda.predict`), evaluates it on the target validation split (`evaluate_checkpoint`,
through `evaluate_model` as training's evaluations), prints the per-class tables and writes
them as Markdown, CSV and JSON, all rendered before the first file is written and each written
atomically (`run`; `train.py --eval-only CKPT` is the same command). Bad input (missing /
truncated checkpoint, config that does not fit the weights, unknown override key) ends with a
one-line message and exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cluda.data.labels import CLASS_NAMES, IGNORE_INDEX, PROTOCOLS
from cluda.errors import EXIT_STATUS_HELP, UserError, run_cli
from cluda.inference_memory import MemoryCheck
from cluda.fileio import atomic_write, atomic_write_files
from cluda.config import split_overrides
from cluda.experiment import (Config, autocast, backend_settings, build_val_dataset,
                              config_to_dict, load_model_from_checkpoint, make_predict_fn,
                              resolve_device, setup_distributed)

__all__ = [
    "ConfusionMatrix", "compute_metrics", "format_table", "write_metrics", "predict_probs",
    "evaluate", "atomic_write", "atomic_write_files", "render_metrics", "InputError",
    "note_model_differences", "evaluate_model", "evaluate_checkpoint", "evaluation_stem",
    "render_evaluation", "run", "main",
]


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
        if isinstance(num_classes, bool) or not isinstance(num_classes, int):
            raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
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
        if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise TypeError("pred and target must be torch tensors, got "
                            f"{type(pred).__name__} and {type(target).__name__}")
        for name, t in (("pred", pred), ("target", target)):
            if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
                raise TypeError(f"{name} must hold integer class ids, got dtype {t.dtype}")
        if pred.shape != target.shape:
            raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs "
                             f"{tuple(target.shape)}")
        k = self.num_classes
        pred = pred.to(self.device, torch.int64).reshape(-1)
        target = target.to(self.device, torch.int64).reshape(-1)
        valid = (target >= 0) & (target < k) & (target != IGNORE_INDEX)
        pred = pred[valid]
        target = target[valid]
        if pred.numel() and (pred.min() < 0 or pred.max() >= k):
            raise ValueError(f"pred holds class ids outside [0, {k}): "
                             f"min {int(pred.min())}, max {int(pred.max())}")
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
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {sorted(PROTOCOLS)}")
    if isinstance(matrix, np.ndarray):
        matrix = torch.from_numpy(matrix)
    if not isinstance(matrix, torch.Tensor):
        raise TypeError(f"matrix must be a tensor or numpy array, got {type(matrix).__name__}")
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"matrix must be square (K, K), got shape {tuple(matrix.shape)}")
    if matrix.is_floating_point() or matrix.is_complex() or matrix.dtype == torch.bool:
        raise TypeError(f"matrix must hold integer counts, got dtype {matrix.dtype}")
    class_ids = PROTOCOLS[protocol]
    k = matrix.shape[0]
    if max(class_ids) >= k:
        raise ValueError(f"the {protocol}-class protocol needs train ids up to {max(class_ids)}, "
                         f"but the matrix has only {k} classes")
    m = matrix.detach().to("cpu", torch.float64)  # exact for counts below 2**53
    if bool((m < 0).any()):
        raise ValueError("matrix holds negative counts")
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
    """A single metrics dict -> [(None, metrics)]; {row name: metrics} -> [(name, metrics), ...].
    Checks that every row uses one protocol and returns it."""
    if not isinstance(metrics, Mapping) or not metrics:
        raise TypeError("metrics must be a non-empty dict from compute_metrics, or a dict "
                        "{row name: metrics dict}")
    if "iou" in metrics and "protocol" in metrics:
        rows = [(None, metrics)]
    else:
        rows = list(metrics.items())
    for name, m in rows:
        if not isinstance(m, Mapping) or not {"iou", "acc", "protocol", "class_ids"} <= set(m):
            raise TypeError(f"row {name!r} is not a metrics dict from compute_metrics")
    protocols = {m["protocol"] for _, m in rows}
    if len(protocols) != 1:
        raise ValueError("all rows of one table must use the same protocol, got "
                         f"{sorted(protocols)}")
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
    if fmt not in ("markdown", "csv"):
        raise ValueError(f"fmt must be 'markdown' or 'csv', got {fmt!r}")
    if metric not in ("iou", "acc"):
        raise ValueError(f"metric must be 'iou' or 'acc', got {metric!r}")
    if isinstance(digits, bool) or not isinstance(digits, int) or digits < 0:
        raise ValueError(f"digits must be a non-negative int, got {digits!r}")
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


def _check_stem(stem: str) -> None:
    if not isinstance(stem, str) or stem in ("", ".", "..") or "/" in stem or os.sep in stem:
        raise ValueError(f"stem must be a plain file name, got {stem!r}")


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
    _check_stem(stem)
    texts = render_metrics(metrics, details=details)
    out_dir = Path(out_dir)
    paths = {"markdown": out_dir / f"{stem}.md", "csv": out_dir / f"{stem}.csv"}
    atomic_write_files({paths[k]: texts[k] for k in paths})
    return paths


# --------------------------------------------------------------------------------------------
# Inference with test-time augmentation, and the evaluation loop
# --------------------------------------------------------------------------------------------

def _check_scales(scales: Sequence[float]) -> tuple[float, ...]:
    try:
        scales = tuple(float(s) for s in scales)
    except TypeError as e:
        raise TypeError(f"scales must be a sequence of numbers, got {scales!r}") from e
    if not scales or not all(math.isfinite(s) and s > 0 for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of positive numbers, got {scales}")
    return scales


@torch.no_grad()
def predict_probs(predict_fn: Callable[[torch.Tensor], torch.Tensor], img: torch.Tensor, *,
                  out_size: tuple[int, int] | None = None, num_classes: int | None = None,
                  flip: bool = False, scales: Sequence[float] = (1.0,)) -> torch.Tensor:
    """Class probabilities of a batch at `out_size`, averaged over test-time augmentations.

    For each scale s the input is resized bilinearly to round(s * (H, W)); with `flip` the
    mirrored input is run too. Each view's logits are resized bilinearly to `out_size`, turned
    into softmax probabilities and mirrored back, and the probabilities are averaged.

    Args:
        predict_fn: img (B, 3, h, w) -> logits (B, K, h', w') at any resolution, e.g.
            `lambda x: segmentor.inference(x, mode="slide")`. It runs under `torch.no_grad()`;
            putting the model in eval mode is the caller's job.
        img: (B, 3, H, W) floating point, normalised as the model expects.
        out_size: (H_out, W_out) of the result, the label's full resolution; default (H, W).
        num_classes: if given, the K the logits must have.
        flip: also run the horizontally mirrored input.
        scales: input scale factors.

    Returns:
        (B, K, H_out, W_out) float32 probabilities on the logits' device.
    """
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"img must be a tensor, got {type(img).__name__}")
    if img.dim() != 4:
        raise ValueError(f"img must be (B, C, H, W), got shape {tuple(img.shape)}")
    if not img.is_floating_point():
        raise TypeError(f"img must be floating point (normalised), got dtype {img.dtype}")
    scales = _check_scales(scales)
    height, width = img.shape[-2:]
    out_size = (height, width) if out_size is None else tuple(int(s) for s in out_size)
    if len(out_size) != 2 or min(out_size) < 1:
        raise ValueError(f"out_size must be (H, W) with positive sizes, got {out_size}")
    total = None
    views = 0
    for s in scales:
        size = (max(1, round(height * s)), max(1, round(width * s)))
        x = img if size == (height, width) else F.interpolate(
            img, size=size, mode="bilinear", align_corners=False)
        for mirrored in ((False, True) if flip else (False,)):
            logits = predict_fn(x.flip(-1) if mirrored else x)
            if not isinstance(logits, torch.Tensor) or logits.dim() != 4 \
                    or logits.shape[0] != img.shape[0]:
                got = (tuple(logits.shape) if isinstance(logits, torch.Tensor)
                       else type(logits).__name__)
                raise ValueError(f"predict_fn must return logits (B={img.shape[0]}, K, h, w), "
                                 f"got {got}")
            if num_classes is not None and logits.shape[1] != num_classes:
                raise ValueError(f"predict_fn returned {logits.shape[1]} classes, "
                                 f"expected num_classes={num_classes}")
            logits = logits.float()
            if tuple(logits.shape[-2:]) != out_size:
                logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
            probs = logits.softmax(dim=1)
            if mirrored:
                probs = probs.flip(-1)
            total = probs if total is None else total + probs
            views += 1
    return total / views


def _batches(sample: Any, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample dict -> (img (B, 3, H, W), label (B, H_l, W_l)), checked."""
    if not isinstance(sample, Mapping):
        raise TypeError(f"sample {index} must be a dict with 'img' and 'label', got "
                        f"{type(sample).__name__}")
    if "img" not in sample or "label" not in sample:
        raise ValueError(f"sample {index} must have keys 'img' and 'label', got {sorted(sample)}")
    img, label = sample["img"], sample["label"]
    if not isinstance(img, torch.Tensor) or not isinstance(label, torch.Tensor):
        raise TypeError(f"sample {index}: 'img' and 'label' must be tensors")
    if img.dim() == 3:
        img = img.unsqueeze(0)
    if label.dim() == 2:
        label = label.unsqueeze(0)
    if img.dim() != 4 or label.dim() != 3 or img.shape[0] != label.shape[0]:
        raise ValueError(f"sample {index}: expected img (3, H, W) / (B, 3, H, W) and label "
                         f"(H, W) / (B, H, W), got {tuple(sample['img'].shape)} and "
                         f"{tuple(sample['label'].shape)}")
    return img, label


def evaluate(predict_fn: Callable[[torch.Tensor], torch.Tensor],
             data: Iterable[Mapping[str, Any]], *, num_classes: int = 19,
             protocols: Sequence[int] = (19,), flip: bool = False,
             scales: Sequence[float] = (1.0,), device: torch.device | str = "cpu",
             progress: bool = True,
             memory_check: Callable[..., None] | None = None) -> dict[str, Any]:
    """Evaluate a predict function over a data set at the labels' full resolution.

    Args:
        predict_fn: img (B, 3, h, w) -> logits (B, K, h', w'), any resolution (see
            `predict_probs`); it runs under `torch.no_grad()`.
        data: an iterable (a list, a DataLoader) of sample dicts with `img` (3, H, W) or
            (B, 3, H, W) float normalised and `label` (H_l, W_l) or (B, H_l, W_l) integer train ids
            at full resolution (255 = ignore). Other keys are ignored.
        num_classes: K; the logits must have K channels.
        protocols: keys of `cluda.data.labels.PROTOCOLS` to report (19, 16, 13).
        flip: horizontal-flip test-time augmentation.
        scales: multi-scale test-time augmentation (input scale factors); probabilities of all
            views are averaged.
        device: where images go and the confusion matrix accumulates.
        progress: show a tqdm bar.
        memory_check: called as `memory_check(img_shape, label_size, what=<image path>)` before
            each batch's inference, e.g. a `cluda.inference_memory.MemoryCheck`, which raises
            when the batch cannot fit in memory.

    Returns:
        {"metrics": {protocol: compute_metrics(...) dict}, "matrix": (K, K) int64 tensor on
        `device`, "num_images": int}.
    """
    protocols = tuple(protocols)
    for p in protocols:
        if p not in PROTOCOLS:
            raise ValueError(f"unknown protocol {p!r}; known: {sorted(PROTOCOLS)}")
        if max(PROTOCOLS[p]) >= num_classes:
            raise ValueError(f"the {p}-class protocol needs num_classes >= "
                             f"{max(PROTOCOLS[p]) + 1}, got {num_classes}")
    scales = _check_scales(scales)
    cm = ConfusionMatrix(num_classes, device=device)
    num_images = 0
    try:
        total = len(data)  # type: ignore[arg-type]
    except TypeError:
        total = None
    for i, sample in enumerate(tqdm(data, total=total, disable=not progress, desc="evaluate")):
        img, label = _batches(sample, i)
        if memory_check is not None:
            paths = sample.get("path", f"sample {i}")
            memory_check(tuple(img.shape), tuple(label.shape[-2:]),
                         what=paths[0] if isinstance(paths, (list, tuple)) else str(paths))
        img = img.to(device, non_blocking=True)
        label = label.to(device, non_blocking=True)
        probs = predict_probs(predict_fn, img, out_size=tuple(label.shape[-2:]),
                              num_classes=num_classes, flip=flip, scales=scales)
        cm.update(probs.argmax(dim=1), label)
        num_images += img.shape[0]
    return {
        "metrics": {p: compute_metrics(cm.matrix, protocol=p) for p in protocols},
        "matrix": cm.matrix,
        "num_images": num_images,
    }


# --------------------------------------------------------------------------------------------
# A model on its validation set, and a checkpoint (shared with train.py and `cluda.predict`)
# --------------------------------------------------------------------------------------------

class InputError(UserError):
    """Bad input the user can fix: a missing or truncated file, a config that does not fit the
    checkpoint's weights, an unreadable image. The command lines print its one-line message
    and exit with status 2, without a traceback (as every `cluda.errors` user error)."""


@contextlib.contextmanager
def input_errors() -> Iterator[None]:
    """Turn the errors that bad files and configs raise (FileNotFoundError, PermissionError,
    ValueError, which includes `cluda.config.ConfigError`) into `InputError`.

    Only the loading steps run inside it, so a bug in the model or the metrics still shows its
    traceback."""
    try:
        yield
    except InputError:
        raise
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
            ValueError) as err:
        raise InputError(" ".join(str(err).split())) from err  # one line


def note_model_differences(diffs: Sequence[str]) -> None:
    """Tell the user (stderr) that the network was built with model settings other than the
    stored ones: the weights fit, but inference may differ (e.g. HRDA's HR window size)."""
    if diffs:
        print("note: the model section differs from the checkpoint's stored config (the weights "
              "fit): " + "; ".join(diffs), file=sys.stderr)


def evaluate_model(model: nn.Module, val_data, cfg: Config, device: torch.device, *,
                   rank: int = 0, world: int = 1, progress: bool = True) -> dict[str, Any]:
    """mIoU and per-class IoU of `model` on a validation set, for every protocol of
    `eval.protocols`, with the config's inference mode, test-time augmentation and autocast:
    training's evaluations, `train.py --eval-only` and `python -m cluda.evaluate` all run this.
    With several processes each evaluates every world-th image and the confusion matrices are
    summed.

    Returns:
        `evaluate`'s dict: {"metrics": {protocol: metrics dict}, "matrix", "num_images"}.
    """
    if world > 1:
        val_data = torch.utils.data.Subset(val_data, range(rank, len(val_data), world))
    loader = torch.utils.data.DataLoader(val_data, batch_size=cfg.eval.batch_size,
                                         num_workers=cfg.eval.workers,
                                         generator=torch.Generator())  # leaves the global RNG alone
    was_training = model.training
    model.eval()
    with autocast(cfg, device):
        result = evaluate(make_predict_fn(model, cfg), loader, num_classes=cfg.model.num_classes,
                          protocols=cfg.eval.protocols, flip=cfg.eval.flip, scales=cfg.eval.scales,
                          device=device, progress=progress and rank == 0,
                          memory_check=MemoryCheck(model, cfg, device))
    model.train(was_training)
    if world > 1:
        counts = torch.tensor([result["num_images"]], device=result["matrix"].device)
        dist.all_reduce(result["matrix"])
        dist.all_reduce(counts)
        result["num_images"] = int(counts)
        result["metrics"] = {p: compute_metrics(result["matrix"], protocol=p)
                             for p in cfg.eval.protocols}
    return result


def evaluate_checkpoint(checkpoint: str | os.PathLike, *,
                        config: str | os.PathLike | Config | None = None,
                        overrides: Sequence[str] = (), weights: str = "student",
                        progress: bool = True) -> dict[str, Any]:
    """mIoU and per-class IoU / accuracy of a checkpoint on its target validation split.

    Data set, inference mode, protocols, test-time augmentation and device come from the
    config (see `cluda.experiment.load_model_from_checkpoint`): `data.val`, `eval.*`,
    `experiment.device`. Under torchrun each process evaluates a share of the images.

    Args:
        checkpoint: a checkpoint written by `train.py`.
        config: a YAML experiment (or a `Config`) used instead of the stored config, or None.
        overrides: `--section.key=value` strings, e.g. `--eval.mode=slide`.
        weights: "student" or "teacher".
        progress: show a tqdm bar.

    Returns:
        `evaluate_model`'s dict plus "config" (the Config used), "device" (str), "rank" and the
        info of `load_model_from_checkpoint`.
    """
    model, cfg, info = load_model_from_checkpoint(checkpoint, config=config, overrides=overrides,
                                                  weights=weights)
    rank, world, local_rank = setup_distributed()
    device = resolve_device(cfg, local_rank)
    v = cfg.data.val
    if v.split not in (None, "val") and v.kind in ("gta", "synthia"):
        raise InputError(f"data.val.split {v.split!r}: {v.kind} data sets have no splits")
    with input_errors():
        val = build_val_dataset(cfg)
    if len(val) == 0:
        raise InputError(f"the validation set of data.val ({v.kind}, root {v.root}, split "
                         f"{v.split or 'val'}) is empty")
    model.to(device)
    with backend_settings(cfg):
        result = evaluate_model(model, val, cfg, device, rank=rank, world=world, progress=progress)
    result.update(info, config=cfg, device=str(device), rank=rank)
    return result


def _describe(result: Mapping[str, Any]) -> list[str]:
    """The Markdown's lines on what was evaluated and how."""
    cfg: Config = result["config"]
    v, e = cfg.data.val, cfg.eval
    where = f" at `{v.root}`" if v.root else ""
    mode = e.mode if e.mode == "whole" else f"slide (window {e.crop_size}, stride {e.stride})"
    if cfg.model.hrda.enabled:
        mode += (f"; HRDA, HR windows {cfg.model.hrda.hr_slide_size} every "
                 f"{cfg.model.hrda.hr_slide_stride}")
    return [
        f"checkpoint: `{result['checkpoint']}`, {result['weights']} weights, iteration "
        f"{result['iteration']}",
        f"model: {cfg.model.backbone}, {cfg.model.channels} fused channels"
        + (", HRDA" if cfg.model.hrda.enabled else ""),
        f"data: {v.kind}{where}, split {v.split or 'val'}, {result['num_images']} images"
        + (f", resized to {v.scale}" if v.scale else ""),
        f"inference: {mode}; flip {'on' if e.flip else 'off'}; scales {list(e.scales)}; "
        f"device {result['device']}",
    ]


def _json_safe(value: Any) -> Any:
    """NaN (an absent class) -> None, tuples -> lists, recursively."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def render_evaluation(result: Mapping[str, Any], stem: str) -> dict[str, str]:
    """All files of one evaluation, {file name: text}, rendered before anything is written.

    Per protocol the Markdown and CSV tables of `render_metrics`, named `<stem>.md/.csv` for
    one protocol and `<stem>_<protocol>.md/.csv` for several (as `train.py --eval-only`);
    and `<stem>.json` with every number at full precision (NaN written as null), the
    confusion matrix and the settings."""
    _check_stem(stem)
    metrics = result["metrics"]
    details = _describe(result)
    files: dict[str, str] = {}
    for p, m in metrics.items():
        name = stem if len(metrics) == 1 else f"{stem}_{p}"
        texts = render_metrics(m, details=details)
        files[f"{name}.md"] = texts["markdown"]
        files[f"{name}.csv"] = texts["csv"]
    cfg: Config = result["config"]
    summary = {
        "checkpoint": os.path.abspath(result["checkpoint"]),
        "iteration": result["iteration"],
        "weights": result["weights"],
        "device": result["device"],
        "num_images": result["num_images"],
        "data": config_to_dict(cfg)["data"]["val"],
        "eval": config_to_dict(cfg)["eval"],
        "metrics": {str(p): {k: v for k, v in m.items()} for p, m in metrics.items()},
        "class_names": list(CLASS_NAMES),
        "confusion_matrix": result["matrix"].cpu().tolist(),
    }
    # One top-level key per line (the confusion matrix on one line too): diffable, still JSON.
    lines = [f"{json.dumps(k)}: {json.dumps(v, allow_nan=False)}"
             for k, v in _json_safe(summary).items()]
    files[f"{stem}.json"] = "{\n " + ",\n ".join(lines) + "\n}\n"
    return files


def _eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cluda.evaluate", allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Evaluate a train.py checkpoint on the target validation split: per-class IoU in\n"
            "the column order of the CLUDA paper's Table 1, mIoU for the 19 / 16 / 13-class\n"
            "protocols.\n"
            "The network is rebuilt from the config stored in the checkpoint (or from --config);\n"
            "any --section.key=value argument overrides that config, e.g.\n"
            "--data.val.root=/data/cityscapes or --data.val.max_images=50. The flags below are\n"
            "shortcuts for such overrides and win over them. On CUDA, inference runs under\n"
            "bfloat16 autocast when train.amp is set, as during training (--train.amp=false\n"
            "turns it off)."),
        epilog=(
            "writes, into --out (default: the checkpoint's folder), at the end, atomically:\n"
            "  eval_<checkpoint>[_<split>][_teacher].md    IoU and accuracy tables (Markdown)\n"
            "  eval_<checkpoint>[_<split>][_teacher].csv   the IoU table (CSV)\n"
            "  eval_<checkpoint>[_<split>][_teacher].json  every number, the confusion matrix\n"
            "with several protocols, the .md / .csv names end in _<protocol> (e.g. _16, _13).\n\n"
            "examples:\n"
            "  python -m cluda.evaluate --checkpoint work_dirs/demo/latest.pt\n"
            "  python -m cluda.evaluate --checkpoint latest.pt --data.val.root=/data/cityscapes \\\n"
            "      --mode slide --protocols 16 13 --out results/\n\n"
            + EXIT_STATUS_HELP))
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="a latest.pt / best.pt written by train.py")
    parser.add_argument("--config", default=None, metavar="YAML",
                        help="build the network and data from this experiment instead of the "
                             "checkpoint's stored config (its model section must fit the weights)")
    parser.add_argument("--split", default=None,
                        help="split of the validation data set (data.val.split; default val)")
    parser.add_argument("--weights", choices=("student", "teacher"), default="student",
                        help="which network of the checkpoint (default: student)")
    parser.add_argument("--protocols", type=int, nargs="+", choices=sorted(PROTOCOLS),
                        default=None, metavar="P",
                        help="19 (GTA -> CS) and / or 16 13 (SYNTHIA -> CS) (eval.protocols)")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                        help="horizontal-flip test-time augmentation (eval.flip)")
    parser.add_argument("--scales", type=float, nargs="+", default=None, metavar="S",
                        help="multi-scale test-time augmentation, e.g. 0.75 1.0 1.25 (eval.scales)")
    parser.add_argument("--mode", choices=("whole", "slide"), default=None,
                        help="whole image or sliding window with eval.crop_size / eval.stride "
                             "(eval.mode)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (default: the checkpoint's folder)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                        help="where to run (experiment.device)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def parse_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
              *, intermixed: bool = False) -> tuple[argparse.Namespace, list[str]]:
    """Parse `argv`: (the parsed flags, the `--section.key=value` config overrides in order;
    `cluda.config.split_overrides`). Anything else the parser does not know is a usage error
    (exit status 2)."""
    rest, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    if intermixed:
        args, extra = parser.parse_known_intermixed_args(rest)
    else:
        args, extra = parser.parse_known_args(rest)
    if extra:
        parser.error(f"unrecognised arguments {extra}; config overrides are --section.key=value")
    return args, overrides


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The common flags as `--section.key=value` overrides (values written as Python literals,
    which `cluda.config.parse_overrides` reads back exactly)."""
    out = []
    for flag, key in (("split", "data.val.split"), ("protocols", "eval.protocols"),
                      ("flip", "eval.flip"), ("scales", "eval.scales"), ("mode", "eval.mode"),
                      ("device", "experiment.device")):
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"--{key}={list(value) if isinstance(value, list) else value!r}")
    return out


def check_out_dir(path: str | os.PathLike) -> Path:
    """An output folder that exists or can be created (checked before any work is done)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"output folder {path} exists and is not a folder")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m cluda.evaluate`; see `--help`. Returns the exit status: 0, or 2 after a user
    error (one line on stderr, `cluda.errors.run_cli`)."""
    return run_cli(_main, argv)


def evaluation_stem(checkpoint: str | os.PathLike, *, split: str | None = None,
                    weights: str = "student") -> str:
    """`eval_<checkpoint>[_<split>][_teacher]`, the name of an evaluation's files."""
    split = split or "val"
    return (f"eval_{Path(checkpoint).stem}" + ("" if split == "val" else f"_{split}")
            + ("_teacher" if weights == "teacher" else ""))


def run(checkpoint: str | os.PathLike, *, config: str | os.PathLike | Config | None = None,
        overrides: Sequence[str] = (), weights: str = "student",
        out_dir: str | os.PathLike | None = None, progress: bool = True) -> dict[str, Any]:
    """Evaluate a checkpoint, print the tables and write its files (`render_evaluation`) into
    `out_dir` (default: the checkpoint's folder): `python -m cluda.evaluate` and
    `train.py --eval-only`. Returns `evaluate_checkpoint`'s dict."""
    out_dir = check_out_dir(out_dir if out_dir is not None else Path(checkpoint).parent)
    result = evaluate_checkpoint(checkpoint, config=config, overrides=overrides, weights=weights,
                                 progress=progress)
    if result["rank"] != 0:
        return result
    stem = evaluation_stem(checkpoint, split=result["config"].data.val.split, weights=weights)
    with input_errors():
        files = render_evaluation(result, stem)
    for p, m in result["metrics"].items():
        print(f"\n{p}-class protocol, per-class IoU (%), {result['num_images']} images:")
        print(format_table(m), end="")
    note_model_differences(result["model_differences"])
    written = atomic_write_files({out_dir / name: text for name, text in files.items()})
    summary = ", ".join(f"{100 * m['mIoU']:.2f} ({p} classes)"
                        for p, m in result["metrics"].items())
    print(f"\nmIoU {summary}; wrote {', '.join(str(p) for p in written)}")
    return result


def _main(argv: Sequence[str] | None) -> int:
    args, overrides = parse_cli(_eval_parser(), argv)
    run(args.checkpoint, config=args.config, overrides=overrides + flag_overrides(args),
        weights=args.weights, out_dir=args.out, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())

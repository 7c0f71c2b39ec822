"""Inference: a network's logits at any resolution (`make_predict_fn`: whole image or sliding
window, from the config), class probabilities with test-time augmentation (`predict_probs`),
one image's train ids at its full resolution (`predict_image`), and the evaluation loop over a
data set (`evaluate`, and `evaluate_model`: the one evaluation that training, `train.py
--eval-only` and the command lines run).

Test-time augmentation follows mmseg's `aug_test`: logits of each view are resized bilinearly to
the label's resolution, turned into softmax probabilities, un-flipped, and the probabilities are
averaged over the views.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cluda.config import Config
from cluda.data.labels import NUM_CLASSES
from cluda.data.transforms import normalize, rescale
from cluda.device import autocast
from cluda.inference_memory import MemoryCheck
from cluda.metrics import ConfusionMatrix, compute_metrics

__all__ = ["make_predict_fn", "predict_probs", "predict_image", "evaluate", "evaluate_model"]


def make_predict_fn(model: nn.Module, cfg: Config) -> Callable[[torch.Tensor], torch.Tensor]:
    """img (B, 3, H, W) -> logits (B, K, H, W) with `eval.mode` ("whole" or "slide" with
    `eval.crop_size` / `eval.stride`). Put the model in eval mode first."""
    e = cfg.eval
    if e.mode == "slide":
        crop, stride = tuple(e.crop_size), tuple(e.stride)
        return lambda img: model.inference(img, mode="slide", crop_size=crop, stride=stride)
    return lambda img: model.inference(img, mode="whole")


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
    assert img.dim() == 4 and img.is_floating_point(), (img.dtype, img.shape)  # (B, 3, H, W)
    assert scales and min(scales) > 0, scales
    height, width = img.shape[-2:]
    out_size = (height, width) if out_size is None else tuple(int(s) for s in out_size)
    total = None
    views = 0
    for s in scales:
        size = (max(1, round(height * s)), max(1, round(width * s)))
        x = img if size == (height, width) else F.interpolate(
            img, size=size, mode="bilinear", align_corners=False)
        for mirrored in ((False, True) if flip else (False,)):
            logits = predict_fn(x.flip(-1) if mirrored else x)  # (B, K, h', w')
            assert logits.dim() == 4 and logits.shape[0] == img.shape[0], logits.shape
            assert num_classes is None or logits.shape[1] == num_classes, \
                f"predict_fn returned {logits.shape[1]} classes, expected num_classes={num_classes}"
            logits = logits.float()
            if tuple(logits.shape[-2:]) != out_size:
                logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
            probs = logits.softmax(dim=1)
            if mirrored:
                probs = probs.flip(-1)
            total = probs if total is None else total + probs
            views += 1
    return total / views


def _batches(sample: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample dict -> (img (B, 3, H, W), label (B, H_l, W_l))."""
    img, label = sample["img"], sample["label"]
    if img.dim() == 3:
        img = img.unsqueeze(0)
    if label.dim() == 2:
        label = label.unsqueeze(0)
    assert img.dim() == 4 and label.dim() == 3 and img.shape[0] == label.shape[0], \
        (img.shape, label.shape)
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
    cm = ConfusionMatrix(num_classes, device=device)
    num_images = 0
    try:
        total = len(data)  # type: ignore[arg-type]
    except TypeError:
        total = None
    for i, sample in enumerate(tqdm(data, total=total, disable=not progress, desc="evaluate")):
        img, label = _batches(sample)
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


@torch.no_grad()
def predict_image(predict_fn: Callable[[torch.Tensor], torch.Tensor], image: np.ndarray, *,
                  scale: Sequence[int] | None = None, num_classes: int = NUM_CLASSES,
                  flip: bool = False, scales: Sequence[float] = (1.0,),
                  device: torch.device | str = "cpu") -> np.ndarray:
    """Train ids of one image at its full resolution, as the evaluation computes them.

    The image is resized to `scale` (keep-ratio (long, short) bounds, as `data.val.scale` in
    evaluation) and normalised; the class probabilities (`predict_probs`, with
    the same test-time augmentation) are brought back to the image's size before the argmax.

    Args:
        predict_fn: img (1, 3, h, w) -> logits (1, K, h', w'), e.g. from
            `make_predict_fn`.
        image: (H, W, 3) uint8 RGB.
        scale: (long, short) resize bounds, or None to run at full resolution.
        num_classes: K.
        flip / scales: test-time augmentation.
        device: where the input goes (the model's device).

    Returns:
        (H, W) uint8 train ids.
    """
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8, image.shape  # (H, W, 3) uint8
    resized, _ = rescale(image, None, scale=None if scale is None else tuple(scale))
    x = normalize(resized)[None].to(device)  # (1, 3, h, w)
    probs = predict_probs(predict_fn, x, out_size=image.shape[:2], num_classes=num_classes,
                          flip=flip, scales=scales)  # (1, K, H, W)
    return probs.argmax(dim=1)[0].to(torch.uint8).cpu().numpy()


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

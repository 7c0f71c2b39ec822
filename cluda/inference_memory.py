"""An up-front estimate of the memory one inference needs, so that an image too large for the
chosen inference mode fails at once, naming a remedy, instead of after minutes of work.

Estimate (bytes, float32 activations; `estimate_bytes`). One forward pass of the DAFormer
network over P input pixels (all images of the batch, or all windows that one pass holds)
keeps, at its peak, maps at 1/4 of the input resolution (P / 16 positions) with

    8 E + 8 A + C + 4 C1    channels

(E = model.embed_dim, A = model.aspp_channels, C = model.channels, C1 = the encoder's first
stage): the decoder's four embedded levels and their concatenation (8 E), the ASPP branches and
theirs (8 A), the fused features (C), the first encoder stage's Mix-FFN (4 C1 hidden channels).
On top come the class scores at the output size P_out (the label's or the image's full
resolution): the logits, their softmax and the running sum over test-time views, 3 K P_out. So

    bytes ~= 4 * (P / 16 * (8 E + 8 A + C + 4 C1) + 3 K P_out + 3 P)

Measured on a CPU (`bench/results/inference_memory_cpu.md`: MiT-B0 / B2, C 256 / 512, whole
and slide, up to 512 x 1024) it lies between 9 % below and 12 % above the measured peak; GPU and HRDA cases are not
measured yet (`python -m bench.inference_memory --cuda`).

What one pass holds depends on the mode:

- whole: the image (scaled by the largest `eval.scales` factor).
- slide (a `Segmentor`): every window at once (`cluda.models.segmentor.sliding_window` batches
  them), n_windows x crop area: more than the image, since windows overlap.
- HRDA: the LR view (lr_scale^2 of the pixels) and, separately, all HR windows of the image
  (whole) or of one outer window (slide: outer windows run one at a time).

Attention in the MiT encoder goes through `scaled_dot_product_attention`, which on CUDA and on
the CPU does not hold the N x M score matrix, so nothing quadratic in the pixels is counted.
bfloat16 autocast on CUDA roughly halves the activations; the estimate stays float32, so it
errs high there. `bench/inference_memory.py` measures it against peak memory.

The check (`MemoryCheck`) refuses a pass whose estimate exceeds the memory available on the
device: on CUDA what `torch.cuda.mem_get_info` reports free plus what torch's allocator holds
unused; on the CPU the kernel's MemAvailable. The environment variable
`CLUDA_INFERENCE_MEMORY_GIB` replaces that number (e.g. to share a GPU; `inf` turns the check
off).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from cluda.config import Config
from cluda.errors import UserError

__all__ = ["MEMORY_ENV", "available_bytes", "estimate_bytes", "MemoryCheck", "check_val_data"]

MEMORY_ENV = "CLUDA_INFERENCE_MEMORY_GIB"
GIB = 1024 ** 3


def _windows(size: int, crop: int, stride: int) -> int:
    """Number of sliding-window starts along one axis (`cluda.models.segmentor.window_starts`)."""
    crop = min(crop, size)
    return max(size - crop + stride - 1, 0) // stride + 1


def _pass_bytes(pixels: float, *, c1: int, embed: int, aspp: int, channels: int) -> float:
    """Activations of one forward pass over `pixels` input pixels, without the class scores."""
    return 4.0 * (pixels / 16.0 * (8 * embed + 8 * aspp + channels + 4 * c1) + 3 * pixels)


def estimate_bytes(*, height: int, width: int, out_size: Sequence[int], batch: int = 1,
                   mode: str = "whole", crop_size: Sequence[int] = (512, 512),
                   stride: Sequence[int] = (341, 341), scales: Sequence[float] = (1.0,),
                   num_classes: int = 19, c1: int = 64, embed_dim: int = 256,
                   aspp_channels: int = 256, channels: int = 512,
                   hrda: Optional[dict] = None) -> int:
    """Peak bytes of inference on a (batch, 3, height, width) input (formula in the module
    docstring).

    Args:
        height / width: the network's input size (after `data.val.scale`).
        out_size: (H_out, W_out) of the class scores (the label's or image's full resolution).
        batch: images per pass.
        mode: "whole" or "slide" (`eval.mode`), with `crop_size` / `stride`.
        scales: test-time scale factors; the largest view counts.
        num_classes: K.
        c1: channels of the encoder's first stage (MiT-B0 32, MiT-B1..B5 64).
        embed_dim / aspp_channels / channels: the decoder's sizes (`model.*`).
        hrda: None, or {"lr_scale", "hr_slide_size", "hr_slide_stride"} of `model.hrda`.
    """
    sizes = dict(c1=c1, embed=embed_dim, aspp=aspp_channels, channels=channels)
    s = max(scales)
    h, w = max(1, round(height * s)), max(1, round(width * s))

    def forward_pixels(fh: int, fw: int) -> float:
        """Peak activations of the network on one (batch, 3, fh, fw) input."""
        if hrda is None:
            return _pass_bytes(batch * fh * fw, **sizes)
        lr = batch * fh * fw * hrda["lr_scale"] ** 2
        (wh, ww), (sh, sw) = hrda["hr_slide_size"], hrda["hr_slide_stride"]
        n = _windows(fh, wh, sh) * _windows(fw, ww, sw)
        hr = batch * n * min(wh, fh) * min(ww, fw)
        return max(_pass_bytes(lr, **sizes), _pass_bytes(hr, **sizes))

    if mode == "whole":
        peak = forward_pixels(h, w)
    elif hrda is not None:  # HRDA's outer windows run one at a time
        peak = forward_pixels(min(crop_size[0], h), min(crop_size[1], w))
    else:  # a Segmentor's windows go through one pass together
        n = _windows(h, crop_size[0], stride[0]) * _windows(w, crop_size[1], stride[1])
        peak = _pass_bytes(batch * n * min(crop_size[0], h) * min(crop_size[1], w), **sizes)
    scores = 4.0 * 3 * num_classes * batch * out_size[0] * out_size[1]
    return int(peak + scores)


def available_bytes(device: torch.device) -> Optional[float]:
    """Memory inference may use on `device` (module docstring), or None if unknown."""
    override = os.environ.get(MEMORY_ENV, "").strip()
    if override:
        try:
            value = float(override)
        except ValueError:
            raise UserError(f"{MEMORY_ENV}={override!r}: expected a number of GiB "
                            "(inf turns the memory check off)") from None
        if not value > 0:
            raise UserError(f"{MEMORY_ENV}={override!r}: expected a positive number of GiB")
        return value * GIB
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free + torch.cuda.memory_reserved(device)
                     - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


class MemoryCheck:
    """Refuses, before it runs, an inference pass whose estimated memory exceeds what the device
    has free, with the estimate, the memory available and the remedies that would fit.

    Args:
        model: the network (a `Segmentor` or an `HRDA`), for its encoder's first-stage width.
        cfg: the experiment (`cluda.config.Config`): `model.*`, `eval.*`.
        device: where inference runs.
    """

    def __init__(self, model: nn.Module, cfg, device: torch.device) -> None:
        inner = getattr(model, "segmentor", model)
        m, e = cfg.model, cfg.eval
        self.device = device
        self.mode, self.crop, self.stride = e.mode, tuple(e.crop_size), tuple(e.stride)
        self.scales = tuple(e.scales)
        h = m.hrda
        self.sizes = dict(num_classes=m.num_classes, c1=int(inner.encoder.channels[0]),
                          embed_dim=m.embed_dim, aspp_channels=m.aspp_channels,
                          channels=m.channels,
                          hrda=None if not h.enabled else {
                              "lr_scale": h.lr_scale, "hr_slide_size": tuple(h.hr_slide_size),
                              "hr_slide_stride": tuple(h.hr_slide_stride)})

    def estimate(self, shape: Sequence[int], out_size: Sequence[int], *,
                 mode: Optional[str] = None) -> int:
        """Bytes for an input of `shape` (B, 3, H, W) whose scores come out at `out_size`."""
        b, _, height, width = shape
        return estimate_bytes(height=height, width=width, out_size=tuple(out_size), batch=b,
                              mode=mode or self.mode, crop_size=self.crop, stride=self.stride,
                              scales=self.scales, **self.sizes)

    def __call__(self, shape: Sequence[int], out_size: Sequence[int], *, what: str) -> None:
        """Raise UserError naming `what` (e.g. the image file) if the pass cannot fit.

        Args:
            shape: (B, 3, H, W) network input.
            out_size: (H_out, W_out) of the scores.
            what: the input, for the message.
        """
        available = available_bytes(self.device)
        need = self.estimate(shape, out_size)
        if available is None or need <= available:
            return
        remedies = []
        if self.mode == "whole" and self.estimate(shape, out_size, mode="slide") <= available:
            remedies.append(f"--eval.mode=slide (windows of eval.crop_size {list(self.crop)})")
        scale = self._fitting_scale(shape, out_size, available)
        if scale is not None:
            remedies.append(f"--data.val.scale={list(scale)} (a smaller network input; the "
                            "scores still come back at full resolution)")
        fix = " or ".join(remedies) if remedies else \
            "a machine with more memory (even a small input's scores at this output size do not fit)"
        raise UserError(
            f"{what}: {self.mode} inference of a {'x'.join(str(int(s)) for s in shape)} input "
            f"needs about {need / GIB:.1f} GiB (estimate), more than the "
            f"{available / GIB:.1f} GiB available on {self.device}; use {fix} "
            f"({MEMORY_ENV} sets the memory to assume)")

    def _fitting_scale(self, shape: Sequence[int], out_size: Sequence[int],
                       available: float) -> Optional[Tuple[int, int]]:
        """(long, short) `data.val.scale` bounds whose input fits, from a bisection of the
        resize factor; None if none above 1/64 does."""
        b, c, height, width = shape
        lo, hi = 1.0 / 64, 1.0
        if self.estimate((b, c, max(1, int(height * lo)), max(1, int(width * lo))),
                         out_size) > available:
            return None
        for _ in range(30):
            mid = (lo + hi) / 2
            fits = self.estimate((b, c, max(1, int(height * mid)), max(1, int(width * mid))),
                                 out_size) <= available
            lo, hi = (mid, hi) if fits else (lo, mid)
        long_side, short_side = max(height, width), min(height, width)
        return max(1, math.floor(long_side * lo)), max(1, math.floor(short_side * lo))


def check_val_data(val_data, cfg: Config, memory_check: MemoryCheck) -> None:
    """Fail at start-up, not at the first evaluation thousands of iterations in: read every
    validation image and label once (real data sets; synthetic scenes are generated and cannot be
    corrupt), and estimate the evaluation's memory for each image size (`eval.mode`, scales; the
    memory free now, before training takes its share, so only what can never fit is refused)."""
    if cfg.data.val.kind == "synthetic":
        sizes = {(tuple(val_data[0]["img"].shape), tuple(val_data[0]["label"].shape[-2:]), "val[0]")}
    else:
        sizes = set()
        loader = torch.utils.data.DataLoader(val_data, batch_size=None, num_workers=cfg.eval.workers)
        for i, sample in enumerate(loader):
            sizes.add((tuple(sample["img"].shape), tuple(sample["label"].shape[-2:]),
                       str(sample.get("path", f"val[{i}]"))))
    seen = set()
    for img_shape, out_size, what in sorted(sizes):
        if (img_shape, out_size) not in seen:
            seen.add((img_shape, out_size))
            memory_check((cfg.eval.batch_size,) + img_shape, out_size, what=what)

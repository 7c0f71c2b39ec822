"""HRDA multi-resolution training and inference around a `Segmentor`, with CLUDA's feature-weight head.

Hoyer et al., "HRDA: Context-Aware High-Resolution Domain-Adaptive Semantic Segmentation", ECCV 2022,
Sec. 3.2-3.4, and the multi-resolution variant of CLUDA (Vayyat et al., Eq. 7).

Training view of a (B, 3, H, W) crop (1024 x 1024 in the paper):

- context (LR): the crop resized by `lr_scale` = 0.5 through the segmentor; its logits and fused
  features lie on the *LR grid*, stride 4 / 0.5 = 8 of the HR frame: (H/8, W/8);
- detail (HR): a `hr_crop_size` (512) window of the crop, at full resolution, through the same
  segmentor; its outputs lie on the *HR-crop grid*, stride 4 inside the box: (hc/4, wc/4). The box
  (y1, y2, x1, x2) is in HR-frame pixels with corners divisible by `crop_divisible` = 8, so it
  maps exactly to the LR grid (box / 8) and to the stride-4 *HR-frame grid* (box / 4);
- scale attention a = sigmoid(A(LR encoder features)), one channel per class, from a DAFormer head
  whose fusion is one 1x1 conv (`fusion="conv"`); upsampled to the HR-frame grid and set to 0
  outside the box; fused logits on the HR-frame grid (H/4, W/4):
  `fused = a * hr_placed + (1 - a) * up(lr)`, i.e. `up(lr)` outside the box (HRDA Eq. 4-5);
  HRDA multiplies (1 - a) on the LR grid before upsampling; doing it after upsampling makes the
  crop border exact and differs only by interpolation;
- feature weight delta = sigmoid(W(LR encoder features)) in (0, 1), one channel, on the LR grid:
  CLUDA's per-pixel weight of LR (delta) against HR (1 - delta) pixels inside the box (Eq. 7).

Losses (the trainer's job): CE on `logits` against the label resized to the HR-frame grid with
weight 1 - `hr_loss_weight` = 0.9, CE on `hr_logits` against `crop(label, box)` with weight 0.1.

Contrastive features on a common grid: the LR fused features cover the whole crop on the LR grid
(stride 8); the HR fused features cover only the box on the HR-crop grid (stride 4). CLUDA puts
both sets of pixels into one InfoNCE call (HR pixels `exclusive`): LR pixel (i, j) is inside the
box iff it lies in `out.lr_box` (= box / 8), where its weight is `delta`; HR pixels get 1 - delta
resampled from the box onto the HR grid. `cluda.losses.multires_contrastive_loss` builds that
layout from `lr_fused`, `hr_fused`, `lr_box` and `delta`.

Inference (pseudo-labels, testing): LR whole image + HR sliding windows (`hr_slide_size` 512,
stride 256 at full resolution), fused with the unmasked attention on the stride-4 grid; any image
size works. `mode="slide"` adds an outer sliding window (HRDA tests Cityscapes with 1024 windows).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .decoder import DAFormerHead
from .segmentor import Segmentor, Size, _pair, param_groups, resize_bilinear, sliding_window

# (y1, y2, x1, x2), end-exclusive: every box of the project (HRDA's detail crop in pixels, its
# image on a feature grid, `cluda.losses` on the LR grid).
Box = Tuple[int, int, int, int]


def crop(x: torch.Tensor, box: Box) -> torch.Tensor:
    """x[..., y1:y2, x1:x2] for a (y1, y2, x1, x2) box (images, labels, feature maps)."""
    y1, y2, x1, x2 = box
    return x[..., y1:y2, x1:x2]


def box_to_grid(box: Box, stride: int) -> Box:
    """A box in pixels on a grid of the given stride; each corner must be divisible by it."""
    if any(c % stride for c in box):
        raise ValueError(f"box {box} is not aligned to a grid of stride {stride}")
    return tuple(c // stride for c in box)  # type: ignore[return-value]


def random_crop_box(
    height: int,
    width: int,
    crop_size: Size,
    *,
    divisible: int = 8,
    generator: Optional[torch.Generator] = None,
) -> Box:
    """A uniformly random crop box whose top-left corner is divisible by `divisible`.

    HRDA's rule (`get_crop_bbox`): offsets are multiples of `divisible` in [0, size - crop]; here
    every such multiple is possible (HRDA's draw cannot reach the largest one when the margin is an
    exact multiple).

    Args:
        height: image height.
        width: image width.
        crop_size: crop (h, w), at most the image size.
        divisible: corner alignment (8 keeps the box on HRDA's LR feature grid).
        generator: torch generator for reproducible draws; None: the global one.
    """
    crop_h, crop_w = _pair(crop_size, "crop_size")
    if crop_h > height or crop_w > width:
        raise ValueError(f"crop {crop_h}x{crop_w} does not fit the image {height}x{width}")
    y1 = int(torch.randint((height - crop_h) // divisible + 1, (1,), generator=generator)) * divisible
    x1 = int(torch.randint((width - crop_w) // divisible + 1, (1,), generator=generator)) * divisible
    return (y1, y1 + crop_h, x1, x1 + crop_w)


@dataclass
class HRDAOutput:
    """Everything a multi-resolution training step needs. Shapes for a (B, 3, H, W) crop, K classes,
    C fused channels, box (y1, y2, x1, x2) of size hc x wc, output stride 4, LR scale 0.5.

    Attributes:
        logits: fused logits on the HR-frame grid, (B, K, H/4, W/4).
        lr_logits: LR logits on the LR grid, (B, K, H/8, W/8).
        hr_logits: HR logits of the detail crop, (B, K, hc/4, wc/4).
        lr_fused: LR fused decoder features, (B, C, H/8, W/8).
        hr_fused: HR fused decoder features of the detail crop, (B, C, hc/4, wc/4).
        attention: scale attention on the HR-frame grid, 0 outside the box, (B, K, H/4, W/4).
        delta: CLUDA feature weight in (0, 1) on the LR grid, (B, 1, H/8, W/8); None without
            the feature-weight head.
        box: detail crop in HR-frame pixels.
        lr_features: the encoder's feature list for the LR view (feature-distance loss).
        output_stride: segmentor output stride (4).
        lr_scale: LR downscale factor (0.5).
    """

    logits: torch.Tensor
    lr_logits: torch.Tensor
    hr_logits: torch.Tensor
    lr_fused: torch.Tensor
    hr_fused: torch.Tensor
    attention: torch.Tensor
    delta: Optional[torch.Tensor]
    box: Box
    lr_features: List[torch.Tensor]
    output_stride: int
    lr_scale: float

    @property
    def lr_stride(self) -> int:
        """Stride of the LR grid in HR-frame pixels (8)."""
        return int(round(self.output_stride / self.lr_scale))

    def box_on_grid(self, stride: int) -> Box:
        """The detail box on a grid of the given stride (HR-frame pixels / stride)."""
        return box_to_grid(self.box, stride)

    @property
    def lr_box(self) -> Box:
        """The detail box on the LR grid (`lr_logits`, `lr_fused`, `delta`): box / 8."""
        return self.box_on_grid(self.lr_stride)

    @property
    def hr_grid_box(self) -> Box:
        """The detail box on the HR-frame grid (`logits`, `attention`): box / 4."""
        return self.box_on_grid(self.output_stride)


class HRDA(nn.Module):
    """Multi-resolution wrapper: shared segmentor, scale-attention head, CLUDA feature-weight head.

    Args:
        segmentor: the encoder + decoder run on both views.
        hr_crop_size: detail crop (h, w) in HR pixels (paper: 512), divisible by `crop_divisible`.
        lr_scale: context downscale factor (paper: 0.5).
        crop_divisible: alignment of the detail box (paper: 8); a multiple of the LR grid stride
            (output stride / lr_scale).
        hr_slide_size: HR window at inference (paper: 512).
        hr_slide_stride: HR window stride at inference (paper: 256).
        head_channels: embedding and fused channels of the attention / weight heads (HRDA: 256).
        feature_weight_head: build CLUDA's feature-weight head (delta).
        hr_loss_weight: weight of the HR detail loss; the fused loss gets 1 - it (paper: 0.1).
    """

    def __init__(
        self,
        segmentor: Segmentor,
        *,
        hr_crop_size: Size = 512,
        lr_scale: float = 0.5,
        crop_divisible: int = 8,
        hr_slide_size: Size = 512,
        hr_slide_stride: Size = 256,
        head_channels: int = 256,
        feature_weight_head: bool = True,
        hr_loss_weight: float = 0.1,
    ) -> None:
        super().__init__()
        if not 0.0 < lr_scale < 1.0:
            raise ValueError(f"lr_scale must be in (0, 1), got {lr_scale}")
        if not 0.0 <= hr_loss_weight <= 1.0:
            raise ValueError(f"hr_loss_weight must be in [0, 1], got {hr_loss_weight}")
        self.segmentor = segmentor
        self.output_stride = segmentor.output_stride
        lr_stride = self.output_stride / lr_scale
        if lr_stride != int(lr_stride) or crop_divisible % int(lr_stride):
            raise ValueError(
                f"crop_divisible {crop_divisible} must be a multiple of the LR grid stride "
                f"output_stride / lr_scale = {lr_stride}"
            )
        self.lr_scale = float(lr_scale)
        self.lr_stride = int(lr_stride)
        self.crop_divisible = int(crop_divisible)
        self.hr_crop_size = _pair(hr_crop_size, "hr_crop_size")
        if any(s % self.crop_divisible for s in self.hr_crop_size):
            raise ValueError(f"hr_crop_size {self.hr_crop_size} must be divisible by crop_divisible {crop_divisible}")
        self.hr_slide_size = _pair(hr_slide_size, "hr_slide_size")
        self.hr_slide_stride = _pair(hr_slide_stride, "hr_slide_stride")
        self.hr_loss_weight = float(hr_loss_weight)

        channels = segmentor.encoder.channels
        head_kwargs = dict(in_channels=channels, channels=head_channels, embed_dim=head_channels, fusion="conv")
        self.attention_head = DAFormerHead(out_channels=segmentor.num_classes, **head_kwargs)
        self.feature_weight_head = DAFormerHead(out_channels=1, **head_kwargs) if feature_weight_head else None

    @property
    def num_classes(self) -> int:
        return self.segmentor.num_classes

    def forward(
        self,
        img: torch.Tensor,
        *,
        box: Optional[Box] = None,
        generator: Optional[torch.Generator] = None,
    ) -> HRDAOutput:
        """Training forward on a (B, 3, H, W) crop, H and W divisible by the LR grid stride (8).

        Args:
            img: the training crop (HR frame).
            box: detail box (y1, y2, x1, x2) in HR pixels; None draws one with `random_crop_box`.
            generator: generator for that draw.
        """
        if img.dim() != 4:
            raise ValueError(f"expected (B, 3, H, W) images, got shape {tuple(img.shape)}")
        h, w = img.shape[-2:]
        if h % self.lr_stride or w % self.lr_stride:
            raise ValueError(f"HRDA training crops must be divisible by {self.lr_stride} (32 recommended), got {h}x{w}")
        if box is None:
            box = random_crop_box(h, w, self.hr_crop_size, divisible=self.crop_divisible, generator=generator)
        box = self._check_box(tuple(int(c) for c in box), h, w)
        grid = (h // self.output_stride, w // self.output_stride)  # HR-frame grid, stride 4
        lr_grid = (h // self.lr_stride, w // self.lr_stride)  # LR grid, stride 8
        hr_box = box_to_grid(box, self.output_stride)

        lr_img = resize_bilinear(img, (int(h * self.lr_scale), int(w * self.lr_scale)))
        lr_logits, lr_fused, lr_feats = self.segmentor.forward_with_features(lr_img)
        hr_logits, hr_fused = self.segmentor(crop(img, box))
        expected_hr = (hr_box[1] - hr_box[0], hr_box[3] - hr_box[2])
        if tuple(lr_logits.shape[-2:]) != lr_grid or tuple(hr_logits.shape[-2:]) != expected_hr:
            raise ValueError(
                f"segmentor output grids {tuple(lr_logits.shape[-2:])} (LR) / {tuple(hr_logits.shape[-2:])} (HR) "
                f"are not input / {self.output_stride}: expected {lr_grid} / {expected_hr}"
            )

        attention = resize_bilinear(torch.sigmoid(self.attention_head(lr_feats)[0]), grid)  # (B, K, H/4, W/4)
        inside = torch.zeros((1, 1) + grid, dtype=attention.dtype, device=attention.device)
        crop(inside, hr_box).fill_(1)
        attention = attention * inside  # the HR view only exists inside the box
        lr_up = resize_bilinear(lr_logits, grid)
        hr_placed = torch.zeros_like(lr_up)
        crop(hr_placed, hr_box).copy_(hr_logits)
        fused = attention * hr_placed + (1 - attention) * lr_up

        delta = None
        if self.feature_weight_head is not None:
            delta = torch.sigmoid(self.feature_weight_head(lr_feats)[0])  # (B, 1, H/8, W/8)
        return HRDAOutput(
            logits=fused,
            lr_logits=lr_logits,
            hr_logits=hr_logits,
            lr_fused=lr_fused,
            hr_fused=hr_fused,
            attention=attention,
            delta=delta,
            box=box,
            lr_features=lr_feats,
            output_stride=self.output_stride,
            lr_scale=self.lr_scale,
        )

    def _check_box(self, box: Box, h: int, w: int) -> Box:
        y1, y2, x1, x2 = box
        if not (0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w):
            raise ValueError(f"box {box} is not inside the {h}x{w} image")
        if any(c % self.crop_divisible for c in box):
            raise ValueError(f"box {box} corners must be divisible by crop_divisible {self.crop_divisible}")
        return box

    def predict_whole(self, img: torch.Tensor, *, window_batch: Optional[int] = None) -> torch.Tensor:
        """Fused logits for whole images on the stride-4 grid, (B, K, ceil(H/4), ceil(W/4)).

        LR: the image resized by `lr_scale`, one pass. HR: sliding windows of `hr_slide_size` every
        `hr_slide_stride` at full resolution, averaged. Fused with the (unmasked) scale attention.
        """
        h, w = img.shape[-2:]
        grid = (math.ceil(h / self.output_stride), math.ceil(w / self.output_stride))
        lr_img = resize_bilinear(img, (max(1, int(h * self.lr_scale)), max(1, int(w * self.lr_scale))))
        lr_logits, _, lr_feats = self.segmentor.forward_with_features(lr_img)
        attention = resize_bilinear(torch.sigmoid(self.attention_head(lr_feats)[0]), grid)
        hr_logits = sliding_window(
            img,
            lambda crops: resize_bilinear(self.segmentor(crops)[0], crops.shape[-2:]),
            crop_size=self.hr_slide_size,
            stride=self.hr_slide_stride,
            out_channels=self.num_classes,
            window_batch=window_batch,
        )
        hr_logits = resize_bilinear(hr_logits, grid).to(lr_logits.dtype)
        return attention * hr_logits + (1 - attention) * resize_bilinear(lr_logits, grid)

    @torch.no_grad()
    def inference(
        self,
        img: torch.Tensor,
        *,
        mode: str = "whole",
        crop_size: Optional[Size] = None,
        stride: Optional[Size] = None,
        out_size: Optional[Size] = None,
        window_batch: Optional[int] = None,
    ) -> torch.Tensor:
        """Multi-resolution logits for whole images, no gradient. The caller sets eval mode.

        Args:
            img: (B, 3, H, W), any size.
            mode: "whole" (`predict_whole` on the image) or "slide" (`predict_whole` on outer
                windows of `crop_size` every `stride`, averaged).
            crop_size: outer window, "slide" only (HRDA's Cityscapes test: 1024).
            stride: outer stride, "slide" only (HRDA: 512).
            out_size: size of the returned logits; None: (H, W).
            window_batch: HR windows per forward pass; None: all at once.

        Returns:
            (B, K, *out_size) logits.
        """
        size = (img.shape[-2], img.shape[-1]) if out_size is None else _pair(out_size, "out_size")
        if mode == "whole":
            # via the image size, like the windows of "slide"
            logits = self.predict_whole(img, window_batch=window_batch)
            return resize_bilinear(resize_bilinear(logits, img.shape[-2:]), size)
        if mode == "slide":
            if crop_size is None or stride is None:
                raise ValueError("mode='slide' needs crop_size and stride")
            logits = sliding_window(
                img,
                lambda crops: resize_bilinear(self.predict_whole(crops, window_batch=window_batch), crops.shape[-2:]),
                crop_size=crop_size,
                stride=stride,
                out_channels=self.num_classes,
                window_batch=1,
            )
            return resize_bilinear(logits, size)
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")

    def param_groups(
        self, lr: float, *, head_lr_mult: float = 10.0, weight_decay: float = 0.01, bias_decay: bool = True
    ) -> List[Dict]:
        """AdamW groups: the encoder at `lr`; decoder, attention and feature-weight heads at lr x 10."""
        return param_groups(
            self,
            encoder=self.segmentor.encoder,
            lr=lr,
            head_lr_mult=head_lr_mult,
            weight_decay=weight_decay,
            bias_decay=bias_decay,
        )

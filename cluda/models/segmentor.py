"""Encoder + DAFormer decoder, whole-image / sliding-window inference, AdamW parameter groups.

The network of DAFormer (Hoyer et al., CVPR 2022) as used by CLUDA (Vayyat et al.): `forward`
returns the logits at 1/4 resolution and the decoder's fused feature map, on which CLUDA's
pixel-wise contrastive loss (Eq. 2-5) is computed. Inference follows mmsegmentation's
`whole` / `slide` test modes: sliding windows are batched, their logits resized to the window,
summed and divided by the per-pixel window count.

Optimiser groups follow DAFormer's AdamW setting: encoder lr, heads lr x 10
(`head: lr_mult 10`), no weight decay on normalisation layers and position blocks
(`norm: decay_mult 0`, `pos_block: decay_mult 0`).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import Pretrained, build_backbone
from .decoder import DAFormerHead

Size = Union[int, Tuple[int, int]]

# Layers whose weight and bias get no weight decay (normalisation keeps its scale / shift free).
NORM_LAYERS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.InstanceNorm2d,
)
# Parameter-name parts with no weight decay: DAFormer's `pos_block` and timm's position tables.
NO_DECAY_NAME_PARTS = ("pos_block", "pos_embed", "absolute_pos_embed", "relative_position_bias_table")


def _pair(size: Size, what: str) -> Tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or any(not isinstance(s, int) or s <= 0 for s in pair):
        raise ValueError(f"{what} must be a positive int or a pair of them, got {size!r}")
    return pair  # type: ignore[return-value]


def resize_bilinear(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of a (B, C, h, w) map; a no-op at the same size."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def window_starts(size: int, crop: int, stride: int) -> List[int]:
    """Start offsets of sliding windows of length `crop` every `stride` covering [0, size).

    The last window is moved back to end at `size` (mmsegmentation's rule), so every window lies
    inside the image. `crop` larger than `size` gives one window at 0 (the caller clips the crop).
    """
    crop = min(crop, size)
    count = max(size - crop + stride - 1, 0) // stride + 1
    return [min(i * stride, size - crop) for i in range(count)]


def sliding_window(
    img: torch.Tensor,
    predict: Callable[[torch.Tensor], torch.Tensor],
    *,
    crop_size: Size,
    stride: Size,
    out_channels: int,
    window_batch: Optional[int] = None,
) -> torch.Tensor:
    """Average of `predict` over sliding windows, at the image's resolution.

    Args:
        img: (B, 3, H, W).
        predict: maps a (n, 3, h, w) batch of windows to (n, out_channels, h, w) outputs.
        crop_size: window size (h, w); clipped to the image.
        stride: window stride (h, w).
        out_channels: channels `predict` returns.
        window_batch: windows (per image) passed to `predict` at once; None: all of them.

    Returns:
        (B, out_channels, H, W) float32: per pixel, the mean over the windows covering it.
    """
    if img.dim() != 4:
        raise ValueError(f"expected (B, C, H, W) images, got shape {tuple(img.shape)}")
    crop_h, crop_w = _pair(crop_size, "crop_size")
    stride_h, stride_w = _pair(stride, "stride")
    b, _, h, w = img.shape
    crop_h, crop_w = min(crop_h, h), min(crop_w, w)
    boxes = [
        (y, y + crop_h, x, x + crop_w)
        for y in window_starts(h, crop_h, stride_h)
        for x in window_starts(w, crop_w, stride_w)
    ]
    per_call = len(boxes) if window_batch is None else int(window_batch)
    if per_call <= 0:
        raise ValueError(f"window_batch must be positive, got {window_batch}")
    total = img.new_zeros((b, out_channels, h, w), dtype=torch.float32)
    count = img.new_zeros((1, 1, h, w), dtype=torch.float32)
    for first in range(0, len(boxes), per_call):
        chunk = boxes[first:first + per_call]
        crops = torch.cat([img[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk], dim=0)  # (n * B, 3, h, w)
        out = predict(crops)
        if out.shape != (len(chunk) * b, out_channels, crop_h, crop_w):
            raise ValueError(
                f"predict returned {tuple(out.shape)} for {len(chunk) * b} windows of {crop_h}x{crop_w}; "
                f"expected ({len(chunk) * b}, {out_channels}, {crop_h}, {crop_w})"
            )
        for i, (y1, y2, x1, x2) in enumerate(chunk):
            total[:, :, y1:y2, x1:x2] += out[i * b:(i + 1) * b].float()
            count[:, :, y1:y2, x1:x2] += 1
    return total / count


class Segmentor(nn.Module):
    """Encoder + decoder: `forward(img) -> (logits at 1/4, fused features)`.

    Args:
        encoder: maps (B, 3, H, W) to a list of NCHW maps, with `channels` and `reductions`.
        decoder: a `DAFormerHead` sized for `encoder.channels`.
    """

    def __init__(self, encoder: nn.Module, decoder: DAFormerHead) -> None:
        super().__init__()
        channels = list(getattr(encoder, "channels", []))
        if channels != list(decoder.in_channels):
            raise ValueError(f"decoder expects levels with {decoder.in_channels} channels, encoder gives {channels}")
        self.encoder = encoder
        self.decoder = decoder

    @property
    def num_classes(self) -> int:
        return self.decoder.out_channels

    @property
    def output_stride(self) -> int:
        """Stride of the logits / fused features relative to the input (4 for MiT)."""
        return int(self.encoder.reductions[0])

    def forward(self, img: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> logits (B, K, h, w) and fused features (B, C, h, w), h ~ H / 4."""
        logits, fused, _ = self.forward_with_features(img)
        return logits, fused

    def forward_with_features(self, img: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        """As `forward`, plus the encoder's feature list (for the feature-distance loss)."""
        feats = self.encoder(img)
        logits, fused = self.decoder(feats)
        return logits, fused, feats

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
        """Logits for whole images, no gradient. The caller sets eval mode.

        Args:
            img: (B, 3, H, W).
            mode: "whole" (one forward pass) or "slide" (windows of `crop_size` every `stride`,
                logits resized to the window and averaged where windows overlap).
            crop_size: window size, "slide" only.
            stride: window stride, "slide" only.
            out_size: size of the returned logits; None: (H, W). Logits are first brought to
                (H, W) in both modes, then resized to `out_size`.
            window_batch: windows per forward pass in "slide" mode; None: all at once.

        Returns:
            (B, K, *out_size) logits (float32 in "slide" mode).
        """
        size = (img.shape[-2], img.shape[-1]) if out_size is None else _pair(out_size, "out_size")
        if mode == "whole":
            # via the image size, like the windows of "slide" (mmsegmentation's order)
            return resize_bilinear(resize_bilinear(self(img)[0], img.shape[-2:]), size)
        if mode == "slide":
            if crop_size is None or stride is None:
                raise ValueError("mode='slide' needs crop_size and stride")
            logits = sliding_window(
                img,
                lambda crops: resize_bilinear(self(crops)[0], crops.shape[-2:]),
                crop_size=crop_size,
                stride=stride,
                out_channels=self.num_classes,
                window_batch=window_batch,
            )
            return resize_bilinear(logits, size)
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")

    def param_groups(
        self, lr: float, *, head_lr_mult: float = 10.0, weight_decay: float = 0.01, bias_decay: bool = True
    ) -> List[Dict]:
        """AdamW parameter groups: encoder at `lr`, everything else (heads) at `lr * head_lr_mult`.

        See `param_groups` (the function) for the rules.
        """
        return param_groups(
            self, encoder=self.encoder, lr=lr, head_lr_mult=head_lr_mult, weight_decay=weight_decay, bias_decay=bias_decay
        )


def param_groups(
    model: nn.Module,
    *,
    encoder: nn.Module,
    lr: float,
    head_lr_mult: float = 10.0,
    weight_decay: float = 0.01,
    bias_decay: bool = True,
) -> List[Dict]:
    """Split the trainable parameters of `model` into AdamW groups.

    - parameters of `encoder`: lr `lr`; all other parameters (decoder, HRDA heads): `lr * head_lr_mult`;
    - weight and bias of normalisation layers (BatchNorm, LayerNorm, GroupNorm) and parameters whose
      name contains a position-table part (`pos_block`, `pos_embed`, `relative_position_bias_table`):
      weight decay 0; with `bias_decay=False` all biases too (DAFormer decays biases);
    - parameters that do not require grad (a frozen copy) are left out; every other parameter is
      in exactly one group. Empty groups are dropped.

    Each group holds `params`, `lr`, `weight_decay`, `lr_mult` (lr / base lr, for schedulers that
    rescale every group) and `name`.

    Args:
        model: the network.
        encoder: the submodule trained at the base lr.
        lr: base (encoder) learning rate.
        head_lr_mult: lr multiplier of the non-encoder parameters.
        weight_decay: weight decay of the decayed groups.
        bias_decay: whether biases (outside norm layers) are decayed.
    """
    if lr <= 0 or head_lr_mult <= 0 or weight_decay < 0:
        raise ValueError(f"need lr > 0, head_lr_mult > 0, weight_decay >= 0; got {lr}, {head_lr_mult}, {weight_decay}")
    encoder_ids = {id(p) for p in encoder.parameters()}
    norm_ids = {
        id(p) for module in model.modules() if isinstance(module, NORM_LAYERS) for p in module.parameters(recurse=False)
    }
    buckets: Dict[Tuple[str, bool], List[nn.Parameter]] = {}
    for name, p in model.named_parameters():  # shared parameters are yielded once
        if not p.requires_grad:
            continue
        part = "encoder" if id(p) in encoder_ids else "head"
        no_decay = (
            id(p) in norm_ids
            or any(s in name for s in NO_DECAY_NAME_PARTS)
            or (not bias_decay and name.endswith("bias"))
        )
        buckets.setdefault((part, no_decay), []).append(p)
    groups = []
    for part in ("encoder", "head"):
        mult = 1.0 if part == "encoder" else float(head_lr_mult)
        for no_decay in (False, True):
            params = buckets.get((part, no_decay))
            if params:
                groups.append(
                    dict(
                        params=params,
                        lr=lr * mult,
                        weight_decay=0.0 if no_decay else weight_decay,
                        lr_mult=mult,
                        name=f"{part}_no_decay" if no_decay else part,
                    )
                )
    return groups


def build_segmentor(
    backbone: str = "mit_b5",
    *,
    num_classes: int = 19,
    channels: int = 512,
    pretrained: Pretrained = None,
    drop_path_rate: Optional[float] = None,
    embed_dim: int = 256,
    aspp_channels: int = 256,
    dropout: float = 0.1,
    img_size: Optional[Size] = None,
    out_indices: Optional[Sequence[int]] = None,
) -> Segmentor:
    """Backbone by name + DAFormer decoder sized from its channels.

    Args:
        backbone: `mit_b0` ... `mit_b5` or a timm model name (see `build_backbone`).
        num_classes: classifier outputs.
        channels: fused embedding channels C (CLUDA 512, DAFormer 256).
        pretrained: encoder weights: None, True (timm download) or a local file.
        drop_path_rate: encoder stochastic depth; None: the model's default (MiT 0.1).
        embed_dim: decoder per-level embedding channels.
        aspp_channels: channels per ASPP branch.
        dropout: dropout before the classifier.
        img_size: build size for fixed-size timm models (Swin): the training crop.
        out_indices: timm feature levels; None: the last four.
    """
    encoder = build_backbone(
        backbone, pretrained=pretrained, drop_path_rate=drop_path_rate, out_indices=out_indices, img_size=img_size
    )
    decoder = DAFormerHead(
        in_channels=encoder.channels,
        out_channels=num_classes,
        channels=channels,
        embed_dim=embed_dim,
        aspp_channels=aspp_channels,
        dropout=dropout,
    )
    return Segmentor(encoder, decoder)

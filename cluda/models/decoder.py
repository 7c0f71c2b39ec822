"""The DAFormer decoder (context-aware feature fusion) that also returns its fused features.

Hoyer et al., "DAFormer: Improving Network Architectures and Training Strategies for Domain-Adaptive
Semantic Segmentation", CVPR 2022, Sec. 3.2 / Fig. 3:

1. each encoder level is embedded to `embed_dim` channels by a 1x1 linear layer (no norm, no
   activation) and bilinearly resized to the first (1/4) level;
2. the levels are concatenated (4 x 256 = 1024 channels) and fused by a depthwise-separable ASPP
   with dilations (1, 6, 12, 18), the dilation-1 branch being a 1x1 conv; each branch gives
   `aspp_channels` channels and ends in BN + ReLU;
3. a 3x3 bottleneck conv + BN + ReLU maps the concatenated branches to the fused embedding of
   `channels` channels. CLUDA (Vayyat et al.) uses C = 512 and applies its contrastive loss to
   this map; DAFormer uses 256;
4. dropout 0.1 and a 1x1 classifier.

`forward` returns `(logits, fused)`, `fused` being step 3's output before dropout. With
`fusion="conv"` step 2-3 become one 1x1 conv + BN + ReLU: the head of HRDA's scale attention
(Hoyer et al., HRDA, ECCV 2022, Sec. 3.3) and of CLUDA's feature-weight map.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(
    in_channels: int, out_channels: int, *, kernel_size: int = 1, dilation: int = 1, groups: int = 1
) -> nn.Sequential:
    """Conv (no bias: BN follows) + BatchNorm + ReLU, padded to keep the spatial size.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel size.
        dilation: conv dilation.
        groups: conv groups (`in_channels` for a depthwise conv).
    """
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SeparableASPP(nn.Module):
    """Depthwise-separable ASPP (DeepLabV3+ style) followed by a 3x3 bottleneck.

    Branch with dilation 1: 1x1 conv + BN + ReLU. Other branches: 3x3 depthwise dilated conv + BN +
    ReLU, then 1x1 pointwise conv + BN + ReLU. Branch outputs are concatenated and reduced by a
    3x3 conv + BN + ReLU.

    Args:
        in_channels: input channels.
        branch_channels: output channels of each branch.
        out_channels: output channels of the bottleneck.
        dilations: one branch per dilation.
    """

    def __init__(
        self, *, in_channels: int, branch_channels: int, out_channels: int, dilations: Sequence[int]
    ) -> None:
        super().__init__()
        branches = []
        for d in dilations:
            if d == 1:
                branches.append(conv_bn_relu(in_channels, branch_channels, kernel_size=1))
            else:
                branches.append(
                    nn.Sequential(
                        conv_bn_relu(in_channels, in_channels, kernel_size=3, dilation=d, groups=in_channels),
                        conv_bn_relu(in_channels, branch_channels, kernel_size=1),
                    )
                )
        self.branches = nn.ModuleList(branches)
        self.bottleneck = conv_bn_relu(len(branches) * branch_channels, out_channels, kernel_size=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([branch(x) for branch in self.branches], dim=1))


class DAFormerHead(nn.Module):
    """DAFormer decoder: multi-level features -> (logits, fused features), both at the first level's size.

    Sized from `in_channels` (the encoder's `channels`); the output grid is the first level's
    (1/4 of the image for MiT and most timm backbones).

    Args:
        in_channels: channels of each encoder level, finest first.
        out_channels: classifier outputs (number of classes; 1 for a weight / attention map).
        channels: channels C of the fused embedding (CLUDA 512, DAFormer 256).
        embed_dim: channels each level is embedded to.
        aspp_channels: channels of each ASPP branch.
        dilations: ASPP dilations (1 means a 1x1 branch).
        fusion: "aspp" (the DAFormer decoder) or "conv" (one 1x1 conv + BN + ReLU; HRDA's
            scale-attention head).
        dropout: dropout before the classifier.
    """

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        out_channels: int,
        channels: int = 512,
        embed_dim: int = 256,
        aspp_channels: int = 256,
        dilations: Sequence[int] = (1, 6, 12, 18),
        fusion: str = "aspp",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if len(in_channels) == 0 or any(int(c) <= 0 for c in in_channels):
            raise ValueError(f"in_channels must list positive channel counts, got {list(in_channels)}")
        for name, value in (("out_channels", out_channels), ("channels", channels), ("embed_dim", embed_dim)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if fusion not in ("aspp", "conv"):
            raise ValueError(f"fusion must be 'aspp' or 'conv', got {fusion!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_channels = [int(c) for c in in_channels]
        self.out_channels = out_channels
        self.channels = channels
        # A 1x1 conv is the per-pixel linear layer of DAFormer's "mlp" embedding; applied before
        # resizing, which is equivalent (bilinear weights sum to 1) and cheaper.
        self.embed = nn.ModuleList(nn.Conv2d(c, embed_dim, kernel_size=1) for c in self.in_channels)
        fused_in = embed_dim * len(self.in_channels)
        if fusion == "aspp":
            self.fuse: nn.Module = SeparableASPP(
                in_channels=fused_in, branch_channels=aspp_channels, out_channels=channels, dilations=dilations
            )
        else:
            self.fuse = conv_bn_relu(fused_in, channels, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, out_channels, kernel_size=1)

    def forward(self, features: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Args: features: one (B, C_k, h_k, w_k) map per level, finest first.

        Returns:
            logits (B, out_channels, h_0, w_0) and fused features (B, channels, h_0, w_0), the
            latter before dropout.
        """
        if len(features) != len(self.embed):
            raise ValueError(f"expected {len(self.embed)} feature levels, got {len(features)}")
        for k, (f, c) in enumerate(zip(features, self.in_channels)):
            if f.dim() != 4 or f.shape[1] != c:
                raise ValueError(f"feature level {k}: expected (B, {c}, h, w), got {tuple(f.shape)}")
        size = features[0].shape[-2:]
        embedded: List[torch.Tensor] = []
        for f, embed in zip(features, self.embed):
            e = embed(f)  # (B, embed_dim, h_k, w_k)
            if e.shape[-2:] != size:
                e = F.interpolate(e, size=size, mode="bilinear", align_corners=False)
            embedded.append(e)
        fused = self.fuse(torch.cat(embedded, dim=1))  # (B, C, h_0, w_0)
        return self.classifier(self.dropout(fused)), fused

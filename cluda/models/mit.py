"""Mix Transformer (MiT-B0 ... B5), the hierarchical encoder of SegFormer.

Xie et al., "SegFormer: Simple and Efficient Design for Semantic Segmentation with Transformers",
NeurIPS 2021, Sec. 3.1. It is the backbone of DAFormer, HRDA and CLUDA. Four stages; stage k:

- overlapping patch merging: a strided conv (7x7 stride 4 for stage 1, 3x3 stride 2 after), then
  LayerNorm, so stage k works at 1/4, 1/8, 1/16, 1/32 of the input;
- `depth_k` transformer blocks, each `x + DropPath(Attn(LN(x)))`, `x + DropPath(MixFFN(LN(x)))`:
  efficient self-attention (Eq. 2: keys and values from a map shrunk by a strided conv of ratio
  R = 8, 4, 2, 1) and Mix-FFN (Eq. 3: fc1, 3x3 depthwise conv, GELU, fc2) whose depthwise conv
  replaces positional encodings;
- a final LayerNorm, reshaped to NCHW.

Parameter names follow SegFormer's released ImageNet checkpoints (`mit_b5.pth`:
`patch_embed1.proj.weight`, `block1.0.attn.q.weight`, `block1.0.mlp.dwconv.dwconv.weight`,
`norm1.weight`, ...) so those files load with `load_mit_weights`; their classifier `head.*` is
ignored. Stochastic depth rises linearly from 0 to `drop_path_rate` over all blocks.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from .weights import PathLike, check_state_dict, read_state_dict

# Per-variant architecture (SegFormer Table 6). All variants: mlp ratio 4, sr ratios (8, 4, 2, 1).
MIT_CONFIGS: Dict[str, Dict[str, Tuple[int, ...]]] = {
    "mit_b0": dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "mit_b1": dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2)),
    "mit_b2": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3)),
    "mit_b3": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 18, 3)),
    "mit_b4": dict(embed_dims=(64, 128, 320, 512), depths=(3, 8, 27, 3)),
    "mit_b5": dict(embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3)),
}
MIT_NUM_HEADS = (1, 2, 5, 8)
MIT_SR_RATIOS = (8, 4, 2, 1)

# Keys of the ImageNet classifier in SegFormer's checkpoints: expected there, never used here.
_CLASSIFIER_PREFIX = "head."


class OverlapPatchEmbed(nn.Module):
    """Strided conv with padding k // 2 (patches overlap), flattened to tokens, LayerNorm.

    Args:
        in_chans: input channels.
        embed_dim: output channels.
        patch_size: conv kernel size (7 for stage 1, 3 after).
        stride: conv stride (4 for stage 1, 2 after).
    """

    def __init__(self, *, in_chans: int, embed_dim: int, patch_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)  # default eps, as SegFormer

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        x = self.proj(x)  # (B, C, H', W'), H' = ceil(H / stride) for these kernel / padding pairs
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w  # (B, H'W', C)


class EfficientSelfAttention(nn.Module):
    """Multi-head self-attention whose keys / values come from a map reduced R x R (SegFormer Eq. 2).

    Args:
        dim: token channels.
        num_heads: attention heads (dim must be divisible by it).
        sr_ratio: spatial-reduction ratio R; 1 means plain attention (no `sr` / `norm` layers).
    """

    def __init__(self, *, dim: int, num_heads: int, sr_ratio: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)  # default eps, as SegFormer

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        d = c // self.num_heads
        q = self.q(x).reshape(b, n, self.num_heads, d).transpose(1, 2)  # (B, heads, N, d)
        if self.sr_ratio > 1:
            # keys / values from the map shrunk R x R: N / R^2 tokens
            reduced = self.sr(x.transpose(1, 2).reshape(b, c, h, w))
            x = self.norm(reduced.flatten(2).transpose(1, 2))  # (B, N / R^2, C)
        kv = self.kv(x).reshape(b, -1, 2, self.num_heads, d).permute(2, 0, 3, 1, 4)  # (2, B, heads, M, d)
        # scale 1 / sqrt(d), the SDPA default
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])  # (B, heads, N, d)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DepthwiseConv(nn.Module):
    """3x3 depthwise conv on tokens laid back out on their (h, w) grid (Mix-FFN's position cue).

    The extra nesting level reproduces the checkpoint key `mlp.dwconv.dwconv.weight`.

    Args:
        dim: channels.
    """

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(b, c, h, w))
        return x.flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """fc1 -> 3x3 depthwise conv -> GELU -> fc2 (SegFormer Eq. 3).

    Args:
        dim: input / output channels.
        hidden_dim: hidden channels (mlp ratio 4 x dim).
    """

    def __init__(self, *, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = DepthwiseConv(dim=hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class MiTBlock(nn.Module):
    """Pre-norm transformer block with efficient attention and Mix-FFN.

    Args:
        dim: token channels.
        num_heads: attention heads.
        sr_ratio: spatial-reduction ratio of the attention.
        mlp_ratio: Mix-FFN hidden channels / dim.
        drop_path: stochastic depth probability of this block.
    """

    def __init__(self, *, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EfficientSelfAttention(dim=dim, num_heads=num_heads, sr_ratio=sr_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MixFFN(dim=dim, hidden_dim=int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class MixVisionTransformer(nn.Module):
    """The MiT encoder: (B, 3, H, W) -> four NCHW maps at strides 4, 8, 16, 32.

    Stage k's modules are `patch_embed{k}`, `block{k}` and `norm{k}` (k = 1..4), as in SegFormer.
    Output k has `channels[k]` channels and spatial size ceil(H / 4), then ceil of half the previous
    size per stage, so odd sizes work; H and W must be at least 29 for the 8x8 key reduction of
    stage 1 to fit.

    Args:
        embed_dims: channels of the four stages.
        depths: blocks per stage.
        num_heads: attention heads per stage.
        sr_ratios: spatial-reduction ratio per stage.
        mlp_ratio: Mix-FFN expansion.
        drop_path_rate: stochastic depth of the last block; rises linearly from 0 over all blocks.
        in_chans: input image channels.
    """

    def __init__(
        self,
        *,
        embed_dims: Sequence[int],
        depths: Sequence[int],
        num_heads: Sequence[int] = MIT_NUM_HEADS,
        sr_ratios: Sequence[int] = MIT_SR_RATIOS,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if not (len(embed_dims) == len(depths) == len(num_heads) == len(sr_ratios) == 4):
            raise ValueError(
                f"MiT has four stages: got embed_dims {embed_dims}, depths {depths}, num_heads {num_heads}, "
                f"sr_ratios {sr_ratios}"
            )
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.channels: List[int] = [int(c) for c in embed_dims]
        self.reductions: List[int] = [4, 8, 16, 32]
        self.depths = tuple(int(d) for d in depths)
        self.sr_ratios = tuple(int(r) for r in sr_ratios)

        # linear in the block index, like torch.linspace(0, rate, n) (in Python so a meta-device build works)
        total = sum(self.depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        first = 0
        prev = in_chans
        for k, (dim, depth, heads, sr) in enumerate(zip(self.channels, self.depths, num_heads, self.sr_ratios), 1):
            patch, stride = (7, 4) if k == 1 else (3, 2)
            self.add_module(
                f"patch_embed{k}",
                OverlapPatchEmbed(in_chans=prev, embed_dim=dim, patch_size=patch, stride=stride),
            )
            blocks = [
                MiTBlock(dim=dim, num_heads=heads, sr_ratio=sr, mlp_ratio=mlp_ratio, drop_path=rates[first + i])
                for i in range(depth)
            ]
            self.add_module(f"block{k}", nn.ModuleList(blocks))
            self.add_module(f"norm{k}", nn.LayerNorm(dim, eps=1e-6))
            first += depth
            prev = dim
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f"MiT expects (B, C, H, W) images, got shape {tuple(x.shape)}")
        in_h, in_w = x.shape[-2:]
        outs = []
        for k in range(1, 5):
            tokens, h, w = getattr(self, f"patch_embed{k}")(x)  # (B, h*w, C_k)
            sr = self.sr_ratios[k - 1]
            if h < sr or w < sr:
                raise ValueError(
                    f"image {in_h}x{in_w} is too small for MiT: stage {k} works on a {h}x{w} grid, smaller "
                    f"than its key reduction {sr}x{sr}"
                )
            for block in getattr(self, f"block{k}"):
                tokens = block(tokens, h, w)
            tokens = getattr(self, f"norm{k}")(tokens)
            x = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)  # (B, C_k, h, w)
            outs.append(x)
        return outs


def _init_weights(module: nn.Module) -> None:
    # SegFormer's init: truncated normal for linear layers, He (fan-out) normal for convs.
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, std=math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def mit(name: str, *, drop_path_rate: float = 0.1, in_chans: int = 3) -> MixVisionTransformer:
    """Build MiT-B0 ... B5 by name (`"mit_b0"` ... `"mit_b5"`), randomly initialised.

    Args:
        name: variant.
        drop_path_rate: stochastic depth of the last block (DAFormer: 0.1).
        in_chans: input channels.
    """
    if name not in MIT_CONFIGS:
        raise ValueError(f"unknown MiT variant {name!r}; choose one of {sorted(MIT_CONFIGS)}")
    cfg = MIT_CONFIGS[name]
    return MixVisionTransformer(
        embed_dims=cfg["embed_dims"], depths=cfg["depths"], drop_path_rate=drop_path_rate, in_chans=in_chans
    )


def load_mit_weights(model: MixVisionTransformer, path: PathLike) -> Dict[str, List[str]]:
    """Load SegFormer-layout weights (e.g. the official `mit_b5.pth`) into `model`, strictly.

    The file may be a raw state dict or one wrapped in `state_dict` / `model`, with keys prefixed
    by `module.` or `backbone.`. The ImageNet classifier `head.*` is dropped.

    Args:
        model: the encoder to fill.
        path: local checkpoint file.

    Returns:
        `{"ignored": [...]}`: the checkpoint keys that were deliberately not loaded (the classifier).

    Raises:
        FileNotFoundError: no file at `path`.
        CheckpointError (a ValueError): keys missing from the checkpoint, keys the model does not
            have, or shape mismatches; the message names the keys and the file.
    """
    state = read_state_dict(path)
    ignored = sorted(k for k in state if k.startswith(_CLASSIFIER_PREFIX))
    state = {k: v for k, v in state.items() if not k.startswith(_CLASSIFIER_PREFIX)}
    check_state_dict(model.state_dict(), state, what=(
        f"checkpoint {str(path)!r} does not fit this MiT (channels {model.channels}, depths "
        f"{list(model.depths)})"))
    model.load_state_dict(state, strict=True)
    return {"ignored": ignored}


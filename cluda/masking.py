"""Random block masking of images for MIC (Hoyer et al., "MIC: Masked Image Consistency for
Context-Enhanced Domain Adaptation", CVPR 2023, Sec. 3.2).

The image is cut into `block_size` x `block_size` squares aligned to its top-left corner, and each
square is withheld independently with probability `ratio`: with v ~ U(0, 1) per square,

    M[m b : (m + 1) b, n b : (n + 1) b] = [v_mn >= ratio]        x^M = M * x

(the paper's [v > r]; ">=" makes the keep probability exactly 1 - ratio for torch's U[0, 1)). The
last row and column of squares are cut to the image where its side is not a multiple of
`block_size`. Masking multiplies the *normalised* image, as the released code does, so a withheld
pixel takes the data set's mean colour (0 after normalisation), not black.

The draws come from an explicit CPU `torch.Generator` (the step generator of `cluda.uda`), so a
resumed run repeats the same masks.
"""
import math
from typing import Optional

import torch

__all__ = ["block_mask", "mask_images"]


def block_mask(batch: int, height: int, width: int, *, block_size: int = 64, ratio: float = 0.7,
               generator: Optional[torch.Generator] = None,
               device: Optional[torch.device] = None) -> torch.Tensor:
    """A random block mask per image: 1 where the image is kept, 0 where it is withheld.

    Args:
        batch: number of masks B.
        height: image height H in pixels.
        width: image width W in pixels.
        block_size: side b of the square blocks (MIC: 64 px at full resolution, 32 px for
            DAFormer's half-resolution crops).
        ratio: probability r that a block is withheld, in [0, 1] (MIC: 0.7).
        generator: CPU generator of the block draws (None: torch's global one).
        device: where the mask is returned (the draws are made on the CPU either way, so a mask
            does not depend on the device).

    Returns:
        (B, 1, H, W) float32 mask with values in {0, 1}, constant on every block.
    """
    assert min(batch, height, width) >= 1, f"batch, height and width must be >= 1, got {batch}, {height}, {width}"
    assert int(block_size) == block_size >= 1, f"block_size must be a positive integer, got {block_size}"
    assert 0.0 <= ratio <= 1.0, f"ratio must lie in [0, 1], got {ratio}"
    b = int(block_size)
    grid = (batch, 1, math.ceil(height / b), math.ceil(width / b))
    keep = (torch.rand(grid, generator=generator) >= ratio).float()  # (B, 1, ceil(H/b), ceil(W/b))
    mask = keep.repeat_interleave(b, dim=2).repeat_interleave(b, dim=3)[:, :, :height, :width]
    return mask.to(device) if device is not None else mask


def mask_images(images: torch.Tensor, *, block_size: int = 64, ratio: float = 0.7,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """`images` with random blocks set to 0 (see `block_mask`), each image masked independently.

    Args:
        images: (B, C, H, W) normalised images.
        block_size: block side in pixels.
        ratio: probability that a block is withheld.
        generator: CPU generator of the draws.

    Returns:
        (B, C, H, W) masked images (a new tensor; `images` is not modified).
    """
    assert images.dim() == 4 and images.is_floating_point(), \
        f"images must be floating-point (B, C, H, W), got {images.dtype} {tuple(images.shape)}"
    b, _, h, w = images.shape
    mask = block_mask(b, h, w, block_size=block_size, ratio=ratio, generator=generator,
                      device=images.device)
    return images * mask.to(images.dtype)

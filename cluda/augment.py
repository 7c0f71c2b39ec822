"""Cross-domain mixing and strong augmentation of DACS / DAFormer self-training, on batched tensors.

- ClassMix (Olsson et al., WACV 2021) as used by DACS (Tranheden et al., WACV 2021) and DAFormer
  (Hoyer et al., CVPR 2022, Sec. 3.1): per source image, half of the classes present in its label
  are pasted onto a target image; the mixed label is the source label where pasted and the
  teacher's pseudo-label elsewhere, the mixed pixel weight is 1 where pasted and the pseudo-label
  weight elsewhere. CLUDA (Vayyat et al., Eq. 4-5) computes its mixed contrastive term on the
  same mixed image, labels and weights.
- Strong augmentation of the mixed image (DACS' `strong_transform`): colour jitter of strength
  0.2 (brightness, contrast, saturation, hue, in random order) with probability 0.8 and a gaussian
  blur (sigma ~ U(0.15, 1.15), kernel about 10% of the image side, odd) with probability 0.5,
  both on the denormalised [0, 1] image, renormalised afterwards. The colour and blur operations
  are torchvision's functional ones; what DACS adds around them is here: the denormalisation, the
  kernel-size rule and the draws.

Every random choice is drawn from an explicit CPU `torch.Generator`, so a resumed run that restores
the generator's state reproduces the same masks and augmentations.
"""
import math
from typing import NamedTuple, Optional, Sequence

import torch
import torchvision.transforms.v2.functional as TF

from cluda.data.labels import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _as_label_map(labels: torch.Tensor, name: str) -> torch.Tensor:
    """(B, H, W) or (B, 1, H, W) integer -> (B, H, W)."""
    if labels.dim() == 4 and labels.shape[1] == 1:
        labels = labels[:, 0]
    assert labels.dim() == 3, f"{name} must be (B, H, W) or (B, 1, H, W), got shape {tuple(labels.shape)}"
    return labels


def class_mix_masks(labels: torch.Tensor, *, generator: Optional[torch.Generator] = None,
                    ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """ClassMix masks: per image, ceil(n / 2) = round((n + n % 2) / 2) of the n classes present in
    its label (the ignore index excluded), chosen at random; the mask is 1 on their pixels.

    Args:
        labels: (B, H, W) or (B, 1, H, W) integer source labels.
        generator: CPU generator the class choices are drawn from (None: torch's global one).
        ignore_index: label value that is never a class.

    Returns:
        (B, 1, H, W) float32 mask on the labels' device, 1 where the source is pasted.
    """
    labels = _as_label_map(labels, "labels")
    assert not labels.is_floating_point(), f"labels must be an integer tensor, got {labels.dtype}"
    masks = torch.zeros(labels.shape[0], 1, *labels.shape[1:], dtype=torch.float32, device=labels.device)
    for b in range(labels.shape[0]):
        classes = torch.unique(labels[b])
        classes = classes[classes != ignore_index]
        n = classes.numel()
        if n == 0:
            continue  # nothing to paste from an all-ignored label
        chosen = torch.randperm(n, generator=generator)[: (n + n % 2) // 2]
        masks[b, 0] = torch.isin(labels[b], classes[chosen.to(classes.device)]).float()
    return masks


class MixedBatch(NamedTuple):
    """image (B, 3, H, W), labels (B, H, W) int64, weights (B, H, W) float32."""
    image: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor


def mix(mask: torch.Tensor, *, source_image: torch.Tensor, target_image: torch.Tensor,
        source_labels: torch.Tensor, pseudo_labels: torch.Tensor,
        pseudo_weights: torch.Tensor) -> MixedBatch:
    """Pastes the masked source pixels onto the target (DACS; CLUDA Eq. 4-5).

    image = mask * source + (1 - mask) * target; labels = source label where pasted, pseudo-label
    elsewhere; weights = 1 where pasted, the pseudo-label weight elsewhere.

    Args:
        mask: (B, 1, H, W) or (B, H, W) with values in {0, 1} (from `class_mix_masks`).
        source_image: (B, 3, H, W) normalised source images.
        target_image: (B, 3, H, W) normalised target images.
        source_labels: (B, H, W) or (B, 1, H, W) integer source labels.
        pseudo_labels: (B, H, W) integer teacher pseudo-labels of the target images.
        pseudo_weights: (B, H, W) per-pixel pseudo-label weights (Gamma with zeroed margins).

    Returns:
        MixedBatch(image, labels, weights).
    """
    assert source_image.shape == target_image.shape and source_image.dim() == 4, \
        (source_image.shape, target_image.shape)
    size = (source_image.shape[0], *source_image.shape[2:])
    source_labels = _as_label_map(source_labels, "source_labels")
    pseudo_labels = _as_label_map(pseudo_labels, "pseudo_labels")
    mask = mask[:, 0] if mask.dim() == 4 else mask
    for name, t in (("mask", mask), ("source_labels", source_labels),
                    ("pseudo_labels", pseudo_labels), ("pseudo_weights", pseudo_weights)):
        assert tuple(t.shape) == size, f"{name} has shape {tuple(t.shape)}, expected {size} to match the images"
    pasted = mask > 0.5  # (B, H, W)
    m = mask.unsqueeze(1).to(source_image.dtype)  # (B, 1, H, W)
    image = m * source_image + (1 - m) * target_image
    labels = torch.where(pasted, source_labels.long(), pseudo_labels.long())
    weights = torch.where(pasted, torch.ones_like(pseudo_weights, dtype=torch.float32),
                          pseudo_weights.float())
    return MixedBatch(image, labels, weights)


def blur_kernel_size(side: int) -> int:
    """DACS' blur kernel: about 10% of the image side, rounded to an odd size
    (ceil(0.1 * side), minus one if even).

    DACS / DAFormer size the kernel from the image, not from sigma; torchvision's
    GaussianBlur takes the size as given, so the rule lives here."""
    k = math.ceil(0.1 * side)
    return k if k % 2 == 1 else k - 1


def _colour_jitter(img: torch.Tensor, *, factors: Sequence[float], order: Sequence[int]) -> torch.Tensor:
    """torchvision's brightness, contrast, saturation and hue adjustments of one [0, 1] (3, H, W)
    image, in the given order.

    torchvision's `ColorJitter` draws its factors and order from torch's global RNG; the factors
    and the order come from the caller here, drawn from the step's generator, so a resumed run
    repeats them.

    Args:
        img: (3, H, W) image in [0, 1].
        factors: (brightness, contrast, saturation, hue): the first three multiplicative
            (1 = unchanged), the hue shift in turns (in [-0.5, 0.5]).
        order: a permutation of (0, 1, 2, 3) indexing `factors`.
    """
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in order:
        img = ops[i](img, factors[i])
    return img


def strong_augment(images: torch.Tensor, *, generator: Optional[torch.Generator] = None,
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                   jitter_strength: float = 0.2, jitter_p: float = 0.8, blur_p: float = 0.5,
                   blur_sigma: Sequence[float] = (0.15, 1.15)) -> torch.Tensor:
    """DACS / DAFormer strong augmentation of normalised images, each image drawn independently.

    Per image: with probability `jitter_p`, colour jitter with brightness, contrast and saturation
    factors ~ U(1 - s, 1 + s) and a hue shift ~ U(-s, s), applied in a random order; then with
    probability `blur_p`, a gaussian blur with sigma ~ U(blur_sigma) and a kernel of about 10% of
    the image size (see `blur_kernel_size`). Both act on the denormalised image
    (x * std + mean, in [0, 1]) and the result is renormalised.

    Args:
        images: (B, 3, H, W) float images normalised with `mean` / `std`.
        generator: CPU generator all random draws come from (None: torch's global one).
        mean: per-channel mean the images were normalised with (on the [0, 1] scale).
        std: per-channel std the images were normalised with.
        jitter_strength: s, the colour jitter strength (0.2 in DAFormer).
        jitter_p: probability of applying colour jitter to an image.
        blur_p: probability of blurring an image.
        blur_sigma: (low, high) range of the blur's sigma.

    Returns:
        (B, 3, H, W) augmented images, normalised; `images` is not modified.
    """
    assert images.dim() == 4 and images.shape[1] == 3 and images.is_floating_point(), \
        f"images must be floating-point (B, 3, H, W), got {images.dtype} {tuple(images.shape)}"
    # The config's range check (cluda.config.validate) is the user-facing one.
    assert 0 <= jitter_strength <= 0.5, f"jitter_strength must lie in [0, 0.5], got {jitter_strength}"
    lo, hi = blur_sigma
    assert 0 < lo <= hi, f"blur_sigma must be (low, high) with 0 < low <= high, got {tuple(blur_sigma)}"
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(3, 1, 1)
    kernel = (blur_kernel_size(images.shape[2]), blur_kernel_size(images.shape[3]))
    s = jitter_strength
    out = []
    for img in images:
        # Draw every number for this image up front, so the generator advances by the same amount
        # whichever branches are taken: u = (jitter?, brightness, contrast, saturation, hue, blur?, sigma).
        # One draw per image, not per batch: each mixed image is augmented independently.
        u = torch.rand(7, generator=generator, dtype=torch.float64).tolist()
        order = torch.randperm(4, generator=generator).tolist()
        # torchvision's colour ops assume [0, 1] images: jitter and blur the denormalised image.
        x = img * std_t + mean_t  # (3, H, W)
        if u[0] < jitter_p:
            factors = (1 - s + 2 * s * u[1], 1 - s + 2 * s * u[2], 1 - s + 2 * s * u[3], -s + 2 * s * u[4])
            # torchvision's colour ops expect [0, 1] input (the hue's HSV round trip, the mean gray
            # of contrast); denormalising can leave values a rounding error outside it.
            x = _colour_jitter(x.clamp(0, 1), factors=factors, order=order)
        if u[5] < blur_p and max(kernel) > 1:
            sigma = lo + (hi - lo) * u[6]
            # torchvision takes the kernel as [width, height].
            x = TF.gaussian_blur(x, kernel_size=[kernel[1], kernel[0]], sigma=[sigma, sigma])
        out.append((x - mean_t) / std_t)
    return torch.stack(out)

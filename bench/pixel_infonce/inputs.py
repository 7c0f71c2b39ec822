"""Inputs of one benchmark cell, made to look like Cityscapes at the decoder's resolution: 19
classes drawn with Cityscapes' pixel frequencies, 10 % ignored pixels, the stuff / thing groups of
CLUDA Sec. 5.5, and ReLU features around class means (cosine similarity about 0.68 inside a class,
0.32 across), so the similarities look like a trained model's rather than isotropic noise."""
from dataclasses import dataclass

import torch

from cluda.data.labels import IGNORE_INDEX, NUM_CLASSES, THING_CLASSES

# Share of all pixels of Cityscapes' gtFine training set per train id, in percent (the public
# per-class pixel statistics of the data set; the 19 classes hold about 88.5 %, the rest is void).
# Road, building, vegetation, car, sidewalk and sky dominate; motorcycle is the rarest.
CITYSCAPES_CLASS_PERCENT = (
    32.7, 5.3, 20.1, 0.59, 0.77, 1.12, 0.18, 0.50, 14.3, 0.98, 3.5, 1.1, 0.13, 6.0, 0.24, 0.23,
    0.19, 0.085, 0.40,
)
IGNORE_FRACTION = 0.10
FEATURE_NOISE = 0.8  # std of the noise around a class mean of unit-variance entries
TEMPERATURE = 0.1  # affects only the values of exp(), not the work
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

INPUTS_NOTE = (
    "Inputs: labels drawn with Cityscapes' per-class pixel frequencies (road 37 %, building 23 %, "
    "vegetation 16 %, car 7 %, sidewalk 6 %, sky 4 % of the labelled pixels, ...), 10 % ignored, "
    "groups = stuff / thing, features relu(class mean + 0.8 noise) (cosine ~0.68 within a class, "
    f"~0.32 across), temperature {TEMPERATURE}, random positive upstream gradient."
)


@dataclass
class Inputs:
    """One benchmark cell's inputs.

    Attributes:
        feats: (N, C) leaf features in the cell's dtype, requires_grad.
        labels: (N,) int64 train ids, IGNORE_INDEX for ignored pixels.
        groups: (N,) int64, 1 for thing classes, 0 otherwise.
        upstream: (N,) float32 gradient of the per-anchor loss (weights like Gamma / A).
        pair_fraction: r, eligible ordered pairs / N^2.
    """

    feats: torch.Tensor
    labels: torch.Tensor
    groups: torch.Tensor
    upstream: torch.Tensor
    pair_fraction: float


def class_probabilities() -> torch.Tensor:
    """(19,) float64 probability of each train id among the labelled pixels."""
    p = torch.tensor(CITYSCAPES_CLASS_PERCENT, dtype=torch.float64)
    return p / p.sum()


def stuff_thing_groups(labels: torch.Tensor) -> torch.Tensor:
    """(N,) int64 group id: 1 for THING_CLASSES, 0 for stuff (and for ignored pixels)."""
    table = torch.zeros(max(IGNORE_INDEX, NUM_CLASSES) + 1, dtype=torch.long, device=labels.device)
    table[list(THING_CLASSES)] = 1
    return table[labels.clamp(0, IGNORE_INDEX)]


def pair_fraction(labels: torch.Tensor, groups: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> float:
    """r = #{(i, j): i != j, both valid, same group} / N^2 for (N,) labels and groups (ids >= 0)."""
    n = labels.numel()
    if n == 0:
        return 0.0
    valid = (labels >= 0) & (labels != ignore_index)
    counts = torch.bincount(groups[valid]).double()
    return float((counts * (counts - 1)).sum()) / float(n) ** 2


def make_inputs(n: int, c: int, dtype: torch.dtype, device: torch.device, *, seed: int = 0) -> Inputs:
    """Cityscapes-like inputs (see INPUTS_NOTE), drawn on `device` from a seeded generator.

    Args:
        n: number of pixels N (ignored ones included).
        c: channels C.
        dtype: dtype of the features.
        device: where to build them.
        seed: generator seed (the same seed gives the same inputs on the same device).
    """
    if n < 1 or c < 1:
        raise ValueError(f"need n >= 1 and c >= 1, got n={n}, c={c}")
    gen = torch.Generator(device=device).manual_seed(seed)
    probs = class_probabilities().to(device=device, dtype=torch.float32)
    labels = torch.multinomial(probs, n, replacement=True, generator=gen)  # (N,)
    ignored = torch.rand(n, generator=gen, device=device) < IGNORE_FRACTION
    # One mean per class plus one for the void pixels, which still have features.
    means = torch.randn(NUM_CLASSES + 1, c, generator=gen, device=device)  # (20, C)
    cls = torch.where(ignored, torch.full_like(labels, NUM_CLASSES), labels)
    noise = torch.randn(n, c, generator=gen, device=device)
    feats = torch.relu(noise.mul_(FEATURE_NOISE).add_(means[cls]))  # (N, C), like post-ReLU features
    del noise
    labels = labels.masked_fill(ignored, IGNORE_INDEX)
    groups = stuff_thing_groups(labels)
    upstream = torch.rand(n, generator=gen, device=device)
    return Inputs(feats=feats.to(dtype).requires_grad_(), labels=labels, groups=groups,
                  upstream=upstream, pair_fraction=pair_fraction(labels, groups))

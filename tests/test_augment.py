"""Tests of cluda.augment: ClassMix masks and mixing, colour jitter / blur against torchvision's
functional ops, and the reproducibility of the strong augmentation under a generator."""
import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from cluda.augment import (IMAGENET_MEAN, IMAGENET_STD, adjust_brightness, adjust_contrast, adjust_hue,
                           adjust_saturation, blur_kernel_size, class_mix_masks, gaussian_blur, mix,
                           strong_augment)
from cluda.data.labels import IGNORE_INDEX

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _normalised_images(b, h, w, gen):
    return (torch.rand(b, 3, h, w, generator=gen) - MEAN) / STD


def test_class_mix_picks_half_of_the_present_classes():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 19, (3, 12, 13), generator=gen)
    labels[0] = labels[0] % 5  # 5 classes -> 3 pasted
    labels[1] = labels[1] % 4  # 4 classes -> 2 pasted
    labels[2, :4] = IGNORE_INDEX
    masks = class_mix_masks(labels, generator=torch.Generator().manual_seed(1))
    assert masks.shape == (3, 1, 12, 13) and masks.dtype == torch.float32
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    for b in range(3):
        present = set(labels[b].unique().tolist()) - {IGNORE_INDEX}
        pasted = set(labels[b][masks[b, 0] == 1].unique().tolist())
        kept = set(labels[b][masks[b, 0] == 0].unique().tolist())
        n = len(present)
        assert len(pasted) == round((n + n % 2) / 2)
        assert IGNORE_INDEX not in pasted
        # Whole classes are pasted: no class is both pasted and kept.
        assert pasted.isdisjoint(kept - {IGNORE_INDEX})
        assert pasted | (kept - {IGNORE_INDEX}) == present


def test_class_mix_is_reproducible_and_random():
    gen = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 10, (2, 8, 8), generator=gen)
    a = class_mix_masks(labels, generator=torch.Generator().manual_seed(3))
    b = class_mix_masks(labels, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    draws = {tuple(class_mix_masks(labels, generator=torch.Generator().manual_seed(s)).flatten().tolist())
             for s in range(6)}
    assert len(draws) > 1
    # An all-ignored label pastes nothing; (B, 1, H, W) labels are accepted.
    empty = class_mix_masks(torch.full((1, 1, 4, 4), IGNORE_INDEX))
    assert empty.shape == (1, 1, 4, 4) and empty.sum() == 0


def test_mix_images_labels_and_weights_are_consistent():
    gen = torch.Generator().manual_seed(4)
    src, trg = _normalised_images(2, 6, 7, gen), _normalised_images(2, 6, 7, gen)
    src_lab = torch.randint(0, 6, (2, 6, 7), generator=gen)
    pl = torch.randint(0, 19, (2, 6, 7), generator=gen)
    pw = torch.rand(2, 6, 7, generator=gen)
    mask = class_mix_masks(src_lab, generator=gen)
    out = mix(mask, source_image=src, target_image=trg, source_labels=src_lab, pseudo_labels=pl,
              pseudo_weights=pw)
    pasted = mask[:, 0].bool()
    assert pasted.any() and (~pasted).any()
    m = pasted[:, None].expand_as(src)
    assert torch.equal(out.image[m], src[m]) and torch.equal(out.image[~m], trg[~m])
    assert torch.equal(out.labels[pasted], src_lab[pasted]) and torch.equal(out.labels[~pasted], pl[~pasted])
    assert torch.all(out.weights[pasted] == 1) and torch.equal(out.weights[~pasted], pw[~pasted])
    with pytest.raises(ValueError, match="pseudo_weights"):
        mix(mask, source_image=src, target_image=trg, source_labels=src_lab, pseudo_labels=pl,
            pseudo_weights=pw[:, :5])


def test_colour_ops_match_torchvision():
    gen = torch.Generator().manual_seed(5)
    img = torch.rand(3, 9, 11, generator=gen)
    for factor in (0.8, 1.17):
        torch.testing.assert_close(adjust_brightness(img, factor), TF.adjust_brightness(img, factor))
        # torchvision's luma weights are 0.2989 / 0.587 / 0.114, ours the exact ITU-R 601 0.299.
        torch.testing.assert_close(adjust_contrast(img, factor), TF.adjust_contrast(img, factor),
                                   atol=1e-3, rtol=0)
        torch.testing.assert_close(adjust_saturation(img, factor), TF.adjust_saturation(img, factor),
                                   atol=1e-3, rtol=0)
    for shift in (-0.2, 0.13, 0.5):
        torch.testing.assert_close(adjust_hue(img, shift), TF.adjust_hue(img, shift), atol=1e-5, rtol=0)
    # Gray pixels have no hue: a hue shift leaves them alone.
    gray = torch.rand(1, 4, 4, generator=gen).expand(3, 4, 4)
    torch.testing.assert_close(adjust_hue(gray, 0.3), gray)


def test_blur_matches_torchvision_and_kernel_size_rule():
    gen = torch.Generator().manual_seed(6)
    img = torch.rand(2, 3, 20, 31, generator=gen)
    out = gaussian_blur(img, sigma=0.9, kernel_size=(3, 5))
    torch.testing.assert_close(out, TF.gaussian_blur(img, kernel_size=[5, 3], sigma=[0.9, 0.9]))
    # DACS: floor(ceil(0.1 s) - 0.5 + ceil(0.1 s) % 2).
    for side in (1, 9, 10, 11, 64, 91, 95, 100, 512, 1024):
        c = math.ceil(0.1 * side)
        assert blur_kernel_size(side) == int(math.floor(c - 0.5 + c % 2))
        assert blur_kernel_size(side) % 2 == 1
    assert blur_kernel_size(512) == 51
    with pytest.raises(ValueError, match="odd"):
        gaussian_blur(img, sigma=1.0, kernel_size=(4, 3))


def test_strong_augment_reproducible_changes_image_keeps_range():
    gen = torch.Generator().manual_seed(7)
    images = _normalised_images(3, 24, 30, gen)
    a = strong_augment(images, generator=torch.Generator().manual_seed(8))
    b = strong_augment(images, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    c = strong_augment(images, generator=torch.Generator().manual_seed(9))
    assert not torch.equal(a, c)
    forced = strong_augment(images, generator=torch.Generator().manual_seed(8), jitter_p=1.0, blur_p=1.0)
    assert forced.shape == images.shape
    assert torch.all((forced - images).flatten(1).abs().amax(1) > 1e-3), "every image must change"
    # Still a normalised [0, 1] image.
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
    assert torch.all(forced >= lo - 1e-5) and torch.all(forced <= hi + 1e-5)
    # The input is untouched and probabilities 0 give the identity.
    assert torch.equal(images, (images.clone()))
    same = strong_augment(images, generator=torch.Generator().manual_seed(8), jitter_p=0.0, blur_p=0.0)
    torch.testing.assert_close(same, images, atol=1e-5, rtol=0)


def test_strong_augment_continues_from_a_restored_generator_state():
    # A resumed run restores the generator state and draws exactly what the uninterrupted run drew.
    gen = torch.Generator().manual_seed(10)
    images = _normalised_images(2, 16, 16, torch.Generator().manual_seed(11))
    strong_augment(images, generator=gen)
    state = gen.get_state()
    second = strong_augment(images, generator=gen)
    resumed = torch.Generator()
    resumed.set_state(state)
    assert torch.equal(strong_augment(images, generator=resumed), second)


def test_strong_augment_rejects_bad_input():
    with pytest.raises(ValueError, match="B, 3, H, W"):
        strong_augment(torch.rand(2, 1, 8, 8))
    with pytest.raises(TypeError, match="floating"):
        strong_augment(torch.randint(0, 255, (2, 3, 8, 8)))
    with pytest.raises(ValueError, match="jitter_strength"):
        strong_augment(torch.rand(1, 3, 8, 8), jitter_strength=0.7)

"""Tests of cluda.augment: ClassMix masks and mixing; the strong augmentation against torchvision's
functional ops with DACS' draws, probabilities, sigma range and kernel size; its reproducibility
under a generator."""
import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from cluda.augment import IMAGENET_MEAN, IMAGENET_STD, blur_kernel_size, class_mix_masks, mix, strong_augment
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
    with pytest.raises(AssertionError, match="pseudo_weights"):
        mix(mask, source_image=src, target_image=trg, source_labels=src_lab, pseudo_labels=pl,
            pseudo_weights=pw[:, :5])


def _torchvision_reference(images, generator, *, s=0.2, jitter_p=0.8, blur_p=0.5, sigma=(0.15, 1.15)):
    """The strong augmentation built from torchvision's functional ops, drawing from `generator`
    what strong_augment draws: per image 7 uniforms and an order of the four colour ops."""
    h, w = images.shape[-2:]
    kh = int(math.floor(math.ceil(0.1 * h) - 0.5 + math.ceil(0.1 * h) % 2))  # DACS' formula
    kw = int(math.floor(math.ceil(0.1 * w) - 0.5 + math.ceil(0.1 * w) % 2))
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    out = []
    for img in images:
        u = torch.rand(7, generator=generator, dtype=torch.float64).tolist()
        order = torch.randperm(4, generator=generator).tolist()
        x = img * STD[0] + MEAN[0]
        if u[0] < jitter_p:
            x = x.clamp(0, 1)  # torchvision's colour ops take [0, 1] images
            factors = [1 + s * (2 * u[1] - 1), 1 + s * (2 * u[2] - 1), 1 + s * (2 * u[3] - 1), s * (2 * u[4] - 1)]
            for i in order:
                x = ops[i](x, factors[i])
        if u[5] < blur_p:
            sd = sigma[0] + (sigma[1] - sigma[0]) * u[6]
            x = TF.gaussian_blur(x, kernel_size=[kw, kh], sigma=[sd, sd])
        out.append((x - MEAN[0]) / STD[0])
    return torch.stack(out)


@pytest.mark.parametrize("jitter_p, blur_p", [(1.0, 0.0), (0.0, 1.0), (0.8, 0.5)])
def test_strong_augment_is_torchvision_jitter_and_blur_around_the_denormalisation(jitter_p, blur_p):
    # H != W: the kernel is (3, 7); torchvision takes it as [width, height]. Pixels a little outside
    # [0, 1] (as rounding leaves them) are clamped before the jitter.
    gen = torch.Generator().manual_seed(5)
    images = (torch.rand(6, 3, 40, 64, generator=gen) * 1.2 - 0.1 - MEAN) / STD
    got = strong_augment(images, generator=torch.Generator().manual_seed(6), jitter_p=jitter_p, blur_p=blur_p)
    want = _torchvision_reference(images, torch.Generator().manual_seed(6), jitter_p=jitter_p, blur_p=blur_p)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert not torch.allclose(got, images, atol=1e-3)


def test_jitter_and_blur_are_drawn_per_image_with_their_probabilities():
    images = _normalised_images(160, 21, 21, torch.Generator().manual_seed(12))  # kernel 3 x 3
    for kwargs, p in ((dict(jitter_p=0.8, blur_p=0.0), 0.8), (dict(jitter_p=0.0, blur_p=0.5), 0.5)):
        out = strong_augment(images, generator=torch.Generator().manual_seed(13), **kwargs)
        changed = (out - images).flatten(1).abs().amax(1) > 1e-4
        # binomial(160, p): sd <= 0.04. One draw per batch would give 0 or 1.
        assert abs(changed.float().mean().item() - p) < 0.15, (kwargs, changed.float().mean().item())


def test_blur_sigma_lies_in_its_range_and_varies():
    # A single white pixel on black, blurred only: the centre keeps more of it the smaller sigma is.
    img01 = torch.zeros(40, 3, 31, 31)
    img01[:, :, 15, 15] = 1
    images = (img01 - MEAN) / STD
    out = strong_augment(images, generator=torch.Generator().manual_seed(14), jitter_p=0.0, blur_p=1.0)
    centre = (out * STD + MEAN)[:, 0, 15, 15]
    k = blur_kernel_size(31)
    wide = TF.gaussian_blur(img01[0], kernel_size=[k, k], sigma=[1.15, 1.15])[0, 15, 15]
    narrow = TF.gaussian_blur(img01[0], kernel_size=[k, k], sigma=[0.15, 0.15])[0, 15, 15]
    assert torch.all(centre >= wide - 1e-6) and torch.all(centre <= narrow + 1e-6)
    assert centre.max() - centre.min() > 0.1 * (narrow - wide)
    # a fixed range pins sigma
    fixed = strong_augment(images[:2], generator=torch.Generator().manual_seed(15), jitter_p=0.0, blur_p=1.0,
                           blur_sigma=(0.7, 0.7))
    torch.testing.assert_close(fixed * STD + MEAN, TF.gaussian_blur(img01[:2], kernel_size=[k, k], sigma=[0.7, 0.7]),
                               atol=1e-6, rtol=0)


def test_blur_kernel_size_rule():
    # DACS: floor(ceil(0.1 s) - 0.5 + ceil(0.1 s) % 2).
    for side in (1, 9, 10, 11, 64, 91, 95, 100, 512, 1024):
        c = math.ceil(0.1 * side)
        assert blur_kernel_size(side) == int(math.floor(c - 0.5 + c % 2))
        assert blur_kernel_size(side) % 2 == 1
    assert blur_kernel_size(512) == 51


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
    with pytest.raises(AssertionError, match="B, 3, H, W"):
        strong_augment(torch.rand(2, 1, 8, 8))
    with pytest.raises(AssertionError, match="floating"):
        strong_augment(torch.randint(0, 255, (2, 3, 8, 8)))
    with pytest.raises(AssertionError, match="jitter_strength"):
        strong_augment(torch.rand(1, 3, 8, 8), jitter_strength=0.7)

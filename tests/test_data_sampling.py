"""Transforms (resize, category-max-ratio crop, flip, normalisation), rare class sampling and the
UDA data set."""
import numpy as np
import pytest
import torch

from cluda.data.datasets import SegmentationDataset
from cluda.data.rcs import (RareClassSampler, compute_class_stats, rcs_class_probabilities,
                            summarize_stats)
from cluda.data.transforms import (SegTransform, denormalize, eval_transform, normalize, pad,
                                   random_crop, random_flip, rescale, rescale_size,
                                   train_transform)
from cluda.data.pairs import UDADataset


class ArrayDataset(SegmentationDataset):
    """In-memory images and labels."""

    def __init__(self, images, labels, **kw):
        super().__init__(**kw)
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def load(self, index):
        return self.images[index], self.labels[index]

    def name(self, index):
        return f"im{index}"


def test_rescale_size_matches_mmcv_keep_ratio():
    assert rescale_size(1914, 1052, (1280, 720)) == (1280, 704)  # GTA5 -> DAFormer
    assert rescale_size(2048, 1024, (1024, 512)) == (1024, 512)  # Cityscapes
    assert rescale_size(1280, 760, (1280, 760)) == (1280, 760)  # SYNTHIA
    assert rescale_size(2048, 1024, (2048, 1024)) == (2048, 1024)  # HRDA Cityscapes
    assert rescale_size(1914, 1052, (2560, 1440)) == (2560, 1407)  # HRDA GTA5
    assert rescale_size(300, 600, (100, 50)) == (50, 100)  # portrait: bounds on long / short


def test_resize_image_bilinear_label_nearest():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 80, 3)).astype(np.uint8)
    label = np.repeat(np.repeat(rng.integers(0, 19, (10, 20)), 4, 0), 4, 1).astype(np.uint8)
    r_img, r_label = rescale(img, label, scale=(40, 20))
    assert r_img.shape == (20, 40, 3) and r_label.shape == (20, 40)
    np.testing.assert_array_equal(r_label, label[1::2, 1::2])  # nearest: no new values
    _, kept = rescale(img, label, scale=(40, 20), resize_label=False)
    assert kept.shape == (40, 80)


def _max_share(label):
    counts = np.bincount(label[label != 255].ravel())
    counts = counts[counts > 0]
    return counts.max() / counts.sum(), len(counts)


def test_crop_category_max_ratio_rule():
    rng0 = np.random.default_rng(1)
    label = np.zeros((64, 64), np.uint8)
    label[:, 52:] = 1  # class 0 covers 81 %: most 16 x 16 crops hold class 0 alone
    label[50:, :] = 2
    img = rng0.integers(0, 256, (64, 64, 3)).astype(np.uint8)
    ok_rule = ok_plain = 0
    for seed in range(200):
        _, with_rule = random_crop(img, label, size=(16, 16), rng=np.random.default_rng(seed))
        _, without = random_crop(img, label, size=(16, 16), rng=np.random.default_rng(seed),
                                 cat_max_ratio=1.0)
        share, n = _max_share(with_rule)
        ok_rule += n > 1 and share < 0.75
        share, n = _max_share(without)
        ok_plain += n > 1 and share < 0.75
    assert ok_plain < 100 and ok_rule > 1.5 * ok_plain


def test_crop_draws_once_when_first_crop_is_fine_and_ten_times_at_most():
    rng0 = np.random.default_rng(2)
    img = rng0.integers(0, 256, (30, 30, 3)).astype(np.uint8)
    mixed = rng0.integers(0, 19, (30, 30)).astype(np.uint8)  # every crop is fine
    rng = np.random.default_rng(5)
    random_crop(img, mixed, size=(10, 10), rng=rng)
    ref = np.random.default_rng(5)
    ref.integers(0, 21), ref.integers(0, 21)
    assert rng.integers(1 << 30) == ref.integers(1 << 30)
    single = np.full((30, 30), 4, np.uint8)  # no crop is ever fine: ten draws, last one kept
    rng = np.random.default_rng(6)
    out_img, out_label = random_crop(img, single, size=(10, 12), rng=rng)
    ref = np.random.default_rng(6)
    boxes = [(ref.integers(0, 21), ref.integers(0, 19)) for _ in range(10)]
    assert rng.integers(1 << 30) == ref.integers(1 << 30)
    y0, x0 = boxes[-1]
    np.testing.assert_array_equal(out_img, img[y0:y0 + 10, x0:x0 + 12])
    assert out_label.shape == (10, 12)


def test_crop_rule_ignores_ignored_pixels():
    label = np.full((20, 20), 255, np.uint8)
    label[0, :10], label[0, 10:] = 3, 5  # 2 classes half-half, the rest ignored: always fine
    img = np.zeros((20, 20, 3), np.uint8)
    rng = np.random.default_rng(7)
    random_crop(img, label, size=(20, 20), rng=rng)
    ref = np.random.default_rng(7)
    ref.integers(0, 1), ref.integers(0, 1)
    assert rng.integers(1 << 30) == ref.integers(1 << 30)


def test_flip_normalize_denormalize_pad():
    rng = np.random.default_rng(8)
    img = rng.integers(0, 256, (6, 9, 3)).astype(np.uint8)
    label = rng.integers(0, 19, (6, 9)).astype(np.uint8)
    f_img, f_label = random_flip(img, label, prob=1.0, rng=rng)
    np.testing.assert_array_equal(f_img, img[:, ::-1])
    np.testing.assert_array_equal(f_label, label[:, ::-1])
    same_img, _ = random_flip(img, label, prob=0.0, rng=rng)
    np.testing.assert_array_equal(same_img, img)
    x = normalize(f_img)
    assert x.shape == (3, 6, 9) and x.dtype == torch.float32
    np.testing.assert_array_equal(denormalize(x), f_img)
    np.testing.assert_array_equal(denormalize(x[None])[0], f_img)
    assert abs(float(normalize(np.full((2, 2, 3), [124, 116, 104], np.uint8)).mean())) < 0.01
    p_img, p_label = pad(x.numpy(), label.astype(np.int64), size=(8, 12))
    assert p_img.shape == (3, 8, 12) and (p_img[:, 6:] == 0).all() and (p_img[:, :, 9:] == 0).all()
    assert (p_label[6:] == 255).all() and (p_label[:, 9:] == 255).all()
    with pytest.raises(TypeError):
        denormalize(f_img)


def test_seg_transform_pipelines():
    rng = np.random.default_rng(9)
    img = rng.integers(0, 256, (50, 100, 3)).astype(np.uint8)
    label = rng.integers(0, 19, (50, 100)).astype(np.uint8)
    t = train_transform(scale=(60, 30), crop_size=(40, 40))
    a_img, a_label = t(img, label, np.random.default_rng(1))
    b_img, b_label = t(img, label, np.random.default_rng(1))
    assert a_img.shape == (3, 40, 40) and a_label.dtype == torch.int64
    assert torch.equal(a_img, b_img) and torch.equal(a_label, b_label)
    big = train_transform(scale=None, crop_size=(64, 128))  # larger than the image: padded
    p_img, p_label = big(img, label, np.random.default_rng(2))
    assert p_img.shape == (3, 64, 128) and (p_label[50:] == 255).all()
    e_img, e_label = eval_transform(scale=(50, 25))(img, label, np.random.default_rng(3))
    assert e_img.shape == (3, 25, 50) and e_label.shape == (50, 100)
    with pytest.raises(ValueError):
        SegTransform(cat_max_ratio=0.0)
    with pytest.raises(ValueError):
        SegTransform(crop_size=(10, 10), resize_label=False)


def test_rcs_probabilities_match_daformer_formula():
    pixels = np.zeros(19, np.int64)
    pixels[[0, 2, 13, 16]] = [600, 300, 95, 5]
    classes, probs = rcs_class_probabilities(pixels, temperature=0.1)
    assert classes.tolist() == [0, 2, 13, 16]  # classes that never occur get nothing
    f = np.array([0.6, 0.3, 0.095, 0.005])
    want = np.exp((1 - f) / 0.1) / np.exp((1 - f) / 0.1).sum()
    np.testing.assert_allclose(probs, want, rtol=1e-12)
    _, sharp = rcs_class_probabilities(pixels, temperature=0.01)
    assert sharp[-1] > probs[-1] and sharp[0] < probs[0]  # lower T favours rare classes more
    with pytest.raises(ValueError):
        rcs_class_probabilities(pixels, temperature=0.0)
    with pytest.raises(ValueError):
        rcs_class_probabilities(np.zeros(19), temperature=0.01)


def _stats(counts_by_name):
    return summarize_stats({n: np.asarray(c) for n, c in counts_by_name.items()}, dataset="test")


def test_rare_class_sampler_eligibility_frequencies_reproducibility():
    c = lambda **kw: [kw.get(f"c{i}", 0) for i in range(19)]  # noqa: E731
    stats = _stats({"a": c(c0=90000, c13=5000), "b": c(c0=80000, c13=2000, c18=4000),
                    "d": c(c0=70000, c18=3001), "e": c(c0=60000, c5=100)})
    with pytest.warns(UserWarning, match=r"\['pole'\]"):
        rcs = RareClassSampler(stats, names=["a", "b", "d", "e"], temperature=0.05,
                               min_pixels=3000)
    assert rcs.classes.tolist() == [0, 13, 18]  # pole: no image holds more than 3000 px
    assert rcs.samples_with_class[13].tolist() == [0]  # "b" holds 2000 px of car only
    assert rcs.samples_with_class[18].tolist() == [1, 2]
    total = np.array(stats["class_pixels"], float)
    f = total / total.sum()
    want = np.exp((1 - f[[0, 13, 18]]) / 0.05)
    np.testing.assert_allclose(rcs.probs, want / want.sum())
    draws = [rcs.sample(np.random.default_rng([4, i])) for i in range(4000)]
    freq = np.array([np.mean([d[0] == k for d in draws]) for k in (0, 13, 18)])
    np.testing.assert_allclose(freq, rcs.probs, atol=0.03)
    assert all(i in rcs.samples_with_class[k].tolist() for k, i in draws)
    again = [rcs.sample(np.random.default_rng([4, i])) for i in range(50)]
    assert again == draws[:50]
    assert rcs.min_crop_pixels == 1500


def test_rare_class_sampler_name_mismatch():
    stats = _stats({"x": [5000] + [0] * 18})
    with pytest.raises(ValueError, match="none of the data set's samples"):
        RareClassSampler(stats, names=["y"])
    with pytest.warns(UserWarning, match="1 of 2 samples have no class statistics"):
        RareClassSampler(stats, names=["x", "y"])


def _block_dataset(n=4, **kw):
    rng = np.random.default_rng(10)
    images, labels = [], []
    for i in range(n):
        images.append(rng.integers(0, 256, (64, 64, 3)).astype(np.uint8))
        label = rng.integers(0, 3, (64, 64)).astype(np.uint8)
        label[40:56, 8 + 8 * i:24 + 8 * i] = 7  # a 16 x 16 patch of a rare class
        labels.append(label)
    return ArrayDataset(images, labels, **kw)


def test_compute_class_stats_counts_labels():
    ds = _block_dataset()
    stats = compute_class_stats(ds)
    for i in range(len(ds)):
        want = np.bincount(ds.labels[i].ravel(), minlength=19)[:19]
        assert stats["images"][f"im{i}"] == want.tolist()
    assert stats["class_pixels"][7] == 4 * 256


def test_uda_dataset_reproducible_and_rcs_recrops():
    transform = train_transform(scale=None, crop_size=(24, 24), cat_max_ratio=1.0)
    source = _block_dataset(transform=transform)
    target = _block_dataset(n=3, transform=transform)
    rcs = RareClassSampler(compute_class_stats(source), names=source.names, temperature=0.01,
                           min_pixels=200, min_crop_ratio=0.5)
    assert rcs.classes[np.argmax(rcs.probs)] == 7
    uda = UDADataset(source, target, rcs=rcs, seed=3, length=100)
    a, b = uda[17], uda[17]
    for dom in ("source", "target"):
        assert torch.equal(a[dom]["img"], b[dom]["img"])
        assert torch.equal(a[dom]["label"], b[dom]["label"])
        assert a[dom]["name"] == b[dom]["name"]
    assert not torch.equal(uda[18]["source"]["img"], a["source"]["img"])
    assert UDADataset(source, target, rcs=rcs, seed=4)[17]["source"]["name"] != a["source"][
        "name"] or not torch.equal(UDADataset(source, target, rcs=rcs, seed=4)[17]["source"]["img"],
                                   a["source"]["img"])
    enough = sum(int((uda[i]["source"]["label"] == 7).sum()) > 100 for i in range(60))
    plain = UDADataset(source, target, rcs=None, seed=3)
    enough_plain = sum(int((plain[i]["source"]["label"] == 7).sum()) > 100 for i in range(60))
    assert enough >= 55 and enough > enough_plain + 15
    assert a["source"]["rcs_class"] == 7 and plain[0]["source"]["rcs_class"] == -1
    batch = torch.utils.data.default_collate([uda[0], uda[1]])
    assert batch["source"]["img"].shape == (2, 3, 24, 24)
    assert batch["target"]["label"].shape == (2, 24, 24)
    with pytest.raises(ValueError):
        UDADataset(source, ArrayDataset([], []))

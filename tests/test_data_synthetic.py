"""The synthetic source / target street scenes."""
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from cluda.data import synthetic as syn
from cluda.data.datasets import CityscapesDataset
from cluda.data.labels import NUM_CLASSES, colorize
from cluda.data.transforms import denormalize, train_transform


def test_scenes_are_deterministic_and_splits_differ():
    a_img, a_label = syn.make_scene(3, split="train", seed=7, height=64, width=128,
                                    domain="target")
    b_img, b_label = syn.make_scene(3, split="train", seed=7, height=64, width=128,
                                    domain="target")
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_label, b_label)
    assert a_img.shape == (64, 128, 3) and a_img.dtype == np.uint8
    assert a_label.shape == (64, 128) and a_label.dtype == np.uint8
    for other in (dict(split="val", seed=7, index=3), dict(split="train", seed=8, index=3),
                  dict(split="train", seed=7, index=4)):
        label = syn.make_layout(other.pop("index"), height=64, width=128, **other).label
        assert (label != a_label).mean() > 0.05


def test_all_classes_appear_in_a_few_dozen_scenes():
    seen = np.zeros(256, bool)
    for i in range(36):
        label = syn.make_layout(i, seed=0, height=128, width=256).label
        values = np.unique(label)
        assert set(values.tolist()) <= set(range(NUM_CLASSES)) | {255}
        seen[values] = True
    missing = [c for c in range(NUM_CLASSES) if not seen[c]]
    assert not missing, f"classes never drawn: {missing}"


def test_scene_layout_is_street_like():
    # sky on top, road at the bottom centre, in every scene
    for i in range(10):
        layout = syn.make_layout(i, seed=1, height=96, width=192)
        top, bottom = layout.label[:8], layout.label[-10:, 70:122]
        assert np.isin(top, [syn.SKY, syn.BUILDING, syn.VEGETATION, syn.POLE, syn.LIGHT,
                             syn.SIGN, syn.WALL]).mean() > 0.9
        assert (bottom == syn.ROAD).mean() + (bottom == 255).mean() > 0.4


def test_two_looks_differ_labels_identical():
    layout = syn.make_layout(5, seed=2, height=128, width=256)
    src, src_label = syn.make_scene(5, seed=2, height=128, width=256, domain="source")
    tgt, tgt_label = syn.make_scene(5, seed=2, height=128, width=256, domain="target")
    np.testing.assert_array_equal(src_label, tgt_label)
    np.testing.assert_array_equal(src_label, layout.label)
    assert np.abs(src.astype(int) - tgt.astype(int)).mean() > 15
    # the source look is flat (one colour per instance away from details), the target textured
    road = (layout.label == syn.ROAD) & (layout.detail == syn.NONE)
    inst = np.bincount(layout.instance[road]).argmax()
    region = road & (layout.instance == inst)
    region[:, :2] = region[:, -2:] = False
    assert len(np.unique(src[region], axis=0)) == 1
    assert len(np.unique(tgt[region], axis=0)) > 50


def test_instances_vary_in_shade_within_a_domain():
    colours = set()
    for i in range(12):
        layout = syn.make_layout(i, seed=3, height=96, width=192)
        img = syn.render(layout, "source", np.random.default_rng(0))
        car = (layout.label == syn.CAR) & (layout.detail == syn.NONE)
        for inst in np.unique(layout.instance[car]):
            colours.add(tuple(img[car & (layout.instance == inst)][0] // 8))
    assert len(colours) >= 6


def test_look_settings_change_only_their_effect():
    layout = syn.make_layout(0, seed=4, height=64, width=128)
    target = syn.LOOKS["target"]
    full = syn.render(layout, "target", np.random.default_rng(1))
    np.testing.assert_array_equal(full, syn.render(layout, "target", np.random.default_rng(1),
                                                   look=target))
    quiet = syn.render(layout, "target", np.random.default_rng(1),
                       look=dataclasses.replace(target, noise=(0.0, 0.0)))
    diff = np.abs(full.astype(int) - quiet.astype(int))
    assert 0.5 < diff.mean() < 8  # sensor noise only: the other effects drew the same numbers
    game = syn.render(layout, "target", np.random.default_rng(1),
                      look=dataclasses.replace(target, palette=0.0))
    assert np.abs(game.astype(int) - full.astype(int)).mean() > 10
    with pytest.raises(ValueError):
        syn.render(layout, "target", np.random.default_rng(1),
                   look=dataclasses.replace(target, palette=1.5))
    with pytest.raises(ValueError):
        syn.render(layout, "night", np.random.default_rng(1))


def test_any_resolution():
    for h, w in ((16, 16), (48, 200), (150, 100)):
        img, label = syn.make_scene(1, height=h, width=w, domain="target")
        assert img.shape == (h, w, 3) and label.shape == (h, w)
    with pytest.raises(ValueError):
        syn.make_layout(0, height=8, width=64)


def test_dataset_sample_dict_and_transform():
    ds = syn.SyntheticDataset(domain="target", split="val", num_samples=5, size=(64, 128), seed=1,
                              transform=train_transform(scale=None, crop_size=(48, 48)))
    assert len(ds) == 5 and len(set(ds.names)) == 5
    s = ds[2]
    assert s["img"].shape == (3, 48, 48) and s["img"].dtype == torch.float32
    assert s["label"].shape == (48, 48) and s["label"].dtype == torch.int64
    assert s["name"] == ds.name(2) and s["index"] == 2 and s["path"].startswith("synthetic://")
    assert torch.equal(ds[2]["img"], s["img"])
    img, label = ds.load(2)
    np.testing.assert_array_equal(ds.load_label(2), label)
    plain = syn.SyntheticDataset(domain="target", split="val", num_samples=5, size=(64, 128),
                                 seed=1)
    np.testing.assert_array_equal(denormalize(plain[2]["img"]), img)
    with pytest.raises(IndexError):
        ds.load(5)
    for bad in (dict(domain="night"), dict(split="dev"), dict(num_samples=0), dict(size=(8, 8))):
        with pytest.raises(ValueError):
            syn.SyntheticDataset(**bad)


def test_write_cityscapes_layout_read_back(tmp_path):
    n = syn.write_cityscapes(str(tmp_path), domain="target", splits={"train": 3, "val": 2},
                             size=(32, 64), seed=5, progress=False)
    assert n == 5
    assert syn.write_cityscapes(str(tmp_path), domain="target", splits={"train": 3, "val": 2},
                                size=(32, 64), seed=5, progress=False) == 0
    ds = CityscapesDataset(str(tmp_path), split="val")
    assert len(ds) == 2
    assert ds.name(1) == "synthetic/synthetic_000005_000001"
    img, label = syn.make_scene(1, split="val", seed=5, height=32, width=64, domain="target")
    s = ds[1]
    np.testing.assert_array_equal(s["label"].numpy(), label)  # train ids -> label ids -> back
    np.testing.assert_array_equal(denormalize(s["img"]), img)
    raw = np.asarray(Image.open(tmp_path / "gtFine" / "val" / "synthetic" /
                                "synthetic_000005_000001_gtFine_labelIds.png"))
    assert raw.max() <= 33 and (raw[label == syn.ROAD] == 7).all()
    assert len(CityscapesDataset(str(tmp_path), split="train")) == 3


def test_to_cityscapes_ids():
    ids = syn.to_cityscapes_ids(np.array([[0, 13, 18, 10, 255, 11]], np.uint8))
    assert ids.tolist() == [[7, 26, 33, 23, 0, 24]]


def test_grid_command(tmp_path):
    out = tmp_path / "sub" / "grid.png"
    assert syn.main(["grid", str(out), "--n", "2", "--size", "32x64", "--seed", "3"]) == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape == (64, 192, 3)
    layout = syn.make_layout(1, seed=3, height=32, width=64)
    np.testing.assert_array_equal(grid[32:, 128:], colorize(layout.label))
    src, _ = syn.make_scene(1, seed=3, height=32, width=64, domain="source")
    np.testing.assert_array_equal(grid[32:, :64], src)
    with pytest.raises(SystemExit):
        syn.main(["grid", str(out), "--size", "32by64"])

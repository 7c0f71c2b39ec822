"""Cityscapes, GTA5 and SYNTHIA loaders and `cluda.data.prepare`, on tiny fake trees written in
each official layout."""
import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from cluda.data import prepare as prep
from cluda.data.datasets import CityscapesDataset, GTADataset, SynthiaDataset, list_cityscapes
from cluda.data.io import read_label
from cluda.data.labels import CITYSCAPES_ID_TO_TRAINID, SYNTHIA_ID_TO_TRAINID
from cluda.data.rcs import load_class_stats
from cluda.data.transforms import denormalize, train_transform
from png16 import write_png16

H, W = 12, 20
CS_IDS = np.arange(34)  # every Cityscapes label id, void ones included


def _rgb(rng, h=H, w=W):
    return rng.integers(0, 256, size=(h, w, 3)).astype(np.uint8)


def _expected(ids, table):
    out = np.full(ids.shape, 255, np.uint8)
    for src, dst in table.items():
        out[ids == src] = dst
    return out


def make_gta(root, rng, n=3):
    os.makedirs(root / "images")
    os.makedirs(root / "labels")
    labels = {}
    for i in range(1, n + 1):
        Image.fromarray(_rgb(rng)).save(root / "images" / f"{i:05d}.png")
        ids = rng.choice(CS_IDS, size=(H, W)).astype(np.uint8)
        img = Image.fromarray(ids, mode="P")
        img.putpalette(list(rng.integers(0, 256, size=768)))
        img.save(root / "labels" / f"{i:05d}.png")
        labels[f"{i:05d}"] = ids
    return labels


def make_cityscapes(root, rng, split, cities=(("aachen", 2), ("bochum", 1))):
    labels = {}
    for city, n in cities:
        os.makedirs(root / "leftImg8bit" / split / city, exist_ok=True)
        os.makedirs(root / "gtFine" / split / city, exist_ok=True)
        for i in range(n):
            base = f"{city}_000000_{i:06d}"
            Image.fromarray(_rgb(rng)).save(root / "leftImg8bit" / split / city /
                                            f"{base}_leftImg8bit.png")
            ids = rng.choice(CS_IDS, size=(H, W)).astype(np.uint8)
            Image.fromarray(ids).save(root / "gtFine" / split / city /
                                      f"{base}_gtFine_labelIds.png")
            labels[f"{city}/{base}"] = ids
    return labels


def make_synthia(root, rng, n=2):
    os.makedirs(root / "RGB")
    os.makedirs(root / "GT" / "LABELS")
    labels = {}
    for i in range(n):
        Image.fromarray(_rgb(rng)).save(root / "RGB" / f"{i:07d}.png")
        ids = rng.integers(0, 23, size=(H, W)).astype(np.uint16)
        inst = rng.integers(0, 500, size=(H, W)).astype(np.uint16)
        write_png16(str(root / "GT" / "LABELS" / f"{i:07d}.png"),
                    np.stack([ids, inst, np.zeros_like(ids)], -1), filters=(1, 4, 2))
        labels[f"{i:07d}"] = ids
    return labels


def test_cityscapes_sample_dict_mapping_and_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    labels = make_cityscapes(tmp_path, rng, "train")
    ds = CityscapesDataset(str(tmp_path), split="train")
    assert len(ds) == 3
    assert ds.names == sorted(labels)
    s = ds[1]
    assert set(s) >= {"img", "label", "name", "path", "index"}
    assert s["img"].dtype == torch.float32 and s["img"].shape == (3, H, W)
    assert s["label"].dtype == torch.int64 and s["label"].shape == (H, W)
    np.testing.assert_array_equal(s["label"].numpy(),
                                  _expected(labels[s["name"]], CITYSCAPES_ID_TO_TRAINID))
    original = np.asarray(Image.open(s["path"]))
    np.testing.assert_array_equal(denormalize(s["img"]), original)
    # normalised: roughly zero-mean unit-scale, not 0..255
    assert s["img"].abs().max() < 3.0


def test_label_id_spot_checks_cityscapes_and_gta(tmp_path):
    rng = np.random.default_rng(1)
    make_gta(tmp_path / "gta", rng, n=1)
    make_cityscapes(tmp_path / "cs", rng, "val", cities=(("lindau", 1),))
    # road 7 -> 0, car 26 -> 13, bicycle 33 -> 18, void 4 -> 255, person 24 -> 11, sky 23 -> 10,
    # sidewalk 8 -> 1, parking 9 -> 255, truck 27 -> 14, train 31 -> 16
    ids = np.array([[7, 26, 33, 4, 24, 23, 8, 9, 27, 31]], np.uint8)
    want = np.array([[0, 13, 18, 255, 11, 10, 1, 255, 14, 16]])
    img = Image.fromarray(ids, mode="P")
    img.putpalette([0] * 768)
    img.save(tmp_path / "gta" / "labels" / "00001.png")
    Image.fromarray(np.zeros((1, 10, 3), np.uint8) + 9).save(
        tmp_path / "gta" / "images" / "00001.png")
    Image.fromarray(ids).save(tmp_path / "cs" / "gtFine" / "val" / "lindau" /
                              "lindau_000000_000000_gtFine_labelIds.png")
    Image.fromarray(np.zeros((1, 10, 3), np.uint8) + 9).save(
        tmp_path / "cs" / "leftImg8bit" / "val" / "lindau" / "lindau_000000_000000_leftImg8bit.png")
    np.testing.assert_array_equal(GTADataset(str(tmp_path / "gta"))[0]["label"].numpy(), want)
    np.testing.assert_array_equal(
        CityscapesDataset(str(tmp_path / "cs"), split="val")[0]["label"].numpy(), want)


def test_synthia_16bit_labels_mapped(tmp_path):
    rng = np.random.default_rng(2)
    labels = make_synthia(tmp_path, rng)
    ds = SynthiaDataset(str(tmp_path))
    for i in range(len(ds)):
        s = ds[i]
        np.testing.assert_array_equal(s["label"].numpy(),
                                      _expected(labels[s["name"]], SYNTHIA_ID_TO_TRAINID))
    # SYNTHIA ids: 3 road, 4 sidewalk, 2 building, 21 wall, 1 sky, 10 pedestrian, 17 rider,
    # 8 car, 19 bus, 12 motorcycle, 11 bicycle, 15 traffic light; 0 void, 13 parking-slot and
    # 22 lanemarking are ignored
    ids = np.array([[3, 4, 2, 21, 1, 10, 17, 8, 19, 12, 11, 15, 0, 13, 22]], np.uint16)
    want = [[0, 1, 2, 3, 10, 11, 12, 13, 15, 17, 18, 6, 255, 255, 255]]
    write_png16(str(tmp_path / "GT" / "LABELS" / "0000000.png"), np.stack([ids, ids * 7, ids], -1))
    Image.fromarray(np.zeros((1, 15, 3), np.uint8)).save(tmp_path / "RGB" / "0000000.png")
    np.testing.assert_array_equal(SynthiaDataset(str(tmp_path))[0]["label"].numpy(), want)


def test_prepared_labels_auto_raw_prepared(tmp_path):
    rng = np.random.default_rng(3)
    labels = make_gta(tmp_path, rng, n=2)
    fake = rng.integers(0, 19, size=(H, W)).astype(np.uint8)
    Image.fromarray(fake).save(tmp_path / "labels" / "00001_labelTrainIds.png")
    auto = GTADataset(str(tmp_path))
    assert len(auto) == 2  # the prepared file is not taken for a sample of its own
    np.testing.assert_array_equal(auto[0]["label"].numpy(), fake)
    np.testing.assert_array_equal(auto[1]["label"].numpy(),
                                  _expected(labels["00002"], CITYSCAPES_ID_TO_TRAINID))
    raw = GTADataset(str(tmp_path), labels="raw")
    np.testing.assert_array_equal(raw[0]["label"].numpy(),
                                  _expected(labels["00001"], CITYSCAPES_ID_TO_TRAINID))
    with pytest.raises(FileNotFoundError, match="00002_labelTrainIds.png"):
        GTADataset(str(tmp_path), labels="prepared")
    with pytest.raises(ValueError, match="labels must be"):
        GTADataset(str(tmp_path), labels="trainids")


def test_unknown_ids_ignored_with_a_counted_warning(tmp_path):
    rng = np.random.default_rng(4)
    make_cityscapes(tmp_path, rng, "train", cities=(("ulm", 1),))
    ids = rng.choice(CS_IDS, size=(H, W)).astype(np.uint8)
    ids[0, :5] = 40
    ids[1, :2] = 77
    Image.fromarray(ids).save(tmp_path / "gtFine" / "train" / "ulm" /
                              "ulm_000000_000000_gtFine_labelIds.png")
    ds = CityscapesDataset(str(tmp_path))
    with pytest.warns(UserWarning, match=r"ulm_000000_000000_gtFine_labelIds.png: 7 pixels"):
        label = ds[0]["label"].numpy()
    assert (label[0, :5] == 255).all() and (label[1, :2] == 255).all()


def test_missing_label_missing_image_empty_split_bad_root(tmp_path):
    rng = np.random.default_rng(5)
    make_gta(tmp_path / "gta", rng, n=3)
    os.remove(tmp_path / "gta" / "labels" / "00002.png")
    with pytest.raises(FileNotFoundError, match=r"images.00002.png has no label"):
        GTADataset(str(tmp_path / "gta"))
    make_gta(tmp_path / "gta2", rng, n=2)
    os.remove(tmp_path / "gta2" / "images" / "00001.png")
    with pytest.raises(FileNotFoundError, match=r"labels.00001.png has no image"):
        GTADataset(str(tmp_path / "gta2"))
    make_cityscapes(tmp_path / "cs", rng, "train")
    os.makedirs(tmp_path / "cs" / "leftImg8bit" / "val")
    os.makedirs(tmp_path / "cs" / "gtFine" / "val")
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit.val"):
        CityscapesDataset(str(tmp_path / "cs"), split="val")
    with pytest.raises(FileNotFoundError, match="test"):
        list_cityscapes(str(tmp_path / "cs"), "test")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        SynthiaDataset(str(tmp_path / "nowhere"))
    os.remove(tmp_path / "cs" / "leftImg8bit" / "train" / "bochum" /
              "bochum_000000_000000_leftImg8bit.png")
    with pytest.raises(FileNotFoundError, match="bochum_000000_000000"):
        CityscapesDataset(str(tmp_path / "cs"))


def test_unreadable_image_named_when_loaded(tmp_path):
    rng = np.random.default_rng(6)
    make_gta(tmp_path, rng, n=2)
    path = tmp_path / "images" / "00002.png"
    data = open(path, "rb").read()
    open(path, "wb").write(data[:60])
    ds = GTADataset(str(tmp_path))
    ds[0]
    with pytest.raises(ValueError, match=r"00002.png"):
        ds[1]


def test_label_size_mismatch_resized_with_warning(tmp_path):
    rng = np.random.default_rng(7)
    make_gta(tmp_path, rng, n=1)
    Image.fromarray(_rgb(rng, 2 * H, 2 * W)).save(tmp_path / "images" / "00001.png")
    with pytest.warns(UserWarning, match="label resized"):
        s = GTADataset(str(tmp_path))[0]
    assert s["label"].shape == (2 * H, 2 * W)


def test_transform_applied_and_reproducible(tmp_path):
    rng = np.random.default_rng(8)
    make_gta(tmp_path, rng, n=2)
    ds = GTADataset(str(tmp_path), transform=train_transform(scale=(40, 24), crop_size=(16, 16)),
                    seed=3)
    a, b = ds[1], ds[1]
    assert a["img"].shape == (3, 16, 16) and a["label"].shape == (16, 16)
    assert torch.equal(a["img"], b["img"]) and torch.equal(a["label"], b["label"])
    crops = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        crops.add(tuple(ds[1]["img"][0, 0, :3].tolist()))
    assert len(crops) > 1  # a new epoch draws new crops


def _trainids(path):
    return np.asarray(Image.open(path))


def test_prepare_gta_outputs_statistics_and_idempotence(tmp_path):
    rng = np.random.default_rng(9)
    labels = make_gta(tmp_path, rng, n=4)
    out = prep.prepare("gta", str(tmp_path), workers=0, progress=False)
    assert (out["written"], out["kept"]) == (4, 0)
    stats = load_class_stats(str(tmp_path / "class_stats.json"))
    total = np.zeros(19, np.int64)
    for name, ids in labels.items():
        want = _expected(ids, CITYSCAPES_ID_TO_TRAINID)
        got = _trainids(tmp_path / "labels" / f"{name}_labelTrainIds.png")
        np.testing.assert_array_equal(got, want)
        counts = np.bincount(want.ravel(), minlength=256)[:19]
        assert stats["images"][name] == counts.tolist()
        total += counts
    assert stats["class_pixels"] == total.tolist()
    np.testing.assert_allclose(stats["class_frequency"], total / total.sum())
    # rerun: nothing rewritten, same statistics
    before = {p: os.stat(p).st_mtime_ns for p in (tmp_path / "labels").glob("*_labelTrainIds.png")}
    json_before = json.loads(open(tmp_path / "class_stats.json").read())
    out = prep.prepare("gta", str(tmp_path), workers=0, progress=False)
    assert (out["written"], out["kept"]) == (0, 4)
    assert {p: os.stat(p).st_mtime_ns for p in before} == before
    # an interrupted run: one output missing, one truncated, a stale temporary left behind
    os.remove(tmp_path / "labels" / "00002_labelTrainIds.png")
    bad = tmp_path / "labels" / "00003_labelTrainIds.png"
    bad.write_bytes(bad.read_bytes()[:30])
    (tmp_path / "labels" / ".00004_labelTrainIds.png.abc123.tmp").write_bytes(b"partial")
    out = prep.prepare("gta", str(tmp_path), workers=2, progress=False)
    assert (out["written"], out["kept"]) == (2, 2)
    np.testing.assert_array_equal(_trainids(bad),
                                  _expected(labels["00003"], CITYSCAPES_ID_TO_TRAINID))
    assert json.loads(open(tmp_path / "class_stats.json").read()) == json_before
    assert not list((tmp_path / "labels").glob(".*.tmp"))
    # the loader now reads the prepared files
    ds = GTADataset(str(tmp_path), labels="prepared")
    assert ds.label_path(0).endswith("00001_labelTrainIds.png")


def test_prepare_cityscapes_and_synthia(tmp_path):
    rng = np.random.default_rng(10)
    train = make_cityscapes(tmp_path / "cs", rng, "train")
    val = make_cityscapes(tmp_path / "cs", rng, "val", cities=(("frankfurt", 2),))
    out = prep.prepare("cityscapes", str(tmp_path / "cs"), workers=0, progress=False)
    assert out["written"] == 5
    stats = load_class_stats(out["stats"])
    assert stats["split"] == "train" and sorted(stats["images"]) == sorted(train)
    for name, ids in val.items():
        city, base = name.split("/")
        got = _trainids(tmp_path / "cs" / "gtFine" / "val" / city /
                        f"{base}_gtFine_labelTrainIds.png")
        np.testing.assert_array_equal(got, _expected(ids, CITYSCAPES_ID_TO_TRAINID))
    syn = make_synthia(tmp_path / "syn", rng, n=3)
    prep.prepare("synthia", str(tmp_path / "syn"), workers=0, progress=False)
    for name, ids in syn.items():
        got = _trainids(tmp_path / "syn" / "GT" / "LABELS" / f"{name}_labelTrainIds.png")
        np.testing.assert_array_equal(got, _expected(ids, SYNTHIA_ID_TO_TRAINID))
    ds = SynthiaDataset(str(tmp_path / "syn"), labels="prepared")
    np.testing.assert_array_equal(read_label(ds.label_path(0)),
                                  _expected(syn["0000000"], SYNTHIA_ID_TO_TRAINID))


def test_prepare_unknown_ids_warn_once_and_cli_errors(tmp_path, capsys):
    rng = np.random.default_rng(11)
    make_gta(tmp_path / "gta", rng, n=2)
    ids = np.full((H, W), 50, np.uint8)
    Image.fromarray(ids).save(tmp_path / "gta" / "labels" / "00002.png")
    with pytest.warns(UserWarning, match=r"1 labels .* 240 pixels with unknown ids \[50\]"):
        prep.prepare("gta", str(tmp_path / "gta"), workers=0, progress=False)
    assert (_trainids(tmp_path / "gta" / "labels" / "00002_labelTrainIds.png") == 255).all()
    assert prep.main(["synthia", str(tmp_path / "missing"), "--workers", "0"]) == 2
    assert "missing" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert prep.main(["gta", str(tmp_path / "gta"), "--workers", "0"]) == 0


def test_prepare_check_lists_bad_files_by_name_and_writes_nothing(tmp_path, capsys):
    rng = np.random.default_rng(12)
    root = tmp_path / "gta"
    make_gta(root, rng, n=4)
    bad_image = root / "images" / "00002.png"
    bad_image.write_bytes(bad_image.read_bytes()[:70])  # truncated
    Image.fromarray(_rgb(rng, 2 * H, 2 * W)).save(root / "images" / "00003.png")  # other size
    Image.fromarray(np.full((H, W), 50, np.uint8)).save(root / "labels" / "00004.png")  # id 50
    before = sorted(p for p in root.rglob("*"))
    assert prep.main(["gta", str(root), "--check", "--workers", "0"]) == 2
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert any(line.startswith("unreadable:") and str(bad_image) in line for line in lines)
    assert any(line.startswith("size:") and "00003.png is 20x12" in line and "40x24" in line
               for line in lines)
    assert any(line.startswith("unknown ids:") and "00004.png: 240 pixels with ids [50]" in line
               for line in lines)
    assert lines[-1] == (f"checked 4 samples of gta at {root}: 1 unreadable file(s), 1 label(s) "
                         "of another size than their image, 1 label(s) with unknown ids")
    err_lines = err.strip().splitlines()  # after the progress bar
    assert err_lines[-1].startswith(f"error: 1 unreadable file(s) in {root}")
    assert str(bad_image) in err_lines[-1] and "Traceback" not in err
    assert sorted(p for p in root.rglob("*")) == before  # nothing written
    # Warnings alone: exit status 0, unless --strict.
    Image.fromarray(_rgb(rng)).save(bad_image)
    assert prep.main(["gta", str(root), "--check", "--workers", "0"]) == 0
    assert "1 label(s) with unknown ids" in capsys.readouterr().out
    assert prep.main(["gta", str(root), "--check", "--strict", "--workers", "0"]) == 2
    assert "--strict" in capsys.readouterr().err
    # A clean data set, checked by worker processes.
    make_cityscapes(tmp_path / "cs", rng, "val")
    assert prep.main(["cityscapes", str(tmp_path / "cs"), "--check", "--splits", "val",
                      "--workers", "2"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == [
        f"checked 3 samples of cityscapes at {tmp_path / 'cs'}: 0 unreadable file(s), 0 label(s) "
        "of another size than their image, 0 label(s) with unknown ids"]

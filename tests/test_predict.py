"""Tests for cluda.predict: id PNG round trips, colour and overlay images, the comparison
figure, atomic writes and image reading errors."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cluda.data.io import read_image
from cluda.data.labels import (CITYSCAPES_ID_TO_TRAINID, colorize, IGNORE_INDEX, lookup_table,
                               PALETTE)
from cluda.visualize import comparison_figure, overlay, save_prediction, trainid_to_labelid


def random_pred(rng, h=23, w=37):
    pred = rng.integers(0, 19, size=(h, w))
    pred[rng.random((h, w)) < 0.1] = IGNORE_INDEX
    return pred


def random_rgb(rng, h=23, w=37):
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def files_under(root):
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, names in os.walk(root) for f in names)


def test_saved_pngs_round_trip_to_the_same_ids(tmp_path):
    rng = np.random.default_rng(0)
    pred = random_pred(rng)
    image = random_rgb(rng)
    paths = save_prediction(torch.from_numpy(pred), tmp_path, "frankfurt_000000_000294_leftImg8bit",
                            image=image)
    assert files_under(tmp_path) == [
        "color/frankfurt_000000_000294_leftImg8bit_color.png",
        "labelIds/frankfurt_000000_000294_leftImg8bit_labelIds.png",
        "overlay/frankfurt_000000_000294_leftImg8bit_overlay.png",
        "trainIds/frankfurt_000000_000294_leftImg8bit_trainIds.png",
    ]
    with Image.open(paths["trainIds"]) as im:
        assert im.mode == "L"
        train_ids = np.array(im)
    np.testing.assert_array_equal(train_ids, pred)

    with Image.open(paths["labelIds"]) as im:
        assert im.mode == "L"
        label_ids = np.array(im)
    assert label_ids[pred == 0].tolist() == [7] * int((pred == 0).sum())  # road is label id 7
    assert set(np.unique(label_ids[pred == IGNORE_INDEX])) == {0}  # ignore -> "unlabeled"
    # Mapping the label ids back with the data pipeline's table recovers the train ids.
    np.testing.assert_array_equal(lookup_table(CITYSCAPES_ID_TO_TRAINID)[label_ids], pred)
    np.testing.assert_array_equal(trainid_to_labelid(pred), label_ids)

    np.testing.assert_array_equal(np.array(Image.open(paths["color"])), colorize(pred))
    np.testing.assert_array_equal(np.array(Image.open(paths["overlay"])), overlay(pred, image))


def test_save_prediction_without_image_writes_no_overlay(tmp_path):
    pred = random_pred(np.random.default_rng(1), 5, 6)
    paths = save_prediction(pred.astype(np.int32), tmp_path, "x")
    assert set(paths) == {"color", "trainIds", "labelIds"}
    assert "overlay" not in os.listdir(tmp_path)


def test_overlay_blends_and_keeps_ignored_pixels():
    rng = np.random.default_rng(2)
    pred = random_pred(rng, 9, 13)
    image = random_rgb(rng, 9, 13)
    out = overlay(pred, image, alpha=0.25)
    assert out.shape == (9, 13, 3) and out.dtype == np.uint8
    y, x = np.argwhere(pred == 13)[0]  # a car pixel
    expected = np.rint(0.75 * image[y, x].astype(float) + 0.25 * np.array(PALETTE[13]))
    np.testing.assert_array_equal(out[y, x], expected)
    ignored = pred == IGNORE_INDEX
    np.testing.assert_array_equal(out[ignored], image[ignored])
    np.testing.assert_array_equal(overlay(pred, image, alpha=1.0)[~ignored], colorize(pred)[~ignored])
    with pytest.raises(ValueError, match="differs"):
        overlay(pred, image[:-1])
    with pytest.raises(ValueError, match="alpha"):
        overlay(pred, image, alpha=1.5)


def test_save_prediction_bad_input_writes_nothing(tmp_path):
    rng = np.random.default_rng(3)
    pred = random_pred(rng)
    paths = save_prediction(pred, tmp_path, "img")
    before = {p: p.read_bytes() for p in paths.values()}
    new_pred = random_pred(rng)
    # The image does not match the prediction: the error comes before any file is replaced.
    with pytest.raises(ValueError, match="differs"):
        save_prediction(new_pred, tmp_path, "img", image=random_rgb(rng, 10, 10))
    assert {p: p.read_bytes() for p in paths.values()} == before
    assert files_under(tmp_path) == sorted(os.path.relpath(p, tmp_path) for p in paths.values())
    with pytest.raises(ValueError, match=r"outside 0\.\.18"):
        save_prediction(np.full((4, 4), 19), tmp_path, "img2")
    with pytest.raises(TypeError, match="integer"):
        save_prediction(np.random.rand(4, 4), tmp_path, "img2")
    with pytest.raises(TypeError, match="uint8"):
        save_prediction(pred, tmp_path, "img2", image=random_rgb(rng).astype(np.float32))
    with pytest.raises(ValueError, match="name"):
        save_prediction(pred, tmp_path, "../escape")
    assert "img2" not in "".join(files_under(tmp_path))


def test_save_prediction_write_failure_leaves_old_files(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    paths = save_prediction(random_pred(rng), tmp_path, "img")
    before = {p: p.read_bytes() for p in paths.values()}
    real_replace = os.replace
    calls = []

    def failing_replace(src, dst):
        calls.append(dst)
        raise OSError("simulated failure")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        save_prediction(random_pred(rng), tmp_path, "img")
    monkeypatch.setattr(os, "replace", real_replace)
    assert calls and {p: p.read_bytes() for p in paths.values()} == before
    assert not any(name.endswith(".tmp") for name in files_under(tmp_path))


def test_comparison_figure_layout_and_panels(tmp_path):
    rng = np.random.default_rng(5)
    h, w, gap = 12, 20, 3
    rows = []
    for _ in range(2):
        rows.append((random_rgb(rng, h, w), random_pred(rng, h, w), random_pred(rng, h, w),
                     torch.from_numpy(random_pred(rng, h, w))))
    out = tmp_path / "figs" / "compare.png"
    fig = comparison_figure(rows, out, gap=gap)
    width = 4 * w + 3 * gap
    assert fig.dtype == np.uint8 and fig.shape[1] == width and fig.shape[2] == 3
    title_h = fig.shape[0] - (2 * h + gap)
    assert title_h > 0
    # The title strip holds dark text on white.
    assert (fig[:title_h] < 100).any() and (fig[:title_h] == 255).mean() > 0.5
    np.testing.assert_array_equal(np.array(Image.open(out)), fig)
    for r, row in enumerate(rows):
        top = title_h + r * (h + gap)
        for c, panel in enumerate(row):
            left = c * (w + gap)
            expected = panel if c == 0 else colorize(np.asarray(panel))
            np.testing.assert_array_equal(fig[top:top + h, left:left + w], expected)
    # Gaps between panels are white.
    assert (fig[title_h:, w:w + gap] == 255).all()
    assert os.listdir(out.parent) == ["compare.png"]


def test_comparison_figure_rescales_panels(tmp_path):
    rng = np.random.default_rng(6)
    pred = random_pred(rng, 10, 16)
    rows = [(random_rgb(rng, 10, 16), pred), (random_rgb(rng, 5, 8), random_pred(rng, 5, 8))]
    fig = comparison_figure(rows, tmp_path / "f.png", titles=("input", "adapted"),
                            panel_width=32, gap=0)
    # Row 1 is scaled x2 (20 x 32), row 2 x4 (20 x 32).
    title_h = fig.shape[0] - 40
    assert fig.shape[1] == 64 and title_h > 0
    label_panel = fig[title_h:title_h + 20, 32:64]
    np.testing.assert_array_equal(label_panel, colorize(np.kron(pred, np.ones((2, 2), int))))


def test_comparison_figure_rejects_bad_rows(tmp_path):
    rng = np.random.default_rng(7)
    img, pred = random_rgb(rng, 8, 8), random_pred(rng, 8, 8)
    with pytest.raises(ValueError, match="3 panels but there are 4 titles"):
        comparison_figure([(img, pred, pred)], tmp_path / "f.png")
    with pytest.raises(ValueError, match="differ in size"):
        comparison_figure([(img, pred[:4], pred, pred)], tmp_path / "f.png")
    with pytest.raises(ValueError, match="at least one row"):
        comparison_figure([], tmp_path / "f.png")
    assert os.listdir(tmp_path) == []


def test_read_image_round_trip_and_conversion(tmp_path):
    rng = np.random.default_rng(8)
    rgb = random_rgb(rng, 7, 9)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgb)
    grey = rng.integers(0, 256, (7, 9), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    out = read_image(str(tmp_path / "g.png"))
    assert out.shape == (7, 9, 3) and (out == grey[..., None]).all()


def test_read_image_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image(missing)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match="garbage.png"):
        read_image(garbage)
    Image.fromarray(random_rgb(np.random.default_rng(9), 40, 40)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="truncated.png"):
        read_image(tmp_path / "truncated.png")

"""Tests for the prediction command lines (`python -m cluda.predict` and its `compare`
sub-command): PNGs at full resolution that round-trip to the evaluation's predictions, the
comparison figure's layout and panels, and bad input (a clear one-line error, exit status 2,
nothing written)."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import cluda.predict as pr
from cli_helpers import TINY, check_error, one_thread, tiny_model, write_checkpoint  # noqa: F401
from cluda.build import build_val_dataset
from cluda.config import load_experiment
from cluda.data.labels import CITYSCAPES_ID_TO_TRAINID, colorize, lookup_table
from cluda.data.transforms import denormalize, normalize, rescale
from cluda.inference import make_predict_fn, predict_probs
from png16 import write_png16

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Inference input resize of the checkpoint's config, (long, short) bounds: the test images are
# resized for the network (MiT needs 32 px or more), so "full resolution" is not the network's
# input resolution.
SCALE = [64, 48]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):  # after the autouse one_thread (same scope)
    folder = tmp_path_factory.mktemp("ckpts")
    cfg = load_experiment(None, TINY + [f"--data.val.scale={SCALE}"])
    models = [tiny_model(cfg, 0), tiny_model(cfg, 1)]
    paths = [write_checkpoint(folder / "source_only.pt", cfg, models[0], None),
             write_checkpoint(folder / "adapted.pt", cfg, models[1], tiny_model(cfg, 2))]
    return {"cfg": cfg, "models": models, "paths": paths}


def street_image(seed, height, width):
    """A synthetic scene (not noise: the network sees structure) at an odd size."""
    cfg = load_experiment(None, TINY + [f"--data.val.scene_seed={seed}"])
    img = denormalize(build_val_dataset(cfg)[0]["img"])
    return np.asarray(Image.fromarray(img).resize((width, height), Image.BILINEAR))


def reference_prediction(model, cfg, image):
    """The evaluation's pipeline spelt out: keep-ratio resize to data.val.scale, normalise,
    class probabilities at the image's full size, argmax."""
    small, _ = rescale(image, None, scale=tuple(cfg.data.val.scale))
    probs = predict_probs(make_predict_fn(model, cfg), normalize(small)[None],
                          out_size=image.shape[:2], num_classes=19)
    return probs.argmax(dim=1)[0].numpy().astype(np.uint8)


def files_under(root):
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, names in os.walk(root) for f in names)


def png(path):
    return np.asarray(Image.open(path))


# --------------------------------------------------------------------------------------------
# python -m cluda.predict
# --------------------------------------------------------------------------------------------

def test_predict_writes_full_resolution_pngs_that_round_trip(tiny, tmp_path):
    images = {"frankfurt_000000_000294_leftImg8bit": street_image(3, 37, 53),
              "lindau_000001_000019_leftImg8bit": street_image(4, 50, 41)}
    folder = tmp_path / "in" / "sub"
    folder.mkdir(parents=True)
    Image.fromarray(images["frankfurt_000000_000294_leftImg8bit"]).save(
        tmp_path / "in" / "frankfurt_000000_000294_leftImg8bit.png")
    Image.fromarray(images["lindau_000001_000019_leftImg8bit"]).save(
        folder / "lindau_000001_000019_leftImg8bit.png")
    (folder / "notes.txt").write_text("not an image, not listed")
    out = tmp_path / "out"
    rc = pr.main(["--checkpoint", str(tiny["paths"][1]), str(tmp_path / "in"), "--out", str(out),
                  "--alpha", "0.25", "--no-progress"])
    assert rc == 0
    assert files_under(out) == sorted(f"{kind}/{name}_{kind}.png" for name in images
                                      for kind in ("color", "overlay", "trainIds", "labelIds"))
    to_train = lookup_table(CITYSCAPES_ID_TO_TRAINID, size=256)
    for name, image in images.items():
        expected = reference_prediction(tiny["models"][1], tiny["cfg"], image)
        assert len(np.unique(expected)) >= 3  # a map worth comparing
        train_ids = png(out / "trainIds" / f"{name}_trainIds.png")
        assert train_ids.shape == image.shape[:2]  # the image's full resolution
        np.testing.assert_array_equal(train_ids, expected)
        # The benchmark's label ids map back to the same train ids.
        np.testing.assert_array_equal(to_train[png(out / "labelIds" / f"{name}_labelIds.png")],
                                      expected)
        np.testing.assert_array_equal(png(out / "color" / f"{name}_color.png"), colorize(expected))
        np.testing.assert_array_equal(png(out / "overlay" / f"{name}_overlay.png"),
                                      pr.overlay(expected, image, alpha=0.25))


def test_predict_mode_and_overrides_change_the_inference(tiny, tmp_path):
    image = street_image(5, 48, 72)
    Image.fromarray(image).save(tmp_path / "x.png")
    rc = pr.main(["--checkpoint", str(tiny["paths"][0]), str(tmp_path / "x.png"), "--out",
                  str(tmp_path / "o"), "--mode", "slide", "--eval.crop_size=[40, 40]",
                  "--eval.stride=[8, 16]", "--data.val.scale=null", "--no-progress"])
    assert rc == 0
    cfg = load_experiment(None, TINY + ["--eval.mode=slide", "--eval.crop_size=[40, 40]",
                                        "--eval.stride=[8, 16]"])
    probs = predict_probs(make_predict_fn(tiny["models"][0], cfg), normalize(image)[None])
    expected = probs.argmax(dim=1)[0].numpy()
    got = png(tmp_path / "o" / "trainIds" / "x_trainIds.png")
    np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(got, reference_prediction(tiny["models"][0], tiny["cfg"], image))


def test_predict_unreadable_images_write_nothing(tiny, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(street_image(6, 30, 40)).save(folder / "good.png")
    truncated = folder / "truncated.png"
    good_bytes = (folder / "good.png").read_bytes()
    truncated.write_bytes(good_bytes[: len(good_bytes) // 2])
    text = folder / "text.jpg"
    text.write_text("not a picture")
    out = tmp_path / "out"
    rc = pr.main(["--checkpoint", str(tiny["paths"][0]), str(folder), "--out", str(out)])
    check_error(rc, capsys.readouterr().err, "2 of 3 images cannot be read", truncated, text)
    assert not out.exists()
    rc = pr.main(["--checkpoint", str(tiny["paths"][0]), str(text), "--out", str(out)])
    check_error(rc, capsys.readouterr().err, f"cannot read image {text}")
    assert not out.exists()


def test_predict_16bit_grey_image_is_the_8bit_image_not_a_white_frame(tiny, tmp_path):
    grey = street_image(12, 36, 52).mean(axis=2).round().astype(np.uint16)  # (H, W) 0..255
    Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "eight.png")
    write_png16(str(tmp_path / "sixteen.png"), grey * 257)  # the same picture, full 16-bit range
    out = tmp_path / "out"
    rc = pr.main(["--checkpoint", str(tiny["paths"][1]), str(tmp_path / "eight.png"),
                  str(tmp_path / "sixteen.png"), "--out", str(out), "--no-progress"])
    assert rc == 0
    eight, sixteen = (png(out / "trainIds" / f"{n}_trainIds.png") for n in ("eight", "sixteen"))
    np.testing.assert_array_equal(sixteen, eight)
    np.testing.assert_array_equal(png(out / "overlay" / "sixteen_overlay.png"),
                                  png(out / "overlay" / "eight_overlay.png"))
    white = np.full((36, 52, 3), 255, np.uint8)  # what Image.convert("RGB") made of it
    assert not np.array_equal(sixteen, reference_prediction(tiny["models"][1], tiny["cfg"], white))


def test_predict_bad_paths_and_checkpoints(tiny, tmp_path, capsys):
    good = tmp_path / "a.png"
    Image.fromarray(street_image(7, 20, 30)).save(good)
    (tmp_path / "sub").mkdir()
    Image.fromarray(street_image(8, 20, 30)).save(tmp_path / "sub" / "a.jpg")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    ck = str(tiny["paths"][0])
    rc = pr.main(["--checkpoint", ck, str(good), str(tmp_path / "missing.png"), "--out", str(out)])
    check_error(rc, capsys.readouterr().err, tmp_path / "missing.png")
    rc = pr.main(["--checkpoint", ck, str(tmp_path / "empty"), "--out", str(out)])
    check_error(rc, capsys.readouterr().err, "no image files", tmp_path / "empty")
    rc = pr.main(["--checkpoint", ck, str(good), str(tmp_path / "sub"), "--out", str(out)])
    check_error(rc, capsys.readouterr().err, "would write the same outputs", good)
    rc = pr.main(["--checkpoint", ck, str(good), "--out", str(good)])
    check_error(rc, capsys.readouterr().err, good, "not a folder")
    rc = pr.main(["--checkpoint", ck, str(good), "--out", str(out), "--alpha", "1.5"])
    check_error(rc, capsys.readouterr().err, "alpha")
    # A checkpoint that is cut short, and a config the weights do not fit.
    raw = tiny["paths"][0].read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(raw[: len(raw) // 3])
    rc = pr.main(["--checkpoint", str(cut), str(good), "--out", str(out)])
    check_error(rc, capsys.readouterr().err, cut, "truncated")
    rc = pr.main(["--checkpoint", ck, str(good), "--out", str(out), "--model.embed_dim=8"])
    check_error(rc, capsys.readouterr().err, ck, "model.embed_dim: 8 here, 16 in the checkpoint")
    assert not out.exists()


def test_predict_image_the_network_rejects_is_named_and_earlier_outputs_are_complete(
        tiny, tmp_path, capsys):
    Image.fromarray(street_image(10, 40, 60)).save(tmp_path / "a_big.png")
    Image.fromarray(street_image(11, 12, 20)).save(tmp_path / "b_tiny.png")  # < MiT's 32 px
    out = tmp_path / "out"
    rc = pr.main(["--checkpoint", str(tiny["paths"][0]), str(tmp_path / "a_big.png"),
                  str(tmp_path / "b_tiny.png"), "--out", str(out), "--data.val.scale=null",
                  "--no-progress"])
    check_error(rc, capsys.readouterr().err, f"cannot predict {tmp_path / 'b_tiny.png'}",
                "too small", "the 1 images before it are written")
    assert files_under(out) == [f"{k}/a_big_{k}.png"
                                for k in ("color", "labelIds", "overlay", "trainIds")]


# --------------------------------------------------------------------------------------------
# python -m cluda.predict compare
# --------------------------------------------------------------------------------------------

def test_compare_figure_layout_and_panels(tiny, tmp_path):
    fig_path = tmp_path / "fig" / "figure3.png"
    rc = pr.main(["compare", "--checkpoints", *map(str, tiny["paths"]), "--num", "2",
                  "--out", str(fig_path), "--no-progress"])
    assert rc == 0
    fig = png(fig_path)
    # The validation scenes are 64 x 96 and narrower than 512: panels at native size.
    height, width, gap, rows = 64, 96, 4, 2
    assert fig.shape[1] == 4 * width + 3 * gap
    title = fig.shape[0] - (rows * height + (rows - 1) * gap)
    assert 10 <= title <= 90
    val = build_val_dataset(tiny["cfg"])
    for r, index in enumerate([0, 2]):  # two images spread over three: the first and the last
        sample = val[index]
        label = sample["label"].numpy()
        preds = [probs.argmax(dim=1)[0].numpy() for probs in (
            predict_probs(make_predict_fn(m, tiny["cfg"]), sample["img"][None],
                          out_size=label.shape) for m in tiny["models"])]
        assert not np.array_equal(preds[0], preds[1])
        rgb = np.asarray(Image.fromarray(denormalize(sample["img"])).resize(
            (width, height), Image.BILINEAR))
        y = title + r * (height + gap)
        panels = [rgb, colorize(label), colorize(preds[0]), colorize(preds[1])]
        for c, expected in enumerate(panels):
            x = c * (width + gap)
            np.testing.assert_array_equal(fig[y:y + height, x:x + width], expected)


def test_compare_indices_titles_and_panel_width(tiny, tmp_path):
    fig_path = tmp_path / "fig.png"
    rc = pr.main(["compare", "--checkpoints", *map(str, tiny["paths"]), "--indices", "1",
                  "--titles", "DAFormer", "DAFormer + CLUDA", "--panel-width", "48",
                  "--out", str(fig_path), "--no-progress"])
    assert rc == 0
    fig = png(fig_path)
    assert fig.shape[1] == 4 * 48 + 3 * 4
    title = fig.shape[0] - 32  # one row, 64 x 96 scaled to 32 x 48
    # Ground truth of image 1, scaled with nearest neighbour: only palette colours.
    label = build_val_dataset(tiny["cfg"])[1]["label"].numpy()
    panel = fig[title:, 52:100].reshape(-1, 3)
    palette = {tuple(c) for c in colorize(label).reshape(-1, 3)}
    assert {tuple(c) for c in panel} <= palette


def test_compare_bad_input_writes_nothing(tiny, tmp_path, capsys):
    a, b = map(str, tiny["paths"])
    fig_path = tmp_path / "fig.png"
    rc = pr.main(["compare", "--checkpoints", a, b, "--num", "9", "--out", str(fig_path)])
    check_error(rc, capsys.readouterr().err, "--num 9", "3 images")
    rc = pr.main(["compare", "--checkpoints", a, b, "--indices", "0", "7", "--out", str(fig_path)])
    check_error(rc, capsys.readouterr().err, "[7]", "3 images")
    rc = pr.main(["compare", "--checkpoints", a, str(tmp_path / "none.pt"), "--out",
                  str(fig_path)])
    check_error(rc, capsys.readouterr().err, tmp_path / "none.pt")
    rc = pr.main(["compare", "--checkpoints", a, b, "--out", str(tmp_path)])
    check_error(rc, capsys.readouterr().err, "is a folder")
    rc = pr.main(["compare", "--checkpoints", a, b, "--weights", "teacher", "--out",
                  str(fig_path)])
    check_error(rc, capsys.readouterr().err, a, "holds no teacher weights")
    with pytest.raises(SystemExit) as exc:  # exactly two checkpoints
        pr.main(["compare", "--checkpoints", a, "--out", str(fig_path)])
    assert exc.value.code == 2
    assert not fig_path.exists()


# --------------------------------------------------------------------------------------------
# The real entry point
# --------------------------------------------------------------------------------------------

def test_python_m_entry_point(tiny, tmp_path):
    image = street_image(9, 33, 47)
    Image.fromarray(image).save(tmp_path / "street.png")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "cluda.predict", "--checkpoint", str(tiny["paths"][1]),
         str(tmp_path / "street.png"), "--out", str(tmp_path / "out"), "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 1 predictions" in proc.stdout
    np.testing.assert_array_equal(png(tmp_path / "out" / "trainIds" / "street_trainIds.png"),
                                  reference_prediction(tiny["models"][1], tiny["cfg"], image))

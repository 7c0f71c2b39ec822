"""The up-front inference memory estimate (`cluda.inference_memory`): the formula, the modes, and
the check that refuses an input too large for the device's memory with a remedy that works;
`cluda.predict` and `cluda.evaluate` refuse before any inference or output."""
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import cluda.evaluate as ev
import cluda.inference as inference
import cluda.predict as pr
from cli_helpers import TINY, one_thread, tiny_model, write_checkpoint  # noqa: F401
from cluda.config import load_experiment
from cluda.errors import UserError
from cluda.inference_memory import estimate_bytes, GIB, MEMORY_ENV, MemoryCheck


def test_estimate_is_the_documented_formula():
    e, a, c, c1, k = 256, 256, 512, 64, 19
    got = estimate_bytes(height=1024, width=2048, out_size=(1024, 2048), embed_dim=e,
                         aspp_channels=a, channels=c, c1=c1, num_classes=k)
    p = 1024 * 2048
    assert got == int(4 * (p / 16 * (8 * e + 8 * a + c + 4 * c1) + 3 * p) + 4 * 3 * k * p)
    # the largest test-time scale counts; the output size does not move with it
    bigger = estimate_bytes(height=1024, width=2048, out_size=(1024, 2048), scales=(0.5, 1.5))
    assert bigger > got
    # a Segmentor's slide windows go through one pass together: more than the image
    slide = estimate_bytes(height=1024, width=2048, out_size=(1024, 2048), mode="slide",
                           crop_size=(512, 512), stride=(341, 341))
    assert slide > got
    # HRDA's outer windows run one at a time: slide holds less than whole on a large image
    hrda = {"lr_scale": 0.5, "hr_slide_size": (512, 512), "hr_slide_stride": (256, 256)}
    whole = estimate_bytes(height=2048, width=4096, out_size=(1, 1), hrda=hrda)
    outer = estimate_bytes(height=2048, width=4096, out_size=(1, 1), hrda=hrda, mode="slide",
                           crop_size=(1024, 1024), stride=(512, 512))
    assert outer < whole / 4


def _fake_model(c1):
    return SimpleNamespace(segmentor=SimpleNamespace(encoder=SimpleNamespace(channels=[c1])))


def test_check_refuses_with_remedies_that_fit(monkeypatch):
    cfg = load_experiment(None, ["--model.hrda.enabled=true", "--data.crop_size=[1024,1024]",
                                 "--eval.crop_size=[1024,1024]", "--eval.stride=[512,512]"])
    check = MemoryCheck(_fake_model(64), cfg, torch.device("cpu"))
    shape, out = (1, 3, 2048, 4096), (2048, 4096)
    whole = check.estimate(shape, out)
    slide = check.estimate(shape, out, mode="slide")
    monkeypatch.setenv(MEMORY_ENV, str((slide + whole) / 2 / GIB))
    with pytest.raises(UserError) as info:
        check(shape, out, what="big.png")
    message = str(info.value)
    assert message.startswith("big.png: whole inference of a 1x3x2048x4096 input needs about")
    assert f"{whole / GIB:.1f} GiB" in message and "--eval.mode=slide" in message
    long_side, short_side = map(int, re.search(r"--data\.val\.scale=\[(\d+), (\d+)\]",
                                               message).groups())
    assert check.estimate((1, 3, short_side, long_side), out) <= (slide + whole) / 2
    assert check.estimate((1, 3, short_side + 2, long_side + 4), out) > (slide + whole) / 2
    monkeypatch.setenv(MEMORY_ENV, "inf")
    check(shape, out, what="big.png")  # the escape hatch
    monkeypatch.setenv(MEMORY_ENV, "lots")
    with pytest.raises(UserError, match=MEMORY_ENV):
        check(shape, out, what="big.png")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    cfg = load_experiment(None, TINY + ["--data.val.size=[64, 128]"])
    return write_checkpoint(folder / "best.pt", cfg, tiny_model(cfg, 0), None), cfg


def test_predict_refuses_an_image_too_large_and_its_remedy_works(ckpt, tmp_path, monkeypatch,
                                                                  capsys):
    path, cfg = ckpt
    image = tmp_path / "street.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 256, 3), np.uint8)).save(image)
    model = tiny_model(cfg, 0)
    limit = 0.8 * MemoryCheck(model, cfg, torch.device("cpu")).estimate((1, 3, 128, 256),
                                                                        (128, 256))
    monkeypatch.setenv(MEMORY_ENV, str(limit / GIB))
    out = tmp_path / "out"
    rc = pr.main(["--checkpoint", str(path), str(image), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: {image}: whole inference of a 1x3x128x256 input needs about")
    assert not out.exists()
    scale = re.search(r"--data\.val\.scale=\[\d+, \d+\]", err).group(0)
    rc = pr.main(["--checkpoint", str(path), str(image), "--out", str(out), "--no-progress", scale])
    assert rc == 0, capsys.readouterr().err
    assert (out / "trainIds" / "street_trainIds.png").is_file()


def test_evaluate_refuses_before_the_first_inference(ckpt, tmp_path, monkeypatch, capsys):
    path, _ = ckpt
    monkeypatch.setenv(MEMORY_ENV, str(1e-6))
    calls = []
    monkeypatch.setattr(inference, "predict_probs", lambda *a, **k: calls.append(1))
    rc = ev.main(["--checkpoint", str(path), "--no-progress", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: synthetic") and "GiB available on cpu" in err
    assert calls == [] and not (tmp_path / "o").exists()

"""Every user error of every command line is one line on stderr naming the problem (and the
file) with exit status 2 and no traceback; CLUDA_DEBUG=1 adds the traceback; bugs keep theirs.

The table runs each case through `cluda.errors.run_cli`, which is what the `__main__` blocks
call; `test_entry_points_*` run one case per command line as a real subprocess."""
import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import cluda.data.prepare as prep
import cluda.evaluate as ev
import cluda.predict as pr
import train
from cli_helpers import one_thread  # noqa: F401
from cluda.errors import (CheckpointError, DataError, OutputError, describe, is_user_error,
                          run_cli)
from png16 import write_png16
from test_train import tiny_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W = 32, 64  # MiT needs 32 px or more


def _rgb(rng, h=H, w=W):
    return rng.integers(0, 256, size=(h, w, 3)).astype(np.uint8)


def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 3])


def _cityscapes_val(root, rng):
    """A one-image Cityscapes val split; returns (image path, label path)."""
    img = root / "leftImg8bit" / "val" / "aachen" / "aachen_000000_000000_leftImg8bit.png"
    lab = root / "gtFine" / "val" / "aachen" / "aachen_000000_000000_gtFine_labelIds.png"
    img.parent.mkdir(parents=True)
    lab.parent.mkdir(parents=True)
    Image.fromarray(_rgb(rng)).save(img)
    Image.fromarray(rng.integers(0, 34, (H, W)).astype(np.uint8)).save(lab)
    return img, lab


def _gta(root, rng):
    """A one-image GTA5 tree; returns (image path, label path)."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    Image.fromarray(_rgb(rng)).save(root / "images" / "00001.png")
    Image.fromarray(rng.integers(0, 34, (H, W)).astype(np.uint8)).save(root / "labels" / "00001.png")
    return root / "images" / "00001.png", root / "labels" / "00001.png"


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """A 2-iteration tiny run's checkpoint and a cut copy, data trees with one bad file each, a
    malformed class-statistics file, a 16-bit image holding only 8-bit values."""
    tmp = tmp_path_factory.mktemp("user_errors")
    rng = np.random.default_rng(0)
    train.main(tiny_overrides(tmp / "runs", "--train.max_iters=2", "--experiment.threads=1"))
    ckpt = tmp / "runs" / "run" / "latest.pt"
    cut = tmp / "cut.pt"
    cut.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 3])
    bad_img, _ = _cityscapes_val(tmp / "cs_bad_image", rng)
    _truncate(bad_img)
    _, bad_label = _cityscapes_val(tmp / "cs_bad_label", rng)
    bad_label.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(40))
    gta_img, _ = _gta(tmp / "gta_bad_image", rng)
    _truncate(gta_img)
    _, gta_label = _gta(tmp / "gta_bad_label", rng)
    _truncate(gta_label)
    stats = tmp / "class_stats.json"
    stats.write_text(json.dumps({"format": "cluda-class-stats-v1", "num_classes": 19,
                                 "images": {"a": ["many"] * 19}}))
    good = tmp / "good.png"
    Image.fromarray(_rgb(rng)).save(good)
    low16 = tmp / "low16.png"
    write_png16(str(low16), rng.integers(0, 256, (H, W)).astype(np.uint16))
    a_file = tmp / "a_file"
    a_file.write_text("not a folder")
    return dict(tmp=tmp, ckpt=ckpt, cut=cut, bad_img=bad_img, bad_label=bad_label,
                gta_img=gta_img, gta_label=gta_label, stats=stats, good=good, low16=low16,
                a_file=a_file)


def _train_args(f, tmp_path, *extra):
    return tiny_overrides(tmp_path, "--experiment.threads=1", *extra)


def _no_triton_interpreter(monkeypatch, f):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _disk_full(monkeypatch, f):
    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", fsync)


def _read_only(monkeypatch, f):
    def replace(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), src)
    monkeypatch.setattr(os, "replace", replace)


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")

# (id, main, argv(f, tmp_path), needles(f, tmp_path), setup(monkeypatch, f) or None)
CASES = [
    pytest.param(train.main, lambda f, t: _train_args(f, t) + ["--resume", str(f["cut"])],
                 lambda f, t: [f["cut"], "truncated"], None, id="train-resume-truncated"),
    pytest.param(train.main, lambda f, t: ["--eval-only", str(f["cut"])],
                 lambda f, t: [f["cut"], "truncated"], None, id="train-eval-only-truncated"),
    pytest.param(train.main, lambda f, t: _train_args(f, t, "--experiment.device=cuda"),
                 lambda f, t: ["experiment.device", "no CUDA device"], None,
                 id="train-cuda-without-gpu", marks=NO_GPU),
    pytest.param(train.main, lambda f, t: _train_args(f, t, "--cl.impl=triton"),
                 lambda f, t: ["cl.impl 'triton'", "TRITON_INTERPRET"], _no_triton_interpreter,
                 id="train-triton-on-cpu", marks=NO_GPU),
    pytest.param(train.main, lambda f, t: _train_args(f, t, f"--data.class_stats={f['stats']}"),
                 lambda f, t: [f["stats"], "non-negative ints"], None, id="train-class-stats"),
    pytest.param(train.main, lambda f, t: _train_args(f, t, "--eval.scales=[-1.0]"),
                 lambda f, t: ["eval.scales"], None, id="train-negative-scale"),
    pytest.param(train.main,
                 lambda f, t: _train_args(f, t, "--data.source.kind=gta", "--data.rcs=false",
                                          f"--data.source.root={f['gta_img'].parent.parent}",
                                          "--data.workers=1", "--train.max_iters=1"),
                 lambda f, t: [f["gta_img"], "cannot read image"], None,
                 id="train-unreadable-image-in-a-worker"),
    pytest.param(train.main,
                 lambda f, t: ["--eval-only", str(f["ckpt"]), "--data.val.kind=cityscapes",
                               f"--data.val.root={f['bad_img'].parents[3]}"],
                 lambda f, t: [f["bad_img"]], None, id="train-eval-only-unreadable-val-image"),
    pytest.param(train.main,
                 lambda f, t: _train_args(f, t) + [f"--experiment.work_dir={f['a_file']}/sub"],
                 lambda f, t: [f["a_file"]], None, id="train-work-dir-under-a-file"),
    pytest.param(train.main, lambda f, t: _train_args(f, t),
                 lambda f, t: ["cannot write", t, "No space left on device"], _disk_full,
                 id="train-disk-full"),
    pytest.param(ev.main, lambda f, t: ["--checkpoint", str(f["ckpt"]), "--scales", "-1",
                                        "--no-progress"],
                 lambda f, t: ["eval.scales", "-1"], None, id="evaluate-negative-scale"),
    pytest.param(ev.main, lambda f, t: ["--checkpoint", str(f["ckpt"]), "--no-progress",
                                        "--data.val.kind=cityscapes",
                                        f"--data.val.root={f['bad_label'].parents[3]}"],
                 lambda f, t: [f["bad_label"], "cannot read label"], None,
                 id="evaluate-corrupt-label"),
    pytest.param(ev.main, lambda f, t: ["--checkpoint", str(f["ckpt"]), "--no-progress",
                                        "--out", str(t / "out")],
                 lambda f, t: ["cannot write", t / "out" / "eval_latest", "Read-only file system"],
                 _read_only, id="evaluate-read-only-disk"),
    pytest.param(ev.main, lambda f, t: ["--checkpoint", str(f["ckpt"]), "--device", "cuda"],
                 lambda f, t: ["experiment.device"], None, id="evaluate-cuda-without-gpu",
                 marks=NO_GPU),
    pytest.param(pr.main, lambda f, t: ["--checkpoint", str(f["ckpt"]), str(f["low16"]),
                                        "--out", str(t / "preds")],
                 lambda f, t: [f["low16"], "16-bit"], None, id="predict-ambiguous-16bit"),
    pytest.param(pr.main, lambda f, t: ["--checkpoint", str(f["ckpt"]), str(f["good"]),
                                        "--out", str(t / "preds"), "--eval.scales=[0]"],
                 lambda f, t: ["eval.scales"], None, id="predict-zero-scale"),
    pytest.param(prep.main, lambda f, t: ["gta", str(f["gta_label"].parent.parent),
                                          "--workers", "0"],
                 lambda f, t: [f["gta_label"], "cannot read label"], None,
                 id="prepare-truncated-label"),
]


def check_one_line(rc, err, needles):
    """Exit status 2; the last stderr line is the only 'error:' line and holds every needle;
    no traceback (a progress bar or a warning may come before it)."""
    assert rc == 2, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error: ") for line in lines) == 1, err
    assert "Traceback" not in err, err
    for needle in needles:
        assert str(needle) in lines[-1], (needle, lines[-1])


@pytest.mark.parametrize("main, argv, needles, setup", CASES)
def test_user_error_is_one_line_and_exit_status_2(fx, tmp_path, monkeypatch, capsys, main, argv,
                                                  needles, setup):
    monkeypatch.delenv("CLUDA_DEBUG", raising=False)
    args = [str(a) for a in argv(fx, tmp_path)]
    if setup is not None:
        setup(monkeypatch, fx)
    rc = run_cli(main, args)
    monkeypatch.undo()
    check_one_line(rc, capsys.readouterr().err, needles(fx, tmp_path))


# cluda.evaluate's entry point: test_debug_switch_shows_the_traceback_and_keeps_status_2.
ENTRY_POINTS = [
    pytest.param([sys.executable, "train.py"], lambda f, t: ["--resume", str(f["cut"])] + [
        a for a in tiny_overrides(t)], lambda f: [f["cut"], "truncated"], id="train.py",
        marks=pytest.mark.slow),
    pytest.param([sys.executable, "-m", "cluda.predict"],
                 lambda f, t: ["--checkpoint", str(f["ckpt"]), str(f["low16"]), "--out",
                               str(t / "preds")], lambda f: [f["low16"]], id="cluda.predict"),
    pytest.param([sys.executable, "-m", "cluda.data.prepare"],
                 lambda f, t: ["gta", str(f["gta_label"].parent.parent), "--workers", "0"],
                 lambda f: [f["gta_label"]], id="cluda.data.prepare"),
]


def _run(command, env_extra=None):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("CLUDA_DEBUG", None)
    env.update(env_extra or {})
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("prefix, argv, needles", ENTRY_POINTS)
def test_entry_points_report_a_user_error_in_one_line(fx, tmp_path, prefix, argv, needles):
    proc = _run(prefix + argv(fx, tmp_path))
    check_one_line(proc.returncode, proc.stderr, needles(fx))


def test_debug_switch_shows_the_traceback_and_keeps_status_2(fx, tmp_path):
    proc = _run([sys.executable, "-m", "cluda.evaluate", "--checkpoint", str(fx["cut"])],
                {"CLUDA_DEBUG": "1"})
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr and "CheckpointError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: cannot read checkpoint {fx['cut']}")


def test_help_documents_exit_status_and_debug_switch(capsys):
    for main, argv in ((train.main, ["--help"]), (ev.main, ["--help"]), (pr.main, ["--help"]),
                       (pr.main, ["compare", "--help"]), (prep.main, ["--help"])):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "exit status: 0" in text and "CLUDA_DEBUG=1" in text, argv


def test_bugs_keep_their_traceback_and_user_errors_are_classified(capsys):
    def buggy(argv):
        raise ValueError("operands could not be broadcast")  # a plain ValueError is a bug

    with pytest.raises(ValueError, match="broadcast"):
        run_cli(buggy)
    for err in (DataError("x"), CheckpointError("x"), OutputError("/o/f.pt", OSError(28, "full")),
                FileNotFoundError("x"), OSError(errno.ENOSPC, "No space left on device"),
                OSError(errno.EROFS, "Read-only file system"), MemoryError()):
        assert is_user_error(err), err
    for err in (ValueError("x"), RuntimeError("x"), TypeError("x"), KeyError("x"),
                OSError(errno.EBADF, "Bad file descriptor")):
        assert not is_user_error(err), err
    # A DataLoader worker's error comes back with the worker's traceback as its message.
    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback "
                        "(most recent call last):\n  File \"x.py\", line 1, in f\n    g()\n"
                        "cluda.errors.DataError: cannot read image /d/a.png: truncated")
    assert describe(wrapped) == "cannot read image /d/a.png: truncated"
    assert describe(OSError(errno.EACCES, "Permission denied", "/o/log.csv")) == \
        "Permission denied: /o/log.csv"
    assert str(OutputError("/o/f.pt", OSError(28, "No space left on device"))) == \
        "cannot write /o/f.pt: No space left on device"
    assert run_cli(lambda argv: {"a": 1}) == 0 and run_cli(lambda argv: 3) == 3
    capsys.readouterr()

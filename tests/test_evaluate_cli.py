"""Tests for the evaluation command line (`python -m cluda.evaluate`): end to end on the synthetic
pair with a tiny checkpoint written the way train.py writes one, numbers equal to
`cluda.evaluate.evaluate` on the same network, flags as config overrides, and every kind of bad
input (a clear one-line error, exit status 2, nothing written)."""
import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

import cluda.evaluate as ev
import cluda.inference as inference
from cli_helpers import TINY, check_error, one_thread, tiny_model, write_checkpoint  # noqa: F401
from cluda.build import build_model, build_val_dataset
from cluda.checkpoint import save_checkpoint
from cluda.config import load_experiment, to_dict as config_to_dict
from cluda.data.labels import CLASS_NAMES, PROTOCOLS
from cluda.inference import evaluate, make_predict_fn
from cluda.metrics import format_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(extra=()):
    return load_experiment(None, TINY + list(extra))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):  # after the autouse one_thread (same scope)
    folder = tmp_path_factory.mktemp("ckpt")
    cfg = tiny_config()
    student, teacher = tiny_model(cfg, 0), tiny_model(cfg, 1)
    path = write_checkpoint(folder / "best.pt", cfg, student, teacher)
    return {"cfg": cfg, "student": student, "teacher": teacher, "path": path}


def direct(model, cfg, protocols=(19,)):
    """`cluda.evaluate.evaluate` called directly on the network, as the reference."""
    return evaluate(make_predict_fn(model, cfg), build_val_dataset(cfg),
                    num_classes=cfg.model.num_classes, protocols=protocols, flip=cfg.eval.flip,
                    scales=cfg.eval.scales, progress=False)


def files_in(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def same(a, b):
    return (a is None and math.isnan(b)) or a == b


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------

def test_cli_equals_direct_evaluation_for_every_protocol(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    rc = ev.main(["--checkpoint", str(tiny["path"]), "--out", str(out), "--protocols", "19", "16",
                  "13", "--no-progress"])
    assert rc == 0
    ref = direct(tiny["student"], tiny["cfg"], protocols=(19, 16, 13))
    assert files_in(out) == ["eval_best.json", "eval_best_13.csv", "eval_best_13.md",
                             "eval_best_16.csv", "eval_best_16.md", "eval_best_19.csv",
                             "eval_best_19.md"]
    summary = json.loads((out / "eval_best.json").read_text())
    assert summary["confusion_matrix"] == ref["matrix"].tolist()
    assert summary["num_images"] == 3 and summary["iteration"] == 150
    assert summary["weights"] == "student"
    # The network predicts several classes, so equal numbers mean the same weights were used.
    assert (ref["matrix"].sum(dim=0) > 0).sum() >= 4
    printed = capsys.readouterr().out
    for p in (19, 16, 13):
        m, got = ref["metrics"][p], summary["metrics"][str(p)]
        assert got["mIoU"] == m["mIoU"] and got["mAcc"] == m["mAcc"] and got["aAcc"] == m["aAcc"]
        assert all(same(got["iou"][n], m["iou"][n]) for n in m["iou"])
        assert format_table(m) in printed
        assert format_table(m) in (out / f"eval_best_{p}.md").read_text()
        with open(out / f"eval_best_{p}.csv", newline="") as f:
            header, row = list(csv.reader(f))
        # Table 1's column order, the protocol's classes only, then mIoU.
        assert header == [CLASS_NAMES[c] for c in sorted(PROTOCOLS[p])] + ["mIoU"]
        expected = ["n/a" if math.isnan(m["iou"][n]) else f"{100 * m['iou'][n]:.2f}"
                    for n in header[:-1]] + [f"{100 * m['mIoU']:.2f}"]
        assert row == expected
    assert f"mIoU {100 * ref['metrics'][19]['mIoU']:.2f} (19 classes)" in printed


def test_cli_teacher_weights(tiny, tmp_path):
    rc = ev.main(["--checkpoint", str(tiny["path"]), "--weights", "teacher", "--out",
                  str(tmp_path), "--no-progress"])
    assert rc == 0
    summary = json.loads((tmp_path / "eval_best_teacher.json").read_text())
    teacher = direct(tiny["teacher"], tiny["cfg"])["matrix"]
    student = direct(tiny["student"], tiny["cfg"])["matrix"]
    assert not torch.equal(teacher, student)
    assert summary["confusion_matrix"] == teacher.tolist() and summary["weights"] == "teacher"
    # One protocol: the plain names, as train.py --eval-only writes them.
    assert files_in(tmp_path) == ["eval_best_teacher.csv", "eval_best_teacher.json",
                                  "eval_best_teacher.md"]


def test_cli_flags_are_config_overrides(tiny, tmp_path):
    rc = ev.main(["--checkpoint", str(tiny["path"]), "--out", str(tmp_path), "--no-progress",
                  "--flip", "--scales", "0.75", "1.0", "--mode", "slide", "--split", "train",
                  "--eval.crop_size=[48, 48]", "--eval.stride=[32, 40]", "--device", "cpu"])
    assert rc == 0
    cfg = tiny_config(["--eval.flip=true", "--eval.scales=[0.75, 1.0]", "--eval.mode=slide",
                       "--data.val.split=train", "--eval.crop_size=[48, 48]",
                       "--eval.stride=[32, 40]"])
    ref = direct(tiny["student"], cfg)
    # A different split and test-time augmentation change the numbers.
    assert not torch.equal(ref["matrix"], direct(tiny["student"], tiny["cfg"])["matrix"])
    summary = json.loads((tmp_path / "eval_best_train.json").read_text())
    assert summary["confusion_matrix"] == ref["matrix"].tolist()
    assert summary["eval"]["flip"] is True and summary["eval"]["scales"] == [0.75, 1.0]
    assert summary["eval"]["mode"] == "slide" and summary["data"]["split"] == "train"
    md = (tmp_path / "eval_best_train.md").read_text()
    assert "slide (window [48, 48], stride [32, 40])" in md and "flip on" in md


def test_cli_config_file_that_fits_the_weights(tiny, tmp_path):
    data = config_to_dict(tiny_config(["--data.val.num_samples=2", "--model.dropout=0.3"]))
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(data))
    rc = ev.main(["--checkpoint", str(tiny["path"]), "--config", str(config), "--out",
                  str(tmp_path / "out"), "--no-progress"])
    assert rc == 0
    summary = json.loads((tmp_path / "out" / "eval_best.json").read_text())
    # The config's validation set (2 scenes), the checkpoint's weights.
    ref = direct(tiny["student"], tiny_config(["--data.val.num_samples=2"]))
    assert summary["num_images"] == 2 and summary["confusion_matrix"] == ref["matrix"].tolist()


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

def test_cli_config_that_does_not_fit_names_the_keys(tiny, tmp_path, capsys):
    config = tmp_path / "wide.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(tiny_config(["--model.channels=24"]))))
    out = tmp_path / "out"
    rc = ev.main(["--checkpoint", str(tiny["path"]), "--config", str(config), "--out", str(out)])
    check_error(rc, capsys.readouterr().err, tiny["path"], "decoder.classifier.weight",
                f"config {config} differs", "model.channels: 24 here, 16 in the checkpoint")
    assert files_in(out) == []


def _variant(tiny, folder, kind):
    """A bad checkpoint of one kind; returns (path, words the error must contain)."""
    cfg, student = tiny["cfg"], tiny["student"]
    path = folder / f"{kind}.pt"
    if kind == "missing":
        return path, [path, "not found"]
    if kind == "truncated":
        raw = tiny["path"].read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
        return path, [path, "truncated"]
    if kind == "foreign":
        torch.save({"state_dict": student.state_dict()}, path)
        return path, [path, "not a cluda training checkpoint"]
    if kind == "architecture":  # weights of an HRDA network under a plain DAFormer config
        return write_checkpoint(path, cfg, student, None, config_dict=config_to_dict(
            tiny_config(["--model.hrda.enabled=true", "--data.crop_size=[512, 512]"]))), \
            [path, "missing key(s): segmentor.encoder", "unexpected key(s): encoder."]
    if kind == "class-count-config":
        data = config_to_dict(cfg)
        data["model"]["num_classes"] = 16
        return write_checkpoint(path, cfg, student, None, config_dict=data), \
            [path, "model.num_classes"]
    if kind == "class-count-weights":
        state = dict(student.state_dict())
        state["decoder.classifier.weight"] = state["decoder.classifier.weight"][:16].clone()
        state["decoder.classifier.bias"] = state["decoder.classifier.bias"][:16].clone()
        save_checkpoint(path, {"config": config_to_dict(cfg), "iteration": 3, "student": state})
        return path, [path, "decoder.classifier.weight: checkpoint (16, 16, 1, 1) vs model (19, 16, 1, 1)"]
    if kind == "wider-decoder":
        wide = build_model(tiny_config(["--model.channels=24"]))
        return write_checkpoint(path, cfg, wide, None), \
            [path, "shape mismatch", "decoder.fuse.bottleneck.0.weight"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "truncated", "foreign", "architecture",
                                  "class-count-config", "class-count-weights", "wider-decoder"])
def test_cli_bad_checkpoint(tiny, tmp_path, capsys, kind):
    path, needles = _variant(tiny, tmp_path, kind)
    out = tmp_path / "out"
    rc = ev.main(["--checkpoint", str(path), "--out", str(out), "--no-progress"])
    check_error(rc, capsys.readouterr().err, *needles)
    assert files_in(out) == []


def test_cli_source_only_checkpoint_has_no_teacher(tiny, tmp_path, capsys):
    path = write_checkpoint(tmp_path / "src.pt", tiny["cfg"], tiny["student"], None)
    rc = ev.main(["--checkpoint", str(path), "--weights", "teacher", "--out", str(tmp_path / "o")])
    check_error(rc, capsys.readouterr().err, path, "holds no teacher weights")
    assert files_in(tmp_path / "o") == []


def test_cli_bad_arguments(tiny, tmp_path, capsys):
    ck = str(tiny["path"])
    rc = ev.main(["--checkpoint", ck, "--out", str(tmp_path), "--model.chanels=8"])
    check_error(rc, capsys.readouterr().err, "model.chanels", "known keys of model", "channels")
    rc = ev.main(["--checkpoint", ck, "--out", str(tmp_path), "--split", "train",
                  "--data.val.kind=gta", "--data.val.root=/nowhere"])
    check_error(rc, capsys.readouterr().err, "gta data sets have no splits")
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    rc = ev.main(["--checkpoint", ck, "--out", str(not_a_folder)])
    check_error(rc, capsys.readouterr().err, not_a_folder, "not a folder")
    if not torch.cuda.is_available():
        rc = ev.main(["--checkpoint", ck, "--out", str(tmp_path), "--device", "cuda"])
        check_error(rc, capsys.readouterr().err, "no CUDA device")
    # Not an override: a usage error from argparse (also exit status 2).
    with pytest.raises(SystemExit) as exc:
        ev.main(["--checkpoint", ck, "stray"])
    assert exc.value.code == 2 and "stray" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # an override needs its "="
        ev.main(["--checkpoint", ck, "--eval.mode", "slide"])
    assert exc.value.code == 2 and "--section.key=value" in capsys.readouterr().err
    assert files_in(tmp_path) == ["file.txt"]


def test_cli_failure_midway_writes_nothing(tiny, tmp_path, monkeypatch):
    calls = []
    real = inference.predict_probs

    def fail_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated failure on image 2")
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "predict_probs", fail_on_second)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="image 2"):
        ev.main(["--checkpoint", str(tiny["path"]), "--out", str(out), "--no-progress"])
    assert len(calls) == 2 and files_in(out) == []


# --------------------------------------------------------------------------------------------
# The real entry point
# --------------------------------------------------------------------------------------------

def _run(*args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "cluda.evaluate", *map(str, args)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def test_python_m_entry_point(tiny, tmp_path):
    out = tmp_path / "out"
    proc = _run("--checkpoint", tiny["path"], "--out", out, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    ref = direct(tiny["student"], tiny["cfg"])["metrics"][19]
    assert f"mIoU {100 * ref['mIoU']:.2f} (19 classes)" in proc.stdout
    assert files_in(out) == ["eval_best.csv", "eval_best.json", "eval_best.md"]
    proc = _run("--checkpoint", tmp_path / "nothing.pt", "--out", tmp_path / "none")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: checkpoint not found: {tmp_path / 'nothing.pt'}"
    assert not (tmp_path / "none").exists()

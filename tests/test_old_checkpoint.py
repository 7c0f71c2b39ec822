"""A checkpoint written by an earlier version still works everywhere a checkpoint is read:
`train.py --resume`, `train.py --eval-only`, `python -m cluda.evaluate` and `python -m
cluda.predict`.

tests/data/checkpoint_9dca368.pt was written by train.py at commit 9dca368 (40 iterations of
DAFormer + CLUDA self-training on the synthetic pair, timm's `test_efficientnet` encoder with an
8-channel decoder, so the file stays small):

    python train.py --experiment.device=cpu --experiment.threads=1 --experiment.seed=3 \\
      --experiment.name=tiny --model.backbone=test_efficientnet --model.channels=8 \\
      --model.embed_dim=8 --model.aspp_channels=8 --model.drop_path_rate=0.0 \\
      --data.{source,target,val}.size=[32,64] --data.{source,target,val}.scale=null \\
      --data.source.num_samples=40 --data.target.num_samples=8 --data.val.num_samples=4 \\
      --data.crop_size=[32,64] --data.rcs_min_pixels=20 --data.batch_size=2 --data.workers=0 \\
      --uda.start_iter=1 --uda.ema_alpha=0.99 --uda.pseudo_threshold=0.06 --uda.ignore_top=2 \\
      --uda.ignore_bottom=4 --uda.fd=false --cl.impl=torch --optim.lr=0.004 \\
      --optim.warmup_iters=2 --train.max_iters=40 --train.log_interval=10 \\
      --train.eval_interval=40 --train.checkpoint_interval=40 --train.tensorboard=false \\
      --eval.batch_size=2 --eval.workers=0

Beside it: `.eval.csv`, the evaluation that run wrote at iteration 40, and `.resumed_log.csv`,
the log.csv row of a resume of it to iteration 42 at the same commit. The numbers here must
equal those.
"""
import csv
import shutil
from pathlib import Path

import pytest

import cluda.evaluate as ev
import cluda.predict as pr
import train
from cli_helpers import one_thread  # noqa: F401
from cluda.checkpoint import load_checkpoint
from cluda.config import save_yaml

DATA = Path(__file__).parent / "data"
CHECKPOINT = DATA / "checkpoint_9dca368.pt"


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def ckpt(tmp_path):
    """A copy, so that the outputs written beside it land in tmp_path."""
    path = tmp_path / "ckpt" / "latest.pt"
    path.parent.mkdir()
    shutil.copy(CHECKPOINT, path)
    return path


def recorded_miou():
    return float(read_csv(DATA / "checkpoint_9dca368.eval.csv")[-1]["mIoU19"])


def test_resume_continues_as_the_writing_version_did(tmp_path, ckpt):
    config = tmp_path / "config.yaml"
    save_yaml(load_checkpoint(ckpt)["config"], str(config))
    result = train.main([str(config), "--resume", str(ckpt), "--train.max_iters=42",
                         f"--experiment.work_dir={tmp_path / 'runs'}"])
    assert result["iteration"] == 42
    row = read_csv(tmp_path / "runs" / "tiny" / "log.csv")[-1]
    expected = read_csv(DATA / "checkpoint_9dca368.resumed_log.csv")[-1]
    assert row["iteration"] == "42"
    for key in ("src.ce", "src.cl", "mix.ce", "mix.cl", "loss", "gamma", "pasted", "lr"):
        assert float(row[key]) == pytest.approx(float(expected[key]), rel=1e-5), key
    assert load_checkpoint(tmp_path / "runs" / "tiny" / "latest.pt")["iteration"] == 42


def test_eval_only_gives_the_recorded_evaluation(ckpt, capsys):
    result = train.main(["--eval-only", str(ckpt)])
    assert result["metrics"][19]["mIoU"] == pytest.approx(recorded_miou(), abs=1e-9)
    assert (ckpt.parent / "eval_latest.md").is_file() and (ckpt.parent / "eval_latest.csv").is_file()


def test_evaluate_command_gives_the_recorded_evaluation(ckpt, tmp_path):
    assert ev.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    row = read_csv(tmp_path / "out" / "eval_latest.csv")[0]
    assert float(row["mIoU"]) == pytest.approx(100 * recorded_miou(), abs=0.005)
    # the teacher is in the file too
    assert ev.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--no-progress",
                    "--weights", "teacher"]) == 0


def test_predict_command_writes_every_output(ckpt, tmp_path):
    from cluda.data.synthetic import make_scene
    from PIL import Image

    image = tmp_path / "street.png"
    Image.fromarray(make_scene(0, height=48, width=80, domain="target")[0]).save(image)
    assert pr.main(["--checkpoint", str(ckpt), str(image), "--out", str(tmp_path / "preds"),
                    "--no-progress"]) == 0
    for kind in ("color", "overlay", "trainIds", "labelIds"):
        written = tmp_path / "preds" / kind / f"street_{kind}.png"
        assert Image.open(written).size == (80, 48), kind

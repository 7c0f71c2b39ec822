"""Shared by the evaluation and prediction command-line tests (tests/test_evaluate_cli.py,
tests/test_predict_cli.py): a tiny network, checkpoints written as train.py writes them, the
error-line check, and the one-thread fixture. Not a test module (no test_ prefix)."""
import random

import pytest
import torch

from cluda.build import build_model
from cluda.checkpoint import save_checkpoint
from cluda.config import to_dict as config_to_dict

# A MiT-B0 with a narrow decoder on three 64 x 96 synthetic validation scenes: ~0.7 s to build.
TINY = ["--model.backbone=mit_b0", "--model.channels=16", "--model.embed_dim=16",
        "--model.aspp_channels=8", "--data.val.num_samples=3", "--data.val.size=[64, 96]",
        "--eval.batch_size=1", "--eval.workers=0", "--experiment.device=cpu"]


def tiny_model(cfg, seed):
    """A randomly initialised network whose classifier is widened so that its predictions
    spread over many classes (a fresh one predicts one or two classes everywhere, which would
    make equal numbers a weak check)."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        model.decoder.classifier.weight.normal_(0.0, 3.0)
        model.decoder.classifier.bias.zero_()
    return model.eval()


def write_checkpoint(path, cfg, student, teacher, *, config_dict=None):
    """The keys train.py's `checkpoint()` writes (config, iteration, student, teacher,
    optimizer, scheduler, rng, best), through the same atomic `save_checkpoint`."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    save_checkpoint(path, {
        "config": config_dict if config_dict is not None else config_to_dict(cfg),
        "iteration": 150, "student": student.state_dict(),
        "teacher": None if teacher is None else teacher.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": []},
        "best": {"mIoU19": 0.25, "iteration": 150}})
    return path


def check_error(rc, err, *needles):
    """Exit status 2, one line on stderr starting with 'error:', holding every needle."""
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread (autouse in each module that imports it): on the shared 2-core test
    machine, two threads made the first pass of each new input shape take seconds instead of
    milliseconds (measured, load ~6)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""HRDA's pseudo-label margins (`data.target_pseudo_margins`): marked on the whole target image,
cropped and flipped with it, carried by the sample as `pseudo_valid`, passed by `train.train_step`
to the step, where they zero the pseudo-label weights (Gamma still counts every pixel)."""
import numpy as np
import pytest
import torch

import train
from cluda.config import load_experiment
from cluda.data.transforms import margin_mask, SegTransform
from cluda.uda import StepResult, UDAStep


def test_margin_mask_marks_the_border_only():
    valid = margin_mask(6, 9, (1, 2, 3, 0))
    expected = np.ones((6, 9), np.uint8)
    expected[:1], expected[-2:], expected[:, :3] = 0, 0, 0
    assert np.array_equal(valid, expected)
    assert margin_mask(3, 4, (0, 0, 0, 0)).all()


def test_transform_crops_and_flips_the_margins_with_the_image():
    """The image's columns carry their own index, so a crop's position and flip can be read off
    the output and the margin map checked against it."""
    h, w = 12, 30
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.arange(w, dtype=np.uint8)[None, :] * 8  # column index, recoverable
    label = np.zeros((h, w), np.uint8)
    t = SegTransform(crop_size=(12, 10), flip_prob=0.5, pseudo_margins=(2, 3, 4, 5))
    plain = SegTransform(crop_size=(12, 10), flip_prob=0.5)
    flips = set()
    for seed in range(40):
        out = t.sample(img, label, np.random.default_rng(seed))
        red = out["img"][0, 0].numpy() * 58.395 + 123.675  # denormalised red channel
        cols = np.rint(red / 8).astype(int)  # source column of each output column
        flips.add(bool(cols[0] > cols[-1]))
        expected_row = ((cols >= 4) & (cols < w - 5)).astype(np.uint8)
        valid = out["pseudo_valid"].numpy()
        assert (valid[:2] == 0).all() and (valid[-3:] == 0).all()
        assert np.array_equal(valid[5], expected_row)
        # The margins change no random draw.
        again = plain.sample(img, label, np.random.default_rng(seed))
        assert torch.equal(again["img"], out["img"]) and "pseudo_valid" not in again
    assert flips == {True, False}


def test_padding_counts_as_valid():
    img = np.zeros((6, 8, 3), np.uint8)
    out = SegTransform(crop_size=(10, 10), pseudo_margins=(1, 1, 1, 1)).sample(
        img, np.zeros((6, 8), np.uint8), np.random.default_rng(0))
    valid = out["pseudo_valid"].numpy()
    assert valid.shape == (10, 10) and (valid[6:] == 1).all() and (valid[:, 8:] == 1).all()
    assert valid[0, 3] == 0 and valid[5, 3] == 0 and valid[3, 0] == 0 and valid[3, 7] == 0
    with pytest.raises(ValueError, match="pseudo_margins"):
        SegTransform(pseudo_margins=(1, 2))


class _Teacher(torch.nn.Module):
    """Confident everywhere: Gamma = 1."""

    def inference(self, img, mode="whole"):
        logits = torch.zeros(img.shape[0], 19, *img.shape[-2:])
        logits[:, 3] = 30.0
        return logits


def test_step_zeroes_the_weights_where_not_valid():
    step = UDAStep(contrastive=None)
    tgt = torch.randn(2, 3, 8, 8)
    valid = torch.ones(2, 8, 8, dtype=torch.uint8)
    valid[0, :, :3] = 0
    pl, _ = step.pseudo_labels(_Teacher(), tgt, valid=valid)
    assert pl.gamma.item() == 1.0  # counted over every pixel, margins included
    assert (pl.weights[0, :, :3] == 0).all() and (pl.weights[0, :, 3:] == 1).all()
    assert (pl.weights[1] == 1).all()
    with pytest.raises(AssertionError):  # an internal shape check: the data pipeline builds `valid`
        step.pseudo_labels(_Teacher(), tgt, valid=valid[:, :4])


def test_train_step_hands_the_margins_to_the_step():
    cfg = load_experiment(None, ["--experiment.device=cpu"])
    seen = {}

    class Recorder(UDAStep):
        def __call__(self, net, teacher, src, lab, tgt, *, it, rank=0, imnet=None, target_valid=None):
            seen["valid"] = target_valid
            return StepResult({"src.ce": (net.weight ** 2).sum()}, {})

    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0)
    valid = torch.zeros(2, 4, 4, dtype=torch.uint8)
    batch = {"source": {"img": torch.zeros(2, 3, 4, 4), "label": torch.zeros(2, 4, 4, dtype=torch.long)},
             "target": {"img": torch.zeros(2, 3, 4, 4), "pseudo_valid": valid}}
    step = Recorder(self_training=False, contrastive=None)
    train.train_step(it=0, batch=batch, net=net, student=net, teacher=None, imnet=None, step=step,
                     optimizer=opt, scheduler=sched, cfg=cfg, device=torch.device("cpu"))
    assert torch.equal(seen["valid"], valid)
    del batch["target"]["pseudo_valid"]
    train.train_step(it=1, batch=batch, net=net, student=net, teacher=None, imnet=None, step=step,
                     optimizer=opt, scheduler=sched, cfg=cfg, device=torch.device("cpu"))
    assert seen["valid"] is None

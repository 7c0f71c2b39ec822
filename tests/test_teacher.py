"""Tests of cluda.teacher: the EMA update and its warm-up, the frozen copy, Gamma and the margins."""
import pytest
import torch
from torch import nn

from cluda.teacher import ema_alpha, ema_update, make_teacher, pseudo_label


def _net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def test_make_teacher_is_a_frozen_independent_copy():
    student = _net(0).train()
    teacher = make_teacher(student)
    assert not teacher.training and student.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    x = torch.randn(2, 3, 6, 6)
    student.eval()
    torch.testing.assert_close(teacher(x), student(x))
    with torch.no_grad():
        student[0].weight.add_(1.0)
    assert not torch.allclose(teacher[0].weight, student[0].weight)


def test_ema_update_parameters_and_buffers():
    student, teacher = _net(1), make_teacher(_net(2))
    with torch.no_grad():  # BN's affine parameters start at 1 / 0 in both nets
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.train()
    student(torch.randn(4, 3, 6, 6))  # moves BN running stats, num_batches_tracked = 1
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    s = {k: v.clone() for k, v in student.state_dict().items()}
    alpha = 0.9
    ema_update(teacher, student, alpha)
    after = teacher.state_dict()
    for k in t0:
        if t0[k].is_floating_point():
            torch.testing.assert_close(after[k], alpha * t0[k] + (1 - alpha) * s[k])
            assert not torch.allclose(after[k], t0[k])
        else:
            assert torch.equal(after[k], s[k]), f"{k} (integer buffer) must be copied"
    assert int(after["1.num_batches_tracked"]) == 1
    # The student is not touched, and alpha = 0 copies it.
    assert all(torch.equal(v, s[k]) for k, v in student.state_dict().items())
    ema_update(teacher, student, 0.0)
    assert all(torch.equal(teacher.state_dict()[k], s[k]) for k in s)


def test_ema_update_rejects_mismatched_models():
    with pytest.raises(AssertionError, match="different parameters"):
        ema_update(_net(0), nn.Linear(3, 3), 0.5)
    other = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 2, 1))
    with pytest.raises(AssertionError, match="shape"):
        ema_update(_net(0), other, 0.5)
    with pytest.raises(AssertionError, match="alpha"):
        ema_update(_net(0), _net(1), 1.5)


def test_ema_alpha_warm_up():
    assert ema_alpha(0) == 0.0
    assert ema_alpha(1) == pytest.approx(0.5)
    assert ema_alpha(9) == pytest.approx(0.9)
    assert ema_alpha(998) == pytest.approx(1 - 1 / 999)
    assert ema_alpha(999) == pytest.approx(0.999)
    assert ema_alpha(10_000) == 0.999
    assert ema_alpha(200, alpha=0.99) == 0.99
    assert ema_alpha(50, alpha=0.99) == pytest.approx(1 - 1 / 51)
    with pytest.raises(AssertionError):
        ema_alpha(-1)


def test_pseudo_label_gamma_and_margins_hand_example():
    # 2 images of 4 x 3 pixels, 3 classes. A pixel is confident when its winning logit leads by 5
    # (softmax 1 / (1 + 2 e^-5) = 0.9867 > 0.968) and not when it leads by 3 (0.9094).
    gen = torch.Generator().manual_seed(3)
    winners = torch.randint(0, 3, (2, 4, 3), generator=gen)
    confident = torch.zeros(2, 4, 3, dtype=torch.bool)
    confident[0, 0, :] = True
    confident[0, 2, 1] = True
    confident[1, 3, 2] = True
    lead = torch.where(confident, 5.0, 3.0)
    logits = torch.randn(2, 1, 4, 3, generator=gen).repeat(1, 3, 1, 1)
    logits = logits + lead[:, None] * torch.nn.functional.one_hot(winners, 3).permute(0, 3, 1, 2)
    out = pseudo_label(logits, threshold=0.968, ignore_top=1, ignore_bottom=1)
    assert torch.equal(out.labels, winners)
    gamma = 5 / 24  # 5 confident pixels of 24, over the whole batch
    assert out.gamma.item() == pytest.approx(gamma)
    expected = torch.full((2, 4, 3), gamma)
    expected[:, 0] = 0
    expected[:, -1] = 0
    torch.testing.assert_close(out.weights, expected)
    plain = pseudo_label(logits)
    torch.testing.assert_close(plain.weights, torch.full((2, 4, 3), gamma))
    # A lower threshold counts every pixel.
    assert pseudo_label(logits, threshold=0.9).gamma.item() == pytest.approx(1.0)
    with pytest.raises(AssertionError, match="B, K, H, W"):
        pseudo_label(logits[0])

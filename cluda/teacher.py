"""The mean teacher of DACS / DAFormer self-training and its pseudo-labels.

- The teacher is a plain copy of the student updated by an exponential moving average
  (Tarvainen & Valpola, "Mean teachers", 2017; DAFormer, Hoyer et al. 2022, Sec. 3.1):
  theta_teacher <- alpha_t * theta_teacher + (1 - alpha_t) * theta_student with DAFormer's warm-up
  alpha_t = min(1 - 1 / (t + 1), alpha).
- Pseudo-labels (DACS, Tranheden et al. 2021; DAFormer Eq. 4-5; CLUDA Eq. 4-5): the teacher's
  argmax on the target image, weighted by the confidence Gamma = the fraction of pixels whose
  max-softmax exceeds beta (0.968), with rows at the top / bottom of the image (ego car, sky
  artefacts in GTA -> Cityscapes) given weight 0.
"""
from copy import deepcopy
from typing import NamedTuple

import torch
from torch import nn


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of `student` in eval mode, to be updated only by `ema_update`.

    Args:
        student: the network being trained (unwrapped, not a DistributedDataParallel wrapper).
    """
    teacher = deepcopy(student).requires_grad_(False)
    return teacher.eval()


def ema_alpha(it: int, alpha: float = 0.999) -> float:
    """DAFormer's warm-up of the EMA coefficient: min(1 - 1 / (it + 1), alpha).

    At it = 0 this is 0, so the first update copies the student; it approaches `alpha` after
    about 1 / (1 - alpha) iterations.

    Args:
        it: the training iteration (0-based).
        alpha: the final EMA coefficient, in [0, 1].
    """
    assert it >= 0 and 0.0 <= alpha <= 1.0, (it, alpha)
    return min(1.0 - 1.0 / (it + 1), alpha)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """In place: teacher = alpha * teacher + (1 - alpha) * student.

    Applied to every parameter and every floating-point buffer (BatchNorm running mean / var);
    integer buffers (BatchNorm's `num_batches_tracked`) are copied from the student. Parameters
    and buffers are matched by name, so both modules must have the same structure.

    Args:
        teacher: the EMA model, updated in place.
        student: the trained model (unwrap DistributedDataParallel's `.module` first).
        alpha: weight of the old teacher, in [0, 1] (see `ema_alpha`).
    """
    assert 0.0 <= alpha <= 1.0, f"alpha must lie in [0, 1], got {alpha}"
    t_state = dict(teacher.named_parameters())
    t_state.update(teacher.named_buffers())
    s_state = dict(student.named_parameters())
    s_state.update(student.named_buffers())
    assert t_state.keys() == s_state.keys(), (
        "teacher and student have different parameters / buffers (only in student: "
        f"{sorted(s_state.keys() - t_state.keys())[:5]}, only in teacher: "
        f"{sorted(t_state.keys() - s_state.keys())[:5]})")
    ema_t, ema_s = [], []
    for name, t in t_state.items():
        s = s_state[name]
        assert t.shape == s.shape, f"{name}: teacher shape {tuple(t.shape)} != student shape {tuple(s.shape)}"
        if t.is_floating_point():
            ema_t.append(t)
            ema_s.append(s.detach().to(dtype=t.dtype, device=t.device))
        else:
            t.copy_(s)
    if ema_t:
        # One fused multi-tensor update instead of two kernel launches per tensor.
        torch._foreach_mul_(ema_t, alpha)
        torch._foreach_add_(ema_t, ema_s, alpha=1.0 - alpha)


class PseudoLabels(NamedTuple):
    """labels (B, H, W) int64, weights (B, H, W) float32, gamma a 0-dim float32 tensor."""
    labels: torch.Tensor
    weights: torch.Tensor
    gamma: torch.Tensor


@torch.no_grad()
def pseudo_label(logits: torch.Tensor, *, threshold: float = 0.968, ignore_top: int = 0,
                 ignore_bottom: int = 0) -> PseudoLabels:
    """Teacher pseudo-labels and their confidence weight (DACS / DAFormer; CLUDA Eq. 4-5).

    Gamma = |{pixels with max softmax > threshold}| / |pixels|, counted over the whole batch;
    the per-pixel weight map is Gamma everywhere except the first `ignore_top` and last
    `ignore_bottom` rows, which get 0. Gamma stays a tensor (no host sync); call `.item()` to log.

    Args:
        logits: (B, K, H, W) teacher logits at the label resolution.
        threshold: beta, the confidence a pixel's max softmax must exceed.
        ignore_top: rows at the top of each image whose weight is set to 0.
        ignore_bottom: rows at the bottom of each image whose weight is set to 0.

    Returns:
        PseudoLabels(labels (B, H, W) int64, weights (B, H, W) float32, gamma () float32).
    """
    assert logits.dim() == 4 and logits.is_floating_point(), f"logits must be (B, K, H, W), got {logits.shape}"
    assert ignore_top >= 0 and ignore_bottom >= 0, (ignore_top, ignore_bottom)
    prob, labels = torch.softmax(logits.float(), dim=1).max(dim=1)  # (B, H, W) each
    gamma = (prob > threshold).float().mean()
    weights = gamma.expand_as(prob).clone()
    if ignore_top > 0:
        weights[:, :ignore_top, :] = 0
    if ignore_bottom > 0:
        weights[:, -ignore_bottom:, :] = 0
    return PseudoLabels(labels, weights, gamma)

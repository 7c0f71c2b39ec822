"""The optimiser and its schedule: AdamW over the model's parameter groups (the decoder at
`optim.head_lr_mult` times the encoder's lr, as DAFormer), mmcv's poly schedule with a linear warm-up,
and the restore of both on resume (the stored moments, the current config's hyperparameters).
"""
from __future__ import annotations

from typing import Dict

import torch

from cluda.config import Config

__all__ = ["WarmupPoly", "build_optimizer", "restore_optimizer"]


class WarmupPoly:
    """mmcv's schedule as an lr multiplier: poly decay (1 - it / max_iters) ** power from 1 to
    min_ratio, times a linear warm-up from warmup_ratio over the first warmup_iters iterations.

    Args:
        max_iters: length of the schedule.
        warmup_iters: warm-up length (0: none).
        warmup_ratio: multiplier at iteration 0 of the warm-up.
        power: poly exponent.
        min_ratio: final multiplier (optim.min_lr / optim.lr).
    """

    def __init__(self, *, max_iters: int, warmup_iters: int, warmup_ratio: float, power: float,
                 min_ratio: float = 0.0) -> None:
        self.max_iters, self.warmup_iters = int(max_iters), int(warmup_iters)
        self.warmup_ratio, self.power, self.min_ratio = float(warmup_ratio), float(power), float(min_ratio)

    def __call__(self, it: int) -> float:
        progress = min(it, self.max_iters) / self.max_iters
        factor = (1 - self.min_ratio) * (1 - progress) ** self.power + self.min_ratio
        if it < self.warmup_iters:
            factor *= 1 - (1 - it / self.warmup_iters) * (1 - self.warmup_ratio)
        return factor


def build_optimizer(cfg: Config, model: torch.nn.Module):
    o = cfg.optim
    optimizer = torch.optim.AdamW(model.param_groups(o.lr, head_lr_mult=o.head_lr_mult,
                                                     weight_decay=o.weight_decay),
                                  lr=o.lr, betas=tuple(o.betas))
    schedule = WarmupPoly(max_iters=cfg.train.max_iters, warmup_iters=o.warmup_iters,
                          warmup_ratio=o.warmup_ratio, power=o.poly_power,
                          min_ratio=o.min_lr / o.lr)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def restore_optimizer(optimizer: torch.optim.Optimizer, scheduler, state: Dict, start_iter: int) -> None:
    """Load the optimiser's moments from a checkpoint but keep the hyperparameters of the
    current config (lr, betas, weight decay: `load_state_dict` would bring back the stored ones),
    and put the schedule, a pure function of the iteration, at `start_iter` under the current
    `train.max_iters`. With an unchanged config this is exactly the stored state."""
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    for group, hyper in zip(optimizer.param_groups, fresh):
        group.update(hyper)
    scheduler.last_epoch = start_iter
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(start_iter)  # what LambdaLR.step() computes
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]

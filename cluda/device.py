"""Where and how a run computes: the device, the processes (torchrun), the precision, the
determinism of the kernels and the random streams (seeds as pure functions of (seed, iteration,
rank), the RNG states a checkpoint stores). Shared by `train.py` and the command lines, so that an evaluation
during training and one of a checkpoint run alike.
"""
from __future__ import annotations

import contextlib
import os
import random
from typing import Dict, Tuple

import numpy as np
import torch
import torch.distributed as dist

from cluda.config import Config, ConfigError

__all__ = ["resolve_device", "setup_distributed", "backend_settings", "autocast", "check_amp",
           "broadcast_buffers", "step_seed", "seed_iteration", "rng_states", "set_rng_states"]


def resolve_device(cfg: Config, local_rank: int = 0, *, training: bool = False) -> torch.device:
    """`experiment.device` -> a torch device ("auto": cuda:<local_rank> when CUDA is present),
    checked against this machine: the checks `validate` cannot make because they depend on
    where the config runs, not on its values.

    Args:
        cfg: the experiment.
        local_rank: the process's GPU under torchrun.
        training: also check that the contrastive loss's `cl.impl` runs on that device
            ("triton" needs CUDA, or TRITON_INTERPRET=1 on a CPU); evaluation never runs it.

    Raises:
        ConfigError: naming the key and how to fix it.
    """
    want = cfg.experiment.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("experiment.device is 'cuda' but torch sees no CUDA device on "
                              "this machine; set --experiment.device=cpu (or auto)")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"process {local_rank} needs GPU {local_rank}, but this machine "
                              f"has {torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    c = cfg.cl
    if (training and c.impl == "triton" and (c.source or c.mixed) and device.type == "cpu"
            and os.environ.get("TRITON_INTERPRET") != "1"):
        raise ConfigError("cl.impl 'triton' runs on CUDA devices only (on a CPU only under "
                          "TRITON_INTERPRET=1, slowly), and this run's device is the CPU; set "
                          "--cl.impl=auto or torch")
    return device


def setup_distributed() -> Tuple[int, int, int]:
    """(rank, world size, local rank); initialises the process group under torchrun (NCCL on
    GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


@contextlib.contextmanager
def backend_settings(cfg: Config):
    """`experiment.deterministic` for the duration of a run: cuDNN autotuning by default, or
    deterministic cuDNN and torch algorithms (warning where torch has none). The previous
    settings are restored on exit."""
    cudnn = torch.backends.cudnn
    old = (cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled())
    if cfg.experiment.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
        cudnn.benchmark, cudnn.deterministic = False, True
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        cudnn.benchmark = True
    try:
        yield
    finally:
        cudnn.benchmark, cudnn.deterministic = old[0], old[1]
        torch.use_deterministic_algorithms(old[2], warn_only=old[3])


def autocast(cfg: Config, device: torch.device):
    """bfloat16 autocast on CUDA when `train.amp` (the paper's mixed precision), for training and
    for every inference (evaluations during training, `--eval-only`, `python -m cluda.evaluate`
    and `cluda.predict` run alike, so their numbers agree); full precision on the CPU, where
    bfloat16 matmuls are slower than float32 ones."""
    if device.type == "cuda" and cfg.train.amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_amp(cfg: Config, device: torch.device) -> None:
    """`train.amp` trains in bfloat16, which needs compute capability 8.0 or newer (A100, RTX 30
    and later): older GPUs emulate it slowly and the Triton kernels cannot compile it for them."""
    if device.type != "cuda" or not cfg.train.amp:
        return
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise ConfigError(f"train.amp trains in bfloat16, which {torch.cuda.get_device_name(device)} "
                          f"(compute capability {major}.{minor}) lacks: it needs 8.0 or newer (A100, "
                          "RTX 30 and later); set --train.amp=false to train in float32")


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics). DDP does this before each forward;
    doing it before the EMA update too keeps the teachers identical across ranks, and before
    evaluating / saving makes the evaluated and saved student the same on every rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def step_seed(seed: int, it: int, rank: int = 0, stream: int = 0) -> int:
    """A 63-bit seed that is a function of (seed, iteration, rank, stream) only (numpy's
    SeedSequence hashing, so nearby tuples give unrelated seeds)."""
    assert min(seed, it, rank, stream) >= 0, (seed, it, rank, stream)
    state = np.random.SeedSequence([int(seed), int(it), int(rank), int(stream)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def seed_iteration(seed: int, it: int, rank: int) -> None:
    """Seed the global RNGs (dropout, drop path) from (seed, iteration, rank)."""
    s = step_seed(seed, it, rank, stream=1)
    torch.manual_seed(s)
    random.seed(s)


def rng_states() -> Dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: Dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])

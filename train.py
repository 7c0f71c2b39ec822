"""Train DAFormer / HRDA self-training with CLUDA's contrastive terms (Vayyat et al., Eq. 6-7).

    python train.py [CONFIG] [--section.key=value ...]     # no CONFIG: configs/demo.yaml
    python train.py CONFIG --resume [CHECKPOINT]             # default: <out>/latest.pt
    python train.py [CONFIG] --eval-only CHECKPOINT          # evaluate a checkpoint
    torchrun --nproc_per_node K train.py CONFIG              # K processes, DDP (gloo on CPU)

Reads top to bottom: build everything, `train_step` (one iteration, returns a dict of floats),
`evaluate_model` (mIoU on the target validation split), then one `for it in range(start_iter,
max_iters)` loop that logs, evaluates and checkpoints. Outputs under `experiment.work_dir /
experiment.name`: `config.yaml` (the resolved config), `log.csv` / `eval.csv` (and TensorBoard
events if installed), `curves.png`, `val_latest.{md,csv}` / `val_best.{md,csv}` (per-class IoU
tables), `latest.pt` / `best.pt` (student, teacher, optimiser, scheduler, RNG states, config,
iteration), all written atomically.

Exact resume: the data item of batch slot b at iteration it on rank r is `(it * world + r) *
batch + b` (a pure function of the seed and that index), and the global torch RNG (dropout, drop
path) and the step's generator are seeded from (seed, it, rank) at every iteration, so a run
resumed from `latest.pt` computes the same weights as one that was never stopped.
"""
import argparse
import csv
import math
import os
import random
import resource
import sys
import time
import warnings
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import cluda.evaluate as evaluate_cli
from cluda import runs
from cluda.build import build_model, build_train_dataset, build_uda_step, build_val_dataset, encoder_of
from cluda.checkpoint import config_from_checkpoint, load_checkpoint, save_checkpoint
from cluda.config import (Config, ConfigError, load_experiment, output_dir, save_yaml, split_overrides,
                          to_dict)
from cluda.device import autocast, backend_settings, resolve_device, setup_distributed
from cluda.errors import EXIT_STATUS_HELP, NonFiniteError, OutputError, run_cli
from cluda.fileio import atomic_open
from cluda.inference import evaluate_model
from cluda.inference_memory import MemoryCheck
from cluda.metrics import format_table, write_metrics
from cluda.models import build_imnet_encoder
from cluda.models.weights import load_state_checked
from cluda.teacher import ema_alpha, ema_update, make_teacher
from cluda.uda import TrainForward, UDAStep, step_seed

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.yaml")


# ----------------------------------------------------------------------------------------------
# Small pieces: distributed setup, learning-rate schedule, batches, logs
# ----------------------------------------------------------------------------------------------

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


class IterationBatches(torch.utils.data.Sampler):
    """Batch `it` of rank r holds data set items (it * world + r) * batch_size + b."""

    def __init__(self, *, start: int, stop: int, batch_size: int, rank: int = 0, world: int = 1):
        self.start, self.stop, self.batch_size, self.rank, self.world = start, stop, batch_size, rank, world

    def __iter__(self):
        for it in range(self.start, self.stop):
            first = (it * self.world + self.rank) * self.batch_size
            yield list(range(first, first + self.batch_size))

    def __len__(self):
        return max(self.stop - self.start, 0)


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics). DDP does this before each forward;
    doing it before the EMA update too keeps the teachers identical across ranks, and before
    evaluating / saving makes the evaluated and saved student the same on every rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


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


class CSVLog:
    """Rows of floats with a fixed header, appended to `path`. A row is labelled with the number
    of iterations done; on resume from a checkpoint after `keep_until` iterations, later rows
    (written by the interrupted run after its checkpoint) are dropped."""

    def __init__(self, path: str, columns: Sequence[str], *, keep_until: Optional[int] = None):
        self.path, self.columns = path, ["iteration"] + list(columns)
        rows = []
        if keep_until is not None and os.path.isfile(path):
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= keep_until]
        with atomic_open(path, "w") as f:  # a crash here leaves the interrupted run's log whole
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def append(self, it: int, values: Dict[str, float]) -> None:
        try:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(dict(values, iteration=it))
        except OSError as err:  # a full or read-only disk: name the log, in one line
            raise OutputError(self.path, err) from err

    def read(self) -> List[Dict[str, float]]:
        with open(self.path, newline="") as f:
            return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]


def plot_curves(train_log: CSVLog, eval_log: CSVLog, path: str, *, main_metric: str) -> None:
    """PNG of the loss terms and the target mIoU against the iteration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, evals = train_log.read(), eval_log.read()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for col in train_log.columns[1:]:
        if col.startswith(("src.", "mix.", "mic.")) or col == "loss":
            pts = [(r["iteration"], r[col]) for r in rows if col in r]
            if pts:
                ax1.plot(*zip(*pts), label=col, lw=1.5 if col == "loss" else 1)
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("loss (mean over the log interval)")
    ax1.legend(fontsize=8)
    pts = [(r["iteration"], 100 * r[main_metric]) for r in evals if main_metric in r]
    if pts:
        ax2.plot(*zip(*pts), marker="o")
    ax2.set_xlabel("iteration")
    ax2.set_ylabel(f"target {main_metric} (%)")
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def peak_memory_mib(device: torch.device, *, reset: bool = False) -> float:
    """Peak memory: on CUDA the most allocated by tensors since the last reset (`reset`: start a
    new window), on the CPU the process's peak resident set so far (it only grows)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def open_tensorboard(out_dir: str, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(os.path.join(out_dir, "tb"))


# ----------------------------------------------------------------------------------------------
# One training step and the evaluation
# ----------------------------------------------------------------------------------------------

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


def train_step(*, it: int, batch: Dict, net: torch.nn.Module, student: torch.nn.Module,
               teacher: Optional[torch.nn.Module], imnet: Optional[torch.nn.Module], step: UDAStep,
               optimizer: torch.optim.Optimizer, scheduler, cfg: Config, device: torch.device,
               rank: int = 0, world: int = 1) -> Dict[str, float]:
    """EMA update, the loss terms of `step`, one backward pass, the optimiser and scheduler step.
    A non-finite loss or gradient skips the optimiser step (`train.nonfinite: skip`, with a
    warning) or raises FloatingPointError ("stop"). Returns the loss terms, their sum ("loss"),
    the step's statistics, the encoder lr and "skipped" (1.0 for a skipped step)."""
    student.train()
    seed_iteration(cfg.experiment.seed, it, rank)
    if world > 1:
        broadcast_buffers(student)
    if teacher is not None and step.target_active(it):
        # DAFormer: at the first self-training iteration alpha is 0, i.e. the teacher is a copy.
        ema_update(teacher, student, ema_alpha(it - step.start_iter, cfg.uda.ema_alpha))
    # The forward moves BatchNorm statistics; a skipped step puts them back (a NaN forward would
    # otherwise leave NaN statistics behind). A copy of the buffers is small next to the weights.
    buffers = [b.detach().clone() for b in student.buffers()]
    src, tgt = batch["source"], batch["target"]
    src_img = src["img"].to(device, non_blocking=True)
    src_label = src["label"].to(device, non_blocking=True)
    tgt_img = tgt["img"].to(device, non_blocking=True)
    tgt_valid = tgt["pseudo_valid"].to(device, non_blocking=True) if "pseudo_valid" in tgt else None
    with autocast(cfg, device):
        result = step(net, teacher, src_img, src_label, tgt_img, it=it, rank=rank, imnet=imnet,
                      target_valid=tgt_valid)
    loss = sum(result.losses.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # The gradient norm (clipped or not) is one reduction that shows a NaN / inf anywhere. After
    # DDP's all-reduce every rank holds the same gradients (a non-finite loss on one rank makes
    # them non-finite on all), so every rank takes the same decision without another collective.
    params = [p for p in student.parameters() if p.grad is not None]
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    # One host-device synchronisation per step: the logged terms and the gradient norm together.
    values = torch.stack([v.detach().float() for v in result.losses.values()]
                         + [loss.detach().float(), norm.detach().float()]).tolist()
    logs = dict(zip(result.losses, values))
    logs["loss"], grad_norm = values[-2], values[-1]
    problem = None
    if not math.isfinite(logs["loss"]):
        terms = {k: logs[k] for k in result.losses}
        problem = f"non-finite loss at iteration {it} (rank {rank}): {terms}"
    elif not math.isfinite(grad_norm):
        bad = [n for n, p in student.named_parameters()
               if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        problem = (f"non-finite gradients at iteration {it} (rank {rank}) in {len(bad)} "
                   f"parameter(s): {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")
    lr = optimizer.param_groups[0]["lr"]
    if problem is None:
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buf, saved in zip(student.buffers(), buffers):
                buf.copy_(saved)
        if cfg.train.nonfinite == "stop":
            raise NonFiniteError(f"{problem}; stopped without saving (train.nonfinite: stop)")
        # "skip": the weights stay as they are; the schedule goes on with the iteration count
        warnings.warn(f"{problem}; step skipped (train.nonfinite: skip)", RuntimeWarning, stacklevel=2)
    scheduler.step()
    logs.update(result.stats)
    logs["lr"] = lr
    logs["skipped"] = float(problem is not None)
    return logs


def eval_row(metrics: Dict[int, Dict]) -> Dict[str, float]:
    row = {}
    for p, m in metrics.items():
        row[f"mIoU{p}"] = m["mIoU"]
    first = next(iter(metrics.values()))
    row.update({f"IoU.{name}": v for name, v in first["iou"].items()})
    return row


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

def build_optimizer(cfg: Config, model: torch.nn.Module):
    o = cfg.optim
    optimizer = torch.optim.AdamW(model.param_groups(o.lr, head_lr_mult=o.head_lr_mult,
                                                     weight_decay=o.weight_decay),
                                  lr=o.lr, betas=tuple(o.betas))
    schedule = WarmupPoly(max_iters=cfg.train.max_iters, warmup_iters=o.warmup_iters,
                          warmup_ratio=o.warmup_ratio, power=o.poly_power,
                          min_ratio=o.min_lr / o.lr)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def checkpoint(path: str, *, cfg: Config, it_next: int, student, teacher, optimizer, scheduler,
               best: Dict, evaluated: bool = True) -> None:
    """Save the training state after `it_next` iterations. `evaluated`: False when the file is
    written before that iteration's evaluation (a resume runs it first)."""
    save_checkpoint(path, {
        "config": to_dict(cfg), "iteration": it_next, "student": student.state_dict(),
        "teacher": None if teacher is None else teacher.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": rng_states(), "best": best, "evaluated": evaluated})


def train(cfg: Config, *, resume: Optional[str] = None, stop_at: Optional[int] = None,
          overwrite: bool = False, allow_changes: bool = False) -> Dict:
    """Run (or resume) the experiment `cfg` (under `backend_settings`).

    Args:
        cfg: the checked config.
        resume: a checkpoint to continue from ("auto": `<out>/latest.pt`).
        stop_at: stop (and save `latest.pt`) once this many iterations are done.
        overwrite: the run folder may hold a run, whose outputs are replaced.
        allow_changes: a resume may change keys beyond run control (`cluda.runs.FREE_ON_RESUME`).

    Returns:
        {"out_dir", "iteration" (done), "metrics" (last evaluation, by protocol), "best",
        "student", "teacher"} (the last two are the unwrapped modules).
    """
    if resume is not None and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: resume continues the run "
                          "in the folder, overwrite replaces it")
    with backend_settings(cfg):
        return _train(cfg, resume=resume, stop_at=stop_at, overwrite=overwrite,
                      allow_changes=allow_changes)


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


def check_resume(cfg: Config, stored: Config, *, path: str, allow_changes: bool,
                 start_iter: int) -> Dict:
    """The config changes of a resume ({key: (stored, new)}); raises ConfigError for changes that
    need --allow-changes without it, and for a schedule that already ended."""
    changes = runs.config_changes(to_dict(stored), to_dict(cfg))
    gated = runs.needs_permission(changes)
    if gated and not allow_changes:
        raise ConfigError(
            f"cannot resume from {path}: the config differs from the checkpoint's in "
            f"{runs.describe(changes, gated)}; add --allow-changes to resume with them (they apply "
            f"from iteration {start_iter + 1}; the previous config is kept as "
            f"{runs.history_name(start_iter)}), or start a new run (another experiment.name, or "
            "--overwrite)")
    if start_iter > cfg.train.max_iters:
        raise ConfigError(f"cannot resume from {path}: it has done {start_iter} iterations, more than "
                          f"train.max_iters {cfg.train.max_iters}")
    return changes


def _train(cfg: Config, *, resume: Optional[str], stop_at: Optional[int], overwrite: bool,
           allow_changes: bool) -> Dict:
    rank, world, local_rank = setup_distributed()
    device = resolve_device(cfg, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    check_amp(cfg, device)
    if cfg.experiment.threads is not None:
        torch.set_num_threads(cfg.experiment.threads)
    out = output_dir(cfg)
    main_proc = rank == 0
    # Refuse a folder that holds a run (or that another process trains in) before any work;
    # nothing is written into it until every start-up check below has passed.
    folder = runs.RunFolder(out, resume=resume is not None, overwrite=overwrite) if main_proc else None
    try:
        return _run(cfg, folder=folder, resume=resume, stop_at=stop_at, allow_changes=allow_changes,
                    rank=rank, world=world, device=device)
    finally:
        if folder is not None:
            folder.release()


def _run(cfg: Config, *, folder: Optional[runs.RunFolder], resume: Optional[str],
         stop_at: Optional[int], allow_changes: bool, rank: int, world: int,
         device: torch.device) -> Dict:
    out = output_dir(cfg)
    main_proc = rank == 0
    max_iters = cfg.train.max_iters
    main_metric = f"mIoU{cfg.eval.protocols[0]}"

    # ---- model, teacher, frozen ImageNet encoder, optimiser ----
    torch.manual_seed(cfg.experiment.seed)  # the same initial weights on every rank
    student = build_model(cfg).to(device)
    step = build_uda_step(cfg)
    imnet = build_imnet_encoder(encoder_of(student)).to(device) if step.fd_lambda > 0 else None
    teacher = make_teacher(student) if step.self_training else None
    optimizer, scheduler = build_optimizer(cfg, student)
    net: torch.nn.Module = TrainForward(student)
    if world > 1:
        # HRDA's feature-weight head gets no gradient in iterations where no CL term reads delta
        # (e.g. multires "lr", or a warm-up without source CL): only then let DDP search the graph.
        unused = (getattr(student, "feature_weight_head", None) is not None
                  and not (step.uses_delta(0) and step.uses_delta(step.start_iter)))
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=unused)

    start_iter, best = 0, {"metric": main_metric, "value": -1.0, "iteration": -1}
    changes: Dict = {}
    pending_eval = False
    if resume is not None:
        path = os.path.join(out, "latest.pt") if resume == "auto" else resume
        state = load_checkpoint(path, map_location=device)
        stored = config_from_checkpoint(state, path=path)
        start_iter = int(state["iteration"])
        changes = check_resume(cfg, stored, path=path, allow_changes=allow_changes, start_iter=start_iter)
        load_state_checked(student, state["student"], what=f"checkpoint {path} (student)")
        if teacher is not None and state.get("teacher") is not None:
            load_state_checked(teacher, state["teacher"], what=f"checkpoint {path} (teacher)")
        elif teacher is not None:  # a source-only checkpoint: start the teacher from its student
            teacher.load_state_dict(student.state_dict())
        restore_optimizer(optimizer, scheduler, state, start_iter)
        set_rng_states(state["rng"])
        best = dict(state.get("best") or best)
        # Saved before an evaluation that did not finish (it failed, or the run was killed).
        pending_eval = state.get("evaluated") is False
    if stop_at is not None and stop_at <= start_iter:
        raise ConfigError(f"--stop-at {stop_at}: the run has already done {start_iter} iterations; "
                          "give a later iteration")

    # ---- data ----
    train_data = build_train_dataset(cfg, length=max_iters * cfg.data.batch_size * world)
    loader = torch.utils.data.DataLoader(
        train_data, num_workers=cfg.data.workers, pin_memory=device.type == "cuda",
        batch_sampler=IterationBatches(start=start_iter, stop=max_iters, batch_size=cfg.data.batch_size,
                                       rank=rank, world=world),
        generator=torch.Generator(), persistent_workers=False)
    val_data = build_val_dataset(cfg)
    if main_proc:
        check_val_data(val_data, cfg, MemoryCheck(student, cfg, device))

    # ---- every check passed: record the run ----
    terms = step.term_names()
    train_log = eval_log = tb = None
    if main_proc:
        if resume is None:
            cleared = folder.clear()
            if cleared:
                print(f"--overwrite: removed the previous run's {', '.join(cleared)} from {out}")
        elif changes:
            previous = os.path.join(out, "config.yaml")
            kept = os.path.join(out, runs.history_name(start_iter))
            if os.path.isfile(previous) and not os.path.exists(kept):  # what ran until start_iter
                os.replace(previous, kept)
        if folder.removed_temporaries:
            print(f"removed {len(folder.removed_temporaries)} stale temporary file(s) of a killed "
                  f"run from {out}")
        save_yaml(to_dict(cfg), os.path.join(out, "config.yaml"))
        if resume is not None:
            print(f"resumed from {path} at iteration {start_iter}")
            if changes:
                print(f"config changes from iteration {start_iter + 1}: {runs.describe(changes)}; "
                      f"the previous config is kept as {runs.history_name(start_iter)}")
            if "train.max_iters" in changes:
                print(f"the learning-rate schedule is rebuilt for {max_iters} iterations: lr "
                      f"{optimizer.param_groups[0]['lr']:.3g} at iteration {start_iter + 1}")
        stat_cols = ["gamma", "pasted"] if step.self_training else []
        train_log = CSVLog(os.path.join(out, "log.csv"),
                           terms + ["loss"] + stat_cols + ["lr", "skipped", "data_sec_per_it", "sec_per_it",
                                                              "mem_mib"],
                           keep_until=start_iter)
        eval_cols = [f"mIoU{p}" for p in cfg.eval.protocols] + [f"IoU.{n}" for n in _class_names(cfg)]
        eval_log = CSVLog(os.path.join(out, "eval.csv"), eval_cols, keep_until=start_iter)
        tb = open_tensorboard(out, cfg.train.tensorboard)
        print(f"{type(student).__name__} ({cfg.model.backbone}), {sum(p.numel() for p in student.parameters()) / 1e6:.2f} M "
              f"parameters, device {device}, {world} process(es); terms: {', '.join(terms)}; outputs in {out}")

    def save(name: str, it_next: int, *, evaluated: bool = True) -> None:
        checkpoint(os.path.join(out, name), cfg=cfg, it_next=it_next, student=student, teacher=teacher,
                   optimizer=optimizer, scheduler=scheduler, best=best, evaluated=evaluated)

    def run_evaluation(done: int) -> Dict[int, Dict]:
        nonlocal best
        result = evaluate_model(student, val_data, cfg, device, rank=rank, world=world)["metrics"]
        value = result[cfg.eval.protocols[0]]["mIoU"]
        if main_proc:
            if value > best["value"]:
                best = {"metric": main_metric, "value": value, "iteration": done}
                write_metrics(result[cfg.eval.protocols[0]], out, "val_best")
                save("best.pt", done)
            eval_log.append(done, eval_row(result))
            write_metrics(result[cfg.eval.protocols[0]], out, "val_latest")
            if tb is not None:
                tb.add_scalar(f"val/{main_metric}", value, done)
            tqdm.write(f"iteration {done}: target {main_metric} {100 * value:.2f}")
            plot_curves(train_log, eval_log, os.path.join(out, "curves.png"), main_metric=main_metric)
        return result

    # ---- the loop ----
    metrics: Dict[int, Dict] = {}
    if pending_eval:  # the evaluation the checkpoint was saved for, before training goes on
        if world > 1:
            broadcast_buffers(student)
        metrics = run_evaluation(start_iter)
        if main_proc:
            save("latest.pt", start_iter)
    window: Dict[str, List[float]] = {}
    smooth: Dict[str, float] = {}
    t_last = time.time()
    stop = max_iters if stop_at is None else min(max_iters, stop_at)
    batches = iter(loader)
    # Redrawn 10 times a second on a terminal; once a minute into a log file (a batch job's
    # output), where every redraw is appended: a 40k-iteration run would write tens of MB.
    bar = tqdm(total=stop, initial=start_iter, disable=not main_proc, desc="train", dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 60.0)
    for it in range(start_iter, stop):
        t_data = time.time()
        batch = next(batches)
        window.setdefault("data_sec_per_it", []).append(time.time() - t_data)  # waiting for the loader
        logs = train_step(it=it, batch=batch, net=net, student=student, teacher=teacher, imnet=imnet,
                          step=step, optimizer=optimizer, scheduler=scheduler, cfg=cfg, device=device,
                          rank=rank, world=world)
        done = it + 1
        for k, v in logs.items():
            window.setdefault(k, []).append(v)
            smooth[k] = v if k not in smooth else 0.9 * smooth[k] + 0.1 * v
        bar.update(1)
        bar.set_postfix({k: f"{smooth[k]:.3f}" for k in ["loss"] + step.term_names(it)}, refresh=False)

        if main_proc and (done % cfg.train.log_interval == 0 or done == stop):
            row = {k: sum(v) / len(v) for k, v in window.items()}
            row["skipped"] = sum(window["skipped"])  # steps skipped in the interval, not a mean
            row["sec_per_it"] = (time.time() - t_last) / len(window["loss"])
            row["mem_mib"] = peak_memory_mib(device, reset=True)
            train_log.append(done, row)
            if tb is not None:
                for k, v in row.items():
                    tb.add_scalar(f"train/{k}", v, done)
            window, t_last = {}, time.time()

        evaluate_now = done == max_iters or (cfg.train.eval_interval and done % cfg.train.eval_interval == 0)
        save_now = done == stop or (cfg.train.checkpoint_interval and done % cfg.train.checkpoint_interval == 0)
        if world > 1 and (evaluate_now or save_now):
            broadcast_buffers(student)
        # Save before evaluating: an evaluation that fails (a corrupt validation file, out of
        # memory) must not lose the training since the last checkpoint. A resume from this file
        # runs the evaluation it missed ("evaluated": False) before training on.
        if main_proc and save_now:
            save("latest.pt", done, evaluated=not evaluate_now)
        if evaluate_now:
            metrics = run_evaluation(done)
            if main_proc and save_now:
                save("latest.pt", done)  # the evaluation is done, and `best` may have moved
            t_last = time.time()  # evaluation time is not training time
    bar.close()
    if tb is not None:
        tb.close()
    if world > 1:
        dist.barrier()  # rank 0 has written its files
    return {"out_dir": out, "iteration": stop, "metrics": metrics, "best": best,
            "student": student, "teacher": teacher}


def check_val_data(val_data, cfg: Config, memory_check: MemoryCheck) -> None:
    """Fail at start-up, not at the first evaluation thousands of iterations in: read every
    validation image and label once (real data sets; synthetic scenes are generated and cannot be
    corrupt), and estimate the evaluation's memory for each image size (`eval.mode`, scales; the
    memory free now, before training takes its share, so only what can never fit is refused)."""
    if cfg.data.val.kind == "synthetic":
        sizes = {(tuple(val_data[0]["img"].shape), tuple(val_data[0]["label"].shape[-2:]), "val[0]")}
    else:
        sizes = set()
        loader = torch.utils.data.DataLoader(val_data, batch_size=None, num_workers=cfg.eval.workers)
        for i, sample in enumerate(loader):
            sizes.add((tuple(sample["img"].shape), tuple(sample["label"].shape[-2:]),
                       str(sample.get("path", f"val[{i}]"))))
    seen = set()
    for img_shape, out_size, what in sorted(sizes):
        if (img_shape, out_size) not in seen:
            seen.add((img_shape, out_size))
            memory_check((cfg.eval.batch_size,) + img_shape, out_size, what=what)


def _class_names(cfg: Config) -> List[str]:
    from cluda.data.labels import CLASS_NAMES, PROTOCOLS
    return [CLASS_NAMES[c] for c in sorted(PROTOCOLS[cfg.eval.protocols[0]])]


def parse_args(argv: Optional[Sequence[str]]):
    parser = argparse.ArgumentParser(
        description="CLUDA / DAFormer / HRDA training. Unknown --section.key=value arguments "
                    "override the config.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python train.py configs/gta2cs_daformer_cluda.yaml --cl.temperature=0.1"
               "\n\n" + EXIT_STATUS_HELP)
    parser.add_argument("config", nargs="?", default=None,
                        help=f"YAML experiment (default: {os.path.relpath(DEFAULT_CONFIG)})")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                        help="continue from CHECKPOINT (default: <work_dir>/<name>/latest.pt)")
    parser.add_argument("--eval-only", metavar="CHECKPOINT", default=None,
                        help="only evaluate CHECKPOINT (its stored config, with overrides, unless "
                             "a CONFIG is given)")
    parser.add_argument("--stop-at", type=int, default=None, metavar="N",
                        help="stop after N iterations and save latest.pt (resume later)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run in <work_dir>/<name> (its outputs are removed once "
                             "every start-up check has passed); without it a folder that holds a "
                             "run is refused")
    parser.add_argument("--allow-changes", action="store_true",
                        help="with --resume: accept config changes beyond run control (devices, "
                             "intervals, evaluation, train.max_iters); they apply from the resumed "
                             "iteration and the previous config is kept as config.until_<N>.yaml")
    # The overrides are taken out first: argparse would read one that holds a space
    # ("--eval.stride=[256, 256]") as the positional CONFIG.
    rest, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args, extra = parser.parse_known_args(rest)
    if extra:
        parser.error(f"unrecognised arguments {extra}: overrides are --section.key=value")
    if args.stop_at is not None and args.stop_at < 1:
        parser.error(f"--stop-at must be >= 1, got {args.stop_at}")
    return args, overrides


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args, overrides = parse_args(argv)
    t0 = time.time()
    if args.eval_only is not None:  # the same command as python -m cluda.evaluate
        return evaluate_cli.run(args.eval_only, config=args.config, overrides=overrides)
    cfg = load_experiment(args.config or DEFAULT_CONFIG, overrides)
    if args.allow_changes and args.resume is None:
        raise ConfigError("--allow-changes applies to a resume: add --resume")
    resolve_device(cfg, training=True)  # no CUDA, or cl.impl=triton where it cannot run: fail now
    result = train(cfg, resume=args.resume, stop_at=args.stop_at, overwrite=args.overwrite,
                   allow_changes=args.allow_changes)
    if result["metrics"] and (not dist.is_initialized() or dist.get_rank() == 0):
        p = cfg.eval.protocols[0]
        m = result["metrics"][p]
        print(format_table(m))
        rss = peak_memory_mib(torch.device("cpu"))
        print(f"target mIoU ({p} classes): {100 * m['mIoU']:.2f} after {result['iteration']} "
              f"iterations; wall time {time.time() - t0:.0f} s, peak RSS {rss:.0f} MiB")
    return result


if __name__ == "__main__":
    try:
        # A user error (cluda.errors: bad config, unreadable file, full disk ...) is one line on
        # stderr and exit status 2; CLUDA_DEBUG=1 adds its traceback. Bugs keep theirs.
        status = run_cli(main)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(status)

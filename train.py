"""Train DAFormer / HRDA self-training with CLUDA's contrastive terms (Vayyat et al., Eq. 6-7).

    python train.py [CONFIG] [--section.key=value ...]     # no CONFIG: configs/demo.yaml
    python train.py CONFIG --resume [CHECKPOINT]             # default: <out>/latest.pt
    python train.py [CONFIG] --eval-only CHECKPOINT          # evaluate a checkpoint
    torchrun --nproc_per_node K train.py CONFIG              # K processes, DDP (gloo on CPU)

Reads top to bottom: `train_step` (one iteration, returns a dict of floats), then `_run`: build
everything, resume, one `for it in range(start_iter, max_iters)` loop that logs, evaluates
(`cluda.inference.evaluate_model`, mIoU on the target validation split) and checkpoints. The
pieces live in the library: the optimiser and schedule in `cluda.optim`, logs and curves in
`cluda.runlog`, the run folder and resume checks in `cluda.runs`, checkpoints in
`cluda.checkpoint`, seeds and RNG states in `cluda.device`. Outputs under `experiment.work_dir /
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
import math
import os
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
from cluda.checkpoint import (config_from_checkpoint, load_checkpoint, restore_training_state,
                              save_training_state)
from cluda.cli import parse_cli
from cluda.config import Config, ConfigError, load_experiment, output_dir, save_yaml, to_dict
from cluda.data.pairs import IterationBatches
from cluda.device import (autocast, backend_settings, broadcast_buffers, check_amp, resolve_device,
                          seed_iteration, setup_distributed)
from cluda.errors import EXIT_STATUS_HELP, NonFiniteError, run_cli
from cluda.inference import evaluate_model
from cluda.inference_memory import MemoryCheck, check_val_data
from cluda.metrics import format_table, write_metrics
from cluda.models import build_imnet_encoder
from cluda.optim import build_optimizer
from cluda.runlog import CSVLog, class_names, eval_row, open_tensorboard, peak_memory_mib, plot_curves
from cluda.runs import check_resume
from cluda.teacher import ema_alpha, ema_update, make_teacher
from cluda.uda import TrainForward, UDAStep

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.yaml")


# ----------------------------------------------------------------------------------------------
# One training step
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


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
        start_iter = int(state["iteration"])
        changes = check_resume(cfg, config_from_checkpoint(state, path=path), path=path,
                               allow_changes=allow_changes, start_iter=start_iter)
        best = restore_training_state(state, path=path, student=student, teacher=teacher,
                                      optimizer=optimizer, scheduler=scheduler) or best
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
        eval_cols = [f"mIoU{p}" for p in cfg.eval.protocols] + [f"IoU.{n}" for n in class_names(cfg)]
        eval_log = CSVLog(os.path.join(out, "eval.csv"), eval_cols, keep_until=start_iter)
        tb = open_tensorboard(out, cfg.train.tensorboard)
        print(f"{type(student).__name__} ({cfg.model.backbone}), {sum(p.numel() for p in student.parameters()) / 1e6:.2f} M "
              f"parameters, device {device}, {world} process(es); terms: {', '.join(terms)}; outputs in {out}")

    def save(name: str, it_next: int, *, evaluated: bool = True) -> None:
        save_training_state(os.path.join(out, name), cfg=cfg, it_next=it_next, student=student,
                            teacher=teacher, optimizer=optimizer, scheduler=scheduler, best=best,
                            evaluated=evaluated)

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
    # The overrides are taken out first (`cluda.cli.parse_cli`): argparse would read one that
    # holds a space ("--eval.stride=[256, 256]") as the positional CONFIG.
    args, overrides = parse_cli(parser, argv)
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

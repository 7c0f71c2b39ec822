"""Evaluating a checkpoint: `python -m cluda.evaluate` (and `train.py --eval-only`, the same
command).

    python -m cluda.evaluate --checkpoint CKPT [--config C] [--split val]
        [--weights student|teacher] [--protocols 19 16 13] [--flip] [--scales 0.75 1.0 1.25]
        [--mode whole|slide] [--out DIR] [--device cpu|cuda] [--section.key=value ...]

rebuilds the network from the checkpoint (`cluda.checkpoint.load_model_from_checkpoint`, also
used by `cluda.predict`), evaluates it on the target validation split (`evaluate_checkpoint`,
through `cluda.inference.evaluate_model` as training's evaluations), prints the per-class tables
and writes them as Markdown, CSV and JSON (`eval_<checkpoint>.{md,csv,json}`), all rendered
before the first file is written and each written atomically (`run`). The metric and its
conventions (absent classes, protocols) are `cluda.metrics`'. Bad input (missing / truncated
checkpoint, config that does not fit the weights, unknown override key) ends with a one-line
message and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from cluda.build import build_val_dataset
from cluda.checkpoint import load_model_from_checkpoint
from cluda.cli import check_out_dir, flag_overrides, note_model_differences, parse_cli
from cluda.config import Config, to_dict
from cluda.data.labels import CLASS_NAMES, PROTOCOLS
from cluda.device import backend_settings, resolve_device, setup_distributed
from cluda.errors import EXIT_STATUS_HELP, InputError, input_errors, run_cli
from cluda.fileio import atomic_write_files
from cluda.inference import evaluate, evaluate_model, predict_probs
from cluda.metrics import ConfusionMatrix, compute_metrics, format_table, render_metrics, write_metrics

__all__ = ["evaluate_checkpoint", "evaluation_stem", "render_evaluation", "run", "main",
           # the metrics and the evaluation loop, under the names this module has always had
           "ConfusionMatrix", "compute_metrics", "format_table", "write_metrics", "evaluate",
           "evaluate_model", "predict_probs"]


def evaluate_checkpoint(checkpoint: str | os.PathLike, *,
                        config: str | os.PathLike | Config | None = None,
                        overrides: Sequence[str] = (), weights: str = "student",
                        progress: bool = True) -> dict[str, Any]:
    """mIoU and per-class IoU / accuracy of a checkpoint on its target validation split.

    Data set, inference mode, protocols, test-time augmentation and device come from the
    config (see `cluda.checkpoint.load_model_from_checkpoint`): `data.val`, `eval.*`,
    `experiment.device`. Under torchrun each process evaluates a share of the images.

    Args:
        checkpoint: a checkpoint written by `train.py`.
        config: a YAML experiment (or a `Config`) used instead of the stored config, or None.
        overrides: `--section.key=value` strings, e.g. `--eval.mode=slide`.
        weights: "student" or "teacher".
        progress: show a tqdm bar.

    Returns:
        `evaluate_model`'s dict plus "config" (the Config used), "device" (str), "rank" and the
        info of `load_model_from_checkpoint`.
    """
    model, cfg, info = load_model_from_checkpoint(checkpoint, config=config, overrides=overrides,
                                                  weights=weights)
    rank, world, local_rank = setup_distributed()
    device = resolve_device(cfg, local_rank)
    v = cfg.data.val
    if v.split not in (None, "val") and v.kind in ("gta", "synthia"):
        raise InputError(f"data.val.split {v.split!r}: {v.kind} data sets have no splits")
    with input_errors():
        val = build_val_dataset(cfg)
    if len(val) == 0:
        raise InputError(f"the validation set of data.val ({v.kind}, root {v.root}, split "
                         f"{v.split or 'val'}) is empty")
    model.to(device)
    with backend_settings(cfg):
        result = evaluate_model(model, val, cfg, device, rank=rank, world=world, progress=progress)
    result.update(info, config=cfg, device=str(device), rank=rank)
    return result


def _describe(result: Mapping[str, Any]) -> list[str]:
    """The Markdown's lines on what was evaluated and how."""
    cfg: Config = result["config"]
    v, e = cfg.data.val, cfg.eval
    where = f" at `{v.root}`" if v.root else ""
    mode = e.mode if e.mode == "whole" else f"slide (window {e.crop_size}, stride {e.stride})"
    if cfg.model.hrda.enabled:
        mode += (f"; HRDA, HR windows {cfg.model.hrda.hr_slide_size} every "
                 f"{cfg.model.hrda.hr_slide_stride}")
    return [
        f"checkpoint: `{result['checkpoint']}`, {result['weights']} weights, iteration "
        f"{result['iteration']}",
        f"model: {cfg.model.backbone}, {cfg.model.channels} fused channels"
        + (", HRDA" if cfg.model.hrda.enabled else ""),
        f"data: {v.kind}{where}, split {v.split or 'val'}, {result['num_images']} images"
        + (f", resized to {v.scale}" if v.scale else ""),
        f"inference: {mode}; flip {'on' if e.flip else 'off'}; scales {list(e.scales)}; "
        f"device {result['device']}",
    ]


def _json_safe(value: Any) -> Any:
    """NaN (an absent class) -> None, tuples -> lists, recursively."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def render_evaluation(result: Mapping[str, Any], stem: str) -> dict[str, str]:
    """All files of one evaluation, {file name: text}, rendered before anything is written.

    Per protocol the Markdown and CSV tables of `render_metrics`, named `<stem>.md/.csv` for
    one protocol and `<stem>_<protocol>.md/.csv` for several (as `train.py --eval-only`);
    and `<stem>.json` with every number at full precision (NaN written as null), the
    confusion matrix and the settings."""
    metrics = result["metrics"]
    details = _describe(result)
    files: dict[str, str] = {}
    for p, m in metrics.items():
        name = stem if len(metrics) == 1 else f"{stem}_{p}"
        texts = render_metrics(m, details=details)
        files[f"{name}.md"] = texts["markdown"]
        files[f"{name}.csv"] = texts["csv"]
    cfg: Config = result["config"]
    summary = {
        "checkpoint": os.path.abspath(result["checkpoint"]),
        "iteration": result["iteration"],
        "weights": result["weights"],
        "device": result["device"],
        "num_images": result["num_images"],
        "data": to_dict(cfg)["data"]["val"],
        "eval": to_dict(cfg)["eval"],
        "metrics": {str(p): {k: v for k, v in m.items()} for p, m in metrics.items()},
        "class_names": list(CLASS_NAMES),
        "confusion_matrix": result["matrix"].cpu().tolist(),
    }
    # One top-level key per line (the confusion matrix on one line too): diffable, still JSON.
    lines = [f"{json.dumps(k)}: {json.dumps(v, allow_nan=False)}"
             for k, v in _json_safe(summary).items()]
    files[f"{stem}.json"] = "{\n " + ",\n ".join(lines) + "\n}\n"
    return files


def _eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cluda.evaluate", allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Evaluate a train.py checkpoint on the target validation split: per-class IoU in\n"
            "the column order of the CLUDA paper's Table 1, mIoU for the 19 / 16 / 13-class\n"
            "protocols.\n"
            "The network is rebuilt from the config stored in the checkpoint (or from --config);\n"
            "any --section.key=value argument overrides that config, e.g.\n"
            "--data.val.root=/data/cityscapes or --data.val.max_images=50. The flags below are\n"
            "shortcuts for such overrides and win over them. On CUDA, inference runs under\n"
            "bfloat16 autocast when train.amp is set, as during training (--train.amp=false\n"
            "turns it off)."),
        epilog=(
            "writes, into --out (default: the checkpoint's folder), at the end, atomically:\n"
            "  eval_<checkpoint>[_<split>][_teacher].md    IoU and accuracy tables (Markdown)\n"
            "  eval_<checkpoint>[_<split>][_teacher].csv   the IoU table (CSV)\n"
            "  eval_<checkpoint>[_<split>][_teacher].json  every number, the confusion matrix\n"
            "with several protocols, the .md / .csv names end in _<protocol> (e.g. _16, _13).\n\n"
            "examples:\n"
            "  python -m cluda.evaluate --checkpoint work_dirs/demo/latest.pt\n"
            "  python -m cluda.evaluate --checkpoint latest.pt --data.val.root=/data/cityscapes \\\n"
            "      --mode slide --protocols 16 13 --out results/\n\n"
            + EXIT_STATUS_HELP))
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="a latest.pt / best.pt written by train.py")
    parser.add_argument("--config", default=None, metavar="YAML",
                        help="build the network and data from this experiment instead of the "
                             "checkpoint's stored config (its model section must fit the weights)")
    parser.add_argument("--split", default=None,
                        help="split of the validation data set (data.val.split; default val)")
    parser.add_argument("--weights", choices=("student", "teacher"), default="student",
                        help="which network of the checkpoint (default: student)")
    parser.add_argument("--protocols", type=int, nargs="+", choices=sorted(PROTOCOLS),
                        default=None, metavar="P",
                        help="19 (GTA -> CS) and / or 16 13 (SYNTHIA -> CS) (eval.protocols)")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                        help="horizontal-flip test-time augmentation (eval.flip)")
    parser.add_argument("--scales", type=float, nargs="+", default=None, metavar="S",
                        help="multi-scale test-time augmentation, e.g. 0.75 1.0 1.25 (eval.scales)")
    parser.add_argument("--mode", choices=("whole", "slide"), default=None,
                        help="whole image or sliding window with eval.crop_size / eval.stride "
                             "(eval.mode)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (default: the checkpoint's folder)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                        help="where to run (experiment.device)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m cluda.evaluate`; see `--help`. Returns the exit status: 0, or 2 after a user
    error (one line on stderr, `cluda.errors.run_cli`)."""
    return run_cli(_main, argv)


def evaluation_stem(checkpoint: str | os.PathLike, *, split: str | None = None,
                    weights: str = "student") -> str:
    """`eval_<checkpoint>[_<split>][_teacher]`, the name of an evaluation's files."""
    split = split or "val"
    return (f"eval_{Path(checkpoint).stem}" + ("" if split == "val" else f"_{split}")
            + ("_teacher" if weights == "teacher" else ""))


def run(checkpoint: str | os.PathLike, *, config: str | os.PathLike | Config | None = None,
        overrides: Sequence[str] = (), weights: str = "student",
        out_dir: str | os.PathLike | None = None, progress: bool = True) -> dict[str, Any]:
    """Evaluate a checkpoint, print the tables and write its files (`render_evaluation`) into
    `out_dir` (default: the checkpoint's folder): `python -m cluda.evaluate` and
    `train.py --eval-only`. Returns `evaluate_checkpoint`'s dict."""
    out_dir = check_out_dir(out_dir if out_dir is not None else Path(checkpoint).parent)
    result = evaluate_checkpoint(checkpoint, config=config, overrides=overrides, weights=weights,
                                 progress=progress)
    if result["rank"] != 0:
        return result
    stem = evaluation_stem(checkpoint, split=result["config"].data.val.split, weights=weights)
    with input_errors():
        files = render_evaluation(result, stem)
    for p, m in result["metrics"].items():
        print(f"\n{p}-class protocol, per-class IoU (%), {result['num_images']} images:")
        print(format_table(m), end="")
    note_model_differences(result["model_differences"])
    written = atomic_write_files({out_dir / name: text for name, text in files.items()})
    summary = ", ".join(f"{100 * m['mIoU']:.2f} ({p} classes)"
                        for p, m in result["metrics"].items())
    print(f"\nmIoU {summary}; wrote {', '.join(str(p) for p in written)}")
    return result


def _main(argv: Sequence[str] | None) -> int:
    args, overrides = parse_cli(_eval_parser(), argv)
    run(args.checkpoint, config=args.config, overrides=overrides + flag_overrides(args),
        weights=args.weights, out_dir=args.out, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())

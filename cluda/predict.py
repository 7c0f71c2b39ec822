"""Predicting images with a checkpoint, and the CLUDA paper's comparison figure (Vayyat et al.,
Figure 3: input / ground truth / source-only / adapted): the command lines. The outputs'
layout and formats (colour maps, overlays, benchmark-ready id PNGs) are `cluda.visualize`'s.

Command lines (`main`, see `--help`):

    python -m cluda.predict --checkpoint CKPT IMAGES_OR_DIRS... --out DIR
        [--mode whole|slide] [--device cpu|cuda] [--config C] [--section.key=value ...]
    python -m cluda.predict compare --checkpoints SOURCE_ONLY.pt ADAPTED.pt [--config C]
        [--num 4] --out FIG.png

The first (`predict_files`) lists and decodes every input, loads the checkpoint and estimates
each image's inference memory (`cluda.inference_memory`: an image that cannot fit is refused
with a remedy) before it writes anything, then writes each image's four PNGs atomically as soon as it is predicted: bad
input (an unreadable image, named in the message) writes nothing, and an interruption later
leaves only complete outputs. The second (`compare_checkpoints`) predicts every panel first
and writes the figure last. Predictions use the evaluation's pipeline (`data.val.scale`
resize, `eval` mode and test-time augmentation, probabilities brought back to the image's
full resolution), so they are exactly the maps `python -m cluda.evaluate` scores.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from cluda.build import build_val_dataset
from cluda.checkpoint import load_model_from_checkpoint
from cluda.cli import check_out_dir, flag_overrides, note_model_differences, parse_cli
from cluda.data.io import read_image
from cluda.data.transforms import denormalize, rescale_size
from cluda.device import autocast, resolve_device
from cluda.errors import EXIT_STATUS_HELP, InputError, input_errors, run_cli
from cluda.inference import make_predict_fn, predict_image, predict_probs
from cluda.inference_memory import MemoryCheck
from cluda.visualize import comparison_figure, overlay, save_prediction, trainid_to_labelid

__all__ = ["IMAGE_SUFFIXES", "list_images", "check_images", "check_memory", "predict_files",
           "compare_checkpoints", "main",
           # cluda.visualize's, under the names this module has always had
           "trainid_to_labelid", "overlay", "save_prediction", "comparison_figure"]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


def list_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files named on the command line: files as given, folders searched recursively for
    `IMAGE_SUFFIXES` (sorted; hidden files skipped). A file listed twice is kept once.

    Raises:
        InputError: a path that does not exist, a folder without images, or two images whose
            outputs would share a name (outputs are named by the file's stem).
    """
    files: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(f for f in path.rglob("*")
                           if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                           and not f.name.startswith("."))
            if not found:
                raise InputError(f"no image files ({' '.join(IMAGE_SUFFIXES)}) under {path}")
        elif path.is_file():
            found = [path]
        else:
            raise InputError(f"no image file or folder at {path}")
        for f in found:
            if f.resolve() not in seen:
                seen.add(f.resolve())
                files.append(f)
    by_stem: dict[str, Path] = {}
    for f in files:
        if f.stem in by_stem:
            raise InputError(f"{by_stem[f.stem]} and {f} would write the same outputs "
                             f"({f.stem}_*.png); predict them into separate --out folders")
        by_stem[f.stem] = f
    return files


def check_images(files: Sequence[Path]) -> None:
    """Decode every image once, before anything is written; InputError naming each one that
    cannot be read (all of them, on one line)."""
    bad = []
    for f in files:
        try:
            read_image(f)
        except (ValueError, FileNotFoundError, PermissionError) as err:
            bad.append(" ".join(str(err).split()))
    if len(bad) == 1:
        raise InputError(bad[0])
    if bad:
        raise InputError(f"{len(bad)} of {len(files)} images cannot be read: " + "; ".join(bad))


def check_memory(files: Sequence[Path], check: MemoryCheck, *,
                 scale: Sequence[int] | None) -> None:
    """Refuse, before anything is predicted or written, an image whose inference cannot fit in
    memory (`cluda.inference_memory`): its network input is its size after the keep-ratio
    resize to `scale`, its scores come out at its full size."""
    for f in files:
        with Image.open(f) as im:  # the header: the size
            full_width, full_height = im.size
        width, height = (full_width, full_height) if scale is None else \
            rescale_size(full_width, full_height, tuple(scale))
        check((1, 3, height, width), (full_height, full_width), what=str(f))


def predict_files(checkpoint: str | os.PathLike, inputs: Sequence[str | os.PathLike],
                  out_dir: str | os.PathLike, *, config: str | os.PathLike | None = None,
                  overrides: Sequence[str] = (), weights: str = "student", alpha: float = 0.5,
                  progress: bool = True) -> list[dict[str, Path]]:
    """Predict image files with a checkpoint and save each as colour / overlay / trainId /
    labelId PNGs (`save_prediction`, layout in the module docstring).

    Every input is listed and decoded and the network is loaded before the first file is
    written, so bad input writes nothing; each image's four files are then written atomically
    as soon as it is predicted. Resize, inference mode and test-time augmentation follow the
    config's `data.val.scale` and `eval` section, as in evaluation.

    Args:
        checkpoint: a checkpoint written by `train.py`.
        inputs: image files and / or folders (searched recursively).
        out_dir: output root.
        config / overrides / weights: as `cluda.checkpoint.load_model_from_checkpoint`.
        alpha: weight of the colours in the overlays.
        progress: show a tqdm bar.

    Returns:
        `save_prediction`'s paths, one dict per image, in input order.

    Raises:
        InputError: see `list_images`, `check_images`, `load_model_from_checkpoint`; or an image the
            network rejects (e.g. smaller than MiT's minimum), naming it, after the images
            before it were written.
        UserError: an image whose inference would not fit in memory (`check_memory`), before
            anything is written.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise InputError(f"alpha must lie in [0, 1], got {alpha}")
    out_dir = check_out_dir(out_dir)
    files = list_images(inputs)
    check_images(files)
    model, cfg, info = load_model_from_checkpoint(checkpoint, config=config, overrides=overrides,
                                                  weights=weights)
    note_model_differences(info["model_differences"])
    device = resolve_device(cfg)
    model.to(device)
    check_memory(files, MemoryCheck(model, cfg, device), scale=cfg.data.val.scale)
    predict_fn = make_predict_fn(model, cfg)
    written = []
    for f in tqdm(files, disable=not progress, desc="predict"):
        image = read_image(f)
        try:
            with autocast(cfg, device):
                pred = predict_image(predict_fn, image, scale=cfg.data.val.scale,
                                     num_classes=cfg.model.num_classes, flip=cfg.eval.flip,
                                     scales=cfg.eval.scales, device=device)
        except ValueError as err:  # the network's own input checks, e.g. an image too small
            raise InputError(f"cannot predict {f}: {' '.join(str(err).split())} (the "
                             f"{len(written)} images before it are written)") from err
        written.append(save_prediction(pred, out_dir, f.stem, image=image, alpha=alpha))
    return written


def _spread(n: int, num: int) -> list[int]:
    """`num` indices spread evenly over range(n), first and last included."""
    if num == 1:
        return [0]
    return [round(i * (n - 1) / (num - 1)) for i in range(num)]


def compare_checkpoints(checkpoints: Sequence[str | os.PathLike], out_path: str | os.PathLike, *,
                        config: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                        weights: str = "student", num: int = 4,
                        indices: Sequence[int] | None = None,
                        titles: Sequence[str] = ("source only", "adapted"),
                        panel_width: int | None = None, progress: bool = True) -> np.ndarray:
    """The CLUDA paper's Figure 3 from checkpoints: per validation image, the input, its ground
    truth and each checkpoint's prediction at the label's resolution (`comparison_figure`).

    Each network is run as `cluda.evaluate` would run it: built from its own stored config
    (or from `config`), with that config's inference mode and test-time augmentation. The
    images come from the validation split of `config`, or else of the last checkpoint's stored
    config (overrides apply everywhere, e.g. `--data.val.root=...`).

    Args:
        checkpoints: one or more checkpoints, one column each (the paper: source-only, adapted).
        out_path: the PNG to write (atomically, after every prediction is made).
        config / overrides / weights: as `cluda.checkpoint.load_model_from_checkpoint`.
        num: how many validation images, spread evenly over the split (ignored with `indices`).
        indices: explicit validation-set indices, one row each.
        titles: column titles of the predictions, one per checkpoint.
        panel_width: width of each panel; default min(512, image width).
        progress: show a tqdm bar.

    Returns:
        The figure, (H_fig, W_fig, 3) uint8.
    """
    if not checkpoints:
        raise InputError("name at least one checkpoint")
    titles = [str(t) for t in titles]
    if len(titles) != len(checkpoints):
        raise InputError(f"{len(checkpoints)} checkpoints need {len(checkpoints)} titles, got "
                         f"{titles}")
    out_path = Path(out_path)
    if out_path.is_dir():
        raise InputError(f"--out {out_path} is a folder; name the PNG file to write")
    if panel_width is not None and panel_width < 1:
        raise InputError(f"panel width must be a positive number of pixels, got {panel_width}")
    loaded = [load_model_from_checkpoint(c, config=config, overrides=overrides, weights=weights)
              for c in checkpoints]
    for _, _, info in loaded:
        note_model_differences(info["model_differences"])
    data_cfg = loaded[-1][1]
    device = resolve_device(data_cfg)
    with input_errors():
        val = build_val_dataset(data_cfg)
    n = len(val)
    if indices is not None:
        indices = [int(i) for i in indices]
        wrong = [i for i in indices if not 0 <= i < n]
        if wrong or not indices:
            raise InputError(f"indices {wrong or indices} are not in the validation set of "
                             f"{n} images (0..{n - 1})")
    else:
        if num < 1 or num > n:
            raise InputError(f"--num {num}: the validation set holds {n} images")
        indices = _spread(n, num)
    runs = []
    for model, cfg, _ in loaded:
        model.to(device)
        runs.append((make_predict_fn(model, cfg), cfg, MemoryCheck(model, cfg, device)))
    rows = []
    for i in tqdm(indices, disable=not progress, desc="compare"):
        with input_errors():
            sample = val[i]
        img, label = sample["img"], sample["label"]  # (3, h, w) normalised, (H, W) train ids
        for _, _, check in runs:
            check((1, *img.shape), label.shape, what=sample["path"])
        height, width = label.shape
        rgb = denormalize(img)  # (h, w, 3) uint8, at the resized input's size
        if rgb.shape[:2] != (height, width):
            rgb = np.asarray(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))
        row = [rgb, label.numpy()]
        for predict_fn, cfg, _ in runs:
            with autocast(cfg, device):
                probs = predict_probs(predict_fn, img[None].to(device), out_size=(height, width),
                                      num_classes=cfg.model.num_classes, flip=cfg.eval.flip,
                                      scales=cfg.eval.scales)
            row.append(probs.argmax(dim=1)[0].to(torch.uint8).cpu().numpy())
        rows.append(row)
    width = panel_width if panel_width is not None else min(512, rows[0][0].shape[1])
    return comparison_figure(rows, out_path, titles=("input", "ground truth", *titles),
                             panel_width=width)


def _predict_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cluda.predict", allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Predict images with a train.py checkpoint: colourised predictions (Cityscapes\n"
            "palette), overlays on the input, and train-id / label-id PNGs, all at each image's\n"
            "full resolution. The network, its input resize (data.val.scale), inference mode\n"
            "and test-time augmentation (eval.*) come from the checkpoint's stored config (or\n"
            "--config); --section.key=value arguments override it.\n\n"
            "Sub-command: python -m cluda.predict compare ...  (the side-by-side figure from two\n"
            "checkpoints; see python -m cluda.predict compare --help)."),
        epilog=(
            "writes, under --out:\n"
            "  color/<stem>_color.png        Cityscapes palette\n"
            "  overlay/<stem>_overlay.png    palette blended over the input (--alpha)\n"
            "  trainIds/<stem>_trainIds.png  train ids 0..18\n"
            "  labelIds/<stem>_labelIds.png  Cityscapes label ids: submit this folder to the\n"
            "                                Cityscapes benchmark (stems <city>_<seq>_<frame>...)\n"
            "every input is decoded, the checkpoint loaded and each image's inference memory\n"
            "estimated (an image that cannot fit is refused: see the README) before anything is\n"
            "written; each image's files are then written atomically as it is predicted.\n\n"
            "examples:\n"
            "  python -m cluda.predict --checkpoint work_dirs/demo/latest.pt street.png --out preds\n"
            "  python -m cluda.predict --checkpoint latest.pt /data/cityscapes/leftImg8bit/val \\\n"
            "      --out preds --mode slide\n\n" + EXIT_STATUS_HELP))
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR",
                        help="image files, or folders searched recursively for images")
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="a latest.pt / best.pt written by train.py")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    _common_arguments(parser)
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="weight of the colours in the overlays (default 0.5)")
    return parser


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="YAML",
                        help="build the network from this experiment instead of the "
                             "checkpoint's stored config (its model section must fit the weights)")
    parser.add_argument("--weights", choices=("student", "teacher"), default="student",
                        help="which network of the checkpoint (default: student)")
    parser.add_argument("--mode", choices=("whole", "slide"), default=None,
                        help="whole image or sliding window with eval.crop_size / eval.stride "
                             "(eval.mode)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                        help="where to run (experiment.device)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cluda.predict compare", allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "The CLUDA paper's Figure 3: for a few validation images, input / ground truth /\n"
            "prediction of each checkpoint side by side, as one PNG. Each checkpoint is run as\n"
            "python -m cluda.evaluate runs it (its stored config, or --config, plus\n"
            "--section.key=value overrides); the images come from the validation split of\n"
            "--config, or else of the last checkpoint's stored config."),
        epilog=(
            "example:\n"
            "  python -m cluda.predict compare --checkpoints source_only/latest.pt cluda/latest.pt \\\n"
            "      --num 4 --out figure3.png\n\n" + EXIT_STATUS_HELP))
    parser.add_argument("--checkpoints", nargs=2, required=True, metavar=("CKPT_A", "CKPT_B"),
                        help="e.g. the source-only and the adapted checkpoint")
    parser.add_argument("--out", required=True, metavar="FIG.png", help="the PNG to write")
    parser.add_argument("--num", type=int, default=4,
                        help="validation images, spread evenly over the split (default 4)")
    parser.add_argument("--indices", type=int, nargs="+", default=None, metavar="I",
                        help="these validation images instead of --num")
    parser.add_argument("--titles", nargs=2, default=("source only", "adapted"),
                        metavar=("TITLE_A", "TITLE_B"),
                        help="column titles of the two predictions (default: 'source only' "
                             "'adapted')")
    parser.add_argument("--panel-width", type=int, default=None, metavar="PX",
                        help="width of each panel (default: the image width, at most 512)")
    _common_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m cluda.predict [compare]`; see `--help`. Returns the exit status: 0, or 2
    after a user error (one line on stderr, `cluda.errors.run_cli`)."""
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    compare = argv[:1] == ["compare"]
    if compare:
        args, overrides = parse_cli(_compare_parser(), argv[1:])
    else:
        args, overrides = parse_cli(_predict_parser(), argv, intermixed=True)
    overrides = overrides + flag_overrides(args)
    if compare:
        figure = compare_checkpoints(
            args.checkpoints, args.out, config=args.config, overrides=overrides,
            weights=args.weights, num=args.num, indices=args.indices, titles=args.titles,
            panel_width=args.panel_width, progress=not args.no_progress)
    else:
        written = predict_files(args.checkpoint, args.inputs, args.out, config=args.config,
                                overrides=overrides, weights=args.weights, alpha=args.alpha,
                                progress=not args.no_progress)
    if compare:
        print(f"wrote {args.out} ({figure.shape[1]} x {figure.shape[0]} px)")
    else:
        kinds = "color/, overlay/, trainIds/, labelIds/"
        print(f"wrote {len(written)} predictions under {args.out} ({kinds}); labelIds/ is the "
              "Cityscapes benchmark's format")
    return 0


if __name__ == "__main__":
    sys.exit(main())

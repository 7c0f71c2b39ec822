"""Looking at predictions: colourised label maps, overlays, benchmark-ready id PNGs and the
side-by-side comparison figure of the CLUDA paper (Vayyat et al., Figure 3: input / ground truth /
source-only / adapted).

Output layout of `save_prediction(pred, out_dir, name)`:

    out_dir/color/<name>_color.png         Cityscapes palette (ignored pixels black)
    out_dir/overlay/<name>_overlay.png     palette alpha-blended over the input (if given)
    out_dir/trainIds/<name>_trainIds.png   8-bit, train ids 0..18, 255 = ignore
    out_dir/labelIds/<name>_labelIds.png   8-bit, Cityscapes label ids (7 road ... 33 bicycle)

The label-id PNGs follow the Cityscapes benchmark (cityscapesScripts'
`evalPixelLevelSemanticLabeling.py`): single-channel images at the ground truth's resolution whose
pixels are the regular label ids, not train ids; a prediction is matched to a ground-truth file
`<city>_<seq>_<frame>_gtFine_labelIds.png` by the pattern `<city>_<seq>_<frame>*.png`, searched
recursively under the results folder, and more than one match is an error. Hence each kind of
output has its own sub-folder: submit (or point CITYSCAPES_RESULTS at) `out_dir/labelIds` alone,
and pass names that start with `<city>_<seq>_<frame>` (the image's file stem, e.g.
`frankfurt_000000_000294_leftImg8bit`, works). Ignored pixels (train id 255) are written as label
id 0, "unlabeled".

Every file is written atomically (temporary file + `os.replace`, see
`cluda.fileio.atomic_write_files`), and all images of one call are encoded before any is
written, so bad input leaves nothing half-written.

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
import io
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from cluda.data.io import read_image
from cluda.data.labels import IGNORE_INDEX, NUM_CLASSES, TRAINID_TO_CITYSCAPES_ID, colorize
from cluda.data.transforms import denormalize, normalize, rescale_size, resize
from cluda.errors import EXIT_STATUS_HELP, run_cli
from cluda.evaluate import (InputError, atomic_write_files, check_out_dir, flag_overrides,
                            input_errors, note_model_differences, parse_cli, predict_probs)
from cluda.experiment import (autocast, build_val_dataset, load_model_from_checkpoint,
                              make_predict_fn, resolve_device)
from cluda.inference_memory import MemoryCheck

__all__ = ["read_image", "trainid_to_labelid", "overlay", "save_prediction", "comparison_figure",
           "IMAGE_SUFFIXES", "list_images", "check_images", "check_memory", "predict_image", "predict_files",
           "compare_checkpoints", "main"]

# Train id -> Cityscapes label id, 256 entries so any uint8 indexes it; 255 and unused -> 0.
_LABELID_LUT = np.zeros(256, dtype=np.uint8)
for _t, _i in TRAINID_TO_CITYSCAPES_ID.items():
    _LABELID_LUT[_t] = _i


def _ids_array(pred: Any, what: str = "pred") -> np.ndarray:
    """(H, W) integer train ids (tensor on any device, or array) -> uint8 numpy, checked to hold
    only 0..NUM_CLASSES-1 and IGNORE_INDEX."""
    if isinstance(pred, torch.Tensor):
        pred = pred.detach().cpu().numpy()
    pred = np.asarray(pred)
    if pred.ndim != 2:
        raise ValueError(f"{what} must be a (H, W) map of train ids, got shape {pred.shape}")
    if not np.issubdtype(pred.dtype, np.integer):
        raise TypeError(f"{what} must hold integer train ids, got dtype {pred.dtype}")
    bad = (pred < 0) | ((pred >= NUM_CLASSES) & (pred != IGNORE_INDEX))
    if bad.any():
        raise ValueError(f"{what} holds values outside 0..{NUM_CLASSES - 1} and {IGNORE_INDEX}: "
                         f"{np.unique(pred[bad])[:10].tolist()}")
    return pred.astype(np.uint8)


def _rgb_array(image: Any, what: str = "image") -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{what} must be (H, W, 3) RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise TypeError(f"{what} must be uint8, got dtype {image.dtype}")
    return image


def trainid_to_labelid(pred: Any) -> np.ndarray:
    """(H, W) train ids -> (H, W) uint8 Cityscapes label ids (255 -> 0, "unlabeled")."""
    return _LABELID_LUT[_ids_array(pred)]


def overlay(pred: Any, image: Any, *, alpha: float = 0.5) -> np.ndarray:
    """Blend the colourised prediction over the image: (1 - alpha) * image + alpha * colour,
    rounded; ignored pixels show the image unchanged.

    Args:
        pred: (H, W) train ids.
        image: (H, W, 3) uint8 RGB of the same size.
        alpha: weight of the colours, in [0, 1].

    Returns:
        (H, W, 3) uint8.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    ids = _ids_array(pred)
    image = _rgb_array(image)
    if image.shape[:2] != ids.shape:
        raise ValueError(f"image size {image.shape[:2]} differs from the prediction's {ids.shape}")
    blend = (1.0 - alpha) * image.astype(np.float32) + alpha * colorize(ids).astype(np.float32)
    out = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    ignored = ids == IGNORE_INDEX
    out[ignored] = image[ignored]
    return out


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or "/" in name or os.sep in name \
            or name in (".", ".."):
        raise ValueError(f"name must be a plain file name without directories, got {name!r}")


def save_prediction(pred: Any, out_dir: str | os.PathLike, name: str, *,
                    image: Any = None, alpha: float = 0.5) -> dict[str, Path]:
    """Write one prediction as colour, overlay, train-id and label-id PNGs (layout in the module
    docstring), atomically.

    Args:
        pred: (H, W) integer train ids (tensor on any device or numpy), 255 = ignore.
        out_dir: output root; the sub-folders are created.
        name: file-name prefix, e.g. the image's stem; no directories.
        image: optional (H, W, 3) uint8 RGB input, for the overlay.
        alpha: weight of the colours in the overlay.

    Returns:
        {"color", "trainIds", "labelIds"[, "overlay"]: path written}.
    """
    _check_name(name)
    ids = _ids_array(pred)
    out_dir = Path(out_dir)
    # Encode everything before writing anything.
    files = {
        "color": (out_dir / "color" / f"{name}_color.png", _png(colorize(ids))),
        "trainIds": (out_dir / "trainIds" / f"{name}_trainIds.png", _png(ids)),
        "labelIds": (out_dir / "labelIds" / f"{name}_labelIds.png", _png(_LABELID_LUT[ids])),
    }
    if image is not None:
        files["overlay"] = (out_dir / "overlay" / f"{name}_overlay.png",
                            _png(overlay(ids, image, alpha=alpha)))
    atomic_write_files({path: data for path, data in files.values()})
    return {key: path for key, (path, _) in files.items()}


def _panel(panel: Any, where: str) -> tuple[np.ndarray, bool]:
    """A figure panel -> ((H, W, 3) uint8, is_label). (H, W, 3) uint8 is shown as is; (H, W)
    integer train ids are colourised."""
    if isinstance(panel, torch.Tensor):
        panel = panel.detach().cpu().numpy()
    panel = np.asarray(panel)
    if panel.ndim == 2:
        return colorize(_ids_array(panel, where)), True
    return _rgb_array(panel, where), False


def _title_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType: the bitmap font
        return ImageFont.load_default()


def comparison_figure(rows: Sequence[Sequence[Any]], out_path: str | os.PathLike, *,
                      titles: Sequence[str] = ("input", "ground truth", "source only", "adapted"),
                      panel_width: int | None = None, gap: int = 4) -> np.ndarray:
    """One PNG with a row per image and a column per title, like the CLUDA paper's Figure 3.

    Each panel is either an (H, W, 3) uint8 RGB image (shown as is) or an (H, W) map of integer
    train ids (colourised with the Cityscapes palette, ignored pixels black). The panels of a row
    must share one size; every panel is scaled to `panel_width` (bilinear for images, nearest for
    label maps, so their colours stay exact). A white title strip on top names the columns, and
    `gap` white pixels separate panels. The figure's height is title_height + sum of the row
    heights + gap * (rows - 1); its width columns * panel_width + gap * (columns - 1).

    Args:
        rows: per image, one panel per title (e.g. input, ground truth, source-only prediction,
            adapted prediction).
        out_path: the PNG to write (atomically; parent folders are created).
        titles: column titles.
        panel_width: width of each panel in pixels; default the first panel's width.
        gap: white pixels between panels.

    Returns:
        The figure, (H_fig, W_fig, 3) uint8, as written.
    """
    titles = [str(t) for t in titles]
    if not titles:
        raise ValueError("titles must name at least one column")
    if not rows:
        raise ValueError("rows must hold at least one row of panels")
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 0:
        raise ValueError(f"gap must be a non-negative int, got {gap!r}")
    panels = []
    for r, row in enumerate(rows):
        if len(row) != len(titles):
            raise ValueError(f"row {r} has {len(row)} panels but there are {len(titles)} titles")
        row_panels = [_panel(p, f"panel ({r}, {c})") for c, p in enumerate(row)]
        sizes = {p.shape[:2] for p, _ in row_panels}
        if len(sizes) != 1:
            raise ValueError(f"the panels of row {r} differ in size: {sorted(sizes)}")
        panels.append(row_panels)
    if panel_width is None:
        panel_width = panels[0][0][0].shape[1]
    if isinstance(panel_width, bool) or not isinstance(panel_width, int) or panel_width < 1:
        raise ValueError(f"panel_width must be a positive int, got {panel_width!r}")

    # Scale each row to the panel width, keeping its aspect ratio.
    scaled = []
    for row_panels in panels:
        h, w = row_panels[0][0].shape[:2]
        height = max(1, round(h * panel_width / w))
        out = []
        for array, is_label in row_panels:
            if (height, panel_width) != (h, w):
                resample = Image.NEAREST if is_label else Image.BILINEAR
                array = np.asarray(Image.fromarray(array).resize((panel_width, height), resample))
            out.append(array)
        scaled.append(out)

    # Title size follows the panel width; shrink it until the widest title fits its column.
    font_size = max(10, min(48, panel_width // 16))
    font = _title_font(font_size)
    def widest(f):
        return max(f.getbbox(t)[2] - f.getbbox(t)[0] for t in titles)

    while font_size > 8 and widest(font) > panel_width:
        font_size -= 1
        font = _title_font(font_size)
    title_height = int(font_size * 1.8)
    n_cols = len(titles)
    fig_w = n_cols * panel_width + gap * (n_cols - 1)
    fig_h = title_height + sum(r[0].shape[0] for r in scaled) + gap * (len(scaled) - 1)
    canvas = Image.new("RGB", (fig_w, fig_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        left, top, right, bottom = draw.textbbox((0, 0), title, font=font)
        x = c * (panel_width + gap) + (panel_width - (right - left)) // 2 - left
        y = (title_height - (bottom - top)) // 2 - top
        draw.text((x, y), title, fill=(0, 0, 0), font=font)
    y = title_height
    for row in scaled:
        for c, array in enumerate(row):
            canvas.paste(Image.fromarray(array), (c * (panel_width + gap), y))
        y += row[0].shape[0] + gap
    figure = np.asarray(canvas).copy()
    atomic_write_files({Path(out_path): _png(figure)})
    return figure


# --------------------------------------------------------------------------------------------
# Predicting images with a checkpoint, and the command lines
# --------------------------------------------------------------------------------------------

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


@torch.no_grad()
def predict_image(predict_fn: Callable[[torch.Tensor], torch.Tensor], image: np.ndarray, *,
                  scale: Sequence[int] | None = None, num_classes: int = NUM_CLASSES,
                  flip: bool = False, scales: Sequence[float] = (1.0,),
                  device: torch.device | str = "cpu") -> np.ndarray:
    """Train ids of one image at its full resolution, as the evaluation computes them.

    The image is resized to `scale` (keep-ratio (long, short) bounds, as `data.val.scale` in
    evaluation) and normalised; the class probabilities (`cluda.evaluate.predict_probs`, with
    the same test-time augmentation) are brought back to the image's size before the argmax.

    Args:
        predict_fn: img (1, 3, h, w) -> logits (1, K, h', w'), e.g. from
            `cluda.experiment.make_predict_fn`.
        image: (H, W, 3) uint8 RGB.
        scale: (long, short) resize bounds, or None to run at full resolution.
        num_classes: K.
        flip / scales: test-time augmentation.
        device: where the input goes (the model's device).

    Returns:
        (H, W) uint8 train ids.
    """
    image = _rgb_array(image)
    resized, _ = resize(image, None, scale=None if scale is None else tuple(scale))
    x = normalize(resized)[None].to(device)  # (1, 3, h, w)
    probs = predict_probs(predict_fn, x, out_size=image.shape[:2], num_classes=num_classes,
                          flip=flip, scales=scales)  # (1, K, H, W)
    return probs.argmax(dim=1)[0].to(torch.uint8).cpu().numpy()


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
        config / overrides / weights: as `cluda.experiment.load_model_from_checkpoint`.
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
        config / overrides / weights: as `cluda.experiment.load_model_from_checkpoint`.
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

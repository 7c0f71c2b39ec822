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
written, so bad input leaves nothing half-written. The command lines are `cluda.predict`'s.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from cluda.data.labels import IGNORE_INDEX, NUM_CLASSES, TRAINID_TO_CITYSCAPES_ID, colorize
from cluda.fileio import atomic_write_files

__all__ = ["trainid_to_labelid", "overlay", "save_prediction", "comparison_figure"]

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

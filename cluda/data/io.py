"""Reading and writing the image and label files of the segmentation data sets.

Every reader names the file in its error, fully decodes it (so a truncated file fails here, not
later in a worker) and returns numpy arrays:

- `read_image`: (H, W, 3) uint8 RGB, the one image reader of the data sets, `cluda.predict` and
  `python -m cluda.data.prepare --check`. Grey, palette and alpha images are converted. 16-bit
  images (grey or colour PNG / TIFF) keep the high byte of each sample, v // 256 (within one
  level of v * 255 / 65535; what Pillow does for 16-bit colour and libpng's `png_set_strip_16`
  does): Pillow's own `convert("RGB")` clips 16-bit grey to 255, a solid white frame. A 16-bit
  image whose values all lie below 256 is refused by name: its meaning is ambiguous (8-bit data
  stored in a 16-bit file, which keeping the high byte would turn black, or an almost black
  image). 32-bit integer and floating-point images have no agreed range and are refused too.
- `read_label`: (H, W) integer ids as stored, 8- or 16-bit. For multi-channel 16-bit PNGs
  (SYNTHIA's `GT/LABELS/*.png`: class id in the first channel, instance id in the second) the
  first channel is returned. Pillow decodes 16-bit RGB / RGBA PNGs to 8 bits by keeping the high
  byte of each sample, which would turn every SYNTHIA class id (< 256) into 0; `read_label` decodes
  such files twice, once keeping the high and once the low byte, and recombines them.

Unreadable or refused files raise `cluda.errors.DataError` (a ValueError) naming the file;
missing ones FileNotFoundError.

- `write_png_atomic`: 8-bit PNG through `cluda.fileio.atomic_open`, so that an interrupted
  writer never leaves a half-written file under the final name.
"""
import os

import numpy as np
from PIL import Image

from cluda.errors import DataError
from cluda.fileio import atomic_open

# Pillow rawmodes that read the *low* byte of each big-endian 16-bit sample: the "...;16L"
# unpackers take the second byte of each pair, which for PNG's big-endian data is the low byte.
_LOW_BYTE_RAWMODE = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}
_GREY16_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def _open(path, what):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        img = Image.open(path)
        img.load()
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError ... for bad files
        raise DataError(f"cannot read {what} {path}: {' '.join(str(e).split())}") from e
    return img


def _refuse_low_16bit(path, high_bytes, values):
    """A 16-bit image whose high bytes are all zero holds only values 0..255."""
    if not high_bytes.any():
        raise DataError(f"image {path} is 16-bit but all its values lie in 0..{int(values.max())}: "
                        "8-bit data stored in a 16-bit file, or an almost black image? Convert "
                        "it to 8 bits per channel (e.g. an 8-bit PNG) to say which")


def read_image(path):
    """Read an image file as (H, W, 3) uint8 RGB (16-bit images: see the module docstring).

    Args:
        path: image file (PNG, JPEG ... anything Pillow reads).

    Raises:
        FileNotFoundError: no file at `path`.
        DataError: the file cannot be decoded, or holds samples with no 8-bit meaning.
    """
    path = os.fspath(path)
    img = _open(path, "image")
    mode = img.mode
    if mode in _GREY16_MODES:
        wide = np.asarray(img).astype(np.uint16)  # (H, W), any byte order -> native
        high = (wide >> 8).astype(np.uint8)
        _refuse_low_16bit(path, high, wide)
        return np.repeat(high[..., None], 3, axis=2)
    if mode in ("I", "F") or mode.startswith("I;"):
        kind = "floating-point" if mode == "F" else "32-bit integer"
        raise DataError(f"image {path} holds {kind} samples (Pillow mode {mode}), which have no "
                        "agreed range: convert it to 8 bits per channel")
    if _png_bit_depth(path) == 16:
        # Pillow decodes 16-bit colour (and grey + alpha) to the high byte of each sample.
        rgb = np.asarray(img.convert("RGB"))
        _refuse_low_16bit(path, rgb, rgb)
        return rgb
    if mode != "RGB":
        try:
            img = img.convert("RGB")
        except (ValueError, OSError) as e:
            raise DataError(f"cannot read image {path}: Pillow mode {mode} does not convert "
                            f"to RGB ({e})") from e
    return np.asarray(img)


def _read_wide_png(path, img):
    """Full 16-bit first channel of a 16-bit RGB / RGBA PNG that Pillow opened with 8 bits."""
    high = np.asarray(img)[..., 0].astype(np.uint16)
    low_img = Image.open(path)
    tiles = list(low_img.tile)
    rawmode = tiles[0].args if tiles and isinstance(tiles[0].args, str) else None
    if rawmode not in _LOW_BYTE_RAWMODE or any(t.args != rawmode for t in tiles):
        raise DataError(f"cannot read 16-bit label {path}: unsupported PNG layout "
                         f"{[t.args for t in tiles]}")
    low_img.tile = [t._replace(args=_LOW_BYTE_RAWMODE[rawmode]) for t in tiles]
    try:
        low_img.load()
    except Exception as e:
        raise DataError(f"cannot read label {path}: {e}") from e
    low = np.asarray(low_img)[..., 0].astype(np.uint16)
    return (high << 8) | low


def read_label(path):
    """Read a label file as (H, W) integer ids (uint8 for 8-bit files, uint16 for 16-bit ones).

    Palette ("P") PNGs, like GTA5's labels, give their palette indices, which are the label ids.
    Multi-channel files give their first channel: this is SYNTHIA's layout (class id first), and
    for 8-bit colour files it is refused, because a colourised label is not an id map.

    Args:
        path: label file.
    """
    img = _open(path, "label")
    mode = img.mode
    if mode in ("L", "P"):
        return np.asarray(img)
    if mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(img).astype(np.uint16)
    if mode == "I":
        arr = np.asarray(img)
        if arr.min() < 0 or arr.max() > 65535:
            raise DataError(f"label file {path} holds ids outside [0, 65535]")
        return arr.astype(np.uint16)
    if mode in ("RGB", "RGBA") and _png_bit_depth(path) == 16:
        return _read_wide_png(path, img)
    raise DataError(f"label file {path} has mode {mode}: expected a single-channel id map "
                     f"(8-bit, 16-bit or palette) or a 16-bit multi-channel PNG (SYNTHIA)")


def _png_bit_depth(path):
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return head[24]


def write_png_atomic(path, array):
    """Write an (H, W) uint8 or (H, W, 3) uint8 array as a PNG under `path` atomically.

    The data go to a hidden temporary file in the same folder, which is then renamed over `path`,
    so readers see either the old file or the complete new one.

    Args:
        path: destination file (its folder must exist).
        array: uint8 array, (H, W) grey or (H, W, 3) RGB.
    """
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise TypeError(f"write_png_atomic takes (H, W) or (H, W, 3) uint8, got {array.dtype} "
                        f"{array.shape} for {path}")
    with atomic_open(path, "wb") as f:
        Image.fromarray(array).save(f, format="PNG")

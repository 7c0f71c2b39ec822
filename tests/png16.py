"""Test-only file writers (not a test module: no test_ prefix).

`write_png16`: a plain 16-bit PNG encoder (grey, grey + alpha, RGB, RGBA), which Pillow lacks for
more than one channel; the tests make SYNTHIA-like label files (class id in the first channel of a
16-bit RGB PNG) and 16-bit images with it, to check `cluda.data.io`'s readers against files whose
every byte they chose.
"""
import struct
import zlib

import numpy as np


def write_png16(path, array, *, filters=(0,)):
    """Write a 16-bit PNG (what Pillow cannot do for more than one channel).

    Args:
        path: destination file.
        array: (H, W) or (H, W, C) integer array with values in [0, 65535], C in 1..4
            (grey, grey + alpha, RGB, RGBA).
        filters: PNG row filter types (0 none, 1 sub, 2 up, 3 average, 4 paeth) used in turn, row
            by row; real encoders mix them, and a reader must undo each one.
    """
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.integer) or array.min() < 0 or array.max() > 65535:
        raise ValueError(f"write_png16 takes integers in [0, 65535], got {array.dtype} for {path}")
    if array.ndim == 2:
        array = array[:, :, None]
    h, w, c = array.shape
    if c not in (1, 2, 3, 4):
        raise ValueError(f"write_png16 takes 1 to 4 channels, got {c} for {path}")
    if any(f not in (0, 1, 2, 3, 4) for f in filters) or not filters:
        raise ValueError(f"PNG filter types are 0..4, got {filters}")
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    rows = array.astype(">u2").reshape(h, w * c).view(np.uint8).reshape(h, w * c * 2)
    rows = rows.astype(np.int32)
    bpp = 2 * c  # bytes per pixel: the distance the sub / average / paeth filters look back
    out = bytearray()
    prev = np.zeros(rows.shape[1], np.int32)
    for y in range(h):
        ftype = filters[y % len(filters)]
        cur = rows[y]
        left = np.concatenate([np.zeros(bpp, np.int32), cur[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), prev[:-bpp]])
        if ftype == 0:
            enc = cur
        elif ftype == 1:
            enc = cur - left
        elif ftype == 2:
            enc = cur - prev
        elif ftype == 3:
            enc = cur - (left + prev) // 2
        else:
            p = left + prev - upleft
            pa, pb, pc = np.abs(p - left), np.abs(p - prev), np.abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
            enc = cur - pred
        out.append(ftype)
        out += (enc % 256).astype(np.uint8).tobytes()
        prev = cur

    def chunk(tag, data):
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(bytes(out))) + chunk(b"IEND", b""))

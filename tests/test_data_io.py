"""Label / image file reading: 16-bit PNGs (SYNTHIA), palette PNGs (GTA5), bad files."""
import numpy as np
import pytest
from PIL import Image

from cluda.data.io import read_image, read_label, write_png16, write_png_atomic


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("filters", [(0,), (1,), (2,), (3,), (4,), (0, 1, 2, 3, 4)])
def test_png16_roundtrip_every_filter(tmp_path, channels, filters):
    rng = np.random.default_rng(channels * 10 + len(filters))
    shape = (7, 13) if channels == 1 else (7, 13, channels)
    arr = rng.integers(0, 65536, size=shape).astype(np.uint16)
    path = str(tmp_path / "x.png")
    write_png16(path, arr, filters=filters)
    got = read_label(path)
    want = arr if channels == 1 else arr[..., 0]
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, want)


def test_synthia_style_label_keeps_low_byte(tmp_path):
    # class ids < 256 live entirely in the low byte, which Pillow's own 8-bit decoding drops
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 23, size=(9, 11)).astype(np.uint16)
    inst = rng.integers(0, 3000, size=(9, 11)).astype(np.uint16)
    path = str(tmp_path / "0000001.png")
    write_png16(path, np.stack([ids, inst, np.zeros_like(ids)], -1), filters=(4, 1))
    assert np.asarray(Image.open(path))[..., 0].max() == 0  # what plain Pillow would give
    np.testing.assert_array_equal(read_label(path), ids)


def test_palette_label_gives_indices(tmp_path):
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 34, size=(6, 8)).astype(np.uint8)
    img = Image.fromarray(ids, mode="P")
    img.putpalette(list(rng.integers(0, 256, size=768)))
    path = str(tmp_path / "p.png")
    img.save(path)
    np.testing.assert_array_equal(read_label(path), ids)


def test_colour_label_refused(tmp_path):
    path = str(tmp_path / "colour.png")
    rgb = np.random.default_rng(3).integers(0, 255, (4, 4, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(path)
    with pytest.raises(ValueError, match="colour.png"):
        read_label(path)


def test_missing_and_truncated_files_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        read_image(str(tmp_path / "nothere.png"))
    path = str(tmp_path / "trunc.png")
    write_png_atomic(path, np.random.default_rng(4).integers(0, 255, (40, 40, 3)).astype(np.uint8))
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="trunc.png"):
        read_image(path)
    with pytest.raises(ValueError, match="trunc.png"):
        read_label(path)


def test_write_png_atomic_leaves_no_temporary(tmp_path):
    arr = np.random.default_rng(5).integers(0, 255, (5, 6)).astype(np.uint8)
    path = tmp_path / "a.png"
    write_png_atomic(str(path), arr)
    np.testing.assert_array_equal(read_label(str(path)), arr)
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]
    with pytest.raises(TypeError):
        write_png_atomic(str(path), arr.astype(np.float32))

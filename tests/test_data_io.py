"""Label / image file reading: 16-bit PNGs (SYNTHIA), palette PNGs (GTA5), bad files."""
import numpy as np
import pytest
from PIL import Image

from cluda.data.io import read_image, read_label, write_png_atomic
from png16 import write_png16


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


# ---- 16-bit and other wide images: one reader for the data sets and cluda.predict ----

def _readers():
    from cluda.predict import read_image as predict_read_image
    return [read_image, predict_read_image]


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16bit_images_keep_their_high_byte(tmp_path, channels):
    # Pillow's Image.convert("RGB") clips 16-bit grey ("I;16") to 255: a solid white frame.
    rng = np.random.default_rng(20 + channels)
    shape = (9, 14) if channels == 1 else (9, 14, channels)
    arr = rng.integers(0, 65536, size=shape).astype(np.uint16)
    arr.flat[0] = 1000  # some pixels well below 255 * 256, so clipping would show
    path = tmp_path / f"wide{channels}.png"
    write_png16(str(path), arr)
    colour = arr[..., :3] if channels >= 3 else np.repeat((arr if channels == 1 else
                                                           arr[..., 0])[..., None], 3, axis=2)
    want = (colour >> 8).astype(np.uint8)  # v // 256, within one level of v * 255 / 65535
    for reader in _readers():
        got = reader(path)
        assert got.dtype == np.uint8 and got.shape == (9, 14, 3)
        np.testing.assert_array_equal(got, want)


def test_16bit_image_with_only_8bit_values_is_refused_by_name(tmp_path):
    # 8-bit data stored in a 16-bit file (or an all but black image): scaling would give a
    # black frame, keeping the values would be a guess. Refused, naming the file.
    arr = np.random.default_rng(30).integers(0, 256, size=(6, 8)).astype(np.uint16)
    path = tmp_path / "low16.png"
    write_png16(str(path), arr)
    for reader in _readers():
        with pytest.raises(ValueError, match=r"low16\.png.*16-bit.*0\.\.2\d\d"):
            reader(path)


def test_float_and_32bit_images_are_refused_by_name(tmp_path):
    rng = np.random.default_rng(31)
    Image.fromarray(rng.random((5, 6)).astype(np.float32)).save(tmp_path / "f.tif")
    Image.fromarray(rng.integers(0, 2**20, (5, 6)).astype(np.int32)).save(tmp_path / "i.tif")
    for name in ("f.tif", "i.tif"):
        for reader in _readers():
            with pytest.raises(ValueError, match=rf"{name}.*8 bits"):
                reader(tmp_path / name)


def test_data_sets_read_16bit_images(tmp_path):
    from cluda.data.datasets import GTADataset
    from cluda.data.transforms import denormalize

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    rng = np.random.default_rng(32)
    grey = rng.integers(0, 65536, size=(8, 10)).astype(np.uint16)
    write_png16(str(tmp_path / "images" / "00001.png"), grey)
    Image.fromarray(rng.integers(0, 34, (8, 10)).astype(np.uint8)).save(
        tmp_path / "labels" / "00001.png")
    img = denormalize(GTADataset(str(tmp_path))[0]["img"])
    want = np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, axis=2)
    assert np.abs(img.astype(int) - want).max() <= 1  # normalisation round trip

"""Training and test transforms of DAFormer / HRDA (Hoyer et al., CVPR 2022 and ECCV 2022), which
are mmsegmentation's pipeline: keep-ratio resize, random crop with a category-max ratio, flip,
ImageNet normalisation, padding to the crop size.

Everything works on (H, W, 3) uint8 images and (H, W) integer label maps until `normalize`, and
every random choice comes from a `numpy.random.Generator` that the caller passes in, so a sample
is a pure function of (data, generator state).

Training scales (mmseg's `img_scale`, (long side, short side) bounds, aspect ratio kept):
DAFormer GTA 1280 x 720, SYNTHIA 1280 x 760, Cityscapes 1024 x 512 with 512 x 512 crops; HRDA
twice those scales with 1024 x 1024 crops.
"""
import numpy as np
import torch
from PIL import Image

from .labels import IGNORE_INDEX

# ImageNet statistics on 0..255 RGB (mmseg's img_norm_cfg with to_rgb=True); cluda.augment's
# IMAGENET_MEAN / IMAGENET_STD are the same on 0..1 (timm's and torchvision's convention).
IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)

# (long side, short side) bounds of the resize, per data set.
DAFORMER_SCALES = {"gta": (1280, 720), "synthia": (1280, 760), "cityscapes": (1024, 512)}
HRDA_SCALES = {k: (2 * a, 2 * b) for k, (a, b) in DAFORMER_SCALES.items()}


def rescale_size(width, height, scale):
    """New (width, height) of an image resized, aspect ratio kept, to fit the (long, short) bounds
    `scale` as tightly as possible (mmcv's `rescale_size`): factor = min(long / max(w, h),
    short / min(w, h)).

    Args:
        width, height: current size in pixels.
        scale: (long side, short side) bounds, e.g. (1280, 720).
    """
    long_side, short_side = max(scale), min(scale)
    factor = min(long_side / max(width, height), short_side / min(width, height))
    return max(1, int(width * factor + 0.5)), max(1, int(height * factor + 0.5))


def rescale(img, label, *, scale, resize_label=True):
    """Keep-ratio resize: the image bilinearly, the label with nearest neighbour.

    Args:
        img: (H, W, 3) uint8.
        label: (H, W) integer label map or None.
        scale: (long, short) bounds (see `rescale_size`); None leaves both unchanged.
        resize_label: False keeps the label at its full resolution (evaluation: predictions are
            resized back to the label's size).
    Returns:
        (img, label) resized.
    """
    if scale is None:
        return img, label
    h, w = img.shape[:2]
    new_w, new_h = rescale_size(w, h, scale)
    if (new_w, new_h) != (w, h):
        img = np.asarray(Image.fromarray(img).resize((new_w, new_h), Image.BILINEAR))
        if label is not None and resize_label:
            label = resize_nearest(label, new_h, new_w)
    return img, label


def resize_nearest(label, height, width):
    """(H, W) integer map -> (height, width) with nearest neighbour (pixel-centre sampling)."""
    h, w = label.shape
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    return label[rows[:, None], cols[None, :]]


def _crop_box(h, w, size, rng):
    ch, cw = size
    y0 = int(rng.integers(0, max(h - ch, 0) + 1))
    x0 = int(rng.integers(0, max(w - cw, 0) + 1))
    return y0, min(y0 + ch, h), x0, min(x0 + cw, w)


def crop_box(label, *, size, rng, cat_max_ratio=0.75, ignore_index=IGNORE_INDEX, max_tries=10):
    """The box (y0, y1, x0, x1) of `random_crop`: with mmseg's category-max ratio rule, draw a
    crop, and while the most frequent class covers `cat_max_ratio` or more of the crop's labelled
    pixels (or the crop holds a single class), draw again, `max_tries` times in all; the last draw
    is kept otherwise. With cat_max_ratio = 1.0 the label is not read (one draw).

    Args:
        label: (H, W) integer label map (only its shape is used when the rule is off).
        size, rng, cat_max_ratio, ignore_index, max_tries: as `random_crop`.
    """
    h, w = label.shape
    box = _crop_box(h, w, size, rng)
    if cat_max_ratio < 1.0:
        for _ in range(max_tries - 1):
            y0, y1, x0, x1 = box
            counts = np.bincount(label[y0:y1, x0:x1].ravel().astype(np.int64))
            if ignore_index < len(counts):
                counts[ignore_index] = 0
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = _crop_box(h, w, size, rng)
    return box


def random_crop(img, label, *, size, rng, cat_max_ratio=0.75, ignore_index=IGNORE_INDEX,
                max_tries=10):
    """Random crop of `size` with mmseg's category-max ratio rule (see `crop_box`).

    A crop larger than the image is clipped to it (see `pad` for the padding that follows).

    Args:
        img: (H, W, 3) uint8.
        label: (H, W) integer label map.
        size: (crop height, crop width).
        rng: numpy Generator.
        cat_max_ratio: maximum share of one class; 1.0 disables the rule.
        ignore_index: label value not counted.
        max_tries: number of crops drawn at most.
    Returns:
        (img, label) cropped.
    """
    y0, y1, x0, x1 = crop_box(label, size=size, rng=rng, cat_max_ratio=cat_max_ratio,
                              ignore_index=ignore_index, max_tries=max_tries)
    return img[y0:y1, x0:x1], label[y0:y1, x0:x1]


def _flip_drawn(prob, rng):
    """One draw from `rng` whatever `prob` is, so that the generator's stream does not depend on
    the setting."""
    return rng.random() < prob


def random_flip(img, label, *, prob, rng):
    """Horizontal flip with probability `prob` (one draw from `rng`)."""
    if _flip_drawn(prob, rng):
        img = img[:, ::-1]
        label = label[:, ::-1] if label is not None else None
    return img, label


def margin_mask(height, width, margins):
    """(height, width) uint8 map, 0 within `margins` = (top, bottom, left, right) pixels of the
    border and 1 elsewhere: HRDA's `crop_pseudo_margins`, drawn on the whole image before the crop
    so that a crop only loses pseudo-labels where it touches the image's border."""
    top, bottom, left, right = (int(m) for m in margins)
    valid = np.ones((height, width), np.uint8)
    valid[:top] = 0
    valid[:, :left] = 0
    if bottom > 0:  # x[-0:] would be the whole axis
        valid[-bottom:] = 0
    if right > 0:
        valid[:, -right:] = 0
    return valid


def normalize(img):
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 tensor, ImageNet-normalised.

    Computed with numpy: torch's intra-op threads make such small operations 20-50 times
    slower in a busy main process, and a data pipeline should not depend on that setting.
    """
    return torch.from_numpy(_normalize_np(img))


def _normalize_np(img):
    mean = np.asarray(IMAGENET_MEAN_255, np.float32)
    inv_std = 1.0 / np.asarray(IMAGENET_STD_255, np.float32)
    x = (np.asarray(img, np.float32) - mean) * inv_std  # (H, W, 3)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def denormalize(img):
    """Inverse of `normalize`, for looking at images: (3, H, W) or (B, 3, H, W) float tensor ->
    (H, W, 3) or (B, H, W, 3) uint8 numpy RGB."""
    if not torch.is_tensor(img) or img.dim() not in (3, 4) or img.shape[-3] != 3:
        raise TypeError(f"denormalize takes a (3, H, W) or (B, 3, H, W) tensor, got "
                        f"{type(img).__name__} {tuple(getattr(img, 'shape', ()))}")
    x = np.moveaxis(img.detach().float().cpu().numpy(), -3, -1)  # (..., H, W, 3)
    x = x * np.asarray(IMAGENET_STD_255, np.float32) + np.asarray(IMAGENET_MEAN_255, np.float32)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def pad(img, label, *, size, ignore_index=IGNORE_INDEX):
    """Pad a normalised image with 0 (the mean colour) and its label with `ignore_index` at the
    bottom and right up to `size` (mmseg's Pad after Normalize).

    Args:
        img: (3, H, W) float32 array.
        label: (H, W) integer array.
        size: (height, width) at least.
    """
    h, w = label.shape
    ph, pw = max(size[0] - h, 0), max(size[1] - w, 0)
    if ph == 0 and pw == 0:
        return img, label
    img = np.pad(img, ((0, 0), (0, ph), (0, pw)), constant_values=0.0)
    label = np.pad(label, ((0, ph), (0, pw)), constant_values=ignore_index)
    return img, label


class SegTransform:
    """The whole pipeline: resize, random crop, flip, normalise, pad.

    Args:
        scale: (long, short) resize bounds, or None to keep the size.
        crop_size: (height, width) of the random crop, or None for no crop.
        cat_max_ratio: the crop's category-max ratio rule (1.0 switches it off).
        flip_prob: probability of a horizontal flip.
        resize_label: False keeps the label at full resolution (evaluation).
        ignore_index: ignored label value (crop rule, padding).
        pseudo_margins: None, or (top, bottom, left, right) pixels of the resized image whose
            pseudo-labels are not trusted (HRDA's `crop_pseudo_margins`, target images): `sample`
            then also returns `pseudo_valid`, that margin map cropped and flipped with the image
            (padding counts as valid).
    """

    def __init__(self, *, scale=None, crop_size=None, cat_max_ratio=0.75, flip_prob=0.0,
                 resize_label=True, ignore_index=IGNORE_INDEX, pseudo_margins=None):
        for name, pair in (("scale", scale), ("crop_size", crop_size)):
            if pair is not None and (len(pair) != 2 or min(pair) < 1):
                raise ValueError(f"{name} must be two positive ints or None, got {pair}")
        if pseudo_margins is not None and (len(pseudo_margins) != 4 or min(pseudo_margins) < 0):
            raise ValueError(f"pseudo_margins must be None or four ints >= 0 (top, bottom, left, "
                             f"right), got {pseudo_margins}")
        if not 0.0 < cat_max_ratio <= 1.0:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {cat_max_ratio}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        if crop_size is not None and not resize_label:
            raise ValueError("a random crop needs the label at the image's resolution "
                             "(resize_label=True)")
        self.scale = tuple(scale) if scale is not None else None
        self.crop_size = tuple(crop_size) if crop_size is not None else None
        self.cat_max_ratio = float(cat_max_ratio)
        self.flip_prob = float(flip_prob)
        self.resize_label = bool(resize_label)
        self.ignore_index = int(ignore_index)
        self.pseudo_margins = None if pseudo_margins is None else tuple(int(m) for m in pseudo_margins)

    def __call__(self, img, label, rng):
        """(H, W, 3) uint8, (H, W) integer, Generator -> ((3, h, w) float32, (h, w) int64)."""
        out = self.sample(img, label, rng)
        return out["img"], out["label"]

    def sample(self, img, label, rng):
        """As `__call__`, as a dict: "img", "label" and, with `pseudo_margins`, "pseudo_valid"
        ((h, w) uint8, 0 where the pseudo-labels are not trusted). The random draws are the same
        either way."""
        img, label = rescale(img, label, scale=self.scale, resize_label=self.resize_label)
        valid = None
        if self.pseudo_margins is not None:
            valid = margin_mask(img.shape[0], img.shape[1], self.pseudo_margins)
        if self.crop_size is not None:
            y0, y1, x0, x1 = crop_box(label, size=self.crop_size, rng=rng,
                                      cat_max_ratio=self.cat_max_ratio,
                                      ignore_index=self.ignore_index)
            img, label = img[y0:y1, x0:x1], label[y0:y1, x0:x1]
            valid = None if valid is None else valid[y0:y1, x0:x1]
        if _flip_drawn(self.flip_prob, rng):
            img, label = img[:, ::-1], label[:, ::-1] if label is not None else None
            valid = None if valid is None else valid[:, ::-1]
        img = _normalize_np(img)
        label = np.asarray(label).astype(np.int64)
        if self.crop_size is not None:
            img, padded = pad(img, label, size=self.crop_size, ignore_index=self.ignore_index)
            if valid is not None and padded.shape != label.shape:
                valid = np.pad(valid, ((0, padded.shape[0] - label.shape[0]),
                                       (0, padded.shape[1] - label.shape[1])), constant_values=1)
            label = padded
        out = {"img": torch.from_numpy(img), "label": torch.from_numpy(np.ascontiguousarray(label))}
        if valid is not None:
            out["pseudo_valid"] = torch.from_numpy(np.ascontiguousarray(valid))
        return out

    def __repr__(self):
        return (f"SegTransform(scale={self.scale}, crop_size={self.crop_size}, "
                f"cat_max_ratio={self.cat_max_ratio}, flip_prob={self.flip_prob}, "
                f"resize_label={self.resize_label}, pseudo_margins={self.pseudo_margins})")


def train_transform(*, scale, crop_size=(512, 512), cat_max_ratio=0.75, flip_prob=0.5,
                    pseudo_margins=None):
    """DAFormer's training pipeline (pass `HRDA_SCALES[...]` and (1024, 1024) for HRDA).

    Args:
        scale: (long, short) resize bounds, e.g. `DAFORMER_SCALES["gta"]`, or None.
        crop_size: (height, width) of the random crop.
        cat_max_ratio: category-max ratio of the crop (1.0 for target images: the rule would
            choose the crop with the target's ground truth).
        flip_prob: horizontal flip probability.
        pseudo_margins: None or (top, bottom, left, right), see `SegTransform`.
    """
    return SegTransform(scale=scale, crop_size=crop_size, cat_max_ratio=cat_max_ratio,
                        flip_prob=flip_prob, pseudo_margins=pseudo_margins)


def eval_transform(*, scale, resize_label=False):
    """Evaluation pipeline: resize the image only (the label stays at full resolution, the
    prediction is resized back to it), no crop, no flip.

    Args:
        scale: (long, short) resize bounds, or None.
        resize_label: resize the label too (e.g. a cheap validation at training resolution).
    """
    return SegTransform(scale=scale, crop_size=None, flip_prob=0.0, resize_label=resize_label)

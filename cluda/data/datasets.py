"""Segmentation data sets in their official on-disk layouts, mapped to the 19 Cityscapes train ids
(255 = ignore) with the tables of `cluda.data.labels`.

- Cityscapes (Cordts et al., CVPR 2016): `leftImg8bit/{split}/<city>/<base>_leftImg8bit.png` with
  `gtFine/{split}/<city>/<base>_gtFine_labelIds.png`, or the prepared
  `<base>_gtFine_labelTrainIds.png` beside it.
- GTA5 (Richter et al., ECCV 2016): `images/<n>.png` with `labels/<n>.png` (Cityscapes label ids,
  palette PNGs), or the prepared `labels/<n>_labelTrainIds.png`.
- SYNTHIA RAND-CITYSCAPES (Ros et al., CVPR 2016): `RGB/<n>.png` with `GT/LABELS/<n>.png` (16-bit,
  class id in the first channel), or the prepared `GT/LABELS/<n>_labelTrainIds.png`.

A sample is a dict: `img` (3, H, W) float32 ImageNet-normalised, `label` (H, W) int64 train ids,
`name` (str, unique in the data set, the key of the class statistics), `path` (the image file) and
`index` (int), plus `pseudo_valid` ((H, W) uint8) when the transform has pseudo-label margins.
`denormalize(sample["img"])` gives back the uint8 image.

Randomness: `get(index, rng)` draws every random choice of the transform from the given
`numpy.random.Generator`; `__getitem__(index)` seeds one from (seed, epoch, index), so a sample is
reproducible and the same in any DataLoader worker.
"""
import abc
import glob
import os
import warnings

import numpy as np
import torch

from .io import read_image, read_label
from .labels import (CITYSCAPES_ID_TO_TRAINID, IGNORE_INDEX, NUM_CLASSES, SYNTHIA_ID_TO_TRAINID,
                     lookup_table)
from .transforms import SegTransform, resize_nearest

TRAINID_SUFFIX = "_labelTrainIds.png"


class LabelMapping:
    """A data set's on-disk id -> train id table, and the set of ids it knows (anything else is
    unknown: mapped to ignore and counted in a warning).

    Args:
        name: shown in warnings.
        mapping: on-disk id -> train id.
        known_ids: every id that may legitimately occur on disk (void ids included).
    """

    def __init__(self, *, name, mapping, known_ids):
        self.name = name
        self.table = lookup_table(mapping, size=65536)
        self.known = np.zeros(65536, dtype=bool)
        self.known[list(known_ids)] = True

    def apply(self, ids, path=""):
        """(H, W) uint8 / uint16 ids -> ((H, W) uint8 train ids, number of pixels with unknown
        ids, sorted unknown ids); unknown ids map to 255."""
        ids = np.asarray(ids)
        if ids.dtype not in (np.uint8, np.uint16):
            raise TypeError(f"label ids of {path} must be uint8 or uint16, got {ids.dtype}")
        unknown = ~self.known[ids]
        n = int(unknown.sum())
        values = np.unique(ids[unknown]).tolist() if n else []
        return self.table[ids], n, values

    def __call__(self, ids, path=""):
        """As `apply`, returning the train ids only and warning (naming `path`, counting the
        pixels) when some ids are unknown."""
        out, n, values = self.apply(ids, path)
        if n:
            warnings.warn(f"{path}: {n} pixels with ids unknown to {self.name} "
                          f"({values[:10]}{' ...' if len(values) > 10 else ''}) "
                          f"set to ignore ({IGNORE_INDEX})", stacklevel=2)
        return out


# Cityscapes label ids run 0..33 (0-6 void, 9 parking, 10 rail track, ... all known but ignored);
# 255 is where the licence plate's id -1 lands in an 8-bit file. GTA5 uses the same ids.
CITYSCAPES_MAPPING = LabelMapping(name="Cityscapes label ids", mapping=CITYSCAPES_ID_TO_TRAINID,
                                  known_ids=list(range(34)) + [255])
# SYNTHIA class ids run 0 (void) .. 22 (lane marking).
SYNTHIA_MAPPING = LabelMapping(name="SYNTHIA class ids", mapping=SYNTHIA_ID_TO_TRAINID,
                               known_ids=range(23))
# Prepared files hold train ids already.
TRAINID_MAPPING = LabelMapping(name="train ids", mapping={c: c for c in range(NUM_CLASSES)},
                               known_ids=list(range(NUM_CLASSES)) + [IGNORE_INDEX])


class SegmentationDataset(torch.utils.data.Dataset, abc.ABC):
    """Base class: a list of samples that `load` reads as (uint8 image, train id label), and the
    transform that turns them into tensors.

    Args:
        transform: a `SegTransform` (None: normalise only, full resolution).
        seed: seeds the generator of `__getitem__` together with the epoch and the index.
    """

    def __init__(self, *, transform=None, seed=0):
        self.transform = transform if transform is not None else SegTransform()
        self.seed = int(seed)
        self.epoch = 0

    @abc.abstractmethod
    def __len__(self):
        """Number of samples."""

    @abc.abstractmethod
    def load(self, index):
        """Sample `index` untransformed: ((H, W, 3) uint8 RGB image, (H, W) uint8 train ids)."""

    @abc.abstractmethod
    def name(self, index):
        """Unique name of sample `index` (the key of the class statistics)."""

    def path(self, index):
        """Where sample `index` comes from (its image file)."""
        return self.name(index)

    def load_label(self, index):
        """The (H, W) uint8 train id label of sample `index`, untransformed (class statistics)."""
        return self.load(index)[1]

    @property
    def names(self):
        return [self.name(i) for i in range(len(self))]

    def set_epoch(self, epoch):
        """Change the generator of `__getitem__` (new crops and flips for a new epoch)."""
        self.epoch = int(epoch)

    def _check_index(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of "
                             f"{len(self)} samples")

    def make_sample(self, index, img, label, rng):
        """Transform a loaded (image, label) pair into the sample dict (with `pseudo_valid` when
        the transform has pseudo-label margins)."""
        sample = self.transform.sample(img, label, rng)
        sample.update(name=self.name(index), path=self.path(index), index=int(index))
        return sample

    def get(self, index, rng):
        """Sample `index` with every random choice drawn from `rng` (numpy Generator)."""
        self._check_index(index)
        img, label = self.load(index)
        return self.make_sample(index, img, label, rng)

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        return self.get(index, rng)


class LabelledFilesDataset(SegmentationDataset):
    """Image / label file pairs (see `list_cityscapes`, `list_gta`, `list_synthia`).

    Args:
        samples: (name, image path, label path, mapping) tuples; the mapping turns the label
            file's ids into train ids.
        transform: see `SegmentationDataset`.
        seed: see `SegmentationDataset`.
    """

    def __init__(self, samples, *, transform=None, seed=0):
        super().__init__(transform=transform, seed=seed)
        self.samples = list(samples)

    def __len__(self):
        return len(self.samples)

    def name(self, index):
        return self.samples[index][0]

    def path(self, index):
        return self.samples[index][1]

    def label_path(self, index):
        return self.samples[index][2]

    def load_label(self, index):
        _, _, label_path, mapping = self.samples[index]
        return load_label(label_path, mapping)

    def load(self, index):
        _, img_path, label_path, mapping = self.samples[index]
        img = read_image(img_path)
        label = load_label(label_path, mapping)
        if label.shape != img.shape[:2]:
            # GTA5 holds a few pairs whose label is 1914 x 1052 and image 1920 x 1080; nearest
            # resizing to the image is what a keep-ratio resize of both would do anyway.
            warnings.warn(f"label {label_path} is {label.shape[1]}x{label.shape[0]} but image "
                          f"{img_path} is {img.shape[1]}x{img.shape[0]}: label resized (nearest)",
                          stacklevel=2)
            label = resize_nearest(label, img.shape[0], img.shape[1])
        return img, label


def load_label(path, mapping):
    """Read a label file and map it to (H, W) uint8 train ids."""
    return mapping(read_label(path), path)


def _require_dir(path, what):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} folder not found: {path}")


def _check_labels_choice(labels):
    if labels not in ("auto", "raw", "prepared"):
        raise ValueError(f"labels must be 'auto', 'raw' or 'prepared', got {labels!r}")


def _pick_label(raw_path, prepared_path, labels, raw_mapping, dataset):
    """The label file of one sample: the prepared train id file or the raw one."""
    if labels != "raw" and os.path.isfile(prepared_path):
        return prepared_path, TRAINID_MAPPING
    if labels == "prepared":
        raise FileNotFoundError(f"prepared label not found: {prepared_path} (run "
                                f"`python -m cluda.data.prepare {dataset} ROOT`)")
    if not os.path.isfile(raw_path):
        raise FileNotFoundError(f"label file not found: {raw_path}")
    return raw_path, raw_mapping


def _pair_flat(img_dir, label_dir, *, labels, mapping, dataset, img_suffix=".png"):
    """Flat image / label folders matched by file stem (GTA5, SYNTHIA)."""
    _require_dir(img_dir, "image")
    _require_dir(label_dir, "label")
    imgs = sorted(glob.glob(os.path.join(img_dir, "*" + img_suffix)))
    if not imgs:
        raise FileNotFoundError(f"no *{img_suffix} images in {img_dir}")
    stems = [os.path.basename(p)[:-len(img_suffix)] for p in imgs]
    raw_labels = {os.path.basename(p)[:-4] for p in glob.glob(os.path.join(label_dir, "*.png"))
                  if not p.endswith(TRAINID_SUFFIX)}
    prepared = {os.path.basename(p)[:-len(TRAINID_SUFFIX)]
                for p in glob.glob(os.path.join(label_dir, "*" + TRAINID_SUFFIX))}
    orphans = sorted((raw_labels | prepared) - set(stems))
    if orphans:
        raise FileNotFoundError(f"label {os.path.join(label_dir, orphans[0] + '.png')} has no "
                                f"image {os.path.join(img_dir, orphans[0] + img_suffix)} "
                                f"({len(orphans)} labels without an image)")
    samples = []
    for stem, img_path in zip(stems, imgs):
        raw = os.path.join(label_dir, stem + ".png")
        if stem not in raw_labels and stem not in prepared:
            raise FileNotFoundError(f"image {img_path} has no label {raw}")
        label_path, m = _pick_label(raw, os.path.join(label_dir, stem + TRAINID_SUFFIX), labels,
                                    mapping, dataset)
        samples.append((stem, img_path, label_path, m))
    return samples


def list_gta(root, *, labels="auto"):
    """GTA5 samples (name = file stem, e.g. "00001").

    Args:
        root: the folder holding `images/` and `labels/`.
        labels: "auto" (prepared train id file where present, raw ids otherwise), "raw" or
            "prepared" (every prepared file must exist).
    """
    _check_labels_choice(labels)
    _require_dir(root, "GTA5 root")
    return _pair_flat(os.path.join(root, "images"), os.path.join(root, "labels"),
                      labels=labels, mapping=CITYSCAPES_MAPPING, dataset="gta")


def list_synthia(root, *, labels="auto"):
    """SYNTHIA RAND-CITYSCAPES samples (name = file stem, e.g. "0000000").

    Args:
        root: the folder holding `RGB/` and `GT/LABELS/`.
        labels: see `list_gta`.
    """
    _check_labels_choice(labels)
    _require_dir(root, "SYNTHIA root")
    return _pair_flat(os.path.join(root, "RGB"), os.path.join(root, "GT", "LABELS"),
                      labels=labels, mapping=SYNTHIA_MAPPING, dataset="synthia")


CS_IMG_SUFFIX = "_leftImg8bit.png"
CS_RAW_SUFFIX = "_gtFine_labelIds.png"
CS_PREPARED_SUFFIX = "_gtFine_labelTrainIds.png"


def list_cityscapes(root, split, *, labels="auto"):
    """Cityscapes samples of one split (name = "<city>/<base>", e.g.
    "aachen/aachen_000000_000019").

    Args:
        root: the folder holding `leftImg8bit/` and `gtFine/`.
        split: "train", "val" or "test" (any folder name under `leftImg8bit/`).
        labels: see `list_gta`.
    """
    _check_labels_choice(labels)
    _require_dir(root, "Cityscapes root")
    img_dir = os.path.join(root, "leftImg8bit", split)
    gt_dir = os.path.join(root, "gtFine", split)
    _require_dir(img_dir, "image")
    _require_dir(gt_dir, "label")
    imgs = sorted(glob.glob(os.path.join(img_dir, "*", "*" + CS_IMG_SUFFIX)))
    if not imgs:
        raise FileNotFoundError(f"no <city>/*{CS_IMG_SUFFIX} images in {img_dir}")
    names = [os.path.relpath(p, img_dir)[:-len(CS_IMG_SUFFIX)] for p in imgs]
    label_names = set()
    for suffix in (CS_RAW_SUFFIX, CS_PREPARED_SUFFIX):
        label_names |= {os.path.relpath(p, gt_dir)[:-len(suffix)]
                        for p in glob.glob(os.path.join(gt_dir, "*", "*" + suffix))}
    orphans = sorted(label_names - set(names))
    if orphans:
        raise FileNotFoundError(f"label {os.path.join(gt_dir, orphans[0] + CS_RAW_SUFFIX)} has no "
                                f"image {os.path.join(img_dir, orphans[0] + CS_IMG_SUFFIX)} "
                                f"({len(orphans)} labels without an image)")
    samples = []
    for name, img_path in zip(names, imgs):
        raw = os.path.join(gt_dir, name + CS_RAW_SUFFIX)
        if name not in label_names:
            raise FileNotFoundError(f"image {img_path} has no label {raw}")
        label_path, m = _pick_label(raw, os.path.join(gt_dir, name + CS_PREPARED_SUFFIX), labels,
                                    CITYSCAPES_MAPPING, "cityscapes")
        samples.append((name.replace(os.sep, "/"), img_path, label_path, m))
    return samples


class CityscapesDataset(LabelledFilesDataset):
    """Cityscapes, one split.

    Args:
        root: folder with `leftImg8bit/` and `gtFine/`.
        split: "train" or "val" (or "test").
        transform: a `SegTransform` (e.g. `train_transform(scale=DAFORMER_SCALES["cityscapes"])`).
        labels: "auto", "raw" or "prepared" (see `list_gta`).
        seed: seeds `__getitem__`'s generator.
    """

    def __init__(self, root, *, split="train", transform=None, labels="auto", seed=0):
        super().__init__(list_cityscapes(root, split, labels=labels), transform=transform,
                         seed=seed)
        self.root, self.split = root, split


class GTADataset(LabelledFilesDataset):
    """GTA5 (all 24,966 images, as DAFormer trains on).

    Args:
        root: folder with `images/` and `labels/`.
        transform: a `SegTransform` (e.g. `train_transform(scale=DAFORMER_SCALES["gta"])`).
        labels: "auto", "raw" or "prepared".
        seed: seeds `__getitem__`'s generator.
    """

    def __init__(self, root, *, transform=None, labels="auto", seed=0):
        super().__init__(list_gta(root, labels=labels), transform=transform, seed=seed)
        self.root = root


class SynthiaDataset(LabelledFilesDataset):
    """SYNTHIA RAND-CITYSCAPES (all 9,400 images).

    Args:
        root: folder with `RGB/` and `GT/LABELS/`.
        transform: a `SegTransform` (e.g. `train_transform(scale=DAFORMER_SCALES["synthia"])`).
        labels: "auto", "raw" or "prepared".
        seed: seeds `__getitem__`'s generator.
    """

    def __init__(self, root, *, transform=None, labels="auto", seed=0):
        super().__init__(list_synthia(root, labels=labels), transform=transform, seed=seed)
        self.root = root


def list_samples(dataset, root, *, split="train", labels="auto"):
    """The samples of a data set kind ("gta", "synthia", "cityscapes"; `split` is Cityscapes'
    only)."""
    if dataset == "gta":
        return list_gta(root, labels=labels)
    if dataset == "synthia":
        return list_synthia(root, labels=labels)
    if dataset == "cityscapes":
        return list_cityscapes(root, split, labels=labels)
    raise ValueError(f"unknown data set {dataset!r}: expected 'gta', 'synthia' or 'cityscapes'")

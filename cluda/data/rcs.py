"""Class statistics and rare class sampling (RCS, DAFormer: Hoyer et al., CVPR 2022, Sec. 3.3).

RCS draws source images that hold rare classes more often. With f_c the share of class c among
all labelled source pixels, class c is drawn with

    P(c) = exp((1 - f_c) / T) / sum_c' exp((1 - f_c') / T),    T = 0.01     (DAFormer Eq. 6)

then an image holding more than `min_pixels` (3000) pixels of c is drawn uniformly, and the
training crop of that image is redrawn up to 10 times until it holds more than
`min_pixels * min_crop_ratio` (DAFormer's `rcs_min_crop_ratio` = 0.5, so 1500) pixels of c.
Classes that never occur get no probability (DAFormer builds its class list from the observed
ones).

The statistics (per-image pixel counts of each train id at the label's full resolution, and their
sums) are a JSON file written by `python -m cluda.data.prepare`, or computed in memory by
`compute_class_stats` for a data set generated on the fly. Format:

    {"format": "cluda-class-stats-v1", "dataset": ..., "split": ..., "num_classes": 19,
     "class_names": [...], "class_pixels": [19 ints], "class_frequency": [19 floats],
     "images": {name: [19 ints], ...}}
"""
import json
import os
import warnings

import numpy as np

from cluda.errors import DataError
from cluda.fileio import atomic_open

from .labels import CLASS_NAMES, NUM_CLASSES

STATS_FORMAT = "cluda-class-stats-v1"
STATS_FILE = "class_stats.json"


def class_counts(label):
    """(H, W) train id map -> (19,) int64 pixel count per class (ignored pixels not counted)."""
    label = np.asarray(label)
    counts = np.bincount(label.ravel().astype(np.int64), minlength=256)
    return counts[:NUM_CLASSES].astype(np.int64)


def summarize_stats(per_image, *, dataset, split=None):
    """Per-image counts -> the statistics dict (see the module docstring).

    Args:
        per_image: mapping name -> (19,) pixel counts.
        dataset: data set kind, recorded in the file.
        split: split name, recorded in the file.
    """
    names = sorted(per_image)
    images = {n: [int(v) for v in per_image[n]] for n in names}
    total = np.zeros(NUM_CLASSES, np.int64)
    for counts in images.values():
        if len(counts) != NUM_CLASSES:
            raise ValueError(f"per-image counts must have {NUM_CLASSES} entries, got {len(counts)}")
        total += np.asarray(counts, np.int64)
    freq = total / max(int(total.sum()), 1)
    return {"format": STATS_FORMAT, "dataset": dataset, "split": split,
            "num_classes": NUM_CLASSES, "class_names": list(CLASS_NAMES),
            "class_pixels": [int(v) for v in total], "class_frequency": [float(v) for v in freq],
            "images": images}


def save_class_stats(stats, path):
    """Write the statistics as JSON atomically (`cluda.fileio.atomic_open`)."""
    with atomic_open(path, "w") as f:
        json.dump(stats, f)


def load_class_stats(path):
    """Read and check a statistics JSON file written by `save_class_stats`.

    Raises:
        FileNotFoundError: no file at `path`.
        DataError (a ValueError): the file is not valid JSON or not such a file, naming it and
            what is wrong (rerunning `python -m cluda.data.prepare` rewrites it).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"class statistics not found: {path} (run "
                                f"`python -m cluda.data.prepare DATASET ROOT`)")
    rerun = "rerun `python -m cluda.data.prepare DATASET ROOT` to rewrite it"
    try:
        with open(path, encoding="utf-8") as f:
            stats = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read class statistics {path}: {' '.join(str(e).split())}; "
                        f"{rerun}") from e
    if not isinstance(stats, dict) or stats.get("format") != STATS_FORMAT:
        raise DataError(f"{path} is not a {STATS_FORMAT} class statistics file; {rerun}")
    if stats.get("num_classes") != NUM_CLASSES or not isinstance(stats.get("images"), dict):
        raise DataError(f"{path}: expected {NUM_CLASSES} classes and an 'images' mapping; {rerun}")
    for name, counts in stats["images"].items():
        if (not isinstance(counts, list) or len(counts) != NUM_CLASSES
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                           for v in counts)):
            raise DataError(f"{path}: counts of image {name!r} must be a list of {NUM_CLASSES} "
                            f"non-negative ints, got {str(counts)[:80]}; {rerun}")
    return stats


def compute_class_stats(dataset, *, dataset_kind="in-memory", split=None, progress=False):
    """Statistics of a `SegmentationDataset` computed from its untransformed labels (for data
    generated on the fly; on-disk data sets get them from `cluda.data.prepare`).

    Args:
        dataset: anything with `__len__`, `name(i)` and `load_label(i)` ((H, W) train ids).
        dataset_kind: recorded in the result.
        split: recorded in the result.
        progress: show a tqdm bar.
    """
    indices = range(len(dataset))
    if progress:
        from tqdm import tqdm
        indices = tqdm(indices, desc="class statistics")
    per_image = {dataset.name(i): class_counts(dataset.load_label(i)) for i in indices}
    return summarize_stats(per_image, dataset=dataset_kind, split=split)


def rcs_class_probabilities(class_pixels, *, temperature=0.01):
    """DAFormer's class distribution: softmax((1 - f_c) / T) over the classes that occur.

    Args:
        class_pixels: (19,) total pixel count per class.
        temperature: T; smaller favours rare classes more.
    Returns:
        (classes, probs): int64 array of the classes that occur, float64 probabilities (sum 1).
    """
    if temperature <= 0:
        raise ValueError(f"RCS temperature must be > 0, got {temperature}")
    pixels = np.asarray(class_pixels, dtype=np.float64)
    if pixels.shape != (NUM_CLASSES,) or (pixels < 0).any():
        raise ValueError(f"class_pixels must be {NUM_CLASSES} non-negative counts, got {pixels}")
    if pixels.sum() <= 0:
        raise DataError("class statistics hold no labelled pixel")
    freq = pixels / pixels.sum()
    classes = np.flatnonzero(pixels > 0)
    logits = (1.0 - freq[classes]) / temperature
    probs = np.exp(logits - logits.max())
    return classes.astype(np.int64), probs / probs.sum()


class RareClassSampler:
    """Draws (class, sample index) pairs as DAFormer's RCS does.

    Args:
        stats: statistics dict (`load_class_stats` / `compute_class_stats`).
        names: the data set's sample names in index order (`dataset.names`); images of the
            statistics that are not in the data set are left out.
        temperature: T of the class softmax (0.01).
        min_pixels: an image is eligible for class c if it holds more than this many pixels of c
            (3000, at the label's full resolution). 3000 is DAFormer's value for GTA5's
            1914 x 1052 labels; for other sizes scale it with the area, e.g.
            3000 * 256 * 512 / (1914 * 1052) = 195 for 256 x 512 synthetic scenes.
        min_crop_ratio: a crop is accepted if it holds more than `min_pixels * min_crop_ratio`
            pixels of c (0.5); 0 disables the re-cropping.
        max_crop_tries: crops drawn at most (10).
    """

    def __init__(self, stats, *, names, temperature=0.01, min_pixels=3000, min_crop_ratio=0.5,
                 max_crop_tries=10):
        if min_pixels < 0 or min_crop_ratio < 0 or max_crop_tries < 1:
            raise ValueError(f"need min_pixels >= 0, min_crop_ratio >= 0, max_crop_tries >= 1; "
                             f"got {min_pixels}, {min_crop_ratio}, {max_crop_tries}")
        index_of = {n: i for i, n in enumerate(names)}
        known = [n for n in sorted(stats["images"]) if n in index_of]
        if not known:
            raise DataError("none of the data set's samples is in the class statistics (were "
                            "they computed for another data set or split?)")
        missing = len(index_of) - len(known)
        if missing:
            warnings.warn(f"{missing} of {len(index_of)} samples have no class statistics and "
                          f"are never drawn by rare class sampling", stacklevel=2)
        counts = np.array([stats["images"][n] for n in known], dtype=np.int64)  # (I, 19)
        indices = np.array([index_of[n] for n in known], dtype=np.int64)
        classes, probs = rcs_class_probabilities(counts.sum(0), temperature=temperature)
        self.samples_with_class = {}
        keep = []
        for c, p in zip(classes, probs):
            holders = indices[counts[:, c] > min_pixels]
            if len(holders):
                self.samples_with_class[int(c)] = holders
                keep.append((int(c), p))
        if not keep:
            raise DataError(f"no image holds more than {min_pixels} pixels of any class: lower "
                            "data.rcs_min_pixels or set data.rcs: false")
        dropped = [CLASS_NAMES[c] for c in classes if int(c) not in self.samples_with_class]
        if dropped:
            warnings.warn(f"rare class sampling: no image holds more than {min_pixels} pixels of "
                          f"{dropped}; these classes are not drawn", stacklevel=2)
        self.classes = np.array([c for c, _ in keep], dtype=np.int64)
        p = np.array([p for _, p in keep], dtype=np.float64)
        self.probs = p / p.sum()
        self.frequency = counts.sum(0) / max(int(counts.sum()), 1)
        self.min_pixels = int(min_pixels)
        self.min_crop_ratio = float(min_crop_ratio)
        self.max_crop_tries = int(max_crop_tries)

    @property
    def min_crop_pixels(self):
        """A crop is accepted when it holds more than this many pixels of the drawn class."""
        return self.min_pixels * self.min_crop_ratio

    def sample(self, rng):
        """Draw (class, sample index) with the numpy Generator `rng`."""
        c = int(self.classes[rng.choice(len(self.classes), p=self.probs)])
        holders = self.samples_with_class[c]
        return c, int(holders[rng.integers(len(holders))])

    def crop_ok(self, label, c):
        """Whether a transformed (h, w) label holds enough pixels of class `c`."""
        if self.min_crop_ratio <= 0:
            return True
        label = label.numpy() if hasattr(label, "numpy") else np.asarray(label)
        return int(np.count_nonzero(label == c)) > self.min_crop_pixels

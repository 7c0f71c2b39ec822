"""The UDA training data set of source / target pairs: each item pairs a labelled source sample
(drawn by rare class sampling or uniformly) with a random target sample, as DAFormer's
`UDADataset` (Hoyer et al., CVPR 2022), whose target labels are never used for training.

Item `index` is a pure function of (seed, index): the generator of every random choice
(which source image, which target image, crops, flips, RCS class) is
`numpy.random.default_rng([seed, index])`. A trainer that asks for items `it * batch + b` sees
the same data after a resume, in any number of DataLoader workers.
"""
import numpy as np
import torch


class UDADataset(torch.utils.data.Dataset):
    """Source / target pairs.

    Args:
        source: a `SegmentationDataset` (labelled, with its training transform).
        target: a `SegmentationDataset` (its labels are returned but are for evaluation only).
        rcs: a `RareClassSampler` built on `source.names`, or None for uniform source sampling.
        seed: the data seed.
        length: what `len()` reports (e.g. max_iters * batch size); defaults to the larger of
            the two data sets. Any index >= 0 is valid whatever the length.
    """

    def __init__(self, source, target, *, rcs=None, seed=0, length=None):
        if len(source) == 0 or len(target) == 0:
            raise ValueError(f"empty data set: {len(source)} source and {len(target)} target "
                             f"samples")
        if length is not None and length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.source, self.target, self.rcs = source, target, rcs
        self.seed = int(seed)
        self.length = int(length) if length is not None else max(len(source), len(target))

    def __len__(self):
        return self.length

    def _source_sample(self, rng):
        if self.rcs is None:
            return self.source.get(int(rng.integers(len(self.source))), rng)
        c, i = self.rcs.sample(rng)
        img, label = self.source.load(i)  # loaded once, re-cropped up to max_crop_tries times
        sample = self.source.make_sample(i, img, label, rng)
        for _ in range(self.rcs.max_crop_tries - 1):
            if self.rcs.crop_ok(sample["label"], c):
                break
            sample = self.source.make_sample(i, img, label, rng)
        sample["rcs_class"] = c
        return sample

    def __getitem__(self, index):
        if index < 0:
            raise IndexError(f"UDADataset index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, int(index)])
        source = self._source_sample(rng)
        if self.rcs is None:
            source["rcs_class"] = -1  # same keys either way, so batches collate
        target = self.target.get(int(rng.integers(len(self.target))), rng)
        return {"source": source, "target": target}


class IterationBatches(torch.utils.data.Sampler):
    """Batch `it` of rank r holds data set items (it * world + r) * batch_size + b."""

    def __init__(self, *, start: int, stop: int, batch_size: int, rank: int = 0, world: int = 1):
        self.start, self.stop, self.batch_size, self.rank, self.world = start, stop, batch_size, rank, world

    def __iter__(self):
        for it in range(self.start, self.stop):
            first = (it * self.world + self.rank) * self.batch_size
            yield list(range(first, first + self.batch_size))

    def __len__(self):
        return max(self.stop - self.start, 0)

"""Data: Cityscapes / GTA5 / SYNTHIA loaders, their preparation, DAFormer's transforms and rare
class sampling, the UDA pair data set, and the procedural synthetic source / target domains.

    from cluda.data import UDADataset, RareClassSampler, compute_class_stats, train_transform
    from cluda.data.synthetic import SyntheticDataset
    tf = train_transform(scale=None, crop_size=(256, 256))
    src = SyntheticDataset(domain="source", num_samples=2000, size=(256, 512), seed=0, transform=tf)
    tgt = SyntheticDataset(domain="target", num_samples=2000, size=(256, 512), seed=1, transform=tf)
    rcs = RareClassSampler(compute_class_stats(src), names=src.names)
    pairs = UDADataset(src, tgt, rcs=rcs, seed=0)     # pairs[i] = {"source": {...}, "target": {...}}

`cluda.data.synthetic` and `cluda.data.prepare` are not imported here: both are also commands
(`python -m ...`), which should not find themselves imported already.
"""
from .datasets import (CityscapesDataset, GTADataset, LabelledFilesDataset, SegmentationDataset,
                       SynthiaDataset, list_cityscapes, list_gta, list_samples, list_synthia)
from .io import read_image, read_label
from .rcs import (RareClassSampler, compute_class_stats, load_class_stats, rcs_class_probabilities,
                  save_class_stats)
from .transforms import (DAFORMER_SCALES, HRDA_SCALES, IMAGENET_MEAN_255, IMAGENET_STD_255, SegTransform,
                         denormalize, eval_transform, normalize, train_transform)
from .pairs import UDADataset

__all__ = [
    "CityscapesDataset", "GTADataset", "LabelledFilesDataset", "SegmentationDataset",
    "SynthiaDataset", "list_cityscapes", "list_gta", "list_samples", "list_synthia",
    "read_image", "read_label", "RareClassSampler", "compute_class_stats", "load_class_stats",
    "rcs_class_probabilities", "save_class_stats", "DAFORMER_SCALES", "HRDA_SCALES",
    "IMAGENET_MEAN_255", "IMAGENET_STD_255", "SegTransform", "denormalize", "eval_transform",
    "normalize", "train_transform", "UDADataset",
]

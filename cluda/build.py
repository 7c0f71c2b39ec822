"""Builders: the network, the data sets and the self-training step of an experiment, from its
`cluda.config.Config`. Only this module, `cluda.checkpoint`, the command lines and `train.py`
read the config tree; what they build takes typed keyword arguments.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from cluda.config import Config, ConfigError, DatasetSection
from cluda.data.labels import THING_CLASSES

__all__ = ["build_model", "encoder_of", "build_dataset", "build_train_dataset", "build_val_dataset",
           "build_uda_step"]


def build_model(cfg: Config) -> nn.Module:
    """The student network: a `Segmentor` (DAFormer) or an `HRDA` wrapping one.

    The encoder's weights come from `model.pretrained`: a local file, timm's download (true), or
    none (random).

    Raises:
        ConfigError: `model.pretrained: true` and timm cannot fetch the weights (offline): the
            message asks for a local file.
    """
    from cluda.models import HRDA, build_segmentor

    m = cfg.model
    try:
        segmentor = build_segmentor(
            m.backbone, num_classes=m.num_classes, channels=m.channels, pretrained=m.pretrained,
            drop_path_rate=m.drop_path_rate, embed_dim=m.embed_dim, aspp_channels=m.aspp_channels,
            dropout=m.dropout, img_size=None if m.img_size is None else tuple(m.img_size))
    except (RuntimeError, ValueError) as err:  # `cluda.models.build_backbone`: no download
        if m.pretrained is not True:
            raise
        raise ConfigError(f"model.pretrained: true: {err} (in a config: model.pretrained: "
                          "/path/to/weights)") from err
    if not m.hrda.enabled:
        return segmentor
    h = m.hrda
    return HRDA(segmentor, hr_crop_size=tuple(h.hr_crop_size), lr_scale=h.lr_scale,
                crop_divisible=h.crop_divisible, hr_slide_size=tuple(h.hr_slide_size),
                hr_slide_stride=tuple(h.hr_slide_stride), head_channels=h.head_channels,
                feature_weight_head=h.feature_weight_head, hr_loss_weight=h.hr_loss_weight)


def encoder_of(model: nn.Module) -> nn.Module:
    """The encoder of a `Segmentor` or an `HRDA` (for the frozen ImageNet copy)."""
    inner = getattr(model, "segmentor", model)
    return inner.encoder


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

_ROLE_SEEDS = {"source": 0, "target": 1, "val": 0}


def build_dataset(ds: DatasetSection, *, role: str, transform=None):
    """A `SegmentationDataset` for one role ("source", "target" or "val").

    Args:
        ds: the data set's section.
        role: decides the default split ("train" / "val") and synthetic domain / scene seed.
        transform: a `cluda.data.SegTransform`.
    """
    from cluda.data import CityscapesDataset, GTADataset, SynthiaDataset
    from cluda.data.synthetic import SyntheticDataset

    if role not in _ROLE_SEEDS:
        raise ValueError(f"role must be one of {sorted(_ROLE_SEEDS)}, got {role!r}")
    split = ds.split or ("val" if role == "val" else "train")
    if ds.kind == "synthetic":
        data = SyntheticDataset(domain="source" if role == "source" else "target", split=split,
                                num_samples=ds.num_samples, size=tuple(ds.size),
                                seed=_ROLE_SEEDS[role] if ds.scene_seed is None else ds.scene_seed,
                                transform=transform)
    elif ds.kind == "gta":
        data = GTADataset(ds.root, transform=transform, labels=ds.labels)
    elif ds.kind == "synthia":
        data = SynthiaDataset(ds.root, transform=transform, labels=ds.labels)
    elif ds.kind == "cityscapes":
        data = CityscapesDataset(ds.root, split=split, transform=transform, labels=ds.labels)
    else:
        raise ValueError(f"unknown data set kind {ds.kind!r}")
    if ds.max_images is not None and ds.max_images < len(data):
        data = torch.utils.data.Subset(data, range(ds.max_images))
    return data


def _class_stats(cfg: Config, source):
    from cluda.data import compute_class_stats, load_class_stats

    d = cfg.data
    if d.class_stats is not None:
        return load_class_stats(d.class_stats)
    if d.source.kind == "synthetic":
        return compute_class_stats(source, dataset_kind="synthetic", split=source.split)
    return load_class_stats(os.path.join(d.source.root, "class_stats.json"))


def build_train_dataset(cfg: Config, *, length: Optional[int] = None):
    """The `UDADataset` of (source, target) pairs with DAFormer's training transform and rare
    class sampling. Item i is a pure function of (experiment.seed, i).

    Args:
        cfg: the experiment.
        length: what `len()` reports (any index is valid regardless).
    """
    from cluda.data import RareClassSampler, UDADataset, train_transform

    d = cfg.data
    crop = tuple(d.crop_size)

    def tf(ds: DatasetSection, **kw):
        return train_transform(scale=None if ds.scale is None else tuple(ds.scale), crop_size=crop,
                               flip_prob=d.flip_prob, **kw)

    source = build_dataset(d.source, role="source", transform=tf(d.source, cat_max_ratio=d.cat_max_ratio))
    # The target crop must not depend on the target's ground truth (no category-max rule): only
    # its images and, via the margins, their geometry enter training.
    target = build_dataset(d.target, role="target",
                           transform=tf(d.target, cat_max_ratio=1.0,
                                        pseudo_margins=d.target_pseudo_margins))
    rcs = None
    if d.rcs:
        if isinstance(source, torch.utils.data.Subset):
            raise ConfigError("data.rcs with data.source.max_images is not supported (the class "
                              "statistics cover the whole source set); set data.rcs: false")
        rcs = RareClassSampler(_class_stats(cfg, source), names=source.names,
                               temperature=d.rcs_temperature, min_pixels=d.rcs_min_pixels,
                               min_crop_ratio=d.rcs_min_crop_ratio,
                               max_crop_tries=d.rcs_max_crop_tries)
    return UDADataset(source, target, rcs=rcs, seed=cfg.experiment.seed, length=length)


def build_val_dataset(cfg: Config):
    """The target validation set: images resized to `data.val.scale`, labels at full resolution."""
    from cluda.data import eval_transform

    v = cfg.data.val
    return build_dataset(v, role="val",
                         transform=eval_transform(scale=None if v.scale is None else tuple(v.scale)))


# ----------------------------------------------------------------------------------------------
# The self-training step
# ----------------------------------------------------------------------------------------------

def build_uda_step(cfg: Config):
    """`cluda.uda.UDAStep` with the settings of the `uda`, `cl` and `mic` sections."""
    from cluda.losses import ContrastiveLoss
    from cluda.uda import UDAStep

    u, c, mic = cfg.uda, cfg.cl, cfg.mic
    contrastive = None
    if c.source or c.mixed or (c.masked and mic.enabled):
        contrastive = ContrastiveLoss(temperature=c.temperature, pairs=c.pairs,
                                      weighting=c.weighting, feat_size=c.feat_size,
                                      thing_classes=THING_CLASSES, impl=c.impl,
                                      variant=c.triton_variant, objective=c.objective)
    return UDAStep(
        self_training=u.enabled, start_iter=u.start_iter, pseudo_threshold=u.pseudo_threshold,
        ignore_top=u.ignore_top, ignore_bottom=u.ignore_bottom, mix=u.mix,
        jitter_strength=u.color_jitter_strength, jitter_p=u.color_jitter_p, blur_p=u.blur_p,
        blur_sigma=tuple(u.blur_sigma), fd_lambda=u.fd_lambda if u.fd else 0.0,
        contrastive=contrastive, cl_source=c.source, cl_mixed=c.mixed, cl_weight=c.weight,
        multires=c.multires, hr_crop=u.hr_crop, teacher_bn=u.teacher_bn, mic=mic.enabled,
        mic_block_size=mic.block_size, mic_ratio=mic.ratio, mic_weight=mic.weight,
        cl_masked=c.masked and mic.enabled, seed=cfg.experiment.seed)

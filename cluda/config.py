"""The experiment's config: the schema (typed sections), its validation, and loading it from
YAML and the command line.

A run of CLUDA (Vayyat et al., "Contrastive Learning in Unsupervised Domain Adaptation for
Semantic Segmentation") on DAFormer / HRDA self-training is described by one YAML file whose
sections are the dataclasses below; `load_experiment(path, overrides)` fills them
(`cluda.typed_config`), `--section.key=value` on the command line wins, and `validate` checks
every value once, at start-up. Defaults are the paper's training hyperparameters (DAFormer /
HRDA + CLUDA, MiT-B5, GTA -> Cityscapes, see DESIGN.md) except the data sets, which default to
the synthetic pair because it is the only data that exists everywhere.

Sections: `experiment` (name, work_dir, seed, device), `data` (source / target / val data sets,
crops, rare class sampling, batch size, workers), `model` (backbone, decoder, `hrda`), `uda`
(self-training: EMA teacher, pseudo-labels, ClassMix, strong augmentation, feature distance,
HR crop choice), `cl` (the CLUDA contrastive terms), `mic` (MIC's masked-image consistency),
`optim` (AdamW, warm-up, poly decay), `train` (iterations, intervals, autocast), `eval`
(inference mode, protocols, test-time augmentation).

Only `cluda.build`, `cluda.checkpoint`, the command lines and `train.py` read the config tree;
every other module takes typed keyword arguments.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, List, Literal, Optional, Sequence, Tuple, Union

from cluda.data.labels import NUM_CLASSES, PROTOCOLS
from cluda.typed_config import (ConfigError, apply_overrides, from_dict, load_config,
                                parse_overrides, save_yaml, split_overrides, to_dict)

__all__ = [
    "Config", "ExperimentSection", "DatasetSection", "DataSection", "HRDASection", "ModelSection",
    "UDASection", "CLSection", "MICSection", "OptimSection", "TrainSection", "EvalSection",
    "MIN_TEMPERATURE", "load_experiment", "validate", "output_dir",
    # cluda.typed_config, for the command lines
    "ConfigError", "from_dict", "to_dict", "load_config", "split_overrides", "parse_overrides",
    "apply_overrides", "save_yaml",
]

# The smallest cl.temperature: the op is exact for any features while exp(-2 / tau) stays a normal
# float32 (tau >= 2 / 87.3); below it a row whose pairs all underflow is only approximated.
MIN_TEMPERATURE = 0.023
_MIT_NAMES = tuple(f"mit_b{i}" for i in range(6))  # cluda.models.mit.MIT_CONFIGS, without the import


# ----------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------

@dataclass
class ExperimentSection:
    """name: run name; outputs go to `work_dir/name`. seed: seeds the model initialisation, the
    data (item i of the training set is a function of (seed, i)) and the step's random choices
    (a function of (seed, iteration, rank)). device: "auto" (CUDA when present), "cpu", "cuda".
    threads: torch's intra-op CPU threads (None: torch's default, one per core). On a CPU shared
    with other jobs, 1 avoids OpenMP's collapse under oversubscription (measured: 15 s instead of
    0.5 s per demo iteration on this 2-core machine with another 2-thread job running).
    deterministic: False (the default) lets cuDNN pick the fastest convolution algorithms by timing
    them (`cudnn.benchmark`, as DAFormer's runtime); True asks for deterministic cuDNN algorithms
    and `torch.use_deterministic_algorithms(True, warn_only=True)`, the trade of mmseg's
    `--deterministic`. On a CPU runs are bitwise reproducible either way; on a GPU some kernels
    (e.g. bilinear upsampling's backward, which scatters with atomics) have no deterministic
    version, so torch warns and two runs can still differ in the last bits."""
    name: str = "run"
    work_dir: str = "work_dirs"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Optional[int] = None
    deterministic: bool = False


@dataclass
class DatasetSection:
    """One data set. The same fields serve the source, target and validation roles.

    kind: "synthetic" (generated on the fly, `cluda.data.synthetic`), "gta", "synthia" or
    "cityscapes" (official layouts under `root`). split: Cityscapes / synthetic split; None means
    "train" for the source and target roles and "val" for the validation role. labels: "auto",
    "raw" or "prepared" train id files (real data sets). scale: (long, short) keep-ratio resize
    bounds, e.g. [1280, 720] for GTA, or None to keep the size. max_images: use only the first N
    samples (e.g. a quick validation subset). Synthetic only: num_samples scenes of size
    (height, width), scene_seed (None: 0 for source and validation, 1 for target, so the two
    training sets never share a layout).
    """
    kind: Literal["synthetic", "gta", "synthia", "cityscapes"] = "synthetic"
    root: Optional[str] = None
    split: Optional[str] = None
    labels: Literal["auto", "raw", "prepared"] = "auto"
    scale: Optional[List[int]] = None
    max_images: Optional[int] = None
    num_samples: int = 1000
    size: List[int] = field(default_factory=lambda: [256, 512])
    scene_seed: Optional[int] = None


@dataclass
class DataSection:
    """Training data. crop_size: (height, width) of the random training crop (DAFormer 512,
    HRDA 1024). cat_max_ratio / flip_prob: mmseg's crop rule and flip probability; the rule picks
    source crops only (target crops are drawn without reading the target's labels, as DAFormer's
    and HRDA's target pipelines do: the rule would choose them with the target's ground truth).
    rcs: rare class sampling of source images (DAFormer: temperature 0.01, an image needs more
    than `rcs_min_pixels` pixels of the class, crops re-drawn up to `rcs_max_crop_tries` times
    until they hold `rcs_min_crop_ratio` of that; DAFormer 0.5, HRDA 2.0 for its 4x larger
    inputs). target_pseudo_margins: None, or [top, bottom, left, right] pixels of the resized
    target image whose pseudo-labels get weight 0, marked before the crop so that a crop loses
    them only where it touches the image border (HRDA's `crop_pseudo_margins`, [30, 240, 30, 30]
    at 2048 x 1024); applied on top of uda.ignore_top / ignore_bottom, which act on every crop
    (DAFormer's 15 / 120). class_stats: the statistics file; None means
    `<source root>/class_stats.json` (written by `python -m cluda.data.prepare`), or computed in
    memory for synthetic data. batch_size: source and target images per process and step
    (DAFormer: 2 + 2). workers: DataLoader worker processes."""
    source: DatasetSection = field(default_factory=DatasetSection)
    target: DatasetSection = field(default_factory=DatasetSection)
    val: DatasetSection = field(default_factory=DatasetSection)
    crop_size: List[int] = field(default_factory=lambda: [512, 512])
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    rcs: bool = True
    rcs_temperature: float = 0.01
    rcs_min_pixels: int = 3000
    rcs_min_crop_ratio: float = 0.5
    rcs_max_crop_tries: int = 10
    target_pseudo_margins: Optional[List[int]] = None
    class_stats: Optional[str] = None
    batch_size: int = 2
    workers: int = 4


@dataclass
class HRDASection:
    """HRDA multi-resolution training (Hoyer et al., ECCV 2022) and CLUDA's feature-weight head.
    enabled: wrap the segmentor in `cluda.models.HRDA`. hr_crop_size: the HR detail crop (512).
    lr_scale: context downscale (0.5). crop_divisible: detail box alignment (8). hr_slide_size /
    hr_slide_stride: HR windows at inference and for the teacher's pseudo-labels (512 / 256).
    head_channels: scale-attention / feature-weight head width (256). feature_weight_head:
    build the head whose delta weights LR against HR pixels in CLUDA-MR (Eq. 7).
    hr_loss_weight: CE weight of the HR detail crop (0.1; the fused logits get 0.9)."""
    enabled: bool = False
    hr_crop_size: List[int] = field(default_factory=lambda: [512, 512])
    lr_scale: float = 0.5
    crop_divisible: int = 8
    hr_slide_size: List[int] = field(default_factory=lambda: [512, 512])
    hr_slide_stride: List[int] = field(default_factory=lambda: [256, 256])
    head_channels: int = 256
    feature_weight_head: bool = True
    hr_loss_weight: float = 0.1


@dataclass
class ModelSection:
    """backbone: `mit_b0` ... `mit_b5` or a timm name (`swin_large_patch4_window12_384`,
    `resnet101`). pretrained: the encoder's ImageNet weights: a local file (SegFormer's
    `mit_b5.pth`, a timm checkpoint), true (a timm backbone's weights, downloaded through timm;
    offline the start fails at once asking for a local file; MiT has no download), or null / false
    (random initialisation). channels:
    fused decoder channels C (CLUDA 512). embed_dim / aspp_channels / dropout: the DAFormer
    decoder's per-level embedding, ASPP branch width and classifier dropout. drop_path_rate:
    encoder stochastic depth (None: the model's default). img_size: build size of fixed-size
    timm models (Swin): the training crop."""
    backbone: str = "mit_b5"
    pretrained: Union[None, bool, str] = None
    num_classes: int = NUM_CLASSES
    channels: int = 512
    embed_dim: int = 256
    aspp_channels: int = 256
    dropout: float = 0.1
    drop_path_rate: Optional[float] = None
    img_size: Optional[List[int]] = None
    hrda: HRDASection = field(default_factory=HRDASection)


@dataclass
class UDASection:
    """Self-training (DACS / DAFormer). enabled: false gives source-only training. start_iter:
    source-only warm-up iterations before the target terms start (the teacher is copied from
    the student then). ema_alpha: final EMA coefficient, alpha_t = min(1 - 1/(t+1), ema_alpha)
    with t counted from start_iter. pseudo_threshold: beta of the confidence weight Gamma
    (0.968). ignore_top / ignore_bottom: rows of the target crop with pseudo-label weight 0
    (15 / 120 at 512 crops of Cityscapes). mix: "class" (ClassMix) or "none" (the pseudo-labelled
    target image itself). color_jitter_strength / color_jitter_p / blur_p / blur_sigma: the strong
    augmentation of the mixed image (0.2 / 0.8 / 0.5 / [0.15, 1.15]). fd: DAFormer's thing-class
    ImageNet feature distance on source images, weight fd_lambda (0.005); needs ImageNet
    weights to mean anything. hr_crop: HRDA detail crop of mixed images, "random" or "entropy"
    (CLUDA appendix 7.4: where the teacher's prediction entropy is highest). teacher_bn: the
    teacher's BatchNorm statistics for pseudo-labels, "batch" (DAFormer: the target batch's own,
    dropout off) or "running" (eval mode)."""
    enabled: bool = True
    start_iter: int = 0
    ema_alpha: float = 0.999
    pseudo_threshold: float = 0.968
    ignore_top: int = 15
    ignore_bottom: int = 120
    mix: Literal["class", "none"] = "class"
    color_jitter_strength: float = 0.2
    color_jitter_p: float = 0.8
    blur_p: float = 0.5
    blur_sigma: List[float] = field(default_factory=lambda: [0.15, 1.15])
    fd: bool = True
    fd_lambda: float = 0.005
    hr_crop: Literal["random", "entropy"] = "random"
    teacher_bn: Literal["batch", "running"] = "batch"


@dataclass
class CLSection:
    """The CLUDA contrastive terms. source: L_CL^s (Eq. 3). mixed: L_CL^m (Eq. 4-5), needs
    uda.enabled. weight: multiplies both. temperature: tau (the original code: 1; at least 0.023,
    where float32 still holds exp(-2 / tau) and the op is exact for any features). pairs:
    "all" | "stuff" | "stuff+thing" (Sec. 5.5). weighting: "anchor" (the paper) or "pair" (the
    original code). feat_size: None (native fused resolution) or [h, w] (the original code's
    [65, 65] bilinear resize); single-resolution models only. multires (HRDA): "lr" (LR features
    only), "lr+hr" (LR and HR features, weights 1) or "weighted" (Eq. 7, delta / 1 - delta).
    impl: `kernels.pixel_infonce` implementation ("auto": Triton on CUDA, tiled torch on CPU).
    triton_variant: launch preset of the Triton kernels (`kernels.triton_infonce.VARIANTS`; None:
    the default, tuned on an H200); on another GPU `python -m bench.bench_pixel_infonce
    --variants all` says which is fastest there. objective: "paper" (Eq. 2-7) or "released": the
    objective the released CLUDA code computes instead (`cluda.losses` module docstring: 65 x 65
    features, pixel-major features against image-major labels, 255 a class, all pairs, w_i * w_j
    on positive pairs, tau 1, its LR-anchor multi-resolution loss); it fixes temperature, pairs,
    weighting and feat_size, which must keep their defaults, and with HRDA multires "weighted".
    masked: also the contrastive term on MIC's masked target image (labels: the teacher's
    pseudo-labels of the unmasked image, weights: their confidence weights; times `weight`),
    logged as "mic.cl"; needs mic.enabled. Not in any paper; off by default."""
    source: bool = True
    mixed: bool = True
    weight: float = 1.0
    temperature: float = 1.0
    pairs: Literal["all", "stuff", "stuff+thing"] = "stuff+thing"
    weighting: Literal["anchor", "pair"] = "anchor"
    feat_size: Optional[List[int]] = None
    multires: Literal["lr", "lr+hr", "weighted"] = "weighted"
    impl: Literal["auto", "triton", "torch", "reference"] = "auto"
    triton_variant: Optional[str] = None
    objective: Literal["paper", "released"] = "paper"
    masked: bool = False


@dataclass
class MICSection:
    """MIC, masked image consistency (Hoyer et al., CVPR 2023), a term of the self-training
    step: the target crop, colour-augmented as the mixed image, with random square blocks set to
    the mean colour, goes through the student; its cross-entropy against the EMA teacher's
    pseudo-labels of the unmasked crop, weighted by the same confidence weights as the mixed
    term, times `weight`, is logged as "mic.ce". enabled: add the term (needs uda.enabled).
    block_size: block side in pixels of the training crop (MIC: 64 at full resolution, i.e. for
    HRDA's 1024 crops; the released code uses 32 for DAFormer's half-resolution 512 crops).
    ratio: probability that a block is masked (0.7). weight: the term's weight lambda^M (1)."""
    enabled: bool = False
    block_size: int = 64
    ratio: float = 0.7
    weight: float = 1.0


@dataclass
class OptimSection:
    """AdamW (DAFormer): lr for the encoder, lr * head_lr_mult for the decoder and HRDA heads,
    weight_decay (none on norms and position tables), betas. Schedule: linear warm-up over
    warmup_iters from warmup_ratio * lr, then poly decay (1 - it / max_iters) ** poly_power down
    to min_lr. grad_clip: max gradient norm, or None."""
    lr: float = 6e-5
    head_lr_mult: float = 10.0
    weight_decay: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    poly_power: float = 1.0
    min_lr: float = 0.0
    grad_clip: Optional[float] = None


@dataclass
class TrainSection:
    """max_iters: training iterations (40k in the paper). log_interval / eval_interval /
    checkpoint_interval: in iterations (0 disables periodic evaluation / checkpoints; the last
    iteration always evaluates and saves; the last evaluation is the result to report, as the
    papers report their final checkpoints). amp: bfloat16 autocast on CUDA (ignored on the CPU);
    the released DAFormer / HRDA / CLUDA code trains in float32, which amp: false reproduces.
    tensorboard: also write TensorBoard events when the package is installed. nonfinite: what a
    step with a non-finite loss or gradient does: "skip" (the weights and the optimiser's moments
    stay as they were, a warning names the iteration and the parameters, log.csv counts it in
    `skipped`) or "stop" (raise at once, nothing saved past the last checkpoint)."""
    max_iters: int = 40000
    log_interval: int = 50
    eval_interval: int = 4000
    checkpoint_interval: int = 4000
    amp: bool = True
    tensorboard: bool = True
    nonfinite: Literal["skip", "stop"] = "skip"


@dataclass
class EvalSection:
    """Evaluation on the validation set at the labels' full resolution. mode: "whole" or "slide"
    (windows of crop_size every stride; HRDA: 1024 / 512 on 2048 x 1024 images). protocols:
    19 (GTA -> CS) or 16 and 13 (SYNTHIA -> CS); the first selects best.pt. flip / scales:
    test-time augmentation. batch_size / workers: validation loader."""
    mode: Literal["whole", "slide"] = "whole"
    crop_size: List[int] = field(default_factory=lambda: [512, 512])
    stride: List[int] = field(default_factory=lambda: [341, 341])
    protocols: List[int] = field(default_factory=lambda: [19])
    flip: bool = False
    scales: List[float] = field(default_factory=lambda: [1.0])
    batch_size: int = 1
    workers: int = 2


@dataclass
class Config:
    """A whole experiment; see the module docstring and each section's docstring."""
    experiment: ExperimentSection = field(default_factory=ExperimentSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    uda: UDASection = field(default_factory=UDASection)
    cl: CLSection = field(default_factory=CLSection)
    mic: MICSection = field(default_factory=MICSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)


# ----------------------------------------------------------------------------------------------
# Loading and checking
# ----------------------------------------------------------------------------------------------

def _pair(value: Sequence[int], where: str) -> Tuple[int, int]:
    if len(value) != 2 or min(value) < 1:
        raise ConfigError(f"{where}: expected [height, width] of positive ints, got {value}")
    return int(value[0]), int(value[1])


def _non_finite(obj: Any, prefix: str) -> List[str]:
    """Dotted keys of the NaN / infinite floats in a tree of config dataclasses."""
    bad = []
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            bad += _non_finite(value, key + ".")
        elif any(isinstance(v, float) and not math.isfinite(v)
                 for v in (value if isinstance(value, list) else [value])):
            bad.append(key)
    return bad


def _check_range(value: Optional[float], key: str, low: float, high: float, *,
                 low_open: bool = False, high_open: bool = False) -> None:
    """`value` (None: unset, not checked) must lie in the interval; ConfigError naming `key`."""
    if value is None:
        return
    if (value < low or (low_open and value == low) or value > high
            or (high_open and value == high)):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{key} must lie in {interval}, got {value}")


def validate(cfg: Config) -> Config:
    """Every check of the config's values the types alone cannot express, so that a bad value
    fails at start-up and not at its first use (e.g. an evaluation after hours of training);
    returns `cfg`. Checks that depend on the machine (CUDA present, Triton runnable) are
    `resolve_device`'s.

    Raises:
        ConfigError: naming the offending key(s).
    """
    if not isinstance(cfg, Config):
        raise TypeError(f"expected a cluda.config.Config, got {type(cfg).__name__}")
    d, m, u, c, o, t, e = cfg.data, cfg.model, cfg.uda, cfg.cl, cfg.optim, cfg.train, cfg.eval
    non_finite = _non_finite(cfg, "")
    if non_finite:
        raise ConfigError(f"{', '.join(non_finite)}: NaN or infinite values are not allowed")
    if cfg.experiment.threads is not None and cfg.experiment.threads < 1:
        raise ConfigError(f"experiment.threads must be >= 1 or null, got {cfg.experiment.threads}")
    if not 0 <= cfg.experiment.seed < 2 ** 63:  # torch.manual_seed and numpy's seeding
        raise ConfigError(f"experiment.seed must lie in [0, 2**63), got {cfg.experiment.seed}")
    _pair(d.crop_size, "data.crop_size")
    for role in ("source", "target", "val"):
        ds: DatasetSection = getattr(d, role)
        if ds.kind != "synthetic" and not ds.root:
            raise ConfigError(f"data.{role}.root is required for kind {ds.kind!r}")
        if ds.kind == "synthetic":
            _pair(ds.size, f"data.{role}.size")
            if ds.num_samples < 1:
                raise ConfigError(f"data.{role}.num_samples must be >= 1, got {ds.num_samples}")
        if ds.scale is not None:
            _pair(ds.scale, f"data.{role}.scale")
        if ds.max_images is not None and ds.max_images < 1:
            raise ConfigError(f"data.{role}.max_images must be >= 1 or null, got {ds.max_images}")
    if d.source.kind == "cityscapes" or d.target.kind in ("gta", "synthia"):
        raise ConfigError(f"data.source.kind {d.source.kind!r} / data.target.kind "
                          f"{d.target.kind!r}: the source must be labelled synthetic data "
                          "(synthetic, gta, synthia) and the target real or synthetic "
                          "(cityscapes, synthetic)")
    if d.target_pseudo_margins is not None and (len(d.target_pseudo_margins) != 4
                                                 or min(d.target_pseudo_margins) < 0):
        raise ConfigError(f"data.target_pseudo_margins must be null or [top, bottom, left, right] "
                          f"pixels >= 0, got {d.target_pseudo_margins}")
    if d.batch_size < 1 or d.workers < 0:
        raise ConfigError(f"data.batch_size must be >= 1 and data.workers >= 0, got "
                          f"{d.batch_size}, {d.workers}")
    _check_range(d.cat_max_ratio, "data.cat_max_ratio", 0, 1, low_open=True)
    _check_range(d.flip_prob, "data.flip_prob", 0, 1)
    if d.rcs_temperature <= 0:  # the class softmax divides by it
        raise ConfigError(f"data.rcs_temperature must be > 0, got {d.rcs_temperature}")
    # rcs_min_crop_ratio scales rcs_min_pixels (HRDA: 2.0 for its larger crops), so it may pass 1
    if d.rcs_min_pixels < 0 or d.rcs_max_crop_tries < 1 or d.rcs_min_crop_ratio < 0:
        raise ConfigError(f"data.rcs_min_pixels and data.rcs_min_crop_ratio must be >= 0 and "
                          f"data.rcs_max_crop_tries >= 1, got {d.rcs_min_pixels}, "
                          f"{d.rcs_min_crop_ratio}, {d.rcs_max_crop_tries}")
    if m.pretrained is True and m.backbone in _MIT_NAMES:
        raise ConfigError(f"model.pretrained: true downloads a timm backbone's weights, but "
                          f"SegFormer's {m.backbone} weights have no download: give the local file, "
                          f"e.g. --model.pretrained=pretrained/{m.backbone}.pth")
    if m.backbone not in _MIT_NAMES:
        import timm  # only for other backbones: the name must be one timm can build
        if not timm.is_model(m.backbone):
            raise ConfigError(f"model.backbone {m.backbone!r} is neither mit_b0..mit_b5 nor a "
                              "timm model (cluda.models.available_backbones() lists them)")
    if min(m.channels, m.embed_dim, m.aspp_channels) < 1:
        raise ConfigError("model.channels, model.embed_dim and model.aspp_channels must be >= 1")
    _check_range(m.dropout, "model.dropout", 0, 1, high_open=True)
    _check_range(m.drop_path_rate, "model.drop_path_rate", 0, 1, high_open=True)
    if m.img_size is not None:
        _pair(m.img_size, "model.img_size")
    if m.num_classes != NUM_CLASSES:
        raise ConfigError(f"model.num_classes must be {NUM_CLASSES} (the Cityscapes train ids all "
                          f"data sets are mapped to), got {m.num_classes}")
    if m.hrda.enabled:
        h = m.hrda
        _check_range(h.lr_scale, "model.hrda.lr_scale", 0, 1, low_open=True)
        _check_range(h.hr_loss_weight, "model.hrda.hr_loss_weight", 0, 1)
        if h.crop_divisible < 1 or h.head_channels < 1:
            raise ConfigError("model.hrda.crop_divisible and model.hrda.head_channels must be >= 1")
        _slide_windows(h.hr_slide_size, h.hr_slide_stride, "model.hrda.hr_slide_size",
                       "model.hrda.hr_slide_stride")
        hc = _pair(m.hrda.hr_crop_size, "model.hrda.hr_crop_size")
        crop = _pair(d.crop_size, "data.crop_size")
        if hc[0] > crop[0] or hc[1] > crop[1]:
            raise ConfigError(f"model.hrda.hr_crop_size {list(hc)} must fit in data.crop_size "
                              f"{list(crop)}")
        if (c.multires == "weighted" and (c.source or c.mixed or c.masked)
                and not m.hrda.feature_weight_head):
            raise ConfigError("cl.multires 'weighted' needs model.hrda.feature_weight_head: true "
                              "(or set cl.multires to 'lr' / 'lr+hr')")
    if c.feat_size is not None:
        _pair(c.feat_size, "cl.feat_size")
    if c.mixed and not u.enabled:
        raise ConfigError("cl.mixed needs uda.enabled (the mixed term lives on the ClassMix "
                          "image); set cl.mixed: false for source-only training")
    if c.temperature < MIN_TEMPERATURE or c.weight < 0:
        raise ConfigError(f"cl.temperature must be >= {MIN_TEMPERATURE} and cl.weight >= 0, got "
                          f"{c.temperature}, {c.weight} (below {MIN_TEMPERATURE} float32's exp "
                          "range no longer holds every pair of unit features, see "
                          "kernels.pixel_infonce)")
    if c.objective == "released":
        defaults = CLSection()
        changed = [f"cl.{k}={getattr(c, k)!r}" for k in ("temperature", "pairs", "weighting", "feat_size")
                   if getattr(c, k) != getattr(defaults, k)]
        if m.hrda.enabled and c.multires != "weighted":
            changed.append(f"cl.multires={c.multires!r}")
        if changed:
            raise ConfigError(
                "cl.objective 'released' fixes tau (1), the pairs (all), the weighting (w_i * w_j) "
                "and the 65 x 65 feature grid, and has only the 'weighted' multi-resolution loss: "
                f"leave cl.temperature, cl.pairs, cl.weighting, cl.feat_size and cl.multires at "
                f"their defaults; got {', '.join(changed)}")
    mic = cfg.mic
    if mic.enabled and not u.enabled:
        raise ConfigError("mic.enabled needs uda.enabled (MIC's pseudo-labels come from the "
                          "self-training teacher)")
    if mic.block_size < 1 or not 0.0 <= mic.ratio <= 1.0 or mic.weight < 0:
        raise ConfigError(f"mic.block_size must be >= 1, mic.ratio in [0, 1] and mic.weight >= 0, "
                          f"got {mic.block_size}, {mic.ratio}, {mic.weight}")
    if c.masked and not mic.enabled:
        raise ConfigError("cl.masked needs mic.enabled (the term lives on MIC's masked image)")
    if c.triton_variant is not None:
        from kernels.triton_infonce import resolve_variant  # only when asked for: imports triton
        try:
            resolve_variant(c.triton_variant)  # an earlier name maps, with a warning
        except ValueError as err:
            raise ConfigError(f"cl.triton_variant must be null or a preset name: {err}") from None
    if not 0.0 <= u.ema_alpha <= 1.0 or not 0.0 <= u.pseudo_threshold <= 1.0:
        raise ConfigError(f"uda.ema_alpha and uda.pseudo_threshold must lie in [0, 1], got "
                          f"{u.ema_alpha}, {u.pseudo_threshold}")
    if u.start_iter < 0 or u.ignore_top < 0 or u.ignore_bottom < 0 or u.fd_lambda < 0:
        raise ConfigError("uda.start_iter, uda.ignore_top, uda.ignore_bottom and uda.fd_lambda "
                          "must be >= 0")
    if len(u.blur_sigma) != 2 or not 0 < u.blur_sigma[0] <= u.blur_sigma[1]:
        raise ConfigError(f"uda.blur_sigma must be [low, high] with 0 < low <= high, got "
                          f"{u.blur_sigma}")
    _check_range(u.color_jitter_p, "uda.color_jitter_p", 0, 1)
    _check_range(u.blur_p, "uda.blur_p", 0, 1)
    if not 0 <= u.color_jitter_strength <= 0.5:
        raise ConfigError(f"uda.color_jitter_strength must lie in [0, 0.5] (hue shifts beyond half a "
                          f"turn are meaningless), got {u.color_jitter_strength}")
    if o.lr <= 0 or o.head_lr_mult <= 0 or o.weight_decay < 0 or len(o.betas) != 2:
        raise ConfigError("optim.lr and optim.head_lr_mult must be > 0, optim.weight_decay >= 0 "
                          "and optim.betas two numbers")
    if o.warmup_iters < 0 or not 0 < o.warmup_ratio <= 1 or o.min_lr < 0:
        raise ConfigError("optim.warmup_iters >= 0, 0 < optim.warmup_ratio <= 1 and "
                          "optim.min_lr >= 0 are required")
    for i, beta in enumerate(o.betas):  # AdamW refuses anything else, at its construction
        _check_range(beta, f"optim.betas[{i}]", 0, 1, high_open=True)
    if o.min_lr > o.lr or o.poly_power < 0:
        raise ConfigError(f"optim.min_lr must be <= optim.lr and optim.poly_power >= 0, got "
                          f"{o.min_lr}, {o.lr}, {o.poly_power}")
    if o.grad_clip is not None and o.grad_clip <= 0:
        raise ConfigError(f"optim.grad_clip must be > 0 or null, got {o.grad_clip}")
    if t.max_iters < 1 or t.log_interval < 1 or t.eval_interval < 0 or t.checkpoint_interval < 0:
        raise ConfigError("train.max_iters and train.log_interval must be >= 1, "
                          "train.eval_interval and train.checkpoint_interval >= 0")
    if u.start_iter > t.max_iters:
        raise ConfigError(f"uda.start_iter {u.start_iter} is beyond train.max_iters {t.max_iters}")
    unknown = [p for p in e.protocols if p not in PROTOCOLS]
    if not e.protocols or unknown:
        raise ConfigError(f"eval.protocols must list some of {sorted(PROTOCOLS)}, got {e.protocols}")
    # Checked in either mode: an override can switch a stored config to slide.
    _slide_windows(e.crop_size, e.stride, "eval.crop_size", "eval.stride")
    if e.batch_size < 1 or e.workers < 0 or not e.scales:
        raise ConfigError("eval.batch_size must be >= 1, eval.workers >= 0 and eval.scales non-empty")
    if any(s <= 0 for s in e.scales):
        raise ConfigError(f"eval.scales must be positive input scale factors, got {e.scales}")
    return cfg


def _slide_windows(size: Sequence[int], stride: Sequence[int], size_key: str,
                   stride_key: str) -> None:
    """Sliding windows cover the image only if the stride is at most the window."""
    window, step = _pair(size, size_key), _pair(stride, stride_key)
    if step[0] > window[0] or step[1] > window[1]:
        raise ConfigError(f"{stride_key} {list(step)} must not exceed {size_key} {list(window)}: "
                          "windows further apart than their size leave pixels unpredicted")


def load_experiment(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """YAML file (or the schema's defaults) + `--section.key=value` overrides -> checked Config."""
    cfg = load_config(Config, path, overrides)
    try:
        return validate(cfg)
    except ConfigError as err:
        raise ConfigError(f"{path or 'config'}: {err}") from None


def output_dir(cfg: Config) -> str:
    """Where a run writes: `experiment.work_dir / experiment.name`."""
    return os.path.join(cfg.experiment.work_dir, cfg.experiment.name)

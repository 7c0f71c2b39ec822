"""Encoders for the segmentor: this project's MiT, or any timm `features_only` model.

Every encoder returned by `build_backbone` maps (B, 3, H, W) images to a list of NCHW feature maps,
finest first, and carries `channels` (channels per level) and `reductions` (stride per level),
read from the model (`feature_info` for timm), never hard-coded.

Weights (`pretrained`):
- `None` / `False`: random initialisation;
- a local path: SegFormer-layout weights for `mit_b*` (`load_mit_weights`), or a timm / torchvision
  style checkpoint for timm models, run through timm's own checkpoint filter (so e.g. Swin's
  relative-position tables are resized to the chosen window) and checked strictly: a missing key,
  an unknown key or a shape mismatch is an error naming the file;
- `True`: timm's download (Hugging Face hub or URL). Offline this fails fast with an error that
  says to pass a local path. SegFormer's MiT weights have no automatic download.

Also here: `build_imnet_encoder`, the frozen ImageNet copy used by DAFormer's feature-distance loss.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import os
import socket
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union
from urllib.parse import urlparse

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .weights import PathLike, check_keys, read_state_dict
from .mit import MIT_CONFIGS, MixVisionTransformer, load_mit_weights, mit

Pretrained = Union[None, bool, PathLike]

# How long a probe of the weight host may take before we call the machine offline (seconds).
_PROBE_TIMEOUT_S = 3.0


class TimmBackbone(nn.Module):
    """A timm `features_only` model as an encoder: NCHW outputs, `channels`, `reductions`.

    Swin-style models emit NHWC maps; they are permuted to NCHW. Patch-embedding models need the
    input to be a multiple of the patch size: when `pad_multiple` > 1 the image is zero-padded at
    the bottom / right (zero is the mean of a normalised image), so any H x W works and level k
    has ceil(H / reduction_k) rows, as with MiT.

    Args:
        model: a timm model built with `features_only=True`.
        pad_multiple: pad H and W up to a multiple of this (1: no padding).
    """

    def __init__(self, model: nn.Module, *, pad_multiple: int = 1) -> None:
        super().__init__()
        info = getattr(model, "feature_info", None)
        if info is None:
            raise TypeError(f"{type(model).__name__} has no feature_info; build it with features_only=True")
        self.model = model
        self.channels: List[int] = [int(c) for c in info.channels()]
        self.reductions: List[int] = [int(r) for r in info.reduction()]
        fmt = getattr(model, "output_fmt", "NCHW")
        self.nhwc = str(getattr(fmt, "value", fmt)) == "NHWC"
        self.pad_multiple = int(pad_multiple)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f"expected (B, C, H, W) images, got shape {tuple(x.shape)}")
        if self.pad_multiple > 1:
            h, w = x.shape[-2:]
            m = self.pad_multiple
            x = F.pad(x, (0, (-w) % m, 0, (-h) % m))
        feats = self.model(x)
        if isinstance(feats, dict):
            feats = list(feats.values())
        if self.nhwc:
            feats = [f.permute(0, 3, 1, 2).contiguous() for f in feats]
        return list(feats)


def available_backbones() -> List[str]:
    """The MiT variants plus every timm architecture name."""
    return sorted(MIT_CONFIGS) + timm.list_models()


def build_backbone(
    name: str,
    *,
    pretrained: Pretrained = None,
    drop_path_rate: Optional[float] = None,
    out_indices: Optional[Sequence[int]] = None,
    img_size: Optional[Union[int, Tuple[int, int]]] = None,
) -> nn.Module:
    """Build an encoder by name.

    Args:
        name: `mit_b0` ... `mit_b5`, or a timm model name (`resnet101`, `swin_large_patch4_window12_384`,
            `convnext_base`, optionally with a `.tag`).
        pretrained: None / False (random init), True (download through timm), or a local file path.
        drop_path_rate: stochastic depth; None keeps the model's default (0.1 for MiT).
        out_indices: timm feature levels to return; None gives the last four (strides 4 ... 32
            for the usual models). Ignored for MiT, which always returns its four stages.
        img_size: for timm models with a fixed input size (Swin, ViT): the training crop size the
            model is built for (window sizes are checked against it); inputs of other sizes still
            work because such models are built with `dynamic_img_size=True`.

    Returns:
        An `nn.Module` with `channels` and `reductions` (lists of ints) whose forward maps
        (B, 3, H, W) to a list of (B, channels[k], ~H / reductions[k], ~W / reductions[k]) maps.

    Raises:
        ValueError: unknown name (with close matches), unusable options or a checkpoint that does
            not fit (naming the file and keys).
        FileNotFoundError: `pretrained` is a path that does not exist.
        RuntimeError: `pretrained=True` but the weights cannot be fetched (offline).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"backbone name must be a non-empty string, got {name!r}")
    if pretrained is not None and not isinstance(pretrained, (bool, str, os.PathLike)):
        raise TypeError(f"pretrained must be None, a bool or a file path, got {type(pretrained).__name__}")
    path = None if pretrained is None or isinstance(pretrained, bool) else os.fspath(pretrained)
    if path is not None and not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights file not found: {path!r} (for backbone {name!r})")

    if name in MIT_CONFIGS:
        return _build_mit(name, pretrained=pretrained, path=path, drop_path_rate=drop_path_rate)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, available_backbones(), n=5, cutoff=0.6)
        hint = f"; did you mean one of {close}?" if close else "; see cluda.models.available_backbones()"
        raise ValueError(f"unknown backbone {name!r}: neither mit_b0..mit_b5 nor a timm model{hint}")
    return _build_timm(
        name, pretrained=pretrained, path=path, drop_path_rate=drop_path_rate, out_indices=out_indices, img_size=img_size
    )


def _build_mit(name: str, *, pretrained: Pretrained, path: Optional[str], drop_path_rate: Optional[float]) -> MixVisionTransformer:
    if pretrained is True:
        raise RuntimeError(
            f"SegFormer's ImageNet weights for {name} have no automatic download here: fetch {name}.pth from "
            f"the SegFormer release and pass pretrained='/path/to/{name}.pth'"
        )
    model = mit(name, drop_path_rate=0.1 if drop_path_rate is None else drop_path_rate)
    if path is not None:
        load_mit_weights(model, path)
    return model


def _build_timm(
    name: str,
    *,
    pretrained: Pretrained,
    path: Optional[str],
    drop_path_rate: Optional[float],
    out_indices: Optional[Sequence[int]],
    img_size: Optional[Union[int, Tuple[int, int]]],
) -> TimmBackbone:
    cfg = timm.models.get_pretrained_cfg(name)
    fixed_size = bool(cfg is not None and cfg.fixed_input_size)
    kwargs: Dict[str, object] = dict(features_only=True, out_indices=tuple(out_indices or (-4, -3, -2, -1)))
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    if fixed_size:
        # Swin / ViT are built for one input size; dynamic_img_size builds attention masks and
        # window padding for the actual size on each forward (timm >= 1.0).
        kwargs["dynamic_img_size"] = True
        if img_size is not None:
            kwargs["img_size"] = img_size

    if path is not None:
        model = _create_timm_from_file(name, path, kwargs)
    elif pretrained is True:
        model = _create_timm_downloaded(name, cfg, kwargs)
    else:
        model = _create_timm(name, dict(kwargs, pretrained=False))

    # Patch-embedding models need H, W to be a multiple of the first stride (the patch size).
    pad_multiple = int(model.feature_info.reduction()[0]) if fixed_size else 1
    return TimmBackbone(model, pad_multiple=pad_multiple)


def _create_timm(name: str, kwargs: Dict[str, object]) -> nn.Module:
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as err:
        raise ValueError(f"timm model {name!r} does not accept the options {sorted(kwargs)}: {err}") from err


def _create_timm_downloaded(name: str, cfg, kwargs: Dict[str, object]) -> nn.Module:
    hint = "pass a local weights file instead: pretrained='/path/to/weights.pth' (or .safetensors)"
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise ValueError(f"timm has no pretrained weights for {name!r}; {hint}")
    host = _weights_host(cfg)
    # Without this probe an offline machine spends about a minute in the hub client's retries.
    # HF_HUB_OFFLINE=1 means "use the local hub cache": let timm try it (a cache miss fails at once).
    from_cache = bool(cfg.hf_hub_id) and _hub_offline()
    if host is not None and not from_cache and not _host_reachable(host):
        raise RuntimeError(f"cannot download pretrained weights for {name!r}: {host} is unreachable (offline?); {hint}")
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:  # hub / url errors are OSError subclasses
        raise RuntimeError(
            f"could not fetch pretrained weights for {name!r} ({type(err).__name__}: {err}); {hint}"
        ) from err


def _create_timm_from_file(name: str, path: str, kwargs: Dict[str, object]) -> nn.Module:
    state = read_state_dict(path)
    # timm's pretrained path runs the architecture's checkpoint filter (e.g. Swin's relative-position
    # tables resized to the chosen window, original checkpoints' key layout converted) before the
    # features_only wrapper renames modules; `state_dict` outranks `file`, which records the source.
    overlay = dict(state_dict=state, file=path)
    with _recorded_loads() as loads:
        try:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        except RuntimeError as err:  # torch's shape-mismatch report
            raise ValueError(f"checkpoint {path!r} does not fit timm model {name!r}: {err}") from err
        except TypeError as err:
            raise ValueError(f"timm model {name!r} does not accept the options {sorted(kwargs)}: {err}") from err
    _drop_state_dict_copies(model)
    if not loads:
        raise ValueError(f"timm did not load checkpoint {path!r} into {name!r}")
    missing, unexpected = loads[-1]
    cfg = timm.models.get_pretrained_cfg(name)
    classifiers = (cfg.classifier if cfg is not None else None) or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    # A features_only model is built with its classifier; timm drops the checkpoint's classifier
    # and loads non-strictly, reporting the classifier (and anything else) as missing.
    missing = [k for k in missing if not any(k.startswith(c + ".") for c in classifiers)]
    check_keys(f"checkpoint {path!r} does not fit timm model {name!r}", missing=missing,
               unexpected=unexpected)
    return model


@contextlib.contextmanager
def _recorded_loads() -> Iterator[List[Tuple[List[str], List[str]]]]:
    """Record the missing and unexpected keys of each `load_state_dict` into modules built in the block.

    timm loads a features_only model's pretrained weights non-strictly (it drops the classifier)
    and only logs what did not match, and the model is not reachable until `timm.create_model`
    returns. torch's global module-registration hook sees every submodule as it is built; a
    load_state_dict post-hook on each receives that load's missing / unexpected key lists (one
    pair shared by the whole tree, complete once the load returns). Both hooks are removed on exit.

    Yields a list that receives (missing keys, unexpected keys) per load, in call order.
    """
    records: List[Tuple[List[str], List[str]]] = []
    handles = []

    def record(module: nn.Module, keys) -> None:
        if not any(missing is keys.missing_keys for missing, _ in records):
            records.append((keys.missing_keys, keys.unexpected_keys))

    def hook_child(parent: nn.Module, name: str, child: Optional[nn.Module]) -> None:
        if child is not None:
            handles.append(child.register_load_state_dict_post_hook(record))

    registration = torch.nn.modules.module.register_module_module_registration_hook(hook_child)
    try:
        yield records
    finally:
        registration.remove()
        for handle in handles:
            handle.remove()


def _drop_state_dict_copies(model: nn.Module) -> None:
    """timm keeps copies of a `state_dict` overlay in the model's pretrained_cfg (the features
    wrapper's, and the wrapped model's where it is kept): a second and third copy of the weights."""
    for module in model.modules():
        for attr in ("pretrained_cfg", "default_cfg"):
            cfg = getattr(module, attr, None)
            if isinstance(cfg, dict):
                cfg.pop("state_dict", None)


def _weights_host(cfg) -> Optional[str]:
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import constants

            return urlparse(constants.ENDPOINT).hostname
        except ImportError:
            pass
    if cfg.url:
        return urlparse(cfg.url).hostname
    return None


def _hub_offline() -> bool:
    """The Hugging Face hub client's offline mode (HF_HUB_OFFLINE, as the client parses it)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _host_reachable(host: str) -> bool:
    """True if a TCP connection to host:443 opens within a few seconds."""
    try:
        with socket.create_connection((host, 443), timeout=_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


class FrozenEncoder(nn.Module):
    """A frozen copy of an encoder: no gradients, always in eval mode, forward under no_grad.

    DAFormer's feature-distance loss compares the student's bottleneck features with those of the
    ImageNet-initialised encoder; this is that encoder. `.train()` from a parent leaves it in eval
    mode (BatchNorm statistics and dropout stay fixed).

    Args:
        encoder: the encoder to copy (deep-copied; the original is not touched).
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(encoder).requires_grad_(False).eval()
        self.channels = list(getattr(encoder, "channels", []))
        self.reductions = list(getattr(encoder, "reductions", []))

    def train(self, mode: bool = True) -> "FrozenEncoder":
        return super().train(False)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        with torch.no_grad():
            return self.encoder(x)


def build_imnet_encoder(encoder: nn.Module) -> FrozenEncoder:
    """Frozen ImageNet copy of `encoder` for the feature-distance loss.

    Call it right after building the encoder with its pretrained weights, before any training
    step changes them. Keep it out of the EMA teacher and the optimiser (it has no trainable
    parameters, so `param_groups` skips it anyway).

    Args:
        encoder: the freshly initialised (pretrained) encoder.
    """
    return FrozenEncoder(encoder)

"""build_backbone: MiT and timm encoders, local weights, offline behaviour, errors; the frozen copy."""
import math
import re
import time

import pytest
import timm
import torch
from huggingface_hub import constants as hub_constants
from safetensors.torch import save_file
from torch import nn

from cluda.models import backbones
from cluda.models.backbones import FrozenEncoder, build_backbone, build_imnet_encoder
from cluda.models.mit import MixVisionTransformer

SWIN = "swin_tiny_patch4_window7_224"


def test_mit_by_name_with_drop_path():
    enc = build_backbone("mit_b0", drop_path_rate=0.2)
    assert isinstance(enc, MixVisionTransformer)
    assert enc.channels == [32, 64, 160, 256]
    assert enc.block4[-1].drop_path.drop_prob == pytest.approx(0.2)
    assert build_backbone("mit_b0").block4[-1].drop_path.drop_prob == pytest.approx(0.1)


def test_timm_channels_and_strides_come_from_feature_info():
    torch.manual_seed(0)
    enc = build_backbone("resnet10t")
    reference = timm.create_model("resnet10t", features_only=True)
    assert enc.channels == reference.feature_info.channels()[-4:]
    assert enc.reductions == [4, 8, 16, 32]
    h, w = 97, 131
    outs = enc(torch.randn(2, 3, h, w))
    assert [o.shape[1] for o in outs] == enc.channels
    assert [tuple(o.shape[-2:]) for o in outs] == [(math.ceil(h / r), math.ceil(w / r)) for r in enc.reductions]
    # explicit levels: strides 2 ... 8
    enc = build_backbone("resnet10t", out_indices=(0, 1, 2))
    assert enc.reductions == [2, 4, 8] and len(enc(torch.randn(1, 3, 64, 64))) == 3


def test_swin_nhwc_features_become_nchw_at_any_size():
    torch.manual_seed(1)
    enc = build_backbone(SWIN, img_size=96).eval()
    assert enc.nhwc and enc.channels == [96, 192, 384, 768]
    x = torch.randn(1, 3, 97, 131)  # neither a multiple of the patch (4) nor of the window
    outs = enc(x)
    assert [tuple(o.shape) for o in outs] == [
        (1, c, math.ceil(97 / r), math.ceil(131 / r)) for c, r in zip(enc.channels, enc.reductions)
    ]
    # the conversion is a permutation of timm's NHWC output on the zero-padded image
    padded = torch.nn.functional.pad(x, (0, 1, 0, 3))
    raw = enc.model(padded)
    torch.testing.assert_close(outs[2], raw[2].permute(0, 3, 1, 2))


@pytest.mark.parametrize("layout", ["wrapped_module_pth", "backbone_safetensors"])
def test_timm_local_checkpoint_loads_with_wrapper_and_prefix(tmp_path, layout):
    torch.manual_seed(2)
    source = timm.create_model("resnet10t")
    state = source.state_dict()
    if layout == "wrapped_module_pth":  # DataParallel training checkpoint
        path = tmp_path / "resnet10t.pth"
        torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    else:  # a segmentation checkpoint: the encoder under backbone., next to its head
        path = tmp_path / "segmentor.safetensors"
        flat = {"backbone." + k: v.contiguous() for k, v in state.items()}
        flat["decode_head.conv_seg.weight"] = torch.randn(19, 8, 1, 1)
        save_file(flat, str(path))
    enc = build_backbone("resnet10t", pretrained=path).eval()
    torch.testing.assert_close(enc.model.layer3[0].conv2.weight, source.layer3[0].conv2.weight)
    torch.testing.assert_close(enc.model.layer1[0].bn1.running_var, source.layer1[0].bn1.running_var)
    x = torch.randn(1, 3, 64, 80)
    source.eval()
    torch.testing.assert_close(enc(x)[-1], source.forward_features(x))
    # The source is recorded, the handed-over weights are not kept a second time in the config,
    # and no load hook is left on the model.
    assert enc.model.pretrained_cfg["file"] == str(path)
    assert all("state_dict" not in (getattr(m, "pretrained_cfg", None) or {}) for m in enc.modules())
    assert not any(m._load_state_dict_post_hooks for m in enc.modules())


def test_swin_checkpoint_loads_at_another_crop_size(tmp_path):
    torch.manual_seed(3)
    source = timm.create_model(SWIN)  # built for 224, window 7
    # Saved as Microsoft's Swin release files are: under "model", each stage's patch merging at the
    # end of the stage before, the classifier as head.*. timm's checkpoint filter converts the layout
    # (head.* -> head.fc.*, which the features model then drops).
    original = {}
    for k, v in source.state_dict().items():
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        original[k.replace("head.fc.", "head.")] = v
    assert "head.weight" in original and "layers.0.downsample.reduction.weight" in original
    path = tmp_path / "swin.pth"
    torch.save({"model": original}, path)
    enc = build_backbone(SWIN, img_size=96, pretrained=path)  # last stage is 3x3: window shrinks to 3
    torch.testing.assert_close(enc.model.layers_2.blocks[1].mlp.fc2.weight, source.layers[2].blocks[1].mlp.fc2.weight)
    torch.testing.assert_close(enc.model.layers_2.downsample.reduction.weight, source.layers[2].downsample.reduction.weight)
    assert enc.model.layers_3.blocks[0].attn.relative_position_bias_table.shape[0] == 5 * 5


@pytest.mark.parametrize("damage", ["missing", "shape", "unexpected"])
def test_mismatched_timm_checkpoint_names_file_and_key(tmp_path, damage):
    state = timm.create_model("resnet10t").state_dict()
    if damage == "missing":
        del state["layer2.0.conv1.weight"]
    elif damage == "shape":
        state["layer2.0.conv1.weight"] = torch.randn(3, 3, 3, 3)
    else:
        state["extra.weight"] = torch.randn(4)
    path = tmp_path / f"{damage}.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        build_backbone("resnet10t", pretrained=path)
    message = str(err.value)
    assert f"{damage}.pth" in message
    assert ("extra.weight" if damage == "unexpected" else "layer2.0.conv1.weight") in message


def test_missing_weight_file():
    for name in ("mit_b0", "resnet10t"):
        with pytest.raises(FileNotFoundError, match="no_such_weights.pth"):
            build_backbone(name, pretrained="/nonexistent/no_such_weights.pth")


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(ValueError, match="unknown backbone") as err:
        build_backbone("resnet_10t")
    assert "resnet10t" in str(err.value)
    with pytest.raises(ValueError, match="mit_b5"):
        build_backbone("mit_b6")


def test_offline_download_fails_fast_with_a_local_path_hint(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    probed = []

    def unreachable(host):
        probed.append(host)
        return False

    monkeypatch.setattr(backbones, "_host_reachable", unreachable)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="local weights file"):
        build_backbone("resnet10t", pretrained=True)
    assert probed == ["huggingface.co"]
    assert time.monotonic() - start < 10


def test_hub_offline_mode_uses_the_cache_and_fails_at_once_on_a_miss(monkeypatch, tmp_path):
    # HF_HUB_OFFLINE=1 as the hub client reads it (at import): no probe, timm asks the local cache,
    # which here is empty.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def no_probe(host):
        raise AssertionError(f"probed {host} in offline mode")

    monkeypatch.setattr(backbones, "_host_reachable", no_probe)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="could not fetch pretrained weights for 'resnet10t'") as err:
        build_backbone("resnet10t", pretrained=True)
    assert "pretrained='/path/to/weights.pth'" in str(err.value)
    assert time.monotonic() - start < 10


def test_failed_download_is_reported_with_a_local_path_hint(monkeypatch):
    # the host answers but the download itself fails (proxy, missing file, ...)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(backbones, "_host_reachable", lambda host: True)

    def refuse(*args, **kwargs):
        raise OSError("simulated: connection refused")

    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", refuse)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_url", refuse)
    with pytest.raises(RuntimeError, match="simulated: connection refused") as err:
        build_backbone("resnet10t", pretrained=True)
    assert "pretrained='/path/to/weights.pth'" in str(err.value)


def test_mit_has_no_download():
    with pytest.raises(RuntimeError, match="mit_b2.pth"):
        build_backbone("mit_b2", pretrained=True)


def test_bad_arguments_are_type_errors():
    with pytest.raises(TypeError):
        build_backbone("mit_b0", pretrained=3)
    with pytest.raises(TypeError):
        build_backbone(None)


def test_frozen_imnet_copy_stays_frozen_and_in_eval():
    torch.manual_seed(4)
    encoder = build_backbone("mit_b0")
    frozen = build_imnet_encoder(encoder)
    assert isinstance(frozen, FrozenEncoder) and frozen.channels == encoder.channels
    assert all(not p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in encoder.parameters())

    parent = nn.ModuleDict(dict(student=encoder, imnet=frozen))
    parent.train()
    assert encoder.training and not frozen.training
    assert not any(m.training for m in frozen.modules())

    x = torch.randn(2, 3, 64, 64)
    before = [f.clone() for f in frozen(x)]
    assert not before[-1].requires_grad
    # training the student leaves the copy untouched
    opt = torch.optim.SGD(encoder.parameters(), lr=0.5)
    encoder(x)[-1].square().mean().backward()
    opt.step()
    for a, b in zip(frozen(x), before):
        torch.testing.assert_close(a, b)
    encoder.eval()
    assert not torch.allclose(encoder(x)[-1], before[-1])

"""MiT encoder: shapes, attention maths, stochastic depth, size, SegFormer checkpoint loading."""
import math

import pytest
import torch
import torch.nn.functional as F

from cluda.models.mit import MIT_CONFIGS, EfficientSelfAttention, load_mit_weights, mit

# Names as they appear in SegFormer's released ImageNet checkpoints (mit_b*.pth).
OFFICIAL_KEYS = [
    "patch_embed1.proj.weight",
    "patch_embed1.proj.bias",
    "patch_embed1.norm.weight",
    "patch_embed4.proj.weight",
    "block1.0.norm1.weight",
    "block1.0.attn.q.weight",
    "block1.0.attn.q.bias",
    "block1.0.attn.kv.weight",
    "block1.0.attn.proj.weight",
    "block1.0.attn.sr.weight",
    "block1.0.attn.sr.bias",
    "block1.0.attn.norm.weight",
    "block1.0.norm2.weight",
    "block1.0.mlp.fc1.weight",
    "block1.0.mlp.dwconv.dwconv.weight",
    "block1.0.mlp.dwconv.dwconv.bias",
    "block1.0.mlp.fc2.weight",
    "block3.1.attn.sr.weight",
    "block4.1.attn.kv.weight",
    "norm1.weight",
    "norm4.bias",
]


def test_stage_shapes_at_odd_size():
    torch.manual_seed(0)
    model = mit("mit_b0").eval()
    h, w = 97, 131
    outs = model(torch.randn(2, 3, h, w))
    expected_hw = []
    size = (math.ceil(h / 4), math.ceil(w / 4))
    for _ in range(4):
        expected_hw.append(size)
        size = (math.ceil(size[0] / 2), math.ceil(size[1] / 2))
    assert [tuple(o.shape) for o in outs] == [(2, c) + s for c, s in zip((32, 64, 160, 256), expected_hw)]
    assert model.channels == [32, 64, 160, 256] and model.reductions == [4, 8, 16, 32]
    assert all(torch.isfinite(o).all() for o in outs)


def test_forward_backward_reaches_every_parameter():
    torch.manual_seed(1)
    model = mit("mit_b0", drop_path_rate=0.0)
    x = torch.randn(1, 3, 45, 61, requires_grad=True)
    outs = model(x)
    sum((o * torch.randn_like(o)).sum() for o in outs).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []


def test_efficient_attention_matches_explicit_softmax():
    torch.manual_seed(2)
    dim, heads, sr, h, w = 40, 5, 4, 9, 11
    attn = EfficientSelfAttention(dim=dim, num_heads=heads, sr_ratio=sr)
    x = torch.randn(3, h * w, dim)
    d = dim // heads
    q = attn.q(x).reshape(3, -1, heads, d).transpose(1, 2)
    reduced = attn.sr(x.transpose(1, 2).reshape(3, dim, h, w)).flatten(2).transpose(1, 2)
    kv = attn.kv(attn.norm(reduced)).reshape(3, -1, 2, heads, d)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    assert k.shape[2] == (h // sr) * (w // sr)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    expected = attn.proj((probs @ v).transpose(1, 2).reshape(3, h * w, dim))
    torch.testing.assert_close(attn(x, h, w), expected, rtol=1e-5, atol=1e-5)


def test_stochastic_depth_rises_linearly_over_all_blocks():
    model = mit("mit_b0", drop_path_rate=0.3)
    rates = [
        getattr(block.drop_path, "drop_prob", 0.0) for k in range(1, 5) for block in getattr(model, f"block{k}")
    ]
    assert len(rates) == 8
    assert rates[0] == 0.0
    assert rates[-1] == pytest.approx(0.3)
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.3, 8))
    # drop path is active in training only: eval is deterministic, training is not
    x = torch.randn(4, 3, 33, 35)
    model.eval()
    torch.testing.assert_close(model(x)[-1], model(x)[-1])
    model.train()
    torch.manual_seed(0)
    a = model(x)[-1]
    torch.manual_seed(1)
    b = model(x)[-1]
    assert not torch.allclose(a, b)


def test_mit_b5_has_segformer_size_and_official_key_names():
    with torch.device("meta"):  # 81 M parameters, no memory
        model = mit("mit_b5")
    count = sum(p.numel() for p in model.parameters())
    assert 81_000_000 < count < 82_000_000
    keys = set(model.state_dict())
    assert set(OFFICIAL_KEYS) <= keys
    assert sum(k.endswith("attn.q.weight") for k in keys) == sum(MIT_CONFIGS["mit_b5"]["depths"]) == 52
    assert "block4.0.attn.sr.weight" not in keys  # stage 4 has ratio 1: plain attention


def test_all_variants_have_the_table_channels():
    for name, cfg in MIT_CONFIGS.items():
        with torch.device("meta"):
            model = mit(name)
        assert model.channels == list(cfg["embed_dims"])
        assert model.depths == cfg["depths"]


def test_too_small_image_and_bad_input_are_clear_errors():
    model = mit("mit_b0")
    with pytest.raises(ValueError, match="too small"):
        model(torch.randn(1, 3, 20, 64))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="unknown MiT variant"):
        mit("mit_b7")


def _official_layout(model, *, head=True):
    """A state dict laid out like SegFormer's ImageNet file: encoder keys plus the classifier."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if head:
        state["head.weight"] = torch.randn(1000, model.channels[-1])
        state["head.bias"] = torch.randn(1000)
    return state


def test_load_official_layout_wrapped_and_prefixed(tmp_path):
    torch.manual_seed(3)
    source = mit("mit_b0").eval()
    state = {"module." + k: v for k, v in _official_layout(source).items()}
    path = tmp_path / "mit_b0.pth"
    torch.save({"state_dict": state, "meta": {"epoch": 3}}, path)

    torch.manual_seed(4)
    target = mit("mit_b0").eval()
    x = torch.randn(1, 3, 64, 72)
    assert not torch.allclose(target(x)[-1], source(x)[-1])
    report = load_mit_weights(target, path)
    assert report["ignored"] == ["head.bias", "head.weight"]
    for a, b in zip(target(x), source(x)):
        torch.testing.assert_close(a, b)


def test_load_raw_dict_and_segmentation_checkpoint_backbone_prefix(tmp_path):
    torch.manual_seed(5)
    source = mit("mit_b0")
    raw = tmp_path / "raw.pth"
    torch.save(_official_layout(source), raw)
    seg = tmp_path / "seg.pth"
    state = {"backbone." + k: v for k, v in _official_layout(source, head=False).items()}
    state["decode_head.conv_seg.weight"] = torch.randn(19, 256, 1, 1)
    torch.save({"model": state}, seg)
    for path in (raw, seg):
        target = mit("mit_b0")
        load_mit_weights(target, path)
        torch.testing.assert_close(target.block2[1].mlp.fc1.weight, source.block2[1].mlp.fc1.weight)


def test_checkpoint_with_missing_key_names_key_and_file(tmp_path):
    state = _official_layout(mit("mit_b0"))
    del state["block3.1.attn.kv.weight"]
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="missing") as err:
        load_mit_weights(mit("mit_b0"), path)
    assert "block3.1.attn.kv.weight" in str(err.value) and "broken.pth" in str(err.value)


def test_checkpoint_of_another_variant_is_rejected(tmp_path):
    # B1's weights have B0's keys but larger shapes
    with torch.device("meta"):
        b1_keys = mit("mit_b1").state_dict()
    state = {k: torch.randn(v.shape) for k, v in b1_keys.items()}
    path = tmp_path / "mit_b1.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="shape mismatch") as err:
        load_mit_weights(mit("mit_b0"), path)
    assert "block1.0.attn.q.weight: checkpoint (64, 64) vs model (32, 32)" in str(err.value)

    # a deeper variant of the same width: extra blocks are unexpected keys, not silently dropped
    state = _official_layout(mit("mit_b0"))
    state["block1.2.norm1.weight"] = torch.randn(32)
    torch.save(state, path)
    with pytest.raises(ValueError, match="unexpected") as err:
        load_mit_weights(mit("mit_b0"), path)
    assert "block1.2.norm1.weight" in str(err.value)


def test_missing_or_unreadable_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_mit_weights(mit("mit_b0"), tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_mit_weights(mit("mit_b0"), junk)
    empty = tmp_path / "empty.pth"
    torch.save({"epoch": 1}, empty)
    with pytest.raises(ValueError, match="no tensors"):
        load_mit_weights(mit("mit_b0"), empty)


def test_gelu_and_layer_norm_eps_follow_segformer():
    model = mit("mit_b0")
    block = model.block1[0]
    assert block.norm1.eps == 1e-6 and model.norm1.eps == 1e-6
    assert model.patch_embed1.norm.eps == 1e-5 and block.attn.norm.eps == 1e-5
    assert model.patch_embed1.proj.kernel_size == (7, 7) and model.patch_embed1.proj.stride == (4, 4)
    assert model.patch_embed2.proj.kernel_size == (3, 3) and model.patch_embed2.proj.stride == (2, 2)
    assert [getattr(model, f"block{k}")[0].attn.sr_ratio for k in range(1, 5)] == [8, 4, 2, 1]
    x = torch.randn(2, 7, 4 * 32)
    torch.testing.assert_close(block.mlp.act(x), F.gelu(x))

"""DAFormer decoder, Segmentor, sliding-window inference and AdamW parameter groups."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cluda.models import build_imnet_encoder
from cluda.models.decoder import DAFormerHead
from cluda.models.segmentor import Segmentor, build_segmentor, sliding_window, window_starts

SMALL = dict(channels=48, embed_dim=24, aspp_channels=16)


def _features(channels, size=(13, 17), batch=2):
    h, w = size
    return [torch.randn(batch, c, math.ceil(h / 2**k), math.ceil(w / 2**k)) for k, c in enumerate(channels)]


def test_decoder_shapes_and_structure():
    torch.manual_seed(0)
    head = DAFormerHead(in_channels=[8, 16, 24, 32], out_channels=7, channels=40, embed_dim=12, aspp_channels=10)
    logits, fused = head(_features([8, 16, 24, 32]))
    assert logits.shape == (2, 7, 13, 17) and fused.shape == (2, 40, 13, 17)
    # 1x1 linear embeddings, no norm / activation
    assert all(isinstance(e, nn.Conv2d) and e.kernel_size == (1, 1) and e.out_channels == 12 for e in head.embed)
    branches = head.fuse.branches
    assert branches[0][0].kernel_size == (1, 1)
    for branch, d in zip(branches[1:], (6, 12, 18)):
        depthwise, pointwise = branch[0][0], branch[1][0]
        assert depthwise.groups == depthwise.in_channels == 48 and depthwise.dilation == (d, d)
        assert pointwise.kernel_size == (1, 1) and pointwise.out_channels == 10
        assert isinstance(branch[0][1], nn.BatchNorm2d) and isinstance(branch[1][2], nn.ReLU)
    bottleneck = head.fuse.bottleneck[0]
    assert bottleneck.in_channels == 40 and bottleneck.kernel_size == (3, 3) and bottleneck.out_channels == 40
    assert (fused >= 0).all()  # ends in ReLU


def test_fused_features_are_taken_before_dropout():
    torch.manual_seed(1)
    head = DAFormerHead(in_channels=[8, 16], out_channels=5, channels=32, embed_dim=8, dropout=0.5)
    feats = _features([8, 16])
    head.eval()
    logits, fused = head(feats)
    torch.testing.assert_close(logits, head.classifier(fused))
    head.train()
    torch.manual_seed(7)
    logits, fused = head(feats)
    assert (fused.abs().sum(dim=(2, 3)) > 0).all()  # dropout did not zero channels of the returned map
    assert not torch.allclose(logits, head.classifier(fused))
    # the logits saw a dropped-out copy: replay the same dropout draw on the returned map
    torch.manual_seed(7)
    torch.testing.assert_close(logits, head.classifier(F.dropout2d(fused, 0.5, training=True)))


def test_decoder_conv_fusion_single_channel_head():
    head = DAFormerHead(in_channels=[8, 16, 24, 32], out_channels=1, channels=16, embed_dim=16, fusion="conv")
    logits, fused = head(_features([8, 16, 24, 32]))
    assert logits.shape == (2, 1, 13, 17) and fused.shape == (2, 16, 13, 17)
    assert head.fuse[0].kernel_size == (1, 1)


def test_decoder_rejects_bad_input():
    head = DAFormerHead(in_channels=[8, 16], out_channels=3, channels=16, embed_dim=8)
    with pytest.raises(ValueError, match="2 feature levels"):
        head(_features([8]))
    with pytest.raises(ValueError, match="level 1"):
        head(_features([8, 15]))
    with pytest.raises(ValueError, match="fusion"):
        DAFormerHead(in_channels=[8], out_channels=3, fusion="mlp")


def test_segmentor_forward_backward_at_odd_size():
    torch.manual_seed(2)
    seg = build_segmentor("mit_b0", num_classes=6, **SMALL)
    img = torch.randn(2, 3, 75, 99, requires_grad=True)
    logits, fused = seg(img)
    assert logits.shape == (2, 6, 19, 25) and fused.shape == (2, 48, 19, 25)
    (logits * torch.randn_like(logits)).sum().backward()
    assert img.grad.abs().sum() > 0
    assert seg.encoder.patch_embed1.proj.weight.grad.abs().sum() > 0
    assert seg.decoder.classifier.weight.grad.abs().sum() > 0


def test_segmentor_on_a_timm_backbone():
    torch.manual_seed(3)
    seg = build_segmentor("resnet10t", num_classes=4, **SMALL)
    assert seg.decoder.in_channels == seg.encoder.channels and seg.output_stride == 4
    logits, fused = seg(torch.randn(1, 3, 66, 90))
    assert logits.shape == (1, 4, 17, 23) and fused.shape[1] == 48


def test_mismatched_decoder_is_rejected():
    encoder = build_segmentor("mit_b0", num_classes=3, **SMALL).encoder
    with pytest.raises(ValueError, match="channels"):
        Segmentor(encoder, DAFormerHead(in_channels=[64, 128, 320, 512], out_channels=3))


def test_window_starts_cover_the_image():
    for size, crop, stride in [(100, 40, 30), (64, 64, 32), (30, 64, 16), (97, 32, 32), (65, 32, 32)]:
        starts = window_starts(size, crop, stride)
        c = min(crop, size)
        assert starts[0] == 0 and starts[-1] == size - c
        assert all(0 < b - a <= stride for a, b in zip(starts, starts[1:]))


def test_sliding_window_averages_overlaps():
    torch.manual_seed(4)
    img = torch.randn(2, 3, 23, 30)

    def predict(crops):  # depends on the whole window, so overlapping windows disagree
        return crops[:, :2] * crops.mean(dim=(1, 2, 3), keepdim=True)

    out = sliding_window(img, predict, crop_size=(12, 16), stride=(7, 9), out_channels=2)
    total = torch.zeros(2, 2, 23, 30)
    count = torch.zeros(23, 30)
    for y in window_starts(23, 12, 7):
        for x in window_starts(30, 16, 9):
            total[..., y:y + 12, x:x + 16] += predict(img[..., y:y + 12, x:x + 16])
            count[y:y + 12, x:x + 16] += 1
    torch.testing.assert_close(out, total / count)
    batched = sliding_window(img, predict, crop_size=(12, 16), stride=(7, 9), out_channels=2, window_batch=4)
    torch.testing.assert_close(batched, out)


def test_slide_equals_whole_when_the_window_covers_the_image():
    torch.manual_seed(5)
    seg = build_segmentor("mit_b0", num_classes=5, **SMALL).eval()
    img = torch.randn(2, 3, 61, 77)
    whole = seg.inference(img)
    assert whole.shape == (2, 5, 61, 77)
    torch.testing.assert_close(seg.inference(img, mode="slide", crop_size=(64, 80), stride=32), whole)
    torch.testing.assert_close(
        seg.inference(img, mode="slide", crop_size=61 * 2, stride=8, out_size=(30, 40)),
        seg.inference(img, out_size=(30, 40)),
    )
    # overlapping windows really slide: each window sees less context, so the result changes
    slid = seg.inference(img, mode="slide", crop_size=48, stride=16, window_batch=3)
    assert slid.shape == whole.shape and not torch.allclose(slid, whole, atol=1e-3)
    with pytest.raises(ValueError, match="crop_size"):
        seg.inference(img, mode="slide")
    with pytest.raises(ValueError, match="mode"):
        seg.inference(img, mode="tiles")


def test_param_groups_lr_decay_and_coverage():
    torch.manual_seed(6)
    seg = build_segmentor("mit_b0", num_classes=5, **SMALL)
    seg.imnet = build_imnet_encoder(seg.encoder)  # frozen: must not be optimised
    groups = seg.param_groups(6e-5)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"encoder", "encoder_no_decay", "head", "head_no_decay"}
    assert by_name["encoder"]["lr"] == pytest.approx(6e-5) and by_name["head"]["lr"] == pytest.approx(6e-4)
    assert by_name["head"]["lr_mult"] == 10.0

    seen = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in seg.parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable) and len(seen) == len(set(seen))

    groups_of = {id(p): g for g in groups for p in g["params"]}
    encoder_ids = {id(p) for p in seg.encoder.parameters()}
    for module in seg.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad:
                continue
            g = groups_of[id(p)]
            assert g["name"].startswith("encoder" if id(p) in encoder_ids else "head")
            if isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
                assert g["weight_decay"] == 0.0
            else:
                assert g["weight_decay"] == 0.01  # biases decay by default, as DAFormer
    no_bias_decay = seg.param_groups(1e-4, bias_decay=False, weight_decay=0.05)
    for g in no_bias_decay:
        names = {id(p) for p in g["params"]}
        biases = {id(p) for n, p in seg.named_parameters() if n.endswith("bias")}
        if g["weight_decay"] > 0:
            assert not names & biases
    torch.optim.AdamW(groups)  # the groups are valid optimiser input

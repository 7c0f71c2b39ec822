"""HRDA wrapper: crop rule, fusion, attention, CLUDA's feature weight, inference, parameter groups."""
import math

import pytest
import torch
import torch.nn.functional as F

from cluda.models.hrda import HRDA, box_to_grid, crop, random_crop_box
from cluda.models.segmentor import build_segmentor, resize_bilinear

K = 5


@pytest.fixture(scope="module")
def hrda():
    torch.manual_seed(0)
    seg = build_segmentor("mit_b0", num_classes=K, channels=48, embed_dim=24, aspp_channels=16)
    return HRDA(seg, hr_crop_size=(32, 48), hr_slide_size=64, hr_slide_stride=32, head_channels=16)


def test_random_crop_box_rule():
    g = torch.Generator().manual_seed(1)
    boxes = [random_crop_box(96, 128, (32, 48), divisible=8, generator=g) for _ in range(400)]
    for y1, y2, x1, x2 in boxes:
        assert y1 % 8 == 0 and x1 % 8 == 0
        assert y2 - y1 == 32 and x2 - x1 == 48
        assert 0 <= y1 and y2 <= 96 and 0 <= x1 and x2 <= 128
    # every aligned position is reachable, the last one included
    assert {b[0] for b in boxes} == set(range(0, 96 - 32 + 1, 8))
    assert {b[2] for b in boxes} == set(range(0, 128 - 48 + 1, 8))
    # seeded draws are reproducible
    again = torch.Generator().manual_seed(1)
    assert [random_crop_box(96, 128, (32, 48), divisible=8, generator=again) for _ in range(400)] == boxes
    assert random_crop_box(64, 64, 64) == (0, 64, 0, 64)
    with pytest.raises(ValueError, match="does not fit"):
        random_crop_box(32, 64, (40, 40))


def test_box_helpers():
    x = torch.randn(2, 3, 16, 20)
    torch.testing.assert_close(crop(x, (4, 12, 8, 20)), x[:, :, 4:12, 8:20])
    assert box_to_grid((8, 40, 16, 64), 8) == (1, 5, 2, 8)
    with pytest.raises(ValueError, match="stride 8"):
        box_to_grid((4, 36, 16, 64), 8)


def test_training_forward_shapes_and_grids(hrda):
    hrda.train()
    img = torch.randn(2, 3, 64, 96)
    out = hrda(img, generator=torch.Generator().manual_seed(2))
    y1, y2, x1, x2 = out.box
    assert (y2 - y1, x2 - x1) == (32, 48) and all(c % 8 == 0 for c in out.box)
    assert out.logits.shape == (2, K, 16, 24)  # HR-frame grid, stride 4
    assert out.attention.shape == (2, K, 16, 24)
    assert out.lr_logits.shape == (2, K, 8, 12)  # LR grid, stride 8
    assert out.lr_fused.shape == (2, 48, 8, 12)
    assert out.hr_logits.shape == (2, K, 8, 12)  # detail crop 32 x 48 at stride 4
    assert out.hr_fused.shape == (2, 48, 8, 12)
    assert out.delta.shape == (2, 1, 8, 12)
    assert out.lr_stride == 8
    assert out.lr_box == (y1 // 8, y2 // 8, x1 // 8, x2 // 8)
    assert out.hr_grid_box == (y1 // 4, y2 // 4, x1 // 4, x2 // 4)
    assert [f.shape[1] for f in out.lr_features] == hrda.segmentor.encoder.channels


def test_fusion_rule_inside_and_outside_the_box(hrda):
    hrda.eval()  # no dropout: recompute every piece by hand
    torch.manual_seed(3)
    img = torch.randn(1, 3, 64, 96)
    box = (16, 48, 40, 88)
    out = hrda(img, box=box)
    seg = hrda.segmentor

    lr_img = F.interpolate(img, scale_factor=0.5, mode="bilinear", align_corners=False)
    lr_logits, _, lr_feats = seg.forward_with_features(lr_img)
    hr_logits, _ = seg(img[:, :, 16:48, 40:88])
    torch.testing.assert_close(out.lr_logits, lr_logits)
    torch.testing.assert_close(out.hr_logits, hr_logits)

    att = F.interpolate(torch.sigmoid(hrda.attention_head(lr_feats)[0]), size=(16, 24), mode="bilinear")
    lr_up = F.interpolate(lr_logits, size=(16, 24), mode="bilinear")
    inside = torch.zeros(16, 24, dtype=torch.bool)
    inside[4:12, 10:22] = True
    # outside the box: attention 0 and the fused logits are the upsampled LR logits
    assert (out.attention[..., ~inside] == 0).all()
    torch.testing.assert_close(out.logits[..., ~inside], lr_up[..., ~inside])
    # inside: a * hr + (1 - a) * lr_up with a the upsampled attention
    a = att[..., 4:12, 10:22]
    torch.testing.assert_close(out.attention[..., 4:12, 10:22], a)
    torch.testing.assert_close(out.logits[..., 4:12, 10:22], a * hr_logits + (1 - a) * lr_up[..., 4:12, 10:22])
    assert (a > 0).all() and (a < 1).all()


def test_feature_weight_delta_range_and_alignment(hrda):
    hrda.train()
    out = hrda(3 * torch.randn(2, 3, 64, 64), box=(0, 32, 8, 56))
    assert ((out.delta > 0) & (out.delta < 1)).all()
    # delta lives on the LR grid; the detail box on that grid is box / 8
    assert out.delta.shape == (2, 1) + out.lr_fused.shape[2:] == (2, 1, 8, 8)
    assert out.lr_box == (0, 4, 1, 7)
    no_head = HRDA(hrda.segmentor, hr_crop_size=32, feature_weight_head=False, head_channels=8)
    out = no_head(torch.randn(1, 3, 64, 64))
    assert out.delta is None


def test_hrda_losses_backpropagate_to_every_head(hrda):
    hrda.train()
    hrda.zero_grad()
    img = torch.randn(2, 3, 64, 96)
    label = torch.randint(0, K, (2, 64, 96))
    out = hrda(img, generator=torch.Generator().manual_seed(4))
    fused_label = label[:, ::4, ::4]
    hr_label = crop(label, out.box)[:, ::4, ::4]
    loss = (1 - hrda.hr_loss_weight) * F.cross_entropy(out.logits, fused_label)
    loss = loss + hrda.hr_loss_weight * F.cross_entropy(out.hr_logits, hr_label)
    loss = loss + (out.delta * out.lr_fused.mean(1, keepdim=True)).mean()  # a stand-in for Eq. 7's use of delta
    loss.backward()
    for module in (hrda.segmentor.encoder, hrda.segmentor.decoder, hrda.attention_head, hrda.feature_weight_head):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0


def test_bad_crops_and_boxes_are_rejected(hrda):
    with pytest.raises(ValueError, match="divisible by 8"):
        hrda(torch.randn(1, 3, 60, 64))
    with pytest.raises(ValueError, match="crop_divisible"):
        hrda(torch.randn(1, 3, 64, 64), box=(4, 36, 0, 48))
    with pytest.raises(ValueError, match="inside"):
        hrda(torch.randn(1, 3, 64, 64), box=(40, 72, 0, 48))
    with pytest.raises(ValueError, match="does not fit"):
        hrda(torch.randn(1, 3, 32, 40))
    with pytest.raises(ValueError, match="hr_crop_size"):
        HRDA(hrda.segmentor, hr_crop_size=36)
    with pytest.raises(ValueError, match="crop_divisible"):
        HRDA(hrda.segmentor, crop_divisible=4)


def test_inference_on_arbitrary_sizes(hrda):
    hrda.eval()
    torch.manual_seed(5)
    img = torch.randn(1, 3, 83, 117)
    logits = hrda.inference(img)
    assert logits.shape == (1, K, 83, 117) and torch.isfinite(logits).all()
    grid = hrda.predict_whole(img)
    assert grid.shape == (1, K, math.ceil(83 / 4), math.ceil(117 / 4))
    assert hrda.inference(img, out_size=(40, 50)).shape == (1, K, 40, 50)
    # an outer window that covers the image is the whole-image prediction
    torch.testing.assert_close(hrda.inference(img, mode="slide", crop_size=(96, 128), stride=64), logits)
    slid = hrda.inference(img, mode="slide", crop_size=64, stride=32)
    assert slid.shape == logits.shape and not torch.allclose(slid, logits, atol=1e-3)


def test_whole_prediction_fuses_lr_and_hr_windows(hrda):
    hrda.eval()
    torch.manual_seed(6)
    img = torch.randn(2, 3, 60, 64)  # fits the HR window: one HR pass on the whole image
    seg = hrda.segmentor
    lr_logits, _, lr_feats = seg.forward_with_features(resize_bilinear(img, (30, 32)))
    grid = (15, 16)
    att = resize_bilinear(torch.sigmoid(hrda.attention_head(lr_feats)[0]), grid)
    hr = resize_bilinear(resize_bilinear(seg(img)[0], (60, 64)), grid)
    expected = att * hr + (1 - att) * resize_bilinear(lr_logits, grid)
    with torch.no_grad():
        torch.testing.assert_close(hrda.predict_whole(img), expected)
    # larger image: several HR windows, batched or not, give the same answer
    big = torch.randn(1, 3, 96, 112)
    with torch.no_grad():
        torch.testing.assert_close(hrda.predict_whole(big, window_batch=1), hrda.predict_whole(big))


def test_param_groups_put_all_heads_at_ten_times_the_lr(hrda):
    groups = hrda.param_groups(6e-5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert len(lr_of) == sum(len(g["params"]) for g in groups)
    assert set(lr_of) == {id(p) for p in hrda.parameters()}
    for module in (hrda.attention_head, hrda.feature_weight_head, hrda.segmentor.decoder):
        assert all(lr_of[id(p)] == pytest.approx(6e-4) for p in module.parameters())
    assert all(lr_of[id(p)] == pytest.approx(6e-5) for p in hrda.segmentor.encoder.parameters())

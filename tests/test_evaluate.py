"""Tests for cluda.metrics (confusion matrix, metrics and protocols, tables), atomic writes and
cluda.inference (test-time augmentation and the evaluation loop)."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cluda.data.labels import CLASS_NAMES, PROTOCOLS
from cluda.fileio import atomic_write
from cluda.inference import evaluate, predict_probs
from cluda.metrics import compute_metrics, ConfusionMatrix, format_table, write_metrics

K = 19


def numpy_confusion(pred, target, k):
    """Reference: loop-free numpy count of (target, pred) pairs with 0 <= target < k."""
    pred, target = np.asarray(pred).ravel(), np.asarray(target).ravel()
    keep = (target >= 0) & (target < k)
    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (target[keep], pred[keep]), 1)
    return m


# --------------------------------------------------------------------------------------------
# Confusion matrix
# --------------------------------------------------------------------------------------------

def test_confusion_matrix_matches_numpy_reference():
    g = torch.Generator().manual_seed(0)
    cm = ConfusionMatrix(K)
    expected = np.zeros((K, K), dtype=np.int64)
    for shape in [(2, 13, 17), (1, 7, 31), (3, 5, 9)]:
        pred = torch.randint(0, K, shape, generator=g)
        # Labels in [0, K), plus 255 (ignore) and out-of-range ids that must be skipped.
        target = torch.randint(0, K + 6, shape, generator=g)
        target[torch.rand(shape, generator=g) < 0.2] = 255
        target[0, 0, 0] = -1
        cm.update(pred, target.to(torch.uint8 if target.min() >= 0 else torch.int64))
        expected += numpy_confusion(pred.numpy(), target.numpy(), K)
    assert cm.matrix.dtype == torch.int64 and cm.matrix.shape == (K, K)
    np.testing.assert_array_equal(cm.matrix.numpy(), expected)
    # Rows are ground truth: the row sums count the valid target pixels of each class.
    assert cm.matrix.sum().item() == expected.sum() > 0
    cm.reset()
    assert cm.matrix.sum().item() == 0


def test_confusion_matrix_orientation_and_small_k():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([2, 2, 0, 1]), torch.tensor([0, 0, 0, 255]))
    # ground truth 0 predicted as 2 twice, as 0 once; the ignored pixel is not counted.
    np.testing.assert_array_equal(cm.matrix.numpy(), [[1, 0, 2], [0, 0, 0], [0, 0, 0]])


def test_confusion_matrix_asserts_its_input():
    cm = ConfusionMatrix(5)
    with pytest.raises(AssertionError, match="shapes differ"):
        cm.update(torch.zeros(3, 4, dtype=torch.long), torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(AssertionError, match="integer"):
        cm.update(torch.rand(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(AssertionError, match=r"outside \[0, 5\)"):
        cm.update(torch.tensor([1, 5]), torch.tensor([1, 2]))
    # ... but a bad prediction on an ignored pixel is not counted, so it is no error.
    cm.update(torch.tensor([1, 7]), torch.tensor([1, 255]))
    assert cm.matrix.sum().item() == 1
    with pytest.raises(AssertionError, match="num_classes"):
        ConfusionMatrix(0)


# --------------------------------------------------------------------------------------------
# Metrics on hand-computed examples
# --------------------------------------------------------------------------------------------

def hand_matrix():
    """Ground truth / prediction pairs, one per pixel (255 = ignored):

        (0, 0) (0, 1) (1, 1) (1, 1) (1, 3) (2, 2) (2, 2) (9, 0) (255, 5) (40, 4)

    road (0):     TP 1, GT 2 ((0,0), (0,1)), predicted 2 ((0,0), (9,0));
                  IoU = 1 / (2 + 2 - 1) = 1/3, Acc = 1/2
    sidewalk (1): TP 2, GT 3, predicted 3 ((0,1), (1,1), (1,1)); IoU = 2 / 4, Acc = 2/3
    building (2): TP 2, GT 2, predicted 2; IoU 1, Acc 1
    wall (3):     TP 0, GT 0, predicted 1; IoU 0 (counts), Acc n/a
    terrain (9):  TP 0, GT 1, predicted 0; IoU 0, Acc 0
    every other class: in neither -> n/a (the pixel with label 255 and the one with label 40 are
    skipped, so fence (4) and pole (5) stay absent).
    """
    pairs = [(0, 0), (0, 1), (1, 1), (1, 1), (1, 3), (2, 2), (2, 2), (9, 0), (255, 5), (40, 4)]
    target = torch.tensor([t for t, _ in pairs])
    pred = torch.tensor([p for _, p in pairs])
    cm = ConfusionMatrix(K)
    cm.update(pred.reshape(2, 5), target.reshape(2, 5))
    return cm.matrix


def test_metrics_hand_example_19_classes():
    m = compute_metrics(hand_matrix(), protocol=19)
    assert m["protocol"] == 19 and m["class_names"] == CLASS_NAMES
    iou, acc = m["iou"], m["acc"]
    assert iou["road"] == pytest.approx(1 / 3) and acc["road"] == pytest.approx(1 / 2)
    assert iou["sidewalk"] == pytest.approx(1 / 2) and acc["sidewalk"] == pytest.approx(2 / 3)
    assert iou["building"] == 1.0 and acc["building"] == 1.0
    assert iou["wall"] == 0.0 and math.isnan(acc["wall"])
    assert iou["terrain"] == 0.0 and acc["terrain"] == 0.0
    absent = [n for n in CLASS_NAMES if n not in ("road", "sidewalk", "building", "wall",
                                                    "terrain")]
    assert all(math.isnan(iou[n]) and math.isnan(acc[n]) for n in absent)
    # Absent classes are left out of the mean, not averaged in as 0.
    assert m["mIoU"] == pytest.approx((1 / 3 + 1 / 2 + 1 + 0 + 0) / 5)
    assert m["mAcc"] == pytest.approx((1 / 2 + 2 / 3 + 1 + 0) / 4)
    assert m["aAcc"] == pytest.approx(5 / 8)  # 5 correct of the 8 counted pixels
    assert m["num_pixels"] == 8


def test_metrics_hand_example_16_and_13_classes():
    m16 = compute_metrics(hand_matrix(), protocol=16)
    m13 = compute_metrics(hand_matrix(), protocol=13)
    assert m16["class_ids"] == PROTOCOLS[16] and len(m16["iou"]) == 16
    assert m13["class_ids"] == PROTOCOLS[13] and len(m13["iou"]) == 13
    assert "terrain" not in m16["iou"] and "wall" in m16["iou"]
    assert "wall" not in m13["iou"] and "fence" not in m13["iou"] and "pole" not in m13["iou"]
    # Road keeps the IoU of the full matrix (the terrain pixel predicted as road still counts
    # as a false positive), only the average changes.
    assert m16["iou"]["road"] == pytest.approx(1 / 3) and m13["iou"]["road"] == pytest.approx(1 / 3)
    # 16 classes: road, sidewalk, building, wall (terrain is not scored).
    assert m16["mIoU"] == pytest.approx((1 / 3 + 1 / 2 + 1 + 0) / 4)
    # 13 classes: road, sidewalk, building (no wall).
    assert m13["mIoU"] == pytest.approx((1 / 3 + 1 / 2 + 1) / 3)
    assert m16["mAcc"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    # aAcc over ground-truth pixels of the protocol's classes: the terrain pixel drops out.
    assert m16["aAcc"] == pytest.approx(5 / 7) and m16["num_pixels"] == 7
    assert m13["aAcc"] == pytest.approx(5 / 7)


def test_metrics_match_numpy_on_random_matrix():
    rng = np.random.default_rng(1)
    mat = rng.integers(0, 50, size=(K, K))
    mat[4, :] = 0
    mat[:, 4] = 0  # fence absent
    mat[7, :] = 0  # traffic sign never in ground truth but predicted
    m = compute_metrics(mat, protocol=19)
    tp = np.diag(mat).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (mat.sum(0) + mat.sum(1) - tp)
        acc = tp / mat.sum(1)
    np.testing.assert_allclose([m["iou"][n] for n in CLASS_NAMES], iou, equal_nan=True)
    np.testing.assert_allclose([m["acc"][n] for n in CLASS_NAMES], acc, equal_nan=True)
    assert math.isnan(m["iou"]["fence"]) and m["iou"]["traffic sign"] == 0.0
    assert m["mIoU"] == pytest.approx(np.nanmean(iou))
    assert m["mAcc"] == pytest.approx(np.nanmean(acc))
    assert m["aAcc"] == pytest.approx(tp.sum() / mat.sum())


def test_compute_metrics_asserts_its_input():
    with pytest.raises(KeyError):
        compute_metrics(np.ones((K, K), dtype=np.int64), protocol=18)
    with pytest.raises(AssertionError, match="square"):
        compute_metrics(np.ones((K, K - 1), dtype=np.int64))
    with pytest.raises(AssertionError, match="protocol needs train ids up to 18"):
        compute_metrics(np.ones((10, 10), dtype=np.int64))
    with pytest.raises(AssertionError, match="integer"):
        compute_metrics(np.ones((K, K)))


# --------------------------------------------------------------------------------------------
# Tables and files
# --------------------------------------------------------------------------------------------

def _cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_format_table_columns_and_values():
    m = compute_metrics(hand_matrix(), protocol=19)
    lines = format_table(m).splitlines()
    header, rule, row = _cells(lines[0]), lines[1], _cells(lines[2])
    assert header == list(CLASS_NAMES) + ["mIoU"]
    assert rule.count("|") == len(header) + 1
    assert row[0] == "33.3" and row[1] == "50.0" and row[2] == "100.0" and row[3] == "0.0"
    assert row[4] == "n/a" and row[9] == "0.0" and row[-1] == f"{100 * m['mIoU']:.1f}"

    acc = _cells(format_table(m, metric="acc").splitlines()[0])
    assert acc == list(CLASS_NAMES) + ["mAcc", "aAcc"]

    # SYNTHIA protocols leave out the classes they do not score, keeping Table 1 order.
    m13 = compute_metrics(hand_matrix(), protocol=13)
    csv_lines = format_table(m13, fmt="csv", digits=2).splitlines()
    assert csv_lines[0].split(",") == [CLASS_NAMES[c] for c in PROTOCOLS[13]] + ["mIoU"]
    assert csv_lines[1].split(",")[:3] == ["33.33", "50.00", "100.00"]


def test_format_table_rows_of_methods():
    a = compute_metrics(hand_matrix(), protocol=16)
    mat = hand_matrix().clone()
    mat.fill_diagonal_(5)
    b = compute_metrics(mat, protocol=16)
    lines = format_table({"source only": a, "adapted": b}, fmt="csv").splitlines()
    assert lines[0].split(",")[0] == "method" and len(lines) == 3
    assert lines[1].startswith("source only,") and lines[2].startswith("adapted,")
    assert lines[2].split(",")[-1] == f"{100 * b['mIoU']:.1f}"
    with pytest.raises(AssertionError, match="same protocol"):
        format_table({"a": a, "b": compute_metrics(hand_matrix(), protocol=19)})
    with pytest.raises(AssertionError, match="latex"):
        format_table(a, fmt="latex")


def test_write_metrics_writes_markdown_and_csv(tmp_path):
    m = compute_metrics(hand_matrix(), protocol=19)
    paths = write_metrics(m, tmp_path / "out", "val_miou19")
    assert paths["markdown"] == tmp_path / "out" / "val_miou19.md"
    md = paths["markdown"].read_text()
    assert format_table(m) in md and format_table(m, metric="acc") in md and "n/a" in md
    assert paths["csv"].read_text() == format_table(m, fmt="csv", digits=2)
    assert sorted(os.listdir(tmp_path / "out")) == ["val_miou19.csv", "val_miou19.md"]
    with pytest.raises(AssertionError, match="a/b"):
        write_metrics(m, tmp_path, "a/b")


def test_atomic_write_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "table.md"
    atomic_write(target, "old contents\n")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_metrics(compute_metrics(hand_matrix()), tmp_path, "table")
    monkeypatch.undo()
    assert target.read_text() == "old contents\n"
    assert sorted(os.listdir(tmp_path)) == ["table.md"]  # no temporary files, no csv
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["table.md"]


# --------------------------------------------------------------------------------------------
# Test-time augmentation
# --------------------------------------------------------------------------------------------

def test_flip_tta_is_identity_for_flip_equivariant_model():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(5, 3, 3, 3, generator=g)
    w = w + w.flip(-1)  # a horizontally symmetric kernel makes the conv flip-equivariant

    def predict_fn(x):
        return F.conv2d(x, w, padding=1)

    img = torch.randn(2, 3, 11, 14, generator=g)
    plain = predict_probs(predict_fn, img)
    flipped = predict_probs(predict_fn, img, flip=True)
    torch.testing.assert_close(flipped, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain.sum(1), torch.ones(2, 11, 14))


def test_flip_and_multiscale_tta_match_reference():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 3, 3, 3, generator=g)  # not symmetric: flipping changes the logits

    def predict_fn(x):  # logits at half the input resolution, as a real decoder (1/4) would
        return F.conv2d(x, w, padding=1, stride=2)

    img = torch.randn(1, 3, 12, 20, generator=g)
    out_size = (24, 40)

    def probs(x):
        return F.interpolate(predict_fn(x), size=out_size, mode="bilinear",
                             align_corners=False).softmax(1)

    views = []
    for s in (0.5, 1.25):
        x = F.interpolate(img, size=(round(12 * s), round(20 * s)), mode="bilinear",
                          align_corners=False)
        views += [probs(x), probs(x.flip(-1)).flip(-1)]
    expected = sum(views) / len(views)
    got = predict_probs(predict_fn, img, out_size=out_size, flip=True, scales=(0.5, 1.25),
                        num_classes=4)
    assert got.shape == (1, 4, 24, 40)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, probs(img))  # the augmentation did change something


def test_predict_probs_asserts_its_input():
    img = torch.randn(1, 3, 8, 8)
    with pytest.raises(AssertionError, match="expected num_classes=19"):
        predict_probs(lambda x: torch.randn(1, 5, 8, 8), img, num_classes=19)
    with pytest.raises(AssertionError):
        predict_probs(lambda x: torch.randn(5, 8, 8), img)
    with pytest.raises(AssertionError):
        predict_probs(lambda x: torch.randn(1, 5, 8, 8), img, scales=(0.0,))
    with pytest.raises(AssertionError):
        predict_probs(lambda x: x, img.long())


# --------------------------------------------------------------------------------------------
# evaluate() end to end
# --------------------------------------------------------------------------------------------

def oracle_predict_fn(x):
    """A fake model whose prediction is written into the image: channel 0 holds the class id."""
    ids = x[:, 0].round().long().clamp(0, K - 1)
    return F.one_hot(ids, K).permute(0, 3, 1, 2).float() * 10.0


def make_sample(pred, label, g):
    img = torch.randn(3, *pred.shape, generator=g)
    img[0] = pred.float()
    return {"img": img, "label": label, "name": "ignored key"}


def test_evaluate_end_to_end_exact_miou():
    g = torch.Generator().manual_seed(4)
    # Image 1: a 4 x 5 label and a prediction that gets 3 pixels wrong.
    label1 = torch.tensor([[0, 0, 0, 1, 1],
                           [0, 0, 1, 1, 1],
                           [2, 2, 2, 255, 255],
                           [2, 2, 2, 13, 13]])
    pred1 = torch.tensor([[0, 0, 1, 1, 1],
                          [0, 0, 1, 1, 0],
                          [2, 2, 2, 13, 5],
                          [2, 13, 2, 13, 13]])
    # Image 2 (a batch of two identical ones): car everywhere, predicted as car and bus.
    label2 = torch.full((4, 5), 13)
    pred2 = label2.clone()
    pred2[0] = 15
    samples = [make_sample(pred1, label1, g),
               {"img": torch.stack([make_sample(pred2, label2, g)["img"]] * 2),
                "label": torch.stack([label2, label2])}]
    # By hand (255 pixels dropped):
    # road:     GT 5, TP 4, predicted 5 (sidewalk pixel (1,4) taken for road)  IoU 4/6
    # sidewalk: GT 5, TP 4, predicted 5 ((0,2) 0 -> 1)                         IoU 4/6
    # building: GT 6, TP 5, predicted 5                                        IoU 5/6
    # car:      GT 2 + 2*20 = 42, TP 2 + 2*15 = 32, predicted 2 + 1 + 30 = 33 IoU 32/43
    # bus:      GT 0, predicted 2*5 = 10                                       IoU 0
    expected_iou = {"road": 4 / 6, "sidewalk": 4 / 6, "building": 5 / 6, "car": 32 / 43,
                    "bus": 0.0}
    result = evaluate(oracle_predict_fn, samples, protocols=(19, 16), progress=False)
    m = result["metrics"][19]
    for name, value in expected_iou.items():
        assert m["iou"][name] == pytest.approx(value), name
    assert m["mIoU"] == pytest.approx(sum(expected_iou.values()) / 5)
    assert m["aAcc"] == pytest.approx((4 + 4 + 5 + 32) / (5 + 5 + 6 + 42))
    assert result["num_images"] == 3 and result["matrix"].sum().item() == 58
    assert result["metrics"][16]["mIoU"] == pytest.approx(m["mIoU"])  # no 16-class exclusions hit

    # The same data through a DataLoader (batched by default collate) gives the same matrix.
    loader = torch.utils.data.DataLoader([make_sample(pred1, label1, g)] * 2, batch_size=2)
    twice = evaluate(oracle_predict_fn, loader, progress=False)
    once = evaluate(oracle_predict_fn, samples[:1], progress=False)
    torch.testing.assert_close(twice["matrix"], 2 * once["matrix"])


def test_evaluate_resizes_predictions_to_label_resolution():
    g = torch.Generator().manual_seed(5)
    label = torch.randint(0, 3, (12, 18), generator=g)
    label[:, :2] = 255

    def low_res_fn(x):  # a constant "sky" prediction at 1 x 1
        logits = torch.zeros(x.shape[0], K, 1, 1)
        logits[:, 10] = 1.0
        return logits

    # The image is at half the label's resolution (as DAFormer evaluates downscaled images).
    result = evaluate(low_res_fn, [{"img": torch.randn(3, 6, 9, generator=g), "label": label}],
                      flip=True, scales=(1.0, 0.75), progress=False)
    mat = result["matrix"]
    assert mat.sum().item() == 12 * 16 and mat[:, 10].sum().item() == 12 * 16
    assert result["metrics"][19]["iou"]["sky"] == 0.0


def test_evaluate_asserts_its_data():
    with pytest.raises(KeyError, match="label"):
        evaluate(oracle_predict_fn, [{"img": torch.randn(3, 4, 4)}], progress=False)
    with pytest.raises(AssertionError, match="19-class protocol needs train ids up to 18"):
        evaluate(oracle_predict_fn, [], num_classes=5, progress=False)
    with pytest.raises(KeyError):
        evaluate(oracle_predict_fn, [], protocols=(20,), progress=False)
    with pytest.raises(AssertionError, match="integer"):
        evaluate(oracle_predict_fn, [{"img": torch.randn(3, 4, 4), "label": torch.rand(4, 4)}],
                 progress=False)

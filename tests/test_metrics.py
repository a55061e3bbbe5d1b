"""Metrics: per-class sums over episodes, mIoU and FB-IoU against hand-computed values, PFENet's scoring canvas."""

from __future__ import annotations

import pytest
import torch

from jc2a.metrics import FewShotIoU, score_at_original_size


def t(rows):
    return torch.tensor(rows, dtype=torch.int64)


def test_sums_over_episodes_not_a_mean_of_episode_ious():
    m = FewShotIoU([1, 2])
    m.update(t([[[1, 1], [0, 0]]]), t([[[1, 0], [0, 0]]]), [1])  # class 1: fg I=1, U=2; bg I=2, U=3
    m.update(t([[[1, 1], [1, 1]]]), t([[[1, 1], [1, 1]]]), [1])  # class 1: fg I=4, U=4; bg I=0, U=0
    m.update(t([[[0, 0], [0, 1]]]), t([[[0, 0], [1, 1]]]), [2])  # class 2: fg I=1, U=2; bg I=2, U=3
    out = m.compute()
    assert out["class_iou"][1] == pytest.approx(100 * 5 / 6)  # (1 + 4) / (2 + 4), not mean(1/2, 1) = 75
    assert out["class_iou"][2] == pytest.approx(50.0)
    assert out["miou"] == pytest.approx((100 * 5 / 6 + 50) / 2)
    # FB-IoU pooled over all episodes: fg 6/8, bg 4/6
    assert out["fbiou"] == pytest.approx(100 * (6 / 8 + 4 / 6) / 2)
    assert out["episodes"] == 3 and out["missing"] == []


def test_empty_prediction_and_ignored_pixels():
    m = FewShotIoU([3])
    m.update(t([[0, 0, 0]]), t([[1, 255, 0]]), [3])  # nothing predicted: fg I=0 U=1; bg I=1 U=2 (255 ignored)
    out = m.compute()
    assert out["class_iou"][3] == 0.0 and out["fbiou"] == pytest.approx(100 * (0 + 1 / 2) / 2)
    m = FewShotIoU([3])
    m.update(t([[1, 1]]), t([[255, 255]]), [3])  # everything ignored: no union anywhere
    out = m.compute()
    assert out["class_iou"][3] == 0.0 and out["miou"] == 0.0 and out["fbiou"] == 0.0


def test_class_never_predicted_and_class_without_foreground():
    m = FewShotIoU([1, 2, 3])
    m.update(t([[1, 0]]), t([[1, 0]]), [1])  # perfect
    m.update(t([[0, 0]]), t([[1, 1]]), [2])  # never predicted: 0
    m.update(t([[1, 0]]), t([[0, 0]]), [3])  # no foreground in its episode, a false positive: 0
    out = m.compute()
    assert out["class_iou"] == {1: 100.0, 2: 0.0, 3: 0.0}
    assert out["miou"] == pytest.approx(100 / 3)
    # bg: I = 1 + 0 + 1 = 2, U = 1 + 2 + 2 = 5; fg: I = 1, U = 1 + 2 + 1 = 4
    assert out["fbiou"] == pytest.approx(100 * (2 / 5 + 1 / 4) / 2)


def test_class_without_episodes_is_reported_missing():
    m = FewShotIoU([1, 2])
    m.update(t([[1]]), t([[1]]), [1])
    out = m.compute()
    assert out["missing"] == [2] and out["miou"] == 100.0 and 2 not in out["class_iou"]
    with pytest.raises(ValueError, match="class 7 is not one of"):
        m.update(t([[1]]), t([[1]]), [7])


def test_a_batch_counts_as_its_episodes_one_by_one():
    a, b = FewShotIoU([1, 2]), FewShotIoU([1, 2])
    pred = t([[[1, 0], [1, 1]], [[0, 1], [0, 0]]])
    target = t([[[1, 0], [0, 1]], [[0, 1], [1, 255]]])
    a.update(pred, target, torch.tensor([1, 2]))
    b.update(pred[:1], target[:1], [1])
    b.update(pred[1], target[1], 2)
    assert torch.equal(a.intersection, b.intersection) and torch.equal(a.union, b.union)
    assert a.compute() == b.compute() and a.intersection.tolist() == [[1, 2], [1, 1]]


def test_score_at_original_size_pads_the_label_into_a_square():
    logits = torch.zeros(2, 9, 9)
    logits[1, :, :5] = 5.0  # foreground on the left of the canvas
    label = torch.tensor([[1, 0, 0, 255], [1, 1, 0, 0]], dtype=torch.uint8)
    pred, target = score_at_original_size(logits, label)
    assert pred.shape == target.shape == (4, 4)
    assert target.tolist() == [[1, 0, 0, 255], [1, 1, 0, 0], [255] * 4, [255] * 4]
    assert pred[:, 0].tolist() == [1, 1, 1, 1] and pred[:, 3].tolist() == [0, 0, 0, 0]

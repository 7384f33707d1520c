import math

import pytest
import torch

from pixelseg.core.metrics import ConfusionMatrix, scores_from_confusion


def test_scores_match_hand_computed_values():
    # pairs (true, pred) after dropping the ignored pixel: (0,0) (1,0) (1,1) (1,1) (2,2)
    pred = torch.tensor([0, 0, 1, 1, 2, 2])
    target = torch.tensor([0, 1, 1, 1, 2, 255])
    cm = ConfusionMatrix(3, ignore_index=255)
    cm.update(pred, target)
    assert cm.mat.tolist() == [[1, 0, 0], [1, 2, 0], [0, 0, 1]]
    s = cm.compute()
    assert s["pixel_acc"] == pytest.approx(4 / 5)
    assert s["iou"] == pytest.approx([1 / 2, 2 / 3, 1.0])
    assert s["miou"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert s["dice"] == pytest.approx([2 / 3, 4 / 5, 1.0])
    assert s["class_acc"] == pytest.approx([1.0, 2 / 3, 1.0])
    assert s["mean_class_acc"] == pytest.approx((1 + 2 / 3 + 1) / 3)


def test_accumulates_over_batches_like_one_big_batch():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 4, (6, 8, 8), generator=g)
    target = torch.randint(0, 4, (6, 8, 8), generator=g)
    a, b = ConfusionMatrix(4), ConfusionMatrix(4)
    a.update(pred, target)
    for i in range(6):
        b.update(pred[i], target[i])
    assert torch.equal(a.mat, b.mat)
    assert a.mat.sum() == 6 * 64


def test_absent_class_is_nan_and_left_out_of_the_mean():
    cm = ConfusionMatrix(4, ignore_index=None)
    cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    s = cm.compute()
    assert math.isnan(s["iou"][2]) and math.isnan(s["iou"][3])
    assert s["miou"] == pytest.approx((1 / 2 + 1 / 2) / 2)


def test_ignore_index_inside_class_range_is_skipped():
    cm = ConfusionMatrix(3, ignore_index=2)
    cm.update(torch.tensor([0, 1, 0]), torch.tensor([0, 2, 2]))
    assert cm.mat.sum() == 1


def test_scores_from_confusion_rejects_nothing_on_empty_matrix():
    s = scores_from_confusion(torch.zeros(3, 3, dtype=torch.int64))
    assert math.isnan(s["pixel_acc"]) and math.isnan(s["miou"])


def test_class_ids_equal_argmax_ties_and_layouts_included():
    from pixelseg.core.metrics import class_ids
    torch.manual_seed(0)
    scores = torch.randint(0, 3, (2, 4, 9, 7)).float()  # many ties: argmax's first-index rule must hold
    for x in (scores, scores.contiguous(memory_format=torch.channels_last)):
        assert torch.equal(class_ids(x), x.argmax(1))

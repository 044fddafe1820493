"""IoU against a naive per-class loop, and the DESIGN.md conventions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from visionserve.server.errors import InvalidArgument
from visionserve.server.iou import (
    compute_iou,
    confusion_matrix,
    iou_from_confusion,
    iou_from_counts,
)


def naive_iou(pred: np.ndarray, truth: np.ndarray, num_classes: int, ignore: int | None):
    keep = np.ones(truth.shape, bool) if ignore is None else truth != ignore
    inter, union, iou = [], [], []
    for c in range(num_classes):
        p, t = (pred == c) & keep, (truth == c) & keep
        i, u = int((p & t).sum()), int((p | t).sum())
        inter.append(i)
        union.append(u)
        iou.append(i / u if u else math.nan)
    return np.array(inter), np.array(union), np.array(iou)


@pytest.mark.parametrize("num_classes", [2, 4, 21])
@pytest.mark.parametrize("ignore", [255, None, 0])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_naive_loop(num_classes: int, ignore: int | None, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pred = rng.integers(0, num_classes, size=(37, 53), dtype=np.uint8)
    truth = rng.integers(0, num_classes, size=(37, 53), dtype=np.uint8)
    if ignore == 255:
        truth[rng.random(truth.shape) < 0.2] = 255
    intersection, union, iou = iou_from_confusion(
        confusion_matrix(pred, truth, num_classes, ignore)
    )
    want_i, want_u, want_iou = naive_iou(pred, truth, num_classes, ignore)
    np.testing.assert_array_equal(intersection, want_i)
    np.testing.assert_array_equal(union, want_u)
    np.testing.assert_allclose(iou, want_iou, equal_nan=True)
    result = compute_iou(pred, truth, num_classes, ignore)
    assert result.mean_iou == pytest.approx(np.nanmean(want_iou))
    scored = truth != ignore if ignore is not None else np.ones(truth.shape, bool)
    assert result.scored_pixels == int(scored.sum())
    assert result.pixel_accuracy == pytest.approx(float((pred == truth)[scored].mean()))


def test_confusion_matrix_is_int64_and_indexed_truth_then_prediction() -> None:
    pred = np.array([[0, 1, 1]], np.uint8)
    truth = np.array([[0, 0, 1]], np.uint8)
    cm = confusion_matrix(pred, truth, 3)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [0, 0, 0]])


def test_absent_class_is_nan_and_left_out_of_the_mean() -> None:
    pred = np.array([[0, 0, 1, 1]], np.uint8)
    truth = np.array([[0, 1, 1, 1]], np.uint8)
    result = compute_iou(pred, truth, num_classes=3, ignore_index=255)
    np.testing.assert_array_equal(result.union, [2, 3, 0])
    assert result.iou[0] == pytest.approx(0.5)
    assert result.iou[1] == pytest.approx(2 / 3)
    assert math.isnan(result.iou[2])
    assert result.mean_iou == pytest.approx((0.5 + 2 / 3) / 2)


def test_ignored_pixels_count_nowhere_even_where_predicted() -> None:
    pred = np.array([[2, 2, 0]], np.uint8)
    truth = np.array([[255, 255, 0]], np.uint8)
    result = compute_iou(pred, truth, num_classes=3, ignore_index=255)
    np.testing.assert_array_equal(result.union, [1, 0, 0])
    assert result.scored_pixels == 1 and result.pixel_accuracy == 1.0
    assert math.isnan(result.iou[2])


def test_everything_ignored_gives_nan_mean_and_accuracy() -> None:
    truth = np.full((2, 2), 255, np.uint8)
    result = compute_iou(np.zeros((2, 2), np.uint8), truth, 2, 255)
    assert result.scored_pixels == 0
    assert math.isnan(result.mean_iou) and math.isnan(result.pixel_accuracy)


@pytest.mark.parametrize(("bad", "ignore"), [(7, 255), (255, None), (4, 0)])
def test_truth_label_out_of_range_names_values_and_range(bad: int, ignore: int | None) -> None:
    truth = np.array([[0, 1, bad]], np.uint8)
    with pytest.raises(InvalidArgument) as err:
        confusion_matrix(np.zeros((1, 3), np.uint8), truth, 4, ignore)
    assert str(bad) in str(err.value) and "0..3" in str(err.value)


def test_shape_mismatch_names_both_sizes() -> None:
    with pytest.raises(InvalidArgument, match="4x5.*4x6"):
        confusion_matrix(np.zeros((4, 6), np.uint8), np.zeros((4, 5), np.uint8), 2)


def test_dataset_convention_sums_counts_before_dividing() -> None:
    inter = np.array([1, 0]) + np.array([3, 0])
    union = np.array([2, 0]) + np.array([6, 0])
    iou = iou_from_counts(inter, union)
    assert iou[0] == pytest.approx(0.5) and math.isnan(iou[1])

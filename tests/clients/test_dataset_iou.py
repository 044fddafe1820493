"""Dataset-level IoU: summed intersections / summed unions, NaN-skipping mean."""

from __future__ import annotations

import math

import numpy as np
import pytest

from visionserve.clients import ClassIoU, DatasetIoU, IoUResult, confusion_matrix

LABELS = ["background", "circle", "square", "triangle"]


def per_image_result(pred: np.ndarray, truth: np.ndarray, ignore: int = 255) -> IoUResult:
    """An IoUResult built by a plain loop, the way a server reports one image."""
    keep = truth != ignore
    classes = []
    for c in range(len(LABELS)):
        inter = int(np.sum((pred == c) & (truth == c) & keep))
        union = int(np.sum(((pred == c) | (truth == c)) & keep))
        classes.append(ClassIoU(c, LABELS[c], inter, union, inter / union if union else math.nan))
    ious = [c.iou for c in classes if c.union]
    acc = float(np.sum((pred == truth) & keep) / keep.sum())
    return IoUResult(
        tuple(classes), float(np.mean(ious)) if ious else math.nan, acc, int(keep.sum()), ignore
    )


def test_sums_over_images_not_mean_of_means() -> None:
    rng = np.random.default_rng(0)
    preds, truths = [], []
    totals = DatasetIoU(LABELS)
    for n in range(6):
        truth = rng.integers(0, 3, size=(20 + n, 17)).astype(np.uint8)  # class 3 never in truth
        truth[rng.random(truth.shape) < 0.1] = 255
        pred = np.where(
            rng.random(truth.shape) < 0.7, truth, rng.integers(0, 3, truth.shape)
        ).astype(np.uint8)
        pred[pred == 255] = 0
        preds.append(pred.ravel())
        truths.append(truth.ravel())
        totals.add(per_image_result(pred, truth))
    pred, truth = np.concatenate(preds), np.concatenate(truths)
    keep = truth != 255
    cm = np.bincount(truth[keep] * 4 + pred[keep], minlength=16).reshape(4, 4)
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    expected = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    np.testing.assert_allclose(totals.iou(), expected)
    assert math.isnan(totals.iou()[3])  # absent everywhere -> NaN, not 0
    assert totals.mean_iou() == pytest.approx(np.nanmean(expected))
    assert totals.pixel_accuracy() == pytest.approx(inter.sum() / keep.sum())
    assert totals.mean_iou() != pytest.approx(np.nanmean(totals.per_image_miou))


def test_report_and_table_mark_absent_classes() -> None:
    totals = DatasetIoU(LABELS)
    truth = np.array([[0, 1], [1, 1]], dtype=np.uint8)
    totals.add(per_image_result(truth.copy(), truth))
    report = totals.to_dict()
    assert report["mean_iou"] == 1.0
    assert report["classes"][2]["iou"] is None
    assert "absent" in totals.table()


def test_empty_totals_are_nan() -> None:
    totals = DatasetIoU(LABELS)
    assert math.isnan(totals.mean_iou())
    assert math.isnan(totals.pixel_accuracy())


@pytest.mark.parametrize("num_classes", [1, 4, 21, 256, 300])
@pytest.mark.parametrize("shape", [(1, 1), (37, 53), (256, 256)])
def test_confusion_matrix_equals_a_pixel_count(num_classes: int, shape: tuple[int, int]) -> None:
    """Both histogram paths (OpenCV up to 256 classes, NumPy past) against plain counting."""
    rng = np.random.default_rng(num_classes)
    top = min(num_classes, 256)
    truth = rng.integers(0, top, shape).astype(np.uint8)
    pred = rng.integers(0, top, shape).astype(np.uint8)
    ignore = 255 if num_classes < 256 else None  # 255 is a class of its own past 255
    if ignore is not None:
        truth.ravel()[::7] = ignore
    keep = truth != ignore if ignore is not None else np.ones(shape, bool)
    expected = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(expected, (truth[keep], pred[keep]), 1)
    assert confusion_matrix(pred, truth, num_classes, ignore).tolist() == expected.tolist()

"""Per-class IoU from a predicted and a ground-truth class mask (pure numpy).

Conventions (DESIGN.md): ground-truth pixels equal to ``ignore_index`` are left out;
a class in neither prediction nor truth has union 0 and IoU NaN (absent); mean IoU is
the mean over present classes (NaN if none). Over a data set, sum the intersections
and unions per class first, then divide (``iou_from_counts``).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from visionserve.server.errors import InvalidArgument


@dataclass(frozen=True)
class IoUResult:
    """Per-class counts and scores for one image (arrays of length num_classes)."""

    intersection: np.ndarray  # int64
    union: np.ndarray  # int64
    iou: np.ndarray  # float64, NaN where union == 0
    mean_iou: float
    pixel_accuracy: float  # NaN when no pixel was scored
    scored_pixels: int


def confusion_matrix(
    pred: np.ndarray, truth: np.ndarray, num_classes: int, ignore_index: int | None = 255
) -> np.ndarray:
    """``cm[t, p]`` = number of pixels with truth class t predicted as p, as int64.

    Pixels whose truth equals ``ignore_index`` are skipped. Raises ``InvalidArgument``
    when the shapes differ or when a truth or predicted value is >= num_classes
    (other than ignore_index), naming the offending values and the valid range.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    if pred.shape != truth.shape:
        raise InvalidArgument(
            f"ground truth is {_hw(truth)} but the prediction is {_hw(pred)}: they must be the same size"
        )
    if pred.dtype == truth.dtype == np.uint8 and num_classes <= 256 and 0 < truth.size < _CV_HIST_MAX_PIXELS:
        return _confusion_uint8(pred, truth, num_classes, ignore_index)
    truth = truth.reshape(-1).astype(np.int64, copy=False)
    pred = pred.reshape(-1).astype(np.int64, copy=False)
    if ignore_index is not None:
        keep = truth != ignore_index
        truth, pred = truth[keep], pred[keep]
    _check_range(truth, num_classes, ignore_index, "ground truth")
    _check_range(pred, num_classes, None, "prediction")
    counts = np.bincount(truth * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64, copy=False)


# OpenCV's histogram counts in float32: exact up to 2**24 pixels in one bin.
_CV_HIST_MAX_PIXELS = 1 << 24


def _confusion_uint8(pred: np.ndarray, truth: np.ndarray, n: int, ignore_index: int | None) -> np.ndarray:
    """``confusion_matrix`` for uint8 masks: one OpenCV histogram of ``truth * n + pred``
    over 256 * n bins (several times faster than int64 conversion + np.bincount)."""
    if int(pred.max()) >= n:
        _check_range(pred.reshape(-1), n, None, "prediction")
    index = truth.astype(np.uint16)
    index *= n
    index += pred
    hist = cv2.calcHist([index.reshape(index.shape[0], -1)], [0], None, [256 * n], [0, 256 * n])
    counts = hist.ravel().astype(np.int64)
    if ignore_index is not None and 0 <= ignore_index < 256:
        counts[ignore_index * n : (ignore_index + 1) * n] = 0
    bad_rows = counts[n * n :].reshape(-1, n).any(axis=1)
    if bad_rows.any():
        _check_range(np.flatnonzero(bad_rows) + n, n, ignore_index, "ground truth")
    return counts[: n * n].reshape(n, n)


def iou_from_counts(intersection: np.ndarray, union: np.ndarray) -> np.ndarray:
    """IoU per class as float64, NaN where union is 0 (class absent)."""
    intersection = np.asarray(intersection, dtype=np.float64)
    union = np.asarray(union, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, intersection / np.where(union > 0, union, 1), np.nan)


def iou_from_confusion(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(intersection, union, iou)`` per class; iou is NaN where union == 0."""
    cm = np.asarray(cm, dtype=np.int64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {cm.shape}")
    intersection = np.diag(cm).copy()
    union = cm.sum(axis=0) + cm.sum(axis=1) - intersection
    return intersection, union, iou_from_counts(intersection, union)


def nan_mean(values: np.ndarray) -> float:
    """Mean of the non-NaN values, NaN (without a warning) if there are none."""
    values = np.asarray(values, dtype=np.float64)
    present = values[~np.isnan(values)]
    return float(present.mean()) if present.size else float("nan")


def compute_iou(
    pred: np.ndarray, truth: np.ndarray, num_classes: int, ignore_index: int | None = 255
) -> IoUResult:
    """Everything an ``IoUReport`` carries, for one predicted mask against its truth."""
    cm = confusion_matrix(pred, truth, num_classes, ignore_index)
    intersection, union, iou = iou_from_confusion(cm)
    scored = int(cm.sum())
    accuracy = float(np.trace(cm) / scored) if scored else float("nan")
    return IoUResult(intersection, union, iou, nan_mean(iou), accuracy, scored)


def _check_range(values: np.ndarray, num_classes: int, ignore_index: int | None, what: str) -> None:
    bad = values >= num_classes
    if values.size and (bad.any() or values.min() < 0):
        offending = np.unique(values[bad | (values < 0)])
        shown = ", ".join(str(v) for v in offending[:10]) + (" ..." if offending.size > 10 else "")
        ignore = f" or the ignore_index {ignore_index}" if ignore_index is not None else ""
        raise InvalidArgument(
            f"{what} has class values {shown} outside the valid range 0..{num_classes - 1}{ignore} "
            f"({num_classes} classes)"
        )


def _hw(mask: np.ndarray) -> str:
    return (
        "x".join(str(d) for d in mask.shape)
        if mask.ndim != 2
        else f"{mask.shape[0]}x{mask.shape[1]} (HxW)"
    )

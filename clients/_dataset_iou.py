"""Dataset-level IoU: sum intersections and unions per class over all images.

The mmsegmentation convention: IoU_c = sum_i I_ic / sum_i U_ic, and mean IoU is the
NaN-skipping mean over classes present anywhere in the data set. The per-image mean
IoU is kept too, but it is a different (and usually lower) number. The arithmetic is
``server/iou.py``'s (one implementation for training, validation, server and clients).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from visionserve.clients._types import IoUResult
# One implementation for server and client (re-exported by visionserve.clients).
from visionserve.server.iou import (  # noqa: F401
    confusion_matrix,
    iou_from_confusion,
    iou_from_counts,
    nan_mean,
)


@dataclass
class DatasetIoU:
    labels: list[str]
    intersection: np.ndarray = field(init=False)
    union: np.ndarray = field(init=False)
    correct_pixels: int = 0
    scored_pixels: int = 0
    per_image_miou: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.intersection = np.zeros(len(self.labels), dtype=np.int64)
        self.union = np.zeros(len(self.labels), dtype=np.int64)

    def add(self, result: IoUResult) -> None:
        for c in result.classes:
            self.intersection[c.index] += c.intersection
            self.union[c.index] += c.union
        self.scored_pixels += result.scored_pixels
        self.correct_pixels += round(result.pixel_accuracy * result.scored_pixels)
        self.per_image_miou.append(result.mean_iou)

    @property
    def images(self) -> int:
        return len(self.per_image_miou)

    def iou(self) -> np.ndarray:
        return iou_from_counts(self.intersection, self.union)

    def mean_iou(self) -> float:
        return nan_mean(self.iou())

    def pixel_accuracy(self) -> float:
        return self.correct_pixels / self.scored_pixels if self.scored_pixels else math.nan

    def to_dict(self) -> dict:
        iou = self.iou()
        valid = [m for m in self.per_image_miou if not math.isnan(m)]
        return {
            "images": self.images,
            "mean_iou": _json_float(self.mean_iou()),
            "pixel_accuracy": _json_float(self.pixel_accuracy()),
            "per_image_mean_iou_average": _json_float(float(np.mean(valid)) if valid else math.nan),
            "classes": [
                {
                    "index": i,
                    "label": label,
                    "intersection": int(self.intersection[i]),
                    "union": int(self.union[i]),
                    "iou": _json_float(float(iou[i])),
                }
                for i, label in enumerate(self.labels)
            ],
        }

    def table(self) -> str:
        iou = self.iou()
        width = max(len("class"), *(len(x) for x in self.labels))
        lines = [f"{'class':<{width}}  {'IoU':>7}  {'intersection':>12}  {'union':>12}"]
        for i, label in enumerate(self.labels):
            value = "absent" if math.isnan(iou[i]) else f"{iou[i]:.4f}"
            lines.append(
                f"{label:<{width}}  {value:>7}  {self.intersection[i]:>12}  {self.union[i]:>12}"
            )
        lines.append(
            f"{'mean IoU':<{width}}  {self.mean_iou():>7.4f}   (dataset-level, {self.images} images)"
        )
        lines.append(f"{'pixel acc':<{width}}  {self.pixel_accuracy():>7.4f}")
        return "\n".join(lines)


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 6)

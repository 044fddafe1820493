"""Model outputs -> what a response carries: top-k classes, masks at the original size."""

from __future__ import annotations

import cv2
import numpy as np


def top_k(probabilities: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The ``k`` best ``(class index, probability)`` pairs, best first.

    Ties go to the lower class index. ``k`` larger than the class count is capped.
    """
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 1:
        raise ValueError(
            f"top_k expects one row of class probabilities, got shape {probabilities.shape}"
        )
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    k = min(k, probabilities.shape[0])
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [(int(i), float(probabilities[i])) for i in order]


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A class-index mask resized to ``height`` x ``width`` with nearest neighbour (uint8)."""
    if mask.ndim != 2:
        raise ValueError(f"resize_mask expects an HxW mask, got shape {mask.shape}")
    mask = mask.astype(np.uint8, copy=False)
    if mask.shape == (height, width):
        return mask
    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)


def mask_to_image(
    mask: np.ndarray, content: tuple[int, int], height: int, width: int
) -> np.ndarray:
    """A tensor-sized mask -> the image's mask: crop the padding (keep the top-left
    ``content`` region), then resize to ``height`` x ``width`` (nearest neighbour)."""
    if mask.ndim != 2 or mask.shape[0] < content[0] or mask.shape[1] < content[1]:
        raise ValueError(f"mask of shape {mask.shape} does not hold the content {content}")
    return np.ascontiguousarray(resize_mask(mask[: content[0], : content[1]], height, width))

"""Decoded RGB images -> the model's input tensor (NCHW float32, normalized)."""

from __future__ import annotations

import cv2
import numpy as np

from visionserve.server.model_config import InputSpec


def preprocess(image: np.ndarray, spec: InputSpec) -> np.ndarray:
    """RGB uint8 HxWx3 -> float32 3xHxW at the model's input size.

    Resized with ``cv2.INTER_LINEAR`` to ``spec.height`` x ``spec.width``, scaled to
    [0, 1], then ``(x - mean) / std`` per channel.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"preprocess expects RGB uint8 HxWx3, got {image.dtype} {image.shape}")
    if image.shape[:2] != (spec.height, spec.width):
        image = cv2.resize(image, (spec.width, spec.height), interpolation=cv2.INTER_LINEAR)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    x = (image.astype(np.float32) * np.float32(1.0 / 255.0) - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def stack(tensors: list[np.ndarray]) -> np.ndarray:
    """Equal-shaped CHW tensors -> one NCHW batch."""
    if not tensors:
        raise ValueError("stack needs at least one tensor")
    shapes = {t.shape for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"cannot stack tensors of different shapes {sorted(shapes)}")
    return np.ascontiguousarray(np.stack(tensors, axis=0))


def preprocess_batch(images: list[np.ndarray], spec: InputSpec) -> np.ndarray:
    """Many RGB images of any sizes -> one NCHW float32 batch at the model's input size."""
    return stack([preprocess(image, spec) for image in images])

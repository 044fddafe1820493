"""Antialiased bilinear resizing and torchvision's eval crop, without torch or PIL.

``resize_crop`` is what torchvision's classification eval transforms do to an image
(``Resize(resize_size)`` on the short side, bilinear with antialiasing, then
``CenterCrop``), computed in float32 with the weights of PIL's bilinear filter: a
triangle whose support widens with the reduction factor, so every input pixel under an
output pixel counts (OpenCV's ``INTER_LINEAR`` samples 2x2 pixels and aliases when it
shrinks). Only the rows and columns of the crop are computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CropBox:
    """An image resized to ``resized`` (height, width), then cropped at ``top``, ``left``
    to ``size`` (height, width)."""

    resized: tuple[int, int]
    top: int
    left: int
    size: tuple[int, int]


def crop_box(height: int, width: int, resize_size: int, crop: tuple[int, int]) -> CropBox:
    """Where torchvision's ``Resize(resize_size)`` + ``CenterCrop(crop)`` take an image (pure).

    The short side becomes ``resize_size``, the long side ``int(resize_size * long /
    short)``; the crop is centred with Python's ``round`` (torchvision's rules).
    """
    if height < 1 or width < 1:
        raise ValueError(f"crop_box needs a non-empty image, got {height}x{width}")
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(resize_size * long / short)
    resized = (new_long, resize_size) if width <= height else (resize_size, new_long)
    if resized[0] < crop[0] or resized[1] < crop[1]:
        raise ValueError(
            f"resize_size {resize_size} gives {resized[0]}x{resized[1]}, smaller than the "
            f"crop {crop[0]}x{crop[1]}: resize_size must be at least the crop's larger side"
        )
    top = int(round((resized[0] - crop[0]) / 2.0))
    left = int(round((resized[1] - crop[1]) / 2.0))
    return CropBox(resized, top, left, crop)


def taps(in_size: int, out_size: int, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Input indices and weights ``[count, K]`` of outputs ``first..first+count-1`` of a
    bilinear antialiased resize of one axis from ``in_size`` to ``out_size`` (PIL's
    coefficients: centre ``(i + 0.5) * scale``, triangle of half-width ``max(scale, 1)``,
    cut at the borders and renormalised)."""
    scale = in_size / out_size
    support = max(scale, 1.0)
    centres = (np.arange(first, first + count, dtype=np.float64) + 0.5) * scale
    low = np.maximum(np.floor(centres - support + 0.5).astype(np.int64), 0)
    index = low[:, None] + np.arange(int(np.ceil(support)) * 2 + 1)[None, :]
    weight = np.maximum(1.0 - np.abs((index + 0.5 - centres[:, None]) / support), 0.0)
    weight[index >= in_size] = 0.0
    weight /= weight.sum(axis=1, keepdims=True)
    return np.minimum(index, in_size - 1), weight.astype(np.float32)


def _along(image: np.ndarray, axis: int, index: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Resample ``image`` along ``axis`` (0: rows, 1: columns) with ``taps``' output."""
    moved = np.moveaxis(image, axis, 0)
    out = np.zeros((index.shape[0], *moved.shape[1:]), np.float32)
    shape = (-1,) + (1,) * (moved.ndim - 1)
    for k in range(index.shape[1]):
        out += moved[index[:, k]] * weight[:, k].reshape(shape)
    return np.moveaxis(out, 0, axis)


def resize_crop(image: np.ndarray, resize_size: int, crop: tuple[int, int]) -> np.ndarray:
    """HxWxC image -> float32 ``crop`` (height, width) x C, on the 0..255 scale of the input:
    torchvision's ``Resize(resize_size, antialias=True)`` + ``CenterCrop(crop)``."""
    box = crop_box(image.shape[0], image.shape[1], resize_size, crop)
    rows = taps(image.shape[0], box.resized[0], box.top, box.size[0])
    cols = taps(image.shape[1], box.resized[1], box.left, box.size[1])
    return _along(_along(image, 0, *rows), 1, *cols)

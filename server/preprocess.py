"""Decoded RGB images -> the model's input tensor (NCHW float32, normalized).

``layout`` decides where an image goes in the tensor (``InputSpec.mode``): resized to
the model's fixed input, kept at its resolution and padded up to a shape bucket, or
resized on its short side and centre-cropped (``resample.resize_crop``).
``preprocess`` builds the tensor, ``postprocess.mask_to_image`` takes a mask back.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np

from visionserve.server.model_config import InputSpec
from visionserve.server.resample import resize_crop


@dataclass(frozen=True)
class Layout:
    """Where an image sits in its tensor: ``content`` (its height, width once scaled) at
    the top left of a ``tensor``-sized (height, width) plane; the rest is padding."""

    content: tuple[int, int]
    tensor: tuple[int, int]


def layout(height: int, width: int, spec: InputSpec) -> Layout:
    """The tensor layout of an image of ``height`` x ``width`` (pure).

    resize and resize_crop modes: the model's input size, no padding (resize_crop: the
    content is the centre crop, not the whole image). pad mode: the image's own size
    (scaled down, aspect kept, when a side exceeds the largest bucket), each side
    rounded up to the next bucket.
    """
    if height < 1 or width < 1:
        raise ValueError(f"layout needs a non-empty image, got {height}x{width}")
    if spec.mode in ("resize", "resize_crop"):
        size = (spec.height, spec.width)
        return Layout(size, size)
    if not spec.buckets:
        raise ValueError("input.mode 'pad' needs input.buckets")
    largest = spec.buckets[-1]
    scale = min(1.0, largest / height, largest / width)
    content = (
        (height, width)
        if scale == 1.0
        else (
            max(1, min(largest, round(height * scale))),
            max(1, min(largest, round(width * scale))),
        )
    )
    return Layout(content, (_bucket(content[0], spec.buckets), _bucket(content[1], spec.buckets)))


def _bucket(side: int, buckets: tuple[int, ...]) -> int:
    return next(b for b in buckets if b >= side)


def preprocess(image: np.ndarray, spec: InputSpec) -> np.ndarray:
    """RGB uint8 HxWx3 -> float32 3xHxW laid out as ``layout`` says.

    Resized with ``cv2.INTER_LINEAR`` when the content size differs from the image's,
    padded by repeating the edge pixels (as the exported segmenters pad inside the
    graph) when the tensor is larger, then scaled to [0, 1] and ``(x - mean) / std``
    per channel. resize_crop mode: ``resample.resize_crop`` (antialiased, float).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"preprocess expects RGB uint8 HxWx3, got {image.dtype} {image.shape}")
    plan = layout(image.shape[0], image.shape[1], spec)
    (ch, cw), (th, tw) = plan.content, plan.tensor
    if spec.mode == "resize_crop":
        assert spec.resize_size is not None  # set by InputSpec
        image = resize_crop(image, spec.resize_size, (ch, cw))
    elif image.shape[:2] != (ch, cw):
        image = cv2.resize(image, (cw, ch), interpolation=cv2.INTER_LINEAR)
    if (th, tw) != (ch, cw):
        image = cv2.copyMakeBorder(image, 0, th - ch, 0, tw - cw, cv2.BORDER_REPLICATE)
    scale, offset = _affine(spec.mean, spec.std)
    # (x / 255 - mean) / std as one multiply-add straight into a CHW float32 array:
    # ~9x faster than the three-step formula with its temporaries and transposed copy.
    x = np.empty((3, *image.shape[:2]), np.float32)
    np.multiply(image.transpose(2, 0, 1), scale, out=x)
    x += offset
    return x


@functools.lru_cache(maxsize=64)
def _affine(
    mean: tuple[float, float, float], std: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``scale`` = 1 / (255 std), ``offset`` = -mean / std, shaped [3, 1, 1]."""
    m = np.asarray(mean, np.float64)
    s = np.asarray(std, np.float64)
    scale = (1.0 / (255.0 * s)).astype(np.float32).reshape(3, 1, 1)
    offset = (-m / s).astype(np.float32).reshape(3, 1, 1)
    return scale, offset


def stack(tensors: list[np.ndarray]) -> np.ndarray:
    """Equal-shaped CHW tensors -> one NCHW batch."""
    if not tensors:
        raise ValueError("stack needs at least one tensor")
    shapes = {t.shape for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"cannot stack tensors of different shapes {sorted(shapes)}")
    return np.ascontiguousarray(np.stack(tensors, axis=0))


def preprocess_batch(images: list[np.ndarray], spec: InputSpec) -> np.ndarray:
    """Many RGB images -> one NCHW float32 batch (they must share a tensor layout)."""
    return stack([preprocess(image, spec) for image in images])

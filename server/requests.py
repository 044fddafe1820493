"""Protocol-neutral requests and results: what ``ServedModel`` takes and gives back.

The servicers (``visionserve.v1``, KServe v2) and the offline in-process path translate
their own messages into these and back; nothing here knows gRPC or protobuf.
``decode_image``/``decode_truth`` are the one home of the input checks every entry
point shares (pixel limit, sizes, ``ignore_index`` range).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from visionserve.server import codec
from visionserve.server.errors import InvalidArgument
from visionserve.server.iou import IoUResult
from visionserve.server.tiling import Serving

MASK_FORMATS = ("png", "raw")


@dataclass(frozen=True)
class RequestLimits:
    """Per-server request policy every model applies (``ServerSettings.request_limits``)."""

    max_decoded_pixels: int = 40_000_000
    default_top_k: int = 5


@dataclass(frozen=True)
class ImageData:
    """An image as sent: encoded bytes (PNG, JPEG, ...), or raw uint8 HWC when ``raw``
    (then ``height``, ``width`` and ``channels`` give its size)."""

    data: bytes
    raw: bool = False
    height: int = 0
    width: int = 0
    channels: int = 0


@dataclass(frozen=True)
class MaskData:
    """A ground-truth class-index mask: PNG bytes, or raw uint8 HxW when ``raw``
    (``height``/``width`` 0: the image's size)."""

    data: bytes
    raw: bool = False
    height: int = 0
    width: int = 0


@dataclass(frozen=True)
class SegmentInput:
    """One segmentation request. ``ignore_index`` None: the model's."""

    image: ImageData
    truth: MaskData | None = None
    ignore_index: int | None = None
    mask_format: str = "png"

    def __post_init__(self) -> None:
        if self.mask_format not in MASK_FORMATS:
            raise InvalidArgument(
                f"mask format {self.mask_format!r} is unknown: expected one of {MASK_FORMATS}"
            )
        if self.ignore_index is not None and not 0 <= self.ignore_index <= 255:
            raise InvalidArgument(
                f"ignore_index is {self.ignore_index}: expected 0..255 (masks are uint8)"
            )


@dataclass(frozen=True)
class ClassifyInput:
    """One classification request. ``top_k`` 0: the server's default."""

    image: ImageData
    top_k: int = 0


@dataclass(frozen=True)
class SegmentResult:
    """A mask at the image's height x width, encoded as asked; IoU when truth was given."""

    mask: np.ndarray  # uint8 HxW
    encoded: bytes
    mask_format: str
    iou: IoUResult | None
    ignore_index: int
    serving: Serving | None = None  # how the image was served (bucket, tiles, scaled)


@dataclass(frozen=True)
class ClassifyResult:
    """Class probabilities and the best ``k`` as (index, label, score), best first."""

    probabilities: np.ndarray  # float32 [num_classes]
    top: list[tuple[int, str, float]]


def decode_image(image: ImageData, max_pixels: int) -> np.ndarray:
    """An ``ImageData`` -> RGB uint8 HxWx3 (``InvalidArgument``/``ResourceExhausted``)."""
    if image.raw:
        return codec.decode_raw_image(
            image.data, image.height, image.width, image.channels, max_pixels
        )
    if not image.data:
        raise InvalidArgument(
            "image is empty: expected encoded bytes (PNG, JPEG, ...) or raw uint8 HWC"
        )
    return codec.decode_image(image.data, max_pixels)


def decode_truth(mask: MaskData, image_hw: tuple[int, int], max_pixels: int) -> np.ndarray:
    """A ``MaskData`` -> uint8 HxW, checked to be the image's size."""
    if mask.raw:
        height, width = (mask.height, mask.width) if mask.height or mask.width else image_hw
        truth = codec.decode_raw_mask(mask.data, height, width, max_pixels)
    else:
        truth = codec.decode_mask(mask.data, max_pixels)
    if truth.shape != tuple(image_hw):
        raise InvalidArgument(
            f"ground truth is {truth.shape[0]}x{truth.shape[1]} (HxW) but the image is "
            f"{image_hw[0]}x{image_hw[1]}: expected a mask of the image's size"
        )
    return truth


def encode_mask(mask: np.ndarray, mask_format: str) -> bytes:
    """uint8 HxW -> PNG or raw bytes."""
    return codec.encode_mask_raw(mask) if mask_format == "raw" else codec.encode_mask_png(mask)

"""Typed results, converted from the wire messages."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from visionserve.clients._errors import VisionServeError
from visionserve.protos import visionserve_pb2 as pb


@dataclass(frozen=True)
class ClassScore:
    index: int
    label: str
    score: float


@dataclass(frozen=True)
class ClassifyResult:
    model: str
    version: str
    top: tuple[ClassScore, ...]

    @property
    def label(self) -> str:
        return self.top[0].label


@dataclass(frozen=True)
class ClassIoU:
    index: int
    label: str
    intersection: int
    union: int
    iou: float  # NaN when the class is in neither prediction nor truth

    @property
    def present(self) -> bool:
        return self.union > 0


@dataclass(frozen=True)
class IoUResult:
    classes: tuple[ClassIoU, ...]
    mean_iou: float
    pixel_accuracy: float
    scored_pixels: int
    ignore_index: int


@dataclass(frozen=True)
class Serving:
    """How the server served an image: ``mode`` "bucket" (padded to ``bucket``), "tiled"
    (``tiles`` tiles of ``bucket``, overlapping by 2 * ``tile_margin``), "scaled" (by
    ``scale`` < 1: only when the model's policy scales), "resized" (a fixed-size model)."""

    mode: str
    image_size: tuple[int, int]  # height, width
    bucket: tuple[int, int]
    tiles: int
    tile_margin: int
    scale: float
    description: str

    @property
    def scaled(self) -> bool:
        """Whether the model ran on a scaled-down copy (the mask was scaled back up)."""
        return self.mode == "scaled" or (self.mode == "resized" and self.scale < 1.0)


@dataclass(frozen=True)
class SegmentResult:
    model: str
    version: str
    request_id: str
    mask: np.ndarray  # uint8 HxW class indices at the input image's size
    iou: IoUResult | None
    serving: Serving | None = None  # None from servers older than the field


def decode_mask(mask: pb.Mask) -> np.ndarray:
    if mask.format == pb.MASK_FORMAT_RAW:
        return np.frombuffer(mask.data, dtype=np.uint8).reshape(mask.height, mask.width).copy()
    decoded = cv2.imdecode(np.frombuffer(mask.data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None or decoded.ndim != 2:
        raise ValueError("the server returned a mask that is not a single-channel PNG")
    return decoded


def classify_result(msg: pb.ClassifyResponse) -> ClassifyResult:
    top = tuple(ClassScore(s.index, s.label, float(s.score)) for s in msg.top)
    return ClassifyResult(msg.model, msg.version, top)


def iou_result(msg: pb.IoUReport) -> IoUResult:
    classes = tuple(
        ClassIoU(
            c.index, c.label, int(c.intersection), int(c.union), c.iou if c.present else math.nan
        )
        for c in msg.classes
    )
    return IoUResult(
        classes, msg.mean_iou, msg.pixel_accuracy, int(msg.scored_pixels), msg.ignore_index
    )


def serving_of(msg: pb.Serving) -> Serving:
    return Serving(
        msg.mode,
        (msg.image_height, msg.image_width),
        (msg.bucket_height, msg.bucket_width),
        msg.tiles,
        msg.tile_margin,
        msg.scale,
        msg.description,
    )


def segment_result(msg: pb.SegmentResponse) -> SegmentResult:
    iou = iou_result(msg.iou) if msg.HasField("iou") else None
    serving = serving_of(msg.serving) if msg.HasField("serving") else None
    return SegmentResult(msg.model, msg.version, msg.request_id, decode_mask(msg.mask), iou, serving)


def stream_item(msg: pb.SegmentResponse) -> SegmentResult | VisionServeError:
    """A response as a result, or as the error it carries in-band (SegmentStream)."""
    if msg.error_code:
        error = VisionServeError.from_status(msg.error_code, msg.error_message)
        error.request_id = msg.request_id
        return error
    return segment_result(msg)

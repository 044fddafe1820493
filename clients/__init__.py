"""Python client for visionserve: ``from visionserve.clients import VisionClient``.

``VisionClient`` (blocking) and ``AsyncVisionClient`` (asyncio, grpc.aio) share one
surface: classify, segment, segment_stream, list_models, get_model, wait_ready. Every
failure raises :class:`VisionServeError` carrying the gRPC status code.
"""

from visionserve.clients._aio import AsyncVisionClient
from visionserve.clients._channel import ChannelConfig
from visionserve.clients._client import VisionClient
from visionserve.clients._dataset_iou import DatasetIoU, confusion_matrix, iou_from_confusion
from visionserve.clients._errors import RetryPolicy, VisionServeError
from visionserve.clients._messages import (
    classify_request,
    image_message,
    mask_message,
    segment_request,
)
from visionserve.clients._types import (
    ClassifyResult,
    ClassIoU,
    ClassScore,
    IoUResult,
    SegmentResult,
    Serving,
)

__all__ = [
    "AsyncVisionClient",
    "ChannelConfig",
    "ClassIoU",
    "ClassScore",
    "ClassifyResult",
    "DatasetIoU",
    "IoUResult",
    "RetryPolicy",
    "SegmentResult",
    "Serving",
    "VisionClient",
    "VisionServeError",
    "classify_request",
    "confusion_matrix",
    "image_message",
    "iou_from_confusion",
    "mask_message",
    "segment_request",
]

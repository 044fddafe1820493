"""Python client for visionserve: ``from visionserve.clients import VisionClient``."""

from visionserve.clients._client import VisionClient, image_message, mask_message
from visionserve.clients._dataset_iou import DatasetIoU
from visionserve.clients._errors import VisionServeError
from visionserve.clients._types import ClassifyResult, ClassIoU, ClassScore, IoUResult, SegmentResult

__all__ = [
    "ClassIoU",
    "ClassScore",
    "ClassifyResult",
    "DatasetIoU",
    "IoUResult",
    "SegmentResult",
    "VisionClient",
    "VisionServeError",
    "image_message",
    "mask_message",
]

"""Synchronous Python client for the visionserve.v1 API."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from visionserve.clients._errors import VisionServeError
from visionserve.clients._types import ClassifyResult, SegmentResult, classify_result, segment_result
from visionserve.protos import visionserve_pb2 as pb
from visionserve.protos import visionserve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

ImageInput = str | Path | bytes | np.ndarray
T = TypeVar("T")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def image_message(image: ImageInput) -> pb.Image:
    """A path or encoded bytes travel as they are; an array travels raw (uint8 HWC, RGB)."""
    if isinstance(image, (str, Path)):
        return pb.Image(encoded=Path(image).read_bytes())
    if isinstance(image, bytes):
        return pb.Image(encoded=image)
    array = np.ascontiguousarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"image arrays must be uint8 HxW or HxWxC, got {array.dtype} {array.shape}")
    channels = 1 if array.ndim == 2 else array.shape[2]
    raw = pb.RawImage(data=array.tobytes(), height=array.shape[0], width=array.shape[1], channels=channels)
    return pb.Image(raw=raw)


def mask_message(mask: str | Path | bytes | np.ndarray) -> pb.Mask:
    """Ground truth: a PNG file or bytes, or a uint8 HxW array of class indices."""
    if isinstance(mask, (str, Path)):
        mask = Path(mask).read_bytes()
    if isinstance(mask, bytes):
        if not mask.startswith(PNG_SIGNATURE):
            raise ValueError("ground-truth masks must be PNG files (8-bit, one channel) or uint8 arrays")
        return pb.Mask(data=mask, format=pb.MASK_FORMAT_PNG)
    array = np.ascontiguousarray(mask)
    if array.dtype != np.uint8 or array.ndim != 2:
        raise ValueError(f"ground-truth arrays must be uint8 HxW, got {array.dtype} {array.shape}")
    h, w = array.shape
    return pb.Mask(data=array.tobytes(), height=h, width=w, format=pb.MASK_FORMAT_RAW)


class VisionClient:
    """``with VisionClient("localhost:8001") as client: client.segment("a.png", model="unet")``.

    Every failed call raises :class:`VisionServeError` with the status code. Calls
    answered UNAVAILABLE (server starting, restarting or draining) are retried
    ``retries`` times with exponential backoff; nothing else is retried.
    """

    def __init__(self, target: str, *, timeout: float = 30.0, retries: int = 3,
                 max_message_mb: int = 64) -> None:
        size = max_message_mb * 1024 * 1024
        options = [("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size)]
        self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.VisionServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.timeout = timeout
        self.retries = retries

    def __enter__(self) -> VisionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, fn: Callable[..., T], request: object, timeout: float | None) -> T:
        delay = 0.1
        for attempt in range(self.retries + 1):
            try:
                return fn(request, timeout=timeout or self.timeout)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retries:
                    raise VisionServeError.from_rpc_error(error) from error
                log.debug("UNAVAILABLE, retrying in %.1fs: %s", delay, error.details())
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the server's health service says SERVING (or raise TimeoutError)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not SERVING after {timeout:.0f}s")
            time.sleep(0.2)

    def classify(self, image: ImageInput, *, model: str, version: str = "", top_k: int = 0,
                 timeout: float | None = None) -> ClassifyResult:
        request = pb.ClassifyRequest(model=model, version=version, image=image_message(image), top_k=top_k)
        return classify_result(self._call(self._stub.Classify, request, timeout))

    def segment(self, image: ImageInput, *, model: str, version: str = "",
                ground_truth: str | Path | bytes | np.ndarray | None = None,
                ignore_index: int | None = None, request_id: str = "",
                timeout: float | None = None) -> SegmentResult:
        request = pb.SegmentRequest(model=model, version=version, image=image_message(image),
                                    mask_format=pb.MASK_FORMAT_PNG, request_id=request_id)
        if ground_truth is not None:
            request.ground_truth.CopyFrom(mask_message(ground_truth))
        if ignore_index is not None:
            request.ignore_index = ignore_index
        return segment_result(self._call(self._stub.Segment, request, timeout))

    def list_models(self, timeout: float | None = None) -> list[pb.ModelInfo]:
        return list(self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout).models)

    def get_model(self, model: str, version: str = "", timeout: float | None = None) -> pb.ModelInfo:
        return self._call(self._stub.GetModel, pb.GetModelRequest(model=model, version=version), timeout)

"""Synchronous Python client for the visionserve.v1 API."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2

from visionserve.clients._channel import ClientBase
from visionserve.clients._errors import VisionServeError, call_with_retry, translate
from visionserve.clients._messages import ImageInput, MaskInput, classify_request, segment_request
from visionserve.clients._types import ClassifyResult, SegmentResult, classify_result, stream_item
from visionserve.protos import visionserve_pb2 as pb

log = logging.getLogger(__name__)

T = TypeVar("T")


class VisionClient(ClientBase):
    """``with VisionClient("localhost:8001") as client: client.segment("a.png", model="unet")``.

    Every failed call raises :class:`VisionServeError` with the status code. Unary calls
    answered UNAVAILABLE (server starting, restarting or draining) are retried
    ``retries`` times with exponential backoff; nothing else is retried. ``timeout`` is
    the default per-call deadline in seconds; each method takes its own ``timeout`` too.
    TLS, mutual TLS and the bearer token: see :class:`ChannelConfig`.
    """

    def __enter__(self) -> VisionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, fn: Callable[..., T], request: object, timeout: float | None) -> T:
        deadline = timeout or self.timeout
        return call_with_retry(
            lambda: fn(request, timeout=deadline, metadata=self.metadata),
            self.retry_policy,
            what=type(request).__name__,
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the server's health service says SERVING (or raise TimeoutError)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = self._health.Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=1.0, metadata=self.metadata
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as error:
                log.debug("not ready yet: %s", translate(error))
            if time.monotonic() > deadline:
                raise TimeoutError(f"server {self.config.target} not SERVING after {timeout:.0f}s")
            time.sleep(0.2)

    def classify(
        self,
        image: ImageInput,
        *,
        model: str,
        version: str = "",
        top_k: int = 0,
        timeout: float | None = None,
    ) -> ClassifyResult:
        """Top-k labels of one image (path, encoded bytes, or uint8 RGB array)."""
        request = classify_request(image, model=model, version=version, top_k=top_k)
        return classify_result(self._call(self.stub.Classify, request, timeout))

    def segment(
        self,
        image: ImageInput,
        *,
        model: str,
        version: str = "",
        ground_truth: MaskInput | None = None,
        ignore_index: int | None = None,
        request_id: str = "",
        timeout: float | None = None,
    ) -> SegmentResult:
        """The mask of one image at its original size, and IoU when ``ground_truth`` is given."""
        request = segment_request(
            image,
            model=model,
            version=version,
            ground_truth=ground_truth,
            ignore_index=ignore_index,
            request_id=request_id,
        )
        result = stream_item(self._call(self.stub.Segment, request, timeout))
        if isinstance(result, VisionServeError):
            raise result
        return result

    def segment_stream(
        self, requests: Iterable[pb.SegmentRequest], *, timeout: float | None = None
    ) -> Iterator[SegmentResult | VisionServeError]:
        """Many segment requests over one SegmentStream (build them with ``segment_request``).

        Yields one item per request, in order: a SegmentResult, or the VisionServeError
        that request failed with (the stream goes on). A failure of the stream itself
        raises VisionServeError; streams are not retried (the requests are not replayed).
        ``timeout`` bounds the whole stream (default: none).
        """
        responses = self.stub.SegmentStream(
            iter(requests), timeout=timeout, metadata=self.metadata
        )
        try:
            for response in responses:
                yield stream_item(response)
        except grpc.RpcError as error:
            raise translate(error) from error

    def list_models(self, timeout: float | None = None) -> list[pb.ModelInfo]:
        return list(self._call(self.stub.ListModels, pb.ListModelsRequest(), timeout).models)

    def get_model(
        self, model: str, version: str = "", timeout: float | None = None
    ) -> pb.ModelInfo:
        return self._call(
            self.stub.GetModel, pb.GetModelRequest(model=model, version=version), timeout
        )

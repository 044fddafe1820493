"""asyncio client (grpc.aio) for the visionserve.v1 API: same surface as VisionClient."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2

from visionserve.clients._channel import ClientBase
from visionserve.clients._errors import VisionServeError, acall_with_retry, translate
from visionserve.clients._messages import ImageInput, MaskInput, classify_request, segment_request
from visionserve.clients._types import ClassifyResult, SegmentResult, classify_result, stream_item
from visionserve.protos import visionserve_pb2 as pb

log = logging.getLogger(__name__)


class AsyncVisionClient(ClientBase):
    """``async with AsyncVisionClient("localhost:8001") as client: await client.segment(...)``.

    Create it inside a running event loop. Errors, retries (UNAVAILABLE only),
    deadlines, TLS and token: as :class:`VisionClient`.
    """

    _asyncio = True

    async def __aenter__(self) -> AsyncVisionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, fn: Callable[..., Any], request: object, timeout: float | None) -> Any:
        deadline = timeout or self.timeout
        return await acall_with_retry(
            lambda: fn(request, timeout=deadline, metadata=self.metadata),
            self.retry_policy,
            what=type(request).__name__,
        )

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the server's health service says SERVING (or raise TimeoutError)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = await self._health.Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=1.0, metadata=self.metadata
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as error:
                log.debug("not ready yet: %s", translate(error))
            if time.monotonic() > deadline:
                raise TimeoutError(f"server {self.config.target} not SERVING after {timeout:.0f}s")
            await asyncio.sleep(0.2)

    async def classify(
        self,
        image: ImageInput,
        *,
        model: str,
        version: str = "",
        top_k: int = 0,
        timeout: float | None = None,
    ) -> ClassifyResult:
        """Top-k labels of one image."""
        request = classify_request(image, model=model, version=version, top_k=top_k)
        return classify_result(await self._call(self.stub.Classify, request, timeout))

    async def segment(
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
        result = stream_item(await self._call(self.stub.Segment, request, timeout))
        if isinstance(result, VisionServeError):
            raise result
        return result

    def open_segment_stream(self, timeout: float | None = None) -> grpc.aio.StreamStreamCall:
        """A raw SegmentStream call (``await call.write(req)``, ``await call.read()``) for
        batch pipelines that manage their own flow control; errors are grpc.RpcError."""
        return self.stub.SegmentStream(timeout=timeout, metadata=self.metadata)

    def open_segment_batches(self, timeout: float | None = None) -> grpc.aio.StreamStreamCall:
        """A raw SegmentBatches call: writes ``pb.SegmentBatch`` (several requests per
        message), reads ``pb.SegmentBatchResult``; otherwise as ``open_segment_stream``."""
        return self.stub.SegmentBatches(timeout=timeout, metadata=self.metadata)

    async def segment_stream(
        self,
        requests: AsyncIterable[pb.SegmentRequest] | Iterable[pb.SegmentRequest],
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[SegmentResult | VisionServeError]:
        """Many requests over one SegmentStream; yields a SegmentResult or the in-band
        VisionServeError per request, in order. A failed stream raises VisionServeError."""
        call = self.stub.SegmentStream(requests, timeout=timeout, metadata=self.metadata)
        try:
            async for response in call:
                yield stream_item(response)
        except grpc.RpcError as error:
            raise translate(error) from error

    async def list_models(self, timeout: float | None = None) -> list[pb.ModelInfo]:
        return list(
            (await self._call(self.stub.ListModels, pb.ListModelsRequest(), timeout)).models
        )

    async def get_model(
        self, model: str, version: str = "", timeout: float | None = None
    ) -> pb.ModelInfo:
        request = pb.GetModelRequest(model=model, version=version)
        return await self._call(self.stub.GetModel, request, timeout)

"""``visionserve.v1.VisionService``: decode -> validate -> infer -> encode.

Every failure becomes one status code with a message naming what was wrong and what
was expected; ``SegmentStream`` answers a failed item with ``error_code`` /
``error_message`` and carries on with the next.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from typing import TypeVar

import grpc
import numpy as np
from visionserve.protos import visionserve_pb2 as pb
from visionserve.protos import visionserve_pb2_grpc as pb_grpc
from visionserve.server import codec
from visionserve.server.errors import InvalidArgument, VisionServeError
from visionserve.server.iou import compute_iou
from visionserve.server.postprocess import top_k
from visionserve.server.registry import ModelRegistry
from visionserve.server.served_model import ServedModel, wait_for
from visionserve.server.settings import ServerSettings
from visionserve.server.stream import Pipeline

log = logging.getLogger(__name__)

# "visionserve.v1.VisionService"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VisionService"].full_name

NO_DEADLINE_S = 10 * 365 * 24 * 3600.0
STREAM_WINDOW = 32  # SegmentStream requests in flight per stream
MAX_BATCH_REQUESTS = 64  # requests per SegmentBatches message


@dataclass(frozen=True)
class _SegmentJob:
    """A Segment request submitted to its model's batcher, waiting for the mask."""

    model: ServedModel
    request: pb.SegmentRequest
    image: np.ndarray
    truth: np.ndarray | None
    ignore_index: int
    future: Future


@dataclass(frozen=True)
class _StreamItem:
    """One SegmentStream request: begun (``job``, holding its model) or failed (``error``)."""

    request: pb.SegmentRequest
    job: _SegmentJob | None = None
    error: Exception | None = None


def _stream_discard(item: _StreamItem) -> None:
    if item.job is not None:
        item.job.future.cancel()
        item.job.model.exit()


def _batch_discard(items: list[_StreamItem]) -> None:
    for item in items:
        _stream_discard(item)


Request = TypeVar("Request")
Response = TypeVar("Response")


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The status code an exception maps to (INTERNAL for anything unexpected)."""
    return (
        grpc.StatusCode[exc.status]
        if isinstance(exc, VisionServeError)
        else grpc.StatusCode.INTERNAL
    )


def message_of(exc: BaseException, rpc: str) -> str:
    """The client-facing message; unexpected errors are logged with their traceback."""
    if isinstance(exc, VisionServeError) and exc.status != "INTERNAL":
        return str(exc)
    log.error("%s failed", rpc, exc_info=exc)
    if isinstance(exc, VisionServeError):
        return str(exc)
    return f"internal error in {rpc}: {type(exc).__name__}: {exc} (see the server log)"


class VisionServicer(pb_grpc.VisionServiceServicer):
    """Thin servicer over a ``ModelRegistry``."""

    def __init__(self, registry: ModelRegistry, settings: ServerSettings) -> None:
        self._registry = registry
        self._settings = settings

    # -- RPCs ---------------------------------------------------------------
    def Classify(
        self, request: pb.ClassifyRequest, context: grpc.ServicerContext
    ) -> pb.ClassifyResponse:
        return unary(self._classify, request, context, "Classify")

    def Segment(
        self, request: pb.SegmentRequest, context: grpc.ServicerContext
    ) -> pb.SegmentResponse:
        return unary(self._segment, request, context, "Segment")

    def SegmentStream(
        self, request_iterator: Iterator[pb.SegmentRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.SegmentResponse]:
        """Up to ``STREAM_WINDOW`` requests in flight; answers in request order; a failed
        request is answered in-band (``error_code``) and the stream goes on."""
        deadline = deadline_of(context)
        pipeline = Pipeline(
            lambda request: self._stream_begin(request, deadline),
            lambda item: self._stream_end(item, deadline),
            _stream_discard,
            STREAM_WINDOW,
        )
        return pipeline.run(request_iterator)

    def SegmentBatches(
        self, request_iterator: Iterator[pb.SegmentBatch], context: grpc.ServicerContext
    ) -> Iterator[pb.SegmentBatchResult]:
        """SegmentStream with up to ``MAX_BATCH_REQUESTS`` requests per message; the window
        counts requests. Each answer message answers one message, in order."""
        deadline = deadline_of(context)
        pipeline = Pipeline(
            lambda message: self._batch_begin(message, deadline),
            lambda items: self._batch_end(items, deadline),
            _batch_discard,
            STREAM_WINDOW,
            weight=lambda message: len(message.requests),
        )
        return pipeline.run(request_iterator)

    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        return unary(self._list_models, request, context, "ListModels")

    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        return unary(
            lambda r, c: self._model_info(self._registry.get(r.model, r.version)),
            request,
            context,
            "GetModel",
        )

    # -- implementation -----------------------------------------------------
    def _classify(
        self, request: pb.ClassifyRequest, context: grpc.ServicerContext
    ) -> pb.ClassifyResponse:
        with self._registry.use(request.model, request.version) as model:
            model.require_task("classification", "Classify")
            image = self._decode_image(request.image)
            probabilities = model.classify([image], deadline_of(context))[0]
        k = min(request.top_k or self._settings.default_top_k, model.config.num_classes)
        labels = model.config.labels
        return pb.ClassifyResponse(
            model=model.name,
            version=str(model.version),
            request_id=request.request_id,
            top=[
                pb.ClassScore(index=i, label=labels[i], score=s) for i, s in top_k(probabilities, k)
            ],
        )

    def _segment(
        self, request: pb.SegmentRequest, context: grpc.ServicerContext
    ) -> pb.SegmentResponse:
        deadline = deadline_of(context)
        with self._registry.use(request.model, request.version) as model:
            job = self._begin_segment(model, request, deadline, inline=True)
            return self._end_segment(job, deadline)

    def _stream_begin(self, request: pb.SegmentRequest, deadline: float | None) -> _StreamItem:
        try:
            model = self._registry.acquire(request.model, request.version)
        except Exception as exc:  # noqa: BLE001 - answered in-band
            return _StreamItem(request, error=exc)
        try:
            return _StreamItem(request, job=self._begin_segment(model, request, deadline))
        except Exception as exc:  # noqa: BLE001 - answered in-band
            model.exit()
            return _StreamItem(request, error=exc)

    def _batch_begin(self, message: pb.SegmentBatch, deadline: float | None) -> list[_StreamItem]:
        count = len(message.requests)
        if count > MAX_BATCH_REQUESTS:
            error = InvalidArgument(
                f"a SegmentBatch message carries {count} requests: expected at most "
                f"{MAX_BATCH_REQUESTS} (split it into several messages)"
            )
            return [_StreamItem(request, error=error) for request in message.requests]
        return [self._stream_begin(request, deadline) for request in message.requests]

    def _batch_end(self, items: list[_StreamItem], deadline: float | None) -> pb.SegmentBatchResult:
        # One wake-up when the message's last mask is ready, not one per mask.
        futures = [item.job.future for item in items if item.job is not None]
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        futures_wait(futures, timeout)
        return pb.SegmentBatchResult(responses=[self._stream_end(item, deadline) for item in items])

    def _stream_end(self, item: _StreamItem, deadline: float | None) -> pb.SegmentResponse:
        error = item.error
        if item.job is not None:
            try:
                return self._end_segment(item.job, deadline)
            except Exception as exc:  # noqa: BLE001 - answered in-band
                error = exc
            finally:
                item.job.model.exit()
        request = item.request
        return pb.SegmentResponse(
            model=request.model,
            version=request.version,
            request_id=request.request_id,
            error_code=status_of(error).value[0],
            error_message=message_of(error, "SegmentStream"),
        )

    def _begin_segment(
        self,
        model: ServedModel,
        request: pb.SegmentRequest,
        deadline: float | None,
        inline: bool = False,
    ) -> _SegmentJob:
        """Validate, decode, and submit to the batcher (does not wait, unless ``inline``
        lets an idle model run it in this thread: ``Batcher.submit``)."""
        model.require_task("segmentation", "Segment")
        if request.mask_format not in pb.MaskFormat.values():
            raise InvalidArgument(
                f"mask_format {request.mask_format} is unknown: expected one of {dict(pb.MaskFormat.items())}"
            )
        image = self._decode_image(request.image)
        truth, ignore_index = None, model.config.ignore_index
        if request.HasField("ground_truth"):
            if request.HasField("ignore_index"):
                ignore_index = request.ignore_index
                if ignore_index > 255:
                    raise InvalidArgument(
                        f"ignore_index is {ignore_index}: expected 0..255 (masks are uint8)"
                    )
            truth = self._decode_truth(request.ground_truth, image.shape[:2])
        future = model.submit(model.prepare(image), deadline, inline=inline)
        return _SegmentJob(model, request, image, truth, ignore_index, future)

    def _end_segment(self, job: _SegmentJob, deadline: float | None) -> pb.SegmentResponse:
        """Wait for the batch, bring the mask to the image's size, encode, score IoU."""
        model, request = job.model, job.request
        mask = model.finish_mask(wait_for(job.future, deadline), job.image)
        response = pb.SegmentResponse(
            model=model.name,
            version=str(model.version),
            request_id=request.request_id,
            mask=_encode_mask(mask, request.mask_format),
        )
        if job.truth is not None:
            response.iou.CopyFrom(_iou_report(mask, job.truth, model, job.ignore_index))
        return response

    def _list_models(self, request: pb.ListModelsRequest, context: object) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[self._model_info(self._registry.get(n)) for n in self._registry.names()]
        )

    def _model_info(self, model: ServedModel) -> pb.ModelInfo:
        config = model.config
        return pb.ModelInfo(
            name=model.name,
            version=str(model.version),
            versions=[str(v) for v in self._registry.versions(model.name)],
            task=config.task,
            labels=list(config.labels),
            input_height=config.input.height,
            input_width=config.input.width,
            backend=model.backend.name,
            ignore_index=config.ignore_index,
            max_batch_size=config.max_batch_size,
            input_mode=config.input.mode,
            buckets=list(config.input.buckets),
        )

    def _decode_image(self, image: pb.Image) -> np.ndarray:
        limit = self._settings.max_decoded_pixels
        kind = image.WhichOneof("data")
        if kind == "encoded":
            return codec.decode_image(image.encoded, limit)
        if kind == "raw":
            raw = image.raw
            return codec.decode_raw_image(raw.data, raw.height, raw.width, raw.channels, limit)
        raise InvalidArgument(
            "image is empty: expected image.encoded (PNG, JPEG, ...) or image.raw (uint8 HWC)"
        )

    def _decode_truth(self, mask: pb.Mask, image_hw: tuple[int, int]) -> np.ndarray:
        limit = self._settings.max_decoded_pixels
        if mask.format == pb.MASK_FORMAT_RAW:
            # height/width left at 0: the image's size.
            height, width = (mask.height, mask.width) if mask.height or mask.width else image_hw
            truth = codec.decode_raw_mask(mask.data, height, width, limit)
        elif mask.format == pb.MASK_FORMAT_PNG:
            truth = codec.decode_mask(mask.data, limit)
        else:
            raise InvalidArgument(
                f"ground_truth.format {mask.format} is unknown: expected PNG (0) or RAW (1)"
            )
        if truth.shape != tuple(image_hw):
            raise InvalidArgument(
                f"ground truth is {truth.shape[0]}x{truth.shape[1]} (HxW) but the image is "
                f"{image_hw[0]}x{image_hw[1]}: expected a mask of the image's size"
            )
        return truth


def deadline_of(context: grpc.ServicerContext) -> float | None:
    """The RPC's deadline on the ``time.monotonic()`` clock (None: the client set none)."""
    remaining = context.time_remaining()
    if remaining is None or remaining > NO_DEADLINE_S:  # gRPC reports "none" as ~infinite
        return None
    return time.monotonic() + remaining


def unary(
    handler: Callable[[Request, grpc.ServicerContext], Response],
    request: Request,
    context: grpc.ServicerContext,
    rpc: str,
) -> Response:
    """Run ``handler(request, context)``; turn any exception into ``context.abort``."""
    try:
        return handler(request, context)
    except Exception as exc:
        context.abort(status_of(exc), message_of(exc, rpc))
        raise  # unreachable: abort raises


def _encode_mask(mask: np.ndarray, mask_format: int) -> pb.Mask:
    if mask_format == pb.MASK_FORMAT_RAW:
        data = codec.encode_mask_raw(mask)
    else:
        data = codec.encode_mask_png(mask)
    return pb.Mask(data=data, height=mask.shape[0], width=mask.shape[1], format=mask_format)


def _iou_report(
    mask: np.ndarray, truth: np.ndarray, model: ServedModel, ignore_index: int
) -> pb.IoUReport:
    result = compute_iou(mask, truth, model.config.num_classes, ignore_index)
    report = pb.IoUReport(
        mean_iou=result.mean_iou,
        pixel_accuracy=result.pixel_accuracy,
        scored_pixels=result.scored_pixels,
        ignore_index=ignore_index,
    )
    for index, label in enumerate(model.config.labels):
        report.classes.add(
            index=index,
            label=label,
            intersection=int(result.intersection[index]),
            union=int(result.union[index]),
            iou=float(result.iou[index]),
            present=bool(result.union[index] > 0),
        )
    return report

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
from visionserve.protos import visionserve_pb2 as pb
from visionserve.protos import visionserve_pb2_grpc as pb_grpc
from visionserve.server.errors import InvalidArgument, VisionServeError
from visionserve.server.registry import ModelRegistry
from visionserve.server.requests import (
    ClassifyInput,
    ClassifyResult,
    ImageData,
    MaskData,
    SegmentInput,
    SegmentResult,
)
from visionserve.server.served_model import Job, ServedModel, wait_for
from visionserve.server.settings import ServerSettings
from visionserve.server.stream import Pipeline

log = logging.getLogger(__name__)

# "visionserve.v1.VisionService"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VisionService"].full_name

NO_DEADLINE_S = 10 * 365 * 24 * 3600.0
STREAM_WINDOW = 32  # SegmentStream requests in flight per stream
MAX_BATCH_REQUESTS = 64  # requests per SegmentBatches message


@dataclass(frozen=True)
class _StreamItem:
    """One SegmentStream request: begun (``job`` submitted, holding ``model``) or failed."""

    request: pb.SegmentRequest
    model: ServedModel | None = None
    job: Job | None = None
    future: Future | None = None
    error: Exception | None = None


def _stream_discard(item: _StreamItem) -> None:
    if item.model is not None:
        if item.future is not None:
            item.future.cancel()
        item.model.exit()


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
            result = model.run(classify_input(request), deadline_of(context))
        return classify_response(model, request, result)

    def _segment(
        self, request: pb.SegmentRequest, context: grpc.ServicerContext
    ) -> pb.SegmentResponse:
        with self._registry.use(request.model, request.version) as model:
            model.require_task("segmentation", "Segment")
            result = model.run(segment_input(request), deadline_of(context))
        return segment_response(model, request, result)

    def _stream_begin(self, request: pb.SegmentRequest, deadline: float | None) -> _StreamItem:
        try:
            model = self._registry.acquire(request.model, request.version)
        except Exception as exc:  # noqa: BLE001 - answered in-band
            return _StreamItem(request, error=exc)
        try:
            model.require_task("segmentation", "Segment")
            job = model.begin(segment_input(request))
            return _StreamItem(request, model, job, model.submit(job.tensor, deadline))
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
        futures = [item.future for item in items if item.future is not None]
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        futures_wait(futures, timeout)
        return pb.SegmentBatchResult(responses=[self._stream_end(item, deadline) for item in items])

    def _stream_end(self, item: _StreamItem, deadline: float | None) -> pb.SegmentResponse:
        error = item.error
        if item.model is not None and item.job is not None and item.future is not None:
            try:
                result = item.model.finish(item.job, wait_for(item.future, deadline))
                return segment_response(item.model, item.request, result)
            except Exception as exc:  # noqa: BLE001 - answered in-band
                error = exc
            finally:
                item.model.exit()
        return error_response(item.request, error, "SegmentStream")

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
            device=model.backend.device,
            precision=model.backend.precision,
            ignore_index=config.ignore_index,
            max_batch_size=config.max_batch_size,
            input_mode=config.input.mode,
            buckets=list(config.input.buckets),
        )


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


# -- translation: visionserve.v1 messages <-> requests.* ----------------------------------
def image_data(image: pb.Image) -> ImageData:
    """``pb.Image`` -> ``ImageData`` (``InvalidArgument`` when it holds no image)."""
    kind = image.WhichOneof("data")
    if kind == "encoded":
        return ImageData(image.encoded)
    if kind == "raw":
        raw = image.raw
        return ImageData(raw.data, True, raw.height, raw.width, raw.channels)
    raise InvalidArgument(
        "image is empty: expected image.encoded (PNG, JPEG, ...) or image.raw (uint8 HWC)"
    )


def segment_input(request: pb.SegmentRequest) -> SegmentInput:
    """``pb.SegmentRequest`` -> ``SegmentInput``, checking the protocol's enums."""
    if request.mask_format not in pb.MaskFormat.values():
        raise InvalidArgument(
            f"mask_format {request.mask_format} is unknown: expected one of {dict(pb.MaskFormat.items())}"
        )
    truth, ignore_index = None, None
    if request.HasField("ground_truth"):
        mask = request.ground_truth
        if mask.format not in (pb.MASK_FORMAT_PNG, pb.MASK_FORMAT_RAW):
            raise InvalidArgument(
                f"ground_truth.format {mask.format} is unknown: expected PNG (0) or RAW (1)"
            )
        truth = MaskData(mask.data, mask.format == pb.MASK_FORMAT_RAW, mask.height, mask.width)
        if request.HasField("ignore_index"):
            ignore_index = request.ignore_index
    mask_format = "raw" if request.mask_format == pb.MASK_FORMAT_RAW else "png"
    return SegmentInput(image_data(request.image), truth, ignore_index, mask_format)


def classify_input(request: pb.ClassifyRequest) -> ClassifyInput:
    return ClassifyInput(image_data(request.image), request.top_k)


def classify_response(
    model: ServedModel, request: pb.ClassifyRequest, result: ClassifyResult
) -> pb.ClassifyResponse:
    return pb.ClassifyResponse(
        model=model.name,
        version=str(model.version),
        request_id=request.request_id,
        top=[pb.ClassScore(index=i, label=label, score=s) for i, label, s in result.top],
    )


def segment_response(
    model: ServedModel, request: pb.SegmentRequest, result: SegmentResult
) -> pb.SegmentResponse:
    mask = result.mask
    response = pb.SegmentResponse(
        model=model.name,
        version=str(model.version),
        request_id=request.request_id,
        mask=pb.Mask(
            data=result.encoded,
            height=mask.shape[0],
            width=mask.shape[1],
            format=pb.MASK_FORMAT_RAW if result.mask_format == "raw" else pb.MASK_FORMAT_PNG,
        ),
    )
    if result.iou is not None:
        response.iou.CopyFrom(_iou_report(result, model.config.labels))
    return response


def error_response(request: pb.SegmentRequest, error: BaseException | None, rpc: str) -> pb.SegmentResponse:
    """A stream item's in-band failure: ``error_code`` + ``error_message``."""
    error = error if error is not None else RuntimeError("no answer")
    return pb.SegmentResponse(
        model=request.model,
        version=request.version,
        request_id=request.request_id,
        error_code=status_of(error).value[0],
        error_message=message_of(error, rpc),
    )


def _iou_report(result: SegmentResult, labels: tuple[str, ...] | list[str]) -> pb.IoUReport:
    iou = result.iou
    assert iou is not None
    report = pb.IoUReport(
        mean_iou=iou.mean_iou,
        pixel_accuracy=iou.pixel_accuracy,
        scored_pixels=iou.scored_pixels,
        ignore_index=result.ignore_index,
    )
    for index, label in enumerate(labels):
        report.classes.add(
            index=index,
            label=label,
            intersection=int(iou.intersection[index]),
            union=int(iou.union[index]),
            iou=float(iou.iou[index]),
            present=bool(iou.union[index] > 0),
        )
    return report

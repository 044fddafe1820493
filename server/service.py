"""``visionserve.v1.VisionService`` (grpc.aio): translate messages, ``ServedModel`` does the rest.

Every RPC is a coroutine on the server's event loop. A request is translated to a
``requests.SegmentInput``/``ClassifyInput``, run by its model (``ServedModel.serve``:
admission, decode/pre/post in the CPU pool, inference in the batcher's threads), and
the result translated back. Every failure becomes one status code with a message naming
what was wrong and what was expected; ``SegmentStream`` answers a failed item with
``error_code`` / ``error_message`` and carries on with the next, including an item whose
bytes do not parse and, while the server drains, every new item (UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TypeVar

import grpc
from visionserve.protos import visionserve_pb2 as pb
from visionserve.protos import visionserve_pb2_grpc as pb_grpc
from visionserve.server.errors import InvalidArgument, Unavailable, VisionServeError
from visionserve.server.interceptors import Malformed, set_error
from visionserve.server.model_config import InputSpec
from visionserve.server.registry import ModelRegistry
from visionserve.server.requests import (
    ClassifyInput,
    ClassifyResult,
    ImageData,
    MaskData,
    SegmentInput,
    SegmentResult,
)
from visionserve.server.served_model import ServedModel
from visionserve.server.settings import ServerSettings
from visionserve.server.stream import pipeline
from visionserve.server.tiling import Serving as ImageServing
from visionserve.server.tiling import tile_margin, tile_size

log = logging.getLogger(__name__)

# "visionserve.v1.VisionService"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VisionService"].full_name

NO_DEADLINE_S = 10 * 365 * 24 * 3600.0
STREAM_WINDOW = 32  # SegmentStream requests in flight per stream
MAX_BATCH_REQUESTS = 64  # requests per SegmentBatches message

Request = TypeVar("Request")
Response = TypeVar("Response")


@dataclass(frozen=True)
class Serving:
    """What every servicer shares: the models, the settings, the CPU pool for decode and
    pre/post-processing, and whether the server is draining."""

    registry: ModelRegistry
    settings: ServerSettings
    executor: Executor
    draining: Callable[[], bool]


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
    """Thin servicer: messages in and out; ``ServedModel`` owns the walk."""

    def __init__(self, serving: Serving) -> None:
        self._serving = serving
        self._registry = serving.registry

    # -- RPCs ---------------------------------------------------------------
    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        return await unary(self._classify, request, context, "Classify")

    async def Segment(
        self, request: pb.SegmentRequest, context: grpc.aio.ServicerContext
    ) -> pb.SegmentResponse:
        return await unary(self._segment, request, context, "Segment")

    async def SegmentStream(
        self, request_iterator: AsyncIterator[pb.SegmentRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SegmentResponse]:
        """Up to ``STREAM_WINDOW`` requests in flight; answers in request order; a failed
        request is answered in-band (``error_code``) and the stream goes on."""
        deadline = deadline_of(context)
        answers = pipeline(
            request_iterator, lambda r: self._stream_item(r, deadline, context), STREAM_WINDOW
        )
        async for answer in answers:
            yield answer

    async def SegmentBatches(
        self, request_iterator: AsyncIterator[pb.SegmentBatch], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SegmentBatchResult]:
        """SegmentStream with up to ``MAX_BATCH_REQUESTS`` requests per message; the window
        counts requests. Each answer message answers one message, in order."""
        deadline = deadline_of(context)
        answers = pipeline(
            request_iterator,
            lambda m: self._batch_message(m, deadline, context),
            STREAM_WINDOW,
            weight=lambda m: 1 if isinstance(m, Malformed) else len(m.requests),
        )
        async for answer in answers:
            yield answer

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return await unary(self._list_models, request, context, "ListModels")

    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        return await unary(self._get_model, request, context, "GetModel")

    # -- implementation -----------------------------------------------------
    async def _classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        with self._registry.use(request.model, request.version) as model:
            model.require_task("classification", "Classify")
            result = await model.serve(
                classify_input(request), deadline_of(context), self._serving.executor
            )
        return classify_response(model, request, result)

    async def _segment(
        self, request: pb.SegmentRequest, context: grpc.aio.ServicerContext
    ) -> pb.SegmentResponse:
        with self._registry.use(request.model, request.version) as model:
            model.require_task("segmentation", "Segment")
            result = await model.serve(
                segment_input(request), deadline_of(context), self._serving.executor
            )
        return segment_response(model, request, result)

    async def _stream_item(
        self, request: pb.SegmentRequest | Malformed, deadline: float | None, stream: object
    ) -> pb.SegmentResponse:
        """One stream item, answered in-band whatever happens. Items wait for admission
        (the stream is the client's flow control), taking turns with other streams."""
        if isinstance(request, Malformed):
            error: Exception = InvalidArgument(request.message("SegmentStream"))
            return error_response(pb.SegmentRequest(), error, "SegmentStream")
        try:
            if self._serving.draining():
                raise Unavailable(
                    "the server is shutting down: this stream takes no new requests (those "
                    "sent before are answered); send the rest to another replica"
                )
            with self._registry.use(request.model, request.version) as model:
                model.require_task("segmentation", "Segment")
                result = await model.serve(
                    segment_input(request), deadline, self._serving.executor, wait=True, key=stream
                )
            return segment_response(model, request, result)
        except Exception as exc:  # noqa: BLE001 - answered in-band
            return error_response(request, exc, "SegmentStream")

    async def _batch_message(
        self, message: pb.SegmentBatch | Malformed, deadline: float | None, stream: object
    ) -> pb.SegmentBatchResult:
        if isinstance(message, Malformed):
            error = InvalidArgument(message.message("SegmentBatches"))
            return pb.SegmentBatchResult(
                responses=[error_response(pb.SegmentRequest(), error, "SegmentBatches")]
            )
        count = len(message.requests)
        if count > MAX_BATCH_REQUESTS:
            error = InvalidArgument(
                f"a SegmentBatch message carries {count} requests: expected at most "
                f"{MAX_BATCH_REQUESTS} (split it into several messages)"
            )
            return pb.SegmentBatchResult(
                responses=[error_response(r, error, "SegmentBatches") for r in message.requests]
            )
        answers = await asyncio.gather(
            *(self._stream_item(r, deadline, stream) for r in message.requests)
        )
        return pb.SegmentBatchResult(responses=answers)

    async def _get_model(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        return self._model_info(self._registry.get(request.model, request.version))

    async def _list_models(
        self, request: pb.ListModelsRequest, context: object
    ) -> pb.ListModelsResponse:
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
            **tiling_fields(config.input),
        )


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The RPC's deadline on the ``time.monotonic()`` clock (None: the client set none)."""
    remaining = context.time_remaining()
    if remaining is None or remaining > NO_DEADLINE_S:  # gRPC reports "none" as ~infinite
        return None
    return time.monotonic() + remaining


async def unary(
    handler: Callable[[Request, grpc.aio.ServicerContext], Awaitable[Response]],
    request: Request,
    context: grpc.aio.ServicerContext,
    rpc: str,
) -> Response | None:
    """``await handler(request, context)``; an exception becomes the call's error status
    (``set_error``: None is returned, gRPC sends the status alone)."""
    try:
        return await handler(request, context)
    except Exception as exc:  # noqa: BLE001 - every failure becomes the call's status
        code, message = status_of(exc), message_of(exc, rpc)
    set_error(context, code, message)  # out of the except block: no exception chain kept
    return None


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
    if result.serving is not None:
        response.serving.CopyFrom(serving_message(result.serving))
    return response


def serving_message(serving: ImageServing) -> pb.Serving:
    """``tiling.Serving`` -> its protobuf message."""
    tiles = serving.tiles
    return pb.Serving(
        mode=serving.mode,
        image_height=serving.height,
        image_width=serving.width,
        bucket_height=serving.bucket[0],
        bucket_width=serving.bucket[1],
        tiles=tiles.count if tiles else 0,
        tile_margin=tiles.margin if tiles else 0,
        scale=serving.scale,
        description=serving.describe(),
    )


def tiling_fields(spec: InputSpec) -> dict[str, object]:
    """ModelInfo's receptive field and oversized-image fields."""
    field = spec.receptive_field
    fields: dict[str, object] = {"oversized": spec.oversized if spec.mode == "pad" else ""}
    if field is not None:
        fields |= {"receptive_field": field.size, "receptive_field_radius": field.radius,
                   "output_stride": field.stride}
    if spec.mode == "pad":
        tile = tile_size(spec)
        fields |= {"tile_size": tile, "tile_margin": tile_margin(spec, tile), "max_tiles": spec.max_tiles}
    return fields


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

"""``visionserve.v1.VisionService``: decode -> validate -> infer -> encode.

Every failure becomes one status code with a message naming what was wrong and what
was expected; ``SegmentStream`` answers a failed item with ``error_code`` /
``error_message`` and carries on with the next.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc
import numpy as np

from visionserve.protos import visionserve_pb2 as pb
from visionserve.protos import visionserve_pb2_grpc as pb_grpc
from visionserve.server import codec
from visionserve.server.errors import InvalidArgument, VisionServeError
from visionserve.server.iou import compute_iou
from visionserve.server.postprocess import top_k
from visionserve.server.served_model import ModelRegistry, ServedModel
from visionserve.server.settings import ServerSettings

log = logging.getLogger(__name__)

# "visionserve.v1.VisionService"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VisionService"].full_name

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
        return _unary(self._classify, request, context, "Classify")

    def Segment(
        self, request: pb.SegmentRequest, context: grpc.ServicerContext
    ) -> pb.SegmentResponse:
        return _unary(self._segment, request, context, "Segment")

    def SegmentStream(
        self, request_iterator: Iterator[pb.SegmentRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.SegmentResponse]:
        for request in request_iterator:
            try:
                yield self._segment(request)
            except Exception as exc:  # noqa: BLE001 - answered in-band, the stream goes on
                yield pb.SegmentResponse(
                    model=request.model,
                    version=request.version,
                    request_id=request.request_id,
                    error_code=status_of(exc).value[0],
                    error_message=message_of(exc, "SegmentStream"),
                )

    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        return _unary(self._list_models, request, context, "ListModels")

    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        return _unary(
            lambda r: self._model_info(self._registry.get(r.model, r.version)),
            request,
            context,
            "GetModel",
        )

    # -- implementation -----------------------------------------------------
    def _classify(self, request: pb.ClassifyRequest) -> pb.ClassifyResponse:
        model = self._registry.get(request.model, request.version)
        model.require_task("classification", "Classify")
        image = self._decode_image(request.image)
        probabilities = model.classify([image])[0]
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

    def _segment(self, request: pb.SegmentRequest) -> pb.SegmentResponse:
        model = self._registry.get(request.model, request.version)
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
        mask = model.segment([image])[0]
        response = pb.SegmentResponse(
            model=model.name,
            version=str(model.version),
            request_id=request.request_id,
            mask=_encode_mask(mask, request.mask_format),
        )
        if truth is not None:
            response.iou.CopyFrom(_iou_report(mask, truth, model, ignore_index))
        return response

    def _list_models(self, request: pb.ListModelsRequest) -> pb.ListModelsResponse:
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


def _unary(
    handler: Callable[[Request], Response],
    request: Request,
    context: grpc.ServicerContext,
    rpc: str,
) -> Response:
    """Run ``handler``; turn any exception into ``context.abort(code, message)``."""
    try:
        return handler(request)
    except Exception as exc:  # noqa: BLE001 - every error becomes a status
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

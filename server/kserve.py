"""KServe v2 / Open Inference Protocol: ``inference.GRPCInferenceService``.

``ModelInfer`` takes one of two input forms (``kserve_describe``): the model's
*preprocessed* input, as Triton would, one FP32 tensor ``[N, 3, H, W]`` named like the
ONNX input, as ``raw_input_contents`` or ``contents.fp32_contents``, answered with every
ONNX output (or the requested ones); or encoded images as the BYTES input ``IMAGE``
(plus ``GROUND_TRUTH`` for segmenters), answered with the task's outputs at each
image's size (``kserve_tasks``). Outputs travel as ``raw_output_contents``. Requests go
through the same ``ServedModel`` and dynamic batcher as ``visionserve.v1``.

Request parameters: ``top_k`` (int64, LABELS / SCORES columns, default the server's
``--default-top-k``), ``ignore_index`` (int64, IoU). Requested-output parameter
``classification`` (tritonclient's ``class_count``): Triton's classification extension.
Triton's ``ModelConfig`` and ``ModelStatistics`` are answered too; the repository
extension (``RepositoryIndex``, ``RepositoryModelLoad``/``Unload``) works with
``--model-control explicit``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from importlib import metadata
from typing import Any

import grpc
import numpy as np
from visionserve.protos import grpc_service_pb2 as kpb
from visionserve.protos import grpc_service_pb2_grpc as kpb_grpc
from visionserve.server.errors import InvalidArgument, NotFound, Unavailable, VisionServeError
from visionserve.server.kserve_describe import (
    GROUND_TRUTH,
    IMAGE,
    model_config,
    model_metadata,
    statistics_response,
)
from visionserve.server.kserve_tasks import InferOptions, image_outputs, tensor_outputs
from visionserve.server.kserve_tensors import (
    InputTensor,
    add_output,
    int_parameter,
    request_inputs,
    requested,
)
from visionserve.server.registry import ModelRegistry
from visionserve.server.repository import ModelRepository
from visionserve.server.served_model import ServedModel
from visionserve.server.service import Serving, deadline_of, unary

log = logging.getLogger(__name__)

SERVICE_NAME = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def _server_version() -> str:
    try:
        return metadata.version("visionserve")
    except metadata.PackageNotFoundError:
        return "0"


class InferenceServicer(kpb_grpc.GRPCInferenceServiceServicer):
    """The KServe v2 servicer over the same ``ModelRegistry`` as ``visionserve.v1``."""

    def __init__(self, serving: Serving, is_ready: Callable[[], bool]) -> None:
        self._serving = serving
        self._registry = serving.registry
        self._settings = serving.settings
        self._is_ready = is_ready

    # -- health and metadata --------------------------------------------------------------
    async def ServerLive(self, request, context):  # type: ignore[no-untyped-def]
        return kpb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # type: ignore[no-untyped-def]
        return kpb.ServerReadyResponse(ready=self._is_ready())

    async def ModelReady(self, request, context):  # type: ignore[no-untyped-def]
        async def ready(r: kpb.ModelReadyRequest, c: object) -> kpb.ModelReadyResponse:
            try:
                self._registry.get(r.name, r.version)
            except (NotFound, Unavailable):
                return kpb.ModelReadyResponse(ready=False)
            return kpb.ModelReadyResponse(ready=self._is_ready())

        return await unary(ready, request, context, "ModelReady")

    async def ServerMetadata(self, request, context):  # type: ignore[no-untyped-def]
        return kpb.ServerMetadataResponse(
            name="visionserve",
            version=_server_version(),
            extensions=["classification", "model_configuration", "model_repository", "statistics"],
        )

    async def ModelMetadata(self, request, context):  # type: ignore[no-untyped-def]
        async def metadata_of(r: kpb.ModelMetadataRequest, c: object) -> kpb.ModelMetadataResponse:
            return model_metadata(self._registry, self._registry.get(r.name, r.version))

        return await unary(metadata_of, request, context, "ModelMetadata")

    async def ModelConfig(self, request, context):  # type: ignore[no-untyped-def]
        async def config_of(r: kpb.ModelConfigRequest, c: object) -> kpb.ModelConfigResponse:
            return kpb.ModelConfigResponse(config=model_config(self._registry.get(r.name, r.version)))

        return await unary(config_of, request, context, "ModelConfig")

    async def ModelStatistics(self, request, context):  # type: ignore[no-untyped-def]
        async def statistics_of(
            r: kpb.ModelStatisticsRequest, c: object
        ) -> kpb.ModelStatisticsResponse:
            return statistics_response(self._registry, r.name, r.version)

        return await unary(statistics_of, request, context, "ModelStatistics")

    # -- inference -----------------------------------------------------------------------
    async def ModelInfer(self, request, context):  # type: ignore[no-untyped-def]
        return await unary(self._infer, request, context, "ModelInfer")

    async def _infer(
        self, request: kpb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ModelInferResponse:
        deadline = deadline_of(context)
        with self._registry.use(request.model_name, request.model_version) as model:
            inputs = request_inputs(request)
            options = InferOptions(
                outputs=requested(request),
                top_k=int_parameter(request, "top_k") or 0,
                ignore_index=int_parameter(request, "ignore_index"),  # checked by SegmentInput
            )
            executor = self._serving.executor
            if _is_image_form(inputs):
                outputs = await image_outputs(model, inputs, options, deadline, executor)
            else:
                loop = asyncio.get_running_loop()
                tensor = await loop.run_in_executor(executor, fp32_tensor, model, inputs)
                outputs = await tensor_outputs(model, tensor, options, deadline)
            response = kpb.ModelInferResponse(
                model_name=model.name, model_version=str(model.version), id=request.id
            )
            for name, array in outputs.items():
                add_output(response, name, array)
            return response

    # -- model repository extension ---------------------------------------------------------
    async def RepositoryIndex(self, request, context):  # type: ignore[no-untyped-def]
        async def index(r: kpb.RepositoryIndexRequest, c: object) -> kpb.RepositoryIndexResponse:
            return await asyncio.to_thread(self._index, r, c)

        return await unary(index, request, context, "RepositoryIndex")

    async def RepositoryModelLoad(self, request, context):  # type: ignore[no-untyped-def]
        def load(r: kpb.RepositoryModelLoadRequest, c: object) -> kpb.RepositoryModelLoadResponse:
            self._require_explicit("load")
            if r.parameters:
                raise InvalidArgument(
                    f"load parameters {sorted(r.parameters)} are not supported: the model is "
                    f"loaded from the server's repository as it is on disk"
                )
            repository = ModelRepository(self._settings.repository)
            self._registry.sync(repository, [r.model_name], strict=True)
            return kpb.RepositoryModelLoadResponse()

        return await unary(in_thread(load), request, context, "RepositoryModelLoad")

    async def RepositoryModelUnload(self, request, context):  # type: ignore[no-untyped-def]
        def unload(
            r: kpb.RepositoryModelUnloadRequest, c: object
        ) -> kpb.RepositoryModelUnloadResponse:
            self._require_explicit("unload")
            self._registry.unload(r.model_name)
            return kpb.RepositoryModelUnloadResponse()

        return await unary(in_thread(unload), request, context, "RepositoryModelUnload")

    def _index(
        self, request: kpb.RepositoryIndexRequest, context: object
    ) -> kpb.RepositoryIndexResponse:
        response = kpb.RepositoryIndexResponse()
        loaded = set(self._registry.names())
        for name in loaded:
            for version in self._registry.versions(name):
                response.models.add(name=name, version=str(version), state="READY")
        if not request.ready:
            for name in ModelRepository(self._settings.repository).model_names():
                if name not in loaded:
                    failure = self._registry.failure(name)
                    reason = f"failed to load: {failure.reason}" if failure else "unloaded"
                    response.models.add(name=name, state="UNAVAILABLE", reason=reason)
        return response

    def _require_explicit(self, action: str) -> None:
        if self._settings.model_control != "explicit":
            raise FailedPrecondition(
                f"cannot {action} models: the server runs with --model-control "
                f"{self._settings.model_control}; start it with --model-control explicit"
            )


def in_thread(blocking: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """A blocking handler (loading, warming, draining a model) as a coroutine run in a
    thread of its own, so the event loop keeps answering everything else."""

    async def handler(request: Any, context: Any) -> Any:
        return await asyncio.to_thread(blocking, request, context)

    return handler


class FailedPrecondition(VisionServeError):
    status = "FAILED_PRECONDITION"


def _is_image_form(inputs: dict[str, InputTensor]) -> bool:
    """Encoded images: the BYTES input ``IMAGE`` (with an optional ``GROUND_TRUTH``)."""
    image = inputs.get(IMAGE)
    return image is not None and image.datatype == "BYTES" and set(inputs) <= {IMAGE, GROUND_TRUTH}


def _check_shape(model: ServedModel, name: str, shape: list[int]) -> None:
    config = model.config
    spec, profile = config.input, config.profile
    if len(shape) != 4 or shape[1] != 3:
        raise InvalidArgument(
            f"input {name!r} has shape {shape}: expected [N, 3, H, W] (NCHW, RGB)"
        )
    if not 1 <= shape[0] <= config.max_batch_size:
        raise InvalidArgument(
            f"input {name!r} has batch size {shape[0]}: expected 1..{config.max_batch_size} "
            f"(max_batch_size of {model.name!r})"
        )
    for dim, size, fixed, allowed in (
        ("H", shape[2], spec.height, profile.height),
        ("W", shape[3], spec.width, profile.width),
    ):
        if allowed is None and size != fixed:
            raise InvalidArgument(
                f"input {name!r} has {dim}={size}: {model.name!r} takes {dim}={fixed} "
                f"(shape [N, 3, {spec.height}, {spec.width}]; preprocess the image first)"
            )
        if allowed is not None and not allowed[0] <= size <= allowed[2]:
            raise InvalidArgument(
                f"input {name!r} has {dim}={size}: expected {allowed[0]}..{allowed[2]}"
            )


def fp32_tensor(model: ServedModel, inputs: dict[str, InputTensor]) -> np.ndarray:
    """The request's one FP32 NCHW input, checked against the model; ``InvalidArgument`` else."""
    expected = model.config.input.name
    names = list(inputs)
    if names != [expected]:
        extra = f" (+ {GROUND_TRUTH!r})" if model.task == "segmentation" else ""
        raise InvalidArgument(
            f"{model.name!r} takes exactly one input named {expected!r} (FP32 [N, 3, H, W], "
            f"preprocessed) or encoded images as {IMAGE!r} (BYTES [N]){extra}, got inputs {names}"
        )
    tensor = inputs[expected]
    if tensor.datatype != "FP32":
        raise InvalidArgument(
            f"input {expected!r} has datatype {tensor.datatype!r}: expected 'FP32'"
        )
    shape = list(tensor.shape)
    _check_shape(model, expected, shape)
    count = int(np.prod(shape))
    if tensor.raw is not None:
        if len(tensor.raw) != count * 4:
            raise InvalidArgument(
                f"raw_input_contents holds {len(tensor.raw)} bytes for {expected!r} of "
                f"shape {shape}: expected one entry of {count} * 4 = {count * 4} bytes (FP32)"
            )
        return np.frombuffer(tensor.raw, dtype="<f4").reshape(shape)
    typed = tensor.contents.fp32_contents
    if len(typed) != count:
        raise InvalidArgument(
            f"input {expected!r} of shape {shape} needs {count} values, got "
            f"{len(typed)} in contents.fp32_contents and no raw_input_contents"
        )
    return np.asarray(typed, dtype=np.float32).reshape(shape)

"""KServe v2 / Open Inference Protocol: ``inference.GRPCInferenceService``.

``ModelInfer`` takes the model's *preprocessed* input, as Triton would: one FP32
tensor ``[N, 3, H, W]`` named like the ONNX input (``ModelMetadata`` says the name and
shape), as ``raw_input_contents`` or ``contents.fp32_contents``. It answers every
ONNX output (or the requested ones) as ``raw_output_contents``. Requests go through
the same dynamic batcher as ``visionserve.v1``. The repository extension
(``RepositoryIndex``, ``RepositoryModelLoad``/``Unload``) works with
``--model-control explicit``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib import metadata

import grpc
import numpy as np
from visionserve.protos import grpc_service_pb2 as kpb
from visionserve.protos import grpc_service_pb2_grpc as kpb_grpc
from visionserve.server.errors import InvalidArgument, NotFound, Unavailable, VisionServeError
from visionserve.server.registry import ModelRegistry
from visionserve.server.repository import ModelRepository
from visionserve.server.served_model import ServedModel
from visionserve.server.service import deadline_of, unary
from visionserve.server.settings import ServerSettings

log = logging.getLogger(__name__)

SERVICE_NAME = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

DATATYPES = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.uint16): "UINT16",
    np.dtype(np.uint32): "UINT32",
    np.dtype(np.uint64): "UINT64",
    np.dtype(np.int8): "INT8",
    np.dtype(np.int16): "INT16",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.float16): "FP16",
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
}


def datatype_of(dtype: np.dtype) -> str:
    return DATATYPES.get(np.dtype(dtype), "BYTES")


def _server_version() -> str:
    try:
        return metadata.version("visionserve")
    except metadata.PackageNotFoundError:
        return "0"


class InferenceServicer(kpb_grpc.GRPCInferenceServiceServicer):
    """The KServe v2 servicer over the same ``ModelRegistry`` as ``visionserve.v1``."""

    def __init__(
        self, registry: ModelRegistry, settings: ServerSettings, is_ready: Callable[[], bool]
    ) -> None:
        self._registry = registry
        self._settings = settings
        self._is_ready = is_ready

    # -- health and metadata --------------------------------------------------------------
    def ServerLive(self, request, context):  # type: ignore[no-untyped-def]
        return kpb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):  # type: ignore[no-untyped-def]
        return kpb.ServerReadyResponse(ready=self._is_ready())

    def ModelReady(self, request, context):  # type: ignore[no-untyped-def]
        def ready(r: kpb.ModelReadyRequest, c: object) -> kpb.ModelReadyResponse:
            try:
                self._registry.get(r.name, r.version)
            except (NotFound, Unavailable):
                return kpb.ModelReadyResponse(ready=False)
            return kpb.ModelReadyResponse(ready=self._is_ready())

        return unary(ready, request, context, "ModelReady")

    def ServerMetadata(self, request, context):  # type: ignore[no-untyped-def]
        return kpb.ServerMetadataResponse(
            name="visionserve", version=_server_version(), extensions=["model_repository"]
        )

    def ModelMetadata(self, request, context):  # type: ignore[no-untyped-def]
        return unary(
            lambda r, c: model_metadata(self._registry, self._registry.get(r.name, r.version)),
            request,
            context,
            "ModelMetadata",
        )

    # -- inference -----------------------------------------------------------------------
    def ModelInfer(self, request, context):  # type: ignore[no-untyped-def]
        return unary(self._infer, request, context, "ModelInfer")

    def _infer(
        self, request: kpb.ModelInferRequest, context: grpc.ServicerContext
    ) -> kpb.ModelInferResponse:
        with self._registry.use(request.model_name, request.model_version) as model:
            tensor = input_tensor(model, request)
            wanted = requested_outputs(model, request)
            outputs = model.infer(tensor, deadline_of(context))
            response = kpb.ModelInferResponse(
                model_name=model.name, model_version=str(model.version), id=request.id
            )
            for name in wanted:
                array = np.ascontiguousarray(outputs[name])
                response.outputs.add(
                    name=name, datatype=datatype_of(array.dtype), shape=list(array.shape)
                )
                response.raw_output_contents.append(array.tobytes())
            return response

    # -- model repository extension ---------------------------------------------------------
    def RepositoryIndex(self, request, context):  # type: ignore[no-untyped-def]
        return unary(self._index, request, context, "RepositoryIndex")

    def RepositoryModelLoad(self, request, context):  # type: ignore[no-untyped-def]
        def load(r: kpb.RepositoryModelLoadRequest, c: object) -> kpb.RepositoryModelLoadResponse:
            self._require_explicit("load")
            if r.parameters:
                raise InvalidArgument(
                    f"load parameters {sorted(r.parameters)} are not supported: the model is "
                    f"loaded from the server's repository as it is on disk"
                )
            self._registry.sync(ModelRepository(self._settings.repository), [r.model_name])
            return kpb.RepositoryModelLoadResponse()

        return unary(load, request, context, "RepositoryModelLoad")

    def RepositoryModelUnload(self, request, context):  # type: ignore[no-untyped-def]
        def unload(
            r: kpb.RepositoryModelUnloadRequest, c: object
        ) -> kpb.RepositoryModelUnloadResponse:
            self._require_explicit("unload")
            self._registry.unload(r.model_name)
            return kpb.RepositoryModelUnloadResponse()

        return unary(unload, request, context, "RepositoryModelUnload")

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
                    response.models.add(name=name, state="UNAVAILABLE", reason="unloaded")
        return response

    def _require_explicit(self, action: str) -> None:
        if self._settings.model_control != "explicit":
            raise FailedPrecondition(
                f"cannot {action} models: the server runs with --model-control "
                f"{self._settings.model_control}; start it with --model-control explicit"
            )


class FailedPrecondition(VisionServeError):
    status = "FAILED_PRECONDITION"


def model_metadata(registry: ModelRegistry, model: ServedModel) -> kpb.ModelMetadataResponse:
    """Name, versions, backend (as ``platform``), input and output tensors (-1: variable)."""
    spec, profile = model.config.input, model.config.profile
    height = -1 if profile.height is not None else spec.height
    width = -1 if profile.width is not None else spec.width
    response = kpb.ModelMetadataResponse(
        name=model.name,
        versions=[str(v) for v in registry.versions(model.name)],
        platform=model.backend.name,
    )
    response.inputs.add(name=spec.name, datatype="FP32", shape=[-1, 3, height, width])
    for out in model.backend.outputs:
        shape = [d if isinstance(d, int) and d > 0 else -1 for d in out.shape]
        response.outputs.add(name=out.name, datatype=datatype_of(out.dtype), shape=shape)
    return response


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


def input_tensor(model: ServedModel, request: kpb.ModelInferRequest) -> np.ndarray:
    """The request's one FP32 NCHW input, checked against the model; ``InvalidArgument`` else."""
    expected = model.config.input.name
    names = [t.name for t in request.inputs]
    if names != [expected]:
        raise InvalidArgument(
            f"{model.name!r} takes exactly one input named {expected!r}, got inputs {names}"
        )
    tensor = request.inputs[0]
    if tensor.datatype != "FP32":
        raise InvalidArgument(
            f"input {expected!r} has datatype {tensor.datatype!r}: expected 'FP32'"
        )
    shape = list(tensor.shape)
    _check_shape(model, expected, shape)
    count = int(np.prod(shape))
    raw = list(request.raw_input_contents)
    typed = tensor.contents.fp32_contents
    if raw and len(typed):
        raise InvalidArgument(
            "both raw_input_contents and inputs[0].contents are set: send one of them"
        )
    if raw:
        if len(raw) != 1 or len(raw[0]) != count * 4:
            raise InvalidArgument(
                f"raw_input_contents holds {[len(r) for r in raw]} bytes for {expected!r} of "
                f"shape {shape}: expected one entry of {count} * 4 = {count * 4} bytes (FP32)"
            )
        return np.frombuffer(raw[0], dtype="<f4").reshape(shape)
    if len(typed) != count:
        raise InvalidArgument(
            f"input {expected!r} of shape {shape} needs {count} values, got "
            f"{len(typed)} in contents.fp32_contents and no raw_input_contents"
        )
    return np.asarray(typed, dtype=np.float32).reshape(shape)


def requested_outputs(model: ServedModel, request: kpb.ModelInferRequest) -> list[str]:
    """The outputs to return: those requested, or every model output."""
    available = [spec.name for spec in model.backend.outputs]
    wanted = [o.name for o in request.outputs] or available
    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise InvalidArgument(
            f"requested outputs {unknown} are not outputs of {model.name!r}: expected some of "
            f"{available}"
        )
    return wanted

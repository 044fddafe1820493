"""What the KServe v2 service says about a model: ``ModelMetadata``, Triton's ``ModelConfig``
and ``ModelStatistics``.

A model takes one of two input forms (``tensor_forms`` lists both, once):

- its preprocessed tensor: FP32 ``[N, 3, H, W]`` named like the ONNX input; the answer
  is the ONNX outputs (and, for classifiers, ``LABELS`` / ``SCORES``);
- encoded images: BYTES ``IMAGE`` ``[N]`` (PNG, JPEG, ...), plus for segmenters an
  optional BYTES ``GROUND_TRUTH`` ``[N]`` (PNG index masks); the answer is ``LABELS``
  (BYTES) / ``SCORES`` (FP32) ``[N, k]`` and ``probabilities``, or ``MASK`` (UINT8
  ``[N, H, W]``), ``INTERSECTION`` and ``UNION`` (INT64 ``[N, classes]``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from visionserve.protos import grpc_service_pb2 as kpb
from visionserve.server.kserve_tensors import datatype_of
from visionserve.server.registry import ModelRegistry
from visionserve.server.served_model import ServedModel
from visionserve.server.statistics import Duration
from visionserve.server.tiling import tile_margin, tile_size

IMAGE, GROUND_TRUTH = "IMAGE", "GROUND_TRUTH"
LABELS, SCORES = "LABELS", "SCORES"
MASK, INTERSECTION, UNION = "MASK", "INTERSECTION", "UNION"
LABELS_FILE = "labels.txt"  # ModelConfig: the label_filename of classifier outputs

# backend name -> Triton's (platform, backend)
TRITON_PLATFORMS = {
    "onnxruntime-cpu": ("onnxruntime_onnx", "onnxruntime"),
    "onnxruntime-cuda": ("onnxruntime_onnx", "onnxruntime"),
    "tensorrt": ("tensorrt_plan", "tensorrt"),
}


@dataclass(frozen=True)
class TensorForm:
    """One input or output: name, KServe datatype, shape with the batch (-1: variable)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


def input_forms(model: ServedModel) -> list[TensorForm]:
    """Every input a request may send: the FP32 tensor, or ``IMAGE`` (+ ``GROUND_TRUTH``)."""
    spec, profile = model.config.input, model.config.profile
    height = -1 if profile.height is not None else spec.height
    width = -1 if profile.width is not None else spec.width
    forms = [TensorForm(spec.name, "FP32", (-1, 3, height, width)), TensorForm(IMAGE, "BYTES", (-1,))]
    if model.task == "segmentation":
        forms.append(TensorForm(GROUND_TRUTH, "BYTES", (-1,)))
    return forms


def output_forms(model: ServedModel) -> list[TensorForm]:
    """The ONNX outputs, then the task's outputs (computed by the server)."""
    forms = [
        TensorForm(
            out.name,
            datatype_of(out.dtype),
            tuple(d if isinstance(d, int) and d > 0 else -1 for d in out.shape),
        )
        for out in model.backend.outputs
    ]
    classes = model.config.num_classes
    if model.task == "classification":
        forms += [TensorForm(LABELS, "BYTES", (-1, -1)), TensorForm(SCORES, "FP32", (-1, -1))]
    else:
        forms += [
            TensorForm(MASK, "UINT8", (-1, -1, -1)),
            TensorForm(INTERSECTION, "INT64", (-1, classes)),
            TensorForm(UNION, "INT64", (-1, classes)),
        ]
    return forms


def model_metadata(registry: ModelRegistry, model: ServedModel) -> kpb.ModelMetadataResponse:
    """Name, versions, backend (as ``platform``), both input forms and every output."""
    response = kpb.ModelMetadataResponse(
        name=model.name,
        versions=[str(v) for v in registry.versions(model.name)],
        platform=model.backend.name,
    )
    for form in input_forms(model):
        response.inputs.add(name=form.name, datatype=form.datatype, shape=list(form.shape))
    for form in output_forms(model):
        response.outputs.add(name=form.name, datatype=form.datatype, shape=list(form.shape))
    for key, value in size_parameters(model).items():
        if isinstance(value, str):
            response.parameters[key].string_param = value
        else:
            response.parameters[key].int64_param = value
    return response


def size_parameters(model: ServedModel) -> dict[str, int | str]:
    """ModelMetadata ``parameters``: the input tensor's size range, the largest decoded
    image, the receptive field and, in pad mode, how oversized images are served."""
    spec, profile = model.config.input, model.config.profile
    params: dict[str, int | str] = {
        "input_mode": spec.mode,
        "max_image_pixels": model.limits.max_decoded_pixels,
    }
    if profile.height is not None and profile.width is not None:  # tensor H, W range
        params["min_size"] = max(profile.height[0], profile.width[0])
        params["max_size"] = min(profile.height[2], profile.width[2])
    if spec.receptive_field is not None:
        params |= {"receptive_field": spec.receptive_field.size,
                   "receptive_field_radius": spec.receptive_field.radius,
                   "output_stride": spec.receptive_field.stride}
    if spec.mode == "pad":
        tile = tile_size(spec)
        params |= {"largest_bucket": spec.buckets[-1], "oversized": spec.oversized,
                   "tile_size": tile, "tile_margin": tile_margin(spec, tile),
                   "max_tiles": spec.max_tiles}
    return params


def _data_type(datatype: str) -> int:
    return kpb.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")


def model_config(model: ServedModel) -> kpb.ModelConfig:
    """Triton's configuration of ``model``: tensors (dims without the batch), batching,
    instances, and visionserve's own settings as ``parameters``."""
    config = model.config
    platform, backend = TRITON_PLATFORMS.get(model.backend.name, ("", model.backend.name))
    out = kpb.ModelConfig(
        name=model.name,
        platform=platform,
        backend=backend,
        max_batch_size=config.max_batch_size,
        version_policy=kpb.ModelVersionPolicy(all=kpb.ModelVersionPolicy.All()),
    )
    for form in input_forms(model):
        tensor = out.input.add(name=form.name, data_type=_data_type(form.datatype), optional=True)
        if form.datatype == "FP32":
            tensor.format = kpb.ModelInput.FORMAT_NCHW
            tensor.dims.extend(form.shape[1:])
        else:  # a batch of scalars, as Triton writes it: dims [1] reshaped to []
            tensor.dims.append(1)
            tensor.reshape.SetInParent()
    for form in output_forms(model):
        tensor = out.output.add(
            name=form.name, data_type=_data_type(form.datatype), dims=list(form.shape[1:])
        )
        if model.task == "classification" and form.name in (
            config.outputs["probabilities"],
            LABELS,
        ):
            tensor.label_filename = LABELS_FILE
    out.dynamic_batching.max_queue_delay_microseconds = round(config.max_queue_delay_ms * 1000)
    out.dynamic_batching.default_queue_policy.max_queue_size = config.max_queue_size
    gpu = model.backend.name != "onnxruntime-cpu"
    out.instance_group.add(
        name=model.name,
        count=config.instances,
        kind=kpb.ModelInstanceGroup.KIND_GPU if gpu else kpb.ModelInstanceGroup.KIND_CPU,
        gpus=[config.device] if gpu else [],
    )
    for key, value in _parameters(model).items():
        out.parameters[key].string_value = value
    return out


def _parameters(model: ServedModel) -> dict[str, str]:
    """visionserve's settings a client needs, as strings (lists as JSON)."""
    config, spec = model.config, model.config.input
    parameters = {
        "task": config.task,
        "labels": json.dumps(list(config.labels)),
        "input_mode": spec.mode,
        "input_size": f"{spec.height}x{spec.width}",
        "mean": json.dumps(list(spec.mean)),
        "std": json.dumps(list(spec.std)),
        "backend": model.backend.name,
    }
    if spec.mode == "resize_crop":
        parameters["resize_size"] = str(spec.resize_size)
    if spec.mode == "pad":
        parameters["buckets"] = json.dumps(list(spec.buckets))
    if config.task == "segmentation":
        parameters["ignore_index"] = str(config.ignore_index)
    return parameters


def _duration(duration: Duration) -> kpb.StatisticDuration:
    return kpb.StatisticDuration(count=duration.count, ns=duration.ns)


def model_statistics(model: ServedModel) -> kpb.ModelStatistics:
    """Triton's statistics of one loaded version (since it finished warming up)."""
    snap = model.statistics.snapshot()
    stats = kpb.ModelStatistics(
        name=model.name,
        version=str(model.version),
        last_inference=snap.last_inference_ms,
        inference_count=snap.inference_count,
        execution_count=snap.execution_count,
        inference_stats=kpb.InferStatistics(
            success=_duration(snap.success),
            fail=_duration(snap.fail),
            queue=_duration(snap.queue),
            compute_infer=_duration(snap.compute_infer),
        ),
    )
    for size in sorted(snap.batches):
        stats.batch_stats.add(batch_size=size, compute_infer=_duration(snap.batches[size]))
    return stats


def statistics_response(
    registry: ModelRegistry, name: str, version: str
) -> kpb.ModelStatisticsResponse:
    """Every loaded version of every model (empty ``name``), of ``name``, or one version."""
    if name and version:
        models = [registry.get(name, version)]
    else:
        names = [name] if name else registry.names()
        if name:
            registry.get(name)  # NOT_FOUND for an unknown model
        models = [registry.get(n, str(v)) for n in names for v in registry.versions(n)]
    return kpb.ModelStatisticsResponse(model_stats=[model_statistics(m) for m in models])

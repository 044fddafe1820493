"""Checkpoint -> ONNX -> audited, validated model repository entry, as small named steps.

``export_checkpoint`` chains them::

    load_checkpoint -> onnx_from_module (TensorRT rewrites, pad-to-multiple, fused outputs)
    -> check_onnx -> audit_model (op table + TensorRT parse/build) -> validate_onnx (ONNX
    Runtime vs PyTorch) -> model_config_from_metadata -> write_repository_entry

The ONNX graph takes ``image`` (N, 3, H, W) float32, normalised as the metadata says, with a
dynamic batch dimension (and dynamic H, W for segmenters). Post-processing is fused into the
graph: classifiers return ``logits`` and ``probabilities`` (softmax); segmenters return
``mask`` = ArgMax over classes as uint8 (N, H, W), optionally ``probability`` (the max softmax
probability per pixel, float32 (N, H, W)) and ``logits`` (N, C, H, W).

Segmenters that need H, W to be multiples of a stride (UNet: ``2**depth``) are wrapped so the
graph pads the normalised input up to the next multiple and crops the logits back, so every
size works. The padding replicates the border pixels (ONNX ``Pad`` mode ``edge``): a
zero pad would put a band of the mean colour beside the image, an edge the convolutions see
and may segment; replicating continues the image, and for sizes that already are multiples
the pad is empty, so the graph equals the bare model there.
"""

from __future__ import annotations

import io
import json
import logging
import math
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.nn.functional as F
from torch import nn
from visionserve.export.audit import AuditReport, audit_onnx
from visionserve.export.checkpoint import load_checkpoint, metadata_for
from visionserve.export.entry import finish_entry
from visionserve.export.models.ecosystem import is_torchvision_classifier
from visionserve.export.model_probe import single_tensor_model, torch_size_multiple
from visionserve.export.pooling_rewrite import rewrite_pooling
from visionserve.export.validate import Tolerances, sample_inputs, torch_reference
from visionserve.server.backends.registry import BACKEND_NAMES
from visionserve.server.model_config import InputSpec, ModelConfig, ShapeProfile
from visionserve.server.repository import check_model_name

logger = logging.getLogger(__name__)

INPUT_NAME = "image"
CLASSIFICATION_OUTPUTS = ("logits", "probabilities")
SEGMENTATION_OUTPUTS = ("mask",)
DEFAULT_OPSET = 17
DEFAULT_BACKENDS = BACKEND_NAMES  # tensorrt, onnxruntime-cuda, onnxruntime-cpu: best first
PROFILE_MAX_BATCH = 32  # the profile's batch max, raised to max_batch_size when that is larger
SEGMENTATION_SIZE_RANGE = (32, 512)  # min / max of the dynamic H, W profile (opt = training size)
PAD_MODE = "replicate"  # ONNX Pad mode "edge"; see the module docstring


@dataclass(frozen=True)
class ExportOptions:
    """How to export: graph outputs, opset, and the TensorRT audit.

    ``tensorrt``: library for the parse/build check ("auto", "tensorrt", "tensorrt_rtx", or
    "none" to skip it); ``compute_capability``: the TensorRT-RTX ahead-of-time target;
    ``allow_unsupported``: write the model even when the audit finds problems.
    """

    opset: int = DEFAULT_OPSET
    with_probability: bool = False
    with_logits: bool = False
    tensorrt: str = "auto"
    compute_capability: str = "8.6"
    allow_unsupported: bool = False
    max_batch_size: int = 8

    def __post_init__(self) -> None:
        if self.tensorrt not in ("auto", "tensorrt", "tensorrt_rtx", "none"):
            raise ValueError(f"tensorrt must be 'auto', 'tensorrt', 'tensorrt_rtx' or 'none', got {self.tensorrt!r}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")


class ExportAuditError(RuntimeError):
    """The op audit says TensorRT would not build the graph; ``report`` says which nodes."""

    def __init__(self, report: AuditReport) -> None:
        shown = "\n  ".join(report.problems[:10])
        more = f"\n  ... and {len(report.problems) - 10} more" if len(report.problems) > 10 else ""
        super().__init__(f"TensorRT would not build the exported graph ({len(report.problems)} problem(s)):"
                         f"\n  {shown}{more}\n(ExportOptions(allow_unsupported=True), CLI --allow-unsupported, writes it anyway)")
        self.report = report


class ClassifierWithSoftmax(nn.Module):
    """Returns (logits, probabilities) of a classifier."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(image)
        return logits, torch.softmax(logits, dim=1)


class SegmenterWithArgmax(nn.Module):
    """Returns ``mask`` (N, H, W) uint8 = ArgMax of a segmenter's (N, C, H, W) logits, then
    optionally ``probability`` (max softmax probability, float32) and the ``logits``."""

    def __init__(self, model: nn.Module, *, with_probability: bool = False, with_logits: bool = False) -> None:
        super().__init__()
        self.model = model
        self.with_probability = with_probability
        self.with_logits = with_logits

    def forward(self, image: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        logits = self.model(image)
        outputs = [torch.argmax(logits, dim=1).to(torch.uint8)]
        if self.with_probability:
            outputs.append(torch.softmax(logits, dim=1).amax(dim=1))
        if self.with_logits:
            outputs.append(logits)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


class PadToMultiple(nn.Module):
    """Runs a segmenter on any H, W: pads the bottom/right of the (normalised) input up to a
    multiple of ``multiple`` by replicating the border, then crops the logits back to H, W."""

    def __init__(self, model: nn.Module, multiple: int) -> None:
        super().__init__()
        if multiple < 1:
            raise ValueError(f"multiple must be a positive integer, got {multiple}")
        self.model = model
        self.multiple = multiple

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.multiple == 1:
            return self.model(image)
        height, width = image.shape[-2], image.shape[-1]
        pad_h = (self.multiple - height % self.multiple) % self.multiple
        pad_w = (self.multiple - width % self.multiple) % self.multiple
        logits = self.model(F.pad(image, (0, pad_w, 0, pad_h), mode=PAD_MODE))
        return logits[:, :, :height, :width]


def eval_mode(module: nn.Module) -> nn.Module:
    """``module.eval()``, also for wrappers of ``torch.export`` modules (which refuse train())."""
    try:
        module.eval()
    except NotImplementedError:  # an ExportedProgram.module() inside: set the flags directly
        for sub in module.modules():
            sub.training = False
    return module


def is_program_module(model: nn.Module) -> bool:
    """Whether ``model`` is an (unlifted) ``torch.export`` program, which only the dynamo
    exporter takes."""
    return isinstance(model, torch.fx.GraphModule)


def size_multiple_of(model: nn.Module, metadata: dict[str, Any] | None = None) -> int:
    """H, W multiple a segmenter needs: lcm of the model's ``size_multiple`` and the metadata's."""
    from_meta = int(((metadata or {}).get("input") or {}).get("size_multiple", 1))
    return math.lcm(int(getattr(model, "size_multiple", 1)), from_meta)


def reference_module(model: nn.Module, task: str, size_multiple: int = 1) -> nn.Module:
    """What the exported graph computes before its fused post-processing, in PyTorch: the
    logits of ``model`` (segmenters: padded to ``size_multiple`` and cropped back)."""
    return eval_mode(PadToMultiple(model, size_multiple) if task == "segmentation" else model)


def wrap_for_export(model: nn.Module, task: str, *, size_multiple: int = 1, with_probability: bool = False,
                    with_logits: bool = False) -> nn.Module:
    """The model with its task's post-processing fused on (eval mode)."""
    if task == "classification":
        return eval_mode(ClassifierWithSoftmax(model))
    return eval_mode(SegmenterWithArgmax(PadToMultiple(model, size_multiple),
                                         with_probability=with_probability, with_logits=with_logits))


def has_pooling_indices(model: nn.Module) -> bool:
    """Whether ``model`` pools with indices or unpools: the TorchScript-based exporter cannot
    export ``MaxUnpool2d``, so such modules go through the dynamo exporter."""
    return any((isinstance(m, nn.MaxPool2d) and m.return_indices) or isinstance(m, nn.MaxUnpool2d)
               for m in model.modules())


def output_names(task: str, *, with_probability: bool = False, with_logits: bool = False) -> tuple[str, ...]:
    """The ONNX output names of a task's exported graph."""
    if task == "classification":
        return CLASSIFICATION_OUTPUTS
    return SEGMENTATION_OUTPUTS + ("probability",) * with_probability + ("logits",) * with_logits


def _dynamic_axes(task: str, names: tuple[str, ...]) -> dict[str, dict[int, str]]:
    if task == "classification":
        return {INPUT_NAME: {0: "batch"}} | {name: {0: "batch"} for name in names}
    spatial = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}}
    return spatial | {name: ({0: "batch", 2: "height", 3: "width"} if name == "logits" else
                             {0: "batch", 1: "height", 2: "width"}) for name in names}


def _legacy_export(wrapper: nn.Module, example: torch.Tensor, task: str, names: tuple[str, ...],
                   opset: int) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        torch.onnx.export(wrapper, (example,), buffer, dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=list(names),
                          dynamic_axes=_dynamic_axes(task, names), do_constant_folding=True)
    return onnx.load_from_string(buffer.getvalue())


def _dynamo_export(wrapper: nn.Module, example: torch.Tensor, task: str, names: tuple[str, ...],
                   opset: int) -> onnx.ModelProto:
    """torch.export-based export, kept in memory (no external ``.onnx.data``); dims renamed."""
    dim = torch.export.Dim.DYNAMIC
    shapes = {0: dim, 2: dim, 3: dim} if task == "segmentation" else {0: dim}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(wrapper, (example,), None, dynamo=True, opset_version=opset,
                                        input_names=[INPUT_NAME], output_names=list(names),
                                        dynamic_shapes=(shapes,), verbose=False)
    except Exception as exc:  # torch.export constraint violations and unsupported ops
        raise ValueError(f"the dynamo exporter could not export the model with dynamic "
                         f"{'batch, height, width' if task == 'segmentation' else 'batch'}: {exc}; "
                         "a torch.export program must be exported with those dims dynamic "
                         "(torch.export.Dim.DYNAMIC)") from exc
    proto = program.model_proto
    for name, axes in _dynamic_axes(task, names).items():
        value = next(v for v in [*proto.graph.input, *proto.graph.output] if v.name == name)
        for axis, label in axes.items():
            value.type.tensor_type.shape.dim[axis].dim_param = label
    return proto


def onnx_from_module(model: nn.Module, task: str, *, height: int, width: int, opset: int = DEFAULT_OPSET,
                     size_multiple: int = 1, with_probability: bool = False, with_logits: bool = False,
                     dynamo: bool | None = None) -> onnx.ModelProto:
    """Export ``model`` (a bare classifier or segmenter) with its post-processing to ONNX.

    Segmenters are padded to ``size_multiple``. ``dynamo``: None picks the TorchScript-based
    exporter (``dynamo=False``) for ordinary modules and the dynamo one for ``torch.export``
    programs and modules that pool with indices (which may keep opset 18 when 17 is asked
    for). Either way one self-contained model in memory, no external data. Batch is dynamic;
    H and W too for segmenters. Pooling with indices and unpooling are then rewritten in the
    ONNX graph for TensorRT (:func:`~visionserve.export.pooling_rewrite.rewrite_pooling`,
    the one rewrite for exported, ``.pt2`` and imported graphs).
    """
    wrapper = wrap_for_export(model, task, size_multiple=size_multiple, with_probability=with_probability,
                              with_logits=with_logits)
    names = output_names(task, with_probability=with_probability, with_logits=with_logits)
    use_dynamo = (is_program_module(model) or has_pooling_indices(model)) if dynamo is None else dynamo
    example = torch.zeros(2 if use_dynamo else 1, 3, height, width)
    export = _dynamo_export if use_dynamo else _legacy_export
    proto, rewrites = rewrite_pooling(export(wrapper, example, task, names, opset), strict=False)
    logger.info("exported %s graph (%s exporter): %d nodes, opset %s, %d TensorRT pooling rewrites",
                task, "dynamo" if use_dynamo else "legacy", len(proto.graph.node),
                [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")], rewrites)
    return proto


def check_onnx(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``onnx.checker`` (full check) and shape inference; returns the shape-inferred model."""
    onnx.checker.check_model(proto, full_check=True)
    return onnx.shape_inference.infer_shapes(proto, strict_mode=True)


def audit_model(model_bytes: bytes, profile: ShapeProfile, *, tensorrt: str = "auto",
                compute_capability: str = "8.6") -> AuditReport:
    """:func:`~visionserve.export.audit.audit_onnx` of an in-memory model (via a temporary file)."""
    with tempfile.TemporaryDirectory(prefix="visionserve-audit-") as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(model_bytes)
        report = audit_onnx(path, profile=profile, tensorrt=tensorrt, compute_capability=compute_capability)
    report.path = "model.onnx"
    if tensorrt == "none":
        report.tensorrt_skipped = "skipped on request (--no-tensorrt-check)"
    return report


def audit_summary(report: AuditReport) -> str:
    """One line: node and op counts, verdict, and the TensorRT build (or why it was skipped)."""
    verdict = "ok" if report.ok else f"{len(report.problems)} problem(s)"
    text = f"op audit: {len(report.nodes)} nodes, {len(report.op_counts)} op types, {verdict}; "
    result = report.tensorrt
    if result is None:
        return text + f"TensorRT parse/build not run: {report.tensorrt_skipped}"
    where = f"{result.library} {result.version} ({result.target})"
    if result.built:
        return text + (f"{where}: parsed and built in {result.build_seconds:.2f} s, "
                       f"engine {result.engine_bytes / 2**20:.2f} MiB")
    return text + f"{where}: {'build' if result.parsed else 'parse'} failed"


def _input_mode(metadata: dict[str, Any], dynamic: bool) -> dict[str, Any]:
    """``mode`` (and ``resize_size``) of the input: ``pad`` for dynamic segmenters; for
    classifiers the metadata's mode, by default ``resize_crop`` (torchvision's Resize +
    CenterCrop) for torchvision classifiers and ``resize`` for the others."""
    if dynamic:
        return {"mode": "pad"}
    spec = metadata["input"]
    if metadata["task"] != "classification":
        return {"mode": "resize"}
    mode = spec.get("mode") or ("resize_crop" if is_torchvision_classifier(
        str(metadata.get("architecture", ""))) else "resize")
    size = spec.get("resize_size") if mode == "resize_crop" else None
    return {"mode": mode, "resize_size": None if size is None else int(size)}


def model_config_from_metadata(name: str, metadata: dict[str, Any], *,
                               backends: tuple[str, ...] = DEFAULT_BACKENDS, max_batch_size: int = 8,
                               outputs: tuple[str, ...] | None = None, fixed_size: bool = False,
                               fixed_batch: bool = False) -> ModelConfig:
    """The ``model.yaml`` of an exported checkpoint. ``outputs``: the graph's output names
    (default: the task's defaults); each is listed under its role, which is its name.
    Segmenters take any H, W (``pad`` mode) unless ``fixed_size``; ``fixed_batch``: the graph
    takes batches of exactly ``max_batch_size``."""
    spec = metadata["input"]
    task = metadata["task"]
    height, width = int(spec["height"]), int(spec["width"])
    batch = ((max_batch_size,) * 3 if fixed_batch
             else (1, max_batch_size, max(PROFILE_MAX_BATCH, max_batch_size)))  # opt <= max always
    dynamic = task == "segmentation" and not fixed_size
    if dynamic:
        low, high = SEGMENTATION_SIZE_RANGE
        profile = ShapeProfile(batch=batch, height=(min(low, height), height, max(high, height)),
                               width=(min(low, width), width, max(high, width)))
    else:
        profile = ShapeProfile(batch=batch)
    return ModelConfig(
        name=name,
        task=task,
        labels=tuple(metadata["labels"]),
        # Segmenters take any H, W: served at the image's own resolution, padded to
        # shape buckets (the buckets default to a ladder over the profile).
        input=InputSpec(name=INPUT_NAME, height=height, width=width,
                        mean=tuple(spec["mean"]), std=tuple(spec["std"]), **_input_mode(metadata, dynamic)),
        outputs={n: n for n in (outputs or output_names(task))},
        profile=profile,
        max_batch_size=max_batch_size,
        backends=backends,
    )


def _audit_or_raise(model_bytes: bytes, config: ModelConfig, options: ExportOptions) -> AuditReport:
    audit = audit_model(model_bytes, config.profile, tensorrt=options.tensorrt,
                        compute_capability=options.compute_capability)
    logger.info("%s", audit_summary(audit))
    if not audit.ok:
        if not options.allow_unsupported:
            raise ExportAuditError(audit)
        logger.warning("writing %s although TensorRT would not build it (allow_unsupported): %s",
                       config.name, "; ".join(audit.problems))
    return audit


def _segmentation_multiple(model: nn.Module, meta: dict[str, Any]) -> int:
    """lcm of the model's ``size_multiple``, the metadata's and what running the model shows."""
    return math.lcm(size_multiple_of(model, meta), torch_size_multiple(model))


def export_checkpoint(checkpoint: Path, repository: Path, name: str, *, metadata: Path | None = None,
                      overrides: dict[str, Any] | None = None, version: int | None = None,
                      samples: Path | None = None, backends: tuple[str, ...] = DEFAULT_BACKENDS,
                      options: ExportOptions | None = None,
                      tolerances: Tolerances | None = None) -> dict[str, Any]:
    """Export a checkpoint to ``repository/name/<version>/model.onnx`` and return the validation
    report (with the op audit under ``"audit"``), also written as ``validation.json``.

    ``checkpoint``: ``.pth`` state_dict, ``.safetensors``, or ``torch.export`` program ``.pt2``;
    ``metadata`` defaults to ``model.json`` beside it; ``overrides`` (the CLI flags) win over
    it (:func:`~visionserve.export.checkpoint.metadata_for`). Nothing is written when the audit
    finds problems (``ExportAuditError``, unless ``options.allow_unsupported``) or ONNX Runtime
    and PyTorch disagree beyond ``tolerances`` (``ExportValidationError``, carrying the report).
    """
    options, tolerances = options or ExportOptions(), tolerances or Tolerances()
    checkpoint = Path(checkpoint)
    check_model_name(name)
    meta = metadata_for(checkpoint, metadata, overrides)
    task, height, width = meta["task"], int(meta["input"]["height"]), int(meta["input"]["width"])
    model = single_tensor_model(eval_mode(load_checkpoint(checkpoint, meta)), height, width)
    multiple = _segmentation_multiple(model, meta) if task == "segmentation" else 1
    flags = {"with_probability": options.with_probability, "with_logits": options.with_logits}
    try:
        proto = check_onnx(onnx_from_module(model, task, height=height, width=width, opset=options.opset,
                                            size_multiple=multiple, **flags))
    except ValueError:
        raise
    except Exception as exc:  # exporter failures: say which model and why, no traceback
        raise ValueError(f"torch.onnx.export could not export {meta['architecture']!r}: "
                         f"{type(exc).__name__}: {str(exc)[:600]}") from exc
    config = model_config_from_metadata(name, meta, backends=backends, max_batch_size=options.max_batch_size,
                                        outputs=output_names(task, **flags))
    model_bytes = proto.SerializeToString()
    audit = _audit_or_raise(model_bytes, config, options)
    details = {
        "export": asdict(options) | {"size_multiple": multiple, "pad_mode": PAD_MODE if multiple > 1 else None,
                                     "exporter": "dynamo" if is_program_module(model) else "legacy"},
        "source": {"checkpoint": str(checkpoint), "architecture": meta["architecture"],
                   "arch_kwargs": meta["arch_kwargs"], "opset": max(
                       o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                   "training_metrics": _brief_metrics(meta.get("metrics", {}))}}
    report = finish_entry(model_bytes, config, audit, torch_reference(reference_module(model, task, multiple)),
                          sample_inputs(meta, samples), repository=Path(repository), version=version,
                          tolerances=tolerances, details=details)
    report["audit_summary"] = audit_summary(audit)
    return report


def _brief_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k not in ("history", "config")}

"""Checkpoint -> ONNX -> validated model repository entry, as small named steps.

``export_checkpoint`` chains them::

    load_checkpoint -> onnx_from_module -> check_onnx -> validate_onnx (ONNX Runtime vs
    PyTorch) -> model_config_from_metadata -> write_repository_entry

The ONNX graph takes ``image`` (N, 3, H, W) float32, normalised as the metadata says, with a
dynamic batch dimension (and dynamic H, W for segmenters). Post-processing is fused into the
graph: classifiers return ``logits`` and ``probabilities`` (softmax); segmenters return
``mask`` = ArgMax over classes as uint8, shape (N, H, W).
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn
from visionserve.export.checkpoint import load_checkpoint, read_metadata
from visionserve.export.repository import write_repository_entry
from visionserve.export.validate import ExportValidationError, sample_inputs, validate_onnx
from visionserve.server.model_config import InputSpec, ModelConfig, ShapeProfile

logger = logging.getLogger(__name__)

INPUT_NAME = "image"
CLASSIFICATION_OUTPUTS = ("logits", "probabilities")
SEGMENTATION_OUTPUTS = ("mask",)
DEFAULT_OPSET = 17
DEFAULT_BACKENDS = ("tensorrt", "onnxruntime-cuda", "onnxruntime-cpu")
SEGMENTATION_SIZE_RANGE = (32, 512)  # min / max of the dynamic H, W profile (opt = training size)


class ClassifierWithSoftmax(nn.Module):
    """Returns (logits, probabilities) of a classifier."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(image)
        return logits, torch.softmax(logits, dim=1)


class SegmenterWithArgmax(nn.Module):
    """Returns the per-pixel class index (N, H, W) uint8 of a segmenter's (N, C, H, W) logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.argmax(self.model(image), dim=1).to(torch.uint8)


def wrap_for_export(model: nn.Module, task: str) -> nn.Module:
    """The model with its task's post-processing fused on (eval mode)."""
    wrapper = ClassifierWithSoftmax(model) if task == "classification" else SegmenterWithArgmax(model)
    return wrapper.eval()


def output_names(task: str) -> tuple[str, ...]:
    """The ONNX output names of a task's exported graph."""
    return CLASSIFICATION_OUTPUTS if task == "classification" else SEGMENTATION_OUTPUTS


def onnx_from_module(model: nn.Module, task: str, *, height: int, width: int,
                     opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Export ``model`` (a bare classifier or segmenter) with its post-processing to ONNX.

    Uses the TorchScript-based exporter (``dynamo=False``) into memory: one self-contained
    model, no external data. Batch is dynamic; H and W too for segmenters.
    """
    wrapper = wrap_for_export(model, task)
    names = output_names(task)
    dynamic: dict[str, dict[int, str]] = {INPUT_NAME: {0: "batch"}}
    if task == "segmentation":
        dynamic[INPUT_NAME] |= {2: "height", 3: "width"}
        dynamic["mask"] = {0: "batch", 1: "height", 2: "width"}
    else:
        dynamic |= {name: {0: "batch"} for name in names}
    example = torch.zeros(1, 3, height, width)
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        torch.onnx.export(wrapper, (example,), buffer, dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=list(names),
                          dynamic_axes=dynamic, do_constant_folding=True)
    proto = onnx.load_from_string(buffer.getvalue())
    logger.info("exported %s graph: %d nodes, opset %d", task, len(proto.graph.node), opset)
    return proto


def check_onnx(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``onnx.checker`` (full check) and shape inference; returns the shape-inferred model."""
    onnx.checker.check_model(proto, full_check=True)
    return onnx.shape_inference.infer_shapes(proto, strict_mode=True)


def model_config_from_metadata(name: str, metadata: dict[str, Any], *,
                               backends: tuple[str, ...] = DEFAULT_BACKENDS,
                               max_batch_size: int = 8) -> ModelConfig:
    """The ``model.yaml`` of an exported checkpoint."""
    spec = metadata["input"]
    task = metadata["task"]
    height, width = int(spec["height"]), int(spec["width"])
    if task == "segmentation":
        low, high = SEGMENTATION_SIZE_RANGE
        profile = ShapeProfile(batch=(1, max_batch_size, 32),
                               height=(min(low, height), height, max(high, height)),
                               width=(min(low, width), width, max(high, width)))
    else:
        profile = ShapeProfile(batch=(1, max_batch_size, 32))
    return ModelConfig(
        name=name,
        task=task,
        labels=tuple(metadata["labels"]),
        input=InputSpec(name=INPUT_NAME, height=height, width=width,
                        mean=tuple(spec["mean"]), std=tuple(spec["std"])),
        outputs={n: n for n in output_names(task)},
        profile=profile,
        max_batch_size=max_batch_size,
        backends=backends,
    )


def export_checkpoint(checkpoint: Path, repository: Path, name: str, *, metadata: Path | None = None,
                      version: int | None = None, opset: int = DEFAULT_OPSET,
                      samples: Path | None = None, atol: float = 1e-4, rtol: float = 1e-4,
                      backends: tuple[str, ...] = DEFAULT_BACKENDS) -> dict[str, Any]:
    """Export a checkpoint to ``repository/name/<version>/model.onnx`` and return the validation report.

    ``metadata`` defaults to ``model.json`` beside the checkpoint. Raises
    ``ExportValidationError`` (carrying the report; nothing is written) when ONNX Runtime and
    PyTorch disagree beyond the tolerances.
    """
    checkpoint = Path(checkpoint)
    metadata_path = Path(metadata) if metadata is not None else checkpoint.with_name("model.json")
    meta = read_metadata(metadata_path)
    model = load_checkpoint(checkpoint, meta)
    height, width = int(meta["input"]["height"]), int(meta["input"]["width"])
    proto = check_onnx(onnx_from_module(model, meta["task"], height=height, width=width, opset=opset))
    config = model_config_from_metadata(name, meta, backends=backends)
    model_bytes = proto.SerializeToString()
    inputs = sample_inputs(meta, samples)
    report = validate_onnx(model_bytes, model, meta["task"], inputs, atol=atol, rtol=rtol)
    report["source"] = {"checkpoint": str(checkpoint), "metadata": str(metadata_path),
                        "architecture": meta["architecture"], "arch_kwargs": meta["arch_kwargs"],
                        "opset": opset, "training_metrics": _brief_metrics(meta.get("metrics", {}))}
    if not report["passed"]:
        raise ExportValidationError(report)
    files = {"model.onnx": model_bytes,
             "validation.json": (json.dumps(report, indent=2) + "\n").encode()}
    version_dir = write_repository_entry(Path(repository), config, files, version=version)
    report["version_dir"] = str(version_dir)
    report["version"] = int(version_dir.name)
    return report


def _brief_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k not in ("history", "config")}

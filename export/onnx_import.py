"""``visionserve import``: an ONNX file made elsewhere -> audited, validated repository entry.

``import_onnx`` chains::

    load_original (onnx checker) -> graph_input (one float32 NCHW image input) -> choose_output
    -> probe on ONNX Runtime (logits, probabilities or a class-index mask; class count, size
       multiple) -> fuse outputs (Softmax -> probabilities | ArgMax -> uint8 mask | the index
       mask cast to uint8), pad to the multiple
    -> rewrite_pooling (TensorRT) -> check -> audit (op table + TensorRT-RTX build)
    -> validate against the original file on generated images -> serving mode -> entry

The imported graph keeps the original input name. Classifiers are served in ``resize`` mode at
the graph's fixed size (or ``--input-size`` when H, W are dynamic); segmenters with a dynamic
H, W in ``pad`` mode (unless padding changes their masks, see :mod:`visionserve.export.entry`),
fixed-size ones in ``resize`` mode. A graph with a fixed batch of 1 is served with
``max_batch_size`` 1, and the report says so.

A segmenter whose chosen output is a class-index mask already (exported with
``logits.argmax(1)``, maybe cast to another integer type) keeps it as its ``mask``: masks,
IoU and tiling work, per-pixel scores do not exist; the report and ``model.yaml``'s
``notes`` say so, and validation compares the masks pixel by pixel. A classifier's index
output is refused: top-k and scores need its logits or probabilities.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto

from visionserve.export.checkpoint import IMAGENET_MEAN, IMAGENET_STD
from visionserve.export.entry import finish_entry
from visionserve.export.model_probe import find_size_multiple
from visionserve.export.onnx_export import (
    DEFAULT_BACKENDS,
    ExportOptions,
    _audit_or_raise,
    audit_summary,
    check_onnx,
    model_config_from_metadata,
)
from visionserve.export.onnx_graph import (
    free_output_names,
    fuse_outputs,
    opset,
    pad_to_multiple,
    prune,
    squeeze_class_axis,
    uncast_index,
)
from visionserve.export.pooling_rewrite import MIN_OPSET, rewrite_pooling
from visionserve.export.validate import Tolerances, sample_inputs
from visionserve.server.model_config import TASKS, check_class_count
from visionserve.server.repository import check_model_name

logger = logging.getLogger(__name__)

DEFAULT_SIZE = (224, 224)
_RANK = {"classification": 2, "segmentation": 4}
_FUSED = ("logits", "probabilities", "mask", "probability")


@dataclass(frozen=True)
class ImportSpec:
    """What the ONNX file cannot say: task, labels, normalisation, size, which output."""

    task: str
    labels: tuple[str, ...]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: tuple[int, int] | None = None
    output: str | None = None
    with_probability: bool = False
    input_mode: str = "resize"  # classifiers: or "resize_crop" (torchvision's eval transforms)

    def __post_init__(self) -> None:
        if self.input_mode not in ("resize", "resize_crop"):
            raise ValueError(f"input_mode must be 'resize' or 'resize_crop', got {self.input_mode!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        check_class_count(self.task, len(self.labels))


@dataclass(frozen=True)
class Probe:
    """What running the original graph showed: ``kind`` of the chosen output ("logits",
    "probabilities" or "mask": class indices), its ``dtype`` and ``rank``, and the H, W
    ``multiple`` the graph needs."""

    kind: str
    dtype: str
    rank: int
    multiple: int


@dataclass(frozen=True)
class GraphInput:
    """The image input of the original graph; None: a dynamic dimension."""

    name: str
    batch: int | None
    height: int | None
    width: int | None


def _dims(value: onnx.ValueInfoProto) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in value.type.tensor_type.shape.dim]


def _describe(value: onnx.ValueInfoProto) -> str:
    kind = TensorProto.DataType.Name(value.type.tensor_type.elem_type).lower()
    return f"{value.name!r} {kind} {['?' if d is None else d for d in _dims(value)]}"


def load_original(path: Path) -> onnx.ModelProto:
    """The ONNX file (external data beside it loaded), checked; ``ValueError`` when it fails."""
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf decode errors, missing external data
        raise ValueError(f"could not read {path} as an ONNX model: {exc}") from exc
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ValueError(f"{path} fails the ONNX checker: {str(exc).strip()[:600]}; fix or re-export "
                         "the model (the checker must pass before visionserve rewrites it)") from exc
    if opset(model) < MIN_OPSET:
        model = onnx.version_converter.convert_version(model, MIN_OPSET)
    return model


def graph_input(model: onnx.ModelProto) -> GraphInput:
    """The one image input: float32 NCHW with 3 channels and a dynamic batch or a batch of 1."""
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ValueError(f"the model has {len(inputs)} inputs ({', '.join(map(_describe, inputs))}); "
                         "expected one image input (N, 3, H, W) float32: export it with the other "
                         "inputs fixed (constants) or wrap it")
    value = inputs[0]
    dims, elem = _dims(value), value.type.tensor_type.elem_type
    expected = "expected float32 (N, 3, H, W), RGB normalised as (pixel/255 - mean)/std"
    if elem == TensorProto.UINT8:
        raise ValueError(f"input {_describe(value)} takes uint8 pixels; {expected}: export the model "
                         "without its in-graph preprocessing and pass --mean/--std")
    if elem != TensorProto.FLOAT:
        raise ValueError(f"input {_describe(value)}: {expected}")
    if len(dims) != 4:
        raise ValueError(f"input {_describe(value)} has rank {len(dims)}; {expected}")
    if dims[3] == 3 and dims[1] != 3:
        raise ValueError(f"input {_describe(value)} is channels-last (NHWC); {expected}: export "
                         "the model channels-first (NCHW), e.g. with a transpose at its start")
    if dims[1] != 3:
        raise ValueError(f"input {_describe(value)} has {dims[1] or 'a dynamic number of'} channels "
                         f"at axis 1; {expected}")
    if dims[0] not in (None, 1):
        raise ValueError(f"input {_describe(value)} has a fixed batch of {dims[0]}; expected a dynamic "
                         "batch (or 1): re-export with a dynamic batch dimension")
    return GraphInput(value.name, dims[0], dims[2], dims[3])


def choose_output(model: onnx.ModelProto, task: str, requested: str | None) -> str:
    """The output holding the logits/probabilities (or a segmenter's index mask): ``requested``,
    the only one, or the only float one of the task's rank; otherwise ``ValueError`` asking for
    ``--output``."""
    outputs = list(model.graph.output)
    names = ", ".join(map(_describe, outputs))
    if requested is not None:
        if requested not in [o.name for o in outputs]:
            raise ValueError(f"--output {requested!r} is not an output of the model; outputs: {names}")
        return requested
    if len(outputs) == 1:
        return outputs[0].name
    fitting = [o for o in outputs if len(_dims(o)) == _RANK[task]
               and o.type.tensor_type.elem_type == TensorProto.FLOAT]
    if len(fitting) == 1:
        return fitting[0].name
    shape = "(N, classes)" if task == "classification" else "(N, classes, H, W)"
    raise ValueError(f"the model has {len(outputs)} outputs ({names}); pick the one with the "
                     f"{task} logits or probabilities {shape} with --output NAME")


def _index_kind(indices: np.ndarray, task: str, classes: int, output: str) -> str:
    """"mask" for a segmenter's class-index output; ``ValueError`` saying why not otherwise."""
    found = f"output {output!r} gives {indices.dtype} {list(indices.shape)}"
    if task == "classification":
        raise ValueError(f"{found}: class indices (the graph ends in ArgMax); visionserve needs a "
                         "classifier's logits or probabilities (N, classes) for its top-k and scores: "
                         "re-export the model without the argmax, or pass --output with its logits output")
    if not (indices.ndim == 3 or (indices.ndim == 4 and indices.shape[1] == 1)):
        raise ValueError(f"{found}: integers, but neither a class-index mask (N, H, W) or (N, 1, H, W) "
                         "nor logits (N, classes, H, W); pick the right output with --output NAME")
    low, high = (int(indices.min()), int(indices.max())) if indices.size else (0, 0)
    if low < 0 or high >= classes:
        raise ValueError(f"{found} with class indices {low}..{high} on generated images, but --labels "
                         f"lists {classes} classes (indices 0..{classes - 1}); expected every index a label")
    return "mask"


def score_kind(scores: np.ndarray, task: str, classes: int, output: str) -> str:
    """"logits" or "probabilities" of the reference output, "mask" for a segmenter's class
    indices, or ``ValueError`` saying why none."""
    if np.issubdtype(scores.dtype, np.integer):
        return _index_kind(scores, task, classes, output)
    shape = "(N, classes)" if task == "classification" else "(N, classes, H, W)"
    if scores.ndim != _RANK[task] or not np.issubdtype(scores.dtype, np.floating):
        raise ValueError(f"output {output!r} gives {scores.dtype} {list(scores.shape)}: neither logits "
                         f"nor probabilities {shape} of a {task} model; pick the right output with "
                         "--output NAME")
    if scores.shape[1] != classes:
        raise ValueError(f"output {output!r} has {scores.shape[1]} classes (axis 1 of "
                         f"{list(scores.shape)}) but --labels lists {classes}; expected them equal")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"output {output!r} holds NaN or infinite values on generated images")
    if scores.min() >= 0.0 and scores.max() <= 1.0:
        if np.allclose(scores.sum(axis=1), 1.0, atol=1e-3):
            return "probabilities"
        raise ValueError(f"output {output!r} lies in [0, 1] but does not sum to 1 over the classes "
                         "(independent sigmoid scores?): neither logits nor probabilities of one class "
                         "per image/pixel; pick another output with --output NAME or export the logits")
    return "logits"


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def padded_reference(session: ort.InferenceSession, inp: GraphInput, output: str,
                     multiple: int) -> Callable[[np.ndarray], np.ndarray]:
    """The original graph as a validation reference: edge-padded to ``multiple``, cropped back."""
    def run(x: np.ndarray) -> np.ndarray:
        height, width = x.shape[-2:]
        pad_h, pad_w = (-height) % multiple, (-width) % multiple
        if pad_h or pad_w:
            x = np.pad(x, ((0, 0), (0, 0), (0, pad_h), (0, pad_w)), mode="edge")
        (scores,) = session.run([output], {inp.name: x})
        return scores[..., :height, :width] if scores.ndim >= 3 else scores
    return run


def _probe(session: ort.InferenceSession, inp: GraphInput, output: str, spec: ImportSpec,
           size: tuple[int, int]) -> Probe:
    """What running the original graph shows (:class:`Probe`)."""
    x = np.random.default_rng(0).standard_normal((inp.batch or 2, 3, *size)).astype(np.float32)
    try:
        (scores,) = session.run([output], {inp.name: x})
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own exception types
        raise ValueError(f"the model failed on ONNX Runtime at {list(x.shape)}: {exc}") from exc
    scores = np.asarray(scores)
    kind = score_kind(scores, spec.task, len(spec.labels), output)
    if kind == "mask" and spec.with_probability:
        raise ValueError(f"--with-probability needs class scores, but output {output!r} is a class-index "
                         f"mask already ({scores.dtype}); drop --with-probability, or pass --output with "
                         "the logits output (or re-export the model without the argmax)")
    found = partial(Probe, kind, str(scores.dtype), scores.ndim)
    if spec.task == "classification" or inp.height is not None:
        return found(1)

    def run(height: int, width: int) -> tuple[int, ...]:
        probe = np.zeros((1, 3, height, width), np.float32)
        return tuple(session.run([output], {inp.name: probe})[0].shape)
    return found(find_size_multiple(run, "the imported segmenter"))


def _size(inp: GraphInput, spec: ImportSpec) -> tuple[int, int]:
    if inp.height is not None and inp.width is not None:
        fixed = (inp.height, inp.width)
        if spec.input_size not in (None, fixed):
            raise ValueError(f"--input-size {spec.input_size[0]}x{spec.input_size[1]} differs from the "
                             f"model's fixed input {fixed[0]}x{fixed[1]}")
        return fixed
    if (inp.height is None) != (inp.width is None):
        raise ValueError(f"input {inp.name!r} has one dynamic and one fixed side "
                         f"({inp.height}x{inp.width}); expected both fixed or both dynamic")
    return spec.input_size or DEFAULT_SIZE


def imported_graph(original: onnx.ModelProto, inp: GraphInput, output: str, spec: ImportSpec,
                   probe: Probe) -> tuple[onnx.ModelProto, int]:
    """The serving graph: fused outputs, padding to the multiple, pooling rewritten, checked."""
    model = onnx.ModelProto.FromString(original.SerializeToString())
    output = free_output_names(model, _FUSED).get(output, output)
    if probe.kind == "mask":
        output = uncast_index(model, output)
    if probe.kind == "mask" and probe.rank == 4:
        output = squeeze_class_axis(model, output)
    if probe.multiple > 1:
        axes = (1, 2) if probe.kind == "mask" else (2, 3)
        output = pad_to_multiple(model, inp.name, output, probe.multiple, spatial_axes=axes)
    dims = {"batch": "batch" if inp.batch is None else 1, "classes": len(spec.labels),
            "height": inp.height or "height", "width": inp.width or "width"}
    fuse_outputs(model, spec.task, output, probe.kind, dims, with_probability=spec.with_probability)
    dropped = prune(model)
    if dropped:
        logger.info("dropped %d node(s) no served output needs", dropped)
    model, rewrites = rewrite_pooling(model, strict=False)
    return check_onnx(model), rewrites


def import_notes(original: onnx.ModelProto, output: str, spec: ImportSpec, probe: Probe) -> list[str]:
    """What the user should know about the imported model: which of several outputs it uses,
    and what a model that outputs a mask already can and cannot do (printed by ``import`` and
    kept as ``notes`` in ``model.yaml``)."""
    notes = []
    outputs = list(original.graph.output)
    if len(outputs) > 1 and spec.output is None:
        others = " or ".join(repr(o.name) for o in outputs if o.name != output)
        notes.append(f"the model has {len(outputs)} outputs ({', '.join(map(_describe, outputs))}): "
                     f"using {output!r} ({spec.task} {probe.kind}); pass --output NAME to use {others} "
                     "instead")
    if probe.kind == "mask":
        cast = "" if probe.dtype == "uint8" else f", cast from {probe.dtype} to uint8 in the graph"
        notes.append(f"output {output!r} is a class-index mask already (the graph ends in ArgMax): "
                     f"served as the 'mask'{cast}. Masks, IoU against ground truth and tiling work; the "
                     "model has no class scores, so no per-pixel probabilities or scores "
                     "(--with-probability): re-export it without the argmax to have them")
    return notes


def _details(path: Path, original: onnx.ModelProto, output: str, spec: ImportSpec, probe: Probe,
             inp: GraphInput, rewrites: int, notes: list[str]) -> dict[str, Any]:
    """The import's own part of ``validation.json``."""
    warnings = []
    if inp.batch == 1:
        warnings.append(f"input {inp.name!r} has a fixed batch of 1: served with max_batch_size 1 (no "
                        "batching); re-export with a dynamic batch dimension to batch requests")
    cast = f"{probe.dtype} -> uint8" if probe.kind == "mask" and probe.dtype != "uint8" else None
    return {"source": {"onnx": str(path), "output": output, "output_kind": probe.kind,
                       "output_dtype": probe.dtype, "original_opset": opset(original)},
            "import": {"size_multiple": probe.multiple, "pooling_rewrites": rewrites,
                       "softmax_added": spec.task == "classification" and probe.kind == "logits",
                       "mask_cast": cast},
            "warnings": warnings, "notes": notes}


def import_onnx(path: Path, repository: Path, name: str, spec: ImportSpec, *, version: int | None = None,
                backends: tuple[str, ...] | None = None, samples: Path | None = None, options: ExportOptions | None = None,
                tolerances: Tolerances | None = None) -> dict[str, Any]:
    """Import the ONNX file at ``path`` as ``repository/name/<version>``; the validation report.

    Raises ``ValueError`` (bad file or spec: the message says what was found and what is
    expected), ``ExportAuditError`` or ``ExportValidationError`` (nothing written).
    """
    options, tolerances = options or ExportOptions(), tolerances or Tolerances()
    check_model_name(name)
    original = load_original(Path(path))
    inp = graph_input(original)
    output = choose_output(original, spec.task, spec.output)
    size = _size(inp, spec)
    session = _session(original)
    probe = _probe(session, inp, output, spec, size)
    model, rewrites = imported_graph(original, inp, output, spec, probe)
    meta = {"task": spec.task, "labels": list(spec.labels),
            "input": {"height": size[0], "width": size[1], "mean": list(spec.mean), "std": list(spec.std),
                      "mode": spec.input_mode}}
    batch = 1 if inp.batch == 1 else options.max_batch_size
    config = model_config_from_metadata(name, meta, backends=backends or DEFAULT_BACKENDS,
                                        max_batch_size=batch, outputs=tuple(o.name for o in model.graph.output),
                                        fixed_size=inp.height is not None, fixed_batch=inp.batch == 1)
    notes = import_notes(original, output, spec, probe)
    config = replace(config, input=replace(config.input, name=inp.name), notes=tuple(notes))
    model_bytes = model.SerializeToString()
    audit = _audit_or_raise(model_bytes, config, options)
    shapes: dict[str, Any] = {"sizes": ()} if inp.height is not None else {}
    if inp.batch == 1:
        shapes["batch_sizes"] = (1,)
    inputs = sample_inputs(meta, samples, **shapes)
    report = finish_entry(model_bytes, config, audit, padded_reference(session, inp, output, probe.multiple),
                          inputs, repository=Path(repository), version=version, tolerances=tolerances,
                          details=_details(path, original, output, spec, probe, inp, rewrites, notes),
                          mask_reference=probe.kind == "mask")
    report["audit_summary"] = audit_summary(audit)
    return report

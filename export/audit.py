"""Op audit: will this ONNX graph parse and build with TensorRT?

Two layers, both reported in one :class:`AuditReport`:

1. A static check of every node (subgraphs and local functions included) against
   TensorRT's ONNX-parser operator table, kept below as data, plus the specific
   known-bad patterns of the UNet/SegNet family: ``MaxPool`` with its ``Indices``
   output and ``MaxUnpool`` (rewrite those with
   :func:`visionserve.export.pooling_rewrite.rewrite_pooling`, which export and
   import apply).
2. When ``tensorrt`` or ``tensorrt_rtx`` is importable: parse the model *from its
   path* (external ``.onnx.data`` weights work) with ``OnnxParser`` and build a
   serialized engine with an optimisation profile from a
   :class:`~visionserve.server.model_config.ShapeProfile`. TensorRT-RTX builds ahead
   of time for a chosen compute capability (default 8.6) and needs no GPU; full
   TensorRT builds for the local GPU. Engines are never deserialized or run here.

Usage::

    report = audit_onnx("model.onnx", profile=ShapeProfile(batch=(1, 4, 8), height=(64, 256, 512),
                                                          width=(64, 256, 512)))
    if not report.ok:
        raise SystemExit("\n".join(report.problems))
    json.dump(report.to_dict(), fh)
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnx
from visionserve.export.trt_builder import (
    ParseIssue,
    TensorRTResult,
    engine_from_onnx_path,
    load_tensorrt,
)
from visionserve.server.model_config import ShapeProfile

logger = logging.getLogger(__name__)

__all__ = [
    "AuditReport",
    "NodeRecord",
    "ParseIssue",
    "TensorRTResult",
    "audit_onnx",
    "engine_from_onnx_path",
    "load_tensorrt",
    "static_audit",
]

# --- TensorRT ONNX-parser operator support, as data ---------------------------------------
# Source: onnx/onnx-tensorrt docs/operators.md, "TensorRT 10.15 supports operators in the
# inclusive range of opset 9 to opset 24" (the parser TensorRT 10.x and TensorRT-RTX 1.x
# share). Default ONNX domain only; other domains need a plugin. Update the data, not the code.
TABLE_SOURCE = "onnx/onnx-tensorrt docs/operators.md (TensorRT 10.15, opsets 9-24)"
OPSET_RANGE = (9, 24)

SUPPORTED_OPS: frozenset[str] = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool
    BatchNormalization BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant
    ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
    DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor
    Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
    Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow
    HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN
    LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM
    LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod
    Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu
    QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range
    Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin
    ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization
    RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements
    ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign
    SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter ThresholdedRelu Tile TopK
    Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()
)

UNSUPPORTED_OPS: frozenset[str] = frozenset(
    """
    AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im
    CenterCropPad Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear
    ImageDecoder MatMulInteger MaxRoiPool MaxUnpool MelWeightMatrix Multinomial
    NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement QLinearConv
    QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty SequenceErase
    SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence
    StringConcat StringNormalizer StringSplit TfIdfVectorizer Unique
    """.split()
)
_DEFAULT_DOMAINS = ("", "ai.onnx")
_REWRITE_HINT = "rewrite the graph with visionserve.export.pooling_rewrite.rewrite_pooling (export and import apply it)"


# --- report -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeRecord:
    """One node of the graph and what the operator table says about it."""

    name: str
    op_type: str
    domain: str
    status: str  # "supported" | "unsupported" | "unknown" | "custom-domain"


@dataclass
class AuditReport:
    """Result of :func:`audit_onnx`. ``ok`` is False when anything would stop a TensorRT build."""

    path: str
    opset: int | None
    nodes: list[NodeRecord]
    problems: list[str]
    tensorrt: TensorRTResult | None = None
    tensorrt_skipped: str | None = None  # why no parse/build was attempted
    table_source: str = TABLE_SOURCE

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def op_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(n.op_type for n in self.nodes).items()))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary for ``validation.json``."""
        return {
            "ok": self.ok,
            "path": self.path,
            "opset": self.opset,
            "table_source": self.table_source,
            "num_nodes": len(self.nodes),
            "op_counts": self.op_counts,
            "problems": list(self.problems),
            "nodes": [asdict(n) for n in self.nodes],
            "tensorrt": self.tensorrt.to_dict() if self.tensorrt else None,
            "tensorrt_skipped": self.tensorrt_skipped,
        }


# --- static audit -----------------------------------------------------------------------------
def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _walk(
    graph: onnx.GraphProto,
    functions: Mapping[tuple[str, str], onnx.FunctionProto],
    prefix: str = "",
) -> Iterator[tuple[str, onnx.NodeProto]]:
    """Yield (display name, node) for every node, inlining local functions and subgraphs."""
    for index, node in enumerate(graph.node):
        name = prefix + (node.name or f"<unnamed {node.op_type} #{index}>")
        function = functions.get((node.domain, node.op_type))
        if function is not None:
            body = onnx.helper.make_graph(list(function.node), function.name, [], [])
            yield from _walk(body, functions, prefix=f"{name}/")
            continue
        yield name, node
        for attribute in node.attribute:
            subgraphs = list(attribute.graphs) + ([attribute.g] if attribute.HasField("g") else [])
            for sub in subgraphs:
                yield from _walk(sub, functions, prefix=f"{name}/{attribute.name}/")


def _pattern_problems(node: onnx.NodeProto) -> list[str]:
    """Restrictions from the operator table that show in the node itself."""
    op, found = node.op_type, []
    if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
        found.append(
            f"MaxPool with a second output (Indices) is not supported by TensorRT; {_REWRITE_HINT}"
        )
    if op == "MaxUnpool":
        found.append(f"MaxUnpool is not supported by TensorRT; {_REWRITE_HINT}")
    if op in ("MaxPool", "AveragePool", "LpPool"):
        if any(d != 1 for d in _attr(node, "dilations", [])):
            found.append(f"{op} with dilations {_attr(node, 'dilations')} (TensorRT needs 1)")
        kernel = _attr(node, "kernel_shape", [])
        if op != "LpPool" and len(kernel) not in (2, 3):
            found.append(f"{op} over {len(kernel)} spatial dims (TensorRT pools 2D or 3D only)")
    if op == "ScatterND" and _attr(node, "reduction", b"none") not in (b"none", "none"):
        found.append(
            f"ScatterND reduction={_attr(node, 'reduction')!r} (TensorRT supports 'none' only)"
        )
    if op == "Resize":
        mode = _attr(node, "mode", b"nearest")
        if mode not in (b"nearest", b"linear"):
            found.append(f"Resize mode={mode.decode()!r} (TensorRT supports nearest and linear)")
        if _attr(node, "antialias", 0):
            found.append("Resize with antialias=1 (unsupported by TensorRT)")
    if op == "TopK" and _attr(node, "sorted", 1) != 1:
        found.append("TopK with sorted=0 (TensorRT needs sorted=1)")
    if op == "LayerNormalization" and any(node.output[1:]):
        found.append("LayerNormalization with Mean/InvStdDev outputs (TensorRT supports Y only)")
    return found


def static_audit(model: onnx.ModelProto) -> tuple[int | None, list[NodeRecord], list[str]]:
    """Check every node against the operator table: (default-domain opset, nodes, problems)."""
    opset = next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), None)
    problems: list[str] = []
    if opset is not None and not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        problems.append(f"model opset {opset} is outside TensorRT's supported range {OPSET_RANGE}")
    functions = {(f.domain, f.name): f for f in model.functions}
    records: list[NodeRecord] = []
    for name, node in _walk(model.graph, functions):
        where = f"node {name!r} ({node.op_type})"
        if node.domain not in _DEFAULT_DOMAINS:
            status = "custom-domain"
            problems.append(
                f"{where}: domain {node.domain!r} is not ONNX; TensorRT needs a plugin for it"
            )
        elif node.op_type in SUPPORTED_OPS:
            status = "supported"
        elif node.op_type in UNSUPPORTED_OPS:
            status = "unsupported"
            if node.op_type != "MaxUnpool":  # has its own, more specific message below
                problems.append(f"{where}: not supported by TensorRT's ONNX parser")
        else:
            status = "unknown"
            problems.append(f"{where}: not in TensorRT's ONNX operator table ({TABLE_SOURCE})")
        problems.extend(f"{where}: {msg}" for msg in _pattern_problems(node))
        records.append(
            NodeRecord(name=name, op_type=node.op_type, domain=node.domain, status=status)
        )
    return opset, records, problems


# --- TensorRT parse and build: visionserve.export.trt_builder -------------------------------
def _tensorrt_problems(result: TensorRTResult) -> list[str]:
    problems = [
        f"node {e.node_name!r} ({e.op_type}): TensorRT parser: {e.message}"
        for e in result.parse_errors
    ]
    if result.parsed and not result.built:
        problems.append(
            f"TensorRT ({result.library} {result.version}, {result.target}) build failed: "
            f"{result.error}"
        )
    elif not result.parsed and not problems:
        problems.append(
            f"TensorRT ({result.library} {result.version}) could not parse the model: "
            f"{result.error}"
        )
    return problems


def audit_onnx(
    path: str | Path,
    *,
    profile: Mapping[str, ShapeProfile] | ShapeProfile | None = None,
    tensorrt: str = "auto",
    compute_capability: str = "8.6",
    keep_engine: bool = False,
) -> AuditReport:
    """Audit the ONNX model at ``path`` for TensorRT; see the module docstring.

    ``profile``: min/opt/max of the dynamic dims (one ShapeProfile for every input, or one
    per input name); default ``ShapeProfile()`` (batch 1/8/32). ``tensorrt``: which library
    parses and builds ("auto", "tensorrt", "tensorrt_rtx", "none"). ``compute_capability``:
    the TensorRT-RTX ahead-of-time target. ``keep_engine`` keeps the serialized engine on
    ``report.tensorrt.engine``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    model = onnx.load(str(path), load_external_data=False)  # the op audit needs no weights
    opset, nodes, problems = static_audit(model)
    report = AuditReport(path=str(path), opset=opset, nodes=nodes, problems=problems)
    trt = load_tensorrt(tensorrt)
    if trt is None:
        report.tensorrt_skipped = f"no TensorRT library importable (asked for {tensorrt!r})"
    else:
        try:
            result = engine_from_onnx_path(
                path,
                profile or ShapeProfile(),
                trt,
                compute_capability=compute_capability,
                keep_engine=keep_engine,
            )
        except ValueError as exc:  # profile does not cover the inputs
            report.problems.append(f"TensorRT build not attempted: {exc}")
        else:
            report.tensorrt = result
            report.problems.extend(_tensorrt_problems(result))
    logger.info(
        "audit %s: %d nodes, %d problems, tensorrt=%s",
        path,
        len(nodes),
        len(report.problems),
        report.tensorrt and (report.tensorrt.built, report.tensorrt.build_seconds),
    )
    return report

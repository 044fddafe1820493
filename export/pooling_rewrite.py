"""ONNX-level rewrite of max pooling with indices and max unpooling into ops TensorRT parses.

TensorRT's ONNX parser rejects ``MaxUnpool`` and the second (``Indices``) output of
``MaxPool`` (onnx-tensorrt ``docs/operators.md``). :func:`rewrite_pooling` replaces both,
wherever they appear in a graph -- an imported ONNX file, a ``torch.export`` program, a zoo
model -- with subgraphs of ``Shape``, ``Slice``, ``Concat``, ``ReduceMax``/``ReduceMin``,
``Equal``, ``Where``, ``Gather``, ``Range``, arithmetic, ``Expand`` and ``ScatterElements``,
all in TensorRT's supported set, and bit-exact:

* ``MaxPool`` keeps its values output; its ``Indices`` become the ONNX ones (flattened over
  the whole NCHW input, ``((n * C + c) * H + h) * W + w``), the first maximum in row-major
  window order on ties (PyTorch's and ONNX Runtime's rule). Consumers of the indices --
  PyTorch exporters subtract a per-plane offset, ``MaxUnpool``, ``ScatterND`` -- are unchanged.
* ``MaxUnpool`` becomes a ``ScatterElements`` of the values into a zero plane of the output
  size (its ``output_shape`` input, or the default ``(in - 1) * stride - pads + kernel``).

Node names: the kept ``MaxPool`` (values only) keeps its name ``P`` (or, unnamed, its
output's name is ``P``) and every node computing its indices is named ``P/...``; the
nodes replacing a ``MaxUnpool`` ``U`` are named ``U/...``. :func:`indices_subgraphs` finds
the indices subgraphs by these names (``export/receptive_field.py`` reads the indices'
positions from them: the argmax arithmetic itself says nothing a graph walk can read).

Supported: 2-D pooling (NCHW), any kernel and stride, ``pads`` 0, ``dilations`` 1,
``ceil_mode`` 0, ``storage_order`` 0, dynamic batch and H, W; opset 13 or later (older
graphs are converted first). Anything else raises :class:`UnsupportedPoolingError` naming
the node (or, with ``strict=False`` as export and import call it, is left for the op audit
to report). NaN inputs are not supported (a NaN maximum has no index here).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

logger = logging.getLogger(__name__)

__all__ = ["IndicesSubgraph", "UnsupportedPoolingError", "indices_subgraphs",
           "needs_pooling_rewrite", "rewrite_pooling"]

MIN_OPSET = 13
_BIG = np.iinfo(np.int64).max


class UnsupportedPoolingError(ValueError):
    """A pooling/unpooling node this rewrite cannot express exactly (the message names it)."""


def _opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _pool_with_indices(node: onnx.NodeProto) -> bool:
    return node.op_type == "MaxPool" and node.domain in ("", "ai.onnx") and len(node.output) > 1 \
        and bool(node.output[1])


def needs_pooling_rewrite(model: onnx.ModelProto) -> bool:
    """Whether the graph holds ``MaxPool`` with an indices output or ``MaxUnpool``."""
    return any(_pool_with_indices(n) or n.op_type == "MaxUnpool" for n in model.graph.node)


@dataclass
class _Builder:
    """Adds nodes and constants with names unique in the graph."""

    prefix: str
    opset: int
    taken: set[str]
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    constants: list[onnx.TensorProto] = field(default_factory=list)
    count: int = 0

    def name(self, hint: str) -> str:
        while True:
            self.count += 1
            candidate = f"{self.prefix}/{hint}_{self.count}"
            if candidate not in self.taken:
                self.taken.add(candidate)
                return candidate

    def const(self, value: np.ndarray | int | float, hint: str = "c") -> str:
        array = np.asarray(value)
        name = self.name(hint)
        self.constants.append(numpy_helper.from_array(array, name))
        return name

    def ints(self, values: list[int] | int, hint: str = "i") -> str:
        return self.const(np.asarray(values, np.int64), hint)

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs: object) -> str:
        out = output or self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.name(op_type), **attrs))
        return out

    def slice(self, x: str, starts: list[int] | str, ends: list[int] | str, axes: list[int],
              steps: list[int] | None = None) -> str:
        inputs = [x, starts if isinstance(starts, str) else self.ints(starts),
                  ends if isinstance(ends, str) else self.ints(ends), self.ints(axes)]
        if steps is not None:
            inputs.append(self.ints(steps))
        return self.op("Slice", inputs)

    def reduce(self, op_type: str, x: str, axis: int, keepdims: int) -> str:
        if self.opset >= 18:
            return self.op(op_type, [x, self.ints([axis])], keepdims=keepdims)
        return self.op(op_type, [x], axes=[axis], keepdims=keepdims)

    def unsqueeze(self, x: str, axis: int) -> str:
        return self.op("Unsqueeze", [x, self.ints([axis])])

    def scalar(self, x: str) -> str:
        """A one-element 1-D tensor as a scalar."""
        return self.op("Squeeze", [x, self.ints([0])])

    def plane_base(self, shape: str, plane: str) -> str:
        """``(n * C + c) * plane`` shaped (N, C, 1, 1) from the NCHW ``shape``; ``plane``: [1]."""
        n, c = self.slice(shape, [0], [1], [0]), self.slice(shape, [1], [2], [0])
        count = self.scalar(self.op("Mul", [n, c]))
        planes = self.op("Range", [self.const(np.int64(0)), count, self.const(np.int64(1))])
        base = self.op("Mul", [planes, self.scalar(plane)])
        target = self.op("Concat", [n, c, self.ints([1, 1])], axis=0)
        return self.op("Reshape", [base, target])


@dataclass(frozen=True)
class IndicesSubgraph:
    """The nodes this rewrite added to compute the ``indices`` of the kept MaxPool ``pool``."""

    pool: onnx.NodeProto
    indices: str
    nodes: frozenset[str]


def indices_subgraphs(graph: onnx.GraphProto) -> list[IndicesSubgraph]:
    """The indices subgraphs of a rewritten graph (see "Node names" in the module docstring):
    for each single-output MaxPool ``P``, the nodes named ``P/...``, and the one tensor they
    compute that is used outside them (or is a graph output): the indices."""
    found = []
    for pool in graph.node:
        if pool.op_type != "MaxPool" or len(pool.output) != 1:
            continue
        prefix = f"{pool.name or pool.output[0]}/"
        members = [n for n in graph.node if n.name.startswith(prefix)]
        if not members:
            continue
        made = {o for n in members for o in n.output}
        read = {i for n in members for i in n.input}
        used_outside = {i for n in graph.node if not n.name.startswith(prefix) for i in n.input}
        leaving = sorted(made & (used_outside | {o.name for o in graph.output}))
        if len(leaving) != 1 or pool.input[0] not in read:
            raise UnsupportedPoolingError(
                f"the nodes named {prefix}... are not this rewrite's indices of MaxPool "
                f"{pool.name!r}: expected them to read its input {pool.input[0]!r} and to give "
                f"one tensor used elsewhere, got {leaving}")
        found.append(IndicesSubgraph(pool, leaving[0], frozenset(n.name for n in members)))
    return found


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _check_pool(node: onnx.NodeProto, attrs: dict[str, object]) -> tuple[list[int], list[int]]:
    kernel = list(attrs.get("kernel_shape", []))
    strides = list(attrs.get("strides", [1] * len(kernel)))
    problems = []
    if len(kernel) != 2:
        problems.append(f"kernel_shape {kernel} (need 2-D pooling)")
    if any(int(p) != 0 for p in attrs.get("pads", [])):
        problems.append(f"pads {list(attrs['pads'])} (need 0)")
    if any(int(d) != 1 for d in attrs.get("dilations", [])):
        problems.append(f"dilations {list(attrs['dilations'])} (need 1)")
    if int(attrs.get("ceil_mode", 0)):
        problems.append("ceil_mode 1 (need 0)")
    if int(attrs.get("storage_order", 0)):
        problems.append("storage_order 1 (need 0, row major)")
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    if auto_pad not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
        problems.append(f"auto_pad {auto_pad!r} (need NOTSET or VALID)")
    if problems:
        raise UnsupportedPoolingError(
            f"{node.op_type} node {node.name or node.output[0]!r}: cannot rewrite for TensorRT with "
            + ", ".join(problems))
    return [int(k) for k in kernel], [int(s) for s in strides]


def _pool_indices(b: _Builder, x: str, values: str, indices: str, kernel: list[int],
                  strides: list[int]) -> None:
    """Nodes computing ``indices`` of MaxPool(``x``) -> ``values`` (see the module docstring)."""
    shape_x, shape_y = b.op("Shape", [x]), b.op("Shape", [values])
    out_hw = b.slice(shape_y, [2], [4], [0])
    taps = []
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            tap = b.slice(x, [i, j], [_BIG, _BIG], [2, 3], strides)
            taps.append(b.unsqueeze(b.slice(tap, b.ints([0, 0]), out_hw, [2, 3]), 4))
    windows = b.op("Concat", taps, axis=4)  # (N, C, oh, ow, K), row-major window order
    top = b.reduce("ReduceMax", windows, 4, 1)
    count = kernel[0] * kernel[1]
    where = b.op("Where", [b.op("Equal", [windows, top]), b.ints(list(range(count))), b.ints(count)])
    first = b.reduce("ReduceMin", where, 4, 0)  # (N, C, oh, ow): first maximum
    tap_row = b.op("Gather", [b.ints([t // kernel[1] for t in range(count)]), first])
    tap_col = b.op("Gather", [b.ints([t % kernel[1] for t in range(count)]), first])
    zero, one = b.const(np.int64(0)), b.const(np.int64(1))
    rows = b.op("Range", [zero, b.scalar(b.slice(shape_y, [2], [3], [0])), one])
    cols = b.op("Range", [zero, b.scalar(b.slice(shape_y, [3], [4], [0])), one])
    rows = b.unsqueeze(b.op("Mul", [rows, b.ints(strides[0])]), 1)  # (oh, 1)
    cols = b.op("Mul", [cols, b.ints(strides[1])])  # (ow,)
    width = b.slice(shape_x, [3], [4], [0])
    plane = b.op("Add", [b.op("Mul", [b.op("Add", [rows, tap_row]), width]), b.op("Add", [cols, tap_col])])
    area = b.op("Mul", [b.slice(shape_x, [2], [3], [0]), width])
    b.op("Add", [plane, b.plane_base(shape_x, area)], output=indices)


def _unpool(b: _Builder, node: onnx.NodeProto, elem_type: int) -> None:
    attrs = _attrs(node)
    kernel, strides = [int(k) for k in attrs.get("kernel_shape", [])], None
    strides = [int(s) for s in attrs.get("strides", [1] * len(kernel))]
    pads = [int(p) for p in attrs.get("pads", [0] * 2 * len(kernel))]
    if len(kernel) != 2:
        raise UnsupportedPoolingError(f"MaxUnpool node {node.name or node.output[0]!r}: kernel_shape "
                                      f"{kernel} (need 2-D unpooling)")
    x, idx = node.input[0], node.input[1]
    shape_x = b.op("Shape", [x])
    nc = b.slice(shape_x, [0], [2], [0])
    if len(node.input) > 2 and node.input[2]:
        out_hw = b.slice(b.op("Cast", [node.input[2]], to=TensorProto.INT64), [2], [4], [0])
    else:  # (in - 1) * stride - pad_begin - pad_end + kernel
        extra = [kernel[a] - pads[a] - pads[a + 2] for a in range(2)]
        out_hw = b.op("Add", [b.op("Mul", [b.op("Sub", [b.slice(shape_x, [2], [4], [0]), b.ints(1)]),
                                           b.ints(strides)]), b.ints(extra)])
    area = b.op("Mul", [b.slice(out_hw, [0], [1], [0]), b.slice(out_hw, [1], [2], [0])])
    flat = b.op("Concat", [nc, b.ints([-1])], axis=0)
    base = b.op("Reshape", [b.plane_base(shape_x, area), b.op("Concat", [nc, b.ints([1])], axis=0)])
    plane_idx = b.op("Sub", [b.op("Reshape", [b.op("Cast", [idx], to=TensorProto.INT64), flat]), base])
    zero = b.const(np.zeros((), onnx.helper.tensor_dtype_to_np_dtype(elem_type)), "zero")
    zeros = b.op("Expand", [zero, b.op("Concat", [nc, area], axis=0)])
    scattered = b.op("ScatterElements", [zeros, plane_idx, b.op("Reshape", [x, flat])], axis=2)
    b.op("Reshape", [scattered, b.op("Concat", [nc, out_hw], axis=0)], output=node.output[0])


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


def _rewrite_node(node: onnx.NodeProto, b: _Builder, types: dict[str, int]) -> list[onnx.NodeProto]:
    """The nodes replacing ``node`` (raises :class:`UnsupportedPoolingError` before adding any)."""
    if node.op_type == "MaxUnpool":
        _unpool(b, node, types.get(node.input[0], TensorProto.FLOAT) or TensorProto.FLOAT)
        return b.nodes
    kernel, strides = _check_pool(node, _attrs(node))
    pool = onnx.NodeProto.FromString(node.SerializeToString())
    del pool.output[1:]
    for i in [i for i, a in enumerate(pool.attribute) if a.name == "storage_order"][::-1]:
        del pool.attribute[i]
    _pool_indices(b, node.input[0], node.output[0], node.output[1], kernel, strides)
    return [pool, *b.nodes]


def rewrite_pooling(model: onnx.ModelProto, *, strict: bool = True) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with every ``MaxPool`` indices output and every ``MaxUnpool``
    rewritten (see the module docstring); returns ``(model, number of nodes rewritten)``.

    A node this rewrite cannot express raises :class:`UnsupportedPoolingError`, or with
    ``strict=False`` is kept as it is (logged): the op audit then names it, and
    ``--allow-unsupported`` can still write the model for ONNX Runtime.
    """
    if not needs_pooling_rewrite(model):
        return model, 0
    model = onnx.ModelProto.FromString(model.SerializeToString())
    if _opset(model) < MIN_OPSET:
        model = onnx.version_converter.convert_version(model, MIN_OPSET)
    types = _elem_types(model)
    taken = {o for n in model.graph.node for o in n.output} | {n.name for n in model.graph.node}
    taken |= {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input}
    nodes, rewritten = [], 0
    for node in model.graph.node:
        if not (_pool_with_indices(node) or node.op_type == "MaxUnpool"):
            nodes.append(node)
            continue
        b = _Builder(prefix=node.name or node.output[0], opset=_opset(model), taken=taken)
        try:
            nodes.extend(_rewrite_node(node, b, types))
        except UnsupportedPoolingError as exc:
            if strict:
                raise
            logger.warning("kept as it is: %s", exc)
            nodes.append(node)
            continue
        model.graph.initializer.extend(b.constants)
        rewritten += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    logger.info("rewrote %d MaxPool-with-indices / MaxUnpool node(s) for TensorRT", rewritten)
    return model, rewritten

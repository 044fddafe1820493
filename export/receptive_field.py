"""Theoretical receptive field of an ONNX graph: which input pixels an output pixel can see.

Every tensor with spatial axes carries, per axis (H, W), a :class:`Span`: output position
``o`` of that tensor depends on input pixels ``o * jump + lo .. o * jump + hi`` (input
pixel units; ``jump`` is the tensor's stride in input pixels, a ``Fraction`` once a
decoder upsamples). The graph is walked once in topological order:

- ``Conv``, ``MaxPool``/``AveragePool``/``LpPool``: kernel ``k``, stride ``s``, dilation
  ``d``, leading pad ``p`` -> ``lo += -p * jump``, ``hi += (-p + (k - 1) d) * jump``,
  ``jump *= s``;
- ``ConvTranspose``: output ``o`` reads inputs ``(o + p - m d) / s``: ``lo += (p - (k - 1) d)
  * jump / s``, ``hi += p * jump / s``, ``jump /= s``;
- ``Resize``/``Upsample``: scale from constant ``scales``, or from a ``sizes`` taken off
  another tensor's ``Shape``; nearest reads one pixel, linear two, cubic four;
- ``Slice`` with a step on a spatial axis (the max-pooling-with-indices rewrite's
  taps), ``Pad`` (leading pads shift; pads computed at run time are taken as trailing,
  which is how the export pads to a size multiple);
- max-pooling indices and max-unpooling, as exported (``MaxPool`` with an ``Indices``
  output, ``MaxUnpool``) or rewritten for TensorRT (``export/pooling_rewrite.py``: its
  indices subgraph is recognised by its node names, see :func:`indices_subgraphs`; the
  unpooling is a ``ScatterElements``/``ScatterND`` of the values into a zero plane, the
  indices flattened, plane offsets added or subtracted from shapes alone). The indices
  carry, besides their span, the pooling they point into (:class:`_Window`); an unpooling
  places each value at its index (see :meth:`_Window.unpool` for the span);
- element-wise ops, concatenation and reductions over other axes take the union of
  their inputs' spans; a reduction over the spatial axes (global pooling, ``Flatten``
  before a classifier head) ends them.

The receptive field of the model is the span of its spatial outputs (segmenters), or the
union of the spans that reached a global reduction (classifiers). ``radius``: how far,
in input pixels, an output pixel can see to either side; ``stride``: the largest jump
of any tensor (the output stride of the encoder: 32 for ResNet-18, 8 for a 3-level
UNet). Torch-free: ``onnx`` only. ``UnsupportedGraph`` names the node it cannot read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction

import onnx
from onnx import numpy_helper
from visionserve.export.pooling_rewrite import indices_subgraphs
from visionserve.server.model_config import ReceptiveField

__all__ = ["ReceptiveField", "Span", "UnsupportedGraph", "receptive_field"]

SPATIAL_OPS_END = {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "Flatten", "Gemm", "MatMul"}
ELEMENTWISE = {
    "Abs", "Add", "And", "BatchNormalization", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Div",
    "Dropout", "Elu", "Equal", "Erf", "Exp", "Floor", "Gelu", "Greater", "GreaterOrEqual",
    "HardSigmoid", "HardSwish", "Identity", "InstanceNormalization", "IsNaN", "LeakyRelu", "Less",
    "LessOrEqual", "Log", "LogSoftmax", "LpNormalization", "Max", "Mean", "Min", "Mish", "Mod",
    "Mul", "Neg", "Not", "Or", "PRelu", "Pow", "QuantizeLinear", "DequantizeLinear", "Reciprocal",
    "Relu", "Round", "Selu", "Sigmoid", "Sign", "Softmax", "Softplus", "Softsign", "Sqrt", "Sub",
    "Sum", "Tanh", "ThresholdedRelu", "Where", "Xor", "Expand", "Hardmax", "Shrink",
    "LayerNormalization", "GroupNormalization", "LRN", "MeanVarianceNormalization",
}
REDUCTIONS = {"ReduceMax", "ReduceMin", "ReduceMean", "ReduceSum", "ReduceProd", "ReduceL1",
              "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin"}
KERNELS = {"Conv", "MaxPool", "AveragePool", "LpPool"}
POSITION_KEEPING = {"Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze"}  # indices stay indices


class UnsupportedGraph(ValueError):
    """The graph has a node whose effect on the receptive field this module cannot read."""


@dataclass(frozen=True)
class Span:
    """Position ``o`` of a tensor axis reads input pixels ``o * jump + lo .. o * jump + hi``."""

    jump: Fraction = Fraction(1)
    lo: Fraction = Fraction(0)
    hi: Fraction = Fraction(0)

    def union(self, other: Span) -> Span:
        if self.jump != other.jump:
            raise UnsupportedGraph(f"inputs on different grids (strides {self.jump} and {other.jump})")
        return Span(self.jump, min(self.lo, other.lo), max(self.hi, other.hi))


@dataclass(frozen=True)
class _Geo:
    """Spans of H and W, and where they sit: ``axes`` negative indices (H, W), or one index
    for a flattened H*W plane."""

    h: Span
    w: Span
    axes: tuple[int, ...]

    def union(self, other: _Geo) -> _Geo:
        axes = self.axes if len(self.axes) >= len(other.axes) else other.axes
        return _Geo(self.h.union(other.h), self.w.union(other.w), axes)

    def map(self, fn: object) -> _Geo:
        return replace(self, h=fn(self.h, 0), w=fn(self.w, 1))  # type: ignore[operator]


@dataclass(frozen=True)
class _Window:
    """What max-pooling indices point at: pooled position ``q`` holds the index of one of the
    positions ``q * s - p + m * d`` (``m`` in ``0 .. k - 1``) of the pooled tensor, the
    ``plane``; ``kernel``, ``strides``, ``pads`` (leading), ``dilations`` per axis (H, W)."""

    plane: _Geo
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int]
    dilations: tuple[int, int]

    def unpool(self, source: _Geo) -> _Geo:
        """Max-unpooling: the span of the plane-sized output.

        Output position ``u`` (on the plane's grid, jump ``J``) receives the value of every
        pooled ``q`` whose index is ``u``; ``q``'s index is one of its window's positions, so
        ``u = q * s - p + m * d`` for some ``m`` in ``0 .. k - 1``: ``q * s * J`` lies in
        ``u * J + [(p - (k - 1) d) J, p J]``. What ``u`` holds depends on those ``q``'s values
        and on their indices, i.e. on ``source`` (the values' span united with the indices',
        which is the pooling's own window over the plane: the argmax reads the whole window;
        both on the pooled grid, jump ``s * J``). So ``lo = source.lo + (p - (k - 1) d) J``,
        ``hi = source.hi + p J``: the window's extent at the pool's stride, the same shape as
        a ``ConvTranspose`` of kernel ``k`` and stride ``s``. For 2x2 stride-2 pooling an output
        pixel sees its pooled pixel (``u // 2``) and, through the index, the 2x2 window of
        pre-pool activations it lies in.
        """

        def step(span: Span, i: int) -> Span:
            k, s, p, d = self.kernel[i], self.strides[i], self.pads[i], self.dilations[i]
            jump = (self.plane.h, self.plane.w)[i].jump
            if span.jump != jump * s:
                raise UnsupportedGraph(f"values unpooled from a grid of stride {span.jump}; their "
                                       f"indices pool a plane of stride {jump} by {s}")
            return Span(jump, span.lo + (p - (k - 1) * d) * jump, span.hi + p * jump)

        return source.map(step)


def _union(geos: list[_Geo]) -> _Geo:
    out = geos[0]
    for geo in geos[1:]:
        out = out.union(geo)
    return out


def _finest(geos: list[_Geo]) -> _Geo:
    return min(geos, key=lambda g: (g.h.jump, g.w.jump))


class _Walker:
    """One pass over a shape-inferred graph, keeping a ``_Geo`` per spatial tensor, a
    ``_Window`` per tensor of max-pooling indices and, for shape arithmetic, the ``_Geo`` of
    the tensor whose ``Shape`` it came from."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.rank = {v.name: len(v.type.tensor_type.shape.dim)
                     for v in [*graph.value_info, *graph.input, *graph.output]
                     if v.type.tensor_type.HasField("shape")}
        self.geo: dict[str, _Geo] = {}
        self.points: dict[str, _Window] = {}
        self.shape_of: dict[str, _Geo] = {}
        self.rewritten = {sub.pool.output[0]: sub for sub in indices_subgraphs(graph)}
        self.skip = {name for sub in self.rewritten.values() for name in sub.nodes}
        self.ended: list[_Geo] = []
        self.jumps: list[Fraction] = [Fraction(1)]
        image = graph.input[0].name
        self.geo[image] = _Geo(Span(), Span(), (-2, -1))

    # -- helpers --------------------------------------------------------------------------
    def const(self, name: str) -> list[float] | None:
        if name in self.consts:
            return [v.item() for v in self.consts[name].reshape(-1)]
        return None

    def neg_axis(self, axis: int, name: str) -> int:
        return axis if axis < 0 else axis - self.rank[name]

    def set(self, name: str, geo: _Geo) -> None:
        self.geo[name] = geo
        self.jumps += [geo.h.jump, geo.w.jump]

    # -- the walk -------------------------------------------------------------------------
    def node(self, node: onnx.NodeProto) -> None:
        op = node.op_type
        if node.name in self.skip:  # the rewrite's indices arithmetic: read from its pool
            return
        if op == "Constant":
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if attr is not None:
                self.consts[node.output[0]] = numpy_helper.to_array(attr.t)
            return
        inputs = [self.geo[i] for i in node.input if i in self.geo]
        if op == "Shape":
            if inputs:
                self.shape_of[node.output[0]] = inputs[0]
            return
        if not inputs:  # shape arithmetic: remember which tensor's shape it measures
            tags = [self.shape_of[i] for i in node.input if i in self.shape_of]
            if tags:
                for out in node.output:
                    self.shape_of[out] = _finest(tags)
            return
        try:
            geo = self.apply(node, inputs)
        except UnsupportedGraph as exc:
            raise UnsupportedGraph(f"node {node.name or '?'} ({op}): {exc}") from None
        if geo is not None:
            for out in node.output[:1] if op in KERNELS | {"Dropout"} else node.output:
                self.set(out, geo)
        self._carry_points(node)
        if op == "MaxPool":
            self._pool_indices(node, inputs[0])

    def _carry_points(self, node: onnx.NodeProto) -> None:
        """Indices stay indices through casts and reshapes, and through adding or subtracting
        a tensor computed from shapes alone: the per-plane offset ``(n * C + c) * H * W`` that
        exporters add or remove to go between whole-tensor and per-plane indices."""
        carried = [self.points[i] for i in node.input if i in self.points]
        if not carried:
            return
        offsets_only = all(i in self.points or i in self.shape_of or i == "" for i in node.input)
        if (node.op_type in POSITION_KEEPING and node.input[0] in self.points) or (
                node.op_type in ("Add", "Sub") and len(carried) == 1 and offsets_only):
            self.points[node.output[0]] = carried[0]

    def _pool_indices(self, node: onnx.NodeProto, plane: _Geo) -> None:
        """The indices of a MaxPool: its second output, or the rewrite's subgraph for it."""
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        sub = self.rewritten.get(node.output[0])
        indices = sub.indices if sub else (node.output[1] if len(node.output) > 1 else "")
        if not indices:
            return
        kernel, strides = list(attrs["kernel_shape"]), list(attrs.get("strides", [1, 1]))
        dilations = list(attrs.get("dilations", [1, 1]))
        if math.prod(kernel) == 1:  # one tap: each index is its own position, from shapes alone
            self.shape_of[indices] = plane
            return
        pads = self._pads(attrs, kernel, strides, dilations)
        self.set(indices, self.geo[node.output[0]])  # the argmax reads the whole window
        self.points[indices] = _Window(plane, tuple(kernel), tuple(strides), tuple(pads),
                                       tuple(dilations))

    def apply(self, node: onnx.NodeProto, inputs: list[_Geo]) -> _Geo | None:
        op, first = node.op_type, self.geo.get(node.input[0])
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if op in SPATIAL_OPS_END:
            self.ended.append(_union(inputs))
            return None
        if op in ELEMENTWISE or (op == "Concat" and not self._hits(node, [attrs["axis"]])):
            return _union(inputs)
        if op in ("ScatterElements", "ScatterND"):
            return self._scatter(node)
        if first is None:
            raise UnsupportedGraph("its spatial input is not its first input")
        if op in KERNELS:
            return self._kernel(node, first, attrs)
        handler = getattr(self, f"_{op.lower()}", None)
        if handler is None:
            raise UnsupportedGraph("op not understood on a spatial tensor")
        return handler(node, first, attrs, inputs)

    def _hits(self, node: onnx.NodeProto, axes: list) -> bool:
        """Whether ``axes`` of the node's (first spatial) input include a spatial axis."""
        name = next(i for i in node.input if i in self.geo)
        return any(self.neg_axis(int(a), name) in self.geo[name].axes for a in axes)

    # -- spatial ops ----------------------------------------------------------------------
    def _kernel(self, node: onnx.NodeProto, geo: _Geo, attrs: dict) -> _Geo:
        if len(geo.axes) != 2:
            raise UnsupportedGraph("a kernel over a flattened H*W plane")
        kernel = attrs.get("kernel_shape") or list(self.consts[node.input[1]].shape[2:])
        strides = attrs.get("strides", [1, 1])
        dilations = attrs.get("dilations", [1, 1])
        pads = self._pads(attrs, kernel, strides, dilations)

        def step(span: Span, i: int) -> Span:
            k, s, d, p = kernel[i], strides[i], dilations[i], pads[i]
            return Span(span.jump * s, span.lo - p * span.jump, span.hi + (-p + (k - 1) * d) * span.jump)

        return geo.map(step)

    @staticmethod
    def _pads(attrs: dict, kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
        auto = attrs.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            total = [(k - 1) * d + 1 - s for k, s, d in zip(kernel, strides, dilations, strict=True)]
            return [max(0, t) // 2 if auto == "SAME_UPPER" else -(-max(0, t) // 2) for t in total]
        return list(attrs.get("pads", [0, 0, 0, 0]))[:2]

    def _convtranspose(self, node: onnx.NodeProto, geo: _Geo, attrs: dict, _: list) -> _Geo:
        kernel = attrs.get("kernel_shape") or list(self.consts[node.input[1]].shape[2:])
        strides = attrs.get("strides", [1, 1])
        dilations = attrs.get("dilations", [1, 1])
        pads = list(attrs.get("pads", [0, 0, 0, 0]))[:2]

        def step(span: Span, i: int) -> Span:
            k, s, d, p = kernel[i], strides[i], dilations[i], pads[i]
            unit = span.jump / s
            return Span(unit, span.lo + (p - (k - 1) * d) * unit, span.hi + p * unit)

        return geo.map(step)

    def _resize(self, node: onnx.NodeProto, geo: _Geo, attrs: dict, _: list) -> _Geo:
        scales = self._resize_scales(node, geo)
        mode = attrs.get("mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        reach = {"nearest": 1, "linear": 1, "bilinear": 1, "cubic": 2}.get(mode, 2)

        def step(span: Span, i: int) -> Span:
            unit = span.jump / scales[i]
            # the source coordinate of o lies within one input pixel of o / scale; the
            # interpolation reads up to ``reach`` pixels either side of it
            return Span(unit, span.lo - reach * span.jump, span.hi + reach * span.jump)

        return geo.map(step)

    _upsample = _resize

    def _resize_scales(self, node: onnx.NodeProto, geo: _Geo) -> list[Fraction]:
        index = 1 if node.op_type == "Upsample" else 2
        names = list(node.input) + ["", ""]
        scales = self.const(names[index]) if names[index] else None
        if scales:
            return [Fraction(scales[-2]).limit_denominator(1000), Fraction(scales[-1]).limit_denominator(1000)]
        sizes = names[3] if node.op_type == "Resize" else ""
        target = self.shape_of.get(sizes) if sizes else None
        if target is None:
            raise UnsupportedGraph("Resize without constant scales or sizes from another tensor's shape")
        return [geo.h.jump / target.h.jump, geo.w.jump / target.w.jump]

    def _slice(self, node: onnx.NodeProto, geo: _Geo, attrs: dict, _: list) -> _Geo:
        names = list(node.input) + [""] * 5
        starts = self.const(names[1])
        axes = self.const(names[3]) if names[3] else list(range(len(starts or [])))
        steps = self.const(names[4]) if names[4] else [1] * len(axes or [])
        if starts is None or axes is None or steps is None:
            if axes is None or self._hits(node, axes):
                raise UnsupportedGraph("Slice of a spatial axis with starts or steps computed at run time")
            return geo
        spans = {geo.axes[0]: geo.h, geo.axes[-1]: geo.w} if len(geo.axes) == 2 else {}
        if len(geo.axes) == 1 and any(self.neg_axis(int(a), node.input[0]) in geo.axes for a in axes):
            raise UnsupportedGraph("Slice of a flattened H*W plane")
        for a, start, step in zip(axes, starts, steps, strict=True):
            axis = self.neg_axis(int(a), node.input[0])
            if axis in spans:
                if step < 1 or start < 0:
                    raise UnsupportedGraph("Slice of a spatial axis backwards or from the end")
                span = spans[axis]
                spans[axis] = Span(span.jump * int(step), span.lo + int(start) * span.jump,
                                   span.hi + int(start) * span.jump)
        if len(geo.axes) != 2:
            return geo
        return _Geo(spans[geo.axes[0]], spans[geo.axes[1]], geo.axes)

    def _pad(self, node: onnx.NodeProto, geo: _Geo, attrs: dict, _: list) -> _Geo:
        pads = attrs.get("pads") or (self.const(node.input[1]) if len(node.input) > 1 else None)
        if pads is None or len(geo.axes) != 2:
            return geo  # computed at run time: trailing pads (the export's pad to a multiple)
        rank = self.rank[node.input[0]]
        begin = {axis - rank: int(pads[axis]) for axis in range(rank)}
        return _Geo(*(Span(s.jump, s.lo - begin[a] * s.jump, s.hi - begin[a] * s.jump)
                      for s, a in ((geo.h, geo.axes[0]), (geo.w, geo.axes[1]))), geo.axes)

    def _unsqueeze(self, node: onnx.NodeProto, geo: _Geo, attrs: dict, _: list) -> _Geo:
        axes = attrs.get("axes") or self.const(node.input[1])
        rank = self.rank[node.input[0]]
        out_rank = rank + len(axes)
        inserted = sorted(int(a) % out_rank for a in axes)
        slots = [i for i in range(out_rank) if i not in inserted]
        return replace(geo, axes=tuple(slots[a + rank] - out_rank for a in geo.axes))

    def _squeeze(self, node: onnx.NodeProto, geo: _Geo, attrs: dict, _: list) -> _Geo:
        axes = attrs.get("axes") or (self.const(node.input[1]) if len(node.input) > 1 else None)
        if axes is None:
            raise UnsupportedGraph("Squeeze without explicit axes")
        return self._drop_axes(node, geo, axes)

    def _drop_axes(self, node: onnx.NodeProto, geo: _Geo, axes: list) -> _Geo:
        dropped = {self.neg_axis(int(a), node.input[0]) for a in axes}
        if dropped & set(geo.axes):
            raise UnsupportedGraph("removes a spatial axis")
        return replace(geo, axes=tuple(a + sum(1 for d in dropped if d > a) for a in geo.axes))

    def _reduce(self, node: onnx.NodeProto, geo: _Geo, attrs: dict, _: list) -> _Geo | None:
        if node.op_type in ("ArgMax", "ArgMin"):
            axes = [attrs.get("axis", 0)]
        else:
            axes = attrs.get("axes") or (self.const(node.input[1]) if len(node.input) > 1 else None)
        if axes is None or self._hits(node, axes):
            self.ended.append(geo)
            return None
        return geo if attrs.get("keepdims", 1) else self._drop_axes(node, geo, axes)

    def _transpose(self, node: onnx.NodeProto, geo: _Geo, attrs: dict, _: list) -> _Geo:
        rank = self.rank[node.input[0]]
        perm = list(attrs.get("perm", reversed(range(rank))))
        return replace(geo, axes=tuple(perm.index(a + rank) - rank for a in geo.axes))

    def _reshape(self, node: onnx.NodeProto, geo: _Geo, attrs: dict, _: list) -> _Geo:
        rank_in, rank_out = self.rank[node.input[0]], self.rank[node.output[0]]
        if geo.axes == (-2, -1) and rank_out < rank_in:
            return replace(geo, axes=(-1,))  # H, W (and the axes before) flattened into the last
        if geo.axes == (-1,) and rank_out > rank_in:
            return replace(geo, axes=(-2, -1))  # a flattened plane back to H, W
        if rank_in == rank_out and self.const(node.input[1]) is None:
            return geo  # same rank, shape from the input's own Shape: taken as a no-op
        raise UnsupportedGraph(f"Reshape of a spatial tensor from rank {rank_in} to {rank_out}")

    def _scatter(self, node: onnx.NodeProto) -> _Geo:
        """Max-unpooling as a scatter (``ScatterElements`` over a flattened plane, the
        rewrite's; ``ScatterND`` into a flattened tensor, PyTorch's decomposition): the
        ``updates`` land at the ``indices``, pooling indices (:meth:`_Window.unpool`), in
        ``data`` (a zero plane, or a tensor on the plane's grid)."""
        data, indices, updates = node.input[:3]
        window = self.points.get(indices)
        if window is None:
            raise UnsupportedGraph("a scatter whose indices are not max-pooling indices")
        placed = window.unpool(_union([self.geo[i] for i in (updates, indices) if i in self.geo]))
        if updates in self.geo:
            placed = replace(placed, axes=self.geo[updates].axes)
        return placed.union(self.geo[data]) if data in self.geo else placed

    def _maxunpool(self, node: onnx.NodeProto, geo: _Geo, attrs: dict, _: list) -> _Geo:
        window = self.points.get(node.input[1])
        if window is None:
            raise UnsupportedGraph("MaxUnpool whose indices are not a MaxPool's")
        return replace(window.unpool(geo.union(self.geo[node.input[1]])), axes=geo.axes)

    def _concat(self, node: onnx.NodeProto, geo: _Geo, attrs: dict, _: list) -> _Geo:
        raise UnsupportedGraph("Concat along a spatial axis")


for _name in REDUCTIONS:
    setattr(_Walker, f"_{_name.lower()}", _Walker._reduce)
del _name


def receptive_field(model: onnx.ModelProto) -> ReceptiveField:
    """The receptive field of ``model`` (its first input is the NCHW image).

    Raises ``UnsupportedGraph`` (naming the node) when a node's effect cannot be read.
    """
    model = onnx.shape_inference.infer_shapes(model)
    walker = _Walker(model)
    for node in model.graph.node:
        walker.node(node)
    finals = [walker.geo[o.name] for o in model.graph.output if o.name in walker.geo]
    finals = finals or walker.ended
    if not finals:
        raise UnsupportedGraph("no output depends on the image's spatial axes")
    same_grid = len({(g.h.jump, g.w.jump) for g in finals}) == 1
    geo = _union(finals) if same_grid else _finest(finals)
    lo, hi = min(geo.h.lo, geo.w.lo), max(geo.h.hi, geo.w.hi)
    size = max(geo.h.hi - geo.h.lo, geo.w.hi - geo.w.lo) + 1
    return ReceptiveField(size=math.ceil(size), radius=math.ceil(max(-lo, hi)),
                          stride=math.ceil(max(walker.jumps)))

"""Edits of an imported ONNX graph: rename a tensor, pad to a size multiple, fuse the task's
outputs, drop what no output needs. Plain ``onnx`` protobuf edits, no runtime."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def opset(model: onnx.ModelProto) -> int:
    """The default-domain opset of ``model``."""
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _all_graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    graphs = [graph]
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                graphs.extend(_all_graphs(attr.g))
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    graphs.extend(_all_graphs(sub))
    return graphs


def tensor_names(model: onnx.ModelProto) -> set[str]:
    """Every tensor and node name of the graph (subgraphs included)."""
    names: set[str] = set()
    for graph in _all_graphs(model.graph):
        names |= {t for n in graph.node for t in (*n.input, *n.output, n.name)}
        names |= {v.name for v in (*graph.input, *graph.output, *graph.value_info, *graph.initializer)}
    return names


def rename_tensor(model: onnx.ModelProto, old: str, new: str) -> None:
    """Rename tensor ``old`` to ``new`` everywhere it is produced, used or declared (in place)."""
    for graph in _all_graphs(model.graph):
        for node in graph.node:
            node.input[:] = [new if t == old else t for t in node.input]
            node.output[:] = [new if t == old else t for t in node.output]
        for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
            if value.name == old:
                value.name = new


def unique_name(taken: set[str], base: str) -> str:
    name, count = base, 0
    while name in taken:
        count += 1
        name = f"{base}_{count}"
    taken.add(name)
    return name


def _const(model: onnx.ModelProto, taken: set[str], hint: str, value: list[int] | np.ndarray) -> str:
    name = unique_name(taken, f"visionserve/{hint}")
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.int64), name))
    return name


def _node(model: onnx.ModelProto, taken: set[str], op: str, inputs: list[str], output: str | None = None,
          **attrs: object) -> str:
    out = output or unique_name(taken, f"visionserve/{op.lower()}")
    model.graph.node.append(helper.make_node(op, inputs, [out], name=unique_name(taken, f"visionserve/{op}"),
                                             **attrs))
    return out


def pad_to_multiple(model: onnx.ModelProto, input_name: str, scores: str, multiple: int, *,
                    spatial_axes: tuple[int, int] = (2, 3)) -> str:
    """Pad the image input's bottom/right up to a multiple of ``multiple`` by repeating its
    border (``Pad`` mode ``edge``, as exported segmenters pad) and crop ``scores`` (N, C, H, W;
    or an index mask N, H, W with ``spatial_axes`` (1, 2)) back to the input's H, W; returns
    the name of the cropped scores (in place)."""
    taken = tensor_names(model)
    start = len(model.graph.node)
    inner = unique_name(taken, f"{input_name}/padded")
    for node in model.graph.node:
        node.input[:] = [inner if t == input_name else t for t in node.input]
    hw = _node(model, taken, "Slice", [_node(model, taken, "Shape", [input_name]), _const(model, taken, "s", [2]),
                                       _const(model, taken, "e", [4])])
    step = _const(model, taken, "multiple", [multiple, multiple])
    padded = _node(model, taken, "Mul", [_node(model, taken, "Div", [
        _node(model, taken, "Add", [hw, _const(model, taken, "m1", [multiple - 1] * 2)]), step]), step])
    pads = _node(model, taken, "Concat", [_const(model, taken, "zeros", [0] * 6),
                                          _node(model, taken, "Sub", [padded, hw])], axis=0)
    _node(model, taken, "Pad", [input_name, pads], output=inner, mode="edge")
    nodes = list(model.graph.node)  # the padding first, so the nodes stay topologically sorted
    del model.graph.node[:]
    model.graph.node.extend(nodes[start:] + nodes[:start])
    return _node(model, taken, "Slice", [scores, _const(model, taken, "zero2", [0, 0]), hw,
                                         _const(model, taken, "axes", list(spatial_axes))])


def _value(name: str, elem_type: int, dims: list[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, dims)


def uncast_index(model: onnx.ModelProto, mask: str) -> str:
    """The ArgMax result that ``mask`` casts (``mask`` itself when it is not a Cast of one):
    the imported mask is cast to uint8 once, as the graph's output, because TensorRT refuses
    uint8 tensors inside a graph (a user's Cast to uint8 before a squeeze or a crop)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    cast = producers.get(mask)
    if cast is not None and cast.op_type == "Cast":
        source = producers.get(cast.input[0])
        if source is not None and source.op_type in ("ArgMax", "ArgMin"):
            return cast.input[0]
    return mask


def squeeze_class_axis(model: onnx.ModelProto, mask: str) -> str:
    """``mask`` (N, 1, H, W) without its class axis: the name of the (N, H, W) tensor (in place)."""
    taken = tensor_names(model)
    if opset(model) >= 13:
        return _node(model, taken, "Squeeze", [mask, _const(model, taken, "class_axis", [1])])
    return _node(model, taken, "Squeeze", [mask], axes=[1])


def fuse_outputs(model: onnx.ModelProto, task: str, scores: str, kind: str, dims: dict[str, int | str],
                 *, with_probability: bool = False) -> tuple[str, ...]:
    """Replace the graph's outputs by the task's fused ones (in place); returns their names.

    Classification: ``probabilities`` (Softmax of logits, or the probabilities as they are)
    and, for logits, ``logits``. Segmentation: ``mask`` = uint8 ArgMax over classes, and
    optionally ``probability`` (max class probability per pixel); ``kind`` "mask": ``scores``
    is a class-index mask already (N, H, W; any integer type), kept as the ``mask``, cast to
    uint8 (no ``probability``: there are no scores). ``dims``: batch, classes, height, width
    (ints or names) of the declared output shapes.
    """
    taken = tensor_names(model)
    n, c, h, w = dims["batch"], dims["classes"], dims["height"], dims["width"]
    outputs: list[onnx.ValueInfoProto] = []
    if task == "classification":
        if kind == "logits":
            _node(model, taken, "Identity", [scores], output="logits")
            outputs.append(_value("logits", TensorProto.FLOAT, [n, c]))
            _node(model, taken, "Softmax", [scores], output="probabilities", axis=1)
        else:
            _node(model, taken, "Identity", [scores], output="probabilities")
        outputs.append(_value("probabilities", TensorProto.FLOAT, [n, c]))
    elif kind == "mask":
        if with_probability:
            raise ValueError("a class-index mask has no class scores to take a probability from")
        _node(model, taken, "Cast", [scores], output="mask", to=TensorProto.UINT8)
        outputs.append(_value("mask", TensorProto.UINT8, [n, h, w]))
    else:
        argmax = _node(model, taken, "ArgMax", [scores], axis=1, keepdims=0)
        _node(model, taken, "Cast", [argmax], output="mask", to=TensorProto.UINT8)
        outputs.append(_value("mask", TensorProto.UINT8, [n, h, w]))
        if with_probability:
            probs = _node(model, taken, "Softmax", [scores], axis=1) if kind == "logits" else scores
            if opset(model) >= 18:
                _node(model, taken, "ReduceMax", [probs, _const(model, taken, "axis", [1])],
                      output="probability", keepdims=0)
            else:
                _node(model, taken, "ReduceMax", [probs], output="probability", axes=[1], keepdims=0)
            outputs.append(_value("probability", TensorProto.FLOAT, [n, h, w]))
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    return tuple(o.name for o in outputs)


def free_output_names(model: onnx.ModelProto, names: tuple[str, ...]) -> dict[str, str]:
    """Rename existing tensors called like the fused outputs (``logits``...) out of the way
    (in place); returns old name -> new name."""
    taken, renamed = tensor_names(model), {}
    for name in names:
        if name in taken:
            renamed[name] = unique_name(taken, f"{name}/source")
            rename_tensor(model, name, renamed[name])
    return renamed


def prune(model: onnx.ModelProto) -> int:
    """Drop the nodes and initializers no graph output needs (in place); returns nodes dropped."""
    needed = {o.name for o in model.graph.output}
    kept = []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed |= set(node.input)
            for graph in _all_graphs(helper.make_graph([node], "n", [], [])):
                needed |= {t for n in graph.node for t in n.input}
    dropped = len(model.graph.node) - len(kept)
    del model.graph.node[:]
    model.graph.node.extend(reversed(kept))
    inits = [i for i in model.graph.initializer if i.name in needed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    return dropped

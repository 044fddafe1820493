"""pooling_rewrite: MaxPool indices and MaxUnpool rewritten in any ONNX graph, bit-exact."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from visionserve.export.audit import audit_onnx
from visionserve.export.pooling_rewrite import (
    UnsupportedPoolingError,
    needs_pooling_rewrite,
    rewrite_pooling,
)
from visionserve.server.model_config import ShapeProfile

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
SHAPES = [(1, 3, 8, 8), (2, 3, 9, 7), (3, 3, 16, 11)]


def _inputs(shape: tuple[int, ...], seed: int) -> list[np.ndarray]:
    """Random values, few distinct values (ties in most windows) and constant planes."""
    rng = np.random.default_rng(seed)
    flat = np.zeros(shape, np.float32)
    flat[:, :, shape[2] // 2:] = 1.0
    return [rng.standard_normal(shape).astype(np.float32),
            rng.integers(0, 3, shape).astype(np.float32), flat]


def _graph(nodes: list[onnx.NodeProto], outputs: list[str], opset: int = 17) -> onnx.ModelProto:
    image = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])
    outs = [helper.make_tensor_value_info(o, TensorProto.INT64 if o == "i" else TensorProto.FLOAT,
                                          ["n", 3, f"{o}h", f"{o}w"]) for o in outputs]
    model = helper.make_model(helper.make_graph(nodes, "g", [image], outs),
                              opset_imports=[helper.make_opsetid("", opset)])
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _no_blockers(model: onnx.ModelProto) -> None:
    assert not needs_pooling_rewrite(model)
    assert "MaxUnpool" not in {n.op_type for n in model.graph.node}


@pytest.mark.parametrize(("kernel", "stride"), [(2, 2), (3, 2), (2, 1), ((2, 3), (1, 2))])
def test_pool_indices_equal_torch_ties_included(kernel, stride) -> None:
    kernel_shape = list(kernel) if isinstance(kernel, tuple) else [kernel, kernel]
    strides = list(stride) if isinstance(stride, tuple) else [stride, stride]
    model = _graph([helper.make_node("MaxPool", ["x"], ["y", "i"], kernel_shape=kernel_shape,
                                     strides=strides)], ["y", "i"])
    rewritten, count = rewrite_pooling(model)
    assert count == 1
    _no_blockers(rewritten)
    onnx.checker.check_model(rewritten, full_check=True)
    for seed, shape in enumerate(SHAPES):
        for x in _inputs(shape, seed):
            values, indices = F.max_pool2d(torch.from_numpy(x), kernel, stride, return_indices=True)
            plane = shape[2] * shape[3]  # ONNX indices count over the whole NCHW tensor
            offset = (np.arange(shape[0] * shape[1]) * plane).reshape(shape[0], shape[1], 1, 1)
            got_values, got_indices = _run(rewritten, x)
            assert np.array_equal(got_values, values.numpy())
            assert np.array_equal(got_indices, indices.numpy() + offset), (shape, x[0, 0, :2])


def _unpool_graph(with_shape: bool, opset: int = 17) -> onnx.ModelProto:
    nodes = [helper.make_node("MaxPool", ["x"], ["p", "i"], kernel_shape=[2, 2], strides=[2, 2])]
    if with_shape:
        nodes += [helper.make_node("Shape", ["x"], ["s"]),
                  helper.make_node("MaxUnpool", ["p", "i", "s"], ["u"], kernel_shape=[2, 2],
                                   strides=[2, 2])]
    else:
        nodes.append(helper.make_node("MaxUnpool", ["p", "i"], ["u"], kernel_shape=[2, 2],
                                      strides=[2, 2]))
    return _graph(nodes, ["u"], opset)


@pytest.mark.parametrize(("with_shape", "opset"), [(True, 17), (False, 17), (True, 11)])
def test_unpool_equals_onnxruntime_maxunpool(with_shape: bool, opset: int) -> None:
    original = _unpool_graph(with_shape, opset)
    rewritten, count = rewrite_pooling(original)
    assert count == 2
    _no_blockers(rewritten)
    assert "ScatterElements" in {n.op_type for n in rewritten.graph.node}
    shapes = SHAPES if with_shape else [(2, 3, 8, 8), (1, 3, 10, 6)]  # default size: even only
    for seed, shape in enumerate(shapes):
        for x in _inputs(shape, seed):
            assert np.array_equal(_run(rewritten, x)[0], _run(original, x)[0])


def test_graph_without_pooling_indices_is_returned_unchanged() -> None:
    model = _graph([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2])], ["y"])
    assert rewrite_pooling(model) == (model, 0)


@pytest.mark.parametrize(("attrs", "message"), [
    ({"pads": [1, 1, 1, 1]}, "pads"), ({"ceil_mode": 1}, "ceil_mode"),
    ({"dilations": [2, 2]}, "dilations"), ({"storage_order": 1}, "storage_order")])
def test_unsupported_pooling_names_the_node(attrs: dict, message: str) -> None:
    node = helper.make_node("MaxPool", ["x"], ["y", "i"], name="encoder.pool1", kernel_shape=[2, 2],
                            **attrs)
    with pytest.raises(UnsupportedPoolingError, match=f"'encoder.pool1'.*{message}"):
        rewrite_pooling(_graph([node], ["y", "i"]))


@pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx not installed (pip install tensorrt-rtx-cu13)")
def test_rewritten_unpooling_builds_with_tensorrt_rtx(tmp_path: Path) -> None:
    path = tmp_path / "unpool.onnx"
    original = _unpool_graph(with_shape=True)
    assert not audit_onnx_static_ok(original, tmp_path)
    onnx.save(rewrite_pooling(original)[0], path)
    profile = ShapeProfile(batch=(1, 2, 4), height=(8, 32, 64), width=(8, 32, 64))
    report = audit_onnx(path, profile=profile, tensorrt="tensorrt_rtx", compute_capability="8.6")
    assert report.ok, report.problems
    assert report.tensorrt.built and report.tensorrt.engine_bytes > 0


def audit_onnx_static_ok(model: onnx.ModelProto, tmp_path: Path) -> bool:
    path = tmp_path / "original.onnx"
    onnx.save(model, path)
    return audit_onnx(path, tensorrt="none").ok

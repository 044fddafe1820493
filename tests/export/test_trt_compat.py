"""trt_compat: exact pooling-with-indices / unpooling in TensorRT-parsable ops."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from visionserve.export.trt_compat import (
    TRTMaxPool2d,
    TRTMaxUnpool2d,
    UnsupportedPoolingError,
    make_tensorrt_compatible,
    max_pool2d_with_indices,
    max_unpool2d,
)

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
CONFIGS = [(2, 2), (3, 3), (3, 2), (2, 1), ((2, 3), (2, 3)), ((3, 2), (1, 2))]
SIZES = [(8, 8), (7, 9), (5, 6), (16, 11)]


def _inputs(kind: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(shape, generator=gen)
    if kind == "small-int":  # many ties inside windows
        return torch.randint(0, 3, shape, generator=gen).float()
    if kind == "constant":  # every window is all ties
        return torch.full(shape, 0.5)
    x = torch.zeros(shape)  # flat regions with a step: ties and non-ties
    x[..., shape[-2] // 2 :, :] = 1.0
    x[..., :, : shape[-1] // 3] = -2.0
    return x


@pytest.mark.parametrize("kind", ["random", "small-int", "constant", "flat-regions"])
@pytest.mark.parametrize(("kernel", "stride"), CONFIGS)
def test_pool_and_unpool_match_torch_bit_exactly(kernel, stride, kind: str) -> None:
    for seed, (batch, (height, width)) in enumerate(zip([1, 3, 2, 4], SIZES, strict=True)):
        x = _inputs(kind, (batch, 3, height, width), seed)
        want_v, want_i = F.max_pool2d(x, kernel, stride, return_indices=True)
        got_v, got_i = max_pool2d_with_indices(x, kernel, stride)
        assert torch.equal(got_v, want_v), (kernel, stride, x.shape)
        assert got_i.dtype == torch.int64
        assert torch.equal(got_i, want_i), (kernel, stride, x.shape)
        want_u = F.max_unpool2d(want_v, want_i, kernel, stride, output_size=x.shape[-2:])
        assert torch.equal(max_unpool2d(got_v, got_i, x.shape[-2:]), want_u)


def test_unpool_default_output_size_and_decoder_values() -> None:
    for shape, output_size in [((2, 4, 8, 6), None), ((2, 4, 9, 7), (9, 7))]:
        x = _inputs("small-int", shape, 0)
        values, indices = F.max_pool2d(x, 2, 2, return_indices=True)
        decoder = torch.randn_like(values)  # unpool other values than the pooled ones
        want = nn.MaxUnpool2d(2, 2)(decoder, indices, output_size=output_size)
        assert want.shape == x.shape
        assert torch.equal(TRTMaxUnpool2d(2)(decoder, indices, output_size=output_size), want)


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(UnsupportedPoolingError, match="4-D NCHW"):
        max_pool2d_with_indices(torch.zeros(3, 8, 8), 2, 2)
    with pytest.raises(UnsupportedPoolingError, match="kernel_size"):
        max_pool2d_with_indices(torch.zeros(1, 1, 8, 8), 0, 2)
    with pytest.raises(UnsupportedPoolingError, match="smaller than the kernel"):
        max_pool2d_with_indices(torch.zeros(1, 1, 2, 8), 3, 1)
    with pytest.raises(UnsupportedPoolingError, match="indices shape"):
        max_unpool2d(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 3, dtype=torch.int64), (8, 8))


class _Pooled(nn.Module):
    def __init__(self, pool: nn.Module, unpool: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(nn.ReLU(), pool)
        self.unpool = unpool if unpool is not None else nn.MaxUnpool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        values, indices = self.block(y)
        return self.unpool(values, indices, output_size=y.shape[-2:])


def test_make_tensorrt_compatible_swaps_modules_and_keeps_outputs() -> None:
    torch.manual_seed(0)
    model = _Pooled(nn.MaxPool2d(2, 2, return_indices=True)).eval()
    plain_pool = nn.MaxPool2d(2)
    model.plain = plain_pool
    rewritten = make_tensorrt_compatible(model)
    assert isinstance(rewritten.block[1], TRTMaxPool2d)
    assert isinstance(rewritten.unpool, TRTMaxUnpool2d)
    assert isinstance(rewritten.plain, nn.MaxPool2d)  # no indices: TensorRT parses it, left alone
    assert isinstance(model.block[1], nn.MaxPool2d) and isinstance(
        model.unpool, nn.MaxUnpool2d
    )  # a copy
    want, got = model.state_dict(), rewritten.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    for kind in ("random", "small-int", "flat-regions"):
        x = _inputs(kind, (2, 3, 11, 13), 1)
        assert torch.equal(rewritten(x), model(x))


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (nn.MaxPool2d(2, 2, padding=1, return_indices=True), "padding"),
        (nn.MaxPool2d(2, 2, dilation=2, return_indices=True), "dilation"),
        (nn.MaxPool2d(2, 2, ceil_mode=True, return_indices=True), "ceil_mode"),
    ],
)
def test_unsupported_pool_configs_name_the_submodule(module: nn.Module, message: str) -> None:
    with pytest.raises(UnsupportedPoolingError, match=rf"block\.1 .*{message}"):
        make_tensorrt_compatible(_Pooled(module))


def test_unsupported_unpool_padding() -> None:
    model = _Pooled(nn.MaxPool2d(2, 2, return_indices=True), nn.MaxUnpool2d(2, 2, padding=1))
    with pytest.raises(UnsupportedPoolingError, match="unpool .*padding"):
        make_tensorrt_compatible(model)


def _export_pool_graph(path: Path, kernel, stride) -> None:
    class PoolUnpool(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pool, self.unpool = TRTMaxPool2d(kernel, stride), TRTMaxUnpool2d(kernel, stride)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            values, indices = self.pool(x)
            return values, indices, self.unpool(values * 2.0, indices, output_size=x.shape)

    axes = {"x": {0: "batch", 2: "height", 3: "width"}}
    torch.onnx.export(
        PoolUnpool(),
        (torch.randn(2, 3, 16, 16),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        output_names=["values", "indices", "unpooled"],
        dynamic_axes=axes,
    )


@pytest.mark.parametrize(("kernel", "stride"), [(2, 2), (3, 2)])
def test_exported_graph_is_exact_in_onnxruntime_with_dynamic_shapes(
    tmp_path: Path, kernel, stride
) -> None:
    path = tmp_path / "pool.onnx"
    _export_pool_graph(path, kernel, stride)
    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    assert not ops & {"MaxPool", "MaxUnpool"}
    assert "ScatterElements" in ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for seed, shape in enumerate([(1, 3, 16, 16), (4, 3, 7, 13), (2, 3, 5, 6), (3, 3, 33, 20)]):
        for kind in ("random", "small-int", "constant"):
            x = _inputs(kind, shape, seed)
            values, indices, unpooled = session.run(None, {"x": x.numpy()})
            want_v, want_i = F.max_pool2d(x, kernel, stride, return_indices=True)
            want_u = F.max_unpool2d(want_v * 2.0, want_i, kernel, stride, output_size=x.shape[-2:])
            np.testing.assert_array_equal(values, want_v.numpy())
            np.testing.assert_array_equal(indices, want_i.numpy())
            np.testing.assert_array_equal(unpooled, want_u.numpy())


@pytest.mark.skipif(
    not HAS_RTX, reason="tensorrt_rtx not installed (pip install tensorrt-rtx-cu13)"
)
def test_exported_graph_parses_and_builds_with_tensorrt_rtx(tmp_path: Path) -> None:
    from visionserve.export.audit import audit_onnx
    from visionserve.server.model_config import ShapeProfile

    path = tmp_path / "pool.onnx"
    _export_pool_graph(path, 2, 2)
    profile = ShapeProfile(batch=(1, 2, 8), height=(8, 64, 256), width=(8, 64, 256))
    report = audit_onnx(path, profile=profile, tensorrt="tensorrt_rtx")
    assert report.ok, report.problems
    assert report.tensorrt.built and report.tensorrt.engine_bytes > 0
    assert report.tensorrt.profile["x"] == [[1, 3, 8, 8], [2, 3, 64, 64], [8, 3, 256, 256]]

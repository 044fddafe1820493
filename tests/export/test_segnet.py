"""SegNet-style model: eager behaviour, and its TensorRT-compatible ONNX export."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from visionserve.export.models.segnet import SegNet, segnet
from visionserve.export.trt_compat import TRTMaxPool2d, TRTMaxUnpool2d, make_tensorrt_compatible
from visionserve.server.model_config import ShapeProfile

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
SHAPES = [(1, 3, 32, 32), (3, 3, 37, 45), (2, 3, 8, 8), (4, 3, 64, 48)]  # batch, odd sizes, minimum


def _model(seed: int = 0) -> SegNet:
    """A small SegNet with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = segnet(num_classes=5, base_channels=8, depth=3)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def _image(kind: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(shape, generator=gen)
    if kind == "small-int":
        return torch.randint(0, 3, shape, generator=gen).float()
    x = torch.zeros(shape)  # flat regions: pooling windows full of ties
    x[:, :, shape[2] // 2 :] = 1.0
    x[:, 0, :, : shape[3] // 3] = -0.5
    return x


def test_segnet_shapes_metadata_and_checks() -> None:
    model = _model()
    assert sum(isinstance(m, nn.MaxPool2d) and m.return_indices for m in model.modules()) == 3
    assert sum(isinstance(m, nn.MaxUnpool2d) for m in model.modules()) == 3
    with torch.no_grad():
        for shape in [(2, 3, 37, 45), (1, 3, 8, 8)]:
            assert model(torch.randn(shape)).shape == (shape[0], 5, *shape[2:])
    assert model.metadata == {
        "arch": "segnet",
        "task": "segmentation",
        "num_classes": 5,
        "min_size": 8,
    }
    with pytest.raises(ValueError, match="H, W >= 8"):
        model(torch.randn(1, 3, 7, 16))
    with pytest.raises(ValueError, match="num_classes"):
        segnet(num_classes=1)


def test_rewritten_segnet_is_identical_in_torch() -> None:
    model = _model()
    rewritten = make_tensorrt_compatible(model)
    assert sum(isinstance(m, TRTMaxPool2d) for m in rewritten.modules()) == 3
    assert sum(isinstance(m, TRTMaxUnpool2d) for m in rewritten.modules()) == 3
    assert not any(isinstance(m, (nn.MaxPool2d, nn.MaxUnpool2d)) for m in rewritten.modules())
    rewritten.load_state_dict(model.state_dict())  # same keys: checkpoints load into either
    with torch.no_grad():
        for seed, shape in enumerate(SHAPES):
            for kind in ("random", "small-int", "flat"):
                x = _image(kind, shape, seed)
                assert torch.equal(rewritten(x), model(x)), (kind, shape)


def _export_rewritten(path: Path) -> SegNet:
    model = _model()
    torch.onnx.export(
        make_tensorrt_compatible(model),
        (torch.randn(2, 3, 32, 32),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={
            "image": {0: "batch", 2: "height", 3: "width"},
            "logits": {0: "batch", 2: "height", 3: "width"},
        },
    )
    return model


def _assert_onnxruntime_matches(path: Path, model: nn.Module) -> None:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for seed, shape in enumerate(SHAPES):
        for kind in ("random", "small-int", "flat"):
            x = _image(kind, shape, seed)
            with torch.no_grad():
                want = model(x).numpy()
            (got,) = session.run(None, {"image": x.numpy()})
            assert got.shape == want.shape
            assert np.abs(got - want).max() <= 1e-4, (kind, shape)
            assert (got.argmax(1) == want.argmax(1)).all(), (kind, shape)


def _graph_has_no_trt_blockers(path: Path) -> None:
    nodes = onnx.load(str(path), load_external_data=False).graph.node
    assert not [n.name for n in nodes if n.op_type == "MaxUnpool"]
    assert not [
        n.name for n in nodes if n.op_type == "MaxPool" and len(n.output) > 1 and n.output[1]
    ]


def test_rewritten_segnet_exports_and_matches_in_onnxruntime(tmp_path: Path) -> None:
    path = tmp_path / "segnet.onnx"
    model = _export_rewritten(path)
    _graph_has_no_trt_blockers(path)
    assert onnx.load(str(path)).opset_import[0].version == 17
    _assert_onnxruntime_matches(path, model)


@pytest.mark.skipif(
    not HAS_RTX, reason="tensorrt_rtx not installed (pip install tensorrt-rtx-cu13)"
)
def test_rewritten_segnet_parses_and_builds_with_tensorrt_rtx(tmp_path: Path) -> None:
    from visionserve.export.audit import audit_onnx

    path = tmp_path / "segnet.onnx"
    _export_rewritten(path)
    profile = ShapeProfile(batch=(1, 4, 8), height=(32, 256, 512), width=(32, 256, 512))
    report = audit_onnx(path, profile=profile, tensorrt="tensorrt_rtx", compute_capability="8.6")
    assert report.ok, report.problems
    assert report.tensorrt.parsed and report.tensorrt.built
    assert report.tensorrt.target == "SM86" and report.tensorrt.engine_bytes > 0


@pytest.mark.slow
def test_rewritten_segnet_with_dynamo_exporter(tmp_path: Path) -> None:
    """The torch.export-based exporter (opset 18, external data) gives a graph just as good."""
    from visionserve.export.audit import audit_onnx

    model = _model()
    path = tmp_path / "segnet_dynamo.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(
        make_tensorrt_compatible(model),
        (torch.randn(2, 3, 32, 32),),
        str(path),
        dynamo=True,
        opset_version=18,
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: batch, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}},
    )
    _graph_has_no_trt_blockers(path)
    _assert_onnxruntime_matches(path, model)
    report = audit_onnx(
        path, profile=ShapeProfile(batch=(1, 4, 8), height=(32, 64, 128), width=(32, 64, 128))
    )
    assert report.ok, report.problems

"""SegNet-style model: eager behaviour, and its TensorRT-compatible ONNX export."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from visionserve.export.models.segnet import SegNet, segnet
from visionserve.export.onnx_export import ExportOptions, export_checkpoint, onnx_from_module
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


class UserSegNet(nn.Module):
    """A SegNet-style module as a user would write it (not the zoo's): pooling indices carried
    to max-unpooling in the decoder."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.enc1, self.enc2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2, 2)
        self.dec2, self.dec1 = nn.Conv2d(16, 8, 3, padding=1), nn.Conv2d(8, classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.enc1(x))
        b, i1 = self.pool(a)
        c = torch.relu(self.enc2(b))
        d, i2 = self.pool(c)
        e = self.unpool(d, i2, output_size=c.shape[-2:])
        f = torch.relu(self.dec2(e))
        return self.dec1(self.unpool(f, i1, output_size=a.shape[-2:]))


def user_segnet_program(path: Path, classes: int = 4) -> UserSegNet:
    """Save a UserSegNet as a torch.export program (dynamic batch, H, W) at ``path``."""
    torch.manual_seed(0)
    model = UserSegNet(classes).eval()
    dim = torch.export.Dim.DYNAMIC
    program = torch.export.export(model, (torch.randn(2, 3, 32, 32),),
                                  dynamic_shapes=({0: dim, 2: dim, 3: dim},))
    torch.export.save(program, str(path))
    return model


def _assert_onnxruntime_matches(model_bytes: bytes, model: nn.Module) -> None:
    """The mask of the exported graph equals PyTorch's argmax, ties in the pooling included."""
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    for seed, shape in enumerate(SHAPES):
        for kind in ("random", "small-int", "flat"):
            x = _image(kind, shape, seed)
            with torch.no_grad():
                want = model(x).argmax(1).numpy()
            (got,) = session.run(None, {"image": x.numpy()})
            assert np.array_equal(got, want), (kind, shape)


def _graph_has_no_trt_blockers(model_bytes: bytes) -> None:
    nodes = onnx.load_from_string(model_bytes).graph.node
    assert not [n.name for n in nodes if n.op_type == "MaxUnpool"]
    assert not [
        n.name for n in nodes if n.op_type == "MaxPool" and len(n.output) > 1 and n.output[1]
    ]


def test_zoo_segnet_exports_through_the_onnx_rewrite() -> None:
    model = _model()
    proto = onnx_from_module(model, "segmentation", height=32, width=32)
    assert proto.opset_import[0].version >= 17
    _graph_has_no_trt_blockers(proto.SerializeToString())
    _assert_onnxruntime_matches(proto.SerializeToString(), model)


def test_user_segnet_program_exports_builds_and_matches(tmp_path: Path) -> None:
    """A user-written SegNet through .pt2: rewritten, audited (TensorRT-RTX build where
    installed), validated on tie-heavy images, written."""
    model = user_segnet_program(tmp_path / "segnet.pt2")
    (tmp_path / "model.json").write_text(json.dumps({
        "task": "segmentation", "labels": ["a", "b", "c", "d"],
        "input": {"height": 32, "width": 32}}))
    report = export_checkpoint(tmp_path / "segnet.pt2", tmp_path / "repo", "usersegnet",
                               options=ExportOptions(max_batch_size=4))
    assert report["passed"] and report["audit"]["ok"], report["audit"]["problems"]
    if HAS_RTX:
        assert report["audit"]["tensorrt"]["built"]
    onnx_bytes = (Path(report["version_dir"]) / "model.onnx").read_bytes()
    _graph_has_no_trt_blockers(onnx_bytes)
    _assert_onnxruntime_matches(onnx_bytes, model)
    assert any(c["name"].startswith("tie-heavy") and c["passed"] for c in report["checks"])


@pytest.mark.skipif(
    not HAS_RTX, reason="tensorrt_rtx not installed (pip install tensorrt-rtx-cu13)"
)
def test_zoo_segnet_parses_and_builds_with_tensorrt_rtx(tmp_path: Path) -> None:
    from visionserve.export.audit import audit_onnx

    path = tmp_path / "segnet.onnx"
    onnx.save(onnx_from_module(_model(), "segmentation", height=32, width=32), path)
    profile = ShapeProfile(batch=(1, 4, 8), height=(32, 256, 512), width=(32, 256, 512))
    report = audit_onnx(path, profile=profile, tensorrt="tensorrt_rtx", compute_capability="8.6")
    assert report.ok, report.problems
    assert report.tensorrt.parsed and report.tensorrt.built
    assert report.tensorrt.target == "SM86" and report.tensorrt.engine_bytes > 0

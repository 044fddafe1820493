"""Op audit: static operator-table check, known-bad patterns, TensorRT-RTX parse and build."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn
from visionserve.export.audit import SUPPORTED_OPS, UNSUPPORTED_OPS, audit_onnx, static_audit
from visionserve.export.models.segnet import segnet
from visionserve.server.model_config import ShapeProfile

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(
    not HAS_RTX, reason="tensorrt_rtx not installed (pip install tensorrt-rtx-cu13)"
)
SEG_PROFILE = ShapeProfile(batch=(1, 4, 8), height=(32, 128, 256), width=(32, 128, 256))

try:  # the zoo's UNet; a tiny inline one keeps this file independent of it
    from visionserve.export.models.unet import unet as _zoo_unet
except ImportError:  # pragma: no cover - only before export/models/unet.py exists
    _zoo_unet = None


class _TinyUNet(nn.Module):
    def __init__(self, num_classes: int = 3, width: int = 8) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.mid = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.up(self.mid(self.down(x))))


def _small_unet() -> nn.Module:
    if _zoo_unet is not None:
        return _zoo_unet(num_classes=3, base_channels=8, depth=2)
    return _TinyUNet()


def _export(model: nn.Module, path: Path, *, spatial: bool, size: int = 64) -> Path:
    axes = {0: "batch", 2: "height", 3: "width"} if spatial else {0: "batch"}
    torch.onnx.export(
        model.eval(),
        (torch.randn(2, 3, size, size),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": axes},
    )
    return path


def _model_with(
    nodes: list[onnx.NodeProto], outputs: list[str], domains: dict[str, int] | None = None
):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
    )
    opsets = [helper.make_opsetid("", 17)] + [
        helper.make_opsetid(d, v) for d, v in (domains or {}).items()
    ]
    return helper.make_model(graph, opset_imports=opsets)


def test_table_is_consistent() -> None:
    assert not SUPPORTED_OPS & UNSUPPORTED_OPS
    assert {
        "Conv",
        "ConvTranspose",
        "MaxPool",
        "ScatterElements",
        "ScatterND",
        "ArgMax",
        "Resize",
    } <= SUPPORTED_OPS
    assert "MaxUnpool" in UNSUPPORTED_OPS


def test_static_audit_names_nodes_and_known_bad_patterns() -> None:
    nodes = [
        helper.make_node(
            "MaxPool",
            ["x"],
            ["p", "idx"],
            name="pool_with_indices",
            kernel_shape=[2, 2],
            strides=[2, 2],
        ),
        helper.make_node(
            "MaxUnpool", ["p", "idx"], ["u"], name="the_unpool", kernel_shape=[2, 2], strides=[2, 2]
        ),
        helper.make_node("MaxPool", ["x"], ["q"], name="plain_pool", kernel_shape=[2, 2]),
        helper.make_node("Hardmax", ["x"], ["h"], name="fine"),
        helper.make_node("StringNormalizer", ["x"], ["s"], name="strings"),
        helper.make_node("FancyOp", ["x"], ["f"], name="custom", domain="com.example"),
        helper.make_node("ScatterND", ["x", "x", "x"], ["n"], name="scatter_add", reduction="add"),
    ]
    opset, records, problems = static_audit(
        _model_with(nodes, ["u", "q", "h", "s", "f", "n"], {"com.example": 1})
    )
    assert opset == 17
    assert [r.status for r in records] == [
        "supported",
        "unsupported",
        "supported",
        "supported",
        "unsupported",
        "custom-domain",
        "supported",
    ]
    text = "\n".join(problems)
    assert "node 'pool_with_indices' (MaxPool): MaxPool with a second output (Indices)" in text
    assert "node 'the_unpool' (MaxUnpool): MaxUnpool is not supported" in text
    assert "rewrite_pooling" in text
    assert "'strings' (StringNormalizer): not supported" in text
    assert "'custom' (FancyOp): domain 'com.example'" in text
    assert "'scatter_add' (ScatterND): ScatterND reduction" in text
    assert "plain_pool" not in text and "'fine'" not in text
    assert len(problems) == 5


def test_static_audit_looks_inside_subgraphs() -> None:
    inner = helper.make_graph(
        [helper.make_node("MaxUnpool", ["x", "x"], ["y"], name="hidden", kernel_shape=[2, 2])],
        "branch",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    cond = helper.make_node(
        "If", ["c"], ["y"], name="branching", then_branch=inner, else_branch=inner
    )
    _, records, problems = static_audit(_model_with([cond], ["y"]))
    assert sorted(r.name for r in records) == [
        "branching",
        "branching/else_branch/hidden",
        "branching/then_branch/hidden",
    ]
    assert any("branching/then_branch/hidden" in p and "MaxUnpool" in p for p in problems)


def test_unrewritten_segnet_from_dynamo_fails_the_audit_naming_maxpool(tmp_path: Path) -> None:
    path = tmp_path / "segnet_raw.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(
        segnet(num_classes=4, base_channels=4, depth=2).eval(),
        (torch.randn(2, 3, 32, 32),),
        str(path),
        dynamo=True,
        opset_version=18,
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: batch, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}},
    )
    graph = onnx.load(str(path), load_external_data=False).graph
    pools = [
        n.name for n in graph.node if n.op_type == "MaxPool" and len(n.output) > 1 and n.output[1]
    ]
    unpools = [n.name for n in graph.node if n.op_type == "MaxUnpool"]
    assert pools, "expected the dynamo exporter to keep MaxPool's Indices output"
    report = audit_onnx(path, profile=SEG_PROFILE)
    assert not report.ok
    for name in pools:
        assert any(f"node {name!r} (MaxPool)" in p for p in report.problems), (
            name,
            report.problems,
        )
    for name in unpools:
        assert any(f"node {name!r} (MaxUnpool)" in p for p in report.problems), (
            name,
            report.problems,
        )
    if report.tensorrt is not None:  # the real parser agrees, and names the same nodes
        assert not report.tensorrt.parsed
        assert {e.node_name for e in report.tensorrt.parse_errors} <= set(pools + unpools)
        assert {e.op_type for e in report.tensorrt.parse_errors} <= {"MaxPool", "MaxUnpool"}


@needs_rtx
@pytest.mark.parametrize("arch", ["resnet18", "unet"])
def test_zoo_models_pass_audit_and_build_with_tensorrt_rtx(tmp_path: Path, arch: str) -> None:
    import torchvision

    if arch == "resnet18":
        path = _export(
            torchvision.models.resnet18(weights=None), tmp_path / "m.onnx", spatial=False, size=224
        )
        profile = ShapeProfile(batch=(1, 8, 32))
        want_shapes = [[1, 3, 224, 224], [8, 3, 224, 224], [32, 3, 224, 224]]
    else:
        path = _export(_small_unet(), tmp_path / "m.onnx", spatial=True)
        profile = SEG_PROFILE
        want_shapes = [[1, 3, 32, 32], [4, 3, 128, 128], [8, 3, 256, 256]]
    report = audit_onnx(path, profile=profile, tensorrt="tensorrt_rtx", compute_capability="8.9")
    assert report.ok, report.problems
    result = report.tensorrt
    assert result.library == "tensorrt_rtx" and result.target == "SM89"
    assert result.parsed and result.built and not result.parse_errors
    assert result.engine_bytes > 0 and result.build_seconds is not None
    assert result.profile == {"image": want_shapes}
    if arch == "unet":
        assert report.op_counts.get("ConvTranspose", 0) >= 1
    data = json.loads(json.dumps(report.to_dict()))
    assert (
        data["ok"] is True
        and data["tensorrt"]["built"] is True
        and "engine" not in data["tensorrt"]
    )
    assert data["num_nodes"] == len(data["nodes"]) > 0


@needs_rtx
def test_profile_missing_a_dynamic_dim_is_reported(tmp_path: Path) -> None:
    path = _export(_TinyUNet(), tmp_path / "unet.onnx", spatial=True, size=32)
    report = audit_onnx(path, profile=ShapeProfile(batch=(1, 2, 4)), tensorrt="tensorrt_rtx")
    assert not report.ok
    assert any("axis 2 is dynamic but the profile has no range" in p for p in report.problems), (
        report.problems
    )


@needs_rtx
def test_keep_engine_and_unknown_compute_capability(tmp_path: Path) -> None:
    path = _export(_TinyUNet(), tmp_path / "unet.onnx", spatial=True, size=32)
    report = audit_onnx(path, profile=SEG_PROFILE, tensorrt="tensorrt_rtx", keep_engine=True)
    assert report.ok and len(report.tensorrt.engine) == report.tensorrt.engine_bytes
    bad = audit_onnx(path, profile=SEG_PROFILE, tensorrt="tensorrt_rtx", compute_capability="9.0")
    assert not bad.ok and any("compute capability '9.0'" in p for p in bad.problems)


def test_without_tensorrt_only_the_static_audit_runs(tmp_path: Path) -> None:
    path = _export(_TinyUNet(), tmp_path / "unet.onnx", spatial=True, size=32)
    report = audit_onnx(path, tensorrt="none")
    assert (
        report.ok and report.tensorrt is None and "no TensorRT library" in report.tensorrt_skipped
    )
    assert report.op_counts["ConvTranspose"] == 1
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        audit_onnx(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="tensorrt must be"):
        audit_onnx(path, tensorrt="onnxruntime")

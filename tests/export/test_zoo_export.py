"""The zoo through ``export_checkpoint``: TensorRT-parsable graphs, audit (incl. TensorRT-RTX
parse and build), and ONNX Runtime == PyTorch on generated and tie-heavy inputs, dynamic
batch and (segmenters) any H, W; torch.export programs; the CLI's audit gate and help."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn
from visionserve.export.checkpoint import write_metadata
from visionserve.export.models import TASK_OF_ARCHITECTURE, build_model, randomise_batchnorm
from visionserve.export.onnx_export import ExportOptions, export_checkpoint
from visionserve.server.model_config import ModelConfig

from visionserve.cli import main
from visionserve.commands import export as export_command

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
LABELS = ["background", "circle", "square", "triangle"]
ZOO = {  # architecture -> (arch_kwargs, input size): small channels where the builder allows
    "resnet18": ({}, 64),
    "resnet50": ({}, 64),
    "unet": ({"base_channels": 8, "depth": 3}, 64),
    "segnet": ({"base_channels": 8, "depth": 3}, 64),
    # the lecture's VGG-16-BN (13 convolutions; a 1x1-pooled narrow head at 64x64) and the
    # original SegNet on it (5 pool-with-indices stages -> 5 unpool stages), channels / 8
    "vgg16_bn": ({"pool_size": 1, "hidden": 64}, 64),
    "segnet_vgg16_bn": ({"width": 8}, 64),
}
# computed by hand in test_receptive_field.py (ResNet-50: not computed by hand, not checked)
RECEPTIVE_FIELDS = {"resnet18": (435, 217, 32), "unet": (103, 51, 8), "segnet": (103, 51, 8),
                    "vgg16_bn": (212, 121, 32), "segnet_vgg16_bn": (423, 211, 32)}


def _checkpoint(directory: Path, architecture: str) -> Path:
    arch_kwargs, size = ZOO.get(architecture, ({}, 64))
    metadata = {"architecture": architecture, "arch_kwargs": arch_kwargs, "labels": LABELS,
                "input": {"height": size, "width": size}}
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = randomise_batchnorm(build_model(architecture, num_classes=len(LABELS), **arch_kwargs))
    torch.save(model.state_dict(), directory / "model.pth")
    write_metadata(directory / "model.json", metadata)
    return directory / "model.pth"


def _trt_blockers(path: Path) -> list[str]:
    graph = onnx.load(str(path)).graph
    return [f"{n.name} ({n.op_type})" for n in graph.node
            if n.op_type == "MaxUnpool" or (n.op_type == "MaxPool" and len(n.output) > 1 and n.output[1])]


def _assert_matches_pytorch(report: dict) -> None:
    kinds = {c["name"].split()[0] for c in report["checks"]}
    assert kinds == {"generated", "tie-heavy"}
    assert {c["input_shape"][0] for c in report["checks"]} >= {1, 3, 8}
    for check in report["checks"]:
        assert check["passed"], check
        for name, err in check["outputs"].items():
            assert err["max_abs_error"] <= 1e-4, (check["name"], name, err)
        argmax = check.get("top1") or check["mask"]
        assert argmax["agreement"] == 1.0, (check["name"], argmax)


@pytest.mark.parametrize("architecture", list(ZOO))
def test_zoo_exports_audit_and_match(tmp_path: Path, architecture: str) -> None:
    checkpoint = _checkpoint(tmp_path / "ckpt", architecture)
    options = ExportOptions(with_probability=True, compute_capability="8.6")
    report = export_checkpoint(checkpoint, tmp_path / "repo", architecture, options=options)
    version_dir = Path(report["version_dir"])
    assert _trt_blockers(version_dir / "model.onnx") == []
    written = json.loads((version_dir / "validation.json").read_text())
    _assert_matches_pytorch(written)

    segmenter = TASK_OF_ARCHITECTURE[architecture] == "segmentation"
    dims = onnx.load(str(version_dir / "model.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == (["batch", "", "height", "width"] if segmenter else
                                           ["batch", "", "", ""])
    if segmenter:  # odd sizes validated; SegNet's unpooling is a scatter now
        assert {tuple(c["input_shape"][2:]) for c in written["checks"]} >= {(75, 131), (33, 47)}
        assert written["graph"]["outputs"] == ["mask", "probability"]
        assert ModelConfig.load(tmp_path / f"repo/{architecture}/model.yaml").outputs == {
            "mask": "mask", "probability": "probability"}
    if architecture in ("segnet", "segnet_vgg16_bn"):  # unpooling: a scatter; the pooling indices: rewritten
        assert {"ScatterND", "ScatterElements"} & set(written["graph"]["op_types"])
        assert "MaxUnpool" not in written["graph"]["op_types"]
    if architecture in RECEPTIVE_FIELDS:  # read from the written graph, rewrites included
        size, radius, stride = RECEPTIVE_FIELDS[architecture]
        assert written["receptive_field"] == {"computed": True, "size": size, "radius": radius,
                                              "stride": stride}
        field = ModelConfig.load(tmp_path / f"repo/{architecture}/model.yaml").input.receptive_field
        assert (field.size, field.radius, field.stride) == (size, radius, stride)

    audit = written["audit"]
    assert audit["ok"] and audit["problems"] == [] and not audit["allowed_unsupported"]
    if not HAS_RTX:
        pytest.skip("tensorrt_rtx not importable (pip install tensorrt-rtx-cu13): RTX parse/build not checked")
    trt = audit["tensorrt"]
    assert trt["parsed"] and trt["built"] and trt["engine_bytes"] > 0
    if trt["library"] == "tensorrt_rtx":
        assert trt["target"] == "SM86"
    assert "parsed and built" in report["audit_summary"]


@pytest.mark.slow
def test_resnet101_and_resnet34_export(tmp_path: Path) -> None:
    for architecture in ("resnet34", "resnet101"):
        report = export_checkpoint(_checkpoint(tmp_path / architecture, architecture), tmp_path / "repo",
                                   architecture)
        _assert_matches_pytorch(report)
        assert report["audit"]["ok"]


class _OutsideTheZoo(nn.Module):
    """A segmenter the zoo does not know: strided conv down, bilinear resize back up."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, num_classes, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(self.body(x), size=x.shape[-2:], mode="bilinear",
                                         align_corners=False)


def _program(directory: Path, model: nn.Module, labels: list[str], size: int = 32) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    dim = torch.export.Dim.DYNAMIC
    program = torch.export.export(model.eval(), (torch.randn(2, 3, size, size),),
                                  dynamic_shapes={"x": {0: dim, 2: dim, 3: dim}})
    torch.export.save(program, directory / "model.pt2")
    (directory / "model.json").write_text(json.dumps({
        "architecture": type(model).__name__, "task": "segmentation", "labels": labels,
        "input": {"height": size, "width": size}}))
    return directory / "model.pt2"


def test_torch_export_program_of_an_architecture_outside_the_zoo(tmp_path: Path) -> None:
    torch.manual_seed(0)
    checkpoint = _program(tmp_path / "ckpt", _OutsideTheZoo(), ["bg", "a", "b"])
    report = export_checkpoint(checkpoint, tmp_path / "repo", "custom",
                               options=ExportOptions(with_logits=True, tensorrt="none"))
    _assert_matches_pytorch(report)
    assert report["export"]["exporter"] == "dynamo"
    assert report["graph"]["outputs"] == ["mask", "logits"]
    model = onnx.load(report["version_dir"] + "/model.onnx")
    assert [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim] == [
        "batch", "", "height", "width"]
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert list(Path(report["version_dir"]).iterdir()) != []
    assert "skipped on request" in report["audit"]["tensorrt_skipped"]


def test_torch_export_program_of_a_classifier(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 3)).eval()
    directory = tmp_path / "ckpt"
    directory.mkdir()
    program = torch.export.export(model, (torch.randn(2, 3, 32, 32),),
                                  dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    torch.export.save(program, directory / "model.pt2")
    (directory / "model.json").write_text(json.dumps({
        "task": "classification", "labels": ["a", "b", "c"], "input": {"height": 32, "width": 32}}))
    report = export_checkpoint(directory / "model.pt2", tmp_path / "repo", "tiny-cls")
    _assert_matches_pytorch(report)
    assert report["graph"]["outputs"] == ["logits", "probabilities"]
    assert report["audit"]["ok"], report["audit"]["problems"]


class _CeilPooled(nn.Module):
    """Pooling with indices in ceil mode: the rewrite cannot express it, so it stays."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2, return_indices=True, ceil_mode=True)
        self.unpool = nn.MaxUnpool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        pooled, indices = self.pool(y)
        return self.unpool(pooled, indices, output_size=y.shape[-2:])


def test_cli_refuses_a_graph_tensorrt_cannot_build(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A torch.export program whose max-pool indices the rewrite cannot express (ceil mode)
    torch.manual_seed(0)
    checkpoint = _program(tmp_path / "ckpt", _CeilPooled(), ["bg", "a", "b"])
    args = ["export", "--checkpoint", str(checkpoint), "--repository", str(tmp_path / "repo"),
            "--name", "raw-segnet", "--no-tensorrt-check"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "TensorRT would not build" in err and "nothing was written" in err
    assert "(MaxPool): MaxPool with a second output (Indices)" in err and "node '" in err
    assert not (tmp_path / "repo/raw-segnet").exists() or not any((tmp_path / "repo/raw-segnet").iterdir())

    assert main([*args, "--allow-unsupported"]) == 0
    captured = capsys.readouterr()
    assert "PASSED" in captured.out and "--allow-unsupported" in captured.err
    written = json.loads((tmp_path / "repo/raw-segnet/1/validation.json").read_text())
    assert written["audit"]["allowed_unsupported"] and not written["audit"]["ok"]


def test_export_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    export_command.add_arguments(parser)
    options = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    undocumented = [a.option_strings for a in options if not (a.help or "").strip()]
    assert undocumented == []
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for action in options:
        assert action.option_strings[0] in text
    for option in ("--allow-unsupported", "--compute-capability", "--no-tensorrt-check", "--with-probability",
                   "--with-logits", "--min-agreement"):
        assert option in text

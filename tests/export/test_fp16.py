"""FP16 ONNX: conversion keeps the interface and the decision ops in float32; validation
measures agreement with FP32 on generated images and catches a real FP16 regression."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from _trt_models import CLASSIFIER, SEGMENTER, write_models
from visionserve.cli import main
from visionserve.export.fp16 import (
    FP16_FILE,
    Fp16Thresholds,
    Fp16ValidationError,
    fp16_variant,
    validate_fp16,
    write_fp16_onnx,
)
from visionserve.server.model_config import InputSpec, ModelConfig
from visionserve.server.repository import ModelRepository


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_models(tmp_path_factory.mktemp("fp16-repo"))


def _producer(graph: onnx.GraphProto, tensor: str) -> onnx.NodeProto:
    return next(node for node in graph.node if tensor in node.output)


@pytest.mark.parametrize("name", [CLASSIFIER, SEGMENTER])
def test_fp16_graph_keeps_io_types_and_decision_ops_in_fp32(repository: Path, name: str) -> None:
    entry = ModelRepository(repository).entry(name)
    path = write_fp16_onnx(entry.directory)
    assert path == entry.directory / FP16_FILE
    fp32, fp16 = onnx.load(str(entry.onnx_path)), onnx.load(str(path))
    onnx.checker.check_model(fp16, full_check=True)  # topologically sorted, types consistent

    def io_types(model: onnx.ModelProto) -> list[int]:
        return [v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]]

    assert io_types(fp16) == io_types(fp32)
    conv_weights = {n.input[1] for n in fp16.graph.node if n.op_type == "Conv"}
    dtypes = {init.data_type for init in fp16.graph.initializer if init.name in conv_weights}
    assert dtypes == {TensorProto.FLOAT16}
    assert path.stat().st_size < 0.6 * entry.onnx_path.stat().st_size
    decision = next(n for n in fp16.graph.node if n.op_type in ("ArgMax", "Softmax"))
    cast = _producer(fp16.graph, decision.input[0])
    assert cast.op_type == "Cast"
    assert helper.get_attribute_value(cast.attribute[0]) == TensorProto.FLOAT


@pytest.mark.parametrize(
    ("name", "metric", "threshold"),
    [
        (CLASSIFIER, "top1_agreement", 0.99),
        (SEGMENTER, "mask_agreement", 0.995),
    ],
)
def test_fp16_agrees_with_fp32_and_is_recorded(
    repository: Path, name: str, metric: str, threshold: float
) -> None:
    entry = ModelRepository(repository).entry(name)
    validation = entry.directory / "validation.json"
    validation.write_text(json.dumps({"export": {"passed": True}}), encoding="utf-8")
    report = fp16_variant(entry.directory, entry.config, samples=200)
    assert report["passed"] and report["metric"] == metric
    assert report[metric] >= threshold and report["threshold"] == threshold
    recorded = json.loads(validation.read_text(encoding="utf-8"))
    assert recorded["export"] == {"passed": True}  # merged, not overwritten
    assert recorded["fp16_onnx"][metric] == report[metric]
    assert recorded["fp16_onnx"]["inputs"]["count"] == 200


def _offset_classifier(directory: Path) -> ModelConfig:
    """A classifier whose logits are 1000 + tiny differences: fp32 tells the classes apart,
    fp16 (resolution 0.5 at 1000) cannot — a genuine FP16 regression."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array((rng.normal(size=(3, 3)) * 0.01).astype(np.float32), "w")
    bias = numpy_helper.from_array(np.full(3, 1000.0, np.float32), "b")
    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["features"]),
        helper.make_node("Gemm", ["features", "w", "b"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "offset",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 64, 64])],
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 3])
            for n in ("logits", "probabilities")
        ],
        [weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    directory.mkdir(parents=True)
    onnx.save(model, str(directory / "model.onnx"))
    return ModelConfig(
        name="offset",
        task="classification",
        labels=("a", "b", "c"),
        input=InputSpec(height=64, width=64),
        outputs={"logits": "logits", "probabilities": "probabilities"},
    )


def test_fp16_regression_fails_validation_and_is_recorded(tmp_path: Path) -> None:
    config = _offset_classifier(tmp_path / "offset" / "1")
    version_dir = tmp_path / "offset" / "1"
    write_fp16_onnx(version_dir)
    with pytest.raises(Fp16ValidationError, match="below the 99.00% threshold") as caught:
        validate_fp16(version_dir, config, samples=50)
    assert caught.value.report["top1_agreement"] < 0.99
    recorded = json.loads((version_dir / "validation.json").read_text(encoding="utf-8"))
    assert recorded["fp16_onnx"]["passed"] is False


def test_cli_fp16_only_exits_non_zero_on_regression(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = _offset_classifier(tmp_path / "offset" / "1")
    config.save(tmp_path / "offset" / "model.yaml")
    code = main(
        [
            "build",
            "--repository",
            str(tmp_path),
            "--model",
            "offset",
            "--fp16-onnx-only",
            "--samples",
            "50",
        ]
    )
    assert code == 1
    assert "below the 99.00% threshold" in capsys.readouterr().out


def test_cli_fp16_only_passes_on_a_real_model(
    repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    copy = shutil.copytree(repository, tmp_path / "repo")
    code = main(
        [
            "build",
            "--repository",
            str(copy),
            "--model",
            SEGMENTER,
            "--fp16-onnx-only",
            "--samples",
            "20",
        ]
    )
    assert code == 0
    assert "mask agreement" in capsys.readouterr().out
    assert (copy / SEGMENTER / "1" / FP16_FILE).is_file()


def test_thresholds_are_checked() -> None:
    with pytest.raises(ValueError, match="min_top1 must be a fraction"):
        Fp16Thresholds(min_top1=99.0)

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from visionserve.export.checkpoint import load_checkpoint
from visionserve.export.onnx_export import (
    check_onnx,
    export_checkpoint,
    model_config_from_metadata,
    onnx_from_module,
)
from visionserve.export.validate import (
    ExportValidationError,
    Tolerances,
    expose_argmax_input,
    format_report,
)
from visionserve.server.model_config import ModelConfig, ReceptiveField


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_classifier_export_matches_torch(tmp_path: Path, classifier_checkpoint: Path) -> None:
    report = export_checkpoint(classifier_checkpoint, tmp_path / "repo", "shapes-cls")
    assert report["passed"] and report["version"] == 1
    for check in report["checks"]:
        for err in check["outputs"].values():
            assert err["max_abs_error"] <= 1e-4
        assert check["top1"]["agreement"] == 1.0
    assert {c["input_shape"][0] for c in report["checks"]} == {1, 3, 8}
    assert any(c["name"].startswith("tie-heavy") for c in report["checks"])
    assert report["graph"]["outputs"] == ["logits", "probabilities"]
    assert report["graph"]["opset"] == 17
    written = json.loads((tmp_path / "repo/shapes-cls/1/validation.json").read_text())
    assert written["passed"] and set(written["versions"]) >= {"torch", "onnx", "onnxruntime"}

    # dynamic batch: a batch size the validation did not use, checked against torch directly
    model = load_checkpoint(classifier_checkpoint, classifier_checkpoint.with_name("model.json"))
    x = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    logits, probs = _session(tmp_path / "repo/shapes-cls/1/model.onnx").run(["logits", "probabilities"],
                                                                              {"image": x})
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)

    config = ModelConfig.load(tmp_path / "repo/shapes-cls/model.yaml")
    assert config.task == "classification" and config.labels == ("circle", "square", "triangle")
    assert config.outputs == {"logits": "logits", "probabilities": "probabilities"}
    assert config.input.height == 64 and config.input.name == "image"
    assert config.profile.batch == (1, 8, 32) and config.profile.height is None


def test_segmenter_export_matches_torch(tmp_path: Path, segmenter_checkpoint: Path) -> None:
    report = export_checkpoint(segmenter_checkpoint, tmp_path / "repo", "shapes-seg")
    assert report["passed"]
    sizes = {tuple(c["input_shape"][2:]) for c in report["checks"]}
    assert sizes == {(64, 64), (96, 96), (75, 131), (33, 47)}  # the training size, others, odd ones
    for check in report["checks"]:
        assert check["mask"]["agreement_unambiguous"] == 1.0
        assert check["mask"]["agreement"] >= 0.9999
        assert check["outputs"]["logits (ArgMax input)"]["max_abs_error"] <= 1e-4
        assert check["mask"]["mean_iou"] == 1.0
    assert "ArgMax" in report["graph"]["op_types"] and "ConvTranspose" in report["graph"]["op_types"]

    # dynamic batch and size, uint8 (N, H, W) mask equal to torch's argmax
    model = load_checkpoint(segmenter_checkpoint, segmenter_checkpoint.with_name("model.json"))
    x = np.random.default_rng(1).standard_normal((3, 3, 40, 72)).astype(np.float32)
    (mask,) = _session(tmp_path / "repo/shapes-seg/1/model.onnx").run(["mask"], {"image": x})
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).argmax(1).numpy()
    assert mask.dtype == np.uint8 and mask.shape == (3, 40, 72)
    assert (mask == expected).mean() >= 0.9999
    # any size: 37x45 is no multiple of 8 (UNet depth 3); the graph pads and crops
    (odd,) = _session(tmp_path / "repo/shapes-seg/1/model.onnx").run(["mask"], {"image": x[:, :, :37, :45]})
    assert odd.shape == (3, 37, 45)
    assert report["export"]["size_multiple"] == 8 and report["export"]["pad_mode"] == "replicate"

    config = ModelConfig.load(tmp_path / "repo/shapes-seg/model.yaml")
    assert config.task == "segmentation" and config.outputs == {"mask": "mask"}
    assert config.profile.height == (32, 64, 512) and config.profile.width == (32, 64, 512)
    assert config.num_classes == 4
    # the receptive field, computed from the exported graph, travels with the model (tiling)
    expected = ReceptiveField(size=103, radius=51, stride=8)  # UNet depth 3, by hand
    assert config.input.receptive_field == expected
    recorded = json.loads((tmp_path / "repo/shapes-seg/1/validation.json").read_text())
    assert recorded["receptive_field"] == {"computed": True, "size": 103, "radius": 51, "stride": 8}


def test_versions_increment_and_explicit_version(tmp_path: Path, segmenter_checkpoint: Path) -> None:
    repo = tmp_path / "repo"
    assert export_checkpoint(segmenter_checkpoint, repo, "m")["version"] == 1
    assert export_checkpoint(segmenter_checkpoint, repo, "m")["version"] == 2
    assert export_checkpoint(segmenter_checkpoint, repo, "m", version=7)["version"] == 7
    with pytest.raises(FileExistsError, match="already exists.*next free: 8"):
        export_checkpoint(segmenter_checkpoint, repo, "m", version=2)
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["1", "2", "7", "model.yaml"]


def test_failed_validation_writes_nothing(tmp_path: Path, classifier_checkpoint: Path) -> None:
    # a negative tolerance can never be met: the validation must fail and leave no version behind
    with pytest.raises(ExportValidationError) as info:
        export_checkpoint(classifier_checkpoint, tmp_path / "repo", "m",
                          tolerances=Tolerances(atol=0.0, rtol=0.0))
    assert not info.value.report["passed"]
    assert "FAILED" in format_report(info.value.report)
    assert not (tmp_path / "repo/m").exists() or not any((tmp_path / "repo/m").iterdir())


def test_onnx_graph_is_self_contained(classifier_metadata: dict) -> None:
    from visionserve.export.checkpoint import build_from_metadata

    model = build_from_metadata(classifier_metadata).eval()
    proto = check_onnx(onnx_from_module(model, "classification", height=64, width=64))
    assert [i.name for i in proto.graph.input] == ["image"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and dims[2].dim_value == 64
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def test_expose_argmax_input_adds_logits_output(segmenter_metadata: dict) -> None:
    from visionserve.export.checkpoint import build_from_metadata

    model = build_from_metadata(segmenter_metadata).eval()
    proto = onnx_from_module(model, "segmentation", height=32, width=32)
    exposed = onnx.load_from_string(expose_argmax_input(proto.SerializeToString()))
    assert [o.name for o in exposed.graph.output] == ["mask", "validation_logits"]


def test_model_config_rejects_unknown_backend(classifier_metadata: dict) -> None:
    from visionserve.export.checkpoint import check_metadata

    with pytest.raises(ValueError, match="backends"):
        model_config_from_metadata("m", check_metadata(classifier_metadata), backends=("gpu-magic",))


def test_validate_on_a_samples_directory(tmp_path: Path, segmenter_checkpoint: Path, small_data) -> None:
    train_dir, _ = small_data
    report = export_checkpoint(segmenter_checkpoint, tmp_path / "repo", "m", samples=train_dir / "images")
    assert report["passed"]
    with pytest.raises(FileNotFoundError, match="no .png/.jpg images"):
        export_checkpoint(segmenter_checkpoint, tmp_path / "repo", "m", samples=tmp_path / "empty")

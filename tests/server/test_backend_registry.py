"""The backend registry (server/backends/registry.py): names listed once, the loader's
order and fallbacks, and what it logs. Real ONNX Runtime sessions; engines are never
deserialized (the TensorRT cases are refused before that, from engine.json)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import make_models
import onnxruntime as ort
import pytest

from visionserve.server.backends.registry import BACKEND_NAMES, FACTORIES, load_backend
from visionserve.server.engine_compat import MANIFEST_FILE, sha256_file
from visionserve.server.model_config import ModelConfig, ShapeProfile
from visionserve.server.registry import ModelRegistry
from visionserve.server.repository import ModelRepository

HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()
_H, _W = make_models.CLASSIFIER_HW


def test_backend_names_are_the_factories() -> None:
    assert BACKEND_NAMES == tuple(FACTORIES) == ("tensorrt", "onnxruntime-cuda", "onnxruntime-cpu")
    with pytest.raises(ValueError, match="backends must be a non-empty list from") as info:
        ModelConfig(
            name="m",
            task="classification",
            labels=("a", "b"),
            outputs={"probabilities": "p"},
            backends=("onnxruntime-rocm",),
        )
    assert str(BACKEND_NAMES) in str(info.value)


@pytest.mark.skipif(HAS_CUDA_EP, reason="this onnxruntime build has CUDA: no fallback to show")
def test_a_fallback_from_a_gpu_backend_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_models.write_entry(
        tmp_path, "seg", "segmentation", backends=("onnxruntime-cuda", "onnxruntime-cpu")
    )
    with caplog.at_level(logging.INFO, logger="visionserve.server.backends.registry"):
        backend = load_backend(ModelRepository(tmp_path).entry("seg"), 1)
    backend.close()
    assert backend.name == "onnxruntime-cpu" and backend.device == "cpu"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("backend onnxruntime-cuda not used" in m and "CUDAExecutionProvider" in m
               for m in warnings), warnings
    assert any("serving on onnxruntime-cpu on cpu, fp32 (fell back from onnxruntime-cuda)" in m
               for m in warnings), warnings


def test_a_cpu_model_loads_without_warnings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_models.write_entry(tmp_path, "seg", "segmentation")
    with caplog.at_level(logging.INFO, logger="visionserve.server.backends.registry"):
        load_backend(ModelRepository(tmp_path).entry("seg"), 1).close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "serving on onnxruntime-cpu on cpu, fp32" in caplog.text


def _engine_with_profile(version_dir: Path, max_batch: int) -> None:
    """engine.json + plan for an engine whose profile takes at most ``max_batch`` rows."""
    plan = version_dir / "model.plan"
    plan.write_bytes(b"never deserialized")
    shape = [3, _H, _W]
    manifest = {
        "format": 1, "plan": "model.plan", "plan_bytes": plan.stat().st_size,
        "plan_sha256": sha256_file(plan), "flavour": "tensorrt", "tensorrt_version": "10.13.0.35",
        "gpu": "NVIDIA A10", "compute_capability": "8.6", "precision": "fp32",
        "profiles": {"image": {"min": [1, *shape], "opt": [2, *shape], "max": [max_batch, *shape]}},
    }
    (version_dir / MANIFEST_FILE).write_text(json.dumps(manifest), encoding="utf-8")


def test_max_batch_size_beyond_the_engine_profile_falls_back_to_onnx(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused from engine.json before any runtime is asked; the model still serves."""
    make_models.write_entry(
        tmp_path, "cls", "classification", backends=("tensorrt", "onnxruntime-cpu"),
        max_batch_size=8, profile=ShapeProfile(batch=(1, 2, 4)),
    )
    _engine_with_profile(tmp_path / "cls" / "1", max_batch=4)
    registry = ModelRegistry(intra_op_threads=1)
    with caplog.at_level(logging.INFO):
        registry.load_all(ModelRepository(tmp_path))  # warm-up runs batch 8
    try:
        model = registry.get("cls")
        assert model.backend.name == "onnxruntime-cpu"
        assert model.config.max_batch_size == 8
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("backend tensorrt not used" in m and "[8, 3, 32, 32]" in m
                   and "profile's max [4, 3, 32, 32]" in m for m in warned), warned
    finally:
        registry.close()


def test_startup_log_names_backend_device_and_precision_of_every_version(
    start_server, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="visionserve.server.app"):
        start_server()
    for name, version in (("tiny-classifier", 1), ("tiny-classifier", 2), ("tiny-segmenter", 1)):
        assert (
            f"model {name} v{version} ready on onnxruntime-cpu on cpu, fp32" in caplog.text
        )

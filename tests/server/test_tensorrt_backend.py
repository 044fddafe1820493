"""The TensorRT backend: refusal and fallback everywhere; engine execution on a GPU only.

On a machine without a GPU, engines are never deserialized (the runtime would crash): the
backend must refuse *before* that, with the reason, and the loader must fall back to ONNX
Runtime. The ``gpu``/``tensorrt`` tests build an engine for the local GPU and compare the
backend's outputs with ONNX Runtime.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import make_models
import numpy as np
import pytest

from visionserve.server.backends.tensorrt import EngineIncompatible, TensorRTBackend
from visionserve.server.engine_compat import (
    MANIFEST_FILE,
    RuntimeInfo,
    gpu_runtime_unavailable,
    sha256_file,
)
from visionserve.server.model_config import ShapeProfile
from visionserve.server.repository import ModelRepository
from visionserve.server.backends.registry import load_backend

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
_H, _W = make_models.CLASSIFIER_HW
PROFILE = ShapeProfile(batch=(1, 2, 4), height=(_H, _H, _H), width=(_W, _W, _W))


def _repository(tmp_path: Path) -> Path:
    make_models.write_entry(
        tmp_path,
        "tiny-classifier",
        "classification",
        backends=("tensorrt", "onnxruntime-cpu"),
        profile=PROFILE,
    )
    return tmp_path


def _fake_engine(version_dir: Path, **overrides: object) -> None:
    plan = version_dir / "model.plan"
    plan.write_bytes(b"not really an engine")
    manifest = {
        "format": 1,
        "plan": "model.plan",
        "plan_bytes": plan.stat().st_size,
        "plan_sha256": sha256_file(plan),
        "flavour": "tensorrt",
        "tensorrt_version": "10.0.0.1",
        "gpu": "NVIDIA A10",
        "compute_capability": "8.6",
        "precision": "fp32",
        "profiles": {},
    }
    manifest.update(overrides)
    (version_dir / MANIFEST_FILE).write_text(json.dumps(manifest), encoding="utf-8")


def test_module_imports_without_tensorrt_cuda_or_torch() -> None:
    code = (
        "import sys, visionserve.server.backends.tensorrt; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'tensorrt_rtx', 'cuda', 'torch')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_refuses_a_version_without_engine(tmp_path: Path) -> None:
    entry = ModelRepository(_repository(tmp_path)).entry("tiny-classifier")
    with pytest.raises(EngineIncompatible, match="no engine.json"):
        TensorRTBackend(entry.directory)


def test_refuses_a_mismatched_engine_before_deserializing(tmp_path: Path) -> None:
    entry = ModelRepository(_repository(tmp_path)).entry("tiny-classifier")
    _fake_engine(entry.directory)
    runtime = RuntimeInfo("tensorrt", "10.13.0.35", "NVIDIA A10", "8.6")
    with pytest.raises(EngineIncompatible, match="10.0.0.1.*10.13.0.35"):
        TensorRTBackend(entry.directory, runtime=runtime)


def test_loader_falls_back_to_onnx_and_logs_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    entry = ModelRepository(_repository(tmp_path)).entry("tiny-classifier")
    _fake_engine(entry.directory, plan_sha256="0" * 64)  # a corrupt plan
    with caplog.at_level(logging.INFO):
        backend = load_backend(entry)
    try:
        assert backend.name == "onnxruntime-cpu"
        assert "does not match the sha256" in caplog.text
        x = np.zeros((2, 3, _H, _W), np.float32)
        assert backend.infer({"image": x})["probabilities"].shape == (2, len(make_models.LABELS))
    finally:
        backend.close()


@pytest.mark.skipif(
    not HAS_RTX, reason="tensorrt_rtx not installed (pip install tensorrt-rtx-cu13)"
)
def test_ahead_of_time_engine_is_refused_here_and_served_by_onnx(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if gpu_runtime_unavailable() is None:
        pytest.skip("a GPU is present: the engine may well be loadable here")
    from visionserve.export.engine_build import build_engine

    repo = _repository(tmp_path)
    manifest = build_engine(repo, "tiny-classifier", compute_capability="8.6", samples=4)
    assert manifest["target"] == "ahead-of-time"
    entry = ModelRepository(repo).entry("tiny-classifier")
    with caplog.at_level(logging.INFO):
        backend = load_backend(entry)
    backend.close()
    assert backend.name == "onnxruntime-cpu"
    assert "TensorRT engine in" in caplog.text and "not loaded" in caplog.text


# --- GPU only ---------------------------------------------------------------------------------
@pytest.fixture
def gpu_engine_dir(tmp_path: Path) -> Path:
    from visionserve.export.engine_build import build_engine

    repo = _repository(tmp_path)
    manifest = build_engine(repo, "tiny-classifier", samples=8)
    assert manifest["target"] == "local GPU"
    return repo / "tiny-classifier" / "1"


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_engine_matches_onnxruntime_for_every_batch_size(gpu_engine_dir: Path) -> None:
    from visionserve.server.backends.onnxruntime import OnnxRuntimeBackend

    engine = TensorRTBackend(gpu_engine_dir)
    reference = OnnxRuntimeBackend(gpu_engine_dir / "model.onnx")
    try:
        assert [s.name for s in engine.inputs] == [s.name for s in reference.inputs]
        assert {s.name for s in engine.outputs} == {s.name for s in reference.outputs}
        rng = np.random.default_rng(0)
        h, w = make_models.CLASSIFIER_HW
        for batch in (1, 3, 4, 2):  # shapes change per call, within the profile
            x = rng.normal(size=(batch, 3, h, w)).astype(np.float32)
            got, want = engine.infer({"image": x}), reference.infer({"image": x})
            for name, value in want.items():
                assert got[name].shape == value.shape
                np.testing.assert_allclose(got[name], value, rtol=1e-3, atol=1e-4)
        with pytest.raises(ValueError, match="outside the engine's profile"):
            engine.infer({"image": np.zeros((5, 3, h, w), np.float32)})
    finally:
        engine.close()
        engine.close()  # idempotent
        reference.close()


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_loader_prefers_a_valid_local_engine(gpu_engine_dir: Path) -> None:
    entry = ModelRepository(gpu_engine_dir.parent.parent).entry("tiny-classifier")
    backend = load_backend(entry)
    try:
        assert backend.name == "tensorrt"
    finally:
        backend.close()


def test_stream_handle_without_the_deprecated_int() -> None:
    """cuda-bindings 13 deprecates int(stream); the handle comes from get_cuda_native_handle."""
    cudart = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    from visionserve.server.backends.tensorrt import _native_handle

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DeprecationWarning would fail here
        assert _native_handle(cudart.cudaStream_t(0x1234)) == 0x1234
    assert cudart.cudaStreamNonBlocking  # the flag the backend creates its stream with

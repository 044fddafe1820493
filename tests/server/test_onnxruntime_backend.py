"""The ONNX Runtime backend: IO binding, providers and their options, the model's device.

Real ONNX Runtime sessions on the tiny models of ``tests/models/make_models.py``. On CPU,
the IO-binding path (``io_binding=True``) must give exactly what ``InferenceSession.run``
gives. The ``gpu`` test runs ``onnxruntime-cuda`` where ``CUDAExecutionProvider`` and a
CUDA GPU are present (``VISIONSERVE_REQUIRE_GPU=1`` turns its skip into a failure).
"""

from __future__ import annotations

import os
from pathlib import Path

import make_models
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from visionserve.server.backends.onnxruntime import (
    BackendUnavailable,
    OnnxRuntimeBackend,
    provider_options,
)
from visionserve.server.engine_compat import detect_gpu
from visionserve.server.model_config import ModelConfig

HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()


def _cuda_unavailable() -> str | None:
    """None when ONNX Runtime has CUDA and a CUDA GPU is present, else why not."""
    if not HAS_CUDA_EP:
        return f"this onnxruntime build offers {ort.get_available_providers()}"
    name, _, reason = detect_gpu(0)
    return None if name is not None else reason


_NO_GPU = None if os.environ.get("VISIONSERVE_REQUIRE_GPU") == "1" else _cuda_unavailable()
skip_without_gpu = pytest.mark.skipif(
    _NO_GPU is not None, reason=f"needs onnxruntime-gpu and a CUDA GPU: {_NO_GPU}"
)

MODELS = {
    "classifier": (make_models.classifier_onnx, make_models.CLASSIFIER_HW),
    "segmenter": (make_models.segmenter_onnx, make_models.SEGMENTER_HW),
}


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("onnx")
    paths = {}
    for kind, (build, _) in MODELS.items():
        paths[kind] = folder / f"{kind}.onnx"
        onnx.save(build(), paths[kind])
    return paths


def _batch(kind: str, rows: int, seed: int = 0) -> np.ndarray:
    h, w = MODELS[kind][1]
    return np.random.default_rng(seed).normal(size=(rows, 3, h, w)).astype(np.float32)


def _config(**overrides: object) -> ModelConfig:
    fields = {
        "name": "m",
        "task": "classification",
        "labels": make_models.LABELS,
        "outputs": {"probabilities": "probabilities"},
    }
    fields.update(overrides)
    return ModelConfig(**fields)


# --- IO binding on CPU ----------------------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_io_binding_matches_plain_run(model_paths: dict[str, Path], kind: str, rows: int) -> None:
    bound = OnnxRuntimeBackend(model_paths[kind], intra_op_threads=1, io_binding=True)
    plain = OnnxRuntimeBackend(model_paths[kind], intra_op_threads=1, io_binding=False)
    try:
        assert bound.io_binding is True and plain.io_binding is False
        x = _batch(kind, rows)
        got, want = bound.infer({"image": x}), plain.infer({"image": x})
        assert list(got) == list(want) == [s.name for s in plain.outputs]
        for name, value in want.items():
            assert isinstance(got[name], np.ndarray)
            assert got[name].dtype == value.dtype and got[name].shape == value.shape
            np.testing.assert_array_equal(got[name], value)
        if kind == "segmenter":
            assert got["mask"].dtype == np.uint8 and got["mask"].shape == (rows, *MODELS[kind][1])
    finally:
        bound.close()
        plain.close()


def test_io_binding_accepts_non_contiguous_input_and_checks_feeds(
    model_paths: dict[str, Path],
) -> None:
    bound = OnnxRuntimeBackend(model_paths["segmenter"], intra_op_threads=1, io_binding=True)
    plain = OnnxRuntimeBackend(model_paths["segmenter"], intra_op_threads=1)
    try:
        x = _batch("segmenter", 6)[::2]  # a strided view
        assert not x.flags.c_contiguous
        np.testing.assert_array_equal(
            bound.infer({"image": x})["mask"], plain.infer({"image": x})["mask"]
        )
        with pytest.raises(ValueError, match="do not match the model inputs"):
            bound.infer({"pixels": x})
    finally:
        bound.close()
        plain.close()


def test_cpu_defaults(model_paths: dict[str, Path]) -> None:
    backend = OnnxRuntimeBackend(model_paths["classifier"])
    try:
        assert backend.name == "onnxruntime-cpu"
        assert backend.io_binding is False
        assert backend.device == 0
    finally:
        backend.close()


# --- providers --------------------------------------------------------------------------------
def test_cuda_provider_options_carry_the_device() -> None:
    opts = provider_options("onnxruntime-cuda", 3)
    assert [p for p, _ in opts] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    cuda = opts[0][1]
    assert cuda["device_id"] == "3"
    assert cuda["prefer_nhwc"] == "1"
    assert all(isinstance(v, str) for v in cuda.values())
    assert opts[1][1] == {}


def test_cpu_provider_options_have_no_cuda() -> None:
    assert provider_options("onnxruntime-cpu", 2) == [("CPUExecutionProvider", {})]


def test_unknown_backend_name_is_refused(model_paths: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="unknown ONNX Runtime backend"):
        provider_options("onnxruntime-rocm", 0)
    with pytest.raises(ValueError, match="unknown ONNX Runtime backend"):
        OnnxRuntimeBackend(model_paths["classifier"], name="onnxruntime-rocm")


@pytest.mark.skipif(HAS_CUDA_EP, reason="this onnxruntime build has CUDA")
def test_cuda_backend_is_refused_without_cuda(model_paths: dict[str, Path]) -> None:
    with pytest.raises(BackendUnavailable) as info:
        OnnxRuntimeBackend(model_paths["classifier"], name="onnxruntime-cuda", device=1)
    message = str(info.value)
    assert "CUDAExecutionProvider" in message
    assert str(ort.get_available_providers()) in message


# --- model.yaml device -------------------------------------------------------------------------
def test_config_refuses_a_negative_device() -> None:
    with pytest.raises(ValueError, match="device"):
        _config(device=-1)


def test_config_device_round_trips() -> None:
    config = _config(device=1, backends=("onnxruntime-cuda", "onnxruntime-cpu"))
    again = ModelConfig.from_dict(config.to_dict())
    assert again == config and again.device == 1
    assert _config().device == 0


# --- GPU only -----------------------------------------------------------------------------------
def _clear_batch(kind: str, rows: int, seed: int) -> np.ndarray:
    """Inputs whose results TF32 rounding on the GPU cannot change.

    Classifier: each image is uniform per channel, at a multiple of 1/4 (exact in TF32).
    Segmenter: ``make_models.block_image`` images, each block far from a class boundary.
    """
    rng = np.random.default_rng(seed)
    h, w = MODELS[kind][1]
    if kind == "classifier":
        levels = rng.integers(-4, 5, size=(rows, 3, 1, 1)) / 4.0
        return np.broadcast_to(levels, (rows, 3, h, w)).astype(np.float32)
    grid = (h // 2, w // 3)
    images = np.stack([make_models.block_image(rng, grid)[0] for _ in range(rows)])
    x = (images / 255.0 - np.asarray(make_models.MEAN)) / np.asarray(make_models.STD)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


@pytest.mark.gpu
@skip_without_gpu
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_cuda_with_io_binding_matches_cpu(model_paths: dict[str, Path], kind: str) -> None:
    gpu = OnnxRuntimeBackend(model_paths[kind], name="onnxruntime-cuda", device=0)
    cpu = OnnxRuntimeBackend(model_paths[kind], intra_op_threads=1)
    try:
        assert gpu.io_binding is True and gpu.device == 0
        for rows in (1, 3, 8):
            x = _clear_batch(kind, rows, seed=rows)
            got, want = gpu.infer({"image": x}), cpu.infer({"image": x})
            assert list(got) == list(want)
            for name, value in want.items():
                assert got[name].dtype == value.dtype and got[name].shape == value.shape
            if kind == "classifier":
                np.testing.assert_allclose(got["probabilities"], want["probabilities"], atol=1e-4)
            else:
                np.testing.assert_array_equal(got["mask"], want["mask"])
    finally:
        gpu.close()
        cpu.close()


@pytest.mark.parametrize("instances", [1, 2, 64])
def test_unset_threads_share_the_cores_out_among_the_instances(
    tmp_path: Path, instances: int
) -> None:
    from visionserve.server.repository import ModelRepository
    from visionserve.server.served_model import auto_threads, load_backend

    make_models.write_entry(tmp_path, "seg", "segmentation", instances=instances)
    entry = ModelRepository(tmp_path).entry("seg")
    cores = len(os.sched_getaffinity(0))
    assert auto_threads(instances) == max(1, cores // instances)
    backend = load_backend(entry, 0)
    assert backend.intra_op_threads == max(1, cores // instances)
    assert load_backend(entry, 3).intra_op_threads == 3  # set explicitly: kept

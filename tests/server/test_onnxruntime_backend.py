"""The ONNX Runtime backend: IO binding, providers and their options, the model's device.

Real ONNX Runtime sessions on the tiny models of ``tests/models/make_models.py``. On CPU,
the IO-binding path (``io_binding=True``) must give exactly what ``InferenceSession.run``
gives. The ``gpu`` test runs ``onnxruntime-cuda`` where ``CUDAExecutionProvider`` and a
CUDA GPU are present (``VISIONSERVE_REQUIRE_GPU=1`` turns its skip into a failure).
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import make_models
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from visionserve.server.backends.onnxruntime import (
    BackendUnavailable,
    OnnxRuntimeBackend,
    preload_cuda_libraries,
    provider_options,
)
from visionserve.server.model_config import ModelConfig

HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()


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


def test_io_binding_reuses_its_buffers_while_the_shape_repeats(
    model_paths: dict[str, Path],
) -> None:
    bound = OnnxRuntimeBackend(model_paths["classifier"], intra_op_threads=1, io_binding=True)
    plain = OnnxRuntimeBackend(model_paths["classifier"], intra_op_threads=1)
    try:
        first_x, second_x = _batch("classifier", 4, seed=1), _batch("classifier", 4, seed=2)
        first = bound.infer({"image": first_x})
        kept = {name: value.copy() for name, value in first.items()}
        buffers = bound._local.bound
        second = bound.infer({"image": second_x})
        assert bound._local.bound is buffers  # same shape: the same bound buffers
        for name, value in kept.items():  # results are the caller's, not the reused buffers
            np.testing.assert_array_equal(first[name], value)
        for name, value in plain.infer({"image": second_x}).items():
            np.testing.assert_array_equal(second[name], value)
        third_x = _batch("classifier", 2, seed=3)
        third = bound.infer({"image": third_x})
        assert bound._local.bound is not buffers  # new shape: new buffers
        for name, value in plain.infer({"image": third_x}).items():
            np.testing.assert_array_equal(third[name], value)
    finally:
        bound.close()
        plain.close()


def test_io_binding_threads_have_their_own_buffers(model_paths: dict[str, Path]) -> None:
    bound = OnnxRuntimeBackend(model_paths["segmenter"], intra_op_threads=1, io_binding=True)
    plain = OnnxRuntimeBackend(model_paths["segmenter"], intra_op_threads=1)
    inputs = [_batch("segmenter", rows, seed=seed) for seed, rows in enumerate((2, 2, 3, 2) * 4)]
    want = [plain.infer({"image": x})["mask"] for x in inputs]

    def work(offset: int) -> list[bool]:
        order = inputs[offset:] + inputs[:offset]
        expected = want[offset:] + want[:offset]
        return [
            np.array_equal(bound.infer({"image": x})["mask"], w)
            for x, w in zip(order, expected, strict=True)
        ]

    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(work, range(4)))
        assert all(all(r) for r in results)
    finally:
        bound.close()
        plain.close()


def test_cuda_libraries_are_preloaded_once_quietly(capsys: pytest.CaptureFixture[str]) -> None:
    first = preload_cuda_libraries()
    assert preload_cuda_libraries() == first
    assert "preload_dlls" in first
    assert capsys.readouterr().out == ""  # ONNX Runtime's prints go to the log


def test_cpu_defaults(model_paths: dict[str, Path]) -> None:
    backend = OnnxRuntimeBackend(model_paths["classifier"])
    try:
        assert backend.name == "onnxruntime-cpu"
        assert backend.io_binding is False
        assert backend.device == "cpu" and backend.device_id == 0
        assert backend.precision == "fp32"
    finally:
        backend.close()


# --- providers --------------------------------------------------------------------------------
def test_cuda_provider_options_carry_the_device() -> None:
    opts = provider_options("onnxruntime-cuda", 3)
    assert [p for p, _ in opts] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    cuda = opts[0][1]
    assert cuda["device_id"] == "3"
    assert cuda["prefer_nhwc"] == "1"
    # EXHAUSTIVE would benchmark every convolution again for every new input shape
    assert cuda["cudnn_conv_algo_search"] == "HEURISTIC"
    assert all(isinstance(v, str) for v in cuda.values())
    assert opts[1][1] == {}
    chosen = provider_options("onnxruntime-cuda", 0, "EXHAUSTIVE")[0][1]
    assert chosen["cudnn_conv_algo_search"] == "EXHAUSTIVE"


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
@pytest.mark.onnxruntime_cuda
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_cuda_with_io_binding_matches_cpu(model_paths: dict[str, Path], kind: str) -> None:
    gpu = OnnxRuntimeBackend(model_paths[kind], name="onnxruntime-cuda", device=0)
    cpu = OnnxRuntimeBackend(model_paths[kind], intra_op_threads=1)
    try:
        assert gpu.io_binding is True and gpu.device == "cuda:0"
        for rows in (1, 3, 3, 8, 3):  # repeated shapes reuse the bound device buffers
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
    from visionserve.server.backends.registry import auto_threads, load_backend

    make_models.write_entry(tmp_path, "seg", "segmentation", instances=instances)
    entry = ModelRepository(tmp_path).entry("seg")
    cores = len(os.sched_getaffinity(0))
    assert auto_threads(instances) == max(1, cores // instances)
    backend = load_backend(entry, 0)
    assert backend.intra_op_threads == max(1, cores // instances)
    assert load_backend(entry, 3).intra_op_threads == 3  # set explicitly: kept


# --- precision: model.fp16.onnx ------------------------------------------------------------------
def _fp16_entry(tmp_path: Path, kind: str, *, write: bool = True, **overrides: object):  # type: ignore[no-untyped-def]
    from visionserve.server.repository import ModelRepository

    task = "classification" if kind == "classifier" else "segmentation"
    make_models.write_entry(tmp_path, kind, task, precision="fp16", **overrides)
    if write:
        from visionserve.export.fp16 import write_fp16_onnx

        write_fp16_onnx(tmp_path / kind / "1")
    return ModelRepository(tmp_path).entry(kind)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_precision_fp16_serves_the_fp16_model(tmp_path: Path, kind: str) -> None:
    from visionserve.server.backends.registry import load_backend

    entry = _fp16_entry(tmp_path, kind)
    fp16 = load_backend(entry, 1)
    fp32 = OnnxRuntimeBackend(entry.directory / "model.onnx", intra_op_threads=1)
    try:
        assert fp16.path.name == "model.fp16.onnx" and fp16.precision == "fp16"
        assert fp32.precision == "fp32"
        x = _clear_batch(kind, 3, seed=5)
        got, want = fp16.infer({"image": x}), fp32.infer({"image": x})
        if kind == "classifier":
            np.testing.assert_allclose(got["probabilities"], want["probabilities"], atol=2e-3)
        else:
            assert (got["mask"] == want["mask"]).mean() > 0.99
    finally:
        fp16.close()
        fp32.close()


def test_precision_fp16_without_the_file_says_how_to_write_it(tmp_path: Path) -> None:
    from visionserve.server.backends.registry import load_backend

    entry = _fp16_entry(tmp_path, "classifier", write=False)
    with pytest.raises(RuntimeError, match="model.fp16.onnx.*--fp16-onnx-only"):
        load_backend(entry, 1)


def test_config_precision_and_cudnn_search_are_checked_and_round_trip() -> None:
    config = _config(precision="fp16", cudnn_conv_algo_search="EXHAUSTIVE")
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert _config().precision == "fp32" and _config().cudnn_conv_algo_search == "HEURISTIC"
    with pytest.raises(ValueError, match="precision must be one of"):
        _config(precision="int8")
    with pytest.raises(ValueError, match="cudnn_conv_algo_search must be one of"):
        _config(cudnn_conv_algo_search="exhaustive")


# --- GPU: what a CPU cannot show -----------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.onnxruntime_cuda
def test_cuda_session_comes_up_in_a_process_without_torch(model_paths: dict[str, Path]) -> None:
    """The server never imports torch: preload_dlls() must find cuDNN/cuBLAS on its own."""
    code = (
        "import sys; from visionserve.server.backends.onnxruntime import OnnxRuntimeBackend; "
        f"b = OnnxRuntimeBackend({str(model_paths['segmenter'])!r}, name='onnxruntime-cuda'); "
        "assert 'torch' not in sys.modules; print(b.device, b._session.get_providers())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cuda:0" in out.stdout and "CUDAExecutionProvider" in out.stdout


@pytest.mark.gpu
@pytest.mark.onnxruntime_cuda
def test_fp16_on_cuda_agrees_with_fp32(tmp_path: Path) -> None:
    from visionserve.server.backends.registry import load_backend

    entry = _fp16_entry(tmp_path, "segmenter", backends=("onnxruntime-cuda",))
    fp16 = load_backend(entry, 1)
    fp32 = OnnxRuntimeBackend(entry.directory / "model.onnx", intra_op_threads=1)
    try:
        assert fp16.name == "onnxruntime-cuda" and fp16.precision == "fp16"
        x = _clear_batch("segmenter", 4, seed=9)
        agreement = (fp16.infer({"image": x})["mask"] == fp32.infer({"image": x})["mask"]).mean()
        assert agreement > 0.99
    finally:
        fp16.close()
        fp32.close()

"""``visionserve build``: TensorRT-RTX engines ahead of time (FP32 and FP16 ONNX of a real
classifier and segmenter), engine.json contents, timing cache, errors; a GPU-only test
builds for the local GPU, validates the engine and promotes the tensorrt backend."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from _trt_models import CLASSIFIER, SEGMENTER, write_models
from visionserve.cli import main
from visionserve.export.engine_build import EngineBuildError, Target, build_engine, choose_target
from visionserve.export.trt_builder import BuildOptions
from visionserve.server.engine_compat import (
    RuntimeInfo,
    check_engine,
    gpu_runtime_unavailable,
    sha256_file,
)
from visionserve.server.model_config import ModelConfig

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(
    not HAS_RTX, reason="tensorrt_rtx not installed (pip install tensorrt-rtx-cu13)"
)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_models(tmp_path_factory.mktemp("build-repo"))


def _build(repository: Path, name: str, precision: str, cache: Path) -> dict:
    code = main(
        [
            "build",
            "--repository",
            str(repository),
            "--model",
            name,
            "--precision",
            precision,
            "--compute-capability",
            "8.6",
            "--timing-cache",
            str(cache),
            "--workspace",
            "1024",
            "--samples",
            "50",
        ]
    )
    assert code == 0
    return json.loads((repository / name / "1" / "engine.json").read_text(encoding="utf-8"))


@needs_rtx
@pytest.mark.parametrize("name", [CLASSIFIER, SEGMENTER])
def test_rtx_builds_fp32_and_fp16_engines_ahead_of_time(
    repository: Path, tmp_path: Path, name: str
) -> None:
    import tensorrt_rtx

    version_dir = repository / name / "1"
    config = ModelConfig.load(repository / name / "model.yaml")
    plans = {}
    for precision, onnx_file, plan in (
        ("fp32", "model.onnx", "model.plan"),
        ("fp16", "model.fp16.onnx", "model.fp16.plan"),
    ):
        manifest = _build(repository, name, precision, tmp_path / "timing.cache")
        plans[precision] = version_dir / plan
        assert manifest["plan"] == plan and manifest["precision"] == precision
        assert (
            manifest["flavour"] == "tensorrt_rtx"
            and manifest["tensorrt_version"] == tensorrt_rtx.__version__
        )
        assert manifest["gpu"] == "ahead-of-time" and manifest["target"] == "ahead-of-time"
        assert manifest["compute_capability"] == "8.6"
        assert manifest["plan_bytes"] == plans[precision].stat().st_size == manifest["engine_bytes"]
        assert manifest["plan_sha256"] == sha256_file(plans[precision])
        assert manifest["onnx"] == onnx_file and manifest["onnx_sha256"] == sha256_file(
            version_dir / onnx_file
        )
        assert manifest["build_seconds"] > 0 and manifest["built_at"]
        assert manifest["build_flags"]["strongly_typed"] is True
        assert manifest["build_flags"]["workspace_mb"] == 1024
        profile = manifest["profiles"]["image"]
        batch = config.profile.batch
        assert [profile[k][0] for k in ("min", "opt", "max")] == list(batch)
        if config.task == "segmentation":  # H and W dynamic, from model.yaml
            assert [profile[k][2:] for k in ("min", "opt", "max")] == [
                [config.profile.height[i], config.profile.width[i]] for i in range(3)
            ]
        else:
            assert {tuple(profile[k][1:]) for k in ("min", "opt", "max")} == {(3, 64, 64)}
        validation = json.loads((version_dir / "validation.json").read_text(encoding="utf-8"))
        assert "ahead of time" in validation[f"tensorrt_{precision}"]["skipped"]
    # FP16 weights really are in the FP16 engine; the manifest names the last engine built.
    assert plans["fp16"].stat().st_size < 0.9 * plans["fp32"].stat().st_size
    assert json.loads((version_dir / "validation.json").read_text())["fp16_onnx"]["passed"] is True
    # Ahead-of-time builds leave the backend preference alone.
    assert ModelConfig.load(repository / name / "model.yaml").backends == config.backends


@needs_rtx
def test_aot_engine_is_accepted_only_by_a_matching_runtime(
    repository: Path, tmp_path: Path
) -> None:
    import tensorrt_rtx

    build_engine(repository, SEGMENTER, compute_capability="8.6", samples=10)
    version_dir = repository / SEGMENTER / "1"
    matching = RuntimeInfo("tensorrt_rtx", tensorrt_rtx.__version__, "NVIDIA RTX A6000", "8.6")
    assert check_engine(version_dir, matching).ok
    other = RuntimeInfo("tensorrt_rtx", tensorrt_rtx.__version__, "NVIDIA GeForce RTX 4090", "8.9")
    assert "8.6" in check_engine(version_dir, other).reason


@needs_rtx
def test_timing_cache_is_recorded_as_unused_with_rtx(repository: Path, tmp_path: Path) -> None:
    cache = tmp_path / "caches" / "timing.cache"
    manifest = _build(repository, CLASSIFIER, "fp32", cache)
    info = manifest["build_flags"]["timing_cache"]
    assert info["path"] == str(cache) and info["used"] is False
    assert "no-ops in TensorRT-RTX" in info["reason"]
    assert not cache.exists()


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_timing_cache_is_written_and_reused_with_full_tensorrt(
    repository: Path, tmp_path: Path
) -> None:
    pytest.importorskip("tensorrt")
    cache = tmp_path / "timing.cache"
    copy = shutil.copytree(repository, tmp_path / "repo")
    first = build_engine(
        copy, CLASSIFIER, flavour="tensorrt", options=BuildOptions(timing_cache=cache), samples=20
    )
    assert cache.stat().st_size == first["build_flags"]["timing_cache"]["saved_bytes"] > 0
    second = build_engine(
        copy, CLASSIFIER, flavour="tensorrt", options=BuildOptions(timing_cache=cache), samples=20
    )
    assert (
        second["build_flags"]["timing_cache"]["loaded_bytes"]
        == first["build_flags"]["timing_cache"]["saved_bytes"]
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "nope"], "unknown model 'nope'"),
        (["--model", CLASSIFIER, "--flavour", "tensorrt"], ""),
        (["--model", CLASSIFIER, "--compute-capability", "6.1"], "compute capability '6.1'"),
    ],
)
def test_build_errors_exit_2_with_a_message(
    repository: Path, capsys: pytest.CaptureFixture, argv: list[str], message: str
) -> None:
    if "tensorrt" in argv and importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("full TensorRT is installed here")
    if "6.1" in argv and not HAS_RTX:
        pytest.skip("needs tensorrt_rtx to reject the compute capability")
    code = main(["build", "--repository", str(repository), *argv])
    out = capsys.readouterr().out
    assert code == 2
    assert out.startswith("error: ")
    assert message in out
    if "tensorrt" in argv:
        assert "no TensorRT library importable (asked for 'tensorrt')" in out


def test_bad_arguments_are_refused_by_the_parser(repository: Path) -> None:
    with pytest.raises(SystemExit):
        main(
            [
                "build",
                "--repository",
                str(repository),
                "--model",
                CLASSIFIER,
                "--compute-capability",
                "86",
            ]
        )


def test_choose_target() -> None:
    no_gpu = (None, None, "no CUDA device")
    assert choose_target("tensorrt_rtx", None, no_gpu) == Target("8.6", False, "ahead-of-time")
    assert choose_target("tensorrt_rtx", "8.9", no_gpu) == Target("8.9", False, "ahead-of-time")
    ada = ("NVIDIA L4", "8.9", "")
    assert choose_target("tensorrt_rtx", None, ada) == Target("8.9", True, "NVIDIA L4")
    assert choose_target("tensorrt_rtx", "8.6", ada) == Target("8.6", False, "ahead-of-time")
    assert choose_target("tensorrt", None, ada) == Target("8.9", True, "NVIDIA L4")
    with pytest.raises(EngineBuildError, match="builds for the local GPU, and there is none"):
        choose_target("tensorrt", None, no_gpu)
    with pytest.raises(EngineBuildError, match="not 8.6"):
        choose_target("tensorrt", "8.6", ada)


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.parametrize("name", [CLASSIFIER, SEGMENTER])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_local_gpu_engine_validates_and_promotes_tensorrt(
    repository: Path, tmp_path: Path, name: str, precision: str
) -> None:
    copy = shutil.copytree(repository, tmp_path / "repo")
    manifest = build_engine(copy, name, precision=precision, samples=100)
    assert manifest["target"] == "local GPU" and manifest["gpu"] != "ahead-of-time"
    validation = manifest["validation"]
    assert validation["passed"], validation
    recorded = json.loads((copy / name / "1" / "validation.json").read_text(encoding="utf-8"))
    assert recorded[f"tensorrt_{precision}"]["passed"] is True
    assert ModelConfig.load(copy / name / "model.yaml").backends[0] == "tensorrt"

"""engine.json vs the running TensorRT and GPU: the load-or-fall-back decision (no GPU needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from visionserve.server.engine_compat import (
    MANIFEST_FILE,
    RuntimeInfo,
    check_engine,
    detect_runtime,
    read_manifest,
    runs_on,
    sha256_file,
)

PLAN = b"\x01engine-bytes" * 1000
RUNTIME = RuntimeInfo("tensorrt", "10.13.0.35", "NVIDIA A10", "8.6")


def write_engine(directory: Path, **overrides: object) -> Path:
    """A plan file and its engine.json (matching RUNTIME unless overridden)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.plan").write_bytes(PLAN)
    manifest = {
        "format": 1,
        "plan": "model.plan",
        "plan_bytes": len(PLAN),
        "plan_sha256": sha256_file(directory / "model.plan"),
        "flavour": "tensorrt",
        "tensorrt_version": "10.13.0.35",
        "gpu": "NVIDIA A10",
        "compute_capability": "8.6",
        "precision": "fp16",
        "profiles": {
            "image": {"min": [1, 3, 64, 64], "opt": [8, 3, 64, 64], "max": [32, 3, 64, 64]}
        },
        "build_flags": {},
    }
    manifest.update(overrides)
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest), encoding="utf-8")
    return directory


def test_matching_engine_is_accepted(tmp_path: Path) -> None:
    decision = check_engine(write_engine(tmp_path), RUNTIME)
    assert decision.ok, decision.reason
    assert decision.plan_path == tmp_path / "model.plan"
    assert decision.manifest["precision"] == "fp16"


def test_version_mismatch_is_refused(tmp_path: Path) -> None:
    decision = check_engine(
        write_engine(tmp_path), RuntimeInfo("tensorrt", "10.8.0.43", "NVIDIA A10", "8.6")
    )
    assert not decision.ok
    assert "10.13.0.35" in decision.reason and "10.8.0.43" in decision.reason
    assert "rebuild" in decision.reason


@pytest.mark.parametrize(
    ("built", "running", "ok"),
    [
        ("10.13.0.35", "10.13.0.35", True),
        ("10.13.0.35", "10.16.1.11", True),  # newer runtime, same major
        ("10.13.0.35", "10.8.0.43", False),  # older runtime: never (TensorRT docs)
        ("10.13.0.35", "11.0.0.1", True),  # 10 -> 11 is one of the two cross-major pairs
        ("11.1.0.5", "10.16.1.11", False),
        ("8.6.1.6", "10.0.1.6", True),
        ("8.6.1.6", "11.0.0.1", False),  # "a TensorRT 8 engine cannot run with TensorRT 11"
    ],
)
def test_version_compatible_engine_runs_only_on_newer_or_equal_runtimes(
    tmp_path: Path, built: str, running: str, ok: bool
) -> None:
    directory = write_engine(
        tmp_path, tensorrt_version=built, build_flags={"version_compatible": True}
    )
    decision = check_engine(directory, RuntimeInfo("tensorrt", running, "NVIDIA A10", "8.6"))
    assert decision.ok is ok, decision.reason


def test_another_gpu_model_of_the_same_capability_loads_with_a_warning(tmp_path: Path) -> None:
    directory = write_engine(tmp_path)
    same = check_engine(directory, RUNTIME)
    assert same.ok and same.warnings == ()
    other = check_engine(directory, RuntimeInfo("tensorrt", "10.13.0.35", "NVIDIA A40", "8.6"))
    assert other.ok
    assert len(other.warnings) == 1 and "NVIDIA A10" in other.warnings[0]
    assert "NVIDIA A40" in other.warnings[0] and "rebuild" in other.warnings[0]
    aot = write_engine(tmp_path / "aot", gpu="ahead-of-time")
    assert check_engine(aot, RuntimeInfo("tensorrt", "10.13.0.35", "NVIDIA A40", "8.6")).warnings == ()


def test_largest_server_input_must_fit_the_engine_profile(tmp_path: Path) -> None:
    directory = write_engine(tmp_path)  # profile max [32, 3, 64, 64]
    assert check_engine(directory, RUNTIME, needs=("image", (32, 3, 64, 64))).ok
    decision = check_engine(directory, RUNTIME, needs=("image", (40, 3, 64, 64)))
    assert not decision.ok
    assert "[40, 3, 64, 64]" in decision.reason and "[32, 3, 64, 64]" in decision.reason
    assert "max_batch_size" in decision.reason
    assert not check_engine(directory, RUNTIME, needs=("image", (8, 3, 96, 64))).ok
    missing = check_engine(directory, RUNTIME, needs=("pixels", (1, 3, 64, 64)))
    assert not missing.ok and "no optimisation profile for input 'pixels'" in missing.reason


@pytest.mark.parametrize(
    ("flavour", "capability", "ok"),
    [
        ("tensorrt_rtx", "9.0", False),  # H100 / H200
        ("tensorrt_rtx", "10.0", False),  # B200
        ("tensorrt_rtx", "8.6", True),
        ("tensorrt_rtx", "7.5", True),
        ("tensorrt_rtx", "8.0", True),
        ("tensorrt_rtx", "8.9", True),
        ("tensorrt_rtx", "12.0", True),
        ("tensorrt_rtx", "12.1", True),
        ("tensorrt", "9.0", True),
    ],
)
def test_which_gpus_each_tensorrt_flavour_runs_on(flavour: str, capability: str, ok: bool) -> None:
    assert runs_on(flavour, capability) is ok


def test_compute_capability_mismatch_is_refused(tmp_path: Path) -> None:
    decision = check_engine(
        write_engine(tmp_path), RuntimeInfo("tensorrt", "10.13.0.35", "NVIDIA H100", "9.0")
    )
    assert not decision.ok
    assert (
        "8.6" in decision.reason and "9.0" in decision.reason and "NVIDIA H100" in decision.reason
    )


def test_ampere_plus_engine_runs_on_newer_gpus(tmp_path: Path) -> None:
    directory = write_engine(tmp_path, build_flags={"hardware_compatibility_level": "ampere_plus"})
    assert check_engine(directory, RuntimeInfo("tensorrt", "10.13.0.35", "NVIDIA H100", "9.0")).ok
    assert not check_engine(directory, RuntimeInfo("tensorrt", "10.13.0.35", "Tesla T4", "7.5")).ok


@pytest.mark.parametrize(
    ("runtime", "expected"),
    [
        (RuntimeInfo(None, None, reason="tensorrt is not importable"), "not importable"),
        (RuntimeInfo("tensorrt_rtx", "1.7.1.116", "NVIDIA A10", "8.6"), "built by tensorrt"),
        (RuntimeInfo("tensorrt", "10.13.0.35", reason="no CUDA device"), "no CUDA GPU"),
    ],
)
def test_missing_or_other_runtime_is_refused(
    tmp_path: Path, runtime: RuntimeInfo, expected: str
) -> None:
    decision = check_engine(write_engine(tmp_path), runtime)
    assert not decision.ok
    assert expected in decision.reason


def test_missing_plan_is_refused(tmp_path: Path) -> None:
    (write_engine(tmp_path) / "model.plan").unlink()
    decision = check_engine(tmp_path, RUNTIME)
    assert not decision.ok
    assert "missing" in decision.reason and "model.plan" in decision.reason


def test_corrupt_plan_same_size_is_refused_by_sha256(tmp_path: Path) -> None:
    directory = write_engine(tmp_path)
    data = bytearray(PLAN)
    data[100] ^= 0xFF
    (directory / "model.plan").write_bytes(bytes(data))
    decision = check_engine(directory, RUNTIME)
    assert not decision.ok
    assert "sha256" in decision.reason


def test_truncated_plan_is_refused_by_size(tmp_path: Path) -> None:
    directory = write_engine(tmp_path)
    (directory / "model.plan").write_bytes(PLAN[:-10])
    decision = check_engine(directory, RUNTIME)
    assert not decision.ok
    assert f"{len(PLAN) - 10} bytes" in decision.reason


def test_missing_manifest_is_refused(tmp_path: Path) -> None:
    decision = check_engine(tmp_path, RUNTIME)
    assert not decision.ok
    assert "no engine.json" in decision.reason and "visionserve build" in decision.reason


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "not readable JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"format": 1, "plan": "model.plan"}), "'plan_sha256' (str)"),
        (json.dumps({"format": 2}), "missing or mistyped keys"),
    ],
)
def test_corrupt_manifest_is_refused(tmp_path: Path, content: str, expected: str) -> None:
    write_engine(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text(content, encoding="utf-8")
    decision = check_engine(tmp_path, RUNTIME)
    assert not decision.ok
    assert decision.reason.startswith("corrupt engine manifest")
    assert expected in decision.reason


def test_manifest_plan_must_stay_in_its_folder(tmp_path: Path) -> None:
    write_engine(tmp_path, plan="../elsewhere/model.plan")
    with pytest.raises(ValueError, match="file name in the same folder"):
        read_manifest(tmp_path / MANIFEST_FILE)


def test_detect_runtime_reports_why_without_gpu() -> None:
    info = detect_runtime("tensorrt_rtx")
    if info.compute_capability is not None:
        pytest.skip("a CUDA GPU is present")
    assert info.reason  # not importable, or no CUDA device: either way it says so
    assert detect_runtime("onnx").reason.startswith("unknown TensorRT flavour")


def test_rtx_on_an_sm90_gpu_is_no_usable_gpu_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU tests skip (not error) on an H100/H200 where only TensorRT-RTX is installed."""
    from visionserve.server import engine_compat

    facts = {
        "tensorrt": RuntimeInfo(None, None, reason="tensorrt is not importable"),
        "tensorrt_rtx": RuntimeInfo("tensorrt_rtx", "1.7.1.116", "NVIDIA H200", "9.0"),
    }
    monkeypatch.setattr(engine_compat, "detect_runtime", lambda flavour, device=0: facts[flavour])
    reason = engine_compat.gpu_runtime_unavailable()
    assert reason is not None
    assert "does not run on compute capability 9.0 (NVIDIA H200)" in reason
    facts["tensorrt_rtx"] = RuntimeInfo("tensorrt_rtx", "1.7.1.116", "NVIDIA RTX 4090", "8.9")
    assert engine_compat.gpu_runtime_unavailable() is None

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


def test_version_compatible_engine_accepts_same_major(tmp_path: Path) -> None:
    directory = write_engine(tmp_path, build_flags={"version_compatible": True})
    assert check_engine(directory, RuntimeInfo("tensorrt", "10.8.0.43", "NVIDIA A10", "8.6")).ok
    assert not check_engine(directory, RuntimeInfo("tensorrt", "11.0.0.1", "NVIDIA A10", "8.6")).ok


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

from __future__ import annotations

from pathlib import Path

import pytest
from visionserve.export.repository import (
    existing_versions,
    next_version,
    write_model_config,
    write_repository_entry,
    write_version,
)
from visionserve.server.model_config import ModelConfig


def _config(name: str = "m", labels=("a", "b")) -> ModelConfig:
    return ModelConfig(name=name, task="classification", labels=labels,
                       outputs={"logits": "logits", "probabilities": "probabilities"})


def test_versions_are_numbered_from_one(tmp_path: Path) -> None:
    assert next_version(tmp_path / "m") == 1
    write_version(tmp_path, "m", {"model.onnx": b"x"})
    write_version(tmp_path, "m", {"model.onnx": b"y"})
    (tmp_path / "m" / "notes").mkdir()
    assert existing_versions(tmp_path / "m") == [1, 2]
    assert (tmp_path / "m/2/model.onnx").read_bytes() == b"y"
    assert (tmp_path / "m/2").stat().st_mode & 0o777 == 0o755


def test_existing_version_is_never_overwritten(tmp_path: Path) -> None:
    write_version(tmp_path, "m", {"model.onnx": b"x"}, version=3)
    with pytest.raises(FileExistsError, match="already exists"):
        write_version(tmp_path, "m", {"model.onnx": b"z"}, version=3)
    assert (tmp_path / "m/3/model.onnx").read_bytes() == b"x"


def test_failed_write_leaves_no_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="plain names"):
        write_version(tmp_path, "m", {"model.onnx": b"x", "../escape": b"y"})
    assert list((tmp_path / "m").iterdir()) == []


@pytest.mark.parametrize("name", ["", "a/b", "..", ".hidden"])
def test_bad_model_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="model name"):
        write_version(tmp_path, name, {"model.onnx": b"x"})


def test_model_yaml_round_trip_and_replace(tmp_path: Path) -> None:
    path = write_model_config(tmp_path, _config())
    assert ModelConfig.load(path) == _config()
    write_model_config(tmp_path, _config(labels=("a", "b", "c")))
    assert ModelConfig.load(path).labels == ("a", "b", "c")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.yaml"]


def test_entry_writes_version_then_config(tmp_path: Path) -> None:
    target = write_repository_entry(tmp_path, _config(), {"model.onnx": b"x", "validation.json": b"{}"})
    assert target == tmp_path / "m" / "1"
    assert (tmp_path / "m/model.yaml").is_file()

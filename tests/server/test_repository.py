"""Model repository layout: versions, latest, names checked before the filesystem."""

from __future__ import annotations

from pathlib import Path

import make_models
import pytest

from visionserve.server.errors import InvalidArgument, NotFound
from visionserve.server.repository import ModelRepository, check_model_name, parse_version


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    make_models.write_entry(tmp_path, "seg", "segmentation", versions=(1, 3, 10))
    make_models.write_entry(tmp_path, "cls", "classification")
    (tmp_path / "seg" / "7").mkdir()  # no model file: not a version
    (tmp_path / "seg" / "beta").mkdir()  # not an integer: not a version
    (tmp_path / "not-a-model").mkdir()  # no model.yaml: skipped
    return ModelRepository(tmp_path)


def test_lists_models_and_integer_versions(repo: ModelRepository) -> None:
    assert repo.model_names() == ["cls", "seg"]
    assert repo.versions("seg") == [1, 3, 10]  # numeric, not lexical, order


def test_empty_version_is_the_highest(repo: ModelRepository) -> None:
    entry = repo.entry("seg")
    assert entry.version == 10 and entry.onnx_path == repo.root / "seg" / "10" / "model.onnx"
    assert entry.config.task == "segmentation"
    assert repo.entry("seg", "3").version == 3
    assert len(repo.entries()) == 4


def test_unknown_version_lists_available(repo: ModelRepository) -> None:
    with pytest.raises(NotFound, match="no version 7: available versions are 1, 3, 10"):
        repo.entry("seg", "7")


def test_unknown_model_lists_available(repo: ModelRepository) -> None:
    with pytest.raises(NotFound, match="unknown model 'nope': available models are cls, seg"):
        repo.entry("nope")


@pytest.mark.parametrize("name", ["../etc", "", "a/b", ".hidden", "-x", "x" * 129, "seg\x00", "é"])
def test_bad_names_are_refused_before_touching_the_filesystem(
    repo: ModelRepository, name: str
) -> None:
    with pytest.raises(InvalidArgument, match="invalid model name"):
        repo.entry(name)


@pytest.mark.parametrize("name", ["a", "resnet50", "unet_v2.1", "A-b_c.d", "9" * 128])
def test_good_names(name: str) -> None:
    assert check_model_name(name) == name


@pytest.mark.parametrize("version", ["0", "-1", "abc", "1.0", " 1", "01"])
def test_bad_versions(version: str) -> None:
    with pytest.raises(InvalidArgument, match="positive integer"):
        parse_version(version)


def test_broken_model_yaml_names_the_file(tmp_path: Path) -> None:
    make_models.write_entry(tmp_path, "bad", "segmentation")
    (tmp_path / "bad" / "model.yaml").write_text("name: bad\ntask: detection\nlabels: [a, b]\n")
    with pytest.raises(ValueError, match="model.yaml.*task must be one of"):
        ModelRepository(tmp_path).entry("bad")

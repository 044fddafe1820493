"""Shared fixtures of the export tests: small generated data sets and untrained checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from visionserve.export.checkpoint import build_from_metadata, write_metadata
from visionserve.export.datasets import (
    CLASSIFICATION_CLASSES,
    SEGMENTATION_CLASSES,
    generate_dataset,
)

torch.set_num_threads(2)

CLASSIFIER_METADATA = {"architecture": "resnet_small", "labels": list(CLASSIFICATION_CLASSES),
                       "input": {"height": 64, "width": 64}}
SEGMENTER_METADATA = {"architecture": "unet", "arch_kwargs": {"base_channels": 4, "depth": 3},
                      "labels": list(SEGMENTATION_CLASSES), "input": {"height": 64, "width": 64}}


def make_checkpoint(directory: Path, metadata: dict, seed: int = 0) -> Path:
    """An untrained checkpoint (model.pth + model.json) in ``directory``; returns model.pth."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = build_from_metadata(metadata)
    torch.save(model.state_dict(), directory / "model.pth")
    write_metadata(directory / "model.json", metadata)
    return directory / "model.pth"


@pytest.fixture
def classifier_metadata() -> dict:
    return dict(CLASSIFIER_METADATA)


@pytest.fixture
def segmenter_metadata() -> dict:
    return dict(SEGMENTER_METADATA)


@pytest.fixture
def checkpoint_factory():
    """``make_checkpoint(directory, metadata, seed=0) -> model.pth``."""
    return make_checkpoint


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(train, val) directories of 64x64 generated images."""
    root = tmp_path_factory.mktemp("shapes")
    return (generate_dataset(root / "train", 96, size=64, seed=0),
            generate_dataset(root / "val", 32, size=64, seed=1))


@pytest.fixture
def classifier_checkpoint(tmp_path: Path) -> Path:
    return make_checkpoint(tmp_path / "classifier", CLASSIFIER_METADATA)


@pytest.fixture
def segmenter_checkpoint(tmp_path: Path) -> Path:
    return make_checkpoint(tmp_path / "segmenter", SEGMENTER_METADATA)

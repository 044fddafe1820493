from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from visionserve.export.checkpoint import load_checkpoint
from visionserve.export.train import TrainConfig, confusion_iou, train


def test_classifier_loss_decreases_and_checkpoint_loads(tmp_path: Path, small_data) -> None:
    train_dir, val_dir = small_data
    records = []
    config = TrainConfig(task="classification", epochs=4, batch_size=16, lr=2e-3)
    metadata = train(config, train_dir, val_dir, tmp_path / "ckpt", on_epoch=records.append)
    assert len(records) == 4
    assert records[-1]["loss"] < records[0]["loss"]
    assert 0.0 <= metadata["metrics"]["accuracy"] <= 1.0
    written = json.loads((tmp_path / "ckpt/model.json").read_text())
    assert written["architecture"] == "resnet_small" and written["labels"] == ["circle", "square", "triangle"]
    assert written["input"]["height"] == 64
    model = load_checkpoint(tmp_path / "ckpt/model.pth", tmp_path / "ckpt/model.json")
    # the auxiliary training head is not part of the checkpoint
    assert set(model.state_dict()) == set(torch.load(tmp_path / "ckpt/model.pth", weights_only=True))


def test_segmenter_loss_decreases(tmp_path: Path, small_data) -> None:
    train_dir, val_dir = small_data
    records = []
    config = TrainConfig(task="segmentation", epochs=3, batch_size=16, lr=5e-3,
                         arch_kwargs={"base_channels": 4, "depth": 3})
    metadata = train(config, train_dir, val_dir, tmp_path / "ckpt", on_epoch=records.append)
    assert records[-1]["loss"] < records[0]["loss"]
    assert set(metadata["metrics"]["iou"]) == {"background", "circle", "square", "triangle"}
    assert metadata["arch_kwargs"] == {"base_channels": 4, "depth": 3}
    load_checkpoint(tmp_path / "ckpt/model.pth", metadata)


def test_confusion_iou_counts() -> None:
    target = np.array([[0, 0, 1, 1], [2, 2, 255, 1]], np.uint8)
    pred = np.array([[0, 1, 1, 1], [2, 0, 0, 1]], np.uint8)
    inter, union = confusion_iou(pred, target, 3)
    assert inter.tolist() == [1, 3, 1]  # the 255 pixel is ignored
    assert union.tolist() == [3, 4, 2]


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="task"):
        TrainConfig(task="detection")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(task="segmentation", batch_size=0)
    assert TrainConfig(task="segmentation").resolved_arch_kwargs == {"base_channels": 8, "depth": 4}


def test_too_small_data_set_is_refused(tmp_path: Path, small_data) -> None:
    train_dir, val_dir = small_data
    with pytest.raises(ValueError, match="fewer than one batch"):
        train(TrainConfig(task="classification", batch_size=1000), train_dir, val_dir, tmp_path)


def test_classification_without_masks(tmp_path: Path) -> None:
    from visionserve.export.datasets import generate_dataset

    data = generate_dataset(tmp_path / "data", 32, size=32, seed=2)
    for mask in (data / "masks").iterdir():
        mask.unlink()
    with pytest.raises(FileNotFoundError, match="needs masks.*aux_mask_weight=0"):
        train(TrainConfig(task="classification", epochs=1, batch_size=16), data, data, tmp_path / "a")
    metadata = train(TrainConfig(task="classification", epochs=1, batch_size=16, aux_mask_weight=0.0),
                     data, data, tmp_path / "b")
    assert metadata["metrics"]["config"]["aux_mask_weight"] == 0.0
    assert (tmp_path / "b/model.pth").is_file()

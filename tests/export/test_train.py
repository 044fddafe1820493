from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from visionserve.export.checkpoint import load_checkpoint
from visionserve.export.train import (
    TrainConfig,
    classes_below,
    evaluate,
    load_arrays,
    random_crop,
    train,
)


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


class _Fixed(torch.nn.Module):
    """Predicts fixed masks (as logits), the next ``len(x)`` of them at each call."""

    def __init__(self, masks: np.ndarray, num_classes: int) -> None:
        super().__init__()
        self.masks = torch.from_numpy(masks).long()
        self.num_classes = num_classes
        self.done = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        masks = self.masks[self.done:self.done + x.shape[0]]
        self.done += x.shape[0]
        return torch.nn.functional.one_hot(masks, self.num_classes).permute(0, 3, 1, 2).float()


def test_evaluate_scores_like_the_server(tmp_path: Path, small_data) -> None:
    from visionserve.server.iou import compute_iou

    _, val_dir = small_data
    data = load_arrays(val_dir)
    data.masks[0, :5] = 255  # ignored pixels
    rng = np.random.default_rng(0)
    pred = np.where(rng.random(data.masks.shape) < 0.9, data.masks, rng.integers(0, 4, data.masks.shape))
    pred = np.where(data.masks == 255, 0, pred).astype(np.uint8)
    metrics = evaluate(_Fixed(pred, 4), data, "segmentation", (0.0,) * 3, (1.0,) * 3, batch_size=5)
    expected = compute_iou(pred.reshape(-1, pred.shape[-1]), data.masks.reshape(-1, pred.shape[-1]), 4)
    assert metrics["miou"] == pytest.approx(expected.mean_iou)
    assert list(metrics["iou"].values()) == pytest.approx(expected.iou.tolist())


def test_classes_below_the_floor() -> None:
    metrics = {"iou": {"background": 0.99, "circle": 0.7, "triangle": 0.0, "square": float("nan")}}
    assert classes_below(metrics, 0.5) == {"triangle": 0.0}  # NaN: absent from the held-out data
    assert classes_below(metrics, 0.75) == {"circle": 0.7, "triangle": 0.0}
    assert classes_below(metrics, 0.0) == {}
    assert classes_below({"accuracy": 0.3}, 0.5) == {}


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="task"):
        TrainConfig(task="detection")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(task="segmentation", batch_size=0)
    assert TrainConfig(task="segmentation").resolved_arch_kwargs == {"base_channels": 8, "depth": 4}
    with pytest.raises(ValueError, match="crop must be >= 0"):
        TrainConfig(task="segmentation", crop=-1)
    with pytest.raises(ValueError, match="crop is for segmentation"):
        TrainConfig(task="classification", crop=32)


def test_coarse_epochs_are_checked_and_fit_the_model() -> None:
    from visionserve.export.models import build_model
    from visionserve.export.train import coarse_fits

    with pytest.raises(ValueError, match="coarse_epochs must be >= 0 and below the epochs"):
        TrainConfig(task="segmentation", epochs=3, coarse_epochs=3)
    with pytest.raises(ValueError, match="coarse_epochs"):
        TrainConfig(task="segmentation", coarse_epochs=-1)
    recipe = TrainConfig(task="segmentation").resolved_coarse_epochs
    assert 0 < recipe < TrainConfig(task="segmentation").resolved_epochs
    assert TrainConfig(task="segmentation", epochs=1).resolved_coarse_epochs == 0  # demo --quick
    assert TrainConfig(task="segmentation", epochs=recipe + 1).resolved_coarse_epochs == recipe - 1
    assert TrainConfig(task="segmentation", epochs=40).resolved_coarse_epochs == recipe
    unet = build_model("unet", num_classes=4, base_channels=4, depth=4)  # multiples of 16
    assert coarse_fits(unet, 96, 64) and not coarse_fits(unet, 80, 96) and not coarse_fits(unet, 96, 48)
    assert coarse_fits(build_model("resnet_small", num_classes=3, width=8), 33 * 2, 70)


def test_coarse_epochs_train_at_half_size_then_full(tmp_path: Path, small_data) -> None:
    train_dir, val_dir = small_data
    model_inputs: list[tuple[int, ...]] = []
    config = TrainConfig(task="segmentation", epochs=2, coarse_epochs=1, batch_size=16,
                         arch_kwargs={"base_channels": 4, "depth": 3})

    from visionserve.export.models.unet import UNet

    def record(module, inputs, _output):  # type: ignore[no-untyped-def]
        if isinstance(module, UNet) and module.training:
            model_inputs.append(tuple(inputs[0].shape[-2:]))

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        metadata = train(config, train_dir, val_dir, tmp_path / "ckpt")
    finally:
        hook.remove()
    steps = len(model_inputs) // 2
    assert model_inputs[:steps] == [(32, 32)] * steps and model_inputs[steps:] == [(64, 64)] * steps
    assert metadata["metrics"]["config"]["coarse_epochs"] == 1
    assert metadata["input"]["height"] == 64


def test_random_crop_cuts_image_and_mask_at_the_same_place() -> None:
    gen = torch.Generator().manual_seed(0)
    rows = torch.arange(48).view(1, 48, 1).expand(6, 48, 40)
    cols = torch.arange(40).view(1, 1, 40).expand(6, 48, 40)
    images = torch.stack([rows, cols, rows + cols], dim=-1).to(torch.uint8)  # NHWC: position coded
    masks = (rows * 2 + cols).to(torch.uint8)
    x, y = random_crop(images, masks, 16, gen)
    assert x.shape == (6, 16, 16, 3) and y.shape == (6, 16, 16)
    assert torch.equal(y, x[..., 0] * 2 + x[..., 1])  # the mask window is the image window
    tops = x[:, 0, 0, 0].tolist()
    assert len(set(tops)) > 1 and all(0 <= t <= 48 - 16 for t in tops)  # a place per sample
    assert torch.equal((x[:, 1:, :, 0] - x[:, :-1, :, 0]), torch.ones(6, 15, 16, dtype=torch.uint8))
    whole = random_crop(images, masks, 40, gen)  # not larger than the crop in both: whole
    assert whole[0] is images and whole[1] is masks
    assert random_crop(images, masks, 0, gen)[0] is images


def test_segmenter_trains_on_crops_and_is_evaluated_whole(tmp_path: Path, small_data) -> None:
    train_dir, val_dir = small_data
    config = TrainConfig(task="segmentation", epochs=1, batch_size=16, crop=32,
                         arch_kwargs={"base_channels": 4, "depth": 3})
    metadata = train(config, train_dir, val_dir, tmp_path / "ckpt")
    assert metadata["input"]["height"] == 64  # the model is served on whole images
    assert metadata["metrics"]["config"]["crop"] == 32
    with pytest.raises(ValueError, match="crop 20 is not a multiple of 8"):
        train(TrainConfig(task="segmentation", epochs=1, batch_size=16, crop=20,
                          arch_kwargs={"base_channels": 4, "depth": 3}), train_dir, val_dir, tmp_path / "b")


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

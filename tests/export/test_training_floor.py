"""The default segmentation recipe (loss, learning rate, schedule, coarse epochs, width) learns every class:
trained twice (two seeds, two torch thread counts: different float order, as on another
CPU), every class's held-out IoU ends above the quality floor of ``train`` and ``demo``.

Smaller images than the demo (64x64, 1200 of them) so that CI can afford it, with about
as many optimiser steps as the demo (450 vs 558; at 4 epochs, 148 steps, these images end
near mIoU 0.3; without class weighting the triangle stayed at IoU 0 after 450). The
demo's own spread (3000 96x96 images, seeds 0-2 x threads 1-2) is ``bench/train_spread.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from visionserve.export.datasets import generate_dataset
from visionserve.export.recipe import DEFAULT_MIN_CLASS_IOU
from visionserve.export.train import TrainConfig, classes_below, train


@pytest.mark.slow
def test_default_recipe_clears_the_floor_for_two_seeds_and_thread_counts(tmp_path: Path) -> None:
    train_dir = generate_dataset(tmp_path / "train", 1200, size=64, seed=0)
    val_dir = generate_dataset(tmp_path / "val", 100, size=64, seed=1)
    for seed, threads in ((0, 1), (1, 2)):
        config = TrainConfig(task="segmentation", seed=seed, threads=threads, epochs=12)
        metrics = train(config, train_dir, val_dir, tmp_path / f"ckpt-{seed}-{threads}")["metrics"]
        assert metrics["config"]["loss"] == "ce+soft-iou" and metrics["config"]["class_weighting"]
        assert classes_below(metrics, DEFAULT_MIN_CLASS_IOU) == {}, (seed, threads, metrics["iou"])

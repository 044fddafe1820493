"""Small real models in a model repository, for the FP16 and engine-build tests.

``resnet_small`` and a UNet from the zoo, random init with BatchNorm statistics calibrated
on generated shape images (train-mode forward passes, no gradient step), so activations
have realistic scales, exported with the project's exporter and written with its
repository writer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from visionserve.export.datasets import CLASSIFICATION_CLASSES, SEGMENTATION_CLASSES, sample
from visionserve.export.models import build_model
from visionserve.export.onnx_export import model_config_from_metadata, onnx_from_module
from visionserve.export.repository import write_repository_entry
from visionserve.server.model_config import InputSpec
from visionserve.server.preprocess import preprocess_batch

SIZE = 64
CLASSIFIER = "shapes-classifier"
SEGMENTER = "shapes-segmenter"
_SPEC = InputSpec(height=SIZE, width=SIZE)


def calibrated(
    architecture: str, num_classes: int, *, seed: int = 0, batches: int = 4, **arch_kwargs: object
) -> torch.nn.Module:
    """``architecture`` with BatchNorm running statistics from generated images (eval mode)."""
    torch.manual_seed(seed)
    model = build_model(architecture, num_classes=num_classes, **arch_kwargs)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration batches
    rng = np.random.default_rng(seed)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            images = [sample(rng, SIZE)[0] for _ in range(32)]
            model(torch.from_numpy(preprocess_batch(images, _SPEC)))
    return model.eval()


def _metadata(task: str, labels: tuple[str, ...]) -> dict:
    return {
        "task": task,
        "labels": list(labels),
        "input": {"height": SIZE, "width": SIZE, "mean": list(_SPEC.mean), "std": list(_SPEC.std)},
    }


def write_models(repository: Path) -> Path:
    """REPO with ``shapes-classifier`` and ``shapes-segmenter`` (version 1 each)."""
    torch.set_num_threads(2)
    entries = [
        (
            CLASSIFIER,
            "classification",
            CLASSIFICATION_CLASSES,
            calibrated("resnet_small", len(CLASSIFICATION_CLASSES)),
        ),
        (
            SEGMENTER,
            "segmentation",
            SEGMENTATION_CLASSES,
            calibrated("unet", len(SEGMENTATION_CLASSES), base_channels=8, depth=2),
        ),
    ]
    for name, task, labels, model in entries:
        proto = onnx_from_module(model, task, height=SIZE, width=SIZE)
        config = model_config_from_metadata(name, _metadata(task, labels))
        write_repository_entry(
            repository, config, {"model.onnx": proto.SerializeToString()}, version=1
        )
    return repository

"""Validation samples and output agreement, shared by the FP16 and engine validations.

Both compare a candidate (FP16 ONNX, TensorRT engine) with the FP32 ONNX model on the
*same* inputs: generated shape images (:func:`visionserve.export.datasets.sample`),
preprocessed exactly as the server does (:func:`visionserve.server.preprocess.preprocess_batch`).
No torch here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from visionserve.export.datasets import sample
from visionserve.server.atomic import write_atomic
from visionserve.server.model_config import ModelConfig
from visionserve.server.preprocess import preprocess_batch

logger = logging.getLogger(__name__)

DEFAULT_SAMPLES = 200
DEFAULT_SEED = 1234
MIN_TOP1_AGREEMENT = 0.99  # classifiers: share of images whose top-1 class is unchanged
MIN_MASK_AGREEMENT = 0.995  # segmenters: share of pixels whose class is unchanged

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def validation_images(
    config: ModelConfig, count: int = DEFAULT_SAMPLES, seed: int = DEFAULT_SEED
) -> np.ndarray:
    """``count`` generated shape images, preprocessed for ``config``: float32 (N, 3, H, W)."""
    if count < 1:
        raise ValueError(f"count must be at least 1 sample, got {count}")
    rng = np.random.default_rng(seed)
    size = max(config.input.height, config.input.width, 32)
    images = [sample(rng, size)[0] for _ in range(count)]
    return preprocess_batch(images, config.input)


def run_batched(
    run: Runner, input_name: str, images: np.ndarray, batch: int
) -> dict[str, np.ndarray]:
    """Run ``run`` over ``images`` in chunks of ``batch`` and concatenate each output."""
    chunks: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), batch):
        for name, value in run({input_name: images[start : start + batch]}).items():
            chunks.setdefault(name, []).append(np.asarray(value))
    return {name: np.concatenate(parts, axis=0) for name, parts in chunks.items()}


def agreement(
    config: ModelConfig, reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]
) -> dict[str, Any]:
    """How closely ``candidate`` outputs follow ``reference`` for the model's task.

    Classification: top-1 agreement and max |probability difference|. Segmentation: pixel
    agreement of the class masks, plus the worst single image.
    """
    if config.task == "classification":
        name = config.outputs["probabilities"]
        ref, cand = reference[name].astype(np.float64), candidate[name].astype(np.float64)
        same = ref.argmax(axis=1) == cand.argmax(axis=1)
        return {
            "metric": "top1_agreement",
            "top1_agreement": float(same.mean()),
            "disagreements": int((~same).sum()),
            "max_abs_prob_diff": float(np.abs(ref - cand).max()),
            "samples": len(ref),
        }
    name = config.outputs["mask"]
    ref, cand = reference[name], candidate[name]
    if ref.shape != cand.shape:
        raise ValueError(f"mask shapes differ: reference {ref.shape}, candidate {cand.shape}")
    same = ref == cand
    per_image = same.reshape(len(same), -1).mean(axis=1)
    return {
        "metric": "mask_agreement",
        "mask_agreement": float(same.mean()),
        "worst_image_agreement": float(per_image.min()),
        "samples": len(ref),
    }


def passes(
    result: dict[str, Any],
    min_top1: float = MIN_TOP1_AGREEMENT,
    min_mask: float = MIN_MASK_AGREEMENT,
) -> tuple[bool, float]:
    """(passed, threshold) of an :func:`agreement` result."""
    threshold = min_top1 if result["metric"] == "top1_agreement" else min_mask
    return result[result["metric"]] >= threshold, threshold


def merge_validation(path: Path, key: str, value: Any) -> dict[str, Any]:
    """Set ``key`` in the JSON file ``path`` (created if missing), keeping its other keys."""
    path = Path(path)
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); fix or remove it") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object at the top level")
    data[key] = value
    write_atomic(path, json.dumps(data, indent=2) + "\n")
    return data

"""Demo training: the small ResNet classifier and the UNet segmenter on a data set directory.

Data sets use the layout of ``visionserve.export.datasets``. Images are held in memory
(uint8), normalised per batch, and augmented with flips and 90-degree rotations. The
result is a checkpoint directory: ``model.pth`` (state_dict) + ``model.json`` (metadata).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from visionserve.export.checkpoint import IMAGENET_MEAN, IMAGENET_STD, write_metadata
from visionserve.export.datasets import load_classes, load_dataset, read_image, read_mask
from visionserve.export.losses import Loss, class_weights, segmentation_loss
from visionserve.export.models import build_model
from visionserve.export.recipe import DEFAULTS, LOSSES
from visionserve.server.iou import confusion_matrix, iou_from_confusion, nan_mean

logger = logging.getLogger(__name__)

TASKS = ("classification", "segmentation")


@dataclass(frozen=True)
class TrainConfig:
    """What to train and how. Defaults reach the demo targets on a 2-core CPU."""

    task: str
    epochs: int | None = None  # None: the task's default
    batch_size: int = 32
    lr: float | None = None  # peak learning rate of the one-cycle schedule; None: task default
    weight_decay: float = 1e-4
    # Classification only: weight of an auxiliary per-pixel loss on ResNet layer3 features,
    # supervised by the data set's masks (deep supervision; training only, never exported).
    # It makes the shape features learnable within the CPU budget. 0 disables (no masks needed).
    aux_mask_weight: float = 1.0
    seed: int = 0
    threads: int = 2
    arch_kwargs: dict[str, Any] | None = None  # None: the task's default
    # Segmentation only: the loss (one of losses.LOSSES) and whether cross-entropy weighs
    # classes by inverse square-root pixel frequency. None: the task's default.
    loss: str | None = None
    class_weighting: bool | None = None
    # Segmentation only: train on random crop x crop windows of each image (a fully
    # convolutional model; held-out evaluation sees whole images). 0: whole images.
    # None: the task's default. Images not larger than the crop are used whole.
    crop: int | None = None
    # The first ``coarse_epochs`` epochs train on images downsampled 2x (area; masks: every
    # second pixel): a quarter of the compute per step, the shapes' context kept (progressive
    # resizing). At least the last epoch is at full size. None: the task's default.
    coarse_epochs: int | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.aux_mask_weight < 0:
            raise ValueError(f"aux_mask_weight must be >= 0, got {self.aux_mask_weight}")
        if self.loss is not None and self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.task == "classification" and self.loss not in (None, "ce"):
            raise ValueError(f"loss {self.loss!r} is for segmentation; classification trains with 'ce'")
        if self.crop is not None and self.crop < 0:
            raise ValueError(f"crop must be >= 0 (0: whole images), got {self.crop}")
        if self.task == "classification" and self.crop:
            raise ValueError("crop is for segmentation; a classifier trains on whole images")
        if not 0 <= self.resolved_coarse_epochs < self.resolved_epochs:
            raise ValueError(f"coarse_epochs must be >= 0 and below the epochs ({self.resolved_epochs}): "
                             f"at least the last epoch trains at full size, got {self.resolved_coarse_epochs}")

    @property
    def uses_masks(self) -> bool:
        return self.task == "segmentation" or self.aux_mask_weight > 0

    @property
    def architecture(self) -> str:
        return "resnet_small" if self.task == "classification" else "unet"

    @property
    def resolved_epochs(self) -> int:
        return self.epochs or DEFAULTS[self.task]["epochs"]

    @property
    def resolved_lr(self) -> float:
        return self.lr or DEFAULTS[self.task]["lr"]

    @property
    def resolved_loss(self) -> str:
        return self.loss or DEFAULTS[self.task]["loss"]

    @property
    def resolved_class_weighting(self) -> bool:
        return DEFAULTS[self.task]["class_weighting"] if self.class_weighting is None else self.class_weighting

    @property
    def resolved_coarse_epochs(self) -> int:
        """As given; by default the recipe's, but leaving at least two full-size epochs
        when fewer epochs than the recipe's are asked for (``--epochs 1``: none)."""
        if self.coarse_epochs is not None:
            return self.coarse_epochs
        return max(0, min(DEFAULTS[self.task].get("coarse_epochs", 0), self.resolved_epochs - 2))

    @property
    def resolved_crop(self) -> int:
        return DEFAULTS[self.task].get("crop", 0) if self.crop is None else self.crop

    @property
    def resolved_arch_kwargs(self) -> dict[str, Any]:
        return dict(DEFAULTS[self.task]["arch_kwargs"] if self.arch_kwargs is None else self.arch_kwargs)


@dataclass
class Arrays:
    """A data set in memory: uint8 NHWC images, uint8 NHW masks, int64 labels, class names."""

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    classes: dict[str, list[str]]


def load_arrays(data_dir: Path, *, need_masks: bool = True) -> Arrays:
    """Read a data set directory into memory; all images must share one size."""
    classes = load_classes(data_dir)
    examples = load_dataset(data_dir)
    names = classes["classification"]
    unknown = sorted({e.label for e in examples} - set(names))
    if unknown:
        raise ValueError(f"{data_dir}/labels.csv uses labels {unknown} not in classes.json {names}")
    if need_masks and not all(e.mask.is_file() for e in examples):
        missing = next(e.mask for e in examples if not e.mask.is_file())
        raise FileNotFoundError(f"{missing} not found: this training needs masks for every image "
                                "(for classification without masks pass aux_mask_weight=0)")
    images = np.stack([read_image(e.image) for e in examples])  # raises if sizes differ
    masks = (np.stack([read_mask(e.mask) for e in examples]) if need_masks
             else np.zeros(images.shape[:3], np.uint8))
    labels = np.array([names.index(e.label) for e in examples], dtype=np.int64)
    return Arrays(images=images, masks=masks, labels=labels, classes=classes)


def normalise(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 NHWC RGB -> float32 NCHW, (pixel / 255 - mean) / std."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


def augment(images: torch.Tensor, masks: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample horizontal/vertical flips and a per-batch 90-degree rotation (NHWC / NHW)."""
    n = images.shape[0]
    for axis_img, axis_mask in ((2, 2), (1, 1)):
        flip = torch.rand(n, generator=gen) < 0.5
        images = torch.where(flip.view(n, 1, 1, 1), images.flip(axis_img), images)
        masks = torch.where(flip.view(n, 1, 1), masks.flip(axis_mask), masks)
    if images.shape[1] == images.shape[2] and torch.rand(1, generator=gen).item() < 0.5:
        images, masks = images.transpose(1, 2), masks.transpose(1, 2)
    return images.contiguous(), masks.contiguous()


def random_crop(images: torch.Tensor, masks: torch.Tensor, size: int,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``size`` x ``size`` window of each image (NHWC) and its mask (NHW), at a random place
    per sample; an image not larger than ``size`` in both dimensions is returned whole."""
    n, height, width = masks.shape
    if not size or height <= size or width <= size:
        return images, masks
    tops = torch.randint(0, height - size + 1, (n,), generator=gen).tolist()
    lefts = torch.randint(0, width - size + 1, (n,), generator=gen).tolist()
    windows = [(slice(t, t + size), slice(x, x + size)) for t, x in zip(tops, lefts)]
    return (torch.stack([images[i, rows, cols] for i, (rows, cols) in enumerate(windows)]),
            torch.stack([masks[i, rows, cols] for i, (rows, cols) in enumerate(windows)]))


def _size_multiple(model: nn.Module) -> int:
    """Input sides must be multiples of this (a UNet: ``2 ** depth``; 1 for models without the rule)."""
    return getattr(model, "size_multiple", 1)


def coarse_fits(model: nn.Module, height: int, width: int) -> bool:
    """Whether images downsampled 2x still fit the model."""
    return all(side % 2 == 0 and (side // 2) % _size_multiple(model) == 0 for side in (height, width))


def check_crop(model: nn.Module, crop: int) -> None:
    """A crop the model cannot take fails before training."""
    multiple = _size_multiple(model)
    if crop and crop % multiple:
        raise ValueError(f"crop {crop} is not a multiple of {multiple}, which this "
                         f"{type(model).__name__} needs; use a multiple of {multiple} or 0 (whole images)")


@torch.no_grad()
def evaluate(model: nn.Module, data: Arrays, task: str, mean: tuple[float, ...], std: tuple[float, ...],
             batch_size: int = 64) -> dict[str, Any]:
    """Held-out metrics: accuracy, or dataset-level per-class IoU and their mean (mIoU).

    IoU follows ``server/iou.py`` (the one implementation): confusion matrices summed over
    the data set, ``ignore_index`` 255 left out, NaN for a class in neither mask.
    """
    model.eval()
    num_classes = len(data.classes["segmentation" if task == "segmentation" else "classification"])
    correct, confusion = 0, np.zeros((num_classes, num_classes), np.int64)
    for start in range(0, len(data.images), batch_size):
        x = normalise(torch.from_numpy(data.images[start:start + batch_size]), mean, std)
        pred = model(x).argmax(1).numpy()
        if task == "classification":
            correct += int((pred == data.labels[start:start + batch_size]).sum())
        else:
            truth = data.masks[start:start + batch_size]
            confusion += confusion_matrix(pred.astype(np.uint8).reshape(-1, pred.shape[-1]),
                                          truth.reshape(-1, truth.shape[-1]), num_classes)
    if task == "classification":
        return {"accuracy": correct / len(data.images)}
    iou = iou_from_confusion(confusion)[2]
    names = data.classes["segmentation"]
    return {"miou": nan_mean(iou), "iou": {n: float(v) for n, v in zip(names, iou)}}


def classes_below(metrics: dict[str, Any], floor: float) -> dict[str, float]:
    """Classes whose held-out IoU is below ``floor``; NaN (in neither the held-out masks nor
    the predictions: nothing to judge) is not."""
    return {name: value for name, value in metrics.get("iou", {}).items() if value < floor}


class AuxiliaryMaskHead(nn.Module):
    """A 1x1 conv predicting the (downsampled) index mask from a ResNet's ``layer3`` output."""

    def __init__(self, model: nn.Module, num_classes: int, sample: torch.Tensor) -> None:
        super().__init__()
        if not hasattr(model, "layer3"):
            raise ValueError(f"aux_mask_weight needs a ResNet (a layer3 module), got {type(model).__name__}")
        self.features: torch.Tensor | None = None
        self._hook = model.layer3.register_forward_hook(self._keep)
        was_training = model.training
        with torch.no_grad():
            model.eval()(sample)
        model.train(was_training)
        self.conv = nn.Conv2d(self.features.shape[1], num_classes, 1)

    def _keep(self, _module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        self.features = output

    def loss(self, masks: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the last forward pass's features against ``masks`` (N, H, W)."""
        logits = self.conv(self.features)
        target = nn.functional.interpolate(masks[:, None].float(), size=logits.shape[-2:], mode="nearest")
        return nn.functional.cross_entropy(logits, target[:, 0].long())

    def remove(self) -> None:
        self._hook.remove()


def _primary(metrics: dict[str, Any]) -> float:
    return metrics["accuracy"] if "accuracy" in metrics else metrics["miou"]


def _loss_function(config: TrainConfig, train: Arrays) -> Loss:
    if config.task == "classification":
        return nn.CrossEntropyLoss()
    weight = (class_weights(torch.from_numpy(train.masks), len(train.classes["segmentation"]))
              if config.resolved_class_weighting else None)
    return segmentation_loss(config.resolved_loss, weight=weight)


def _train_epoch(model: nn.Module, train: Arrays, config: TrainConfig, loss_fn: Loss,
                 optimiser: torch.optim.Optimizer, scheduler: Any, gen: torch.Generator, mean: tuple,
                 std: tuple, aux: AuxiliaryMaskHead | None = None, coarse: bool = False) -> float:
    model.train()
    order = torch.randperm(len(train.images), generator=gen)
    images, masks = torch.from_numpy(train.images), torch.from_numpy(train.masks)
    labels = torch.from_numpy(train.labels)
    total, batches, crop = 0.0, 0, config.resolved_crop
    for start in range(0, len(order) - config.batch_size + 1, config.batch_size):
        idx = order[start:start + config.batch_size]
        x, y_mask = augment(*random_crop(images[idx], masks[idx], crop, gen), gen)
        x = normalise(x, mean, std)
        if coarse:
            x, y_mask = nn.functional.avg_pool2d(x, 2), y_mask[:, ::2, ::2].contiguous()
        logits = model(x.contiguous(memory_format=torch.channels_last))
        target = labels[idx] if config.task == "classification" else y_mask.long()
        loss = loss_fn(logits, target)
        if aux is not None:
            loss = loss + config.aux_mask_weight * aux.loss(y_mask)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        scheduler.step()
        total, batches = total + loss.item(), batches + 1
    return total / max(batches, 1)


def train(config: TrainConfig, train_dir: Path, val_dir: Path, out_dir: Path,
          on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train, evaluate on ``val_dir`` after every epoch, write ``out_dir/model.{pth,json}``.

    Returns the metadata written (its ``metrics`` hold the final held-out metrics, the
    per-epoch history and the wall time).
    """
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    gen = torch.Generator().manual_seed(config.seed)
    train_data, val_data = _load_pair(config, Path(train_dir), Path(val_dir))
    labels = train_data.classes["segmentation" if config.task == "segmentation" else "classification"]
    model = build_model(config.architecture, num_classes=len(labels), **config.resolved_arch_kwargs)
    # NHWC: oneDNN's convolutions run 20-30 % faster on CPUs (measured, README "Measured");
    # the checkpoint is written back in the default layout.
    model = model.to(memory_format=torch.channels_last)
    check_crop(model, config.resolved_crop)
    aux = None
    if config.task == "classification" and config.aux_mask_weight > 0:
        sample = normalise(torch.from_numpy(train_data.images[:2]), IMAGENET_MEAN, IMAGENET_STD)
        aux = AuxiliaryMaskHead(model, len(train_data.classes["segmentation"]), sample)
    epochs = config.resolved_epochs
    coarse_epochs = _coarse_epochs(config, model, train_data)
    steps = epochs * (len(train_data.images) // config.batch_size)
    params = list(model.parameters()) + (list(aux.parameters()) if aux is not None else [])
    optimiser = torch.optim.AdamW(params, lr=config.resolved_lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=config.resolved_lr, total_steps=steps,
                                                    pct_start=0.2)
    loss_fn = _loss_function(config, train_data)
    history, started = [], time.perf_counter()
    for epoch in range(1, epochs + 1):
        coarse = epoch <= coarse_epochs
        loss = _train_epoch(model, train_data, config, loss_fn, optimiser, scheduler, gen, IMAGENET_MEAN,
                            IMAGENET_STD, aux, coarse)
        metrics = evaluate(model, val_data, config.task, IMAGENET_MEAN, IMAGENET_STD)
        record = {"epoch": epoch, "loss": loss, **metrics, "seconds": time.perf_counter() - started}
        history.append(record)
        log = logger.debug if on_epoch is not None else logger.info  # the callback shows progress
        log("epoch %d/%d loss %.4f held-out %s %.4f (%.0f s)", epoch, epochs, loss,
            "accuracy" if config.task == "classification" else "mIoU", _primary(metrics), record["seconds"])
        if on_epoch is not None:
            on_epoch(record)
        if not math.isfinite(loss):
            raise RuntimeError(f"training diverged at epoch {epoch} (loss {loss}); lower --lr")
    if aux is not None:
        aux.remove()
    model = model.to(memory_format=torch.contiguous_format)
    metadata = _metadata(config, labels, train_data, len(val_data.images), history,
                         time.perf_counter() - started, coarse_epochs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out_dir / "model.pth")
    write_metadata(out_dir / "model.json", metadata)
    logger.info("wrote %s and model.json (%.0f s)", out_dir / "model.pth", metadata["metrics"]["train_seconds"])
    return metadata


def _coarse_epochs(config: TrainConfig, model: nn.Module, train_data: Arrays) -> int:
    """The coarse epochs this training runs: the config's, or none (with a warning) when the
    images downsampled 2x would not fit the model."""
    height, width = train_data.images.shape[1:3]
    if config.resolved_coarse_epochs and not coarse_fits(model, height, width):
        logger.warning("training at full size from the first epoch: %dx%d images downsampled 2x do not "
                       "fit %s", height, width, type(model).__name__)
        return 0
    return config.resolved_coarse_epochs


def _load_pair(config: TrainConfig, train_dir: Path, val_dir: Path) -> tuple[Arrays, Arrays]:
    train_data = load_arrays(train_dir, need_masks=config.uses_masks)
    val_data = load_arrays(val_dir, need_masks=config.task == "segmentation")
    if train_data.classes != val_data.classes:
        raise ValueError(f"classes.json differs between {train_dir} and {val_dir}; expected the same classes")
    if len(train_data.images) < config.batch_size:
        raise ValueError(f"{train_dir} has {len(train_data.images)} images, fewer than one batch "
                         f"({config.batch_size}); lower --batch-size or add data")
    return train_data, val_data


def _metadata(config: TrainConfig, labels: list[str], train_data: Arrays, val_count: int,
              history: list[dict[str, Any]], seconds: float, coarse_epochs: int) -> dict[str, Any]:
    height, width = train_data.images.shape[1:3]
    resolved = {"epochs": config.resolved_epochs, "lr": config.resolved_lr,
                "arch_kwargs": config.resolved_arch_kwargs, "loss": config.resolved_loss,
                "class_weighting": config.resolved_class_weighting, "crop": config.resolved_crop,
                "coarse_epochs": coarse_epochs}
    return {
        "architecture": config.architecture,
        "arch_kwargs": config.resolved_arch_kwargs,
        "task": config.task,
        "labels": list(labels),
        "input": {"height": int(height), "width": int(width), "mean": list(IMAGENET_MEAN),
                  "std": list(IMAGENET_STD)},
        "metrics": {**history[-1], "train_seconds": seconds, "train_images": len(train_data.images),
                    "val_images": val_count, "history": history, "config": asdict(config) | resolved},
    }

"""Segmentation losses for training: cross-entropy, the soft IoU loss, and their sum.

Soft IoU (the Jaccard loss over probabilities): with softmax probabilities X and one-hot
targets Y over the valid pixels v of a batch, per class c

    I_c = sum_v X_vc * Y_vc,   U_c = sum_v (X_vc + Y_vc - X_vc * Y_vc),   L = 1 - mean_c I_c / U_c

Pixels whose target equals ``ignore_index`` are left out of every sum. The mean runs over
the classes *present*: in the batch's ground truth, or predicted with at least one pixel's
worth of probability. For one-hot predictions that is exactly ``1 - mean IoU`` under the
project's IoU conventions (``server/iou.py``: a class in neither prediction nor truth is
absent), summed over the batch as over a data set. Training code only (imports torch).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from visionserve.export.recipe import LOSSES

Loss = Callable[[Tensor, Tensor], Tensor]


def soft_iou_loss(logits: Tensor, target: Tensor, *, ignore_index: int = 255) -> Tensor:
    """``1 - mean soft IoU`` of ``logits`` (N, C, H, W) against an index ``target`` (N, H, W).

    Returns 0 (with a gradient path) when no pixel is valid.
    """
    num_classes = logits.shape[1]
    ignored = target == ignore_index
    labels = target.masked_fill(ignored, 0).long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"target has class values outside 0..{num_classes - 1} "
                         f"(other than ignore_index {ignore_index})")
    valid = (~ignored).unsqueeze(1).to(logits.dtype)  # (N, 1, H, W)
    probs = logits.softmax(1) * valid
    onehot = nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2).to(logits.dtype) * valid
    intersection = (probs * onehot).sum((0, 2, 3))
    prob_mass, truth_count = probs.sum((0, 2, 3)), onehot.sum((0, 2, 3))
    union = prob_mass + truth_count - intersection
    present = ((truth_count > 0) | (prob_mass >= 1.0)).detach()
    if not bool(present.any()):
        return logits.sum() * 0.0
    return 1.0 - (intersection[present] / union[present]).mean()


def class_weights(masks: Tensor, num_classes: int, *, ignore_index: int = 255) -> Tensor:
    """Inverse square-root pixel-frequency weights for cross-entropy, mean 1 over present classes.

    A class with no pixel gets weight 0 (it cannot be learned from these masks).
    """
    flat = masks.reshape(-1).long()
    counts = torch.bincount(flat[flat != ignore_index], minlength=num_classes)[:num_classes].double()
    weights = torch.where(counts > 0, counts.clamp(min=1).rsqrt(), torch.zeros_like(counts))
    present = counts > 0
    if present.any():
        weights = weights / weights[present].mean()
    return weights.float()


def segmentation_loss(name: str, *, weight: Tensor | None = None, ignore_index: int = 255) -> Loss:
    """The training loss ``name`` (one of ``LOSSES``): ``loss(logits, target) -> scalar``."""
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")
    cross_entropy = nn.CrossEntropyLoss(weight=weight, ignore_index=ignore_index)
    if name == "ce":
        return cross_entropy
    if name == "soft-iou":
        return lambda logits, target: soft_iou_loss(logits, target, ignore_index=ignore_index)
    return lambda logits, target: (cross_entropy(logits, target)
                                   + soft_iou_loss(logits, target, ignore_index=ignore_index))

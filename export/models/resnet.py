"""ResNet classifiers, built from torchvision's ``ResNet`` so real torchvision checkpoints fit."""

from __future__ import annotations

from torchvision.models import resnet as tv_resnet
from torchvision.models.resnet import BasicBlock, ResNet


def resnet_small(*, num_classes: int) -> ResNet:
    """A one-block-per-stage ResNet (BasicBlock, [1, 1, 1, 1]): trains in minutes on a CPU."""
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)


def resnet18(*, num_classes: int = 1000) -> ResNet:
    """torchvision ResNet-18 (untrained; load a checkpoint into it)."""
    return tv_resnet.resnet18(weights=None, num_classes=num_classes)


def resnet34(*, num_classes: int = 1000) -> ResNet:
    """torchvision ResNet-34 (untrained; load a checkpoint into it)."""
    return tv_resnet.resnet34(weights=None, num_classes=num_classes)


def resnet50(*, num_classes: int = 1000) -> ResNet:
    """torchvision ResNet-50 (untrained; load a checkpoint into it)."""
    return tv_resnet.resnet50(weights=None, num_classes=num_classes)


def resnet101(*, num_classes: int = 1000) -> ResNet:
    """torchvision ResNet-101 (untrained; load a checkpoint into it)."""
    return tv_resnet.resnet101(weights=None, num_classes=num_classes)

"""ResNet classifiers, built from torchvision's ``ResNet`` so real torchvision checkpoints fit."""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.models.resnet import BasicBlock, ResNet


class _ScaledResNet(ResNet):
    """torchvision's ``ResNet`` with every stage ``width / 64`` as wide (64, 128, 256, 512 at 64):
    the same module names, so checkpoints, export and the receptive field treat it as any ResNet."""

    def __init__(self, layers: list[int], num_classes: int, width: int) -> None:
        self._width = width
        super().__init__(BasicBlock, layers, num_classes=num_classes)
        # the stem and head were built for 64 before the stages existed
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(8 * width * BasicBlock.expansion, num_classes)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        if planes == 64:  # the first stage: its input is the stem's output
            self.inplanes = self._width
        return super()._make_layer(block, planes * self._width // 64, blocks, stride, dilate)


def resnet_small(*, num_classes: int, width: int = 64) -> ResNet:
    """A one-block-per-stage ResNet (BasicBlock, [1, 1, 1, 1]): trains in minutes on a CPU.

    ``width``: channels of the stem and first stage (doubling per stage); a multiple of 8.
    32 (the demo's recipe) computes ~4x less than 64 (measured: README "Measured")."""
    if width < 8 or width % 8:
        raise ValueError(f"resnet_small: width must be a positive multiple of 8, got {width}")
    if width == 64:
        return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
    return _ScaledResNet([1, 1, 1, 1], num_classes, width)


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

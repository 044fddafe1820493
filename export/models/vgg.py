"""VGG-16 with batch normalisation: torchvision's builder, so torchvision checkpoints fit.

``vgg16_bn()`` with its defaults is exactly ``torchvision.models.vgg16_bn`` (13 3x3
convolutions with BatchNorm in 5 stages, each closed by a 2x2 max pool; average pool to
7x7; three fully connected layers of 4096, 4096, ``num_classes``). ``pool_size`` and
``hidden`` shrink the head for small inputs and quick tests (the ONNX exporter turns the
adaptive average pool into a plain one only when the feature map is a multiple of
``pool_size``: 7 needs inputs that are multiples of 224; 1 takes any size >= 32).
"""

from __future__ import annotations

from torch import nn
from torchvision.models import vgg as tv_vgg
from torchvision.models.vgg import VGG

__all__ = ["vgg16_bn"]


def vgg16_bn(*, num_classes: int = 1000, pool_size: int = 7, hidden: int = 4096, dropout: float = 0.5) -> VGG:
    """torchvision VGG-16-BN (untrained; load a checkpoint into it), optionally with a smaller head."""
    if pool_size < 1 or hidden < 1:
        raise ValueError(f"pool_size and hidden must be at least 1, got {pool_size} and {hidden}")
    model = tv_vgg.vgg16_bn(weights=None, num_classes=num_classes, dropout=dropout)
    if (pool_size, hidden) != (7, 4096):
        model.avgpool = nn.AdaptiveAvgPool2d((pool_size, pool_size))
        model.classifier = nn.Sequential(
            nn.Linear(512 * pool_size * pool_size, hidden), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        for layer in model.classifier:
            if isinstance(layer, nn.Linear):  # torchvision's initialisation of its own head
                nn.init.normal_(layer.weight, 0, 0.01)
                nn.init.zeros_(layer.bias)
    return model

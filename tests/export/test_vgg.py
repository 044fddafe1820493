"""The lecture's architectures: VGG-16-BN (torchvision's) and SegNet on a VGG-16-BN encoder.

Their export (TensorRT rewrite, op audit, RTX build, ONNX Runtime == PyTorch with ties)
runs in ``test_zoo_export.py`` with the rest of the zoo.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import vgg16_bn as tv_vgg16_bn
from visionserve.export.models import TASK_OF_ARCHITECTURE, build_model


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def test_vgg16_bn_is_torchvision_s() -> None:
    model = build_model("vgg16_bn", num_classes=1000)
    assert _shapes(model) == _shapes(tv_vgg16_bn())  # torchvision checkpoints load
    assert len(_convs(model)) == 13 and TASK_OF_ARCHITECTURE["vgg16_bn"] == "classification"
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 13


def test_vgg16_bn_small_head() -> None:
    model = build_model("vgg16_bn", num_classes=3, pool_size=1, hidden=32).eval()
    assert len(_convs(model)) == 13
    assert model.classifier[0].in_features == 512 and model.classifier[-1].out_features == 3
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 48)).shape == (2, 3)
    with pytest.raises(ValueError, match="pool_size and hidden"):
        build_model("vgg16_bn", num_classes=3, hidden=0)


def test_segnet_vgg16_bn_is_the_original_layout() -> None:
    model = build_model("segnet_vgg16_bn", num_classes=4)
    assert TASK_OF_ARCHITECTURE["segnet_vgg16_bn"] == "segmentation"
    # the encoder is VGG-16-BN's feature extractor: ImageNet weights load into it
    assert _shapes(model.encoder) == _shapes(tv_vgg16_bn().features)
    assert len(_convs(model.encoder)) == 13
    pools = [m for m in model.encoder if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 5 and all(p.return_indices for p in pools)
    assert sum(isinstance(m, nn.MaxUnpool2d) for m in model.modules()) == 5
    # decoder mirrors the encoder: 13 convolutions, the last one giving class scores
    decoder_convs = [c.out_channels for d in model.decoders for c in _convs(d)] + [model.head.out_channels]
    assert decoder_convs == [512, 512, 512, 512, 512, 256, 256, 256, 128, 128, 64, 64, 4]
    assert not any("skip" in name for name, _ in model.named_modules())


def test_segnet_vgg16_bn_sizes_and_checks() -> None:
    model = build_model("segnet_vgg16_bn", num_classes=3, width=4).eval()
    with torch.no_grad():
        for shape in [(2, 3, 37, 45), (1, 3, 32, 32), (1, 3, 64, 96)]:
            assert model(torch.randn(shape)).shape == (shape[0], 3, *shape[2:])
    with pytest.raises(ValueError, match="H, W >= 32"):
        model(torch.randn(1, 3, 31, 64))
    with pytest.raises(ValueError, match="num_classes"):
        build_model("segnet_vgg16_bn", num_classes=1)

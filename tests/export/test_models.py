from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet18 as torchvision_resnet18
from visionserve.export.models import ARCHITECTURES, TASK_OF_ARCHITECTURE, build_model
from visionserve.export.models.unet import UNet, unet


def test_registry_lists_every_architecture() -> None:
    assert set(ARCHITECTURES) == {"resnet_small", "resnet18", "resnet34", "resnet50", "resnet101", "unet",
                                 "segnet", "vgg16_bn", "segnet_vgg16_bn"}
    assert (TASK_OF_ARCHITECTURE["unet"] == TASK_OF_ARCHITECTURE["segnet"]
            == TASK_OF_ARCHITECTURE["segnet_vgg16_bn"] == "segmentation")
    assert TASK_OF_ARCHITECTURE["resnet50"] == TASK_OF_ARCHITECTURE["vgg16_bn"] == "classification"
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("vgg16", num_classes=3)


def test_resnet_small_outputs_logits() -> None:
    model = build_model("resnet_small", num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 96, 96)).shape == (2, 3)


def test_resnet_small_width_scales_every_stage_and_keeps_the_module_names() -> None:
    wide, narrow = build_model("resnet_small", num_classes=3), build_model("resnet_small", num_classes=3, width=16)
    assert set(narrow.state_dict()) == set(wide.state_dict())  # checkpoints, export: same layout
    assert narrow.conv1.out_channels == 16 and narrow.layer4[0].conv2.out_channels == 128
    assert narrow.fc.in_features == 128
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in wide.parameters()) / 10
    with torch.no_grad():
        assert narrow.eval()(torch.randn(2, 3, 70, 90)).shape == (2, 3)
    for bad in (0, 12, -8):
        with pytest.raises(ValueError, match="multiple of 8"):
            build_model("resnet_small", num_classes=3, width=bad)


def test_resnet18_accepts_torchvision_weights() -> None:
    model = ARCHITECTURES["resnet18"](num_classes=10)
    model.load_state_dict(torchvision_resnet18(num_classes=10).state_dict(), strict=True)


@pytest.mark.parametrize(("depth", "size"), [(2, (32, 48)), (3, (64, 96)), (4, (48, 80))])
def test_unet_keeps_spatial_size(depth: int, size: tuple[int, int]) -> None:
    model = unet(num_classes=4, base_channels=4, depth=depth).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 4, *size)
    assert any(isinstance(m, torch.nn.ConvTranspose2d) for m in model.modules())


def test_unet_rejects_sizes_that_are_not_multiples() -> None:
    model = unet(num_classes=4, base_channels=4, depth=3)
    with pytest.raises(ValueError, match="multiples of 8.*padding your images to 64x104"):
        model(torch.randn(1, 3, 60, 100))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.randn(1, 1, 64, 64))


def test_unet_checks_its_configuration() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        UNet(num_classes=1)
    with pytest.raises(ValueError, match="depth"):
        UNet(num_classes=3, depth=0)

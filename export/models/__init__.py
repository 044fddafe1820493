"""Model zoo: architecture name -> keyword-only builder.

Builders are imported on first use, so importing this package does not import torch.
Besides the zoo's names: ``smp.<Name>`` (segmentation_models_pytorch) and
``torchvision.<name>`` (see :mod:`visionserve.export.models.ecosystem`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

_BUILDERS: dict[str, tuple[str, str]] = {
    "resnet_small": ("resnet", "resnet_small"),
    "resnet18": ("resnet", "resnet18"),
    "resnet34": ("resnet", "resnet34"),
    "resnet50": ("resnet", "resnet50"),
    "resnet101": ("resnet", "resnet101"),
    "unet": ("unet", "unet"),
    "segnet": ("segnet", "segnet"),
    "vgg16_bn": ("vgg", "vgg16_bn"),
    "segnet_vgg16_bn": ("segnet_vgg", "segnet_vgg16_bn"),
}

TASK_OF_ARCHITECTURE: dict[str, str] = {
    name: ("segmentation" if module in ("unet", "segnet", "segnet_vgg") else "classification")
    for name, (module, _) in _BUILDERS.items()
}


class _Registry(Mapping[str, Callable[..., Any]]):
    """Read-only mapping whose values (builders) are imported lazily."""

    def __getitem__(self, name: str) -> Callable[..., Any]:
        if name not in _BUILDERS:
            raise KeyError(f"unknown architecture {name!r}; known: {sorted(_BUILDERS)}")
        module, function = _BUILDERS[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), function)

    def __iter__(self) -> Iterator[str]:
        return iter(_BUILDERS)

    def __len__(self) -> int:
        return len(_BUILDERS)


ARCHITECTURES: Mapping[str, Callable[..., Any]] = _Registry()


def task_of(architecture: str) -> str | None:
    """The task of a zoo, ``smp.`` or ``torchvision.`` architecture; None for an unknown name
    (``ValueError`` for an unknown ``smp.``/``torchvision.`` one, saying which exist)."""
    if architecture in TASK_OF_ARCHITECTURE:
        return TASK_OF_ARCHITECTURE[architecture]
    from visionserve.export.models.ecosystem import ecosystem_task, is_ecosystem

    return ecosystem_task(architecture) if is_ecosystem(architecture) else None


def build_model(architecture: str, *, num_classes: int, **arch_kwargs: Any) -> Any:
    """Build ``architecture`` (a name from ``ARCHITECTURES``, or ``smp.<Name>`` /
    ``torchvision.<name>``) for ``num_classes`` classes."""
    from visionserve.export.models.ecosystem import build_ecosystem, is_ecosystem

    if is_ecosystem(architecture):
        return build_ecosystem(architecture, num_classes=num_classes, **arch_kwargs)
    if architecture not in _BUILDERS:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {sorted(_BUILDERS)}")
    return ARCHITECTURES[architecture](num_classes=num_classes, **arch_kwargs)


def randomise_batchnorm(model: Any) -> Any:
    """Non-trivial BatchNorm statistics (random-weight models exercised at real scales: the
    zoo export tests, ``bench/gpu_check.py``); returns the model in eval mode."""
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.0)
            module.bias.data.uniform_(-0.1, 0.1)
    return model.eval()

"""Model zoo: architecture name -> keyword-only builder.

Builders are imported on first use, so importing this package does not import torch.
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
}

TASK_OF_ARCHITECTURE: dict[str, str] = {
    name: ("segmentation" if module in ("unet", "segnet") else "classification")
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


def build_model(architecture: str, *, num_classes: int, **arch_kwargs: Any) -> Any:
    """Build ``architecture`` (a name from ``ARCHITECTURES``) for ``num_classes`` classes."""
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

"""Architectures from other libraries, by prefixed name: ``smp.<Name>`` and ``torchvision.<name>``.

* ``smp.Unet``, ``smp.UnetPlusPlus``, ``smp.FPN``, ``smp.DeepLabV3Plus``, ... :
  segmentation_models_pytorch (optional extra ``visionserve[smp]``), built with
  ``classes = len(labels)``, ``encoder_weights=None`` (nothing is downloaded: the checkpoint
  brings the weights) and ``arch_kwargs`` (``encoder_name``, ``encoder_depth``, ...).
* ``torchvision.<name>``: any torchvision classification or segmentation builder
  (``torchvision.resnet50``, ``torchvision.fcn_resnet50``, ``torchvision.deeplabv3_mobilenet_v3_large``,
  ``torchvision.lraspp_mobilenet_v3_large``, ...), built with ``weights=None``. Segmentation
  models return a dict; export takes its ``out`` entry.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

SMP_PREFIX = "smp."
TORCHVISION_PREFIX = "torchvision."
_DOWNLOADS = ("encoder_weights", "weights", "weights_backbone")


_ZOO_TORCHVISION = ("resnet18", "resnet34", "resnet50", "resnet101")  # torchvision's ResNets


def is_torchvision_classifier(architecture: str) -> bool:
    """Whether ``architecture`` is a torchvision classifier (the zoo's torchvision ResNets or
    ``torchvision.<classifier>``): trained, as a rule, with resize 256 + centre crop 224."""
    if architecture in _ZOO_TORCHVISION:
        return True
    return architecture.startswith(TORCHVISION_PREFIX) and \
        _torchvision_task(architecture[len(TORCHVISION_PREFIX):]) == "classification"


def is_ecosystem(architecture: str) -> bool:
    return architecture.startswith((SMP_PREFIX, TORCHVISION_PREFIX))


def _smp() -> Any:
    try:
        return importlib.import_module("segmentation_models_pytorch")
    except ImportError as exc:
        raise ValueError("architecture 'smp.*' needs segmentation_models_pytorch: "
                         "pip install 'visionserve[smp]'") from exc


def _torchvision_task(name: str) -> str | None:
    from torchvision import models

    if name in models.list_models(module=models.segmentation):
        return "segmentation"
    if name in models.list_models(module=models):
        return "classification"
    return None


def ecosystem_task(architecture: str) -> str:
    """The task of an ``smp.`` or ``torchvision.`` architecture; ``ValueError`` if unknown."""
    if architecture.startswith(SMP_PREFIX):
        smp, name = _smp(), architecture[len(SMP_PREFIX):]
        builder = getattr(smp, name, None)
        if not (isinstance(builder, type) and issubclass(builder, nn.Module)):
            known = sorted(n for n in dir(smp) if isinstance(getattr(smp, n), type)
                           and issubclass(getattr(smp, n), smp.base.SegmentationModel)
                           and n != "SegmentationModel")
            raise ValueError(f"unknown segmentation_models_pytorch architecture {name!r}; known: {known}")
        return "segmentation"
    name = architecture[len(TORCHVISION_PREFIX):]
    task = _torchvision_task(name)
    if task is None:
        raise ValueError(f"unknown torchvision model {name!r} (see torchvision.models.list_models())")
    return task


def _no_downloads(architecture: str, arch_kwargs: dict[str, Any]) -> None:
    given = {k: v for k, v in arch_kwargs.items() if k in _DOWNLOADS and v is not None}
    if given:
        raise ValueError(f"{architecture}: arch_kwargs {given} would download pretrained weights; "
                         "visionserve builds the architecture empty and loads your checkpoint into it "
                         "(leave them out)")


def build_ecosystem(architecture: str, *, num_classes: int, **arch_kwargs: Any) -> nn.Module:
    """An untrained ``smp.`` or ``torchvision.`` model for ``num_classes`` classes."""
    ecosystem_task(architecture)  # clear error for unknown names
    _no_downloads(architecture, arch_kwargs)
    if architecture.startswith(SMP_PREFIX):
        builder = getattr(_smp(), architecture[len(SMP_PREFIX):])
        return builder(encoder_weights=None, classes=num_classes, **arch_kwargs)
    from torchvision import models

    name = architecture[len(TORCHVISION_PREFIX):]
    extra = {"weights_backbone": None} if _torchvision_task(name) == "segmentation" else {}
    return models.get_model(name, weights=None, num_classes=num_classes, **extra, **arch_kwargs)

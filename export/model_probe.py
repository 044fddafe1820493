"""What export learns by running the model: the tensor it returns and the sizes it takes.

* :class:`OutEntry` takes the ``out`` entry of a dict output (torchvision segmentation models);
  :func:`single_tensor_model` applies it where needed and turns any other output that is not
  one tensor into a ``ValueError`` that says what was found and what is expected.
* :func:`find_size_multiple` finds the smallest H, W multiple a segmenter needs (UNets and
  smp models need 2**depth or the encoder's output stride; DeepLab-style models take any
  size): it runs the model at sizes that are odd multiples of 1, 2, 4, ... 128 and takes the
  first that runs and returns logits of the input's H, W. The same probe serves PyTorch
  modules (export) and ONNX Runtime sessions (import).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

logger = logging.getLogger(__name__)

MULTIPLES = (1, 2, 4, 8, 16, 32, 64, 128)
PROBE_SIDE = 64  # probe sizes are the first odd multiples at or above this side

SpatialRun = Callable[[int, int], tuple[int, ...]]  # (H, W) -> output shape; raises if it cannot


class OutEntry(nn.Module):
    """Returns ``model(x)["out"]`` (torchvision segmentation models return a dict)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)["out"]


def _describe(output: object) -> str:
    if isinstance(output, torch.Tensor):
        return f"a tensor {list(output.shape)}"
    if isinstance(output, Mapping):
        return f"a dict with keys {list(output)}"
    if isinstance(output, (tuple, list)):
        return f"a {type(output).__name__} of {len(output)}"
    return f"a {type(output).__name__}"


def single_tensor_model(model: nn.Module, height: int, width: int) -> nn.Module:
    """``model``, or ``OutEntry(model)`` when it returns a dict with ``out``; ``ValueError``
    when its output is anything else than one tensor."""
    with torch.no_grad():
        try:
            output = model(torch.rand(1, 3, height, width))
        except Exception as exc:  # noqa: BLE001 - any failure of user code: say where
            raise ValueError(f"the model failed on a 1x3x{height}x{width} input: "
                             f"{type(exc).__name__}: {exc}") from exc
    if isinstance(output, torch.Tensor):
        return model
    if isinstance(output, Mapping) and isinstance(output.get("out"), torch.Tensor):
        logger.info("the model returns a dict %s: exporting its 'out' entry", list(output))
        return OutEntry(model).eval()
    raise ValueError(f"the model returns {_describe(output)}; visionserve exports one tensor of "
                     "logits (N, classes) or (N, classes, H, W) (a dict is taken at its 'out' entry, "
                     "as torchvision's segmentation models return): wrap the model so that "
                     "forward returns the logits")


def _odd_multiple(multiple: int) -> int:
    count = max(1, math.ceil(PROBE_SIDE / multiple))
    return multiple * (count if count % 2 else count + 1)


def find_size_multiple(run: SpatialRun, what: str = "the model") -> int:
    """The smallest of ``MULTIPLES`` at whose odd multiples ``run`` works and keeps H, W.

    Raises ``ValueError`` listing what failed when no multiple up to 128 works.
    """
    failures = []
    for multiple in MULTIPLES:
        height = _odd_multiple(multiple)
        width = height + 2 * multiple
        try:
            shape = tuple(run(height, width))
        except Exception as exc:  # noqa: BLE001 - guard failures, shape errors, ONNX Runtime errors
            failures.append(f"{height}x{width}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            continue
        if shape[-2:] == (height, width):
            if multiple > 1:
                logger.info("%s needs H, W multiples of %d (found by running it)", what, multiple)
            return multiple
        failures.append(f"{height}x{width}: output {list(shape)} does not keep the input's H, W")
    raise ValueError(f"{what} did not run at any size multiple up to {MULTIPLES[-1]} with logits "
                     f"of the input's height and width: " + "; ".join(failures[-3:]))


def torch_size_multiple(model: nn.Module) -> int:
    """:func:`find_size_multiple` of a PyTorch segmenter (batch 1, eval mode)."""
    def run(height: int, width: int) -> tuple[int, ...]:
        with torch.no_grad():
            return tuple(model(torch.rand(1, 3, height, width)).shape)
    return find_size_multiple(run, "the segmenter")

"""TensorRT-parsable max pooling with indices and max unpooling.

TensorRT's ONNX parser rejects ``MaxUnpool`` and the second (``Indices``) output of
``MaxPool`` (onnx-tensorrt ``docs/operators.md``). The legacy exporter cannot export
``MaxUnpool2d`` at all, and the dynamo exporter keeps the two-output ``MaxPool``. This
module re-expresses both in plain tensor ops that export (legacy exporter, opset 17,
dynamic batch and dynamic H, W) to ``Slice``, ``Concat``, ``ReduceMax``, ``Equal``,
``Where``, ``ReduceMin``, ``Range``, arithmetic and ``ScatterElements`` -- all in
TensorRT's supported set -- and that are numerically identical to PyTorch:

* ``max_pool2d_with_indices`` returns the same values and the same indices as
  ``F.max_pool2d(x, k, s, return_indices=True)``: indices are flattened ``h * W + w``
  per (batch, channel) plane of the *input*; among equal maxima of a window the first
  in row-major window order wins (PyTorch's rule); trailing rows/columns that do not
  fill a window are dropped (``ceil_mode=False``).
* ``max_unpool2d`` scatters each value to its index in a zero plane of
  ``output_size``, like ``F.max_unpool2d``.

Supported: any ``kernel_size >= 1`` and ``stride >= 1`` (int or (h, w) pair; overlapping
windows included), ``padding=0``, ``dilation=1``, ``ceil_mode=False``, 4-D NCHW input.
NaN inputs are not supported (PyTorch propagates NaN as the maximum; this rewrite
does not). With overlapping windows one input element can be the maximum of several
windows; unpooling then writes several values to one position, and which one wins is
unspecified in PyTorch and in ONNX ``ScatterElements`` alike (for unpooling the pooled
values themselves the values agree, so the result is well defined).

``make_tensorrt_compatible(module)`` returns a deep copy of a model with every
``nn.MaxPool2d(return_indices=True)`` and every ``nn.MaxUnpool2d`` replaced by
modules built on these functions (no parameters, so the ``state_dict`` is unchanged).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = [
    "TRTMaxPool2d",
    "TRTMaxUnpool2d",
    "UnsupportedPoolingError",
    "make_tensorrt_compatible",
    "max_pool2d_with_indices",
    "max_unpool2d",
]


class UnsupportedPoolingError(ValueError):
    """A pooling/unpooling configuration this rewrite cannot express exactly."""


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        pair = (value, value)
    else:
        pair = tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 1:
        raise UnsupportedPoolingError(
            f"{name} must be a positive int or (h, w) pair, got {value!r}"
        )
    return pair  # type: ignore[return-value]


def _as_pair(value: int | Sequence[int]) -> tuple[int, ...]:
    return (int(value), int(value)) if isinstance(value, int) else tuple(int(v) for v in value)


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _check_4d(x: Tensor, what: str) -> None:
    if x.dim() != 4:
        raise UnsupportedPoolingError(
            f"{what} expects a 4-D NCHW tensor, got shape {tuple(x.shape)}"
        )


def _windows(
    x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], out_h: int, out_w: int
) -> Tensor:
    """(N, C, H, W) -> (N, C, out_h, out_w, kh * kw): window elements in row-major order."""
    taps = []
    for i in range(kernel[0]):
        rows = x[:, :, i :: stride[0]][:, :, :out_h]
        for j in range(kernel[1]):
            taps.append(rows[:, :, :, j :: stride[1]][:, :, :, :out_w])
    return torch.stack(taps, dim=-1)


def max_pool2d_with_indices(
    x: Tensor, kernel_size: int | Sequence[int], stride: int | Sequence[int] | None = None
) -> tuple[Tensor, Tensor]:
    """``F.max_pool2d(x, kernel_size, stride, return_indices=True)`` in TensorRT-parsable ops.

    Returns ``(values, indices)``; ``indices`` is int64, flattened ``h * W + w`` within each
    (batch, channel) plane of ``x``, first maximum in row-major window order on ties.
    ``stride`` defaults to ``kernel_size``. Padding, dilation and ceil mode are not supported.
    """
    _check_4d(x, "max_pool2d_with_indices")
    kernel = _pair(kernel_size, "kernel_size")
    step = kernel if stride is None else _pair(stride, "stride")
    height, width = x.shape[-2], x.shape[-1]
    if not _tracing() and (height < kernel[0] or width < kernel[1]):
        raise UnsupportedPoolingError(
            f"max_pool2d_with_indices: input {height}x{width} is smaller than the kernel "
            f"{kernel[0]}x{kernel[1]}"
        )
    out_h = (height - kernel[0]) // step[0] + 1
    out_w = (width - kernel[1]) // step[1] + 1
    win = _windows(x, kernel, step, out_h, out_w)  # (N, C, oh, ow, K)
    values = win.amax(dim=-1)
    taps = kernel[0] * kernel[1]
    position = torch.arange(taps, dtype=torch.int64, device=x.device)
    candidates = torch.where(win == values.unsqueeze(-1), position, taps)
    first = candidates.amin(dim=-1)  # first maximum in row-major window order
    # Offsets of each tap within the input plane: row offset * W + column offset.
    tap_row = torch.div(first, kernel[1], rounding_mode="trunc")  # first >= 0: trunc == floor
    tap_col = first - tap_row * kernel[1]
    rows = torch.arange(out_h, dtype=torch.int64, device=x.device) * step[0]
    cols = torch.arange(out_w, dtype=torch.int64, device=x.device) * step[1]
    indices = (rows.unsqueeze(-1) + tap_row) * width + (cols + tap_col)
    return values, indices


def max_unpool2d(x: Tensor, indices: Tensor, output_size: Sequence[int]) -> Tensor:
    """``F.max_unpool2d(x, indices, ..., output_size=output_size)`` as a ``ScatterElements``.

    ``output_size`` is the (H, W) of the unpooled plane (the last two entries are used, so
    ``skip.shape`` works); traced sizes keep it dynamic in the exported graph.
    """
    _check_4d(x, "max_unpool2d")
    if not _tracing() and indices.shape != x.shape:
        raise UnsupportedPoolingError(
            f"max_unpool2d: indices shape {tuple(indices.shape)} must equal "
            f"input shape {tuple(x.shape)}"
        )
    out_h, out_w = output_size[-2], output_size[-1]
    batch, channels = x.shape[0], x.shape[1]
    flat = x.new_zeros((batch, channels, out_h * out_w))
    flat = flat.scatter(2, indices.flatten(2), x.flatten(2))
    return flat.reshape(batch, channels, out_h, out_w)


class TRTMaxPool2d(nn.Module):
    """Drop-in for ``nn.MaxPool2d(k, s, return_indices=True)``: returns ``(values, indices)``."""

    def __init__(self, kernel_size: int | Sequence[int], stride: int | Sequence[int] | None = None):
        super().__init__()
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else _pair(stride, "stride")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return max_pool2d_with_indices(x, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, return_indices=True"


class TRTMaxUnpool2d(nn.Module):
    """Drop-in for ``nn.MaxUnpool2d(k, s)``; ``output_size`` defaults like PyTorch's."""

    def __init__(self, kernel_size: int | Sequence[int], stride: int | Sequence[int] | None = None):
        super().__init__()
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else _pair(stride, "stride")

    def forward(
        self, x: Tensor, indices: Tensor, output_size: Sequence[int] | None = None
    ) -> Tensor:
        if output_size is None:
            output_size = (
                (x.shape[-2] - 1) * self.stride[0] + self.kernel_size[0],
                (x.shape[-1] - 1) * self.stride[1] + self.kernel_size[1],
            )
        return max_unpool2d(x, indices, output_size)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


def _rewrite_pool(name: str, module: nn.MaxPool2d) -> TRTMaxPool2d:
    problems = []
    if _as_pair(module.padding) != (0, 0):
        problems.append(f"padding={module.padding} (need 0)")
    if _as_pair(module.dilation) != (1, 1):
        problems.append(f"dilation={module.dilation} (need 1)")
    if module.ceil_mode:
        problems.append("ceil_mode=True (need False)")
    if problems:
        raise UnsupportedPoolingError(
            f"{name or 'model'} ({module!r}): cannot rewrite MaxPool2d(return_indices=True) with "
            + ", ".join(problems)
            + "; make_tensorrt_compatible supports kernel_size/stride only"
        )
    return TRTMaxPool2d(module.kernel_size, module.stride)


def _rewrite_unpool(name: str, module: nn.MaxUnpool2d) -> TRTMaxUnpool2d:
    if _as_pair(module.padding) != (0, 0):
        raise UnsupportedPoolingError(
            f"{name or 'model'} ({module!r}): cannot rewrite MaxUnpool2d "
            f"with padding={module.padding}; "
            "make_tensorrt_compatible supports padding=0 only"
        )
    return TRTMaxUnpool2d(module.kernel_size, module.stride)


def make_tensorrt_compatible(module: nn.Module) -> nn.Module:
    """Return a deep copy of ``module`` whose pooling-with-indices and unpooling TensorRT parses.

    Every ``nn.MaxPool2d(return_indices=True)`` becomes :class:`TRTMaxPool2d` and every
    ``nn.MaxUnpool2d`` becomes :class:`TRTMaxUnpool2d`; both are exact (same outputs,
    same indices, same tie rule) and parameter-free, so the ``state_dict`` is unchanged.
    ``nn.MaxPool2d`` without indices is left alone (TensorRT supports single-output
    ``MaxPool``). Supported configurations: kernel_size and stride any positive int or
    (h, w) pair; padding 0; dilation 1; ceil_mode False. Anything else raises
    :class:`UnsupportedPoolingError` naming the submodule. Functional calls
    (``F.max_pool2d(..., return_indices=True)``, ``F.max_unpool2d``) inside ``forward``
    are not rewritten -- call :func:`max_pool2d_with_indices` / :func:`max_unpool2d`.
    """
    model = copy.deepcopy(module)
    replaced = 0
    for name, child in list(model.named_modules()):
        if isinstance(child, nn.MaxPool2d) and child.return_indices:
            replacement: nn.Module = _rewrite_pool(name, child)
        elif isinstance(child, nn.MaxUnpool2d):
            replacement = _rewrite_unpool(name, child)
        else:
            continue
        if not name:  # the model itself is a pooling layer
            return replacement
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, replacement)
        replaced += 1
    logger.info("make_tensorrt_compatible: replaced %d pooling/unpooling modules", replaced)
    return model

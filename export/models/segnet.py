"""SegNet-style UNet: max-pool indices carried from encoder to decoder, max-unpooling up.

Each encoder stage is two 3x3 conv-BN-ReLU blocks followed by
``MaxPool2d(2, 2, return_indices=True)``; each decoder stage un-pools with
``MaxUnpool2d(2, 2)`` fed by the matching indices (``output_size`` = the encoder
feature size, so odd input sizes round-trip), concatenates the encoder features
(UNet skip) and applies two conv-BN-ReLU blocks. A 1x1 convolution gives per-pixel
class logits at the input resolution.

As written, this model does not export to a graph TensorRT parses (``MaxUnpool``,
two-output ``MaxPool``); ``visionserve export`` rewrites the ONNX graph with
:func:`visionserve.export.pooling_rewrite.rewrite_pooling`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["SegNet", "segnet"]


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_in in (in_channels, out_channels):
        layers += [
            nn.Conv2d(c_in, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


class SegNet(nn.Module):
    """SegNet-style encoder/decoder with pooling indices and UNet skips.

    Input: (N, in_channels, H, W) float with H, W >= 2**depth. Output: (N, num_classes, H, W)
    logits.
    """

    def __init__(
        self, *, num_classes: int, base_channels: int = 16, depth: int = 3, in_channels: int = 3
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError(
                f"num_classes must be at least 2 (background included), got {num_classes}"
            )
        if base_channels < 1 or depth < 1:
            raise ValueError(
                f"base_channels and depth must be at least 1, got {base_channels} and {depth}"
            )
        self.num_classes = num_classes
        self.depth = depth
        widths = [base_channels * 2**i for i in range(depth)]
        self.encoders = nn.ModuleList()
        self.pools = nn.ModuleList()
        c_in = in_channels
        for width in widths:
            self.encoders.append(_conv_block(c_in, width))
            self.pools.append(nn.MaxPool2d(2, 2, return_indices=True))
            c_in = width
        self.bottleneck = _conv_block(widths[-1], widths[-1])
        self.unpools = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for width in reversed(widths):
            self.unpools.append(nn.MaxUnpool2d(2, 2))
            self.decoders.append(_conv_block(2 * width, max(width // 2, base_channels)))
        self.head = nn.Conv2d(base_channels, num_classes, 1)

    @property
    def metadata(self) -> dict[str, Any]:
        """What the export command needs to describe the model."""
        return {
            "arch": "segnet",
            "task": "segmentation",
            "num_classes": self.num_classes,
            "min_size": 2**self.depth,
        }

    @property
    def size_multiple(self) -> int:
        """Any H, W >= 2**depth works (unpooling restores odd sizes): no padding needed."""
        return 1

    def forward(self, x: Tensor) -> Tensor:
        if not (
            torch.jit.is_tracing()
            or torch.onnx.is_in_onnx_export()
            or torch.compiler.is_compiling()
        ):
            min_size = 2**self.depth
            if x.shape[-2] < min_size or x.shape[-1] < min_size:
                raise ValueError(
                    f"SegNet(depth={self.depth}) needs H, W >= {min_size}, "
                    f"got {tuple(x.shape[-2:])}; "
                    "pad or resize the image"
                )
        skips: list[Tensor] = []
        indices: list[Tensor] = []
        for encoder, pool in zip(self.encoders, self.pools, strict=True):
            x = encoder(x)
            skips.append(x)
            x, idx = pool(x)
            indices.append(idx)
        x = self.bottleneck(x)
        for unpool, decoder in zip(self.unpools, self.decoders, strict=True):
            skip, idx = skips.pop(), indices.pop()
            x = unpool(x, idx, output_size=skip.shape[-2:])
            x = decoder(torch.cat([x, skip], dim=1))
        return self.head(x)


def segnet(*, num_classes: int, base_channels: int = 16, depth: int = 3, **kwargs: Any) -> SegNet:
    """SegNet-style UNet with max-pool indices and max-unpooling (see :class:`SegNet`)."""
    return SegNet(num_classes=num_classes, base_channels=base_channels, depth=depth, **kwargs)

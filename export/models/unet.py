"""A UNet segmenter: conv blocks, max-pool down, ``ConvTranspose2d`` up, skip links."""

from __future__ import annotations

import torch
from torch import nn


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """UNet with ``depth`` down/up stages; per-pixel class logits (N, num_classes, H, W).

    Input height and width must be multiples of ``2 ** depth``.
    """

    def __init__(self, num_classes: int, base_channels: int = 16, depth: int = 3) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if depth < 1 or base_channels < 1:
            raise ValueError(f"depth and base_channels must be positive, got {depth}, {base_channels}")
        self.num_classes = num_classes
        self.depth = depth
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.encoders = nn.ModuleList(
            [_block(3, widths[0])] + [_block(widths[i - 1], widths[i]) for i in range(1, depth)]
        )
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _block(widths[depth - 1], widths[depth])
        self.upsamplers = nn.ModuleList(
            [nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth))]
        )
        self.decoders = nn.ModuleList([_block(2 * widths[i], widths[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this (the export pads up to it)."""
        return 2**self.depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            self._check_input(x)
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for upsample, decoder, skip in zip(self.upsamplers, self.decoders, reversed(skips)):
            x = decoder(torch.cat([upsample(x), skip], dim=1))
        return self.head(x)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"UNet expects an (N, 3, H, W) tensor, got shape {tuple(x.shape)}")
        multiple = 2**self.depth
        h, w = x.shape[-2:]
        if h % multiple or w % multiple:
            new_h, new_w = -(-h // multiple) * multiple, -(-w // multiple) * multiple
            raise ValueError(
                f"UNet(depth={self.depth}) input height and width must be multiples of {multiple}, "
                f"got {h}x{w}; consider padding your images to {new_h}x{new_w}"
            )


def unet(*, num_classes: int, base_channels: int = 16, depth: int = 3) -> UNet:
    """A UNet for ``num_classes`` classes (background included)."""
    return UNet(num_classes=num_classes, base_channels=base_channels, depth=depth)

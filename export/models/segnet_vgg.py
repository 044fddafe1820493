"""SegNet with a VGG-16-BN encoder (Badrinarayanan et al., 2017): the original architecture.

Encoder: VGG-16-BN's 13 3x3 conv-BN-ReLU layers in 5 stages (2, 2, 3, 3, 3 convolutions),
each closed by ``MaxPool2d(2, 2, return_indices=True)``; laid out like torchvision's
``vgg16_bn().features``, so with ``width=64`` those ImageNet weights load into
``model.encoder``. Decoder: the mirror image, 5 stages, each opened by ``MaxUnpool2d(2, 2)``
fed by the matching encoder stage's pooling indices (``output_size`` = that stage's feature
size, so odd sizes round-trip), then 3, 3, 3, 2, 1 conv-BN-ReLU layers and a last 3x3
convolution giving the class scores (13 decoder convolutions, mirroring the encoder). No
skip connections: only the indices cross over.
``width`` scales every channel count (64: the original; smaller: quick tests).

On export, the ONNX pooling rewrite (``visionserve.export.pooling_rewrite``) turns the
``MaxPool`` indices and ``MaxUnpool`` into ops TensorRT parses.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.vgg import cfgs, make_layers

__all__ = ["SegNetVGG", "segnet_vgg16_bn"]

STAGES = 5
MIN_SIZE = 2**STAGES


def _conv(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True)]


def _decoder_stage(channels: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels, channels[1:]):
        layers += _conv(c_in, c_out)
    return nn.Sequential(*layers)


class SegNetVGG(nn.Module):
    """SegNet, VGG-16-BN encoder. Input (N, 3, H, W), H, W >= 32; output (N, num_classes, H, W) logits."""

    def __init__(self, *, num_classes: int, width: int = 64) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2 (background included), got {num_classes}")
        if width < 1:
            raise ValueError(f"width must be at least 1, got {width}")
        self.num_classes = num_classes
        scale = width / 64
        config = [v if v == "M" else max(1, round(int(v) * scale)) for v in cfgs["D"]]
        self.encoder = make_layers(config, batch_norm=True)
        self._pools = [i for i, m in enumerate(self.encoder) if isinstance(m, nn.MaxPool2d)]
        for i in self._pools:
            self.encoder[i].return_indices = True
        stages: list[list[int]] = [[]]  # conv widths per encoder stage: [[64, 64], [128, 128], ...]
        for value in config[:-1]:
            stages.append([]) if value == "M" else stages[-1].append(int(value))
        self.unpools = nn.ModuleList(nn.MaxUnpool2d(2, 2) for _ in range(STAGES))
        self.decoders = nn.ModuleList()
        for k, stage in enumerate(reversed(stages)):  # deepest first; each ends at the next stage's width
            last = k == STAGES - 1  # the first stage's last convolution is the head
            self.decoders.append(_decoder_stage([stage[-1]] * len(stage) + ([] if last else [stages[-k - 2][-1]])))
        self.head = nn.Conv2d(stages[0][0], num_classes, 3, padding=1)

    @property
    def size_multiple(self) -> int:
        """Any H, W >= 32 works (unpooling restores odd sizes): no padding needed."""
        return 1

    def forward(self, x: Tensor) -> Tensor:
        if not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()):
            if x.shape[-2] < MIN_SIZE or x.shape[-1] < MIN_SIZE:
                raise ValueError(f"SegNet (VGG-16-BN) needs H, W >= {MIN_SIZE}, got {tuple(x.shape[-2:])}; "
                                 "pad or resize the image")
        sizes: list[torch.Size] = []
        indices: list[Tensor] = []
        for i, layer in enumerate(self.encoder):
            if i in self._pools:
                sizes.append(x.shape[-2:])
                x, idx = layer(x)
                indices.append(idx)
            else:
                x = layer(x)
        for unpool, decoder in zip(self.unpools, self.decoders, strict=True):
            x = decoder(unpool(x, indices.pop(), output_size=sizes.pop()))
        return self.head(x)


def segnet_vgg16_bn(*, num_classes: int, width: int = 64, **kwargs: Any) -> SegNetVGG:
    """SegNet with a VGG-16-BN encoder (see :class:`SegNetVGG`)."""
    return SegNetVGG(num_classes=num_classes, width=width, **kwargs)

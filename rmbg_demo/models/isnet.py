"""BRIA's RMBG-1.4: an IS-Net / U\u00b2-Net-style encoder-decoder of residual U-blocks (RSU).

Module names follow the published checkpoint (`stageN.rebnconv3d.conv_s1`, `side1`, ...).
In eval mode `forward` returns the six sigmoid side outputs at the input's resolution,
finest first, as the published network does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBnRelu(nn.Module):
    """'REBNCONV' in the checkpoint: 3x3 conv (optionally dilated), batch norm, ReLU."""

    def __init__(self, cin: int, cout: int, dilation: int = 1, stride: int = 1):
        super().__init__()
        self.conv_s1 = nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, stride=stride)
        self.bn_s1 = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn_s1(self.conv_s1(x)))


def upsample_like(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=reference.shape[-2:], mode="bilinear", align_corners=False)


def pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 2, stride=2, ceil_mode=True)


class RSU(nn.Module):
    """A residual U-block of height `height`.

    Pooled variant (RSU-7..4): convs 1..height-1 with a 2x max-pool after each but the last
    two, conv `height` dilated by 2. Dilated variant (RSU-4F): no pooling; dilations 1, 2, 4, 8.
    The decoder convs (`rebnconvKd`) mirror the encoder on concatenated skips."""

    def __init__(self, height: int, cin: int, mid: int, cout: int, dilated: bool = False):
        super().__init__()
        self.height, self.dilated = height, dilated
        self.rebnconvin = ConvBnRelu(cin, cout)
        dilations = [2 ** i for i in range(height)] if dilated else [1] * (height - 1) + [2]
        for level in range(1, height + 1):
            self.add_module(f"rebnconv{level}", ConvBnRelu(cout if level == 1 else mid, mid, dilations[level - 1]))
        for level in range(height - 1, 0, -1):
            self.add_module(f"rebnconv{level}d", ConvBnRelu(2 * mid, cout if level == 1 else mid,
                                                            dilations[level - 1]))

    def forward(self, x):
        top = self.rebnconvin(x)
        skips, hx = [], top
        for level in range(1, self.height):
            hx = getattr(self, f"rebnconv{level}")(hx)
            skips.append(hx)
            if not self.dilated and level < self.height - 1:
                hx = pool(hx)
        hx = getattr(self, f"rebnconv{self.height}")(hx)
        for level in range(self.height - 1, 0, -1):
            skip = skips[level - 1]
            hx = getattr(self, f"rebnconv{level}d")(torch.cat([upsample_like(hx, skip), skip], dim=1))
        return hx + top


class RMBG14(nn.Module):
    # (height, in, mid, out, dilated) for the six encoder stages and five decoder stages.
    ENCODER = [(7, 64, 32, 64, False), (6, 64, 32, 128, False), (5, 128, 64, 256, False),
               (4, 256, 128, 512, False), (4, 512, 256, 512, True), (4, 512, 256, 512, True)]
    DECODER = [(4, 1024, 256, 512, True), (4, 1024, 128, 256, False), (5, 512, 64, 128, False),
               (6, 256, 32, 64, False), (7, 128, 16, 64, False)]

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 64, 3, stride=2, padding=1)
        for i, spec in enumerate(self.ENCODER, start=1):
            self.add_module(f"stage{i}", RSU(*spec))
        for i, spec in zip(range(5, 0, -1), self.DECODER):
            self.add_module(f"stage{i}d", RSU(*spec))
        for i, channels in enumerate((64, 64, 128, 256, 512, 512), start=1):
            self.add_module(f"side{i}", nn.Conv2d(channels, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        hx = self.conv_in(x)
        encoded = []
        for i in range(1, 7):
            hx = getattr(self, f"stage{i}")(hx if i == 1 else pool(hx))
            encoded.append(hx)
        decoded = {6: encoded[5]}
        hx = encoded[5]
        for i in range(5, 0, -1):
            skip = encoded[i - 1]
            hx = getattr(self, f"stage{i}d")(torch.cat([upsample_like(hx, skip), skip], dim=1))
            decoded[i] = hx
        return [upsample_like(getattr(self, f"side{i}")(decoded[i]), x).sigmoid() for i in range(1, 7)]

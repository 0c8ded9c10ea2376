"""A small residual network for fast training on CPUs, in the style of the CIFAR-10 speedrun networks
(airbench): each stage is a 3x3 convolution, 2x2 max pooling, batch norm and ReLU (pooling before the
normalization, so the memory-bound layers run on a quarter of the pixels), then `convs` more (3x3 convolution,
batch norm, ReLU) at the pooled size, with a skip connection around them. A global max pool and one linear
layer make the head. experiment=speedrun trains it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fmnist_lab.models.checks import MAX_CLASSES, refuse_unless, whole
from fmnist_lab.models.pixels import PIXEL_MEAN, PIXEL_STD
from fmnist_lab.models.registry import network

MAX_STAGES, MAX_CONVS, MAX_CHANNELS = 4, 8, 2048  # 28 -> 14 -> 7 -> 3 -> 1 pixels


class Stage(nn.Module):
    """conv (width -> out), max pool, batch norm, ReLU; then `convs` x (conv, batch norm, ReLU), added to their
    input when `residual`."""

    def __init__(self, width: int, out: int, convs: int, residual: bool) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(width, out, 3, padding=1, bias=False), nn.MaxPool2d(2),
                                  nn.BatchNorm2d(out), nn.ReLU())
        self.body = nn.Sequential(*(layer for _ in range(convs) for layer in (
            nn.Conv2d(out, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU())))
        self.residual = residual and convs > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        return x + self.body(x) if self.residual else self.body(x)


@network
class ResNet(nn.Module):
    """`channels[i]` is the width of stage i; each stage is a Stage with `convs` convolutions after its pooling
    (`residual: false` drops the skip connections: a plain stack). Inputs are raw [0, 1] pixels [N, 1, 28, 28];
    `normalize` standardizes them inside."""

    def __init__(self, channels: Sequence[int] = (32, 64, 128), convs: int = 1, residual: bool = True,
                 normalize: bool = True, num_classes: int = 10) -> None:
        super().__init__()
        widths = list(channels) if isinstance(channels, Sequence) and not isinstance(channels, str) else None
        refuse_unless(
            (widths is not None and 1 <= len(widths) <= MAX_STAGES and all(whole(c, 1, MAX_CHANNELS) for c in widths),
             "channels", channels, f"a list of 1 to {MAX_STAGES} widths from 1 to {MAX_CHANNELS}"),
            (whole(convs, 0, MAX_CONVS), "convs", convs, f"an integer from 0 to {MAX_CONVS}"),
            (isinstance(residual, bool), "residual", residual, "true or false"),
            (whole(num_classes, 1, MAX_CLASSES), "num_classes", num_classes, f"an integer from 1 to {MAX_CLASSES}"),
            (isinstance(normalize, bool), "normalize", normalize, "true or false"),
        )
        self.normalize = normalize
        stages, width = [], 1
        for out in widths:
            stages.append(Stage(width, out, convs, residual))
            width = out
        self.features = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
        # channels-last convolutions are faster on CPUs (oneDNN) and GPU tensor cores; results change only by rounding
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            x = (x - PIXEL_MEAN) / PIXEL_STD
        return self.head(self.features(x.contiguous(memory_format=torch.channels_last)))

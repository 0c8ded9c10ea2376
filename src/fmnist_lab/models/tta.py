"""Test-time augmentation: a network that answers for each image with the mean of its logits for the image and
for its mirror image (FashionMNIST's garments look alike mirrored, so training often flips them too)."""

from __future__ import annotations

import torch
from torch import nn


class FlipAverage(nn.Module):
    """`net`'s logits for x and for x flipped left to right, averaged. It holds no weights of its own: its state
    is `net`'s, and the ONNX export of it computes the same mean inside the graph."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.net(x) + self.net(x.flip(-1))) / 2


def shipped(net: nn.Module, tta: bool) -> nn.Module:
    """The network as a run tests, exports and predicts with: `net`, or its FlipAverage when `tta` is on."""
    return FlipAverage(net) if tta else net

"""The multilayer perceptron: 784 -> hidden... -> 10, as in the PyTorch quickstart."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# Mean and std of the FashionMNIST training pixels in [0, 1]; applied inside the model so every checkpoint
# and export takes raw pixels and a client needs no knowledge of them.
PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "leaky_relu": nn.LeakyReLU}


class MLP(nn.Module):
    """784 -> hidden... -> num_classes, as in the PyTorch quickstart (which also ends with a ReLU:
    `final_relu=True` reproduces it; it clips negative logits, so it is off by default)."""

    def __init__(self, hidden: Sequence[int] = (512, 512), activation: str = "relu", dropout: float = 0.0,
                 final_relu: bool = False, normalize: bool = True, in_features: int = 784,
                 num_classes: int = 10) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"model.activation={activation!r} is unknown; choose one of {sorted(ACTIVATIONS)}.")
        self.normalize = normalize
        self.flatten = nn.Flatten()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_features, width), ACTIVATIONS[activation]()]
            layers += [nn.Dropout(dropout)] if dropout else []
            in_features = width
        layers.append(nn.Linear(in_features, num_classes))
        layers += [nn.ReLU()] if final_relu else []
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            x = (x - PIXEL_MEAN) / PIXEL_STD
        return self.layers(self.flatten(x))

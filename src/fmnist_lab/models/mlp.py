"""The multilayer perceptron: 784 -> hidden... -> 10, as in the PyTorch quickstart; with no hidden layers
(`hidden: []`), a linear model: multinomial logistic regression."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from fmnist_lab.models.checks import MAX_CLASSES, MAX_WIDTH, one_of, refuse_unless, whole
from fmnist_lab.models.pixels import PIXEL_MEAN, PIXEL_STD
from fmnist_lab.models.registry import network

log = logging.getLogger(__name__)

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "leaky_relu": nn.LeakyReLU}
NORMS = {"none": None, "batch": nn.BatchNorm1d, "layer": nn.LayerNorm}
MAX_LAYERS = 32  # hidden layers at most: a cap like those in models.checks, refused before allocating


def check_arguments(hidden: Sequence[int], activation: str, dropout: float, in_features: int,
                    num_classes: int, norm: str = "none", final_relu: bool = False, normalize: bool = True) -> None:
    """ValueError naming the argument unless every value is one the MLP can be built from."""
    hidden = list(hidden) if isinstance(hidden, Sequence) and not isinstance(hidden, str) else None
    refuse_unless(
        (hidden is not None and len(hidden) <= MAX_LAYERS and all(whole(h, 1, MAX_WIDTH) for h in hidden or []),
         "hidden", hidden, f"a list of at most {MAX_LAYERS} widths from 1 to {MAX_WIDTH} ([] for a linear model)"),
        (one_of(activation, ACTIVATIONS), "activation", activation, f"one of {sorted(ACTIVATIONS)}"),
        (one_of(norm, NORMS), "norm", norm, f"one of {sorted(NORMS)}"),
        (isinstance(final_relu, bool), "final_relu", final_relu, "true or false"),
        (isinstance(normalize, bool), "normalize", normalize, "true or false"),
        (isinstance(dropout, int | float) and 0 <= dropout < 1, "dropout", dropout, "0 <= dropout < 1"),
        (whole(in_features, 1, MAX_WIDTH), "in_features", in_features, f"an integer from 1 to {MAX_WIDTH}"),
        (whole(num_classes, 1, MAX_CLASSES), "num_classes", num_classes, f"an integer from 1 to {MAX_CLASSES}"),
    )


@network
class MLP(nn.Module):
    """784 -> hidden... -> num_classes, as in the PyTorch quickstart (which also ends with a ReLU:
    `final_relu=True` reproduces it; it clips negative logits, so it is off by default). `norm` puts batch or
    layer norm between each hidden Linear and its activation. An empty `hidden` is a linear model, 784 ->
    num_classes: multinomial logistic regression (activation, norm and dropout then have nothing to act on)."""

    def __init__(self, hidden: Sequence[int] = (512, 512), activation: str = "relu", dropout: float = 0.0,
                 final_relu: bool = False, normalize: bool = True, in_features: int = 784,
                 num_classes: int = 10, norm: str = "none") -> None:
        super().__init__()
        check_arguments(hidden, activation, dropout, in_features, num_classes, norm, final_relu, normalize)
        if not hidden and torch.empty(0).device.type != "meta":  # not for build_net's size probe
            log.info(f"model.hidden=[]: a linear model ({in_features} -> {num_classes}, multinomial logistic "
                     "regression), no hidden layer")
        self.normalize = normalize
        self.flatten = nn.Flatten()
        layers: list[nn.Module] = []
        for width in hidden:
            layers.append(nn.Linear(in_features, width))
            layers += [NORMS[norm](width)] if NORMS[norm] else []
            layers.append(ACTIVATIONS[activation]())
            layers += [nn.Dropout(dropout)] if dropout else []
            in_features = width
        layers.append(nn.Linear(in_features, num_classes))
        layers += [nn.ReLU()] if final_relu else []
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            x = (x - PIXEL_MEAN) / PIXEL_STD
        return self.layers(self.flatten(x))

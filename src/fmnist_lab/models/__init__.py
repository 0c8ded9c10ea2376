"""The networks (`mlp`, `cnn`, `resnet`, and any other file here), the registry of those a config or a file may name
(`registry`), and the LightningModule that trains any of them (`classifier`).

A network file registers its class with the `@network` decorator; every module in this folder is imported
here, so a new network is one file in this folder and one YAML file in conf/model/.
"""

from __future__ import annotations

import pkgutil
from importlib import import_module

from fmnist_lab.models.classifier import Classifier
from fmnist_lab.models.cnn import CNN
from fmnist_lab.models.mlp import MLP
from fmnist_lab.models.registry import NETWORKS, UnknownNetworkError, build_net, network, register
from fmnist_lab.models.resnet import ResNet
from fmnist_lab.models.tta import FlipAverage, shipped

for _module in pkgutil.iter_modules(__path__):
    import_module(f"{__name__}.{_module.name}")
register("fmnist_lab.model.MLP", MLP)  # the name runs recorded before the networks moved to fmnist_lab.models

__all__ = ["CNN", "MLP", "NETWORKS", "Classifier", "FlipAverage", "ResNet", "UnknownNetworkError", "build_net",
           "network", "register", "shipped"]

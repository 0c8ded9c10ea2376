"""The networks (`mlp`, `cnn`), the registry of those a config or a file may name, and the LightningModule that
trains any of them (`classifier`).

A network is described by a plain dict, `{"_target_": <registered name>, **arguments}`: in conf/model/, in
checkpoints' hyperparameters and in a run's model.json. Files from elsewhere are data, never code, so a
description is built only through `build_net`, which knows the registered classes and nothing else.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from torch import nn

from fmnist_lab.models.cnn import CNN
from fmnist_lab.models.mlp import MLP

# fmnist_lab.model.MLP: the name runs recorded before the networks moved to fmnist_lab.models
NETWORKS: dict[str, type[nn.Module]] = {"fmnist_lab.models.MLP": MLP, "fmnist_lab.models.CNN": CNN,
                                        "fmnist_lab.model.MLP": MLP}


class UnknownNetworkError(ValueError):
    """A network description that names a class fmnist_lab does not know, or arguments it does not take."""


def register(name: str, network: type[nn.Module]) -> None:
    """Let configs and files name `network` as `name` (e.g. `my_project.nets.ResNet`); call it before training
    or loading, in the program that uses fmnist_lab."""
    NETWORKS[name] = network


def build_net(description: Mapping, source: str) -> nn.Module:
    """The network `description` asks for. `source` says where the description comes from (`model` for a
    run's config, or a file), for the error."""
    arguments = dict(description)
    name = arguments.pop("_target_", None)
    network = NETWORKS.get(name) if isinstance(name, str) else None
    if network is None:
        raise UnknownNetworkError(
            f"{source} asks for the network {name!r}, which is not one fmnist_lab builds (known: "
            f"{', '.join(sorted(NETWORKS))}). A description only names a registered architecture; to use your own, "
            "call fmnist_lab.models.register(name, YourModule) before training or loading.")
    accepted = inspect.signature(network).parameters
    unknown = sorted(k for k in arguments if k not in accepted)
    if unknown:
        raise UnknownNetworkError(f"{source}: {name} takes no argument {', '.join(map(repr, unknown))} (it takes "
                                  f"{', '.join(accepted)}).")
    try:
        return network(**arguments)
    except (TypeError, ValueError) as err:
        raise UnknownNetworkError(f"{source}: {err}") from err


from fmnist_lab.models.classifier import Classifier  # noqa: E402 -- it builds its network with build_net

__all__ = ["CNN", "MLP", "NETWORKS", "Classifier", "UnknownNetworkError", "build_net", "register"]

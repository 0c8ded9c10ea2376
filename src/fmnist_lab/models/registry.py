"""The registry of the networks a config or a file may name.

A network is described by a plain dict, `{"_target_": <registered name>, **arguments}`: in conf/model/, in
checkpoints' hyperparameters and in a run's model.json. Files from elsewhere are data, never code, so a
description is built only through `build_net`, which knows the registered classes and nothing else.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from torch import nn

NETWORKS: dict[str, type[nn.Module]] = {}


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
    cls = NETWORKS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise UnknownNetworkError(
            f"{source} asks for the network {name!r}, which is not one fmnist_lab builds (known: "
            f"{', '.join(sorted(NETWORKS))}). A description only names a registered architecture; to use your own, "
            "put it in a file in fmnist_lab/models/ with the @network decorator, or call "
            "fmnist_lab.models.register(name, YourModule) before training or loading.")
    accepted = inspect.signature(cls).parameters
    unknown = sorted(k for k in arguments if k not in accepted)
    if unknown:
        raise UnknownNetworkError(f"{source}: {name} takes no argument {', '.join(map(repr, unknown))} (it takes "
                                  f"{', '.join(accepted)}).")
    try:
        return cls(**arguments)
    except (TypeError, ValueError) as err:
        raise UnknownNetworkError(f"{source}: {err}") from err


def network(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator for a network file in fmnist_lab/models/: registers the class as
    `fmnist_lab.models.<ClassName>`, the name its conf/model/*.yaml gives as `_target_`."""
    register(f"fmnist_lab.models.{cls.__name__}", cls)
    return cls

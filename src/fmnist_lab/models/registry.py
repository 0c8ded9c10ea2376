"""The registry of the networks a config or a file may name.

A network is described by a plain dict, `{"_target_": <registered name>, **arguments}`: in conf/model/, in
checkpoints' hyperparameters and in a run's model.json. Files from elsewhere are data, never code, so a
description is built only through `build_net`, which knows the registered classes and nothing else, and
which measures the network on torch's meta device (no memory) before building it for real.
"""

from __future__ import annotations

import inspect
import reprlib
from collections.abc import Mapping

import torch
from torch import nn

NETWORKS: dict[str, type[nn.Module]] = {}

# Caps on any network built from a description, checked before a single weight is allocated, so that a few
# hundred bytes of model.json cannot ask for gigabytes. The project's largest recipes: experiment=mlp_best
# has 1.9M weights, experiment=cnn_best keeps 0.28M activation values per image. The caps are ~25x and ~18x
# above them, and far below what exhausts a 24 GB machine: 50M float32 weights are 200 MB (about 0.8 GB in
# training, with gradients and Adam's two moments); 5M activations are 20 MB per image, at most 2 GB for the
# batches of 100 images that predict and evaluate run (INFERENCE_BATCH in fmnist_lab.predict).
MAX_WEIGHTS = 50_000_000  # parameters and buffers
MAX_ACTIVATIONS = 5_000_000  # values of every module's outputs for one 28x28 image, summed


class UnknownNetworkError(ValueError):
    """A network description that names a class fmnist_lab does not know, arguments it does not take, or a
    network beyond the size caps."""


def register(name: str, network: type[nn.Module]) -> None:
    """Let configs and files name `network` as `name` (e.g. `my_project.nets.ResNet`); call it before training
    or loading, in the program that uses fmnist_lab."""
    NETWORKS[name] = network


def build_net(description: Mapping, source: str) -> nn.Module:
    """The network `description` asks for, once its size is known to be within MAX_WEIGHTS and
    MAX_ACTIVATIONS. `source` says where the description comes from (`model` for a run's config, or a file
    and its key), for the error."""
    arguments = dict(description)
    name = arguments.pop("_target_", None)
    cls = NETWORKS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise UnknownNetworkError(
            f"{source} asks for the network {reprlib.repr(name)}, which is not one fmnist_lab builds (known: "
            f"{', '.join(sorted(NETWORKS))}). A description only names a registered architecture; to use your own, "
            "put it in a file in fmnist_lab/models/ with the @network decorator, or call "
            "fmnist_lab.models.register(name, YourModule) before training or loading.")
    accepted = inspect.signature(cls).parameters
    unknown = sorted(reprlib.repr(k) for k in arguments if k not in accepted)  # a checkpoint's keys may be ints
    if unknown:
        raise UnknownNetworkError(f"{source}: {name} takes no argument {', '.join(unknown)} (it takes "
                                  f"{', '.join(accepted)}).")
    with torch.device("meta"):  # every tensor the constructor makes is a shape without memory
        probe = construct(cls, arguments, source)
    check_size(probe, name, source)
    return construct(cls, arguments, source)


def construct(cls: type[nn.Module], arguments: dict, source: str) -> nn.Module:
    try:
        return cls(**arguments)
    except (TypeError, ValueError) as err:
        raise UnknownNetworkError(f"{source}: {err}") from err


def check_size(probe: nn.Module, name: str, source: str) -> None:
    """UnknownNetworkError unless the meta-device network `probe` has at most MAX_WEIGHTS weights, turns a
    [1, 1, 28, 28] image into logits [1, classes], and keeps at most MAX_ACTIVATIONS values on the way."""
    refuse = f"{source}: {name} with these arguments"
    weights = sum(t.numel() for t in [*probe.parameters(), *probe.buffers()])
    if weights > MAX_WEIGHTS:
        raise UnknownNetworkError(f"{refuse} would have {weights:,} weights, more than the {MAX_WEIGHTS:,} that "
                                  "fmnist_lab builds (200 MB; experiment=mlp_best has 1.9M); it was refused before "
                                  "anything was allocated. Ask for smaller layers, or use the files a run wrote.")
    outputs: dict[int, torch.Tensor] = {}  # by identity: a Sequential's output is also its last layer's

    def keep(_module: nn.Module, _inputs: object, output: object) -> None:
        outputs.update((id(t), t) for t in tensors(output))

    hooks = [module.register_forward_hook(keep) for module in probe.modules()]
    try:
        with torch.no_grad():
            logits = probe.eval()(torch.zeros(1, 1, 28, 28, device="meta"))
    except Exception as err:  # a shape mismatch, or an op without meta support: either way it cannot be checked
        raise UnknownNetworkError(
            f"{refuse} cannot run on a batch of 28x28 images [N, 1, 28, 28] on torch's meta device, where "
            f"fmnist_lab measures every network before building it ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Check its arguments (e.g. in_features=784).") from err
    finally:
        for hook in hooks:
            hook.remove()
    activations = sum(t.numel() for t in outputs.values())
    if activations > MAX_ACTIVATIONS:
        raise UnknownNetworkError(f"{refuse} would keep {activations:,} activation values per image, more than "
                                  f"the {MAX_ACTIVATIONS:,} that fmnist_lab allows (20 MB; experiment=cnn_best keeps "
                                  "0.28M); it was refused before anything was allocated. Ask for fewer or narrower "
                                  "layers.")
    if not (isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.shape[0] == 1):
        shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise UnknownNetworkError(f"{refuse} turns one image into {shape}, not logits [1, classes]; a classifier "
                                  "must return one row of class scores per image.")


def tensors(output: object) -> list[torch.Tensor]:
    """The tensors in a module's output: a tensor, or tuples, lists and dicts of them."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, tuple | list):
        return [t for item in output for t in tensors(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in tensors(item)]
    return []


def network(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator for a network file in fmnist_lab/models/: registers the class as
    `fmnist_lab.models.<ClassName>`, the name its conf/model/*.yaml gives as `_target_`."""
    register(f"fmnist_lab.models.{cls.__name__}", cls)
    return cls

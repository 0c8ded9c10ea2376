"""The typed schema of the top-level config, and the value checks that run before any work.

Hydra merges conf/train.yaml onto `TrainConfig`, so `epochs=ten` fails at composition with the key named.
`validate` then checks values that types cannot express. Both fail with one paragraph that names the key,
the bad value and what is allowed; `python -m fmnist_lab` prints it and exits 1, without a traceback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

TRAIN_IMAGES = 60_000
DEVICES = ("auto", "cpu", "gpu")


class ConfigError(ValueError):
    """A config value that cannot work; the message says which key and how to fix it."""


@dataclass
class TrainConfig:
    device: str = "auto"
    epochs: int = 10
    lr: float = 0.05
    batch_size: int = 128
    seed: Any = 42  # an int, or null for an unseeded run
    task_name: str = "train"
    optimized_metric: str = "val/acc_best"
    resume: Any = None  # null, a run directory, or `latest`
    paths: Any = None
    data: Any = None
    model: Any = None
    optimizer: Any = None
    scheduler: Any = None
    trainer: Any = None
    logger: Any = None
    callbacks: Any = None


def register() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"Invalid config: {key}={value!r}. {allowed}")


def validate(cfg: DictConfig) -> None:
    """Check every value a run depends on, before any data is read or any process started."""
    _check(cfg.device in DEVICES, "device", cfg.device, f"Use one of {', '.join(DEVICES)} (e.g. device=cpu).")
    if cfg.device == "gpu":
        import torch

        _check(torch.cuda.is_available(), "device", "gpu", "No CUDA GPU is visible to PyTorch here "
               "(torch.cuda.is_available() is False); use device=cpu, or device=auto to take a GPU when there is one.")
    _check(cfg.epochs >= 1, "epochs", cfg.epochs, "The number of training epochs must be at least 1.")
    for key, value in (("lr", cfg.lr), ("optimizer.lr", cfg.optimizer.get("lr", 1.0))):
        _check(isinstance(value, int | float) and math.isfinite(value) and value > 0, key, value,
               "The learning rate must be a finite number > 0 (e.g. lr=0.05 for SGD, lr=1e-3 for Adam).")

    data = cfg.data
    _check(isinstance(data.val_size, int) and 0 < data.val_size < TRAIN_IMAGES, "data.val_size", data.val_size,
           f"The validation set is taken from the {TRAIN_IMAGES:,} training images: use 1..{TRAIN_IMAGES - 1} "
           "(default 5000).")
    train_size = TRAIN_IMAGES - data.val_size
    for key, value in (("batch_size", cfg.batch_size), ("data.batch_size", data.batch_size),
                       ("data.eval_batch_size", data.eval_batch_size)):
        _check(isinstance(value, int) and 1 <= value <= train_size, key, value,
               f"A batch size must be an integer from 1 to the {train_size:,} training images (e.g. 128).")
    _check(data.backend in ("device", "dataloader"), "data.backend", data.backend,
           "Use data.backend=device (whole splits on the training device) or data.backend=dataloader.")

    model = cfg.model
    hidden = list(model.get("hidden", []))
    _check(all(isinstance(h, int) and h > 0 for h in hidden), "model.hidden", hidden,
           "Hidden layer widths must be positive integers, e.g. model.hidden=[512,512].")
    dropout = model.get("dropout", 0.0)
    _check(isinstance(dropout, int | float) and 0 <= dropout < 1, "model.dropout", dropout,
           "Dropout is a probability: 0 <= model.dropout < 1.")

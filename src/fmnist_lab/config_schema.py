"""The typed schema of the top-level config (conf/train.yaml is merged onto `TrainConfig`): a value of the
wrong type fails at composition, with the key named. The groups (data, model, ...) are checked by
fmnist_lab.config.validate and by the classes they build."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class FinetuneConfig:
    init_from: Any = None  # a run directory, .ckpt or .pth
    strict: bool = True
    freeze: Any = field(default_factory=list)  # Linear-layer indices or module names


@dataclass
class GpuConfig:
    fused_optimizer: bool = True
    cuda_graphs: bool = False


@dataclass
class EmaConfig:
    decay: Any = None  # null (off), or a float in (0, 1)


@dataclass
class SwaConfig:
    start_epoch: Any = None  # null (off), or the 1-based epoch averaging starts with


@dataclass
class MixConfig:
    mixup: float = 0.0
    cutmix: float = 0.0
    alpha: float = 1.0


@dataclass
class TrainConfig:
    device: str = "auto"
    epochs: int = 10
    lr: float = 0.05
    batch_size: int = 128
    seed: Any = 42  # an int, or null for an unseeded run
    optimized_metric: Any = "val/acc_best"  # a metric of metrics.json, or a list (a multi-objective sweep)
    resume: Any = None  # null, a run directory, or `latest`
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig())
    gpu: GpuConfig = field(default_factory=lambda: GpuConfig())
    ema: EmaConfig = field(default_factory=lambda: EmaConfig())
    swa: SwaConfig = field(default_factory=lambda: SwaConfig())
    label_smoothing: float = 0.0
    mix: MixConfig = field(default_factory=lambda: MixConfig())
    warmup_epochs: int = 0
    tta: bool = False
    paths: Any = None
    data: Any = None
    model: Any = None
    optimizer: Any = None
    scheduler: Any = None
    trainer: Any = None
    logger: Any = None
    callbacks: Any = None
    tune: Any = None  # null, or the options of conf/tune/lr_find.yaml


def with_defaults(config: Any) -> Any:
    """A run's saved config with the top-level keys it predates added at their defaults, which leave every later
    feature off: a run saved before a key existed (e.g. `ema`) resumes as it was started."""
    from omegaconf import OmegaConf

    defaults = OmegaConf.structured(TrainConfig)
    for key in defaults:
        if key not in config:
            config[key] = OmegaConf.to_container(defaults[key]) if OmegaConf.is_config(defaults[key]) \
                else defaults[key]
    return config

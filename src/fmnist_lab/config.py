"""The typed schema of the top-level config, and the value checks that run before any work.

Hydra merges conf/train.yaml onto `TrainConfig`, so `epochs=ten` fails at composition with the key named.
`validate` then checks values that types cannot express. Both fail with one paragraph that names the key,
the bad value and what is allowed; `python -m fmnist_lab` prints it and exits 1, without a traceback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

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
    """The schema, and the resolvers that send `resume=...` back into the run's own directory."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    OmegaConf.register_new_resolver("run_dir", run_dir, replace=True)
    OmegaConf.register_new_resolver("config_subdir", config_subdir, replace=True)
    OmegaConf.register_new_resolver("slurm_tasks", slurm_tasks, replace=True)
    OmegaConf.register_new_resolver("slurm_gpus", slurm_gpus, replace=True)


def slurm_tasks(strategy: str, devices: Any) -> int:
    """SLURM tasks per node: under trainer=ddp one per device (each task is a rank; Lightning reads SLURM's
    variables and starts no processes of its own), else one."""
    return devices if strategy == "ddp" and isinstance(devices, int) else 1


def slurm_gpus(device: str, tasks: int) -> int | None:
    return None if device == "cpu" else tasks  # None: no --gpus-per-node line for CPU partitions


def find_run(resume: str, log_dir: str) -> Path | None:
    """The run directory that `resume` names (`latest`: the newest run under log_dir), or None."""
    if resume == "latest":  # run folders are named <date>/<time>, so the name order is the start order
        runs = sorted(p.parent.parent for p in Path(log_dir).glob("*/*/checkpoints/last.ckpt"))
        return runs[-1].resolve() if runs else None
    return Path(resume).resolve() if (Path(resume) / ".hydra" / "config.yaml").is_file() else None


def run_dir(resume: str | None, log_dir: str, fresh: str) -> str:
    """Hydra's run directory: the run that `resume` names, else a new `<log_dir>/<date>/<time>` (also when
    `resume` names nothing: `validate` then stops with the error, which a resolver could only print as a
    traceback)."""
    found = find_run(resume, log_dir) if resume is not None else None
    return str(found) if found else f"{log_dir}/{fresh}"


def config_subdir(resume: str | None) -> str:
    """Where Hydra saves the config: a resumed run keeps the original `.hydra/` and adds its own below it."""
    return ".hydra" if resume is None else f".hydra/resumed-{datetime.now():%Y-%m-%d_%H-%M-%S}"


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"Invalid config: {key}={value!r}. {allowed}")


def validate(cfg: DictConfig) -> None:
    """Check every value a run depends on, before any data is read or any process started."""
    if cfg.get("resume") is not None:
        latest = f"No run under {cfg.paths.log_dir}/ has a checkpoint to continue from. "
        _check(find_run(cfg.resume, cfg.paths.log_dir) is not None, "resume", cfg.resume,
               (latest if cfg.resume == "latest" else "That is not a run directory (no .hydra/config.yaml). ")
               + f"Give the folder of a run (e.g. {cfg.paths.log_dir}/2026-01-31/12-00-00) or resume=latest.")
        return  # a resumed run uses the config it was started with, checked back then
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

    trainer = cfg.trainer
    group = data.get("group_batches", 1)
    _check(isinstance(group, int) and group >= 1, "data.group_batches", group,
           "It is how many training batches Lightning gets at once: an integer >= 1.")
    graphs = trainer.get("cuda_graphs", "auto")
    _check(graphs in ("auto", "on", "off"), "trainer.cuda_graphs", graphs,
           "Use auto (capture the training step as a CUDA graph where that works), on, or off.")
    if graphs == "on":
        import torch

        blockers = [why for why, blocked in (
            ("trainer.precision is not 32-true", trainer.get("precision", "32-true") not in ("32-true", "32", 32)),
            ("trainer.gradient_clip_val is set", bool(trainer.get("gradient_clip_val"))),
            ("trainer=ddp trains on several devices", trainer.get("strategy") == "ddp"),
        ) if blocked]
        _check(not blockers, "trainer.cuda_graphs", graphs, f"A captured step cannot work here: {'; '.join(blockers)}. "
               "Use trainer.cuda_graphs=auto (it captures the step only where that works) or off.")
        _check(cfg.device != "cpu" and torch.cuda.is_available(), "trainer.cuda_graphs", graphs,
               "CUDA graphs need a CUDA GPU, and this run trains on the CPU; use trainer.cuda_graphs=auto (it "
               "captures the step whenever the run does train on a GPU) or off.")
    accumulate = trainer.get("accumulate_grad_batches", 1)
    _check(accumulate == 1, "trainer.accumulate_grad_batches", accumulate,
           "fmnist_lab's model owns the optimizer step (Lightning manual optimization), which does not accumulate "
           "gradients; the whole data set is on the device, so raise batch_size instead (e.g. batch_size=512).")
    devices = trainer.get("devices", 1)
    _check(devices == "auto" or (isinstance(devices, int) and devices >= 1) or isinstance(devices, list | ListConfig),
           "trainer.devices", devices, "Use a number of devices (processes under trainer=ddp), a list of GPU "
           "indices, or auto.")
    if isinstance(devices, int) and cfg.device == "gpu":
        import torch

        _check(devices <= torch.cuda.device_count(), "trainer.devices", devices,
               f"This machine has {torch.cuda.device_count()} CUDA GPU(s); ask for at most that many, or use "
               "device=cpu trainer=ddp trainer.devices=N for N CPU processes.")

"""The typed schema of the top-level config, and the value checks that run before any work.

Hydra merges conf/train.yaml onto `TrainConfig`, so `epochs=ten` fails at composition with the key named.
`validate` then checks values that types cannot express. Both fail with one paragraph that names the key,
the bad value and what is allowed; `python -m fmnist_lab` prints it and exits 1, without a traceback.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from fmnist_lab.config_schema import TrainConfig
from fmnist_lab.run_dir_resolvers import config_subdir, find_run, run_dir, unique_dir

TRAIN_IMAGES, TEST_IMAGES = 60_000, 10_000
DEVICES = ("auto", "cpu", "gpu")
MLFLOW_LOGGER = "fmnist_lab.tracking.MLflowLogger"  # conf/logger/mlflow.yaml's: it needs the mlflow package
PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true")


class ConfigError(ValueError):
    """A config value that cannot work; the message says which key and how to fix it."""


def config_dir() -> str:
    """The configs: inside the package for a wheel install, the repo's top-level conf/ for an editable one."""
    packaged = Path(__file__).with_name("conf")
    return str(packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "conf")


def targets(node: Any, key: str = "") -> list[tuple[str, Any]]:
    """(where, value) of every `_target_` in a plain config tree."""
    if isinstance(node, dict):
        return [(f"{key}._target_".lstrip("."), v) for k, v in node.items() if k == "_target_"] + \
            [found for k, v in node.items() for found in targets(v, f"{key}.{k}")]
    if isinstance(node, list):
        return [found for i, v in enumerate(node) for found in targets(v, f"{key}[{i}]")]
    return []


def untrusted_targets(config: DictConfig, source: Path) -> None:
    """BadFileError unless every `_target_` in `config` (a saved config, e.g. a run's .hydra/config.yaml) is one
    that fmnist_lab's own configs name: a config file from elsewhere must not choose code to run."""
    known = {value for path in Path(config_dir()).rglob("*.yaml")
             for _, value in targets(OmegaConf.to_container(OmegaConf.load(path), resolve=False))}
    found = [f"{key}={value}" for key, value in targets(OmegaConf.to_container(config, resolve=False))
             if value not in known]
    if found:
        from fmnist_lab.run_dir import BadFileError

        raise BadFileError(f"{source} names code that fmnist_lab's configs do not ({', '.join(found)}), so it is "
                           "not run. If you made this run yourself with your own classes, start it again with the "
                           "same overrides instead of resuming it.")


def register() -> None:
    """The schema, and the resolvers that send `resume=...` back into the run's own directory."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    # cached: the directory is created once, and every later reading of the config (a joblib worker's too) gets it
    OmegaConf.register_new_resolver("run_dir", run_dir, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("unique_dir", unique_dir, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("config_subdir", config_subdir, replace=True)
    OmegaConf.register_new_resolver("slurm_tasks", slurm_tasks, replace=True)
    OmegaConf.register_new_resolver("rank_suffix", rank_suffix, replace=True)
    # a store URI (sqlite:///<absolute path>) from a folder given relative to where runs start
    OmegaConf.register_new_resolver("abspath", lambda path: str(Path(path).resolve()), replace=True)


def rank_suffix() -> str:
    """`_rank<N>` in the other processes of a job started by torchrun or as SLURM tasks, so that each process
    logs to a file of its own (`hydra.job.name`); empty in rank zero and in single-process jobs."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    return f"_rank{rank}" if rank else ""


def slurm_tasks(strategy: str, devices: Any) -> int:
    """SLURM tasks per node: under trainer=ddp one per device (each task is a rank; Lightning reads SLURM's
    variables and starts no processes of its own), else one."""
    return devices if strategy == "ddp" and isinstance(devices, int) else 1


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"Invalid config: {key}={value!r}. {allowed}")


def check_limits(cfg: DictConfig, processes: int) -> None:
    """A fraction in trainer.limit_*_batches must leave each process at least one batch of its share of the
    split (Lightning stops with an error otherwise, once the data is loaded)."""
    splits = {"train": (TRAIN_IMAGES - cfg.data.val_size, cfg.data.batch_size),
              "val": (cfg.data.val_size, cfg.data.eval_batch_size), "test": (TEST_IMAGES, cfg.data.eval_batch_size)}
    for split, (images, batch) in splits.items():
        key, limit = f"trainer.limit_{split}_batches", cfg.trainer.get(f"limit_{split}_batches")
        if isinstance(limit, float) and 0 < limit < 1:
            batches = math.ceil(math.ceil(images / processes) / batch)  # each process's share (DistributedSampler)
            check(int(batches * limit) >= 1, key, limit,
                  f"That fraction of the {batches} {split} batch(es) each of the {processes} process(es) gets is "
                  f"less than one batch: give a number of batches instead (e.g. {key}=1), a fraction of at least "
                  f"{1 / batches:.2g}, or a smaller data.{'eval_' if split != 'train' else ''}batch_size.")


def validate(cfg: DictConfig, sweep_launcher: str | None = None) -> None:
    """Check every value a run depends on, before any data is read or any process started, and stop at the first
    that cannot work. `sweep_launcher`: the `_target_` of Hydra's launcher when this is a job of a sweep."""
    if cfg.get("resume") is not None:
        check_resume(cfg)
        return  # a resumed run uses the config it was started with, checked back then
    check_device(cfg)
    check_training(cfg)
    check_data(cfg)
    check_tune(cfg.get("tune"))
    check_loggers(cfg)
    check_trainer(cfg)
    check_devices(cfg)
    check_limits(cfg, processes(cfg.trainer) * cfg.trainer.get("num_nodes", 1))
    check_local_sweep(cfg.trainer, sweep_launcher)
    check_augment(cfg.data)  # last: they need torch, which the checks above answer without
    check_techniques(cfg)


def check_resume(cfg: DictConfig) -> None:
    latest = f"No run under {cfg.paths.log_dir}/ has a checkpoint to continue from. "
    check(find_run(cfg.resume, cfg.paths.log_dir) is not None, "resume", cfg.resume,
          (latest if cfg.resume == "latest" else "That is not a run directory (no .hydra/config.yaml). ")
          + f"Give the folder of a run (e.g. {cfg.paths.log_dir}/2026-01-31/12-00-00) or resume=latest.")


def check_device(cfg: DictConfig) -> None:
    check(cfg.device in DEVICES, "device", cfg.device, f"Use one of {', '.join(DEVICES)} (e.g. device=cpu).")
    if cfg.device == "gpu":
        import torch

        check(torch.cuda.is_available(), "device", "gpu", "No CUDA GPU is visible to PyTorch here "
              "(torch.cuda.is_available() is False); use device=cpu, or device=auto to take a GPU when there is one.")


def check_training(cfg: DictConfig) -> None:
    """The numbers of the training loop: epochs, seed, and the optimizer's momentum and learning rate."""
    check(cfg.epochs >= 1, "epochs", cfg.epochs, "The number of training epochs must be at least 1.")
    check(cfg.seed is None or (isinstance(cfg.seed, int) and 0 <= cfg.seed < 2**32), "seed", cfg.seed,
          "A seed is an integer from 0 to 2**32 - 1 (NumPy's range), or null for an unseeded run.")
    momentum = cfg.optimizer.get("momentum", 0.0)
    check(isinstance(momentum, int | float) and 0 <= momentum < 1, "optimizer.momentum", momentum,
          "Momentum is a fraction of the last update kept: 0 <= optimizer.momentum < 1 (e.g. 0.9).")
    # both keys: conf/optimizer/ sets optimizer.lr to ${lr}, and an override of either names the key it gave
    for key, value in (("lr", cfg.lr), ("optimizer.lr", cfg.optimizer.get("lr", 1.0))):
        check(isinstance(value, int | float) and math.isfinite(value) and value > 0, key, value,
              "The learning rate must be a finite number > 0 (e.g. lr=0.05 for SGD, lr=1e-3 for Adam).")


def check_data(cfg: DictConfig) -> None:
    data = cfg.data
    check(isinstance(data.val_size, int) and 0 < data.val_size < TRAIN_IMAGES, "data.val_size", data.val_size,
          f"The validation set is taken from the {TRAIN_IMAGES:,} training images: use 1..{TRAIN_IMAGES - 1} "
          "(default 5000).")
    train_size = TRAIN_IMAGES - data.val_size
    # both keys, as for the learning rate: conf/data/ sets data.batch_size to ${batch_size}
    for key, value in (("batch_size", cfg.batch_size), ("data.batch_size", data.batch_size),
                       ("data.eval_batch_size", data.eval_batch_size)):
        check(isinstance(value, int) and 1 <= value <= train_size, key, value,
              f"A batch size must be an integer from 1 to the {train_size:,} training images (e.g. 128).")
    check(data.backend in ("device", "dataloader"), "data.backend", data.backend,
          "Use data.backend=device (whole splits on the training device) or data.backend=dataloader.")
    augment = data.get("augment") or {}
    check(isinstance(augment, dict | DictConfig) and set(augment) <= {"crop_padding", "flip", "erase"}, "data.augment",
          augment, "It takes crop_padding, flip and erase (e.g. data.augment.flip=0.5); torchvision transforms "
          "for the dataloader backend go in data.transforms.")


def check_tune(tune: DictConfig | None) -> None:
    if tune:
        check(0 < tune.min_lr < tune.max_lr, "tune.min_lr", tune.min_lr,
              f"The range test runs from tune.min_lr to tune.max_lr ({tune.max_lr}): 0 < min_lr < max_lr.")
        check(isinstance(tune.num_training, int) and tune.num_training >= 10, "tune.num_training", tune.num_training,
              "It is how many rates are tried, one training step each: an integer >= 10 (default 100).")
        check(tune.mode in ("exponential", "linear"), "tune.mode", tune.mode, "Use exponential or linear.")


def check_loggers(cfg: DictConfig) -> None:
    for name, logger in (cfg.get("logger") or {}).items():
        if logger and logger.get("_target_") == MLFLOW_LOGGER:
            try:
                import mlflow  # noqa: F401
            except ImportError as err:
                raise ConfigError(f"Invalid config: logger={name!r}. MLflow is not installed here: pip install -e "
                                  "'.[tracking]' (make setup installs it), or use logger=tensorboard.") from err


def check_trainer(cfg: DictConfig) -> None:
    """The Trainer's numbers and precision, and the GPU options they go with."""
    trainer = cfg.trainer
    precision = str(trainer.get("precision", "32-true"))
    check(precision in PRECISIONS, "trainer.precision", precision, f"Use one of {', '.join(PRECISIONS)} "
          "(bf16-mixed works on CPUs and recent GPUs; 16-mixed needs a CUDA GPU).")
    accumulate = trainer.get("accumulate_grad_batches", 1)
    check(isinstance(accumulate, int) and accumulate >= 1, "trainer.accumulate_grad_batches", accumulate,
          "It is how many batches' gradients are summed before each optimizer step: an integer >= 1.")
    clip = trainer.get("gradient_clip_val")
    check(clip is None or (isinstance(clip, int | float) and clip > 0), "trainer.gradient_clip_val", clip,
          "Use a positive number (e.g. 1.0) to clip gradients to that norm, or null for no clipping.")
    every = trainer.get("log_every_n_steps", 50)
    check(isinstance(every, int) and every >= 1, "trainer.log_every_n_steps", every,
          "The train loss is read back and logged every this many optimizer steps: an integer >= 1 (e.g. 50).")
    check(not (cfg.gpu.cuda_graphs and cfg.device == "cpu"), "gpu.cuda_graphs", True,
          "CUDA graphs need a CUDA GPU and this run trains on the CPU (device=cpu); drop gpu.cuda_graphs=true.")


def processes(trainer: DictConfig) -> int:
    """How many processes (ranks) `trainer.devices` asks for on each node."""
    devices = trainer.get("devices", 1)
    return devices if isinstance(devices, int) else len(devices) if isinstance(devices, list | ListConfig) else 1


def is_ddp(trainer: DictConfig) -> bool:
    return str(trainer.get("strategy", "auto")).startswith("ddp")


def check_devices(cfg: DictConfig) -> None:
    """trainer.devices: a valid number or list, that this machine has, and data-parallel when there are several."""
    trainer, devices = cfg.trainer, cfg.trainer.get("devices", 1)
    check(devices == "auto" or (isinstance(devices, int) and devices >= 1) or isinstance(devices, list | ListConfig),
          "trainer.devices", devices, "Use a number of devices (processes under trainer=ddp), a list of GPU "
          "indices, or auto.")
    if isinstance(devices, int) and cfg.device == "gpu":
        import torch

        check(devices <= torch.cuda.device_count(), "trainer.devices", devices,
              f"This machine has {torch.cuda.device_count()} CUDA GPU(s); ask for at most that many, or use "
              "device=cpu trainer=ddp trainer.devices=N for N CPU processes.")
    check(processes(trainer) == 1 or is_ddp(trainer) or trainer.get("num_nodes", 1) > 1, "trainer.devices", devices,
          "Several devices train data-parallel: add trainer=ddp (e.g. trainer=ddp trainer.devices=2), or use "
          "trainer.devices=1.")


def check_local_sweep(trainer: DictConfig, sweep_launcher: str | None) -> None:
    """Lightning starts DDP ranks 1..n-1 by running this process's command line again, which in a sweep is the
    whole sweep; under torchrun (LOCAL_WORLD_SIZE set) or as SLURM tasks every rank already runs."""
    local = sweep_launcher is not None and "slurm" not in sweep_launcher.lower()
    ranks = processes(trainer)
    check(not (local and ranks > 1 and is_ddp(trainer) and "LOCAL_WORLD_SIZE" not in os.environ), "trainer.devices",
          trainer.get("devices", 1), "trainer=ddp with several devices inside a local sweep would start every rank "
          "by running the whole sweep again. Start the sweep under torchrun, which runs every rank itself (torchrun "
          f"--nproc_per_node={ranks} -m fmnist_lab -m trainer=ddp trainer.devices={ranks} hydra.sweep.dir=<dir> "
          "...), or use hydra/launcher=slurm (one SLURM task per rank).")


def check_augment(data: DictConfig) -> None:
    from fmnist_lab.data.augment import Augment

    try:
        Augment(**(data.get("augment") or {}))
    except ValueError as err:
        raise ConfigError(f"Invalid config: {err}") from err


def check_techniques(cfg: DictConfig) -> None:
    from fmnist_lab.techniques import check_techniques as check_settings

    try:
        check_settings(cfg)
    except ValueError as err:
        raise ConfigError(f"Invalid config: {err}") from err

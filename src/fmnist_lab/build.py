"""Everything a training job is built from, by its config: the data module, the model (with a warm start and
frozen layers), the callbacks, the loggers and the Trainer; and the process-wide settings they run under."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from fmnist_lab.artifacts import freeze, warm_start
from fmnist_lab.config import ConfigError
from fmnist_lab.gpu_step import CudaGraphs
from fmnist_lab.models import Classifier, UnknownNetworkError
from fmnist_lab.run_dir import save_torch
from fmnist_lab.techniques import averaging_callbacks
from fmnist_lab.tensorboard_hparams import logger_folder

log = logging.getLogger(__name__)


def plain(node: Any) -> Any:
    """A resolved plain container: what goes into checkpoints and logs (never a DictConfig)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints go to a temporary file that is renamed into place: a kill in the middle of a save never
    leaves a truncated last.ckpt (Lightning's own save writes the final path directly)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_torch(checkpoint, Path(path))


def build(cfg: DictConfig, purge_from: int | None = None, *extra: pl.Callback
          ) -> tuple[pl.LightningDataModule, Classifier, pl.Trainer]:
    """Data module, model and trainer from the config, with the `extra` callbacks. `purge_from`: TensorBoard
    drops the run folder's events from this step on (a resumed run: those logged after its checkpoint; a job
    run again from scratch into its sweep folder: all of them), so the curves repeat no step."""
    datamodule = instantiate(cfg.data)
    try:
        model = Classifier(net=plain(cfg.model), optimizer=plain(cfg.optimizer),
                           scheduler=plain(cfg.scheduler) or None, num_classes=cfg.model.get("num_classes", 10),
                           fused_optimizer=cfg.gpu.fused_optimizer, label_smoothing=cfg.label_smoothing,
                           mix=plain(cfg.mix), warmup_epochs=cfg.warmup_epochs, tta=cfg.tta)
    except UnknownNetworkError as err:  # the network's own checks: arguments, sizes
        raise ConfigError(f"Invalid config: {err}") from err
    try:  # both need the network built, so they are checked here, still before any data is read
        if cfg.finetune.init_from:
            loaded = warm_start(model.net, cfg.finetune.init_from, cfg.finetune.strict)
            log.info(f"finetune.init_from={cfg.finetune.init_from}: loaded {len(loaded)} tensors "
                     f"({', '.join(loaded)})")
        if cfg.finetune.freeze:
            log.info(f"finetune.freeze: froze {', '.join(freeze(model.net, cfg.finetune.freeze))}")
    except FileNotFoundError as err:
        raise ConfigError(f"Invalid config: finetune.init_from={cfg.finetune.init_from!r}. {err}") from err
    except ValueError as err:  # warm_start and freeze name the key themselves
        raise ConfigError(f"Invalid config: {err}") from err
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    callbacks += averaging_callbacks(cfg)
    callbacks += [CudaGraphs()] if cfg.gpu.cuda_graphs else []
    callbacks += extra
    purge = {"purge_step": purge_from} if purge_from is not None else {}  # SummaryWriter's: drops steps >= it
    try:  # TensorBoard: a sweep job's run folder is named by its swept values (tensorboard/lr=0.1,batch_size=64)
        loggers = [instantiate(c, **({**purge, **logger_folder(c)} if issubclass(get_class(c._target_),
                                                                                  TensorBoardLogger) else {}))
                   for c in (cfg.get("logger") or {}).values() if c and "_target_" in c]
    except InstantiationException as err:  # Hydra wraps what a logger raises, e.g. MLflowLogger's unusable store
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise
    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():  # submitit owns requeueing (see conf/hydra/launcher/slurm.yaml), not Lightning
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins,
                          enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
                          # only the configured checkpoints: with none, Lightning would add its own epoch=N.ckpt
                          enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                          enable_model_summary=False)
    return datamodule, model, trainer

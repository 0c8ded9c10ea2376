"""Every config group option composes and builds; the short top-level keys reach the groups."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from conftest import compose_cfg
from fmnist_lab.build import build
from fmnist_lab.cli import config_dir
from fmnist_lab.models import CNN, MLP, ResNet
from fmnist_lab.tracking import MLflowLogger

GROUPS = sorted(p.name for p in Path(config_dir()).iterdir() if p.is_dir())
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((Path(config_dir()) / g).glob("*.yaml"))]


def test_every_group_has_options():
    assert {"data", "model", "optimizer", "scheduler", "trainer", "logger", "callbacks", "experiment",
            "debug"} <= set(GROUPS)
    expected = {"optimizer": ["sgd", "adam", "adamw"], "scheduler": ["none", "cosine", "step"],
                "logger": ["tensorboard", "csv", "mlflow", "none"], "callbacks": ["default", "none"],
                "debug": ["fast_dev_run", "overfit", "limit"],
                "experiment": ["seed_tutorial", "mlp_best", "cnn", "cnn_best", "speedrun"],
                "model": ["mlp", "cnn", "resnet"]}
    assert {(g, o) for g, options in expected.items() for o in options} <= set(OPTIONS)


def optimizers(model, trainer) -> tuple[torch.optim.Optimizer, object]:
    model.trainer = trainer  # as Trainer.fit attaches it: the schedule spans the trainer's epochs
    config = model.configure_optimizers()
    if isinstance(config, torch.optim.Optimizer):
        return config, None
    return config["optimizer"], config["lr_scheduler"]["scheduler"]


def checkpoints(trainer) -> list[str]:
    return sorted(c.filename for c in trainer.callbacks if isinstance(c, ModelCheckpoint))


def sweeper(*overrides: str) -> str:
    """The `_target_` of the Hydra sweeper these overrides select (the run's config does not hold it)."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True).hydra.sweeper._target_


# What each option must change in the built objects: an option that composes but does nothing fails here.
EFFECTS = {
    ("callbacks", "default"): lambda cfg, dm, model, trainer: checkpoints(trainer) == ["best", "last"],
    ("callbacks", "none"): lambda cfg, dm, model, trainer: checkpoints(trainer) == [],
    ("data", "fashion_mnist"): lambda cfg, dm, model, trainer: (dm.batch_size, dm.val_size) == (cfg.batch_size, 5000),
    ("debug", "fast_dev_run"): lambda cfg, dm, model, trainer: trainer.fast_dev_run and not trainer.loggers,
    ("debug", "limit"): lambda cfg, dm, model, trainer: (trainer.limit_train_batches, trainer.max_epochs) == (0.05, 2),
    ("debug", "overfit"): lambda cfg, dm, model, trainer: trainer.overfit_batches == 4,
    ("experiment", "seed_tutorial"): lambda cfg, dm, model, trainer: (
        type(optimizers(model, trainer)[0]) is torch.optim.SGD and optimizers(model, trainer)[1] is None
        and optimizers(model, trainer)[0].defaults["lr"] == 1e-3 and dm.batch_size == 64),
    ("experiment", "cnn"): lambda cfg, dm, model, trainer: (
        isinstance(model.net, CNN) and trainer.max_epochs == 10 and dm.augment.flip == 0.5
        and isinstance(optimizers(model, trainer)[1], torch.optim.lr_scheduler.CosineAnnealingLR)),
    ("experiment", "cnn_best"): lambda cfg, dm, model, trainer: (
        isinstance(model.net, CNN) and trainer.max_epochs == 30 and dm.augment.crop_padding == 2
        and len(model.net.features[0]) == 2 * 3 + 1),  # two (conv, norm, ReLU) and the pooling
    ("experiment", "speedrun"): lambda cfg, dm, model, trainer: (
        isinstance(model.net, ResNet) and trainer.max_epochs == 14 and dm.batch_size == 64 and model.hparams.tta
        and model.hparams.label_smoothing == 0.1 and model.hparams.warmup_epochs == 1
        and any(type(c).__name__ == "EMA" for c in trainer.callbacks)),
    ("experiment", "mlp_best"): lambda cfg, dm, model, trainer: (
        type(optimizers(model, trainer)[0]) is torch.optim.AdamW and trainer.max_epochs == 40
        and sum(isinstance(m, torch.nn.BatchNorm1d) for m in model.net.layers) == 2 and dm.augment.flip == 0.5),
    ("hparams_search", "optuna"): lambda cfg, dm, model, trainer: sweeper("hparams_search=optuna") == (
        "hydra_plugins.fmnist_lab_optuna.OptunaSweeper"),
    ("logger", "csv"): lambda cfg, dm, model, trainer: [type(lg) for lg in trainer.loggers] == [CSVLogger],
    ("logger", "mlflow"): lambda cfg, dm, model, trainer: [type(lg) for lg in trainer.loggers] == [MLflowLogger] and (
        Path(cfg.paths.log_dir) / "mlflow.db").is_file() and trainer.loggers[0].run_id,
    ("logger", "none"): lambda cfg, dm, model, trainer: trainer.loggers == [],
    ("logger", "tensorboard"): lambda cfg, dm, model, trainer: [type(lg) for lg in trainer.loggers] == [
        TensorBoardLogger],
    ("model", "cnn"): lambda cfg, dm, model, trainer: isinstance(model.net, CNN) and sum(
        p.numel() for p in model.net.parameters()) < 500_000,
    ("model", "mlp"): lambda cfg, dm, model, trainer: isinstance(model.net, MLP),
    ("model", "resnet"): lambda cfg, dm, model, trainer: isinstance(model.net, ResNet) and len(model.net.features) == 3,
    ("optimizer", "adam"): lambda cfg, dm, model, trainer: type(optimizers(model, trainer)[0]) is torch.optim.Adam,
    ("optimizer", "adamw"): lambda cfg, dm, model, trainer: type(optimizers(model, trainer)[0]) is
    torch.optim.AdamW,
    ("optimizer", "sgd"): lambda cfg, dm, model, trainer: type(optimizers(model, trainer)[0]) is torch.optim.SGD,
    ("paths", "default"): lambda cfg, dm, model, trainer: trainer.default_root_dir == cfg.paths.output_dir,
    ("scheduler", "cosine"): lambda cfg, dm, model, trainer: isinstance(
        optimizers(model, trainer)[1], torch.optim.lr_scheduler.CosineAnnealingLR),
    ("scheduler", "none"): lambda cfg, dm, model, trainer: optimizers(model, trainer)[1] is None,
    ("scheduler", "step"): lambda cfg, dm, model, trainer: isinstance(
        optimizers(model, trainer)[1], torch.optim.lr_scheduler.StepLR),
    ("tune", "lr_find"): lambda cfg, dm, model, trainer: (cfg.tune.min_lr, cfg.tune.max_lr, cfg.tune.num_training) == (
        1e-6, 1.0, 100) and model.lr == cfg.lr,
    ("trainer", "ddp"): lambda cfg, dm, model, trainer: isinstance(trainer.strategy, DDPStrategy),
    ("trainer", "default"): lambda cfg, dm, model, trainer: type(trainer.strategy) is SingleDeviceStrategy,
}


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_builds_and_takes_effect(group, option, tmp_path):
    cfg = compose_cfg(f"{group}={option}", "device=cpu", f"paths.log_dir={tmp_path}", output_dir=tmp_path)
    datamodule, model, trainer = build(cfg)
    assert type(datamodule).__name__ == "FashionMNISTDataModule"
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert trainer.max_epochs == cfg.epochs or cfg.trainer.get("fast_dev_run")
    assert (group, option) in EFFECTS, f"{group}={option}: add what it must change to EFFECTS"
    assert EFFECTS[group, option](cfg, datamodule, model, trainer)


def test_short_keys_reach_the_groups(tmp_path):
    cfg = compose_cfg("epochs=3", "lr=0.2", "batch_size=32", "seed=0", "device=cpu", output_dir=tmp_path)
    datamodule, model, trainer = build(cfg)
    assert (datamodule.batch_size, datamodule.seed) == (32, 0)  # seed=0 is a seed, not "no seed"
    assert optimizers(model, trainer)[0].defaults["lr"] == 0.2
    assert trainer.max_epochs == 3 and trainer.accelerator.__class__.__name__ == "CPUAccelerator"


def test_default_run_writes_best_and_last_checkpoints(tmp_path):
    cfg = compose_cfg(output_dir=tmp_path)
    _, _, trainer = build(cfg)
    (best,) = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.monitor]
    assert (best.dirpath, best.monitor, best.mode, best.filename) == (str(tmp_path / "checkpoints"), "val/acc", "max",
                                                                      "best")
    (last,) = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and not c.monitor]
    assert (last.dirpath, last.filename, last.save_top_k) == (str(tmp_path / "checkpoints"), "last", 1)


def test_seed_tutorial_is_the_tutorials_recipe(tmp_path):
    cfg = compose_cfg("experiment=seed_tutorial", output_dir=tmp_path)
    assert (cfg.lr, cfg.batch_size, cfg.epochs) == (1e-3, 64, 10)
    assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.optimizer.momentum == 0
    assert cfg.model.final_relu and not cfg.model.normalize and list(cfg.model.hidden) == [512, 512]


def test_help_works_from_another_directory(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fmnist_lab", "--help"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "fmnist_lab" in result.stdout and "optimizer: adam, adamw, sgd" in result.stdout


def test_console_script_is_installed(tmp_path):
    script = Path(sys.executable).with_name("fmnist-lab")
    result = subprocess.run([str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "fmnist_lab" in result.stdout, result.stderr

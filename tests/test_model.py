"""The MLP and a few real Lightning training steps on synthetic data, on the CPU."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.tuner import Tuner
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import compose_cfg
from fmnist_lab.data import FashionMNISTDataModule
from fmnist_lab.models import MLP, Classifier, UnknownNetworkError, build_net, register
from fmnist_lab.train import train

SGD = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.05, "momentum": 0.9}
NET = {"_target_": "fmnist_lab.models.MLP", "hidden": [64]}


def test_default_mlp_is_784_512_512_10():
    net = MLP()
    linears = [m for m in net.layers if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 512), (512, 512), (512, 10)]
    assert sum(p.numel() for p in net.parameters()) == 669_706
    assert not isinstance(net.layers[-1], torch.nn.ReLU)
    assert net(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_mlp_options():
    net = MLP(hidden=[32, 16, 8], activation="gelu", dropout=0.2, final_relu=True, normalize=False)
    assert isinstance(net.layers[-1], torch.nn.ReLU)
    assert sum(isinstance(m, torch.nn.Dropout) for m in net.layers) == 3
    assert sum(isinstance(m, torch.nn.GELU) for m in net.layers) == 3
    assert (net.eval()(torch.rand(4, 1, 28, 28)) >= 0).all()
    with pytest.raises(ValueError, match=r"model.activation='swish' is not a network fmnist_lab builds"):
        MLP(activation="swish")
    batch = MLP(hidden=[32, 16], norm="batch")
    assert [type(m).__name__ for m in batch.layers] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d",
                                                        "ReLU", "Linear"]
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in MLP(hidden=[32, 16], norm="layer").layers) == 2
    assert list(MLP().state_dict()) == [f"layers.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
    with pytest.raises(ValueError, match=r"model.norm='group' is not a network fmnist_lab builds: use one of"):
        MLP(norm="group")


def quick_trainer(tmp_path, **kwargs) -> pl.Trainer:
    logger = pl.loggers.TensorBoardLogger(tmp_path, name="tb", version="", default_hp_metric=False)
    options = dict(accelerator="cpu", devices=1, max_epochs=1, logger=logger, enable_progress_bar=False,
                   enable_checkpointing=False, enable_model_summary=False, limit_train_batches=60,
                   limit_val_batches=2, log_every_n_steps=10)
    return pl.Trainer(**{**options, **kwargs})


def test_training_steps_learn_and_log_every_n_steps(synthetic_root, tmp_path):
    pl.seed_everything(0)
    dm = FashionMNISTDataModule(root=str(synthetic_root), batch_size=64, seed=0)
    model = Classifier(NET, SGD)  # the trainer logs every 10 steps
    trainer = quick_trainer(tmp_path)
    trainer.fit(model, datamodule=dm)
    (result,) = trainer.test(model, datamodule=dm, verbose=False)
    assert result["test/acc"] > 0.9  # the synthetic classes are easy; chance is 0.1

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == [10, 20, 30, 40, 50, 60]
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses[-1] < losses[0] / 2
    assert {"val/acc", "val/loss", "val/acc_best", "train/lr", "test/acc"} <= set(events.Tags()["scalars"])
    assert events.Scalars("val/acc_best")[-1].value == events.Scalars("val/acc")[-1].value  # one epoch: itself


class SpoilAt(pl.Callback):
    """Ruins the network just before the validation of `epoch`: the last layer votes class 0 for every image,
    so val/acc falls to about 0.1 in that epoch and the final weights are the worst of the run."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch and not trainer.sanity_checking:
            last = [m for m in pl_module.net.modules() if isinstance(m, torch.nn.Linear)][-1]
            with torch.no_grad():
                last.weight.zero_()
                last.bias.copy_(torch.nn.functional.one_hot(torch.tensor(0), 10).float())


def test_the_best_epoch_is_tested_saved_and_recorded_as_the_best(synthetic_root, tmp_path):
    """val/acc rises, then falls in the last epoch: test/acc, model_weights.pth and val/acc_best all come from
    the best epoch, and the logged val/acc_best curve is the running maximum of val/acc."""
    metrics = train(compose_cfg(f"data.root={synthetic_root}", "device=cpu", "epochs=3", "logger=csv", "lr=0.002",
                                "trainer.limit_train_batches=4", "trainer.log_every_n_steps=2",
                                "trainer.limit_val_batches=2", "~callbacks.onnx_export",
                                "+callbacks.spoil._target_=test_model.SpoilAt", "+callbacks.spoil.epoch=2",
                                output_dir=tmp_path))
    rows = [r for r in csv.DictReader((tmp_path / "csv" / "metrics.csv").open()) if r.get("val/acc")]
    val_acc = [float(r["val/acc"]) for r in rows]
    assert len(val_acc) == 3 and val_acc[0] < val_acc[1] and val_acc[2] < 0.2  # e.g. 0.5, 0.9, then 0.1
    assert [float(r["val/acc_best"]) for r in rows] == [val_acc[0], val_acc[1], val_acc[1]]
    assert metrics["val/acc_best"] == pytest.approx(val_acc[1])

    assert metrics["test/acc"] > 0.5 and metrics["best_checkpoint"] == "checkpoints/best.ckpt"
    best = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert (best["epoch"], last["epoch"]) == (1, 2)
    saved = torch.load(tmp_path / "model_weights.pth", weights_only=True)
    assert all(torch.equal(value, best["state_dict"][f"net.{key}"]) for key, value in saved.items())
    assert not all(torch.equal(value, last["state_dict"][f"net.{key}"]) for key, value in saved.items())


def test_non_finite_loss_stops_training_with_a_hint(synthetic_root, tmp_path):
    dm = FashionMNISTDataModule(root=str(synthetic_root), batch_size=64, seed=0)
    model = Classifier(NET, {**SGD, "lr": 1e6})
    with pytest.raises(FloatingPointError, match=r"training loss became nan by step \d+.*smaller `lr`"):
        quick_trainer(tmp_path, log_every_n_steps=5).fit(model, datamodule=dm)
    assert model.global_step <= 10  # stopped at the first read-back, not after the epoch


def test_lightnings_lr_finder_sets_the_rate_the_optimizer_is_built_with(synthetic_root, tmp_path):
    """Tuner.lr_find and the LearningRateFinder callback find `lr` on the model and train with what they set."""
    dm = FashionMNISTDataModule(root=str(synthetic_root), batch_size=64, seed=0)
    model = Classifier(NET, SGD)
    finder = Tuner(quick_trainer(tmp_path)).lr_find(model, datamodule=dm, num_training=30)
    assert finder.suggestion() is not None and model.lr == finder.suggestion() != SGD["lr"]
    assert model.configure_optimizers().defaults["lr"] == model.lr


def test_scheduler_and_frozen_parameters_reach_the_optimizer():
    sched = {"_target_": "torch.optim.lr_scheduler.StepLR", "_partial_": True, "step_size": 1, "gamma": 0.5}
    model = Classifier(NET, SGD, scheduler=sched)
    model.net.layers[0].weight.requires_grad_(False)
    config = model.configure_optimizers()
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    params = [p for group in config["optimizer"].param_groups for p in group["params"]]
    assert len(params) == 3 and all(p is not model.net.layers[0].weight for p in params)


def test_a_network_file_registers_itself_as_the_readme_shows(tmp_path):
    """README's "Adding a network": its file, dropped into models/ (of a copy of the package), is all the code a
    new network needs; configs and model.json files can then name it, and its bounds are enforced."""
    import re
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import fmnist_lab

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (source,) = re.findall(r"```python\n# src/fmnist_lab/models/wide.py\n(.*?)```", readme, re.S)
    (yaml,) = re.findall(r"```yaml\n# conf/model/wide.yaml\n(.*?)```", readme, re.S)
    package = tmp_path / "fmnist_lab"
    shutil.copytree(Path(fmnist_lab.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "models" / "wide.py").write_text(source)
    (tmp_path / "wide.yaml").write_text(yaml)
    check = """
import torch
from omegaconf import OmegaConf
from fmnist_lab.models import UnknownNetworkError, build_net
description = OmegaConf.to_container(OmegaConf.load("wide.yaml"))
net = build_net(description, "model")
assert net(torch.rand(2, 1, 28, 28)).shape == (2, 10) and type(net).__name__ == "Wide", net
try:
    build_net({**description, "width": 0}, "model")
except UnknownNetworkError as err:
    print(err)
"""
    result = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "model.width=0 is not a network fmnist_lab builds" in result.stdout


class Wide(torch.nn.Module):
    """784 -> width -> 10: a network a user registers, whose size its argument sets."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, width), torch.nn.Linear(width, 10))

    def forward(self, x):
        return self.layers(x)


class Blowup(torch.nn.Module):
    """Few weights, large activations: upsamples each image `scale` times before pooling it away."""

    def __init__(self, scale: int = 2) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Upsample(scale_factor=scale), torch.nn.AdaptiveAvgPool2d(1),
                                          torch.nn.Flatten(), torch.nn.Linear(1, 10))

    def forward(self, x):
        return self.layers(x)


def test_build_net_measures_any_registered_network_before_building_it():
    """Weights and activations per image are counted on the meta device for every registered class, so a file
    cannot ask a user's network for gigabytes either; what a network cannot run on 28x28 images is refused."""
    register("tests.Wide", Wide)
    register("tests.Blowup", Blowup)
    assert sum(p.numel() for p in build_net({"_target_": "tests.Wide", "width": 64}, "model").parameters()) == 50_890
    with pytest.raises(UnknownNetworkError, match=r"^x.json: tests.Wide with these arguments would have 55,650,010 "
                                                  r"weights, more than the 50,000,000"):
        build_net({"_target_": "tests.Wide", "width": 70_000}, "x.json")  # 222 MB, were it built
    assert build_net({"_target_": "tests.Blowup", "scale": 10}, "model")(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(UnknownNetworkError, match=r"would keep 7,840,012 activation values per image, more than"):
        build_net({"_target_": "tests.Blowup", "scale": 100}, "x.json")  # 2800 x 2800 pixels an image
    with pytest.raises(UnknownNetworkError, match=r"cannot run on a batch of 28x28 images .*RuntimeError"):
        build_net({"_target_": "fmnist_lab.models.MLP", "in_features": 100}, "x.json")


def test_the_resnet_pools_before_normalizing_and_skips_around_its_convolutions():
    net = build_net({"_target_": "fmnist_lab.models.ResNet"}, "model").eval()
    assert sum(p.numel() for p in net.parameters()) == 288_170  # conf/model/resnet.yaml says so
    down = net.features[0].down
    assert [type(m).__name__ for m in down] == ["Conv2d", "MaxPool2d", "BatchNorm2d", "ReLU"]
    x = torch.rand(4, 1, 28, 28)
    stage = net.features[1]
    with torch.no_grad():
        h = stage.down(net.features[0](x))
        assert torch.allclose(stage(net.features[0](x)), h + stage.body(h))  # the skip connection
        plain = build_net({"_target_": "fmnist_lab.models.ResNet", "residual": False}, "model").eval()
        plain.load_state_dict(net.state_dict())
        assert not torch.allclose(plain(x), net(x)) and net(x).shape == (4, 10)
    with pytest.raises(UnknownNetworkError, match=r"model.convs=9 is not a network fmnist_lab builds"):
        build_net({"_target_": "fmnist_lab.models.ResNet", "convs": 9}, "model")
    assert "288,170 parameters" in (Path(__file__).resolve().parents[1] / "conf/model/resnet.yaml").read_text()


def test_the_largest_recipes_are_well_within_the_size_caps():
    for experiment in ("mlp_best", "cnn_best", "speedrun"):
        description = OmegaConf.to_container(compose_cfg(f"experiment={experiment}").model)
        assert isinstance(build_net(description, "model"), torch.nn.Module)
        assert build_net({**description, "num_classes": 1000}, "model") is not None


def test_an_empty_hidden_list_is_a_documented_logged_linear_model(caplog):
    with caplog.at_level(logging.INFO, logger="fmnist_lab.models.mlp"):
        net = build_net({"_target_": "fmnist_lab.models.MLP", "hidden": []}, "model")
    assert [(m.in_features, m.out_features) for m in net.layers] == [(784, 10)] and len(net.layers) == 1
    (record,) = caplog.records  # once: not again for build_net's size probe
    assert "model.hidden=[]: a linear model (784 -> 10, multinomial logistic regression)" in record.getMessage()
    assert "linear model" in MLP.__doc__ and "multinomial logistic regression" in MLP.__doc__
    config = (Path(__file__).resolve().parents[1] / "conf" / "model" / "mlp.yaml").read_text()
    assert "[] is a linear model (multinomial logistic regression)" in config

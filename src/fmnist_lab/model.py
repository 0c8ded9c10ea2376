"""The MLP and the LightningModule that trains it."""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from fmnist_lab.files import atomic_write, write_json

# Mean and std of the FashionMNIST training pixels in [0, 1]; applied inside the model so every checkpoint
# and export takes raw pixels and a client needs no knowledge of them.
PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530
INPUT_DESCRIPTION = "float32 [N, 1, 28, 28]: grayscale pixels in [0, 1], light garment on black (as ToTensor gives)"
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "leaky_relu": nn.LeakyReLU}


class MLP(nn.Module):
    """784 -> hidden... -> num_classes, as in the PyTorch quickstart (which also ends with a ReLU:
    `final_relu=True` reproduces it; it clips negative logits, so it is off by default)."""

    def __init__(self, hidden: Sequence[int] = (512, 512), activation: str = "relu", dropout: float = 0.0,
                 final_relu: bool = False, normalize: bool = True, in_features: int = 784,
                 num_classes: int = 10) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"model.activation={activation!r} is unknown; choose one of {sorted(ACTIVATIONS)}.")
        self.normalize = normalize
        self.flatten = nn.Flatten()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_features, width), ACTIVATIONS[activation]()]
            layers += [nn.Dropout(dropout)] if dropout else []
            in_features = width
        layers.append(nn.Linear(in_features, num_classes))
        layers += [nn.ReLU()] if final_relu else []
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            x = (x - PIXEL_MEAN) / PIXEL_STD
        return self.layers(self.flatten(x))


class Classifier(pl.LightningModule):
    """Cross-entropy training of `net` (a config dict with `_target_`, default the MLP).

    Every argument is a plain dict, so checkpoint hyperparameters load with `weights_only=True` and
    `Classifier.load_from_checkpoint` rebuilds the exact network.

    The training step never synchronizes with the device: losses are summed on the device and one value
    per `log_every_n_steps` steps is read back and logged (a `self.log` per step costs ~1 ms on a GPU).
    """

    def __init__(self, net: dict, optimizer: dict, scheduler: dict | None = None, num_classes: int = 10,
                 log_every_n_steps: int = 50) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)  # the run logs the whole config once, with its results
        self.net = instantiate(net)
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()
        self.train_loss_epoch = math.nan
        self._loss_sum: torch.Tensor | None = None  # running sum on the device since the last log
        self._loss_steps = 0
        self._epoch_loss: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def on_train_epoch_start(self) -> None:
        self._loss_sum, self._loss_steps, self._epoch_loss = None, 0, []
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=False, on_epoch=True)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self._loss_sum = loss.detach() if self._loss_sum is None else self._loss_sum + loss.detach()
        self._loss_steps += 1
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.global_step % self.hparams.log_every_n_steps == 0:
            self._flush_train_loss()

    def on_train_epoch_end(self) -> None:
        self._flush_train_loss()
        if self._epoch_loss:
            self.train_loss_epoch = sum(self._epoch_loss) / len(self._epoch_loss)
            self.log("train/loss_epoch", self.train_loss_epoch, on_step=False, on_epoch=True)

    def _flush_train_loss(self) -> None:
        """Read the running mean back (the only host sync of training) and log it at the current step."""
        if not self._loss_steps:
            return
        value = float(self._loss_sum) / self._loss_steps
        self._epoch_loss.append(value)
        self._loss_sum, self._loss_steps = None, 0
        if not math.isfinite(value):
            raise FloatingPointError(
                f"training loss became {value} by step {self.global_step} (epoch {self.current_epoch}); the "
                f"learning rate is probably too high for this optimizer: try a smaller `lr`."
            )
        for logger in self.loggers:
            logger.log_metrics({"train/loss": value}, step=self.global_step)

    def _evaluate(self, batch, acc: MulticlassAccuracy, loss: MeanMetric) -> None:
        x, y = batch
        logits = self.net(x)
        loss.update(F.cross_entropy(logits, y), weight=len(y))
        acc.update(logits, y)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.val_acc, self.val_loss)

    def on_validation_epoch_end(self) -> None:
        acc = self.val_acc.compute()
        if not self.trainer.sanity_checking:  # the pre-training sanity batches must not count as "best"
            self.val_acc_best.update(acc)
        self.log_dict({"val/loss": self.val_loss.compute(), "val/acc": acc}, prog_bar=True)
        self.log("val/acc_best", self.val_acc_best.compute() if self.val_acc_best.update_called else acc)
        for metric in (self.val_acc, self.val_loss):
            metric.reset()

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_acc, self.test_loss)

    def on_test_epoch_end(self) -> None:
        self.log_dict({"test/loss": self.test_loss.compute(), "test/acc": self.test_acc.compute()})
        for metric in (self.test_acc, self.test_loss):
            metric.reset()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # What Lightning leaves out but an exact resume needs: the RNG streams (dropout) and the best so far.
        checkpoint["rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        if self.val_acc_best.update_called:
            checkpoint["val_acc_best"] = float(self.val_acc_best.compute())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if "val_acc_best" in checkpoint:
            self.val_acc_best.reset()
            self.val_acc_best.update(torch.tensor(checkpoint["val_acc_best"]))

    def configure_optimizers(self):
        # Frozen parameters stay out of the optimizer, so weight decay and momentum cannot move them.
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = instantiate(self.hparams.optimizer)(params=params)
        if not self.hparams.scheduler:
            return optimizer
        scheduler = instantiate(self.hparams.scheduler)(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


# --- artifacts: the weights file, loading any of them back, warm start and frozen layers -----------------


class UnsafeFileError(ValueError):
    """A file that would need arbitrary unpickling (e.g. a whole model saved with `torch.save(model)`)."""


def read_file(path: Path) -> Any:
    """`torch.load(path, weights_only=True)`: tensors and plain containers only, never arbitrary code."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give a run directory, a .ckpt or a .pth file.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeFileError(
            f"{path} holds pickled Python objects, not just tensors (a model saved with `torch.save(model)`?). "
            "Loading it could run arbitrary code, so fmnist_lab refuses it. Save `model.state_dict()` instead, "
            "or use a run's model_weights.pth or checkpoints/best.ckpt."
        ) from err


def save_weights(net: nn.Module, net_config: dict, folder: Path, classes: Sequence[str]) -> Path:
    """`model_weights.pth` (the state_dict, as in the PyTorch tutorial) + `model.json` (how to rebuild it)."""
    write_json(folder / "model.json", {"net": net_config, "classes": list(classes), "input": INPUT_DESCRIPTION})
    return atomic_write(folder / "model_weights.pth", lambda tmp: torch.save(net.state_dict(), tmp))


def read_weights(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(net config, state_dict) from a run directory, a Lightning .ckpt, or a .pth with model.json beside it."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / "model_weights.pth", *(path / "checkpoints" / f for f in ("best.ckpt", "last.ckpt"))]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{path} holds no model: looked for {', '.join(map(str, candidates))}.")
        path = found
    data = read_file(path)
    if path.suffix == ".ckpt":
        net_config = data.get("hyper_parameters", {}).get("net")
        if net_config is None:
            raise ValueError(f"{path} is a checkpoint without fmnist_lab's `net` hyperparameters.")
        return net_config, {k.removeprefix("net."): v for k, v in data["state_dict"].items() if k.startswith("net.")}
    description = path.with_name("model.json")
    if not description.is_file():
        raise FileNotFoundError(f"{path} is a bare state_dict; {description} must sit beside it to say which "
                                "architecture the weights belong to (every run writes the pair).")
    return json.loads(description.read_text())["net"], data


def load_model(path: str | Path) -> nn.Module:
    """An eval-mode network on the CPU from a run directory, a .ckpt or a .pth (always `weights_only`)."""
    net_config, state = read_weights(path)
    net = instantiate(net_config)
    net.load_state_dict(state)
    return net.eval()


def warm_start(net: nn.Module, path: str | Path, strict: bool = True) -> list[str]:
    """Copy weights from a run/.ckpt/.pth into `net`; `strict=False` takes every tensor whose name and shape
    match and skips the rest. Returns the names of the tensors loaded."""
    _, state = read_weights(path)
    own = net.state_dict()
    loaded = [k for k, v in state.items() if k in own and own[k].shape == v.shape]
    if strict and not (len(loaded) == len(own) == len(state)):
        mismatched = sorted((set(own) | set(state)) - set(loaded))
        raise ValueError(f"model.init_from={path} does not match this model ({', '.join(mismatched)} differ in "
                         "name or shape); set model.init_strict=false to load only the tensors that match.")
    net.load_state_dict({k: state[k] for k in loaded}, strict=False)
    return loaded


def freeze(net: nn.Module, layers: Sequence[int | str]) -> list[str]:
    """Freeze layers given as an index into the Linear layers (0 = first, -1 = last) or a module name
    (`layers.0`). Frozen parameters get `requires_grad=False` and stay out of the optimizer."""
    linears = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    modules = dict(net.named_modules())
    names = []
    for layer in layers:
        if isinstance(layer, int):
            if not -len(linears) <= layer < len(linears):
                raise ValueError(f"model.freeze: index {layer} is out of range; the model has {len(linears)} "
                                 f"Linear layers ({', '.join(linears)}).")
            layer = linears[layer]
        if layer not in modules or not layer:
            raise ValueError(f"model.freeze: no layer named {layer!r}; use an index or one of {', '.join(linears)}.")
        modules[layer].requires_grad_(False)
        names.append(layer)
    return names


def parameter_counts(net: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "frozen": total - trainable}

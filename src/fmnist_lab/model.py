"""The MLP and the LightningModule that trains it."""

from __future__ import annotations

import inspect
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
from lightning.pytorch.callbacks import Callback
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from fmnist_lab.files import atomic_write, write_json

# Mean and std of the FashionMNIST training pixels in [0, 1]; applied inside the model so every checkpoint
# and export takes raw pixels and a client needs no knowledge of them.
PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530
INPUT_DESCRIPTION = "float32 [N, 1, 28, 28]: grayscale pixels in [0, 1], light garment on black (as ToTensor gives)"
# Lightning hooks around each backward and optimizer step; a callback that overrides one keeps the step on
# Lightning's path, so it is called.
STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")
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

    `_step` owns the optimizer step (Lightning's manual optimization), which keeps the hot path free of
    framework work:
    - a Lightning batch may be a group of batches (`data.group_batches`); each is one optimizer step;
    - losses are summed on the device and read back once per `log_every_n_steps` steps (the only host sync);
    - on CUDA (`cuda_graphs`), forward + backward + optimizer step are captured once as a CUDA graph and
      replayed: one launch per step instead of dozens.
    """

    def __init__(self, net: dict, optimizer: dict, scheduler: dict | None = None, num_classes: int = 10,
                 log_every_n_steps: int = 50, cuda_graphs: str = "auto", gradient_clip_val: float | None = None,
                 gradient_clip_algorithm: str = "norm") -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)  # the run logs the whole config once, with its results
        self.automatic_optimization = False
        self.net = instantiate(net)
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()
        self.train_loss_epoch = math.nan
        self._loss_sum: torch.Tensor | None = None  # running sum on the device since the last log
        self._loss_steps = 0
        self._epoch_loss: list[torch.Tensor] = []
        self.graph: CapturedStep | None = None
        self.direct = False  # set when training starts: see on_train_start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def step_blockers(self) -> list[str]:
        """Why a step must go through Lightning's backward and optimizer wrappers (and cannot be captured)."""
        hooked = sorted({f"{type(c).__name__}.{hook}" for c in self.trainer.callbacks for hook in STEP_HOOKS
                         if getattr(type(c), hook) is not getattr(Callback, hook)})
        return [why for why, blocked in (
            ("precision is not 32-true (mixed precision's gradient scaler syncs with the host)",
             self.trainer.precision != "32-true"),
            ("gradient clipping is on", bool(self.hparams.gradient_clip_val)),
            ("training runs on more than one device", self.trainer.world_size > 1),
            (f"callbacks use Lightning's per-step hooks ({', '.join(hooked)})", bool(hooked)),
        ) if blocked]

    def uses_cuda_graphs(self) -> bool:
        """`cuda_graphs`: `off`; `on` (an error where it cannot work); `auto`: on where it is known to work."""
        mode = self.hparams.cuda_graphs
        blockers = ["the device is not a CUDA GPU"] if self.device.type != "cuda" else self.step_blockers()
        if mode == "on" and blockers:
            raise ValueError(f"trainer.cuda_graphs=on cannot work here: {'; '.join(blockers)}. "
                             "Use trainer.cuda_graphs=auto (captures only where it works) or off.")
        return mode == "on" or (mode == "auto" and not blockers)

    def on_train_start(self) -> None:
        # Where nothing needs them, the step skips Lightning's backward and optimizer wrappers: their hooks
        # cost ~0.6 ms a step on a 2-core CPU, a seventh of the step itself.
        self.direct = not self.step_blockers()
        self.graph = CapturedStep(self, self.optimizers()) if self.uses_cuda_graphs() else None

    @property
    def step_mode(self) -> str:
        """Which step trained: `cuda_graph`, `direct` (eager, around Lightning's wrappers) or `lightning`."""
        return "cuda_graph" if self.graph is not None else "direct" if self.direct else "lightning"

    def on_train_epoch_start(self) -> None:
        self._loss_sum, self._loss_steps, self._epoch_loss = None, 0, []
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=False, on_epoch=True)

    def training_step(self, batch, batch_idx: int) -> None:
        # A DataLoader batch is [images, labels]; a DeviceBatches group is a list of (images, labels) pairs.
        for x, y in ([batch] if isinstance(batch[0], torch.Tensor) else batch):
            if self.trainer.max_steps != -1 and self.global_step >= self.trainer.max_steps:
                break  # a group may hold more steps than max_steps has left
            loss = self._step(x, y).detach()
            # clone: a captured step's loss is a buffer that the next replay overwrites
            self._loss_sum = loss.clone() if self._loss_sum is None else self._loss_sum + loss
            self._loss_steps += 1
            if self.global_step % self.hparams.log_every_n_steps == 0:
                self._flush_train_loss()

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on one batch; returns the batch's loss (on the device)."""
        if self.graph is not None and self.graph.fits(x):
            return self.graph.step(x, y)
        return self.eager_step(x, y)

    def eager_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        optimizer = self.optimizers()
        # With a captured graph, the gradients are its static buffers: zero them, never replace them.
        optimizer.zero_grad(set_to_none=self.graph is None)
        loss = F.cross_entropy(self.net(x), y)
        if self.direct:
            loss.backward()
            optimizer.optimizer.step()
            count_step(optimizer)
            return loss
        self.manual_backward(loss)  # DDP's gradient sync, mixed precision's loss scaling, callbacks' hooks
        if self.hparams.gradient_clip_val:
            self.clip_gradients(optimizer, self.hparams.gradient_clip_val, self.hparams.gradient_clip_algorithm)
        optimizer.step()  # also counts the step: trainer.global_step
        return loss

    def on_train_epoch_end(self) -> None:
        self._flush_train_loss()
        if self._epoch_loss:
            self.train_loss_epoch = sum(self._epoch_loss) / len(self._epoch_loss)
            self.log("train/loss_epoch", self.train_loss_epoch, on_step=False, on_epoch=True)
        scheduler = self.lr_schedulers()
        if scheduler is not None:  # manual optimization steps the (per-epoch) schedule itself
            scheduler.step()

    def _flush_train_loss(self) -> None:
        """Read the running mean back (the only host sync of training) and log it at the current step.
        Under DDP every rank gets here at the same step, and the value is the mean over all ranks."""
        if not self._loss_steps:
            return
        value = float(self.trainer.strategy.reduce(self._loss_sum, reduce_op="mean")) / self._loss_steps
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
        make = instantiate(self.hparams.optimizer)
        # Adam & co. read their step count on the host unless `capturable`; a CUDA graph needs it on the device.
        capturable = "capturable" in inspect.signature(make.func).parameters and self.uses_cuda_graphs()
        optimizer = make(params=params, **({"capturable": True} if capturable else {}))
        if not self.hparams.scheduler:
            return optimizer
        scheduler = instantiate(self.hparams.scheduler)(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def count_step(optimizer) -> None:
    """Lightning counts a step (trainer.global_step) when its optimizer wrapper steps; a step that bypasses the
    wrapper counts through the same two hooks."""
    optimizer._on_before_step()
    optimizer._on_after_step()


class CaptureError(RuntimeError):
    """The training step cannot be captured as a CUDA graph (the network or optimizer needs the host)."""


class CapturedStep:
    """The training step as one CUDA graph, after PyTorch's "whole network capture" recipe.

    The first `WARMUP` steps run eagerly on a side stream (lazy initializations must not happen during a
    capture). Then forward + backward + optimizer step are captured once with static input buffers, and
    every later step of that shape is two copies and one replay. A batch of another shape (an epoch's last,
    partial batch) steps eagerly on the same gradient buffers. The learning rate is baked into the graph,
    so a changed rate (the per-epoch schedule) is captured anew before its first step.
    """

    WARMUP = 3

    def __init__(self, module: Classifier, optimizer) -> None:
        self.module, self.optimizer = module, optimizer  # a LightningOptimizer
        self.warmup_left = self.WARMUP
        self.graph: torch.cuda.CUDAGraph | None = None
        self.shape: torch.Size | None = None
        self.static: tuple[torch.Tensor, ...] = ()
        self.lrs: list[float] = []

    def fits(self, x: torch.Tensor) -> bool:
        return self.shape is None or x.shape == self.shape

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.warmup_left:
            self.warmup_left -= 1
            self.shape = x.shape
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self.module.eager_step(x, y)
            torch.cuda.current_stream().wait_stream(side)
            return loss
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        if self.graph is None or lrs != self.lrs:
            self.capture(x, y, lrs)
        static_x, static_y, static_loss = self.static
        static_x.copy_(x)
        static_y.copy_(y)
        self.graph.replay()
        count_step(self.optimizer)
        return static_loss

    def capture(self, x: torch.Tensor, y: torch.Tensor, lrs: list[float]) -> None:
        self.graph = self.static = None  # release the previous graph's memory first
        static_x, static_y = x.clone(), y.clone()
        # Gradients set to None are allocated inside the graph's memory pool and overwritten on each replay.
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):  # records the kernels; nothing runs, so no state changes here
                static_loss = F.cross_entropy(self.module.net(static_x), static_y)
                static_loss.backward()
                self.optimizer.optimizer.step()
        except RuntimeError as err:
            cause = str(err).splitlines()[0].rstrip(".")  # CUDA appends lines of debugging advice; kept in the chain
            raise CaptureError(
                f"Capturing the training step as a CUDA graph failed: {cause}. The network or optimizer probably "
                "does something a graph cannot replay (a host sync such as .item() or print of a tensor, a shape "
                "that depends on the data). Set trainer.cuda_graphs=off to train with the eager step."
            ) from err
        self.graph, self.static, self.lrs = graph, (static_x, static_y, static_loss), lrs


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

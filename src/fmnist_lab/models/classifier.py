"""The LightningModule: cross-entropy training of any network in models/, with accuracy and loss metrics and
the optimizer and schedule from the config."""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torchmetrics import MaxMetric, MeanMetric, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from fmnist_lab.gpu_step import optimizer_options
from fmnist_lab.models.registry import build_net
from fmnist_lab.models.tta import shipped
from fmnist_lab.techniques import BatchMix, with_warmup


class Classifier(pl.LightningModule):
    """Cross-entropy training of `net` (a config dict with `_target_`, default the MLP).

    Every argument is a plain dict or value, so checkpoint hyperparameters load with `weights_only=True` and
    `Classifier.load_from_checkpoint` rebuilds the exact network.

    Training is Lightning's automatic optimization: `training_step` returns the loss, and the Trainer does the
    backward pass, gradient clipping, accumulation, mixed precision, DDP and every callback hook. Only the
    train loss is kept off Lightning's per-step logging: it is summed on the device and read back once every
    `trainer.log_every_n_steps` optimizer steps, because `self.log` on every step costs about as much as a
    step of this network, and a read-back per step stalls a GPU.
    """

    def __init__(self, net: dict, optimizer: dict, scheduler: dict | None = None, num_classes: int = 10,
                 fused_optimizer: bool = True, label_smoothing: float = 0.0, mix: dict | None = None,
                 warmup_epochs: int = 0, tta: bool = False) -> None:
        """`label_smoothing`, `mix`, `warmup_epochs` and `tta`: the techniques of fmnist_lab.techniques (all off
        by default; checkpoints of runs without them load as before)."""
        super().__init__()
        self.save_hyperparameters(logger=False)  # the run logs the whole config once, with its results
        self.net = build_net(net, "model")  # registered architectures only: checkpoints are data
        # Where Lightning's learning-rate finder (Tuner.lr_find, the LearningRateFinder callback) puts the rate
        # it suggests; the optimizer is built with it.
        self.lr = optimizer.get("lr")
        self.mix = BatchMix(**(mix or {}), num_classes=num_classes)
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()
        self.test_images = SumMetric()  # how many images test/acc covers (debug=limit tests a slice)
        # gpu_step.CudaGraphs may set a captured forward + backward for the training batches it fits
        self.train_forward: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.loss_sum: torch.Tensor | None = None  # on the device, since the last read-back
        self.loss_batches = 0
        self.logged_at = 0  # the global step of the last read-back
        self.epoch_losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def on_train_start(self) -> None:
        self.logged_at = self.global_step  # a resumed run counts on from its checkpoint

    def on_train_epoch_start(self) -> None:
        self.loss_sum, self.loss_batches, self.epoch_losses = None, 0, []
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=False, on_epoch=True)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.mix:
            x, y = self.mix(x, y)  # y becomes class probabilities
        loss = F.cross_entropy((self.train_forward or self.net)(x), y, label_smoothing=self.hparams.label_smoothing)
        detached = loss.detach()
        self.loss_sum = detached if self.loss_sum is None else self.loss_sum + detached
        self.loss_batches += 1
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        step = self.global_step  # optimizer steps: with accumulation, several batches share one
        if step != self.logged_at and step % self.trainer.log_every_n_steps == 0:
            self.log_train_loss()

    def on_train_epoch_end(self) -> None:
        self.log_train_loss()
        if self.epoch_losses:
            self.log("train/loss_epoch", sum(self.epoch_losses) / len(self.epoch_losses), on_step=False, on_epoch=True)

    def log_train_loss(self) -> None:
        """Read the running mean back (the only host sync of training) and log it at the current step.
        Under DDP every rank gets here at the same step, and the value is the mean over all ranks."""
        if not self.loss_batches:
            return
        value = float(self.trainer.strategy.reduce(self.loss_sum, reduce_op="mean")) / self.loss_batches
        self.epoch_losses.append(value)
        self.loss_sum, self.loss_batches, self.logged_at = None, 0, self.global_step
        if not math.isfinite(value):
            raise FloatingPointError(
                f"training loss became {value} by step {self.global_step} (epoch {self.current_epoch}); the "
                f"learning rate is probably too high for this optimizer: try a smaller `lr`."
            )
        for logger in self.loggers:
            logger.log_metrics({"train/loss": value}, step=self.global_step)

    def shipped(self) -> torch.nn.Module:
        """The network as the run tests it and ships it (model_weights.pth, model.onnx): with `tta`, the mean of
        each image's and its mirror's logits."""
        return shipped(self.net, self.hparams.tta)

    def update_metrics(self, batch, acc: MulticlassAccuracy, loss: MeanMetric, net: torch.nn.Module) -> None:
        """Add a validation or test batch to the running `acc` and `loss`, computed and reset at the epoch end."""
        x, y = batch
        logits = net(x)
        loss.update(F.cross_entropy(logits, y), weight=len(y))
        acc.update(logits, y)

    def validation_step(self, batch, batch_idx: int) -> None:
        self.update_metrics(batch, self.val_acc, self.val_loss, self.net)

    def on_validation_epoch_end(self) -> None:
        acc = self.val_acc.compute()
        if not self.trainer.sanity_checking:  # the pre-training sanity batches must not count as "best"
            self.val_acc_best.update(acc)
        self.log_dict({"val/loss": self.val_loss.compute(), "val/acc": acc}, prog_bar=True)
        self.log("val/acc_best", self.val_acc_best.compute() if self.val_acc_best.update_called else acc)
        for metric in (self.val_acc, self.val_loss):
            metric.reset()

    def test_step(self, batch, batch_idx: int) -> None:
        self.update_metrics(batch, self.test_acc, self.test_loss, self.shipped())
        self.test_images.update(len(batch[1]))

    def on_test_epoch_end(self) -> None:
        self.log_dict({"test/loss": self.test_loss.compute(), "test/acc": self.test_acc.compute(),
                       "test/images": self.test_images.compute()})
        for metric in (self.test_acc, self.test_loss, self.test_images):
            metric.reset()

    def best_val_acc(self) -> float | None:
        """The best validation accuracy of the run so far (None before the first validation). Under DDP a
        collective: every rank must call it."""
        return float(self.val_acc_best.compute()) if self.val_acc_best.update_called else None

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
        rate = {"lr": self.lr} if self.lr is not None else {}
        optimizer = make(params=params, **rate, **optimizer_options(make, self.device, self.hparams.fused_optimizer))
        schedule = instantiate(self.hparams.scheduler) if self.hparams.scheduler else None
        scheduler = with_warmup(optimizer, schedule, self.hparams.warmup_epochs, lambda: self.trainer.max_epochs)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

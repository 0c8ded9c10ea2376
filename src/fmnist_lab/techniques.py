"""The training techniques of timm-style recipes, each a config choice that is off by default:

- `ema.decay`: an exponential moving average of the weights (Lightning's EMAWeightAveraging), which is what is
  validated, checkpointed as best, tested and shipped;
- `swa.start_epoch`: stochastic weight averaging, the mean of the weights from that epoch on (Lightning's
  WeightAveraging);
- `label_smoothing`: of the training loss (torch's cross_entropy);
- `mix.mixup`, `mix.cutmix`, `mix.alpha`: mixing of training batches on their device (torchvision.transforms.v2);
- `warmup_epochs`: a linear learning-rate warmup in front of any scheduler (torch's LinearLR and SequentialLR);
- `tta`: test-time augmentation (fmnist_lab.models.FlipAverage), in the test, evaluate, predict and model.onnx.

docs/techniques.md says what each does and how they go together.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from omegaconf import DictConfig
from torch.optim.lr_scheduler import LinearLR, LRScheduler, SequentialLR


def load_average(callback: WeightAveraging, trainer: pl.Trainer, pl_module: pl.LightningModule,
                 checkpoint: dict) -> None:
    """Lightning's loading of the averager's state, only where it belongs: when fitting continues from a
    checkpoint that holds an average. Testing a checkpoint keeps its `state_dict`, the average that was validated
    and is shipped (Lightning's callback would put the raw weights back into the model for the test), and a
    checkpoint from before averaging began holds none to load."""
    if trainer.state.fn == TrainerFn.FITTING and "current_model_state" in checkpoint:
        WeightAveraging.on_load_checkpoint(callback, trainer, pl_module, checkpoint)


class EMA(EMAWeightAveraging):
    """An exponential moving average of the weights (batch-norm statistics too), updated after every optimizer
    step: Lightning's EMAWeightAveraging. Validation swaps the average in, every checkpoint's `state_dict` is the
    average (the raw weights and the averager's state are kept beside it, for resuming), and training ends
    with the average in the model, so the best checkpoint, the test and the exports are all the average."""

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        load_average(self, trainer, pl_module, checkpoint)


class SWA(WeightAveraging):
    """Stochastic weight averaging: the plain mean of the weights after every optimizer step from epoch
    `start_epoch` (1-based) on, batch-norm statistics averaged alongside. Like EMA, from that epoch on validation,
    checkpoints, the test and the exports are the average.

    Built on Lightning's WeightAveraging rather than its StochasticWeightAveraging callback: that one validates
    and checkpoints the raw weights and puts the average into the model only as training ends (after one extra
    epoch for batch-norm statistics), so the tested best checkpoint would not be the average."""

    def __init__(self, start_epoch: int) -> None:
        super().__init__(use_buffers=True)
        self.start_epoch = start_epoch
        self.trainer: pl.Trainer | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.trainer = trainer

    def averaging(self) -> bool:
        return self.trainer is not None and self.trainer.current_epoch >= self.start_epoch - 1

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and self.averaging()

    # Before the start epoch there is no average: the raw weights are validated and checkpointed.
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.averaging():
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.averaging():
            super().on_validation_epoch_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self.averaging():
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.averaging():  # a run cut short (trainer.max_steps, fast_dev_run) may end before the start epoch
            super().on_train_end(trainer, pl_module)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        load_average(self, trainer, pl_module, checkpoint)


def averaging_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """The weight-averaging callback `ema` or `swa` asks for (none by default)."""
    if cfg.ema.decay is not None:
        return [EMA(decay=float(cfg.ema.decay))]
    if cfg.swa.start_epoch is not None:
        return [SWA(int(cfg.swa.start_epoch))]
    return []


class BatchMix:
    """Mixup (with probability `mixup`) or cutmix (with probability `cutmix`) of a training batch, torchvision's
    transforms.v2 MixUp and CutMix with Beta(`alpha`, `alpha`); the labels become class probabilities. The
    choice is drawn from torch's default CPU generator (seeded, and saved in every checkpoint), so a resumed
    run mixes as the uninterrupted one would, and a GPU batch is mixed without a device sync."""

    def __init__(self, mixup: float = 0.0, cutmix: float = 0.0, alpha: float = 1.0, num_classes: int = 10) -> None:
        for key, value in (("mixup", mixup), ("cutmix", cutmix)):
            if not (isinstance(value, int | float) and 0 <= value <= 1):
                raise ValueError(f"mix.{key}={value!r} is not valid: it is the probability that a training batch "
                                 "is mixed this way, from 0 (off) to 1.")
        if mixup + cutmix > 1:
            raise ValueError(f"mix.mixup={mixup} and mix.cutmix={cutmix} add up to more than 1: a batch is mixed one "
                             "way or the other, so their probabilities must sum to at most 1 (e.g. 0.5 and 0.5).")
        if not (isinstance(alpha, int | float) and alpha > 0):
            raise ValueError(f"mix.alpha={alpha!r} is not valid: the mixing weights are drawn from Beta(alpha, alpha), "
                             "which needs alpha > 0 (e.g. 1.0: uniform; 0.2: mostly one image).")
        from torchvision.transforms import v2

        self.mixup, self.cutmix = float(mixup), float(cutmix)
        self.transforms = (v2.MixUp(alpha=float(alpha), num_classes=num_classes),
                           v2.CutMix(alpha=float(alpha), num_classes=num_classes))

    def __bool__(self) -> bool:
        return bool(self.mixup or self.cutmix)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        draw = float(torch.rand(()))
        if draw < self.mixup:
            return self.transforms[0](x, y)
        if draw < self.mixup + self.cutmix:
            return self.transforms[1](x, y)
        return x, y


def with_warmup(optimizer: torch.optim.Optimizer, make_scheduler: Any, warmup_epochs: int,
                epochs: Callable[[], int]) -> LRScheduler | None:
    """The scheduler `make_scheduler` builds (a partial, or None for a constant rate), after `warmup_epochs`
    epochs whose rate grows linearly to `lr` (1/(w+1), 2/(w+1), ... of it). A scheduler's `T_max: null` (the
    cosine's) is the epochs after the warmup, so the decay still ends with the last epoch; `epochs()` gives
    the run's epochs then."""
    options = {}
    if make_scheduler is not None and "T_max" in inspect.signature(make_scheduler).parameters \
            and getattr(make_scheduler, "keywords", {}).get("T_max", 0) is None:
        options["T_max"] = max(1, epochs() - warmup_epochs)
    main = make_scheduler(optimizer=optimizer, **options) if make_scheduler is not None else None
    if not warmup_epochs:
        return main
    warmup = LinearLR(optimizer, start_factor=1 / (warmup_epochs + 1), end_factor=1.0, total_iters=warmup_epochs)
    if main is None:
        return warmup
    return SequentialLR(optimizer, [warmup, main], milestones=[warmup_epochs])


def check_techniques(cfg: DictConfig) -> None:
    """ValueError naming the key, unless every technique's settings can work."""
    decay = cfg.ema.decay
    if decay is not None and not (isinstance(decay, float) and 0 < decay < 1):
        raise ValueError(f"ema.decay={decay!r} is not valid: each step keeps this fraction of the average and adds "
                         "the rest of the new weights, so 0 < decay < 1 (e.g. 0.999; null: no averaging).")
    start = cfg.swa.start_epoch
    if start is not None and not (isinstance(start, int) and 1 <= start <= cfg.epochs):
        raise ValueError(f"swa.start_epoch={start!r} is not valid: averaging starts with this epoch of the run's "
                         f"{cfg.epochs}, so give a whole number from 1 to {cfg.epochs} (null: no averaging).")
    if start is not None and decay is not None:
        raise ValueError(f"ema.decay={decay} and swa.start_epoch={start} both average the weights, and a run "
                         "validates and ships one average: choose one of them (set the other to null).")
    smoothing = cfg.label_smoothing
    if not (isinstance(smoothing, int | float) and 0 <= smoothing < 1):
        raise ValueError(f"label_smoothing={smoothing!r} is not valid: it is the probability mass spread over all "
                         "classes in the training targets, 0 <= label_smoothing < 1 (e.g. 0.1; 0: off).")
    warmup = cfg.warmup_epochs
    if not (isinstance(warmup, int) and 0 <= warmup < cfg.epochs):
        raise ValueError(f"warmup_epochs={warmup!r} is not valid: the learning rate grows for this many of the run's "
                         f"{cfg.epochs} epochs and the scheduler needs at least one after them, so give a whole "
                         f"number below {cfg.epochs} (0: no warmup), or more epochs.")
    BatchMix(**cfg.mix)

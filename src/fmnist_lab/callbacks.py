"""Callbacks the configs in `conf/callbacks/` name."""

from __future__ import annotations

import sys
import time

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, RichProgressBar


class EpochLog(Callback):
    """One line per epoch for logs and pipes, where a live progress bar would only add noise."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Validation has run by now (it ends each training epoch), so its metrics are current.
        m = trainer.callback_metrics
        val = "".join(f" {k} {float(m[k]):.4f}" for k in ("val/acc", "val/loss") if k in m)
        print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}:{val} "
              f"({time.perf_counter() - self._start:.1f} s)", flush=True)


def progress(refresh_rate: int = 10) -> Callback:
    """A Rich progress bar on a terminal, one line per epoch otherwise."""
    return RichProgressBar(refresh_rate=refresh_rate) if sys.stdout.isatty() else EpochLog()

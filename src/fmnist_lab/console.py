"""What the person watching a run sees: a line per epoch with a live bar meanwhile on a terminal (EpochProgress,
which conf/callbacks/ builds through `progress`), and the lines of the final result, each also written to the
run's log file."""

from __future__ import annotations

import logging
import math
import os
import sys
import time

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fmnist_lab import logs


def show(line: str, bold: str = "") -> None:
    """A line for the person watching, on stdout (`bold` before it). When stdout's reader has gone (`| head`),
    stdout is pointed at /dev/null and the job goes on: losing the console must not lose the run."""
    if bold:  # bold on a terminal only: a log or pipe gets no escape codes
        line = f"\033[1m{bold}\033[0m  {line}" if sys.stdout.isatty() else f"{bold}  {line}"
    line = logs.LABEL + line
    try:
        print(line, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def to_log_file(line: str) -> None:
    """A line the console already shows as a plain print (an epoch's, the final result), into the run's log file
    alone: straight to the file handlers of Hydra's logging config, whichever hydra/job_logging is chosen."""
    record = logging.LogRecord("fmnist_lab.results", logging.INFO, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


class EpochProgress(ProgressBar):
    """One result line per epoch, "epoch 3/10: val/acc 0.8512 val/loss 0.4100 (1.4 s)", printed and written to
    the run's log file. With `live` (a terminal), a bar of the epoch's training batches shows while the epoch runs
    and is erased when its line is printed, so the terminal keeps one line per epoch; pipes and logs get only the
    lines. The bar is redrawn every `refresh_rate` batches; 0 shows no bar."""

    def __init__(self, refresh_rate: int = 10, live: bool = True) -> None:
        super().__init__()
        self.refresh_rate, self.live = refresh_rate, live and refresh_rate > 0
        self.enabled = True
        self.bar: Progress | None = None
        self.task = None
        self.started = time.perf_counter()

    def disable(self) -> None:  # Lightning's base class disables the bar on every rank but zero
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def epoch_name(self, trainer: pl.Trainer) -> str:
        limit = trainer.max_epochs  # -1 (or None): no epoch limit, so no "/M"
        return f"epoch {trainer.current_epoch + 1}" + (f"/{limit}" if limit not in (None, -1) else "")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = time.perf_counter()  # a resumed mid-epoch run gets no on_train_epoch_start first

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if not (self.live and self.enabled):
            return
        total = self.total_train_batches
        if self.bar is None:  # started at a batch, not the epoch's start: a resumed run may begin mid-epoch
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(), transient=True, auto_refresh=False)
            # no colon after the epoch: the bar never reads like the result line that replaces it
            self.task = self.bar.add_task(self.epoch_name(trainer), total=None if math.isinf(total) else total,
                                          completed=batch_idx)
            self.bar.start()
        done = batch_idx + 1
        if done % self.refresh_rate == 0 or done >= total:
            self.bar.update(self.task, completed=done, refresh=True)

    def stop_bar(self) -> None:
        if self.bar is not None:
            self.bar.stop()  # transient: erased from the terminal
            self.bar = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stop_bar()
        if not (self.enabled and trainer.is_global_zero):  # one line per epoch, not one per DDP process
            return
        # Validation has run by now (it ends each training epoch), so its metrics are current.
        m = trainer.callback_metrics
        val = "".join(f" {k} {float(m[k]):.4f}" for k in ("val/acc", "val/loss") if k in m)
        line = f"{self.epoch_name(trainer)}:{val} ({time.perf_counter() - self.started:.1f} s)"
        show(line)
        to_log_file(line)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.stop_bar()  # hands the terminal back for the error or the "how to resume" message

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.stop_bar()


def progress(refresh_rate: int = 10) -> EpochProgress:
    """One line per epoch; on a terminal also a live bar within each epoch."""
    return EpochProgress(refresh_rate, live=sys.stdout.isatty())

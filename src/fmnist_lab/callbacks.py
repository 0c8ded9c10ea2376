"""Callbacks the configs in `conf/callbacks/` name, and RunStamp and SignalRelay, which every training run has."""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import signal
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fmnist_lab.artifacts import export_onnx, first_images, verify_onnx
from fmnist_lab.data import CLASSES, DeviceLoader
from fmnist_lab.report import CONFUSION_PNG, MISCLASSIFIED_PNG, predict_split, write_report
from fmnist_lab.run_dir import RUN_STAMP

log = logging.getLogger(__name__)


def show(line: str, bold: str = "") -> None:
    """A line for the person watching, on stdout (`bold` before it). When stdout's reader has gone (`| head`),
    stdout is pointed at /dev/null and the job goes on: losing the console must not lose the run."""
    if bold:  # bold on a terminal only: a log or pipe gets no escape codes
        line = f"\033[1m{bold}\033[0m  {line}" if sys.stdout.isatty() else f"{bold}  {line}"
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


class EpochTimer(Callback):
    """Wall time of each training epoch's steps (validation excluded) as `epoch_seconds`, and of the whole fit
    as `train_seconds`, into metrics.json. Both live in every checkpoint, so a resumed run accounts for the
    time of all its sessions (a mid-epoch stop carries the epoch's time so far into the resumed epoch)."""

    def __init__(self) -> None:
        self.metrics: dict = {"epoch_seconds": [], "train_seconds": 0.0}
        self.started: float | None = None  # the running epoch's start
        self.fit_started = time.perf_counter()
        self.earlier = {"train_seconds": 0.0, "epoch_elapsed": 0.0}  # what the checkpoint resumed from carries
        self.restored: dict | None = None

    def now(self, pl_module: pl.LightningModule) -> float:
        if pl_module.device.type == "cuda":  # once per epoch: wait for the queued steps to really finish
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_started = time.perf_counter()
        if self.restored:  # a resumed fit; Lightning also restores callbacks for a test, which must change nothing
            self.metrics["epoch_seconds"] = list(self.restored["epoch_seconds"])
            self.earlier = {k: self.restored[k] for k in ("train_seconds", "epoch_elapsed")}
            self.restored = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.earlier["epoch_elapsed"]:  # resumed mid-epoch: no on_train_epoch_start comes first
            self.started = self.now(pl_module) - self.earlier["epoch_elapsed"]

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = self.now(pl_module)

    def stop(self, pl_module: pl.LightningModule) -> None:
        if self.started is not None:
            self.metrics["epoch_seconds"].append(round(self.now(pl_module) - self.started, 4))
            self.started = None

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.stop(pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stop(pl_module)  # epochs without validation

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.metrics["train_seconds"] = round(self.earlier["train_seconds"] + time.perf_counter() - self.fit_started, 3)

    def state_dict(self) -> dict:
        now = time.perf_counter()
        return {"epoch_seconds": list(self.metrics["epoch_seconds"]),
                "train_seconds": self.earlier["train_seconds"] + now - self.fit_started,
                "epoch_elapsed": now - self.started if self.started is not None else 0.0}

    def load_state_dict(self, state_dict: dict) -> None:
        self.restored = state_dict


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, except that the state it keeps in every checkpoint names its files relative
    to its folder. A run copied or moved elsewhere then resumes with the checkpoints in its own folder and
    knows which of them is best (Lightning's state holds absolute paths, and where its folder has changed it
    forgets the best score, so a worse epoch could overwrite best.ckpt)."""

    PATHS = ("best_model_path", "kth_best_model_path", "last_model_path")

    def state_dict(self) -> dict:
        state = super().state_dict()
        folder = Path(self.dirpath)

        def relative(path: str) -> str:
            return Path(path).relative_to(folder).as_posix() if path and Path(path).is_relative_to(folder) else path

        state.update({key: relative(state[key]) for key in self.PATHS})
        state["best_k_models"] = {relative(k): v for k, v in state["best_k_models"].items()}
        state["dirpath"] = "."
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        folder, saved = Path(self.dirpath), Path(state_dict.get("dirpath") or ".")

        def here(path: str) -> str:  # relative names, and absolute ones under the folder it was saved from
            if not path:
                return path
            path = Path(path)
            if path.is_absolute():
                return str(folder / path.relative_to(saved)) if path.is_relative_to(saved) else str(path)
            return str(folder / path)

        state = {**state_dict, "dirpath": self.dirpath, **{key: here(state_dict.get(key, "")) for key in self.PATHS}}
        state["best_k_models"] = {here(k): v for k, v in state_dict.get("best_k_models", {}).items()}
        super().load_state_dict(state)


class SaveOnInterrupt(Callback):
    """SIGTERM (or a first Ctrl-C, which the job turns into one) during training: save `last.ckpt` where training
    stopped, at the end of a batch, and say how to resume. A second Ctrl-C stops anywhere inside a step, where
    no checkpoint would resume exactly: the last end-of-epoch last.ckpt stands."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt | SIGTERMException) or trainer.state.fn != "fit":
            return
        path = self.dirpath / "last.ckpt"
        resume = f"Continue with: python -m fmnist_lab resume={self.dirpath.parent}"
        if isinstance(exception, KeyboardInterrupt):
            kept = f"{path} from the end of the last epoch is kept" if path.is_file() else "no epoch ended yet"
            print(f"\nStopped at once at step {trainer.global_step}, inside a training step; {kept}.\n"
                  + (resume if path.is_file() else ""), file=sys.stderr, flush=True)
            return
        if trainer.world_size > 1:  # saving is collective and the other ranks may be gone: resume from the
            return                  # last epoch's last.ckpt instead
        trainer.save_checkpoint(path)
        print(f"\nInterrupted at step {trainer.global_step} (epoch {trainer.current_epoch + 1}); saved {path}.\n"
              f"{resume}", file=sys.stderr, flush=True)


class RunStamp(Callback):
    """Every checkpoint says which run wrote it (the hash of the run's config), so that resume takes only the
    run's own (run_dir.RunDir.resume_point)."""

    def __init__(self, identity: str) -> None:
        self.identity = identity

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint[RUN_STAMP] = {"config": self.identity}


class SignalRelay(Callback):
    """A SIGTERM or Ctrl-C that the job noted while it was setting up, before Lightning took SIGTERM over, is
    sent again as training starts: training then stops after its first batch instead of running to the end."""

    def __init__(self, noted: list[int]) -> None:
        self.noted = noted

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.noted and not trainer.received_sigterm:
            signal.raise_signal(signal.SIGTERM)


def progress(refresh_rate: int = 10) -> EpochProgress:
    """One line per epoch; on a terminal also a live bar within each epoch."""
    return EpochProgress(refresh_rate, live=sys.stdout.isatty())


class OnnxExport(Callback):
    """After testing, export the tested network (the best checkpoint) to ONNX and verify it.

    The file is self-contained, CPU float32, with a dynamic batch axis: input `image` [N, 1, 28, 28] in [0, 1]
    (normalization is inside the graph), output `logits` [N, 10]. Verification runs `onnx.checker` and compares
    ONNX Runtime with PyTorch on real test images at batch sizes 1 and 256. The result lands in `metrics`
    (and so in metrics.json); a failure is `error` (the run fails after writing its metrics) unless
    `strict=False`, which only warns.
    """

    def __init__(self, path: str, strict: bool = True, atol: float = 1e-4, opset: int | None = None) -> None:
        self.path, self.strict, self.atol, self.opset = Path(path), strict, atol, opset
        self.metrics: dict = {}
        self.files: list[Path] = []  # what it wrote, for loggers that keep a run's files (MLflow)
        self.error: str | None = None

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        net = copy.deepcopy(pl_module.net).float().cpu().eval()
        images = first_images(trainer.datamodule.test_dataloader(), 256)
        test_acc = trainer.callback_metrics.get("test/acc")
        export_onnx(net, self.path, {"test_acc": f"{float(test_acc):.4f}" if test_acc is not None else "unknown"},
                    self.opset)
        result = verify_onnx(net, self.path, images, self.atol)
        self.files = [self.path]
        self.metrics = {"onnx": result}
        if not result["ok"]:
            message = (f"ONNX verification failed for {self.path}: {result['problem']}. The checkpoints are "
                       "intact; set callbacks.onnx_export.strict=false to keep the run with a warning instead.")
            if result.get("diverged"):  # the export is faithful; training is not
                message = (f"Training diverged: {result['problem']}. The export itself ({self.path}) is not the "
                           "cause; the checkpoints are intact.")
            if self.strict:
                self.error = message
            else:
                warnings.warn(message, stacklevel=1)


class RunReport(Callback):
    """After testing, score the tested network (the best checkpoint) on the whole test split: per-class accuracy,
    macro F1 and expected calibration error go to `metrics` (and so metrics.json), confusion_matrix.png and
    misclassified.png to `dirpath`; the loggers get the per-class accuracies as `test/acc_<class>` scalars, and
    TensorBoard the two figures (its images tab). A logger that fails costs a warning: the files have it all."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.metrics: dict = {}
        self.files: list[Path] = []

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        data, step = trainer.datamodule, trainer.global_step
        # Not data.test_dataloader(): under DDP that is this rank's shard, and the report is of every test image.
        loader = DeviceLoader(lambda: data.tensors("test"), data.eval_batch_size)
        logits, labels, images = predict_split(pl_module.net, loader, pl_module.device)

        def warn(logger, err: Exception) -> None:
            log.warning(f"{type(logger).__name__} could not record the test report ({type(err).__name__}: {err}); "
                        f"metrics.json and the PNG files in {self.dirpath} have it.")

        summary = write_report(self.dirpath, logits, labels, images, CLASSES)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                try:  # the PNG files' pixels: drawing the figures again would double the cost
                    for name in (CONFUSION_PNG, MISCLASSIFIED_PNG):
                        with Image.open(self.dirpath / name) as png:
                            pixels = np.asarray(png.convert("RGB"))
                        logger.experiment.add_image(f"test/{Path(name).stem}", pixels, step, dataformats="HWC")
                except Exception as err:
                    warn(logger, err)
        self.metrics = {key: summary[key] for key in ("test/per_class_acc", "test/macro_f1", "test/ece")}
        self.files = [self.dirpath / CONFUSION_PNG, self.dirpath / MISCLASSIFIED_PNG]
        scalars = {f"test/acc_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}": acc  # "/" nests a tag; spaces are not allowed
                   for name, acc in summary["test/per_class_acc"].items()}
        for logger in trainer.loggers:
            try:
                logger.log_metrics(scalars, step=step)
            except Exception as err:
                warn(logger, err)

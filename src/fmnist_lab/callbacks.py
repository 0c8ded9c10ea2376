"""Callbacks that add to a run's results, and FitTimer, which every training run has. A callback that adds to a
run's results is a `RunResults`: that is the one way into metrics.json and the list of the run's files."""

from __future__ import annotations

import copy
import logging
import re
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from fmnist_lab.artifacts import export_onnx, first_images, verify_onnx

# conf/callbacks/ and the configs that earlier runs saved name these as fmnist_lab.callbacks.<name>
from fmnist_lab.checkpoint_callbacks import RunCheckpoint, SaveOnInterrupt  # noqa: F401
from fmnist_lab.console import progress  # noqa: F401
from fmnist_lab.data import CLASSES, DeviceLoader
from fmnist_lab.report import CONFUSION_PNG, MISCLASSIFIED_PNG, predict_split, write_report
from fmnist_lab.run_dir import RunDir

log = logging.getLogger(__name__)


class RunResults(Callback):
    """A callback that adds to a run's results. Once the run is tested, `fmnist_lab.train` takes `metrics` into
    metrics.json (a key has one writer: two callbacks, or a callback and the run itself, never give the same
    key), hands `files` to the loggers that keep a run's files (MLflow), and fails the run with `error`, if one
    is set, after metrics.json is written."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, Any] = {}
        self.files: list[Path] = []
        self.error: str | None = None


class FitTimer(Callback):
    """Wall time of the whole fit, `train_seconds` in metrics.json, over every session of a resumed run (the time
    so far lives in each checkpoint). Every training run has it (fmnist_lab.train)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.earlier = 0.0  # the time of the sessions before the checkpoint the fit resumed from
        self.seconds = 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds = round(self.earlier + time.perf_counter() - self.started, 3)

    def state_dict(self) -> dict:
        return {"train_seconds": self.earlier + time.perf_counter() - self.started}

    def load_state_dict(self, state_dict: dict) -> None:
        self.earlier = float(state_dict.get("train_seconds", 0.0))


class EpochTimer(RunResults):
    """Wall time of each training epoch's steps (validation excluded), `epoch_seconds` in metrics.json. It lives in
    every checkpoint, so a resumed run keeps the epochs of all its sessions (a mid-epoch stop carries the epoch's
    time so far into the resumed epoch)."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics = {"epoch_seconds": []}
        self.started: float | None = None  # the running epoch's start
        self.epoch_elapsed = 0.0  # of the epoch the checkpoint resumed from
        self.restored: dict | None = None

    def clock(self, pl_module: pl.LightningModule) -> float:
        if pl_module.device.type == "cuda":  # once per epoch: wait for the queued steps to really finish
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.restored:  # a resumed fit; Lightning also restores callbacks for a test, which must change nothing
            self.metrics["epoch_seconds"] = list(self.restored["epoch_seconds"])
            self.epoch_elapsed = self.restored["epoch_elapsed"]
            self.restored = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.epoch_elapsed:  # resumed mid-epoch: no on_train_epoch_start comes first
            self.started = self.clock(pl_module) - self.epoch_elapsed

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = self.clock(pl_module)

    def stop(self, pl_module: pl.LightningModule) -> None:
        if self.started is not None:
            self.metrics["epoch_seconds"].append(round(self.clock(pl_module) - self.started, 4))
            self.started = None

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.stop(pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stop(pl_module)  # epochs without validation

    def state_dict(self) -> dict:
        return {"epoch_seconds": list(self.metrics["epoch_seconds"]),
                "epoch_elapsed": time.perf_counter() - self.started if self.started is not None else 0.0}

    def load_state_dict(self, state_dict: dict) -> None:
        self.restored = state_dict


class OnnxExport(RunResults):
    """After testing, export the tested network (the best checkpoint) to ONNX and verify it.

    The file is self-contained, CPU float32, with a dynamic batch axis: input `image` [N, 1, 28, 28] in [0, 1]
    (normalization is inside the graph), output `logits` [N, 10]. Verification runs `onnx.checker` and compares
    ONNX Runtime with PyTorch on real test images at batch sizes 1 and 256. The result lands in `metrics`
    (and so in metrics.json); a failure is `error` (the run fails after writing its metrics) unless
    `strict=False`, which only warns.
    """

    def __init__(self, run_dir: str | None = None, strict: bool = True, atol: float = 1e-4, opset: int | None = None,
                 path: str | None = None) -> None:
        """`path`: where to write the file instead of the run's model.onnx (configs saved by earlier runs give it)."""
        super().__init__()
        self.path = Path(path) if path is not None else RunDir(str(run_dir)).onnx
        self.strict, self.atol, self.opset = strict, atol, opset

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        net = copy.deepcopy(pl_module.shipped()).float().cpu().eval()
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


class RunReport(RunResults):
    """After testing, score the tested network (the best checkpoint) on the whole test split: per-class accuracy,
    macro F1 and expected calibration error go to `metrics` (and so metrics.json), confusion_matrix.png and
    misclassified.png to `dirpath`; the loggers get the per-class accuracies as `test/acc_<class>` scalars, and
    TensorBoard the two figures (its images tab). A logger that fails costs a warning: the files have it all."""

    def __init__(self, run_dir: str | None = None, dirpath: str | None = None) -> None:
        """`dirpath`: the folder of the figures, as configs saved by earlier runs give it instead of `run_dir`."""
        super().__init__()
        self.dirpath = Path(str(run_dir if run_dir is not None else dirpath))

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        data, step = trainer.datamodule, trainer.global_step
        # Not data.test_dataloader(): under DDP that is this rank's shard, and the report is of every test image.
        loader = DeviceLoader(lambda: data.tensors("test"), data.eval_batch_size)
        logits, labels, images = predict_split(pl_module.shipped(), loader, pl_module.device)

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

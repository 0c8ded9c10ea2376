"""Callbacks the configs in `conf/callbacks/` name."""

from __future__ import annotations

import copy
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException

from fmnist_lab.artifacts import export_onnx, first_images, verify_onnx


class EpochLog(Callback):
    """One line per epoch for logs and pipes, where a live progress bar would only add noise."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = time.perf_counter()  # a resumed mid-epoch run gets no on_train_epoch_start first

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:  # one line per epoch, not one per DDP process
            return
        # Validation has run by now (it ends each training epoch), so its metrics are current.
        m = trainer.callback_metrics
        val = "".join(f" {k} {float(m[k]):.4f}" for k in ("val/acc", "val/loss") if k in m)
        print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}:{val} "
              f"({time.perf_counter() - self.started:.1f} s)", flush=True)


class EpochTimer(Callback):
    """Wall time of each training epoch's steps (validation excluded), into metrics.json as `epoch_seconds`."""

    def __init__(self) -> None:
        self.metrics: dict = {"epoch_seconds": []}
        self.started: float | None = None

    def now(self, pl_module: pl.LightningModule) -> float:
        if pl_module.device.type == "cuda":  # once per epoch: wait for the queued steps to really finish
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

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


class SaveOnInterrupt(Callback):
    """Ctrl-C or SIGTERM during training: save `last.ckpt` where training stopped, say how to resume."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt | SIGTERMException) or trainer.state.fn != "fit":
            return
        if trainer.world_size > 1:  # saving is collective and the other ranks may be gone: resume from the
            return                  # epoch's (or trainer.ckpt_every_n_steps') last.ckpt instead
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        print(f"\nInterrupted at step {trainer.global_step} (epoch {trainer.current_epoch + 1}); saved {path}.\n"
              f"Continue with: python -m fmnist_lab resume={self.dirpath.parent}", file=sys.stderr, flush=True)


def progress(refresh_rate: int = 10) -> Callback:
    """A Rich progress bar on a terminal, one line per epoch otherwise."""
    return RichProgressBar(refresh_rate=refresh_rate) if sys.stdout.isatty() else EpochLog()


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
        self.metrics = {"onnx": result}
        if not result["ok"]:
            message = (f"ONNX verification failed for {self.path}: {result['problem']}. The checkpoints are "
                       "intact; set callbacks.onnx_export.strict=false to keep the run with a warning instead.")
            if self.strict:
                self.error = message
            else:
                warnings.warn(message, stacklevel=1)

"""Callbacks the configs in `conf/callbacks/` name."""

from __future__ import annotations

import copy
import json
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

import fmnist_lab
from fmnist_lab.data import CLASSES
from fmnist_lab.files import atomic_write
from fmnist_lab.model import INPUT_DESCRIPTION


class EpochLog(Callback):
    """One line per epoch for logs and pipes, where a live progress bar would only add noise."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()  # a resumed mid-epoch run gets no on_train_epoch_start first

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:  # one line per epoch, not one per DDP process
            return
        # Validation has run by now (it ends each training epoch), so its metrics are current.
        m = trainer.callback_metrics
        val = "".join(f" {k} {float(m[k]):.4f}" for k in ("val/acc", "val/loss") if k in m)
        print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}:{val} "
              f"({time.perf_counter() - self._start:.1f} s)", flush=True)


class EpochTimer(Callback):
    """Wall time of each training epoch's steps (validation excluded), into metrics.json as `epoch_seconds`."""

    def __init__(self) -> None:
        self.metrics: dict = {"epoch_seconds": []}
        self._start: float | None = None

    def _now(self, pl_module: pl.LightningModule) -> float:
        if pl_module.device.type == "cuda":  # once per epoch: wait for the queued steps to really finish
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = self._now(pl_module)

    def _stop(self, pl_module: pl.LightningModule) -> None:
        if self._start is not None:
            self.metrics["epoch_seconds"].append(round(self._now(pl_module) - self._start, 4))
            self._start = None

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._stop(pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop(pl_module)  # epochs without validation


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints go to a temporary file that is renamed into place: a kill in the middle of a save never
    leaves a truncated last.ckpt (Lightning's own save writes the final path directly)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(path), lambda tmp: torch.save(checkpoint, tmp))


class StepCheckpoint(Callback):
    """`last.ckpt` also every `every_n_steps` optimizer steps (0: never), for long epochs. One Lightning batch
    may hold several steps (`data.group_batches`), so it saves when a multiple of n has been passed, where
    ModelCheckpoint(every_n_train_steps=n) would wait for an exact multiple that a group can skip."""

    def __init__(self, dirpath: str, every_n_steps: int = 0) -> None:
        self.path, self.every_n_steps, self._saved_at = Path(dirpath) / "last.ckpt", every_n_steps, 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._saved_at = trainer.global_step  # a resumed run starts counting where it was saved

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        n = self.every_n_steps
        if n and trainer.global_step // n > self._saved_at // n:
            trainer.save_checkpoint(self.path)
            self._saved_at = trainer.global_step


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


def first_images(loader, count: int) -> torch.Tensor:
    """The first `count` images a loader yields, as CPU float32."""
    batches, total = [], 0
    for x, _ in loader:
        batches.append(x.cpu().float())
        total += len(x)
        if total >= count:
            break
    return torch.cat(batches)[:count]


def export_onnx(net: torch.nn.Module, path: Path, extra_metadata: dict[str, str], opset: int | None = None) -> None:
    import onnx  # here, not at the top: runs without the export never load it

    example = torch.rand(2, 1, 28, 28)
    program = torch.onnx.export(net, (example,), dynamo=True, input_names=["image"], output_names=["logits"],
                                dynamic_shapes={"x": {0: "batch"}}, external_data=False, opset_version=opset,
                                verbose=False)
    proto = program.model_proto
    metadata = {"classes": json.dumps(list(CLASSES)), "input": INPUT_DESCRIPTION,
                "output": "logits [N, 10]; softmax gives class probabilities",
                "fmnist_lab_version": fmnist_lab.__version__, **extra_metadata}
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    atomic_write(path, lambda tmp: onnx.save_model(proto, str(tmp), save_as_external_data=False))


def verify_onnx(net: torch.nn.Module, path: Path, images: torch.Tensor, atol: float = 1e-4) -> dict:
    import onnx
    import onnxruntime as ort

    result: dict = {"path": str(path), "checker": False, "max_abs_diff": None, "argmax_equal": False,
                    "batch_sizes": [1, len(images)], "atol": atol, "ok": False, "problem": None}
    try:
        onnx.checker.check_model(str(path), full_check=True)
        result["checker"] = True
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        diffs, same = [], True
        for batch in (images[:1], images):
            with torch.no_grad():
                expected = net(batch).numpy()
            (got,) = session.run(["logits"], {"image": batch.numpy()})
            diffs.append(float(abs(got - expected).max()))
            same &= bool((got.argmax(1) == expected.argmax(1)).all())
        result.update(max_abs_diff=max(diffs), argmax_equal=same)
        if max(diffs) > atol or not same:
            result["problem"] = f"max |logit difference| {max(diffs):.2e} (allowed {atol:.0e}), argmax equal: {same}"
    except Exception as err:  # a checker or runtime failure is a verification result, reported the same way
        result["problem"] = f"{type(err).__name__}: {err}"
    result["ok"] = result["problem"] is None
    return result

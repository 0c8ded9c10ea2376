"""Callbacks that keep a run resumable: checkpoints that name their files relative to the run (RunCheckpoint) and
say which run wrote them (RunStamp), and a checkpoint where a signal stopped training (SaveOnInterrupt, with
SignalRelay for a signal that came before training started)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from fmnist_lab.run_dir import RUN_STAMP, RunDir


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, except that the state it keeps in every checkpoint names its files relative
    to its folder. A run copied or moved elsewhere then resumes with the checkpoints in its own folder and
    knows which of them is best (Lightning's state holds absolute paths, and where its folder has changed it
    forgets the best score, so a worse epoch could overwrite best.ckpt)."""

    PATHS = ("best_model_path", "kth_best_model_path", "last_model_path")

    def __init__(self, run_dir: str | None = None, keep: str = "best", **options: Any) -> None:
        """keep=best: the epoch with the best monitored value, as checkpoints/best.ckpt; keep=last: the end of
        every epoch, as checkpoints/last.ckpt (the file names are RunDir's). Without `run_dir`, ModelCheckpoint's
        own dirpath and filename (as configs saved by earlier runs give them)."""
        if run_dir is not None:
            path = RunDir(run_dir).best if keep == "best" else RunDir(run_dir).last
            options.update(dirpath=str(path.parent), filename=path.stem)
        super().__init__(**options)

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

    def __init__(self, run_dir: str | None = None, dirpath: str | None = None) -> None:
        """`dirpath`: the checkpoint folder, as configs saved by earlier runs give it instead of `run_dir`."""
        self.run = RunDir(run_dir if run_dir is not None else Path(str(dirpath)).parent)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt | SIGTERMException) or trainer.state.fn != "fit":
            return
        path = self.run.last
        resume = f"Continue with: python -m fmnist_lab resume={self.run.path}"
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

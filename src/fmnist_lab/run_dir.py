"""A run's directory: the names of the files a run writes, metrics.json and its failure marks, the point a
stopped run resumes from, which run `resume=` names, and atomic writes (a kill never leaves half a file).

Nothing else in fmnist_lab spells out a run's file names; conf/ only passes the checkpoint folder and the
ONNX path to the callbacks that write them.
"""

from __future__ import annotations

import errno
import io
import itertools
import json
import os
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any


def is_rank_zero() -> bool:
    """False in the other processes of a multi-process job (SLURM tasks, torchrun or Lightning's DDP ranks),
    which train along but leave the job's files to rank zero."""
    return all(int(os.environ.get(k, 0)) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


class ResumeError(RuntimeError):
    """A run cannot be continued: no checkpoint, or a damaged one."""


class BadFileError(ValueError):
    """A file of a run or a model that cannot be used (damaged, not what it should be, or not fmnist_lab's);
    the message names the file and says why."""


def read_json(path: Path) -> Any:
    """A JSON file of a run or a model (metrics.json, model.json); BadFileError naming it when it is damaged."""
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadFileError(f"{path} is damaged: it is not valid JSON ({err}). Restore it from a copy, or, for "
                             "a run's metrics.json, delete it and continue the run with resume=<run dir>.") from err


class Interrupted(Exception):
    """A signal (SIGTERM, Ctrl-C) stopped the run at some phase; metrics.json says so and `resume=` finishes
    the run. `exit_code` is what a process killed by that signal returns (143, 130)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` for a temporary file beside `path`, then rename it into place (atomic on POSIX). When
    the write fails (a full disk), the temporary file goes and `path` keeps its last good version."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(path)) from err  # the file meant, not the temporary one
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_torch(obj: Any, path: Path) -> Path:
    """torch.save, atomically. Serialized in memory first and written in one go, so that a full disk is an
    OSError (ENOSPC) naming the file, where torch's own file writer only reports a position mismatch."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()))


class RunDirError(OSError):
    """The run directory cannot be written (read-only, full); the message names the path and what to do."""


def describe_write_error(err: OSError, run: Path) -> str:
    """One paragraph for an OSError met while writing a run's files."""
    path = err.filename or run
    what = "no space left on device" if err.errno == errno.ENOSPC else \
        "not writable" if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else err.strerror or str(err)
    return (f"Cannot write {path}: {what}. The run stopped; its last good checkpoint in {run / 'checkpoints'} "
            "is intact (files are written to a temporary name first). Free space or choose another folder "
            f"(paths.log_dir=...), then continue with: python -m fmnist_lab resume={run}")


def write_json(path: Path, data: dict) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


class RunDir:
    """The files of one run (Hydra's run directory, or one job's folder in a sweep)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.last, self.best = self.checkpoints / "last.ckpt", self.checkpoints / "best.ckpt"
        self.metrics = self.path / "metrics.json"
        self.weights, self.model_json = self.path / "model_weights.pth", self.path / "model.json"
        self.tensorboard = self.path / "tensorboard"
        self.hydra = self.path / ".hydra"  # Hydra's record: config.yaml, overrides.yaml, hydra.yaml (group choices)
        self.config, self.overrides = self.hydra / "config.yaml", self.hydra / "overrides.yaml"
        self.hydra_config = self.hydra / "hydra.yaml"
        self.mlflow = self.path / "mlflow.json"  # logger=mlflow: the MLflow run this run logs into
        self.lr_find_png, self.lr_find_json = self.path / "lr_find.png", self.path / "lr_find.json"

    def relative(self, path: str | None) -> str | None:
        """`path` as metrics.json records it: relative to the run, so a copied or moved run still finds it."""
        if not path:
            return None
        return Path(path).relative_to(self.path).as_posix() if Path(path).is_relative_to(self.path) else str(path)

    def read_metrics(self) -> dict[str, Any]:
        return read_json(self.metrics) if self.metrics.is_file() else {}

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        write_json(self.metrics, metrics)

    def mark_failed(self, err: BaseException) -> None:
        """metrics.json says the run failed and why, keeping whatever the run measured before."""
        self.update(status="failed", error=f"{type(err).__name__}: {err}")

    def mark_interrupted(self, how: str, step: int, epochs: int, **context: Any) -> None:
        """metrics.json says the run was stopped by a signal (so it is not finished), keeping what it measured."""
        self.update(status="interrupted", error=f"{how} at step {step}", epochs=epochs, global_step=step, **context)

    def update(self, **fields: Any) -> None:
        """Add `fields` to metrics.json (a status and its error, how far an unfinished run got), keeping the rest."""
        try:
            self.write_metrics({**self.read_metrics(), **fields})
        except (BadFileError, OSError):  # damaged, or the disk is full: the file stays as it was
            pass

    def check_writable(self) -> None:
        """RunDirError before any work when the run directory cannot take files."""
        probe = self.path / f".write-check-{os.getpid()}"  # one per process: DDP ranks check at once
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"fmnist_lab")
            probe.unlink()
        except OSError as err:
            probe.unlink(missing_ok=True)
            raise RunDirError(err.errno, f"{self.path} is not writable ({err.strerror}): a run writes its "
                              "checkpoints and results there. Choose another folder with paths.log_dir=... or "
                              "hydra.run.dir=..., or fix its permissions.") from err

    def load_config(self) -> Any:
        """The run's resolved config (.hydra/config.yaml); BadFileError naming it when it is damaged."""
        from omegaconf import DictConfig, OmegaConf

        try:
            config = OmegaConf.load(self.config)
        except Exception as err:  # YAML and OmegaConf errors share no public base class
            raise BadFileError(f"{self.config} is damaged ({type(err).__name__}); the run cannot be continued or "
                               "re-evaluated from its config. Restore the file, or start a new run.") from err
        if not isinstance(config, DictConfig):
            raise BadFileError(f"{self.config} is damaged: it holds no config mapping.")
        return config

    def finished(self) -> dict[str, Any]:
        """The metrics of a run that ended well, else {} (no metrics.json, or a failed or interrupted run)."""
        metrics = self.read_metrics()
        return metrics if metrics and metrics.get("status", "ok") == "ok" else {}

    def model_file(self) -> Path | None:
        """The file that holds the run's trained network: the tested weights, else the best or last checkpoint."""
        return next((f for f in (self.weights, self.best, self.last) if f.is_file()), None)

    def resume_point(self) -> tuple[Path, int]:
        """checkpoints/last.ckpt of an unfinished run and its global step; a clear error if there is none."""
        if not self.last.is_file():
            raise ResumeError(f"resume: {self.path} has no checkpoints/last.ckpt (it stopped before its first "
                              "checkpoint), so there is nothing to continue; start a new run with the same overrides "
                              "instead.")
        import torch  # here: the CLI reads this module before it imports torch

        try:
            return self.last, int(torch.load(self.last, map_location="cpu", weights_only=True)["global_step"])
        except Exception as err:
            raise ResumeError(f"resume: {self.last} cannot be read ({type(err).__name__}: {err}). It is damaged; "
                              "checkpoints/best.ckpt may still be intact, or start a new run.") from err


def find_run(resume: str, log_dir: str) -> Path | None:
    """The run directory that `resume` names (`latest`: the newest run under log_dir), or None."""
    if resume == "latest":  # run folders are named <date>/<time>, so the name order is the start order
        runs = sorted(p.parent.parent for p in Path(log_dir).glob("*/*/checkpoints/last.ckpt"))
        return runs[-1].resolve() if runs else None
    return Path(resume).resolve() if RunDir(resume).config.is_file() else None


def run_dir(resume: str | None, log_dir: str, fresh: str) -> str:
    """Hydra's run directory (the `run_dir` resolver): the run that `resume` names, else a new
    `<log_dir>/<date>/<time>` (also when `resume` names nothing: `validate` then stops with the error, which
    a resolver could only print as a traceback)."""
    found = find_run(resume, log_dir) if resume is not None else None
    return str(found) if found else unique_dir(f"{log_dir}/{fresh}")


CLAIMED: dict[str, str] = {}  # base name -> the directory this process created for it


def unique_dir(base: str) -> str:
    """`base`, else `base_1`, `base_2`, ...: the first that this process creates itself, so runs (or sweeps)
    started in the same second from the same folder never share a directory (os.mkdir either creates or fails,
    atomically). Asked again, the same process gets the same directory."""
    if base not in CLAIMED:
        try:
            Path(base).parent.mkdir(parents=True, exist_ok=True)
            for n in itertools.count():
                candidate = base if n == 0 else f"{base}_{n}"
                try:
                    os.mkdir(candidate)
                except FileExistsError:
                    continue
                CLAIMED[base] = candidate
                break
        except OSError as err:  # Hydra asks before any fmnist_lab code runs: say it here, and stop
            print(f"error: cannot create the run folder {base}: {err.strerror}. Choose a writable place with "
                  "paths.log_dir=... (or hydra.run.dir=...).", file=sys.stderr)
            raise SystemExit(1) from err
    return CLAIMED[base]


def config_subdir(resume: str | None) -> str:
    """Where Hydra saves the config: a resumed run keeps the original `.hydra/` and adds its own below it."""
    return ".hydra" if resume is None else f".hydra/resumed-{datetime.now():%Y-%m-%d_%H-%M-%S}"

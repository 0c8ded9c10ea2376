"""A run's directory: the names of the files a run writes, metrics.json and its failure marks, the point a
stopped run resumes from, its one writer, and atomic writes (a kill never leaves half a file).

Nothing else in fmnist_lab spells out a run's file names: conf/ passes the run folder to the callbacks that
write into it, and they take their files' names from here (the report names its own figures, which
`fmnist_lab.evaluate` also writes elsewhere).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

# BadFileError and read_json are imported from here by every reader of a run's files
from fmnist_lab.untrusted import (  # noqa: F401
    BadFileError,
    check_yaml,
    open_regular,
    read_json,
    read_text,
    unsafe_interpolations,
)


def is_rank_zero() -> bool:
    """False in the other processes of a multi-process job (SLURM tasks, torchrun or Lightning's DDP ranks),
    which train along but leave the job's files to rank zero."""
    return all(int(os.environ.get(k, 0)) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


class ResumeError(RuntimeError):
    """A run cannot be continued: no checkpoint, or a damaged one."""


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


class RunBusyError(RuntimeError):
    """Another live process writes the run directory; nothing was done to it."""


WRITING: dict[Path, int] = {}  # run directory -> the file descriptor of its writer lock, while this process holds it


class RunDirError(OSError):
    """The run directory cannot be written (read-only, full); the message names the path and what to do."""


def describe_write_error(err: OSError, run: Path) -> str:
    """One paragraph for an OSError met while writing a run's files."""
    path = err.filename or run
    what = "no space left on device" if err.errno == errno.ENOSPC else \
        "not writable" if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else err.strerror or str(err)
    return (f"Cannot write {path}: {what}. The run stopped; {RunDir(run).kept()} Free space or choose another "
            "folder (paths.log_dir=...), then " + ("continue with: python -m fmnist_lab resume=" f"{run}"
                                                    if RunDir(run).last.is_file() else "start it again."))


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
        self.onnx = self.path / "model.onnx"
        self.tensorboard = self.path / "tensorboard"
        self.hydra = self.path / ".hydra"  # Hydra's record: config.yaml, overrides.yaml, hydra.yaml (group choices)
        self.config, self.overrides = self.hydra / "config.yaml", self.hydra / "overrides.yaml"
        self.hydra_config = self.hydra / "hydra.yaml"
        self.mlflow = self.path / "mlflow.json"  # logger=mlflow: the MLflow run this run logs into
        self.lr_find_png, self.lr_find_json = self.path / "lr_find.png", self.path / "lr_find.json"
        self.writer_lock = self.path / ".writer.lock"  # flock'ed by the one process writing the run, with its pid

    def writer(self) -> int | None:
        """The pid of the live process that writes this run (this one included), else None. Creates nothing."""
        try:
            fd = os.open(self.writer_lock, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # granted: nobody holds it exclusively
            return None
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1  # -1: held, by a process that has not written its pid yet
        except OSError:
            return None
        finally:
            os.close(fd)

    def busy_message(self, pid: int | None) -> str:
        who = f"process {pid}" if pid and pid > 0 else "another process"
        return (f"{self.path} is being written by {who}, a run or sweep job that is still going; a run folder has "
                f"one writer at a time, so nothing was done to it. Wait for it to end (python -m fmnist_lab.runs "
                f"shows it as running), or stop it{f' (kill {pid})' if pid and pid > 0 else ''} and then continue "
                f"it with: python -m fmnist_lab resume={self.path}")

    @contextmanager
    def writing(self) -> Iterator[None]:
        """This process is the run's one writer while the block runs; RunBusyError, before anything is written,
        when a live process is already. The lock (flock) goes with the process however it ends, even killed."""
        key = self.path.resolve()
        if key in WRITING:  # this process holds it already
            yield
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.writer_lock, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o644)
        except OSError as err:
            raise RunDirError(err.errno, f"{self.path} is not writable ({err.strerror}): a run writes its "
                              "checkpoints and results there. Choose another folder with paths.log_dir=... or "
                              "hydra.run.dir=..., or fix its permissions.") from err
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise RunBusyError(f"{self.writer_lock} is not a regular file; remove it, then start again.")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunBusyError(self.busy_message(self.writer())) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        WRITING[key] = fd
        try:
            yield
        finally:
            del WRITING[key]
            os.close(fd)  # releases the lock

    def relative(self, path: str | None) -> str | None:
        """`path` as metrics.json records it: relative to the run, so a copied or moved run still finds it."""
        if not path:
            return None
        return Path(path).relative_to(self.path).as_posix() if Path(path).is_relative_to(self.path) else str(path)

    def read_metrics(self) -> dict[str, Any]:
        """metrics.json, {} when there is none; BadFileError when it is damaged, not a file, or no mapping."""
        if not self.metrics.exists():
            return {}
        metrics = read_json(self.metrics)  # a FIFO or a folder there: BadFileError, never a wait
        if not isinstance(metrics, dict):
            raise BadFileError(f"{self.metrics} is damaged: it holds no mapping of metrics. Delete it and continue "
                               f"the run with: python -m fmnist_lab resume={self.path}")
        return metrics

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        write_json(self.metrics, metrics)

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
            with suppress(OSError):  # the name may be what is wrong (too long): unlink fails the same way
                probe.unlink()
            what = "is not writable" if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else "cannot be created"
            raise RunDirError(err.errno, f"{self.path} {what} ({err.strerror}): a run writes its checkpoints and "
                              "results there. Choose another folder with paths.log_dir=... or hydra.run.dir=..., or "
                              "fix its permissions.") from err

    def load_config(self) -> Any:
        """The run's saved config (.hydra/config.yaml), read as an untrusted file: BadFileError naming it when it
        is damaged, a FIFO, huge, uses YAML aliases, or has interpolations other than key references and
        side-effect-free resolvers (fmnist_lab.untrusted)."""
        from omegaconf import DictConfig, OmegaConf

        text = read_text(self.config)
        check_yaml(text, self.config)
        try:
            config = OmegaConf.create(text)
        except Exception as err:  # YAML and OmegaConf errors share no public base class
            raise BadFileError(f"{self.config} is damaged ({type(err).__name__}); the run cannot be continued or "
                               "re-evaluated from its config. Restore the file, or start a new run.") from err
        if not isinstance(config, DictConfig):
            raise BadFileError(f"{self.config} is damaged: it holds no config mapping.")
        unsafe = unsafe_interpolations(OmegaConf.to_container(config, resolve=False))
        if unsafe:
            raise BadFileError(f"{self.config} has interpolations that fmnist_lab does not resolve in a saved config "
                               f"({'; '.join(unsafe[:3])}): only references to other keys and the resolvers "
                               "fmnist_lab's own configs use are allowed, so no file can build objects or run "
                               "code. Start a new run with the same overrides instead.")
        return config

    def finished(self) -> dict[str, Any]:
        """The metrics of a run that ended well, else {} (no metrics.json, or a failed or interrupted run)."""
        metrics = self.read_metrics()
        return metrics if metrics and metrics.get("status", "ok") == "ok" else {}

    def kept(self) -> str:
        """What a stopped run keeps, as a sentence that is true of this folder."""
        if self.last.is_file():
            return (f"its last good checkpoint {self.last} is intact (files are written to a temporary name "
                    "first).")
        if self.best.is_file():
            return f"its best checkpoint {self.best} is intact."
        return "it had saved no checkpoint yet, so there is nothing to continue from."

    def model_file(self) -> Path | None:
        """The file that holds the run's trained network: the tested weights, else the best or last checkpoint."""
        return next((f for f in (self.weights, self.best, self.last) if f.exists()), None)  # a FIFO: BadFileError

    def resume_point(self, identity: str) -> tuple[Path, int]:
        """checkpoints/last.ckpt of an unfinished run and its global step, if the run wrote it: its stamp
        (`RUN_STAMP`) holds `identity`, the hash of the run's config (config_identity). A clear error if there
        is none, or it is damaged, or it came from another run."""
        if not self.last.exists():
            raise ResumeError(f"resume: {self.path} has no checkpoints/last.ckpt (it stopped before its first "
                              "checkpoint), so there is nothing to continue; start a new run with the same overrides "
                              "instead.")
        import torch  # here: the CLI reads this module before it imports torch

        try:
            with open_regular(self.last) as f:
                checkpoint = torch.load(f, map_location="cpu", weights_only=True)
            step = int(checkpoint["global_step"])
        except BadFileError as err:
            raise ResumeError(f"resume: {err}") from err
        except Exception as err:  # torch's own text suggests weights_only=False, which must never be followed
            raise ResumeError(f"resume: {self.last} cannot be read: it is not a PyTorch checkpoint, or it is damaged "
                              f"or truncated ({type(err).__name__}). {self.best} may still be intact; otherwise "
                              "start a new run with the same overrides.") from err
        stamp = checkpoint.get(RUN_STAMP)
        if not (isinstance(stamp, dict) and stamp.get("config") == identity):
            raise ResumeError(f"resume: {self.last} was not written by this run: it holds another config's or "
                              "another model's training state (a checkpoint copied in from another run?), and "
                              "continuing from it would mix two runs. Put the run's own last.ckpt back, or start a "
                              "new run with the same overrides.")
        return self.last, step


RUN_STAMP = "fmnist_lab_run"  # the checkpoint entry that says which run wrote it (checkpoint_callbacks.RunStamp)


def config_identity(config: dict) -> str:
    """A hash of a run's config as Hydra saved it (interpolations unresolved, so a moved run keeps it), but for
    `resume`: every checkpoint of the run carries it, and resume takes no checkpoint of another config."""
    recipe = {k: v for k, v in config.items() if k != "resume"}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()

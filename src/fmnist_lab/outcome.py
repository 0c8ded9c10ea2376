"""How a run ends, in one place: finished, failed, or interrupted by a signal; the exit code of each; what
metrics.json records for each (`status`, `error`, and for a signal its name in `signal`); and which errors are
foreseen, so that they print as one paragraph without a traceback.

metrics.json of a run that ended:
- finished: its results, no `status` (or "ok");
- failed: `status: failed`, `error: "<ExceptionType>: <message>"`, and whatever the run measured before;
- interrupted: `status: interrupted`, `error: "<how> at step <n>"`, `signal: SIGINT | SIGTERM | SIGUSR2`, and
  how far it got (`epochs`, `global_step`); `resume=<run>` finishes it.
"""

from __future__ import annotations

import errno
import logging
import shutil
import signal
from contextlib import suppress
from typing import Any

from fmnist_lab.config import ConfigError
from fmnist_lab.data.idx import DataError
from fmnist_lab.run_dir import (
    BadFileError,
    ResumeError,
    RunBusyError,
    RunDir,
    RunDirError,
    describe_write_error,
    is_rank_zero,
)
from fmnist_lab.run_dir_resolvers import created_here

log = logging.getLogger(__name__)

FAILED = 1  # the exit code of a run that failed, or that was refused before it started
# how each signal that stops a run is named in its messages; a process a signal stopped exits 128 + its number
SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM",
           signal.SIGUSR2: "USR2 (SLURM's warning before the time limit, or of preemption)"}


class ArtifactError(RuntimeError):
    """An artifact failed its check (e.g. ONNX verification); the run's other outputs are kept."""


class JobFailed(Exception):
    """A sweep job that failed in an earlier invocation of the same sweep: its error stands."""


class Interrupted(Exception):
    """A signal (SIGTERM, Ctrl-C, SLURM's USR2) stopped the run at some phase; metrics.json says so and `resume=`
    finishes the run."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)


# nothing was run: the folder stays as it was
NOTHING_DONE = (ResumeError, BadFileError, RunBusyError, JobFailed)
# a config value or the data set stopped the job before it trained anything
COULD_NOT_START = (ConfigError, DataError)
# errors whose message says what to do: one paragraph, no traceback (any other error is a bug, logged with one)
FORESEEN = (*NOTHING_DONE, *COULD_NOT_START, ArtifactError, FloatingPointError, Interrupted, RunDirError)
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


def exit_code(signum: int) -> int:
    """What a process stopped by `signum` returns, as a shell reports it: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + signum


def signal_exit_code(metrics: dict[str, Any]) -> int:
    """The exit code for an interrupted run's metrics.json: its `signal`; SIGTERM when it names none (a job that
    a stopped sweep cut off)."""
    name = metrics.get("signal")
    signum = signal.Signals[name] if name in signal.Signals.__members__ else signal.SIGTERM
    return exit_code(signum)


def mark_failed(run: RunDir, err: BaseException) -> None:
    """metrics.json says the run failed and why, keeping whatever the run measured before."""
    run.update(status="failed", error=f"{type(err).__name__}: {err}")


def mark_interrupted(run: RunDir, signum: int, step: int, epochs: int, **context: Any) -> None:
    """metrics.json says a signal stopped the run (so it is not finished), keeping what it measured."""
    run.update(status="interrupted", error=f"{SIGNALS[signum]} at step {step}", signal=signal.Signals(signum).name,
               epochs=epochs, global_step=step, **context)


def interrupted(run: RunDir, signum: int, step: int) -> Interrupted:
    """The exception that ends a run a signal stopped at `step` (metrics.json marked already)."""
    return Interrupted(f"{SIGNALS[signum]} stopped the run at step {step}; {run.metrics} marks it interrupted. "
                       f"Continue it with: python -m fmnist_lab resume={run.path}", signum)


def ending(err: Exception, run: RunDir, in_sweep: bool) -> tuple[str, int]:
    """How a job that raised `err` ends: its one paragraph and exit code. metrics.json is marked failed where the
    run got going; a single run that could not start leaves no folder behind (a sweep's job keeps its folder,
    marked failed: the summary's row points to it)."""
    if isinstance(err, NOTHING_DONE):
        return str(err), FAILED
    if isinstance(err, Interrupted):  # metrics.json already says so
        return str(err), err.exit_code
    if isinstance(err, RunDirError):  # the folder cannot take files: nothing to mark
        return err.strerror, FAILED
    if isinstance(err, COULD_NOT_START) and not in_sweep:
        if created_here(run.path):
            shutil.rmtree(run.path, ignore_errors=True)
            with suppress(OSError):  # the date folder above it, when this was its only run
                run.path.parent.rmdir()
        return str(err), FAILED
    if isinstance(err, OSError) and err.errno in DISK_ERRORS:
        mark_failed(run, err)  # where it can still be written
        return describe_write_error(err, run.path), FAILED
    if not isinstance(err, FORESEEN):
        log.exception("unexpected error")  # a bug: the traceback goes to the log and the console
    if is_rank_zero():
        mark_failed(run, err)
    if isinstance(err, COULD_NOT_START):
        return str(err), FAILED
    return f"{err}\nThe run is marked failed in {run.metrics}; {run.kept()}", FAILED

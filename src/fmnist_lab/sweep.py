"""The sweep summary: a Hydra callback that keeps every job's result.

`SweepSummary` (see `hydra.callbacks` in conf/train.yaml) appends one row per job to `<sweep dir>/summary.csv` the
moment the job ends, so a killed sweep still keeps every finished job. When the sweep ends it writes `summary.md`
(sorted by the objective, best marked, failures with their error) and `summary.png`, prints the table, and exits
non-zero if any job failed. With several objectives (`optimized_metric` a list, e.g. a multi-objective Optuna
search) it marks the Pareto front instead of one best. Before any job it refuses, with one paragraph, a sweep
folder that cannot be written, that is a single run's folder, or that holds another sweep.

Its parts: the objective and its Pareto front (fmnist_lab.sweep_objective), the rows of summary.csv
(fmnist_lab.sweep_rows), summary.md and summary.png (fmnist_lab.sweep_report); each job's share of the machine
is fmnist_lab.sweep_machine.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from fmnist_lab.outcome import signal_exit_code
from fmnist_lab.run_dir import BadFileError, RunDir, is_rank_zero
from fmnist_lab.sweep_machine import PARALLEL_JOBS, count_jobs
from fmnist_lab.sweep_objective import Objective
from fmnist_lab.sweep_report import write_summary
from fmnist_lab.sweep_rows import COLUMNS, job_row, latest, model_name, read_rows, record
from fmnist_lab.untrusted import is_regular_file, load_yaml


class SweepSummary(Callback):
    """`metric`: optimized_metric, one metric or a list; `mode`: max or min, one per metric; `directions`: an
    Optuna search's directions, which take the place of `mode` when set."""

    def __init__(self, metric: Any = "val/acc_best", mode: Any = "max", directions: Any = None) -> None:
        self.metric, self.mode, self.directions = metric, mode, directions
        self.earlier_rows = 0
        self.grid = True
        self.search = False  # an Optuna search's: mode and directions are the search's

    @property
    def objective(self) -> Objective:  # checked when a sweep starts: a single run does not use it
        if self.search or self.directions is not None:
            return Objective.of_search(self.metric, self.mode, self.directions)
        return Objective.of(self.metric, self.mode, "hydra.callbacks.summary.mode")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_rank_zero():  # under torchrun every rank runs the sweep; rank zero keeps its books
            return
        self.search = "directions" in config.hydra.sweeper
        self.objective  # noqa: B018 -- refuses metrics and directions that do not fit, before any job
        sweep_dir = Path(config.hydra.sweep.dir)
        check_sweep_dir(sweep_dir)
        if stops_in_the_sweep_process(config):
            from hydra_plugins.fmnist_lab_joblib import catch_signals

            catch_signals(config)  # from here on a signal stops the sweep as a whole (see that launcher)
        # A grid sweep names its job folders 0, 1, ...: in a used folder, only the same sweep may continue.
        # (An Optuna search names them by number and time, and continues its study there.)
        self.grid = not plugin_says(config.hydra.sweeper, "continues_a_study")
        earlier = sweep_dir / "multirun.yaml"
        if os.path.lexists(earlier):  # Hydra writes it next: a FIFO there would hang the sweep
            before = sorted(earlier_overrides(earlier))
            now = sorted(config.hydra.overrides.task)
            if self.grid and before != now:
                raise SystemExit(f"error: {sweep_dir} holds another sweep ({' '.join(before) or 'no overrides'}); "
                                 f"this one ({' '.join(now) or 'no overrides'}) would write over its jobs. Leave "
                                 "hydra.sweep.dir out for a new folder, or run that sweep's command again to "
                                 "continue it.")
        # how many jobs a launcher may run at once, for share_machine in each job (launched processes inherit it)
        os.environ[PARALLEL_JOBS] = str(config.hydra.sweeper.get("n_jobs") or 1 if not self.grid
                                        else count_jobs(config.hydra.overrides.task))
        path = sweep_dir / "summary.csv"
        if os.path.lexists(path) and not is_regular_file(path):
            raise SystemExit(f"error: {path} is not a regular file (a FIFO, a folder or a dangling link), so the "
                             "sweep cannot keep its results there. Remove it, or leave hydra.sweep.dir out for a new "
                             "folder.")
        if not path.is_file():  # a continued sweep (same hydra.sweep.dir) keeps appending to its summary
            path.write_text(",".join(COLUMNS) + "\n")
        self.earlier_rows = len(read_rows(path))  # the exit code is about this invocation's jobs

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN or not is_rank_zero() or rows_in_the_sweep_process(config):
            return
        try:
            row = job_row(config.hydra.runtime.output_dir, config.hydra.job.num, config.hydra.overrides.task,
                          model_name(config), job_return, self.objective)
        except Exception as err:  # Hydra would only warn: never lose the row, say what went wrong in it
            row = {"job": config.hydra.job.num, "status": "failed", "overrides": " ".join(config.hydra.overrides.task),
                   "error": f"summary could not read this job's result: {type(err).__name__}: {err}"}
        record(Path(config.hydra.sweep.dir) / "summary.csv", row)
        # a signal stops the whole sweep, with the books written; fmnist_lab's joblib launcher does it in the sweep
        # process (from a worker, SystemExit would make joblib end the other jobs without a word)
        if row["status"] == "interrupted" and not stops_in_the_sweep_process(config):
            self.write_summary(Path(config.hydra.sweep.dir))
            print(f"sweep stopped: job {row['job']} was interrupted ({row['error']}); every finished job is in "
                  f"{Path(config.hydra.sweep.dir) / 'summary.csv'}", file=sys.stderr)
            raise SystemExit(signal_exit_code(RunDir(row["run_dir"]).read_metrics()))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_rank_zero():
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        # a grid sweep is one sweep however often it was continued; a search's earlier trials were its own runs
        rows = latest(read_rows(sweep_dir / "summary.csv")[0 if self.grid else self.earlier_rows:])
        self.write_summary(sweep_dir)
        failed = [r["job"] for r in rows if r["status"] != "ok"]
        if failed:
            raise SystemExit(f"{len(failed)} of {len(rows)} sweep jobs failed (jobs {', '.join(failed)}); "
                             f"see {sweep_dir / 'summary.md'}")

    def write_summary(self, sweep_dir: Path) -> None:
        write_summary(sweep_dir, self.objective)


def objective_of_sweep(config: DictConfig) -> Objective:
    """The objective of the sweep summary in a sweep's config (`hydra.callbacks.summary`)."""
    settings = OmegaConf.select(config, "hydra.callbacks.summary", default=None) or {}
    return SweepSummary(**{k: v for k, v in settings.items() if k != "_target_"}).objective


def plugin_says(node: DictConfig, flag: str) -> bool:
    """Whether the class of a Hydra plugin's config (its `_target_`) declares `flag` true."""
    target = node.get("_target_")
    return bool(target) and getattr(get_class(str(target)), flag, False) is True


def stops_in_the_sweep_process(config: DictConfig) -> bool:
    """fmnist_lab's joblib launcher stops a sweep as a whole in the sweep process (its jobs run in workers, where
    this callback's object is a new one each job: hence read from the config, not kept)."""
    return plugin_says(config.hydra.launcher, "stops_the_sweep_itself")


def rows_in_the_sweep_process(config: DictConfig) -> bool:
    """fmnist_lab's SLURM launcher writes every job's row itself, once SLURM says the job has ended: a job that
    SLURM or submitit requeues runs again, and only its last run has the result."""
    return plugin_says(config.hydra.launcher, "writes_the_rows_itself")


def check_sweep_dir(sweep_dir: Path) -> None:
    """SystemExit with one paragraph when a sweep cannot use `sweep_dir`: Hydra writes multirun.yaml there before
    any job, and would end in a traceback."""
    probe = sweep_dir / f".write-check-{os.getpid()}"
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"fmnist_lab")
        probe.unlink()
        single_run = (sweep_dir / ".hydra").is_dir()
    except OSError as err:
        if err.errno == errno.ENAMETOOLONG:
            why, fix = "the path, or a name in it, is longer than the file system allows", "a shorter path"
        elif err.errno in (errno.ENOTDIR, errno.EEXIST):
            blocking = next((p for p in (sweep_dir, *sweep_dir.parents) if p.exists() and not p.is_dir()), None)
            why, fix = f"{blocking or 'a part of it'} is a file, not a folder", "another path"
        elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            why, fix = "it is not writable", "a writable folder"
        else:
            why, fix = err.strerror or str(err), "another folder"
        raise SystemExit(f"error: the sweep folder {sweep_dir} cannot be created or written: {why} ({err.strerror}). "
                         f"Choose {fix} with hydra.sweep.dir=..., or leave it out for a new folder under "
                         "paths.log_dir.") from None
    if single_run:
        raise SystemExit(f"error: {sweep_dir} is the folder of a single run (it holds .hydra/); a sweep there would "
                         "put its jobs inside that run, where `python -m fmnist_lab.runs` does not see them. Choose "
                         "a new or a sweep's folder with hydra.sweep.dir=..., or leave it out for a new folder.")


def earlier_overrides(path: Path) -> list[str]:
    """The task overrides of the sweep an earlier multirun.yaml records, read as a file that may come from
    elsewhere (fmnist_lab.untrusted: plain data, no aliases, no FIFO, size-capped); SystemExit naming it when it is
    damaged."""
    try:
        data = load_yaml(path)
        task = data["hydra"]["overrides"]["task"] if isinstance(data, dict) else None
        if not isinstance(task, list) or not all(isinstance(o, str) for o in task):
            raise BadFileError(f"{path} is damaged: it holds no hydra.overrides.task list.")
    except (BadFileError, KeyError, TypeError) as err:
        what = err if isinstance(err, BadFileError) else f"{path} is damaged: it holds no hydra.overrides.task list."
        raise SystemExit(f"error: {what} fmnist_lab reads it to tell whether the sweep folder {path.parent} holds "
                         "this sweep, so nothing was run. Restore the file, or leave hydra.sweep.dir out for a new "
                         "folder.") from None
    except OSError as err:
        raise SystemExit(f"error: {path} cannot be read ({err.strerror}); fmnist_lab reads it to tell whether the "
                         f"sweep folder {path.parent} holds this sweep, so nothing was run. Fix its permissions, or "
                         "leave hydra.sweep.dir out for a new folder.") from None
    return task

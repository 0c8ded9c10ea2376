"""Multirun bookkeeping: a summary that keeps every job's result, and a fair share of the machine per job.

`SweepSummary` (a Hydra callback, see `hydra.callbacks` in conf/train.yaml) appends one row per job to
`<sweep dir>/summary.csv` the moment the job ends, so a killed sweep still keeps every finished job. When the
sweep ends it writes `summary.md` (sorted by the objective, best marked, failures with their error) and
`summary.png`, prints the table, and exits non-zero if any job failed. With several objectives
(`optimized_metric` a list, e.g. a multi-objective Optuna search) it marks the Pareto front instead of one best.
Before any job it refuses, with one paragraph, a sweep folder that cannot be written, that is a single run's
folder, or that holds another sweep.
"""

from __future__ import annotations

import csv
import errno
import io
import logging
import math
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from fmnist_lab.run_dir import BadFileError, RunDir, atomic_write, is_rank_zero
from fmnist_lab.untrusted import is_regular_file, load_yaml

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)
# new columns go last: a sweep folder from an earlier version is continued with its own header
COLUMNS = ["job", "status", "objective", "val/acc_best", "test/acc", "test/loss", "epochs", "train_seconds",
           "overrides", "error", "run_dir", "model", "objectives"]
MODES = {"max": "max", "maximize": "max", "min": "min", "minimize": "min"}


@dataclass(frozen=True)
class Objective:
    """What a sweep optimizes: `optimized_metric`, one metric or a list of them, and for each max or min."""
    metrics: tuple[str, ...]
    modes: tuple[str, ...]

    @classmethod
    def of(cls, metric: Any, modes: Any, key: str) -> Objective:
        """From `optimized_metric` and the direction(s) given at `key`; SystemExit with one paragraph when they do
        not fit together."""
        metrics = tuple(metric) if isinstance(metric, list | tuple | ListConfig) else (metric,)
        given = list(modes) if isinstance(modes, list | tuple | ListConfig) else [modes]
        if not metrics or not all(isinstance(m, str) and m for m in metrics) or len(set(metrics)) < len(metrics):
            raise SystemExit(f"error: optimized_metric={list(metrics)} is neither one metric's name nor a list of "
                             "different names. Give one metric of metrics.json (e.g. optimized_metric=val/acc_best), "
                             "or a list of different ones for a multi-objective sweep "
                             "(optimized_metric=[val/acc_best,train_seconds]).")
        if len(given) != len(metrics) or not all(str(mode) in MODES for mode in given):
            example = ",".join("max" if "acc" in m else "min" for m in metrics)
            raise SystemExit(f"error: optimized_metric={list(metrics)} names {len(metrics)} metric(s), and {key} gives "
                             f"{', '.join(map(str, given)) or 'no direction'}. A sweep needs one direction per metric, "
                             "in the same order, each max or min (maximize or minimize): set e.g. "
                             f"{key}=[{example}], or change optimized_metric.")
        return cls(metrics, tuple(MODES[str(mode)] for mode in given))

    @classmethod
    def of_search(cls, metric: Any, direction: str, directions: Any) -> Objective:
        """An Optuna search's objective: `hydra.sweeper.direction`, or its `directions` for several metrics."""
        if directions is None and isinstance(metric, str):
            return cls.of(metric, direction, "hydra.sweeper.direction")
        return cls.of(metric, [] if directions is None else directions, "hydra.sweeper.directions")

    @classmethod
    def of_sweep(cls, config: DictConfig) -> Objective:
        """The objective of the sweep summary in a sweep's config (`hydra.callbacks.summary`)."""
        summary = OmegaConf.select(config, "hydra.callbacks.summary", default=None) or {}
        return SweepSummary(**{k: v for k, v in summary.items() if k != "_target_"}).objective

    @property
    def multi(self) -> bool:
        return len(self.metrics) > 1

    def title(self) -> str:
        return ", ".join(f"{metric} ({mode})" for metric, mode in zip(self.metrics, self.modes, strict=True))

    def row_values(self, row: dict[str, Any]) -> list[float] | None:
        """A finished job's objective values from its summary row; None for a job without all of them."""
        text = (row.get("objectives") or "") if self.multi else (row.get("objective") or "")
        try:
            values = [float(v) for v in text.split()]
        except ValueError:
            return None
        ok = row["status"] == "ok" and len(values) == len(self.metrics) and all(map(math.isfinite, values))
        return values if ok else None

    def pareto_front(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The finished jobs that no other job beats in every metric (each at least as good, one better): with one
        metric, the best job(s)."""
        signed = [(row, [v if mode == "max" else -v for v, mode in zip(values, self.modes, strict=True)])
                  for row in rows if (values := self.row_values(row)) is not None]
        return [row for row, a in signed
                if not any(b != a and all(y >= x for x, y in zip(a, b, strict=True)) for _, b in signed)]


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def objective_values(metrics: dict, metric: Any) -> float | list[float] | None:
    """The value of `optimized_metric` in a run's metrics (a list for a list of metrics); None when one of them is
    missing or not a finite number: a sweeper counts the job as failed."""
    names = [metric] if isinstance(metric, str) else list(metric)
    values = [metrics.get(name) for name in names]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        return None
    return values[0] if isinstance(metric, str) else values


def job_row(run_dir: str | Path, num: int, overrides: list[str], model: str, job_return: JobReturn,
            objective: Objective) -> dict[str, Any]:
    """One job's row: its own metrics.json when it got that far, else the exception Hydra caught."""
    run = RunDir(run_dir)
    metrics = run.read_metrics()
    error = metrics.get("error")
    if job_return.status == JobStatus.FAILED and not error:
        try:
            job_return.return_value  # noqa: B018 -- a failed job's return_value raises the job's exception
        except Exception as err:
            error = f"{type(err).__name__}: {err}"
    status = metrics.get("status") or ("failed" if error or job_return.status == JobStatus.FAILED else "ok")
    return {**metrics_row(metrics, status, error, objective), "job": num, "overrides": " ".join(overrides),
            "run_dir": str(run.path), "model": model}


def metrics_row(metrics: dict[str, Any], status: str, error: str | None, objective: Objective) -> dict[str, Any]:
    """The columns of a row that come from a job's metrics.json: `objective` is the first optimized metric,
    `objectives` all of them (space-separated) when there are several."""
    row = {k: metrics.get(k) for k in ("val/acc_best", "test/acc", "test/loss", "epochs", "train_seconds")}
    values = [metrics.get(m) for m in objective.metrics] if status == "ok" else [None]
    every = " ".join(str(v) for v in values) if objective.multi and None not in values else None
    return {**row, "status": status, "objective": values[0], "objectives": every,
            "error": (error or "").split("\n")[0][:300]}


def ended(metrics: dict[str, Any]) -> bool:
    """metrics.json says the job finished or failed, or marked it interrupted: it needs no mark from the sweep."""
    return bool(metrics) and metrics.get("status", "ok") in ("ok", "failed", "interrupted")


def mark_unfinished(run: RunDir, why: str) -> None:
    """Mark a job that a stopped sweep cut off interrupted with `why`, unless its metrics.json says how it
    ended (it may have finished, or marked itself): a continued sweep runs it again, from its last.ckpt if any."""
    try:
        if ended(run.read_metrics()):
            return
    except BadFileError:
        return  # the job's own error when the sweep is continued
    run.update(status="interrupted", error=why)


def unfinished_row(job: int, overrides: list[str], run_dir: Path, why: str, objective: Objective) -> dict[str, Any]:
    """The row of a job that did not end through Hydra, for `why` (written by the launcher, which composes no job
    config for it: the model comes from the job's saved config, when it has one). Interrupted, unless its
    metrics.json says otherwise."""
    run = RunDir(run_dir)
    row = {"job": job, "overrides": " ".join(overrides), "run_dir": str(run.path), "model": saved_model(run)}
    if not run.path.is_dir():
        return {**row, "status": "interrupted", "error": f"not started: {why}"}
    mark_unfinished(run, f"cut off: {why}")
    try:
        metrics = run.read_metrics()
    except BadFileError as err:
        return {**row, "status": "failed", "error": str(err)[:300]}
    status = metrics.get("status", "ok") if metrics else "interrupted"  # a folder it cannot write: not marked
    error = metrics.get("error") or (f"cut off: {why}" if status == "interrupted" else None)
    return {**row, **metrics_row(metrics, status, error, objective)}


def job_config(hydra_context: Any, config: DictConfig, overrides: Sequence[str], idx: int) -> DictConfig:
    """Job `idx`'s config, as Hydra's launchers compose it."""
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
        sweep_config.hydra.job.num = idx
    return sweep_config


def job_dir(launcher: Any, overrides: Sequence[str], idx: int) -> Path:
    """Where job `idx` writes (or would have written) its files."""
    config = launcher.config
    sweep_dir = Path(str(config.hydra.sweep.dir))
    if OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir") == "${hydra.job.num}":
        return sweep_dir / str(idx)  # fmnist_lab's own: no need to compose the job's config (a quarter second)
    job = job_config(launcher.hydra_context, config, overrides, idx)
    before = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(job)  # a subdir may use ${hydra:...}
    try:
        return sweep_dir / str(job.hydra.sweep.subdir)
    finally:
        HydraConfig.instance().cfg = before


def saved_model(run: RunDir) -> str:
    """The network's class name from a job's saved config, or "" when it has none (yet)."""
    try:
        target = load_yaml(run.config)["model"]["_target_"]
    except (OSError, BadFileError, KeyError, TypeError):
        return ""
    return str(target).rsplit(".", 1)[-1]


def model_name(config: DictConfig) -> str:
    """The network's class name (MLP, CNN, a registered one), from the job's config."""
    return str(config.model.get("_target_", "")).rsplit(".", 1)[-1]


def record(path: Path, row: dict[str, Any]) -> None:
    """Append a job's row to summary.csv, unless the job ended in an earlier run of the same sweep: its row is
    there already."""
    if not any(r["run_dir"] == row["run_dir"] and r["status"] in ("ok", "failed") for r in read_rows(path)):
        append_row(path, row)


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one CSV line with a single O_APPEND write, so parallel jobs never interleave their rows."""
    buffer = io.StringIO()
    csv.DictWriter(buffer, COLUMNS).writerow(row)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, buffer.getvalue().encode())
    finally:
        os.close(fd)


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def latest(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The last row of each job folder: an interrupted job that a continued sweep finished has two."""
    return list({r["run_dir"]: r for r in rows}.values())


def ranked(rows: list[dict[str, str]], objective: Objective) -> list[dict[str, str]]:
    """Finished jobs by objective, best first (with several objectives: the Pareto front first, each part by the
    first objective), then the ones without a score by job number."""
    front = {id(row) for row in objective.pareto_front(rows)}

    def key(row):
        values = objective.row_values(row)
        first = (values[0] if objective.modes[0] == "min" else -values[0]) if values else 0.0
        return (values is None, id(row) not in front, first, int(row["job"]))
    return sorted(rows, key=key)


def short(value: str) -> str:
    """A float as 4 significant digits, for reading (Optuna proposes lr=0.0031622776601683794); whole numbers and
    text as they are."""
    try:
        int(value)
        return value
    except ValueError:
        pass
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value


def short_overrides(overrides: str) -> str:
    """The overrides with their float values rounded by `short`: for display only, summary.csv keeps them exact
    so that a job can be run again."""
    return " ".join(key + sep + short(value) if sep else part
                    for part in overrides.split(" ") for key, sep, value in [part.partition("=")])


def markdown(rows: list[dict[str, str]], objective: Objective) -> str:
    """The summary table: the best job marked, or with several objectives each job of the Pareto front."""
    def fmt(value: Any, digits: int = 4) -> str:
        try:
            return f"{float(value):.{digits}f}"
        except (TypeError, ValueError):
            return value or "-"

    front = {id(row) for row in objective.pareto_front(rows)}
    mark = "**Pareto front**" if objective.multi else "**best**"
    lines = [f"| | job | model | {' | '.join(objective.metrics)} | test/acc | test/loss | epochs | train s | overrides "
             "| status |", "|---|---|---|" + "---|" * len(objective.metrics) + "---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        best = mark if id(r) in front and (objective.multi or i == 0) else ""
        values = objective.row_values(r) or [r["objective"] if not objective.multi else "-"] * len(objective.metrics)
        status = "ok" if r["status"] == "ok" else f"{r['status']}: {r['error']}"
        lines.append(f"| {best} | {r['job']} | {r.get('model') or '-'} | {' | '.join(fmt(v) for v in values)} "
                     f"| {fmt(r['test/acc'])} | {fmt(r['test/loss'])} | {r['epochs'] or '-'} "
                     f"| {fmt(r['train_seconds'], 1)} | `{short_overrides(r['overrides'])}` | {status} |")
    return "\n".join(lines) + "\n"


def swept_parameters(rows: list[dict[str, str]]) -> dict[str, list[str]]:
    """key -> value per row, for the override keys whose values differ between jobs."""
    per_row = [dict(o.split("=", 1) for o in r["overrides"].split() if "=" in o) for r in rows]
    keys = sorted({k for overrides in per_row for k in overrides})
    values = {k: [o.get(k, "") for o in per_row] for k in keys}
    return {k: v for k, v in values.items() if len(set(v)) > 1}


def plot(rows: list[dict[str, str]], objective: Objective, path: Path) -> Figure:
    """The objective against each swept parameter: numeric on a (log, for wide ranges) axis, others grouped;
    the best job is a star. Jobs without a score (failed, interrupted) are red crosses on a strip of their own
    below, at their parameter value, so that none can be read as a score. Returns the (closed) figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if objective.row_values(r) is not None]
    scored = {id(r) for r in done}
    ys = [objective.row_values(r)[0] for r in done]  # the first objective; stars: the best job, or the Pareto front
    front = {id(r) for r in objective.pareto_front(rows)}
    stars = [(id(r), y) for r, y in zip(done, ys, strict=True) if id(r) in front][:None if objective.multi else 1]
    params = swept_parameters(rows) or {"job": [r["job"] for r in rows]}
    strip = len(done) < len(rows)
    fig, axes = plt.subplots(1 + strip, len(params), figsize=(4.2 * len(params), 3.6 + 0.8 * strip),
                             sharex="col", squeeze=False, height_ratios=[4, 1] if strip else None)
    for column, (name, values) in enumerate(params.items()):
        ax, bottom = axes[0][column], axes[-1][column]  # bottom: the failed strip, else ax; x is labelled there
        try:
            positions = [float(v) for v in values]
            positive = [p for p in positions if p > 0]
            if len(positive) == len(positions) and max(positive) / min(positive) >= 20:
                ax.set_xscale("log")  # learning rates and other rates span decades
            ticks = dict(zip(positions, values, strict=True))
            if len(ticks) <= 8:  # a grid's few values: a tick at each, named as swept (rounded)
                bottom.set_xticks(list(ticks), [short(v) for v in ticks.values()], rotation=30, ha="right",
                                  fontsize=8)
                bottom.set_xticks([], minor=True)
        except ValueError:  # categorical: one column of points per value
            categories = sorted(set(values))
            positions = [categories.index(v) for v in values]
            bottom.set_xticks(range(len(categories)), [short(v) or "-" for v in categories], rotation=30, ha="right",
                              fontsize=8)
        x = dict(zip((id(r) for r in rows), positions, strict=True))
        ax.scatter([x[id(r)] for r in done], ys, label="finished")
        if done:
            ax.scatter([x[key] for key, _ in stars], [y for _, y in stars], marker="*", s=250, color="gold",
                       edgecolor="black", label="Pareto front" if objective.multi else "best")
        if strip:
            failed = [x[id(r)] for r in rows if id(r) not in scored]
            bottom.scatter(failed, [0] * len(failed), marker="x", color="red", s=60)
            bottom.set_yticks([])
            bottom.set_ylabel("failed", rotation=0, ha="right", va="center")
            bottom.grid(alpha=0.3, axis="x")
        bottom.set_xlabel(name)
        ax.set_ylabel(objective.metrics[0])
        ax.grid(alpha=0.3)
    if done:  # with no finished job there is nothing to name
        axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return fig


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
        self.grid = "optuna" not in str(config.hydra.sweeper.get("_target_", "")).lower()
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
            raise SystemExit(130 if row["error"].startswith("Ctrl-C") else 128 + signal.SIGTERM)

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


def stops_in_the_sweep_process(config: DictConfig) -> bool:
    """fmnist_lab's joblib launcher stops a sweep as a whole in the sweep process (its jobs run in workers, where
    this callback's object is a new one each job: hence read from the config, not kept)."""
    return "fmnist_lab_joblib" in str(config.hydra.launcher.get("_target_"))


def rows_in_the_sweep_process(config: DictConfig) -> bool:
    """fmnist_lab's SLURM launcher writes every job's row itself, once SLURM says the job has ended: a job that
    SLURM or submitit requeues runs again, and only its last run has the result."""
    return "fmnist_lab_slurm" in str(config.hydra.launcher.get("_target_"))


def write_summary(sweep_dir: Path, objective: Objective) -> None:
    """summary.md and summary.png from summary.csv, and the table on the console."""
    rows = ranked(latest(read_rows(sweep_dir / "summary.csv")), objective)
    if not rows:
        return
    table = markdown(rows, objective)
    text = f"# Sweep {sweep_dir}\n\nObjective: {objective.title()}\n\n"
    if objective.multi:
        front = objective.pareto_front(rows)
        text += (f"Pareto front (the finished jobs that no other job beats in every objective): jobs "
                 f"{', '.join(r['job'] for r in front)} ({len(front)} of "
                 f"{sum(objective.row_values(r) is not None for r in rows)})\n\n")
    atomic_write(sweep_dir / "summary.md", lambda tmp: tmp.write_text(text + table))
    plot(rows, objective, sweep_dir / "summary.png")
    print(f"\n{table}\nsummary: {sweep_dir / 'summary.md'} (and summary.csv, summary.png)")


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


PARALLEL_JOBS = "FMNIST_LAB_SWEEP_JOBS"  # set by SweepSummary in the sweep process: jobs in a batch


def count_jobs(task_overrides: list[str]) -> int:
    """The jobs of a grid sweep: the product of the number of values of each swept key."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        overrides = OverridesParser.create().parse_overrides(list(task_overrides))
        return math.prod(len(list(o.sweep_string_iterator())) if o.is_sweep_override() else 1 for o in overrides)
    except Exception:  # a sweep syntax that cannot be counted ahead: only the thread split loses, not the sweep
        return 1


def slurm_cpus() -> int | None:
    """The CPUs SLURM gave this task (None outside a SLURM job): --cpus-per-task, else the job's CPUs on this node
    shared by its tasks there."""
    env = os.environ
    try:
        if env.get("SLURM_CPUS_PER_TASK"):
            return max(1, int(env["SLURM_CPUS_PER_TASK"]))
        return max(1, int(env["SLURM_CPUS_ON_NODE"]) // max(1, int(env.get("SLURM_NTASKS_PER_NODE") or 1)))
    except (KeyError, ValueError):  # not a SLURM job
        return None


def use_slurm_cpus() -> None:
    """A job in a SLURM allocation trains with one thread per CPU it was given: PyTorch's default, one per core of
    the node, would crowd the cores of the node's other jobs (and its own other tasks)."""
    cpus = slurm_cpus()
    if cpus is not None:
        import torch

        torch.set_num_threads(cpus)
        log.info(f"SLURM gave this task {cpus} CPU(s): training uses {cpus} CPU thread(s)")


def share_machine(cfg: DictConfig) -> None:
    """Parallel local jobs (joblib, submitit_local) split the CPU threads; with several GPUs, job k takes GPU
    k mod n."""
    import torch

    hydra_cfg = HydraConfig.get()
    target = str(hydra_cfg.launcher.get("_target_", ""))
    batch = int(os.environ.get(PARALLEL_JOBS, 1))
    n_jobs = hydra_cfg.launcher.get("n_jobs") if "joblib" in target else \
        min(batch, hydra_cfg.launcher.get("array_parallelism") or batch) if "LocalLauncher" in target else None
    if n_jobs:
        cores = os.cpu_count() or 1
        parallel = cores if n_jobs < 0 else min(n_jobs, cores)
        torch.set_num_threads(max(1, cores // parallel))
        log.info(f"{parallel} parallel jobs on {cores} cores: {torch.get_num_threads()} CPU threads for this one")
    gpus = torch.cuda.device_count()
    if gpus > 1 and cfg.device != "cpu" and cfg.trainer.get("devices") == 1:
        cfg.trainer.devices = [hydra_cfg.job.num % gpus]
        log.info(f"job {hydra_cfg.job.num} on GPU {cfg.trainer.devices[0]} of {gpus}")

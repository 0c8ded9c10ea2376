"""summary.csv, a sweep's books: one row per job, appended the moment the job ends (so a killed sweep keeps every
finished job), from the job's metrics.json; and for a job that did not end through Hydra (a stopped sweep cut it
off, SLURM killed it), a row from what its folder holds.
"""

from __future__ import annotations

import csv
import io
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig, OmegaConf, open_dict

from fmnist_lab.run_dir import BadFileError, RunDir
from fmnist_lab.sweep_objective import Objective
from fmnist_lab.untrusted import load_yaml

# new columns go last: a sweep folder from an earlier version is continued with its own header
COLUMNS = ["job", "status", "objective", "val/acc_best", "test/acc", "test/loss", "epochs", "train_seconds",
           "overrides", "error", "run_dir", "model", "objectives"]


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


def mark_unfinished(run: RunDir, why: str, signum: int | None = None) -> None:
    """Mark a job that a stopped sweep cut off interrupted with `why` (and the signal that stopped it, if one
    did), unless its metrics.json says how it ended (it may have finished, or marked itself): a continued sweep
    runs it again, from its last.ckpt if any."""
    try:
        if ended(run.read_metrics()):
            return
    except BadFileError:
        return  # the job's own error when the sweep is continued
    run.update(status="interrupted", error=why, **({"signal": signal.Signals(signum).name} if signum else {}))


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

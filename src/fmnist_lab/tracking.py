"""What the loggers record about a run as a whole: the knobs a user sweeps (TensorBoard's HPARAMS tab, MLflow's
params), and `MLflowLogger`, Lightning's MLFlowLogger on an offline SQLite store that parallel jobs share.

    python -m fmnist_lab logger=mlflow                  # or logger=[tensorboard,mlflow]
    mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db

A store that cannot take the run (not writable, not an MLflow store, damaged) stops it before training with a
ConfigError that names the store and the fix (`check_store`); one that fails during the run costs a warning.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.loggers import MLFlowLogger

from fmnist_lab import swept
from fmnist_lab.config import ConfigError
from fmnist_lab.run_dir import BadFileError, RunDir, is_rank_zero, read_json, write_json

log = logging.getLogger(__name__)
# Off unless a user turns it on: runs are offline, and a tracking store is no place for phoning home.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow logs a traceback for each database error before raising it; MLflowLogger reports that error itself.
logging.getLogger("mlflow.store.db.utils").addFilter(lambda record: not record.exc_info)
SQLITE = "sqlite:///"
KEY = "logger.mlflow.tracking_uri"
MLFLOW_TABLES = {"alembic_version", "experiments", "runs"}  # tables every MLflow store has


def logged_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The run's settings a user compares runs by, flat (`optimizer/momentum`): the short keys, the optimizer,
    schedule and network by class name with their settings, the data and precision settings. Paths, `_target_`
    names and settings that change no result (workers, eval batch size) stay out."""
    def name(node: Any) -> str:
        return str(node.get("_target_", "")).rsplit(".", 1)[-1] if isinstance(node, dict) and node else "none"

    def settings(group: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
        node = config.get(group) or {}
        return {f"{group}/{k}": v if isinstance(v, int | float | str | bool) or v is None else str(v)
                for k, v in node.items() if not k.startswith("_") and k not in skip and not isinstance(v, dict)}

    data = config.get("data") or {}
    trainer = config.get("trainer") or {}
    knobs = {k: config.get(k) for k in ("device", "epochs", "lr", "batch_size", "seed")}
    knobs.update({"model": name(config.get("model")), **settings("model", ("num_classes", "normalize")),
                  "optimizer": name(config.get("optimizer")), **settings("optimizer", ("lr",)),
                  "scheduler": name(config.get("scheduler")), **settings("scheduler", ("T_max",)),
                  "data/val_size": data.get("val_size"), "data/backend": data.get("backend"),
                  **{f"data/augment/{k}": v for k, v in (data.get("augment") or {}).items()},
                  **{f"trainer/{k}": trainer.get(k) for k in ("precision", "accumulate_grad_batches",
                                                               "gradient_clip_val")},
                  "finetune/init_from": (config.get("finetune") or {}).get("init_from"),
                  **{k: config.get(k) for k in ("label_smoothing", "warmup_epochs", "tta")},
                  **settings("ema"), **settings("swa"), **settings("mix")})
    return {k: "none" if v is None else v for k, v in knobs.items()}


def recorded_store(run: RunDir) -> str | None:
    """The MLflow store that a run logged into (its mlflow.json), None for a run without MLflow."""
    try:
        record = read_json(run.mlflow) if run.mlflow.is_file() else {}
    except (OSError, BadFileError):
        return None
    return record.get("tracking_uri") if isinstance(record, dict) else None


@contextmanager
def store_lock(tracking_uri: str):
    """One process at a time creates an SQLite store's tables and experiments: two jobs of a parallel sweep
    that meet a new store both run its migrations (or create the same experiment), and one of them fails."""
    if not tracking_uri.startswith(SQLITE):
        yield
        return
    db = Path(tracking_uri.removeprefix(SQLITE))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(f".{db.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def store_errors() -> tuple[type[Exception], ...]:
    """What a store that cannot be used raises: MLflow wraps most database errors, not all of them."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    return MlflowException, SQLAlchemyError, sqlite3.Error, OSError


def first_line(err: BaseException) -> str:
    """The root cause's type and first line: SQLite's own words under MLflow's and SQLAlchemy's wrappers."""
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


def store_error(tracking_uri: str, problem: str, fix: str = "") -> ConfigError:
    """One paragraph: the store, what is wrong with it, and the fixes: `fix`, another store, or no MLflow."""
    return ConfigError(f"Invalid config: {KEY}={tracking_uri!r}. That MLflow store {problem}: {fix}choose another "
                       f"store with {KEY}=sqlite:///<folder>/mlflow.db, or log without MLflow (logger=tensorboard).")


def check_store(tracking_uri: str) -> None:
    """Raise a ConfigError (one paragraph: the store, what is wrong, the fix) when an SQLite store cannot take a
    run: it cannot be created or written, it is no MLflow store, it is damaged, or this MLflow cannot open it.
    SQLite itself reads and writes the file first: MLflow retries a file it cannot open for minutes, and adds
    its tables to any SQLite file. Other stores (a server) answer at their first use, in MLflowLogger."""
    if not tracking_uri.startswith(SQLITE):
        return
    db = Path(tracking_uri.removeprefix(SQLITE)).absolute()
    in_the_way = next(p for p in (db.parent, *db.parent.parents) if p.exists())
    if not in_the_way.is_dir():
        raise store_error(tracking_uri, f"cannot be created: {in_the_way} is a file, not a folder")
    if db.exists() and not db.is_file():
        raise store_error(tracking_uri, "is a folder, not a file", f"move {db} away, or ")
    writable = f"give this user read and write access to {db} and its folder (SQLite writes a journal beside it), or "
    try:
        with store_lock(tracking_uri):  # its folder and lock file: the store's first writes
            if db.is_file() and db.stat().st_size > 0:  # MLflow creates its tables in a new or an empty file
                check_sqlite(tracking_uri, db, writable)
            from mlflow.tracking import MlflowClient

            try:  # under the lock, as MLflow creates a new store's tables here
                MlflowClient(tracking_uri).search_experiments(max_results=1)
            except store_errors() as err:  # e.g. tables from another MLflow version
                import mlflow

                raise store_error(tracking_uri, f"cannot be used by MLflow {mlflow.__version__} "
                                  f"({first_line(err)})") from None
    except OSError as err:
        raise store_error(tracking_uri, f"cannot be written ({err.strerror}: {err.filename})", writable) from None


def check_sqlite(tracking_uri: str, db: Path, writable: str) -> None:
    """An existing store file read, checked and written (a write undone) by SQLite."""
    move = f"move {db} away (a new store is then created in its place), or "
    with open(db, "rb") as file:
        if file.read(16) != b"SQLite format 3\x00":
            raise store_error(tracking_uri, "is not an SQLite database, so not an MLflow store", move)
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=60, isolation_level=None)) as con:
            tables = {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            damage = [row for (row,) in con.execute("PRAGMA quick_check")]  # reads every page
    except sqlite3.Error as err:
        busy(tracking_uri, err)
        tables, damage = set(), [str(err)]
    if damage != ["ok"]:
        raise store_error(tracking_uri, f"is damaged (SQLite: {damage[0]})", f"restore {db} from a backup, or {move}")
    if tables and not MLFLOW_TABLES <= tables:
        raise store_error(tracking_uri, "is an SQLite database of another application, not an MLflow store (its "
                          f"tables: {', '.join(sorted(tables)[:8])})", move)
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=60, isolation_level=None)) as con:
            con.execute("BEGIN IMMEDIATE")
            con.execute("CREATE TABLE fmnist_lab_write_check (x)")  # file and journal take a write...
            con.execute("ROLLBACK")  # ...which leaves nothing behind
    except sqlite3.Error as err:
        busy(tracking_uri, err)
        raise store_error(tracking_uri, f"cannot be written (SQLite: {err})", writable) from None


def busy(tracking_uri: str, err: sqlite3.Error) -> None:
    """Another process held the store for the whole timeout: nothing is wrong with the store itself."""
    if "locked" in str(err):
        raise store_error(tracking_uri, f"stayed locked by another process for 60 s (SQLite: {err})",
                          "try again later, or ") from None


class MLflowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger, whose MLflow run is created up front, under a lock, and remembered in the run
    directory (`mlflow.json`): a resumed run goes on logging into the same MLflow run. `log_files` adds the
    run's own files as artifacts. Its name is the run directory as seen from paths.log_dir, after a sweep job's
    swept values (`fmnist_lab.swept`), which are its params from the start.

    A store that cannot take the run raises a ConfigError here, before any training. One that fails later
    costs one warning and MLflow's records for the rest of the run, never the run itself."""

    def __init__(self, run_dir: str, log_dir: str, tracking_uri: str, experiment_name: str = "fmnist_lab",
                 artifact_location: str | None = None, tags: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.record = RunDir(run_dir).mlflow
        self.tracking_uri = tracking_uri
        self.failed = False  # the store failed during the run: nothing more goes to it
        run_id = None
        try:
            if is_rank_zero():  # the other DDP ranks get Lightning's dummy experiment and log nothing
                check_store(tracking_uri)
                run_id = self.mlflow_run(Path(run_dir), Path(log_dir), tracking_uri, experiment_name,
                                         artifact_location, tags or {})
            super().__init__(experiment_name=experiment_name, tracking_uri=tracking_uri,
                             artifact_location=artifact_location, run_id=run_id, **kwargs)
            if run_id:  # opened now: Lightning reads it outside the guarded methods below, in every trainer's setup
                _ = self.experiment
        except store_errors() as err:  # what check_store cannot see: e.g. a server that does not answer
            raise store_error(tracking_uri, f"failed as this run was set up in it ({first_line(err)})") from None

    def guarded(self, write: Callable[..., Any], *args: Any) -> None:
        """`write(*args)`, unless the store failed; its first failure is one warning, and the run goes on."""
        if self.failed:
            return
        try:
            write(*args)
        except store_errors() as err:
            self.failed = True
            log.warning(f"MLflow store {self.tracking_uri} failed ({first_line(err)}); "
                        "this run logs nothing more to MLflow, and writes its own files (metrics.json, checkpoints) "
                        "as usual.")

    def log_hyperparams(self, params: Any) -> None:
        self.guarded(self.new_params, params)

    def new_params(self, params: Any) -> None:
        """`params` but those the run has already: MLflow refuses a param logged again with another value, and the
        swept ones came at its start, as the command line wrote them (lr=1e-3, where the settings say 0.001)."""
        logged = self.experiment.get_run(self.run_id).data.params
        super().log_hyperparams({k: v for k, v in dict(params).items() if k not in logged})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.guarded(super().log_metrics, metrics, step)

    def finalize(self, status: str = "success") -> None:
        self.guarded(super().finalize, status)

    def mlflow_run(self, run_dir: Path, log_dir: Path, tracking_uri: str, experiment_name: str,
                   artifact_location: str | None, tags: dict[str, Any]) -> str:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        try:
            earlier = read_json(self.record) if self.record.is_file() else {}
        except (OSError, BadFileError):  # damaged: this run starts a new MLflow run
            earlier = {}
        with store_lock(tracking_uri):
            client = MlflowClient(tracking_uri)
            if earlier.get("tracking_uri") == tracking_uri and earlier.get("run_id"):
                client.update_run(earlier["run_id"], status="RUNNING")  # resumed
                return earlier["run_id"]
            experiment = client.get_experiment_by_name(experiment_name)
            experiment_id = experiment.experiment_id if experiment else \
                client.create_experiment(experiment_name, artifact_location=artifact_location)
            folder = str(run_dir.resolve().relative_to(log_dir.resolve())) \
                if run_dir.resolve().is_relative_to(log_dir.resolve()) else run_dir.name
            values = swept.current()  # a sweep job's: its name, and params from the start (a failed job has them)
            overrides = RunDir(run_dir).overrides  # what this run changed, as `runs` shows it
            tags = {"run_dir": str(run_dir.resolve()),
                    "overrides": " ".join(yaml.safe_load(overrides.read_text()) or []) if overrides.is_file() else "",
                    **{k: str(v) for k, v in tags.items()}}
            run = client.create_run(experiment_id, run_name=f"{swept.run_name(values)} ({folder})" if values
                                    else folder, tags=tags)
            client.log_batch(run.info.run_id, params=[Param(swept.hparam_name(k), v) for k, v in values])
        self.record.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.record, {"tracking_uri": tracking_uri, "experiment_id": experiment_id,
                                 "run_id": run.info.run_id})
        return run.info.run_id

    def log_files(self, paths: Iterable[Path]) -> None:
        for path in paths:
            if path.is_file():
                self.guarded(self.experiment.log_artifact, self.run_id, str(path))

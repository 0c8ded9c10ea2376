"""What the loggers record about a run as a whole: the knobs a user sweeps (TensorBoard's HPARAMS tab, MLflow's
params), and `MLflowLogger`, Lightning's MLFlowLogger on an offline SQLite store that parallel jobs share.

    python -m fmnist_lab logger=mlflow                  # or logger=[tensorboard,mlflow]
    mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.loggers import MLFlowLogger

from fmnist_lab.run_dir import BadFileError, RunDir, is_rank_zero, read_json, write_json

# Off unless a user turns it on: runs are offline, and a tracking store is no place for phoning home.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
SQLITE = "sqlite:///"


def swept_knobs(config: dict[str, Any]) -> dict[str, Any]:
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
                  "finetune/init_from": (config.get("finetune") or {}).get("init_from")})
    return {k: "none" if v is None else v for k, v in knobs.items()}


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


class MLflowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger, whose MLflow run is created up front, under a lock, and remembered in the run
    directory (`mlflow.json`): a resumed run goes on logging into the same MLflow run. `log_files` adds the
    run's own files as artifacts. `run_name` is the run directory as seen from paths.log_dir."""

    def __init__(self, run_dir: str, log_dir: str, tracking_uri: str, experiment_name: str = "fmnist_lab",
                 artifact_location: str | None = None, tags: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.record = RunDir(run_dir).mlflow
        run_id = None
        if is_rank_zero():  # the other DDP ranks get Lightning's dummy experiment and log nothing
            run_id = self.mlflow_run(Path(run_dir), Path(log_dir), tracking_uri, experiment_name, artifact_location,
                                     tags or {})
        super().__init__(experiment_name=experiment_name, tracking_uri=tracking_uri,
                         artifact_location=artifact_location, run_id=run_id, **kwargs)

    def mlflow_run(self, run_dir: Path, log_dir: Path, tracking_uri: str, experiment_name: str,
                   artifact_location: str | None, tags: dict[str, Any]) -> str:
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
            name = str(run_dir.resolve().relative_to(log_dir.resolve())) \
                if run_dir.resolve().is_relative_to(log_dir.resolve()) else run_dir.name
            overrides = RunDir(run_dir).overrides  # what this run changed, as `runs` shows it
            tags = {"run_dir": str(run_dir.resolve()),
                    "overrides": " ".join(yaml.safe_load(overrides.read_text()) or []) if overrides.is_file() else "",
                    **{k: str(v) for k, v in tags.items()}}
            run = client.create_run(experiment_id, run_name=name, tags=tags)
        self.record.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.record, {"tracking_uri": tracking_uri, "experiment_id": experiment_id,
                                 "run_id": run.info.run_id})
        return run.info.run_id

    def log_files(self, paths: Iterable[Path]) -> None:
        for path in paths:
            if path.is_file():
                self.experiment.log_artifact(self.run_id, str(path))

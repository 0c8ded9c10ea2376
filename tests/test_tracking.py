"""MLflow as a tracking store (SQLite, offline), and what the loggers record about a run as a whole."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import TensorBoardLogger
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

from conftest import compose_cfg, only_run_dir, run_cli, web_server
from fmnist_lab.build import plain
from fmnist_lab.config import ConfigError, validate
from fmnist_lab.results import log_failed, viewers
from fmnist_lab.run_dir import RunDir
from fmnist_lab.tensorboard_hparams import final_numbers, record
from fmnist_lab.tracking import MLflowLogger, check_store, logged_settings

QUICK = ["debug=limit", "device=cpu", "~callbacks.onnx_export"]
FRESH_SHELL = ("env", "-i", f"PATH={os.defpath}", f"HOME={Path.home()}")  # a shell where the venv is not active


def mlflow_runs(log_dir: Path) -> list:
    client = MlflowClient(f"sqlite:///{log_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fmnist_lab")
    return client, client.search_runs([experiment.experiment_id])


@pytest.mark.slow
def test_a_parallel_sweep_logs_every_job_into_one_new_mlflow_store(synthetic_root, tmp_path):
    """Two jobs at once meet a store that does not exist yet: both runs arrive whole, with no database error."""
    result = run_cli(tmp_path, "-m", "lr=0.05,0.1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                     "logger=[tensorboard,mlflow]", f"data.root={synthetic_root}", *QUICK)
    assert "OperationalError" not in result.stdout + result.stderr and "IntegrityError" not in result.stderr
    client, runs = mlflow_runs(tmp_path / "outputs")
    assert sorted(r.data.params["lr"] for r in runs) == ["0.05", "0.1"]
    for run in runs:
        job = Path(run.data.tags["run_dir"])
        metrics = json.loads((job / "metrics.json").read_text())
        # named by its swept value, then its folder; the objective (optimized_metric) a metric to sort by
        lr = run.data.params["lr"]
        assert run.info.status == "FINISHED"
        assert run.info.run_name == f"lr={lr} ({job.relative_to(tmp_path / 'outputs')})"
        assert run.data.tags["overrides"].startswith(f"lr={lr} ")
        assert run.data.metrics["val/acc_best"] == pytest.approx(metrics["val/acc_best"])
        assert run.data.params["optimizer"] == "SGD" and run.data.params["model/hidden"] == "[512, 512]"
        assert run.data.metrics["test/acc"] == pytest.approx(metrics["test/acc"])
        assert run.data.metrics["test/macro_f1"] == pytest.approx(metrics["test/macro_f1"])
        history = client.get_metric_history(run.info.run_id, "val/acc")
        assert [m.step for m in history] == sorted(m.step for m in history) and len(history) == metrics["epochs"]
        files = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"metrics.json", "confusion_matrix.png", "misclassified.png", "config.yaml"} <= files
        assert json.loads((job / "mlflow.json").read_text())["run_id"] == run.info.run_id
        assert (job / "tensorboard").is_dir()  # both loggers at once
    assert len(list((tmp_path / "outputs" / "mlartifacts").iterdir())) == 2  # artifacts beside the store

    # the command each job printed serves both runs, from a shell without the venv on its PATH
    printed = set(re.findall(r"mlflow: +(.+)$", result.stdout, re.MULTILINE))  # parallel jobs' lines: "job 0: ..."
    assert printed == {f"{Path(sys.executable).with_name('mlflow')} ui --backend-store-uri "
                       f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"}
    with web_server(tmp_path, *FRESH_SHELL, *shlex.split(printed.pop()), "--port", "{port}") as url:
        request = urllib.request.Request(f"{url}/api/2.0/mlflow/runs/search", method="POST",
                                         data=json.dumps({"experiment_ids": [runs[0].info.experiment_id]}).encode(),
                                         headers={"Content-Type": "application/json"})
        served = json.loads(urllib.request.urlopen(request, timeout=30).read())["runs"]
    assert sorted(r["info"]["run_id"] for r in served) == sorted(r.info.run_id for r in runs)


def test_the_logged_settings_are_the_knobs_a_user_sweeps(tmp_path):
    knobs = logged_settings(plain(compose_cfg("model=cnn", "optimizer=adamw", "data.augment.flip=0.5",
                                          output_dir=tmp_path)))
    assert {"lr": 0.05, "batch_size": 128, "epochs": 10, "seed": 42, "device": "auto", "model": "CNN",
            "model/channels": "[32, 64, 128]", "optimizer": "AdamW", "optimizer/weight_decay": 0.01,
            "scheduler": "CosineAnnealingLR", "data/augment/flip": 0.5,
            "trainer/precision": "32-true"}.items() <= knobs.items()
    assert len(knobs) < 40
    assert not [k for k, v in knobs.items() if "_target_" in k or "path" in k or "dir" in k or "root" in k
                or isinstance(v, dict | list)]


def test_logger_mlflow_without_mlflow_installed_says_how_to_install_it(tmp_path, monkeypatch):
    cfg = compose_cfg("logger=mlflow", output_dir=tmp_path)
    validate(cfg)  # installed here (make setup)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` meets where it is not installed
    with pytest.raises(ConfigError, match=r"logger='mlflow'\. MLflow is not installed here: pip install -e '\.\[tr"):
        validate(cfg)


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory) -> Path:
    """A real MLflow store with a few runs in it, made by MLflow itself."""
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.create_experiment("fmnist_lab")
    for lr in (0.05, 0.1):
        run = client.create_run(experiment).info.run_id
        client.log_param(run, "lr", lr)
        for step in range(20):
            client.log_metric(run, "val/acc", step / 20, step=step)
    return db


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder where this process cannot create a file: a read-only one; as root, whom permissions do not stop,
    /sys, where nobody can create a file."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            (candidate / "fmnist_lab_probe").touch()
        except OSError:
            return candidate
        (candidate / "fmnist_lab_probe").unlink()
    pytest.skip("no folder refuses this user a new file here (root ignores permissions, and /sys took a file)")


def sqlite_file(path: Path, *statements: str) -> Path:
    with sqlite3.connect(path) as con:
        for statement in statements:
            con.execute(statement)
    con.close()
    return path


def folder_not_writable(tmp_path: Path, real: Path) -> tuple[Path, str]:
    return unwritable_folder(tmp_path) / "mlflow.db", "cannot be written"


def truncated_copy(tmp_path: Path, real: Path) -> tuple[Path, str]:
    (tmp_path / "mlflow.db").write_bytes(real.read_bytes()[:real.stat().st_size // 2])
    return tmp_path / "mlflow.db", "is damaged (SQLite: "


# One store of each kind through the CLI (the others below go through the same check)
@pytest.mark.parametrize("unusable", [folder_not_writable, truncated_copy])
def test_a_store_that_cannot_be_used_stops_the_run_before_training(unusable, mlflow_store, tmp_path):
    store, words = unusable(tmp_path, mlflow_store)
    before = store.read_bytes() if store.is_file() else None
    uri = f"sqlite:///{store}"
    result = run_cli(tmp_path, "logger=mlflow", f"logger.mlflow.tracking_uri={uri}", *QUICK, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output, output[-3000:]
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.stderr.rstrip().endswith(error)  # the last word, on one line: one paragraph
    assert f"tracking_uri={uri!r}" in error and words in error, error
    assert "logger.mlflow.tracking_uri=sqlite:///" in error and "logger=tensorboard" in error  # the ways out
    assert "checkpoint" not in error and not list(tmp_path.rglob("*.ckpt"))  # nothing was trained
    assert (store.read_bytes() if store.is_file() else None) == before  # the store is left as it was


def refused(store: Path, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_store(f"sqlite:///{store}")
    assert str(err.value).startswith(f"Invalid config: logger.mlflow.tracking_uri='sqlite:///{store}'. ")
    assert words in str(err.value) and "\n" not in str(err.value), err.value


def test_check_store_names_what_is_wrong_with_a_store_and_keeps_good_ones(mlflow_store, tmp_path):
    (tmp_path / "random.db").write_bytes(os.urandom(5000))
    refused(tmp_path / "random.db", "is not an SQLite database, so not an MLflow store")
    theirs = sqlite_file(tmp_path / "theirs.db", "CREATE TABLE runs (id, name)", "INSERT INTO runs VALUES (1, 'x')")
    before = theirs.read_bytes()
    refused(theirs, "is an SQLite database of another application, not an MLflow store (its tables: runs)")
    assert theirs.read_bytes() == before  # MLflow would have added its tables to it
    (tmp_path / "file").write_text("in the way")
    refused(tmp_path / "file" / "outputs" / "mlflow.db", f"cannot be created: {tmp_path / 'file'} is a file")
    (tmp_path / "folder.db").mkdir()
    refused(tmp_path / "folder.db", "is a folder, not a file")
    newer = sqlite_file(shutil.copy(mlflow_store, tmp_path / "newer.db"),  # the tables of a later MLflow
                        "UPDATE alembic_version SET version_num = 'ffffffffffff'")
    refused(newer, "cannot be used by MLflow 3")

    in_use = shutil.copy(mlflow_store, tmp_path / "in_use.db")
    check_store(f"sqlite:///{in_use}")
    assert in_use.read_bytes() == mlflow_store.read_bytes()  # its write check is undone
    check_store(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")
    (tmp_path / "empty.db").touch()  # an empty file is an empty SQLite database: MLflow creates its tables in it
    check_store(f"sqlite:///{tmp_path / 'empty.db'}")
    assert MlflowClient(f"sqlite:///{tmp_path / 'empty.db'}").get_experiment_by_name("Default")


def test_a_read_only_store_file_is_refused(mlflow_store, tmp_path):
    store = shutil.copy(mlflow_store, tmp_path / "mlflow.db")
    store.chmod(0o444)
    if os.access(store, os.W_OK):
        pytest.skip("root writes to a read-only file: no file can be made unwritable to it without chattr or a "
                    "mount (the folder variant above covers an unwritable store for root, through /sys)")
    refused(store, "cannot be written (SQLite: attempt to write a readonly database)")


@pytest.mark.slow
def test_a_store_that_fails_during_the_run_costs_one_warning_not_the_run(real_root, tmp_path):
    """The store's folder is replaced by a file once the run has started: the run ends as usual, with its own
    files, and says once that MLflow stopped taking its records."""
    store = tmp_path / "store"
    command = [sys.executable, "-m", "fmnist_lab", "logger=[tensorboard,mlflow]", f"data.root={real_root}",
               f"logger.mlflow.tracking_uri=sqlite:///{store}/mlflow.db", *QUICK, "epochs=1"]
    job = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the loggers are built once the parameter count is logged; training comes next
        while not any("parameters:" in log.read_text() for log in tmp_path.glob("outputs/*/*/fmnist_lab.log")):
            assert job.poll() is None, job.communicate()
            time.sleep(0.05)
        store.rename(tmp_path / "store.away")
        store.write_text("a file where the store's folder was")
        stdout, stderr = job.communicate(timeout=600)
    finally:
        job.kill()
    output = stdout + stderr
    assert job.returncode == 0 and "Traceback" not in output, output[-3000:]
    (warning,) = [line for line in output.splitlines() if "MLflow" in line and "WARNING" in line]
    # SQLite's words depend on whether the store's connection was open when its folder went
    assert re.search(rf"MLflow store sqlite:///{re.escape(str(store))}/mlflow.db failed \(OperationalError: "
                     r"(unable to open database file|attempt to write a readonly database)\)", warning), warning
    run = only_run_dir(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and "test/acc" in metrics and metrics.get("status", "ok") == "ok"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "model_weights.pth").is_file()


def hparams_entry(folder: Path) -> tuple[Any, Any, Any, dict[str, list]]:
    """The experiment, session start and session end a TensorBoard run's folder holds, and its scalars."""
    events = EventAccumulator(str(folder))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    experiment, start, end = (plugin_data_pb2.HParamsPluginData.FromString(content[f"_hparams_/{tag}"])
                              for tag in ("experiment", "session_start_info", "session_end_info"))
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    return experiment.experiment, start.session_start_info, end.session_end_info, scalars


def test_the_hparams_row_of_a_sweep_job_opens_on_its_swept_keys_and_the_objective(tmp_path):
    """TensorBoard's page ticks the first five hparams and metrics of the experiment: a sweep job's lists its swept
    keys (marked `differs`, which the server sorts first), a swept key the settings lack included, and the
    objective first; its session holds every setting. A single run's experiment lists every setting."""
    settings = logged_settings(plain(compose_cfg("lr=1e-3", output_dir=tmp_path)))
    numbers = final_numbers({"test/loss": 0.41, "test/acc": 0.87, "val/acc_best": 0.88}, "test/loss")
    logger = TensorBoardLogger(tmp_path, name="tensorboard", version="job", default_hp_metric=False)
    record(logger, settings, numbers, [("lr", "1e-3"), ("trainer.limit_train_batches", "40")], "success", 7)

    experiment, start, end, scalars = hparams_entry(tmp_path / "tensorboard" / "job")
    assert [(info.name, info.differs) for info in experiment.hparam_infos] == [
        ("lr", True), ("trainer/limit_train_batches", True)]
    assert [m.name.tag for m in experiment.metric_infos] == ["hp/test_loss", "hp/val_acc_best", "hp/test_acc"]
    assert start.hparams["lr"].number_value == 0.001  # the setting's value, not the override's spelling
    assert start.hparams["trainer/limit_train_batches"].number_value == 40
    assert start.hparams["optimizer/momentum"].number_value == 0.9 and len(start.hparams) == len(settings) + 1
    assert end.status == api_pb2.STATUS_SUCCESS
    assert scalars["hp/test_loss"] == [(7, pytest.approx(0.41))]
    assert scalars["hp/test_acc"] == [(7, pytest.approx(0.87))]

    single = TensorBoardLogger(tmp_path, name="tensorboard", version="single", default_hp_metric=False)
    record(single, settings, numbers, [], "success", 7)
    experiment = hparams_entry(tmp_path / "tensorboard" / "single")[0]
    assert [info.name for info in experiment.hparam_infos] == list(settings)
    assert not any(info.differs for info in experiment.hparam_infos)


class FailsInItsSecondEpoch(BoringModel):
    """Logs val/acc_best in its first epoch, then fails as a diverged run does."""

    def training_step(self, batch, batch_idx):
        if self.current_epoch == 1:
            raise FloatingPointError("training loss became nan")
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.log("val/acc_best", 0.625)


def test_a_job_that_failed_in_training_has_its_hparams_row_with_the_numbers_it_had(tmp_path):
    """What a failed job's hook (`log_failed`) records: its settings, the objective it had reached, the numbers it
    never got as empty cells, and status FAILURE."""
    logger = TensorBoardLogger(tmp_path, name="tensorboard", version="", default_hp_metric=False)
    trainer = pl.Trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=1, logger=logger,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(FloatingPointError):
        trainer.fit(FailsInItsSecondEpoch())
    log_failed(trainer, plain(compose_cfg("lr=10000", output_dir=tmp_path)), {"status": "failed", "epochs": 1})

    experiment, start, end, scalars = hparams_entry(tmp_path / "tensorboard")
    assert end.status == api_pb2.STATUS_FAILURE and start.hparams["lr"].number_value == 10000
    assert [m.name.tag for m in experiment.metric_infos] == ["hp/val_acc_best", "hp/test_acc", "hp/test_loss"]
    assert scalars["hp/val_acc_best"] == [(2, 0.625)] and "hp/test_acc" not in scalars


def test_the_result_names_a_command_or_file_for_each_logger_that_wrote_the_run(tmp_path):
    """Runnable from a shell where the venv is not active: the tools' scripts beside this Python, by path."""
    run = RunDir(tmp_path / "run")
    (run.path / "csv").mkdir(parents=True)
    (run.path / "csv" / "metrics.csv").write_text("epoch\n")
    run.mlflow.write_text(json.dumps({"tracking_uri": "sqlite:////somewhere/mlflow.db", "run_id": "abc"}))
    bin_dir = Path(sys.executable).parent
    assert viewers(run, tensorboard=True) == [
        f"curves:    {bin_dir / 'tensorboard'} --logdir {run.tensorboard}",
        f"metrics:   {run.path / 'csv' / 'metrics.csv'}",
        f"mlflow:    {bin_dir / 'mlflow'} ui --backend-store-uri sqlite:////somewhere/mlflow.db"]
    assert viewers(RunDir(tmp_path / "no loggers"), tensorboard=False) == []


def test_a_param_the_run_has_already_keeps_its_value(tmp_path):
    """A sweep job's swept params come first, as the command line wrote them (lr=1e-3); the settings logged at its
    end (lr 0.001) leave them as they are, where MLflow would refuse the other value and the run lose MLflow."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLflowLogger(run_dir=str(tmp_path / "run"), log_dir=str(tmp_path), tracking_uri=uri)
    client = MlflowClient(uri)
    client.log_param(logger.run_id, "lr", "1e-3")
    logger.log_hyperparams({"lr": 0.001, "optimizer": "SGD"})
    assert not logger.failed
    assert client.get_run(logger.run_id).data.params == {"lr": "1e-3", "optimizer": "SGD"}

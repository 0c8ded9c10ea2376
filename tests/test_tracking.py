"""MLflow as a tracking store (SQLite, offline), and what the loggers record about a run as a whole."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import compose_cfg, only_run_dir, run_cli, web_server
from fmnist_lab.build import plain
from fmnist_lab.config import ConfigError, validate
from fmnist_lab.tracking import check_store, logged_settings

QUICK = ["debug=limit", "device=cpu", "~callbacks.onnx_export"]


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
        assert run.info.status == "FINISHED" and run.info.run_name == str(job.relative_to(tmp_path / "outputs"))
        assert run.data.tags["overrides"].startswith(f"lr={run.data.params['lr']} ")
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

    # the README's `mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db` serves both runs
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    with web_server(tmp_path, mlflow, "ui", "--backend-store-uri", "sqlite:///outputs/mlflow.db", "--port", "{port}") \
            as url:
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

"""MLflow as a tracking store (SQLite, offline), and what the loggers record about a run as a whole."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import compose_cfg, run_cli
from fmnist_lab.config import ConfigError, validate
from fmnist_lab.tracking import swept_knobs
from fmnist_lab.train import plain

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
    with mlflow_ui(tmp_path, "sqlite:///outputs/mlflow.db") as url:
        request = urllib.request.Request(f"{url}/api/2.0/mlflow/runs/search", method="POST",
                                         data=json.dumps({"experiment_ids": [runs[0].info.experiment_id]}).encode(),
                                         headers={"Content-Type": "application/json"})
        served = json.loads(urllib.request.urlopen(request, timeout=30).read())["runs"]
    assert sorted(r["info"]["run_id"] for r in served) == sorted(r.info.run_id for r in runs)


@contextmanager
def mlflow_ui(cwd: Path, store: str):
    """`mlflow ui` on a free port, as the README starts it; its base URL once it answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "ui", "--backend-store-uri", store,
                               "--port", str(port)], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def test_the_logged_settings_are_the_knobs_a_user_sweeps(tmp_path):
    knobs = swept_knobs(plain(compose_cfg("model=cnn", "optimizer=adamw", "data.augment.flip=0.5",
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

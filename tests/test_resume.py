"""Crash safety and exact resume: SIGKILL, SIGTERM, finished and broken runs, determinism."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import only_run_dir, run_cli
from fmnist_lab.train import ResumeError, resume_point

# 200 batches of 128 a epoch: a second or so, long enough to stop in the middle of epoch 2
QUICK = ["device=cpu", "~callbacks.onnx_export", "trainer.log_every_n_steps=20", "trainer.limit_train_batches=200",
         "trainer.limit_val_batches=2"]


def start_and_signal(cwd: Path, sig: int, *overrides: str) -> subprocess.CompletedProcess:
    """Start a 3-epoch run, send `sig` a little into epoch 2, and wait for it to end."""
    process = subprocess.Popen([sys.executable, "-m", "fmnist_lab", "epochs=3", *overrides], cwd=cwd,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("epoch 1/3"):  # EpochLog's line: epoch 1 is done, epoch 2 has begun
            time.sleep(0.3)
            process.send_signal(sig)
            break
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def train_loss_steps(run: Path) -> list[int]:
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return [e.step for e in events.Scalars("train/loss")]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_finishes_in_the_same_directory(synthetic_root, tmp_path):
    killed = start_and_signal(tmp_path, signal.SIGKILL, f"data.root={synthetic_root}", *QUICK)
    assert killed.returncode == -signal.SIGKILL
    run = only_run_dir(tmp_path)
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "metrics.json").exists()
    assert not list(run.rglob(".*.tmp"))  # no half-written file left behind

    resumed = run_cli(tmp_path, "resume=latest")
    assert only_run_dir(tmp_path) == run and f"artifacts: {run}" in resumed.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and metrics["global_step"] == 3 * 200 and metrics["resumed_from_step"] == 200
    steps = train_loss_steps(run)
    assert steps == list(range(20, 3 * 200 + 1, 20))  # every 20 steps, each exactly once, in order


@pytest.mark.slow
def test_sigterm_saves_last_ckpt_and_the_resumed_run_ends_like_an_uninterrupted_one(synthetic_root, tmp_path):
    common = [f"data.root={synthetic_root}", "logger=none", *QUICK]
    (tmp_path / "straight").mkdir()
    run_cli(tmp_path / "straight", "epochs=3", *common)
    straight = only_run_dir(tmp_path / "straight")

    (tmp_path / "stopped").mkdir()
    stopped = start_and_signal(tmp_path / "stopped", signal.SIGTERM, *common)
    assert stopped.returncode == 128 + signal.SIGTERM
    run = only_run_dir(tmp_path / "stopped")
    assert f"Continue with: python -m fmnist_lab resume={run}" in stopped.stderr
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 200 < step < 2 * 200  # saved where training stopped, in the middle of epoch 2

    run_cli(tmp_path / "stopped", f"resume={run}")
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((run / "metrics.json").read_text())
    assert (b["epochs"], b["global_step"], b["resumed_from_step"]) == (3, 3 * 200, step)
    assert (a["test/acc"], a["test/loss"], a["val/acc_best"]) == (b["test/acc"], b["test/loss"], b["val/acc_best"])
    weights_a = torch.load(straight / "model_weights.pth", weights_only=True)
    weights_b = torch.load(run / "model_weights.pth", weights_only=True)
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


@pytest.mark.slow
def test_resume_refuses_finished_missing_and_damaged_runs(synthetic_root, tmp_path):
    run_cli(tmp_path, f"data.root={synthetic_root}", "debug=limit", "epochs=1", "logger=none", *QUICK)
    run = only_run_dir(tmp_path)
    before = (run / "metrics.json").read_text()
    finished = run_cli(tmp_path, f"resume={run}")
    assert "already finished" in finished.stdout and (run / "metrics.json").read_text() == before

    (run / "metrics.json").unlink()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"half a checkpoint")
    damaged = run_cli(tmp_path, f"resume={run}", check=False)
    assert damaged.returncode == 1 and f"{run / 'checkpoints' / 'last.ckpt'} cannot be read" in damaged.stderr
    (run / "checkpoints" / "last.ckpt").unlink()
    with pytest.raises(ResumeError, match=r"has no checkpoints/last.ckpt .* nothing to continue"):
        resume_point(run)  # in-process: the same check the CLI makes, without another start-up
    nowhere = run_cli(tmp_path, f"resume={tmp_path / 'nope'}", check=False)
    assert nowhere.returncode == 1 and "resume=" in nowhere.stderr and "not a run directory" in nowhere.stderr
    for result in (damaged, nowhere):
        assert "Traceback" not in result.stderr

"""Crash safety and exact resume: SIGKILL, SIGTERM, finished and broken runs, determinism."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import compose_cfg, only_run_dir, run_cli
from fmnist_lab.config import ConfigError, validate
from fmnist_lab.evaluate import main as evaluate_main
from fmnist_lab.run_dir import RUN_STAMP, BadFileError, ResumeError, RunDir, atomic_write
from fmnist_lab.run_dir_resolvers import find_run

# 200 batches of 128 a epoch: a second or so, long enough to stop in the middle of epoch 2
# without the ONNX export and the test report, which these tests are not about
NO_TORCH = ("torch", "lightning")  # what a finished, damaged or foreign run is answered without
QUICK = ["device=cpu", "~callbacks.onnx_export", "~callbacks.report", "trainer.log_every_n_steps=20",
         "trainer.limit_train_batches=200", "trainer.limit_val_batches=2"]


def start_and_signal(cwd: Path, sig: int, *overrides: str, after_epoch: int = 1) -> subprocess.CompletedProcess:
    """Start a 3-epoch run, send `sig` a little into the epoch after `after_epoch`, and wait for it to end."""
    # A run started from a terminal: Ctrl-C raises KeyboardInterrupt (a shell without job control starts its
    # background commands with SIGINT ignored, and a Python started that way never sees a Ctrl-C).
    process = subprocess.Popen([sys.executable, "-m", "fmnist_lab", *overrides, "epochs=3"], cwd=cwd,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in process.stdout:
        if line.startswith(f"epoch {after_epoch}/3"):  # EpochProgress's line: that epoch is done, the next has begun
            time.sleep(0.3)
            process.send_signal(sig)
            break
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def finished_run(synthetic_root, tmp_path_factory) -> Path:
    """A finished 3-epoch run (with dropout, so resuming it exactly needs the RNG state too). The tests that
    change a run work on their own copy."""
    cwd = tmp_path_factory.mktemp("finished")
    run_cli(cwd, "epochs=3", f"data.root={synthetic_root}", "model.dropout=0.2", *QUICK)
    return only_run_dir(cwd)


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def train_loss_steps(run: Path) -> list[int]:
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return [e.step for e in events.Scalars("train/loss")]


def test_resume_latest_finds_the_newest_run_with_a_checkpoint(tmp_path):
    for name, checkpoint in (("2026-01-01/09-00-00", True), ("2026-01-02/08-00-00", True),
                             ("2026-01-02/09-00-00", False)):  # the newest has no checkpoint yet
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        if checkpoint:
            (tmp_path / name / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert find_run("latest", str(tmp_path)) == (tmp_path / "2026-01-02/08-00-00").resolve()
    assert find_run("latest", str(tmp_path / "none")) is None


@pytest.mark.slow
@pytest.mark.parametrize("sig, loggers", [(signal.SIGTERM, "[tensorboard,mlflow]"), (signal.SIGINT, "tensorboard")],
                         ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_saves_last_ckpt_and_the_resumed_run_ends_like_an_uninterrupted_one(synthetic_root, finished_run,
                                                                                     tmp_path, sig, loggers):
    """Exact resume, RNG streams included: with dropout, the weights at the end of the last epoch (trained
    after the resume) and that epoch's validation numbers equal those of a run never stopped. Ctrl-C lands
    anywhere in a step (forward, backward, optimizer), and must still stop where a checkpoint resumes exactly."""
    common = [f"data.root={synthetic_root}", "model.dropout=0.2", *QUICK]
    straight = finished_run
    (tmp_path / "stopped").mkdir()  # also into MLflow, which must go on in the same MLflow run
    stopped = start_and_signal(tmp_path / "stopped", sig, *common, f"logger={loggers}")
    assert stopped.returncode == (130 if sig == signal.SIGINT else 128 + signal.SIGTERM), stopped.stderr[-2000:]
    run = only_run_dir(tmp_path / "stopped")
    assert f"Continue with: python -m fmnist_lab resume={run}" in stopped.stderr
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 200 < step < 2 * 200  # saved where training stopped, in the middle of epoch 2

    run_cli(tmp_path / "stopped", f"resume={run}")
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((run / "metrics.json").read_text())
    assert (b["epochs"], b["global_step"], b["resumed_from_step"]) == (3, 3 * 200, step)
    # the time of both sessions: three epochs, and a fit time that covers them
    assert len(b["epoch_seconds"]) == 3 and b["train_seconds"] >= sum(b["epoch_seconds"])
    assert (a["test/acc"], a["test/loss"], a["val/acc_best"]) == (b["test/acc"], b["test/loss"], b["val/acc_best"])
    for name in ("model_weights.pth", "checkpoints/last.ckpt"):
        weights_a = torch.load(straight / name, weights_only=True)
        weights_b = torch.load(run / name, weights_only=True)
        if name.endswith(".ckpt"):
            assert weights_a["global_step"] == weights_b["global_step"] == 3 * 200  # trained after the resume
            weights_a, weights_b = weights_a["state_dict"], weights_b["state_dict"]
        assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a), name
    last_epoch = [last_scalars(r, ("val/loss", "val/acc", "train/loss_epoch")) for r in (straight, run)]
    assert last_epoch[0] == last_epoch[1]

    if "mlflow" not in loggers:
        return
    client = MlflowClient(f"sqlite:///{tmp_path / 'stopped' / 'outputs' / 'mlflow.db'}")
    (tracked,) = client.search_runs([client.get_experiment_by_name("fmnist_lab").experiment_id])
    assert tracked.info.status == "FINISHED" and tracked.data.metrics["test/acc"] == pytest.approx(b["test/acc"])
    steps = [m.step for m in client.get_metric_history(tracked.info.run_id, "val/acc")]
    assert steps == [199, 399, 599]  # each epoch's last step, before and after the resume


@pytest.mark.slow
def test_a_signal_while_the_run_sets_up_stops_it_at_its_first_batch(synthetic_root, tmp_path):
    """SIGTERM before Lightning has taken the signal over (data loading, model set-up) is not forgotten until
    the end of training: training stops at its first batch, and the run is marked interrupted."""
    process = subprocess.Popen([sys.executable, "-m", "fmnist_lab", f"data.root={synthetic_root}", "logger=none",
                                "epochs=30", *QUICK], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if "parameters:" in line:  # logged once the model is built, before fit sets up its data
            process.send_signal(signal.SIGTERM)
            break
    process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM
    metrics = json.loads((only_run_dir(tmp_path) / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["global_step"] < 200  # not 30 epochs of 200 batches


def last_scalars(run: Path, tags: tuple[str, ...]) -> dict[str, tuple[int, float]]:
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: (events.Scalars(tag)[-1].step, events.Scalars(tag)[-1].value) for tag in tags}


def test_a_write_that_fails_half_way_keeps_the_previous_file_whole(tmp_path):
    """metrics.json, checkpoints, weights and model.onnx are written through atomic_write: a writer that dies
    half-way (a full disk, a Ctrl-C) leaves the last good file complete and no temporary file behind."""
    target = tmp_path / "metrics.json"
    target.write_text('{"test/acc": 0.9}')

    def half(error: BaseException):
        def write(tmp: Path) -> None:
            tmp.write_text('{"test/a')
            raise error
        return write

    with pytest.raises(OSError, match="No space left on device") as info:
        atomic_write(target, half(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    assert info.value.filename == str(target)  # the error names the file meant, not the temporary one
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half(KeyboardInterrupt()))
    assert target.read_text() == '{"test/acc": 0.9}' and os.listdir(tmp_path) == ["metrics.json"]
    atomic_write(target, lambda tmp: tmp.write_text("{}"))
    assert target.read_text() == "{}" and os.listdir(tmp_path) == ["metrics.json"]


@pytest.mark.slow
def test_resume_refuses_finished_missing_and_damaged_runs(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    before = (run / "metrics.json").read_text()
    finished = run_cli(tmp_path, f"resume={run}", check=False, blocked=NO_TORCH)  # answered before torch loads
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert f"{run} already finished (3 epochs, test/acc " in finished.stdout
    assert (run / "metrics.json").read_text() == before

    (run / "metrics.json").unlink()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"half a checkpoint")
    damaged = run_cli(tmp_path, f"resume={run}", check=False)
    assert damaged.returncode == 1 and f"{run / 'checkpoints' / 'last.ckpt'} cannot be read" in damaged.stderr
    assert "Traceback" not in damaged.stderr and "weights_only" not in damaged.stderr  # none of torch's advice
    (run / "checkpoints" / "last.ckpt").unlink()
    with pytest.raises(ResumeError, match=r"has no checkpoints/last.ckpt .* nothing to continue"):
        RunDir(run).resume_point("any")  # in-process: the same check the CLI makes, without another start-up
    with pytest.raises(ConfigError, match=r"resume=.*nope.* not a run directory"):
        validate(compose_cfg(f"resume={tmp_path / 'nope'}"))  # the CLI prints this paragraph and exits 1


@pytest.mark.slow
def test_a_moved_run_resumes_and_tests_from_its_own_checkpoints(finished_run, tmp_path):
    """Checkpoints and metrics.json name the run's files relative to it: a run copied elsewhere (the original
    gone) that stopped after training resumes, tests its own best.ckpt and records where it is."""
    original = finished_run
    first = json.loads((original / "metrics.json").read_text())
    assert first["best_checkpoint"] == "checkpoints/best.ckpt"
    moved = copy_run(original, tmp_path / "elsewhere" / "run")
    (moved / "metrics.json").unlink()  # as if it had stopped before the test
    last = torch.load(moved / "checkpoints" / "last.ckpt", weights_only=True)
    assert str(original) not in repr(last["callbacks"])
    # last.ckpt is the end of the last epoch, though val/acc (1.0 on this easy data) stopped improving after one
    assert last["global_step"] == 3 * 200

    away = original.rename(original.with_name(original.name + "-away"))  # the original is gone while it resumes
    try:
        run_cli(tmp_path, f"resume={moved}")
    finally:
        away.rename(original)
    again = json.loads((moved / "metrics.json").read_text())
    assert again["best_checkpoint"] == "checkpoints/best.ckpt" and again["test/acc"] == first["test/acc"]
    assert again["epoch_seconds"] == first["epoch_seconds"]


@pytest.mark.slow
def test_sigterm_while_testing_or_exporting_is_an_interruption_that_resume_finishes(synthetic_root, tmp_path):
    """A signal after training (during the test or the ONNX export) is never success: exit 143, metrics.json
    marked interrupted; resume= then tests and exports the run."""
    process = subprocess.Popen([sys.executable, "-m", "fmnist_lab", f"data.root={synthetic_root}", "device=cpu",
                                "debug=limit", "epochs=1", "logger=none"], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("epoch 1/1:"):  # training has ended: the test and the export follow
            process.send_signal(signal.SIGTERM)
            break
    stdout, stderr = process.communicate(timeout=300)
    run = only_run_dir(tmp_path)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert f"Continue it with: python -m fmnist_lab resume={run}" in stderr and "Traceback" not in stderr
    assert json.loads((run / "metrics.json").read_text())["status"] == "interrupted"

    run_cli(tmp_path, f"resume={run}")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics.get("status", "ok") == "ok" and metrics["onnx"]["ok"] and metrics["test/acc"] > 0.9


@pytest.mark.slow
def test_sigterm_in_a_sweep_records_the_job_and_stops_the_sweep(synthetic_root, tmp_path):
    sweep_dir = tmp_path / "sweep"
    stopped = start_and_signal(tmp_path, signal.SIGTERM, "-m", "lr=0.05,0.1", f"data.root={synthetic_root}",
                               "logger=none", f"hydra.sweep.dir={sweep_dir}", *QUICK)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    (row,) = csv.DictReader((sweep_dir / "summary.csv").open())
    assert (row["job"], row["status"]) == ("0", "interrupted") and row["error"].startswith("SIGTERM at step")
    assert not (sweep_dir / "1").exists()  # the sweep stopped: the second job never started
    assert "interrupted: SIGTERM" in (sweep_dir / "summary.md").read_text()
    assert json.loads((sweep_dir / "0" / "metrics.json").read_text())["status"] == "interrupted"
    assert json.loads((sweep_dir / "0" / "metrics.json").read_text())["signal"] == "SIGTERM"

    # the same command again continues the sweep: job 0 from its checkpoint, then job 1
    run_cli(tmp_path, "-m", "lr=0.05,0.1", f"data.root={synthetic_root}", "logger=none",
            f"hydra.sweep.dir={sweep_dir}", *QUICK, "epochs=3")
    first = json.loads((sweep_dir / "0" / "metrics.json").read_text())
    assert first.get("status", "ok") == "ok" and 200 < first["resumed_from_step"] < 400
    table = (sweep_dir / "summary.md").read_text()
    assert table.count("| 0 |") == 1 and table.count("| 1 |") == 1 and "interrupted" not in table


@pytest.mark.slow
def test_ctrl_c_saves_marks_and_exits_130(synthetic_root, tmp_path):
    stopped = start_and_signal(tmp_path, signal.SIGINT, f"data.root={synthetic_root}", "logger=none", *QUICK)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    run = only_run_dir(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["error"].startswith("Ctrl-C at step")
    assert 200 < torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] < 400
    assert metrics["signal"] == "SIGINT"  # the signal as a field: nothing parses it out of the error's words


@pytest.mark.slow
def test_ctrl_c_in_a_sweep_stops_it_with_130_from_the_jobs_signal_field(synthetic_root, tmp_path):
    sweep_dir = tmp_path / "sweep"
    stopped = start_and_signal(tmp_path, signal.SIGINT, "-m", "lr=0.05,0.1", f"data.root={synthetic_root}",
                               "logger=none", f"hydra.sweep.dir={sweep_dir}", *QUICK)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    metrics = json.loads((sweep_dir / "0" / "metrics.json").read_text())
    assert (metrics["status"], metrics["signal"]) == ("interrupted", "SIGINT")
    assert not (sweep_dir / "1").exists()


@pytest.mark.slow
def test_damaged_run_files_are_named_by_resume_and_evaluate(synthetic_root, finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    metrics = (run / "metrics.json").read_text()

    (run / "metrics.json").write_text(metrics[: len(metrics) // 2])  # cut off mid-write by something else
    result = run_cli(tmp_path, f"resume={run}", check=False, blocked=NO_TORCH)
    assert result.returncode == 1 and f"{run / 'metrics.json'} is damaged" in result.stderr
    assert "Traceback" not in result.stderr

    # evaluate in-process (its command line is tested in test_artifacts): quicker
    (run / "metrics.json").write_text(json.dumps({"status": "failed", "error": "FloatingPointError: nan"}))
    assert evaluate_main([f"run={run}", "device=cpu", f"data.root={synthetic_root}"]) == 0
    assert "the run is marked failed (FloatingPointError: nan), so it recorded no test/acc" in capsys.readouterr().out

    (run / ".hydra" / "config.yaml").write_text("data: [unclosed\n")
    result = run_cli(tmp_path, f"resume={run}", check=False, blocked=NO_TORCH)
    assert result.returncode == 1 and f"{run / '.hydra' / 'config.yaml'} is damaged" in result.stderr
    assert evaluate_main([f"run={run}"]) == 1 and "config.yaml is damaged" in capsys.readouterr().err

    (run / "model_weights.pth").write_bytes(b"\x00" * 100)
    assert evaluate_main([f"run={run / 'model_weights.pth'}", f"data.root={synthetic_root}"]) == 1
    assert f"{run / 'model_weights.pth'} is not a model file" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_takes_only_the_runs_own_checkpoint(finished_run, tmp_path):
    """A last.ckpt that another run wrote (another config, another architecture), or one that says nothing of
    its run, is refused in one paragraph; the run's own checkpoints resume."""
    run = copy_run(finished_run, tmp_path / "run")
    (run / "metrics.json").unlink()
    own = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    foreign = {**own, RUN_STAMP: {"config": "0" * 64}}
    cnn = {**foreign, "hyper_parameters": {**own["hyper_parameters"], "net": {"_target_": "fmnist_lab.models.CNN"}}}
    unstamped = {k: v for k, v in own.items() if k != RUN_STAMP}
    for checkpoint in (foreign, cnn, unstamped):
        torch.save(checkpoint, run / "checkpoints" / "last.ckpt")
        with pytest.raises(ResumeError, match=r"last.ckpt was not written by this run.*own last.ckpt back"):
            RunDir(run).resume_point(own[RUN_STAMP]["config"])
    result = run_cli(tmp_path, f"resume={run}", check=False)
    assert result.returncode == 1 and "was not written by this run" in result.stderr
    assert "Traceback" not in result.stderr and not (run / "metrics.json").exists()
    torch.save(own, run / "checkpoints" / "last.ckpt")
    assert RunDir(run).resume_point(own[RUN_STAMP]["config"])[1] == own["global_step"]


@pytest.mark.slow
def test_resume_runs_no_code_that_a_saved_config_names(finished_run, tmp_path):
    """A run folder may come from elsewhere: a _target_ in its .hydra/config.yaml that fmnist_lab's configs do
    not name is refused (here a "callback" that would create a file)."""
    run = copy_run(finished_run, tmp_path / "run")
    (run / "metrics.json").unlink()
    saved = (run / ".hydra" / "config.yaml").read_text()
    crafted = saved.replace("callbacks:\n", "callbacks:\n  pwn:\n    _target_: builtins.open\n    file: PWNED\n"
                            "    mode: w\n", 1)
    assert crafted != saved
    (run / ".hydra" / "config.yaml").write_text(crafted)
    result = run_cli(tmp_path, f"resume={run}", check=False, blocked=NO_TORCH)
    assert result.returncode == 1 and "callbacks.pwn._target_=builtins.open" in result.stderr
    assert not (tmp_path / "PWNED").exists() and "Traceback" not in result.stderr


OPEN = "{_target_: builtins.open, file: PWNED, mode: w}"
UNSAFE_ENTRIES = {"oc.create": f"pwn: '${{oc.create:{OPEN}}}'",  # builds a callback to instantiate
                  "oc.decode": "pwn: '${oc.decode:\"{_target_: builtins.open, file: PWNED, mode: w}\"}'",
                  "interpolated-name": f"how: oc.create\n  pwn: '${{${{.how}}:{OPEN}}}'",  # a resolver named by a key
                  "oc.env": "pwn: ${oc.env:HOME}"}  # reads this machine's environment


@pytest.mark.slow
def test_a_saved_configs_interpolations_build_nothing(finished_run, tmp_path):
    """Interpolations in a saved config are resolved only when they refer to other keys or call a resolver
    that only computes a value: the run's config is refused (resume and evaluate read it through
    RunDir.load_config) before anything is built."""
    run = copy_run(finished_run, tmp_path / "run")
    (run / "metrics.json").unlink()
    saved = (run / ".hydra" / "config.yaml").read_text()
    for name, entry in UNSAFE_ENTRIES.items():
        (run / ".hydra" / "config.yaml").write_text(saved.replace("callbacks:\n", f"callbacks:\n  {entry}\n", 1))
        with pytest.raises(BadFileError, match="has interpolations that fmnist_lab does not resolve"):
            RunDir(run).load_config()
        if name != "oc.create":
            continue  # the commands, once: the attack as reported
        for command in ([f"resume={run}"], [f"run={run}", "device=cpu"]):
            module = "fmnist_lab" if command[0].startswith("resume") else "fmnist_lab.evaluate"
            result = run_cli(tmp_path, *command, module=module, check=False)
            assert result.returncode == 1 and "has interpolations that fmnist_lab does not resolve" in result.stderr
            assert "Traceback" not in result.stderr and not (tmp_path / "PWNED").exists()
    (run / ".hydra" / "config.yaml").write_text(saved)
    assert RunDir(run).load_config().seed == 42  # the run's own config, with its ${...} references, loads


@pytest.mark.slow
def test_resume_refuses_alias_bombs_and_fifos_at_once(finished_run, tmp_path):
    """A saved config of nested YAML aliases (a few hundred bytes that expand to gigabytes), or a FIFO in place
    of a run's file, is refused in one paragraph: nothing waits, nothing grows."""
    run = copy_run(finished_run, tmp_path / "run")
    (run / "metrics.json").unlink()
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9))
    config = run / ".hydra" / "config.yaml"
    saved = config.read_text()
    config.write_text(saved + bomb)
    result = run_cli(tmp_path, f"resume={run}", check=False, timeout=60, blocked=NO_TORCH)
    assert result.returncode == 1 and "uses YAML anchors or aliases" in result.stderr, result.stderr[-2000:]
    for name in ("metrics.json", ".hydra/config.yaml"):
        config.write_text(saved)
        (run / name).unlink(missing_ok=True)
        os.mkfifo(run / name)
        result = run_cli(tmp_path, f"resume={run}", check=False, timeout=60, blocked=NO_TORCH)
        assert result.returncode == 1 and f"{run / name} is a FIFO, not a file" in result.stderr
        assert "Traceback" not in result.stderr
        (run / name).unlink()


def mounted(folder: Path, options: str):
    """A tmpfs mounted at `folder` with `options`, unmounted after the test."""
    folder.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small file system here (needs root): {result.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    """A 14 MB file system: room for one epoch's two checkpoints of the default MLP (5.4 MB each), no more."""
    yield from mounted(tmp_path / "disk", "size=14m")


@pytest.fixture
def read_only_disk(tmp_path):
    yield from mounted(tmp_path / "ro", "ro,size=1m")


def test_a_read_only_run_folder_is_refused_before_any_work(read_only_disk, tmp_path):
    from fmnist_lab.run_dir import RunDirError
    from fmnist_lab.train import train

    with pytest.raises(RunDirError, match=r"ro/run is not writable \(Read-only file system\).*paths.log_dir"):
        train(compose_cfg("device=cpu", "data.root=/nonexistent", output_dir=read_only_disk / "run"))
    # on the command line, where Hydra creates the run folder before any training code runs
    result = run_cli(tmp_path, f"paths.log_dir={read_only_disk / 'outputs'}", "device=cpu", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"cannot create the run folder {read_only_disk / 'outputs'}" in result.stderr
    assert "Read-only file system" in result.stderr and "paths.log_dir=" in result.stderr


@pytest.mark.slow
def test_a_full_disk_stops_the_run_in_one_paragraph_and_keeps_the_last_good_checkpoint(synthetic_root, tmp_path,
                                                                                       small_disk):
    result = run_cli(tmp_path, f"paths.log_dir={small_disk}", f"data.root={synthetic_root}", "debug=limit",
                     "epochs=3", "logger=none", *QUICK, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "no space left on device" in result.stderr and f"{small_disk}" in result.stderr
    (run,) = [p.parent for p in small_disk.glob("*/*/checkpoints")]
    assert not list(small_disk.rglob("*.tmp"))  # the half-written checkpoint is gone
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] > 0 and last["epoch"] == 0  # epoch 1's checkpoint, intact
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "No space left on device" in metrics["error"]

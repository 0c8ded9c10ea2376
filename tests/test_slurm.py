"""hydra/launcher=slurm on a real SLURM cluster: two nodes (n1, n2, one CPU and 2 GB each, partition `debug`) that
scripts/slurm_cluster.sh starts on this machine, without accounting. Every job trains on the real data set.

Where SLURM cannot be set up (not root, no apt-get), these tests skip and say why."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hydra_plugins.fmnist_lab_slurm._core import gpu_partitions, refusal
from test_resume import train_loss_steps

pytestmark = pytest.mark.slurm
SCRIPT = Path(__file__).parents[1] / "scripts" / "slurm_cluster.sh"


def free_ports(count: int) -> int:
    """The first of `count` consecutive free TCP ports (slurmctld and one slurmd per node)."""
    for base in range(17000, 30000, 10):
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports for the test cluster")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> dict[str, str]:
    """The environment of a user of the cluster (SLURM_CONF set). One thread per process is not imposed, so that
    a job shows how many threads it picks itself."""
    folder = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_CLUSTER_PORT": str(free_ports(3))}
    started = subprocess.run(["bash", str(SCRIPT), "start", str(folder)], capture_output=True, text=True, env=env,
                             timeout=900)
    if started.returncode == 3:
        pytest.skip(f"no SLURM cluster on this machine: {started.stderr.strip().splitlines()[-1]}")
    assert started.returncode == 0, started.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PYTEST_XDIST_WORKER")}
    yield {**env, "SLURM_CONF": str(folder / "slurm.conf")}
    subprocess.run(["bash", str(SCRIPT), "stop", str(folder)], capture_output=True, timeout=120)


def start_sweep(env: dict[str, str], sweep_dir: Path, *overrides: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "fmnist_lab", "-m", "hydra/launcher=slurm", "hydra.launcher.partition=debug",
               f"hydra.sweep.dir={sweep_dir}", *overrides]
    return subprocess.Popen(command, cwd=sweep_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def sweep(env: dict[str, str], sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    process = start_sweep(env, sweep_dir, *overrides)
    out, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def rows(sweep_dir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((sweep_dir / "summary.csv").open()))


def metrics(run: Path) -> dict:
    """The run's metrics.json ({} before the run writes one)."""
    try:
        return json.loads((run / "metrics.json").read_text())
    except FileNotFoundError:
        return {}


def slurm(env: dict[str, str], *args: str) -> str:
    return subprocess.run(args, env=env, capture_output=True, text=True, check=True, timeout=60).stdout


def job_id(env: dict[str, str]) -> str:
    """The id of the one job in the queue (each test's sweep here has one job)."""
    (line,) = slurm(env, "squeue", "-h", "-r", "-o", "%i").split()
    return line


def wait_for(condition, what: str, timeout: float = 120) -> None:
    end = time.time() + timeout
    while not condition():
        assert time.time() < end, f"waited {timeout} s for {what}"
        time.sleep(0.5)


def run_requeued_now(env: dict[str, str], job: str) -> None:
    """SLURM lets a requeued job start again only after a delay (its BeginTime, two minutes on): an operator's
    `scontrol update StartTime=now` lets it start at once, to keep the test short."""
    def started() -> bool:
        state = slurm(env, "squeue", "-h", "-j", job, "-o", "%T|%r").strip()
        if state.startswith("PENDING"):  # BeginTime, or first Resources while its node finishes the job's end
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, capture_output=True)
        return state.startswith("RUNNING") and "None" in state
    # past SLURM's own two minutes: a requeued job whose start could not be moved earlier still starts then
    wait_for(started, f"job {job} to run again", timeout=200)


def test_a_sweep_with_only_the_partition_given_runs_every_job(cluster, tmp_path):
    """The shipped launcher config asks for no GPU on a partition without any (device=auto), no CPUs and no
    memory (the partition's defaults), and each job trains with the one CPU SLURM gave it."""
    assert (os.cpu_count() or 1) > 1, "the check below needs a machine with more cores than SLURM gives a job"
    sweep_dir = tmp_path / "sweep"
    result = sweep(cluster, sweep_dir, "debug=limit", "lr=0.05,0.1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted((r["job"], r["status"]) for r in rows(sweep_dir)) == [("0", "ok"), ("1", "ok")]
    for job in ("0", "1"):
        run = sweep_dir / job
        assert metrics(run)["cpu_threads"] == 1 and metrics(run)["test_images"] == 2000
        for part in ("model.onnx", "model_weights.pth", "model.json", "checkpoints/best.ckpt", "checkpoints/last.ckpt",
                     "tensorboard"):
            assert (run / part).exists(), part
    (script,) = sweep_dir.glob(".submitit/*/*submission.sh")
    options = script.read_text()
    assert "--partition=debug" in options
    assert not any(f"--{o}" in options for o in ("gpus-per-node", "mem=", "cpus-per-task")), options
    assert "sacct" not in result.stderr + result.stdout  # no accounting here: nothing asks it


def test_ddp_over_two_nodes_trains_as_one_world(cluster, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = sweep(cluster, sweep_dir, "debug=limit", "device=cpu", "trainer=ddp", "trainer.devices=1",
                   "trainer.num_nodes=2", "lr=0.05")
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = rows(sweep_dir)
    assert row["status"] == "ok", row
    recorded = metrics(sweep_dir / "0")
    assert recorded["world_size"] == 2
    assert recorded["test_images"] == 2000  # debug=limit tests 0.2 of the 10,000 images: once, not once per rank
    assert "--nodes=2" in next(sweep_dir.glob(".submitit/*/*submission.sh")).read_text()


def test_a_job_requeued_by_slurm_continues_from_its_last_checkpoint(cluster, tmp_path):
    sweep_dir = tmp_path / "sweep"
    process = start_sweep(cluster, sweep_dir, "debug=limit", "device=cpu", "epochs=15")
    last = sweep_dir / "0" / "checkpoints" / "last.ckpt"
    wait_for(last.exists, "the first epoch's last.ckpt")
    job = job_id(cluster)
    slurm(cluster, "scontrol", "requeue", job)
    run_requeued_now(cluster, job)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    recorded = metrics(sweep_dir / "0")
    assert recorded["epochs"] == 15 and recorded["resumed_from_step"] > 0
    (row,) = rows(sweep_dir)  # the first run's interruption is not a row of its own
    assert row["status"] == "ok", row
    steps = train_loss_steps(sweep_dir / "0")
    assert steps == sorted(set(steps))  # the curve repeats no step


def test_a_time_limit_requeues_the_job_until_max_num_timeout_then_says_so(cluster, tmp_path):
    """SLURM warns a job before its time limit with USR2 (signal_delay_s before it); here `scancel --signal=USR2`
    sends that warning at a moment the test picks, as SLURM would at the limit. A limit under ten minutes makes
    submitit count every such warning as a time-out."""
    sweep_dir = tmp_path / "sweep"
    process = start_sweep(cluster, sweep_dir, "debug=limit", "device=cpu", "epochs=200", "hydra.launcher.timeout_min=5",
                          "hydra.launcher.max_num_timeout=1")
    run = sweep_dir / "0"
    wait_for((run / "checkpoints" / "last.ckpt").exists, "the first epoch's last.ckpt")
    job = job_id(cluster)
    slurm(cluster, "scancel", "--signal=USR2", job)
    wait_for(lambda: metrics(run).get("status") == "interrupted", "the run to stop at the end of a batch")
    stopped_at = metrics(run)["global_step"]
    run_requeued_now(cluster, job)
    wait_for(lambda: b"resuming" in (run / "fmnist_lab.log").read_bytes(), "the requeued run to resume")
    time.sleep(3)  # a few batches past the resumed step
    slurm(cluster, "scancel", "--signal=USR2", job)
    out, err = process.communicate(timeout=300)
    assert process.returncode != 0
    (row,) = rows(sweep_dir)
    assert row["status"] == "interrupted", row
    assert "requeues it no more" in row["error"] and "max_num_timeout" in row["error"], row
    recorded = metrics(run)
    assert recorded["status"] == "interrupted" and recorded["global_step"] > stopped_at
    assert (run / "checkpoints" / "last.ckpt").exists()


def test_a_cancelled_job_has_a_row_that_says_so_and_fails_the_sweep(cluster, tmp_path):
    sweep_dir = tmp_path / "sweep"
    process = start_sweep(cluster, sweep_dir, "debug=limit", "device=cpu", "epochs=200")
    wait_for((sweep_dir / "0" / "checkpoints" / "last.ckpt").exists, "the first epoch's last.ckpt")
    job = job_id(cluster)
    slurm(cluster, "scancel", job)
    out, err = process.communicate(timeout=300)
    assert process.returncode != 0
    (row,) = rows(sweep_dir)
    assert row["status"] == "interrupted" and f"SLURM job {job} ended CANCELLED" in row["error"], row
    assert "1 of 1 sweep jobs failed" in err


def test_a_stopped_sweep_process_leaves_its_jobs_running_and_says_how_to_stop_them(cluster, tmp_path):
    sweep_dir = tmp_path / "sweep"
    process = start_sweep(cluster, sweep_dir, "debug=limit", "device=cpu", "epochs=200")
    wait_for((sweep_dir / "0" / "checkpoints" / "last.ckpt").exists, "the first epoch's last.ckpt")
    job = job_id(cluster)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    try:
        assert process.returncode == 128 + signal.SIGTERM
        assert f"sweep stopped (SIGTERM): 1 SLURM job(s) go on without it ({job}); `scancel {job}`" in err
        assert slurm(cluster, "squeue", "-h", "-j", job, "-o", "%T").strip() == "RUNNING"
    finally:
        slurm(cluster, "scancel", job)


@pytest.mark.parametrize(("override", "quoted", "key"), [
    ("hydra.launcher.partition=nosuch", "Invalid partition name specified", "hydra.launcher.partition"),
    ("hydra.launcher.mem_gb=100", "Memory specification can not be satisfied", "hydra.launcher.mem_gb"),
    ("device=gpu", "Invalid generic resource (gres) specification", "device=cpu"),
])
def test_sbatch_refusing_the_jobs_is_one_paragraph_naming_the_key(cluster, tmp_path, override, quoted, key):
    sweep_dir = tmp_path / "sweep"
    result = sweep(cluster, sweep_dir, "debug=limit", override)
    assert result.returncode == 1
    error = result.stderr[result.stderr.index("error: sbatch refused"):]
    assert quoted in error and key in error and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not list(sweep_dir.glob("0"))  # nothing ran


def test_gpu_partitions_are_read_from_sinfo():
    listing = "gpu*|gpu:a100:4(S:0-1)\ncpu|(null)\nmixed|(null)\nmixed|gpu:2\n"
    assert gpu_partitions(listing) == {"gpu", "mixed"}
    assert gpu_partitions(listing, default=True) == {"gpu"}


def test_a_refusal_names_the_key_its_words_point_to_or_all_of_them():
    message = refusal("sbatch: error: Batch job submission failed: Something new\n")
    assert "Something new" in message and "hydra.launcher options" in message
    message = refusal("sbatch: error: Batch job submission failed: Invalid account or account/partition "
                      "combination specified\n")
    assert "Change hydra.launcher.account and" in message

"""Scaling out: DDP shards, DDP runs (also inside a sweep), SLURM job parameters, requeued jobs."""

from __future__ import annotations

import csv
import json
import os
import signal

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from conftest import run_cli
from fmnist_lab.__main__ import config_dir
from fmnist_lab.data import DeviceBatches
from test_resume import start_and_signal, train_loss_steps


@pytest.mark.parametrize(("n", "world"), [(100, 2), (101, 3)])
def test_ddp_shards_cover_every_image_once_per_epoch(n, world):
    images, labels = torch.zeros(n, 28, 28, dtype=torch.uint8), torch.arange(n)
    shards = [list(DeviceBatches(images, labels, 8, shuffle=True, seed=5, rank=r, world=world, pad=True))
              for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # every rank takes the same number of steps
    seen = torch.cat([y for shard in shards for _, y in shard])
    assert sorted(set(seen.tolist())) == list(range(n)) and len(seen) == n + (-n % world)  # padding only
    # step t's batches across the ranks are the single-process batch t of world x 8 images
    single = list(DeviceBatches(images, labels, 8 * world, shuffle=True, seed=5))
    if n % world == 0:
        for t, (_, y) in enumerate(single):
            assert sorted(torch.cat([shard[t][1] for shard in shards]).tolist()) == sorted(y.tolist())
    # evaluation shards are not padded: each image counted exactly once
    evaluated = torch.cat([y for r in range(world) for _, y in DeviceBatches(images, labels, 8, rank=r, world=world)])
    assert sorted(evaluated.tolist()) == list(range(n))


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_inside_a_sweep_trains_like_one_process(real_run, tmp_path):
    """2 gloo ranks x batch 64 train on exactly the batches of 1 process x batch 128, so job 0 (a whole epoch)
    must land where the single-process run did; job 1 is short. Two jobs in one sweep: every job starts its
    own DDP world and the ranks never relaunch the sweep; each job writes its files once, into one directory."""
    single = json.loads((real_run[0] / "metrics.json").read_text())
    sweep_dir = tmp_path / "sweep"
    result = run_cli(tmp_path, "-m", "trainer=ddp", "device=cpu", "trainer.devices=2", "batch_size=64", "epochs=1",
                     "trainer.limit_train_batches=null,40", f"hydra.sweep.dir={sweep_dir}")
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "ok"] and sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) \
        == ["0", "1"]
    assert result.stdout.count("artifacts: ") == 2  # one report per job: rank 1 writes nothing

    job = sweep_dir / "0"
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics["global_step"] == single["global_step"] == 430
    assert abs(metrics["test/acc"] - single["test/acc"]) < 0.005, (metrics["test/acc"], single["test/acc"])
    assert metrics["onnx"]["ok"] and metrics["step"] == "lightning" and (job / "fmnist_lab_rank1.log").is_file()
    assert sorted(p.name for p in (job / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert sorted(p.name for p in (job / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    writers = {p.name.split(".")[4] for p in (job / "tensorboard").glob("events.out.tfevents.*")}
    assert len(writers) == 1  # every event file comes from one process, rank zero


@pytest.mark.slow
def test_requeued_sweep_job_continues_from_last_ckpt_in_its_directory(synthetic_root, tmp_path, monkeypatch):
    """What SLURM does with a job that submitit requeues on preemption: run it again, with SLURM_RESTART_COUNT
    set. After a SIGKILL in the middle of epoch 2, the job must continue from the epoch-1 checkpoint in the
    same directory, and log each step once."""
    sweep_dir = tmp_path / "sweep"
    args = ["-m", f"data.root={synthetic_root}", "device=cpu", "~callbacks.onnx_export", "trainer.log_every_n_steps=20",
            "trainer.limit_train_batches=200", "trainer.limit_val_batches=2", f"hydra.sweep.dir={sweep_dir}"]
    killed = start_and_signal(tmp_path, signal.SIGKILL, *args)
    assert killed.returncode == -signal.SIGKILL and not (sweep_dir / "0" / "metrics.json").exists()
    assert not list(sweep_dir.rglob(".*.tmp"))  # no half-written file left behind

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    run_cli(tmp_path, *args, "epochs=3")
    metrics = json.loads((sweep_dir / "0" / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 200 and metrics["global_step"] == 600 and metrics["epochs"] == 3
    (row,) = csv.DictReader((sweep_dir / "summary.csv").open())
    assert row["status"] == "ok" and row["run_dir"] == str(sweep_dir / "0")
    assert train_loss_steps(sweep_dir / "0") == list(range(20, 3 * 200 + 1, 20))  # once each, in order


SLURM_CASES = {
    "one GPU": ([], {"--ntasks-per-node=1", "--nodes=1", "--gpus-per-node=1"}),
    "ddp 2 nodes x 4 GPUs": (["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"],
                             {"--ntasks-per-node=4", "--nodes=2", "--gpus-per-node=4"}),
    "ddp on CPUs": (["trainer=ddp", "device=cpu", "trainer.devices=2"], {"--ntasks-per-node=2", "--nodes=1"}),
}


@pytest.mark.parametrize("case", SLURM_CASES)
def test_slurm_launcher_config_composes_into_valid_sbatch_options(tmp_path, monkeypatch, case):
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf
    from submitit.slurm.slurm import _make_sbatch_string

    overrides, expected = SLURM_CASES[case]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                          "hydra.launcher.timeout_min=120", "hydra.launcher.mem_gb=32",
                                          f"hydra.sweep.dir={tmp_path}", *overrides], return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher" and launcher.params["max_num_timeout"] == 3

    # submitit wants `srun` on PATH before it builds a SLURM executor; a stub stands in for the cluster
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    # what SlurmLauncher.launch does with its parameters before submitting (hydra-submitit-launcher 1.2)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    params = {k if k in base else f"slurm_{k}": v for k, v in launcher.params.items()
              if k not in ("submitit_folder", "max_num_timeout")}
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    executor.update_parameters(**params)  # raises on any option SLURM does not know
    sbatch = _make_sbatch_string(command="python -m fmnist_lab", folder=tmp_path, **executor._executor.parameters)
    lines = {line.removeprefix("#SBATCH ") for line in sbatch.splitlines() if line.startswith("#SBATCH")}
    assert {"--partition=gpu", "--time=120", "--mem=32GB", "--cpus-per-task=8", *expected} <= lines
    assert any(line.startswith("--gpus-per-node") for line in lines) == ("device=cpu" not in overrides)

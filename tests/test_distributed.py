"""Scaling out: DDP shards, DDP runs (alone, and a sweep under torchrun), SLURM job scripts, requeued jobs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from conftest import compose_cfg, only_run_dir, run_cli
from fmnist_lab.cli import config_dir
from fmnist_lab.config import ConfigError, validate
from fmnist_lab.data import DeviceLoader
from fmnist_lab.evaluate import evaluate


@pytest.mark.parametrize(("n", "world"), [(100, 2), (101, 3)])
def test_ddp_shards_cover_every_image_once_per_epoch(n, world):
    images, labels = torch.zeros(n, 28, 28, dtype=torch.uint8), torch.arange(n)

    def tensors():
        return images, labels

    shards = [list(DeviceLoader(tensors, 8, shuffle=True, seed=5, rank=r, world=world, pad=True))
              for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # every rank takes the same number of steps
    seen = torch.cat([y for shard in shards for _, y in shard])
    assert sorted(set(seen.tolist())) == list(range(n)) and len(seen) == n + (-n % world)  # padding only
    # step t's batches across the ranks are the single-process batch t of world x 8 images
    single = list(DeviceLoader(tensors, 8 * world, shuffle=True, seed=5))
    if n % world == 0:
        for t, (_, y) in enumerate(single):
            assert sorted(torch.cat([shard[t][1] for shard in shards]).tolist()) == sorted(y.tolist())
    # evaluation shards are not padded: each image counted exactly once
    evaluated = torch.cat([y for r in range(world) for _, y in DeviceLoader(tensors, 8, rank=r, world=world)])
    assert sorted(evaluated.tolist()) == list(range(n))


@pytest.mark.slow
def test_ddp_sweep_under_torchrun_trains_like_one_process(real_run, tmp_path):
    """torchrun starts 2 gloo ranks, each running the sweep; every job trains on both. 2 ranks x batch 64 train on
    exactly the batches of 1 process x batch 128, so job 0 (a whole epoch) must land where the single-process
    run did; job 1 is short. Each job writes its files once (rank zero), and its ranks log to their own files."""
    single = json.loads((real_run[0] / "metrics.json").read_text())
    sweep_dir = tmp_path / "sweep"
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run([str(torchrun), "--nproc_per_node=2", "-m", "fmnist_lab", "-m", "trainer=ddp", "device=cpu",
                             "batch_size=64", "epochs=1", "trainer.limit_train_batches=null,40",
                             f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert [(r["job"], r["status"]) for r in rows] == [("0", "ok"), ("1", "ok")]
    assert result.stdout.count("artifacts: ") == 2  # one report per job: rank 1 writes nothing

    job = sweep_dir / "0"
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics["global_step"] == single["global_step"] == 430
    assert abs(metrics["test/acc"] - single["test/acc"]) < 0.005, (metrics["test/acc"], single["test/acc"])
    assert metrics["onnx"]["ok"] and (job / "fmnist_lab_rank1.log").is_file()
    assert sorted(p.name for p in (job / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    writers = {p.name.split(".")[4] for p in (job / "tensorboard").rglob("events.out.tfevents.*")}
    assert len(writers) == 1  # every event file comes from one process, rank zero
    assert json.loads((sweep_dir / "1" / "metrics.json").read_text())["global_step"] == 40


@pytest.mark.slow
def test_ddp_run_started_by_lightning_writes_its_files_once(synthetic_root, tmp_path):
    """A single run with trainer=ddp: Lightning starts rank 1 by running the same command in the same run
    directory; the config is saved once, and rank 1 has its own log. The network is the CNN (batch norm under
    DDP), and the report covers the whole test split although each rank tested a part of it. debug=limit's test
    fraction leaves each rank at least a batch: metrics.json says the run is a debug run over 2,000 test
    images (0.2 of the split, shared by 2 ranks). The training techniques work under DDP: the EMA of the
    weights is what is tested and saved, cutmix and label smoothing train, test-time flips test."""
    run_cli(tmp_path, "trainer=ddp", "device=cpu", "debug=limit", f"data.root={synthetic_root}", "epochs=1",
            "logger=none", "model=cnn", "model.channels=[8,16]", "model.hidden=32", "trainer.limit_train_batches=30",
            "~callbacks.onnx_export", "ema.decay=0.9", "mix.cutmix=0.5", "label_smoothing=0.1", "tta=true")
    run = only_run_dir(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test/acc"] > 0.5 and metrics["test/macro_f1"] > 0.5
    assert (metrics["task"], metrics["test_images"]) == ("debug", 2000)
    # evaluate scores all 10,000 test images with the saved weights: the run's report did the same
    assert evaluate(run, str(synthetic_root), "cpu")["test/per_class_acc"] == metrics["test/per_class_acc"]
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    weights = torch.load(run / "model_weights.pth", weights_only=True)
    assert all(torch.equal(best["state_dict"][f"net.{k}"], v) for k, v in weights.items())  # the average
    assert not all(torch.equal(best["current_model_state"][f"net.{k}"], v) for k, v in weights.items())
    assert sorted(p.name for p in (run / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert [p.name for p in run.glob("*.log") if p.name != "fmnist_lab.log"] == ["train_ddp_process_1.log"]


@pytest.mark.parametrize("overrides, key", [(["trainer=ddp", "trainer.devices=8", "debug=limit"], "limit_val_batches"),
                                            (["trainer.limit_test_batches=0.05"], "limit_test_batches")])
def test_a_limit_that_leaves_a_process_no_batch_is_refused_before_any_work(overrides, key):
    with pytest.raises(ConfigError, match=rf"trainer.{key}=0.*less than one batch: give a number of batches"):
        validate(compose_cfg("device=cpu", *overrides))


def test_ddp_inside_a_local_sweep_is_refused_with_the_ways_that_work(monkeypatch):
    cfg = compose_cfg("trainer=ddp", "device=cpu")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match=r"trainer.devices=2.*inside a local sweep.*torchrun.*hydra/launcher=slurm"):
        validate(cfg, sweep_launcher="hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher")
    validate(cfg, sweep_launcher="hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher")
    validate(cfg)  # a single run: Lightning starts the ranks
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # under torchrun every rank already runs
    validate(cfg, sweep_launcher="hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher")


SLURM_CASES = {  # overrides, device -> what submitit is asked for
    "one GPU": ([], "gpu", {"tasks_per_node": 1, "nodes": 1, "gpus_per_node": 1}),
    "ddp 2 nodes x 4 GPUs": (["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"], "gpu",
                             {"tasks_per_node": 4, "nodes": 2, "gpus_per_node": 4}),
    "ddp on CPUs": (["trainer=ddp", "trainer.devices=2"], "cpu", {"tasks_per_node": 2, "nodes": 1}),
    "GPUs asked for by gres": (["+hydra.launcher.gres=gpu:a100:1"], "gpu", {"slurm_gres": "gpu:a100:1"}),
}


@pytest.mark.parametrize("case", SLURM_CASES)
def test_slurm_launcher_asks_for_one_task_per_rank_and_gpus_only_for_gpu_jobs(tmp_path, case):
    """What the launcher config asks of sbatch (tests/test_slurm.py submits it to a real cluster): unset options
    are left to the partition, device=gpu asks for a GPU per task unless the user asked for GPUs otherwise, and
    device=cpu asks for none. (device=auto asks sinfo: tests/test_slurm.py.)"""
    from hydra_plugins.fmnist_lab_slurm._core import sbatch_parameters

    overrides, device, expected = SLURM_CASES[case]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu", f"device={device}",
                                          f"hydra.sweep.dir={tmp_path}", *overrides], return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__module__ == "hydra_plugins.fmnist_lab_slurm" and launcher.params["max_num_timeout"] == 3
    params = sbatch_parameters(launcher.params, device)
    assert {k: params.get(k) for k in expected} == expected
    assert ("gpus_per_node" in params) == (device == "gpu" and "gres" not in case)
    assert not {"mem_gb", "cpus_per_task"} & set(params) and params["slurm_partition"] == "gpu"

"""A sweep job's share of the machine: parallel local jobs split the CPU threads and the GPUs, and a job in a SLURM
allocation trains with the CPUs SLURM gave it. Imports no torch until a job needs it, so that a config error
answers at once."""

from __future__ import annotations

import logging
import math
import os

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

log = logging.getLogger(__name__)
PARALLEL_JOBS = "FMNIST_LAB_SWEEP_JOBS"  # set by SweepSummary in the sweep process: jobs in a batch


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def count_jobs(task_overrides: list[str]) -> int:
    """The jobs of a grid sweep: the product of the number of values of each swept key."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        overrides = OverridesParser.create().parse_overrides(list(task_overrides))
        return math.prod(len(list(o.sweep_string_iterator())) if o.is_sweep_override() else 1 for o in overrides)
    except Exception:  # a sweep syntax that cannot be counted ahead: only the thread split loses, not the sweep
        return 1


def slurm_cpus() -> int | None:
    """The CPUs SLURM gave this task (None outside a SLURM job): --cpus-per-task, else the job's CPUs on this node
    shared by its tasks there."""
    env = os.environ
    try:
        if env.get("SLURM_CPUS_PER_TASK"):
            return max(1, int(env["SLURM_CPUS_PER_TASK"]))
        return max(1, int(env["SLURM_CPUS_ON_NODE"]) // max(1, int(env.get("SLURM_NTASKS_PER_NODE") or 1)))
    except (KeyError, ValueError):  # not a SLURM job
        return None


def use_slurm_cpus() -> None:
    """A job in a SLURM allocation trains with one thread per CPU it was given: PyTorch's default, one per core of
    the node, would crowd the cores of the node's other jobs (and its own other tasks)."""
    cpus = slurm_cpus()
    if cpus is not None:
        import torch

        torch.set_num_threads(cpus)
        log.info(f"SLURM gave this task {cpus} CPU(s): training uses {cpus} CPU thread(s)")


def share_machine(cfg: DictConfig) -> None:
    """Parallel local jobs (joblib, submitit_local) split the CPU threads; with several GPUs, job k takes GPU
    k mod n."""
    import torch

    hydra_cfg = HydraConfig.get()
    target = str(hydra_cfg.launcher.get("_target_", ""))
    batch = int(os.environ.get(PARALLEL_JOBS, 1))
    n_jobs = hydra_cfg.launcher.get("n_jobs") if "joblib" in target else \
        min(batch, hydra_cfg.launcher.get("array_parallelism") or batch) if "LocalLauncher" in target else None
    if n_jobs:
        cores = os.cpu_count() or 1
        parallel = cores if n_jobs < 0 else min(n_jobs, cores)
        torch.set_num_threads(max(1, cores // parallel))
        log.info(f"{parallel} parallel jobs on {cores} cores: {torch.get_num_threads()} CPU threads for this one")
    gpus = torch.cuda.device_count()
    if gpus > 1 and cfg.device != "cpu" and cfg.trainer.get("devices") == 1:
        cfg.trainer.devices = [hydra_cfg.job.num % gpus]
        log.info(f"job {hydra_cfg.job.num} on GPU {cfg.trainer.devices[0]} of {gpus}")

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
        plural = "s" * (cpus != 1)
        log.info(f"SLURM gave this task {cpus} CPU{plural}: training uses {cpus} CPU thread{plural}")


def parallel_jobs(launcher: DictConfig) -> int | None:
    """How many jobs the sweep's launcher runs at once on this machine (None: one at a time, or elsewhere), by
    the launcher's class: joblib's `n_jobs` (-1: one per core), submitit_local's batch up to its
    `array_parallelism`."""
    from hydra.utils import get_class

    try:
        from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher
        from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher
    except ImportError:  # without the `sweep` extra only Hydra's basic launcher runs, one job at a time
        return None
    cls, cores = get_class(str(launcher.get("_target_"))), os.cpu_count() or 1
    if issubclass(cls, JoblibLauncher):
        n_jobs = launcher.get("n_jobs") or 1
        return cores if n_jobs < 0 else min(n_jobs, cores)
    if issubclass(cls, LocalLauncher):
        batch = int(os.environ.get(PARALLEL_JOBS, 1))
        return min(batch, launcher.get("array_parallelism") or batch, cores)
    return None


def share_machine(cfg: DictConfig) -> None:
    """Parallel local jobs (joblib, submitit_local) split the CPU threads, and label their console lines with
    their job number; with several GPUs, job k takes GPU k mod n."""
    import torch

    from fmnist_lab.logs import label_lines

    hydra_cfg = HydraConfig.get()
    parallel = parallel_jobs(hydra_cfg.launcher)
    if parallel and parallel > 1:
        label_lines(f"job {hydra_cfg.job.num}")
        cores = os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // parallel))
        threads = torch.get_num_threads()
        log.info(f"{parallel} parallel jobs on {cores} cores: {threads} CPU thread{'s' * (threads != 1)} for this one")
    gpus = torch.cuda.device_count()
    if gpus > 1 and cfg.device != "cpu" and cfg.trainer.get("devices") == 1:
        cfg.trainer.devices = [hydra_cfg.job.num % gpus]
        log.info(f"job {hydra_cfg.job.num} on GPU {cfg.trainer.devices[0]} of {gpus}")

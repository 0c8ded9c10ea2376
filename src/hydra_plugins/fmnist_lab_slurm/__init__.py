"""fmnist_lab's SLURM launcher: hydra-submitit-launcher's, with defaults that work on any partition and a sweep
that keeps every job's result however the job ends. conf/hydra/launcher/slurm.yaml selects it.

- GPUs are asked for only where the job trains on them: always with device=gpu, never with device=cpu, and with
  device=auto only where the partition has GPUs (sinfo says). CPUs and memory are the partition's defaults
  unless hydra.launcher.cpus_per_task / mem_gb say otherwise; each job trains with the cores SLURM gave it.
- sbatch refusing the jobs (an unknown partition, more memory than a node has) ends the sweep with one
  paragraph that quotes sbatch and names the key to change; nothing is submitted.
- The sweep process keeps the books: it writes each job's row in summary.csv when SLURM says the job has ended
  (squeue; no accounting needed), so a job requeued by SLURM or by submitit has one row, with its final result,
  and a job cancelled with scancel has a row that says so.

Hydra only loads plugins from `hydra_plugins`, hence this package; the workings are in `_core`.
"""

from typing import Any

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as PluginLauncher
except ImportError:  # the `sweep` extra is not installed: nothing to offer
    PluginLauncher = None

if PluginLauncher is not None:

    class SlurmLauncher(PluginLauncher):
        # every job's summary row is written by the sweep process, once SLURM says the job has ended
        writes_the_rows_itself = True

        def launch(self, job_overrides: Any, initial_job_idx: int) -> Any:
            from hydra_plugins.fmnist_lab_slurm._core import launch

            return launch(self, job_overrides, initial_job_idx)

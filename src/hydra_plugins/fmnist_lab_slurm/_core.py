"""How fmnist_lab's SLURM launcher submits a sweep and waits for its jobs (see __init__.py).

Only public APIs: submitit's executor and Job (`task(0).paths`, `task(0).result()`), and SLURM's own commands
(sinfo, squeue). submitit's own wait asks `sacct`, which needs SLURM accounting: without it every poll logs a
warning and a job killed before it wrote its result is waited for forever. Here squeue says when a job has ended
(the states SLURM keeps for MinJobAge after the end), and a job that left no result gets a row saying how it ended.
"""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides

from fmnist_lab import outcome
from fmnist_lab.run_dir import RunDir
from fmnist_lab.sweep import objective_of_sweep
from fmnist_lab.sweep_report import write_summary
from fmnist_lab.sweep_rows import job_dir, job_row, model_name, record, saved_model, unfinished_row

log = logging.getLogger(__name__)

POLL_SECONDS = 2.0
RESULT_GRACE_SECONDS = 15.0  # a result file written on one node may show on the sweep's node a little later
# SLURM's end states (squeue -t all lists them for MinJobAge); any other state may still run the job
ENDED = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE", "REVOKED", "SPECIAL_EXIT"}
# The queue parameters that submitit's AutoExecutor takes without the `slurm_` prefix
GENERIC = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes", "name",
           "stderr_to_stdout"}


def slurm(*args: str) -> str:
    """A SLURM command's output; SlurmError with its message when it cannot run or fails."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SlurmError(f"{args[0]} is not installed here") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{args[0]} did not answer within 60 s") from None
    if done.returncode != 0:
        raise SlurmError(f"{args[0]} failed: {done.stderr.strip() or f'exit code {done.returncode}'}")
    return done.stdout


class SlurmError(RuntimeError):
    pass


def gpu_partitions(listing: str, default: bool = False) -> set[str]:
    """The partitions with GPUs in sinfo's `%P|%G` listing (a line per partition and node kind; the default
    partition's name ends in `*`): only the default partition, with `default`."""
    found = set()
    for line in listing.splitlines():
        name, _, gres = line.partition("|")
        if "gpu" in gres and (name.endswith("*") or not default):
            found.add(name.rstrip("*"))
    return found


def partition_has_gpus(partition: str | None) -> bool:
    """Whether `partition` (None: the cluster's default one) has nodes with GPUs, as sinfo's GRES column says."""
    listing = slurm("sinfo", "-h", "-o", "%P|%G")
    return bool(gpu_partitions(listing, default=True)) if partition is None else partition in gpu_partitions(listing)


def sbatch_parameters(params: dict[str, Any], device: str) -> dict[str, Any]:
    """The launcher's options as submitit's AutoExecutor takes them: unset ones left to the partition's defaults,
    and one GPU per task where the jobs train on GPUs (unless the user asked for GPUs some other way)."""
    params = {k: v for k, v in params.items() if v is not None and k not in ("submitit_folder", "max_num_timeout")}
    gpus_asked = any(params.get(k) for k in ("gpus_per_node", "gres", "gpus_per_task"))
    if not gpus_asked and device != "cpu":
        try:
            if device == "gpu" or partition_has_gpus(params.get("partition")):
                params["gpus_per_node"] = params["tasks_per_node"]
        except SlurmError as err:
            raise SystemExit(f"error: device=auto asks SLURM whether the partition "
                             f"{params.get('partition') or '(the default one)'} has GPUs, and {err}. Run the sweep "
                             "on a machine of the cluster, or say device=gpu or device=cpu.") from None
    return {k if k in GENERIC else f"slurm_{k}": v for k, v in params.items()}


# what sbatch says -> the launcher key to change; the first that matches (sbatch's "Invalid account or
# account/partition combination" is about the account)
REFUSALS = [
    ("account", "hydra.launcher.account"),
    ("qos", "hydra.launcher.qos"),
    ("partition", "hydra.launcher.partition (sinfo lists the cluster's partitions)"),
    ("memory", "hydra.launcher.mem_gb (leave it out for the partition's default)"),
    ("gres", "device=cpu, or hydra.launcher.gpus_per_node, for a partition without GPUs"),
    ("time limit", "hydra.launcher.timeout_min"),
    ("node configuration", "hydra.launcher.cpus_per_task or mem_gb, or trainer.devices / trainer.num_nodes "
                           "(tasks and nodes per job)"),
]


def refusal(message: str) -> str:
    """One paragraph for sbatch refusing the jobs: its own words and the launcher key to change."""
    said = " ".join(line.strip() for line in message.splitlines() if line.strip()) or "no message"
    keys = [key for word, key in REFUSALS if word in said.lower()]
    fix = keys[0] if keys else ("the hydra.launcher options (partition, timeout_min, cpus_per_task, mem_gb, "
                                "gpus_per_node, additional_parameters)")
    return (f"error: sbatch refused the sweep's jobs, so nothing was submitted. sbatch said: \"{said}\". "
            f"Change {fix} and run the sweep again.")


def submit(launcher: Any, jobs: dict[int, list[str]]) -> list[Any]:
    """One SLURM job array for the sweep's jobs; SystemExit with one paragraph when sbatch refuses it."""
    import submitit
    from submitit.core.utils import FailedJobError

    params = launcher.params
    executor = submitit.AutoExecutor(folder=params["submitit_folder"], cluster="slurm",
                                     slurm_max_num_timeout=params["max_num_timeout"])
    executor.update_parameters(**sbatch_parameters(params, str(launcher.config.get("device", "auto"))))
    state = Singleton.get_state()
    args = [(overrides, "hydra.sweep.dir", idx, f"job_id_for_{idx}", state) for idx, overrides in jobs.items()]
    try:
        return executor.map_array(launcher, *zip(*args, strict=True))
    except FailedJobError as err:
        raise SystemExit(refusal(str(err))) from None
    except OSError as err:
        raise SystemExit(f"error: sbatch could not be run ({err.strerror or err}): hydra/launcher=slurm submits "
                         "the jobs from a machine of a SLURM cluster. Run the sweep there, or use another "
                         "launcher (hydra/launcher=joblib runs the jobs on this machine).") from None


class Queue:
    """SLURM's word on the sweep's jobs, from squeue: job id -> state, for the jobs it still lists. A failing
    squeue is logged once per message, and the jobs are then taken to be still running."""

    def __init__(self) -> None:
        self.said: set[str] = set()

    def states(self, job_ids: list[str]) -> dict[str, str] | None:
        found: dict[str, str] = {}
        for array in sorted({job_id.split("_")[0] for job_id in job_ids}):
            try:
                out = slurm("squeue", "-h", "-r", "-t", "all", "-j", array, "-o", "%i|%T")
            except SlurmError as err:
                if "Invalid job id" in str(err):
                    continue  # SLURM no longer lists the array: every job of it has ended
                if str(err) not in self.said:
                    self.said.add(str(err))
                    log.warning(f"cannot ask SLURM how the jobs are doing ({err}); waiting")
                return None
            found.update(line.split("|", 1) for line in out.splitlines() if "|" in line)
        return found


def launch(launcher: Any, job_overrides: Any, initial_job_idx: int) -> list[JobReturn]:
    config = launcher.config
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    jobs = {initial_job_idx + i: list(overrides) for i, overrides in enumerate(job_overrides)}
    for idx, overrides in jobs.items():
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
    submitted = dict(zip(jobs, submit(launcher, jobs), strict=True))
    first = next(iter(submitted.values()))
    log.info(f"submitted {len(jobs)} SLURM job(s) ({first.job_id.split('_')[0]}); their logs: "
             f"{first.paths.folder.parent}")
    waiting: dict[int, Any] = dict(submitted)
    try:
        with signals_stop_waiting():
            returns = wait_for_jobs(launcher, jobs, waiting)
    except SweepLeft as left:
        ids = " ".join(job.job_id for job in waiting.values())
        write_summary(sweep_dir, objective_of_sweep(config))
        print(f"\nsweep stopped ({left.name}): {len(waiting)} SLURM job(s) go on without it ({ids}); "
              f"`scancel {ids}` stops them. Every job that ended is in {sweep_dir / 'summary.csv'}.", file=sys.stderr)
        raise SystemExit(left.exit_code) from None
    return [returns[idx] for idx in jobs]


class SweepLeft(BaseException):
    """Ctrl-C or SIGTERM to the sweep process while it waits: the jobs run on without it."""

    def __init__(self, signum: int) -> None:
        self.name, self.exit_code = ("Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name,
                                     outcome.exit_code(signum))


@contextmanager
def signals_stop_waiting() -> Iterator[None]:
    def leave(signum: int, frame: Any) -> None:
        raise SweepLeft(signum)

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, leave)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where Ctrl-C is ignored (nohup, &)
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, leave)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def wait_for_jobs(launcher: Any, jobs: dict[int, list[str]], waiting: dict[int, Any]) -> dict[int, JobReturn]:
    """Each job's JobReturn once SLURM says it has ended, its row written then; `waiting` keeps the others.
    squeue is asked every few seconds while a job has a result file or has just ended without one, else less
    often as the sweep goes on (at most every 30 s): a long sweep does not keep slurmctld busy."""
    returns: dict[int, JobReturn] = {}
    queue, ended_at = Queue(), {}
    started = asked = time.time()
    while waiting:
        time.sleep(POLL_SECONDS)
        news = ended_at or any(job.task(0).paths.result_pickle.exists() for job in waiting.values())
        if not news and time.time() - asked < min(30.0, max(POLL_SECONDS, (time.time() - started) / 10)):
            continue
        asked = time.time()
        states = queue.states([job.job_id for job in waiting.values()])
        if states is None:
            continue
        for idx, job in list(waiting.items()):
            state = states.get(job.job_id, "no longer listed")
            if state not in ENDED and job.job_id in states:
                continue
            has_result = job.task(0).paths.result_pickle.exists()
            ended_at.setdefault(idx, time.time())
            if has_result or time.time() - ended_at[idx] > RESULT_GRACE_SECONDS:
                returns[idx] = finish(launcher, idx, jobs[idx], job, state, has_result)
                del waiting[idx]
                del ended_at[idx]
    return returns


def finish(launcher: Any, idx: int, overrides: list[str], job: Any, state: str, has_result: bool) -> JobReturn:
    """The row of a job that SLURM says has ended, and its JobReturn for the sweeper (no value: a failed job)."""
    config = launcher.config
    run_dir = job_dir(launcher, overrides, idx)
    log_file = job.task(0).paths.stderr
    how = f"SLURM job {job.job_id} ended {state}"
    ret = JobReturn(overrides=overrides, status=JobStatus.COMPLETED)  # no return value: a failed job's
    if not has_result:
        row = unfinished_row(idx, overrides, run_dir, f"{how} without a result (log: {log_file})",
                             objective_of_sweep(config))
    else:
        try:
            ret = job.task(0).result()
            row = job_row(run_dir, idx, overrides, model_name(ret.cfg), ret, objective_of_sweep(config))
        except Exception as err:  # the job raised outside fmnist_lab's error policy: its last line says what
            row = {"job": idx, "status": "failed", "overrides": " ".join(overrides), "run_dir": str(run_dir),
                   "model": saved_model(RunDir(run_dir)), "error": f"{last_error(err)} (log: {log_file})"}
        if state not in ("COMPLETED", "no longer listed") and row["status"] != "ok":
            row["error"] = f"{row['error']} ({how})"
    record(Path(str(config.hydra.sweep.dir)) / "summary.csv", row)
    if row["status"] != "ok":
        log.error(f"job {idx} {row['status']}: {row['error']}")
    return ret


def last_error(err: Exception) -> str:
    """The exception line of a job's traceback that submitit passes on (the whole traceback is in the job's log)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and not line.startswith("---")]
    return next((line for line in reversed(lines) if re.match(r"^[\w.]+(Error|Exception|Exit)\b", line)),
                lines[0] if lines else type(err).__name__)

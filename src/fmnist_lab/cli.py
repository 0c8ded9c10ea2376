"""`python -m fmnist_lab [overrides]`: the Hydra app that trains with conf/train.yaml (`-m` for sweeps).

One error policy for every job, alone or in a sweep: the config is checked before any work; a failure ends
the job with one paragraph (a traceback in the log only for errors fmnist_lab did not foresee) and marks its
metrics.json failed, keeping its checkpoints. A single run then exits 1; a sweep records the job and goes on.
"""

from __future__ import annotations

import logging
import signal
import sys
from contextlib import nullcontext
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fmnist_lab.config import config_dir, register, untrusted_targets, validate
from fmnist_lab.config_schema import with_defaults
from fmnist_lab.logs import route_warnings
from fmnist_lab.outcome import FAILED, JobFailed, ending, exit_code
from fmnist_lab.run_dir import RunBusyError, RunDir, RunDirError, is_rank_zero
from fmnist_lab.sweep_machine import is_multirun, share_machine, use_slurm_cpus
from fmnist_lab.sweep_objective import objective_values

log = logging.getLogger(__name__)
register()  # the typed schema conf/train.yaml builds on


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | list[float] | None:
    """One job. Returns the objective for sweepers: `optimized_metric` (a list of values when it lists several
    metrics), or None for a failed job."""
    route_warnings()  # a library's warnings into the run's log file, ours on the console too
    launcher = HydraConfig.get().launcher.get("_target_", "") if is_multirun() else None
    use_slurm_cpus()
    if launcher is not None:
        share_machine(cfg)
    value, failure, code = run_job(cfg, launcher)
    if code == exit_code(signal.SIGUSR2):
        failure = requeue_on_slurm(RunDir(cfg.paths.output_dir), failure)
    if failure is None:
        return value
    if launcher is not None:  # the summary lists this job with the error; an interrupted job stops the sweep
        log.error(f"job {'interrupted' if code != FAILED else 'failed'}: {failure}")
        return None  # Optuna counts a trial without a value as failed
    print(f"error: {failure}", file=sys.stderr)
    raise SystemExit(code)


def run_job(cfg: DictConfig, sweep_launcher: str | None) -> tuple[float | list[float] | None, str | None, int]:
    """Check the config and train: (objective, None, 0), or (None, one paragraph saying what went wrong, the
    exit code: 1, or 128 + the signal for a run a signal stopped); fmnist_lab.outcome decides which."""
    run = RunDir(cfg.paths.output_dir)
    try:
        with run.writing() if is_rank_zero() else nullcontext():  # DDP ranks > 0 write nothing of the run
            metrics = do_job(cfg, run, sweep_launcher)
    except Exception as err:
        return None, *ending(err, run, in_sweep=sweep_launcher is not None)
    return objective_values(metrics, cfg.optimized_metric), None, 0


def do_job(cfg: DictConfig, run: RunDir, sweep_launcher: str | None) -> dict:
    """The job itself, by kind: a resumed run, a learning-rate search, a sweep job that ended already, a run."""
    validate(cfg, sweep_launcher)
    if cfg.resume is not None:  # continue with the config the run was started with (Hydra is in its directory)
        others = [o for o in HydraConfig.get().overrides.task if not o.startswith("resume=")]
        if others:
            log.warning(f"resume uses the run's own config; ignoring {' '.join(others)}")
        # the checks that need no torch answer first: a finished, damaged or foreign run in a fraction of a second
        config = with_defaults(run.load_config())
        untrusted_targets(config, run.config)  # a run folder may come from elsewhere: it names no code
        if metrics := run.finished():
            acc = metrics.get("test/acc")
            done = (f"{metrics.get('epochs')} epochs, test/acc {acc:.4f}" if isinstance(acc, int | float)
                    else f"task {metrics.get('task')}")
            print(f"{run.path} already finished ({done}); nothing to resume.")
            return metrics
        from fmnist_lab.train import train

        return train(config, resume=True)
    if cfg.get("tune"):
        from fmnist_lab.train import find_lr

        return find_lr(cfg)
    if sweep_launcher is not None and job_ended(run):
        # The same sweep again in its folder (SweepSummary refuses a different one there): a job that ended
        # keeps its result and its row, and is not trained again.
        metrics = run.read_metrics()
        log.info(f"job {run.path.name} already ended ({metrics.get('status', 'ok')}); its result stands")
        if metrics.get("status") == "failed":
            raise JobFailed(metrics.get("error", "failed"))
        return metrics
    from fmnist_lab.train import train

    # A sweep job that stopped (a signal, a kill, a requeued SLURM job) continues from its last.ckpt in its own
    # folder; one that stopped before its first checkpoint starts again.
    return train(cfg, resume=sweep_launcher is not None and run.last.is_file())


def requeue_on_slurm(run: RunDir, failure: str) -> str:
    """SLURM warned of the job's end (USR2, before its time limit or on preemption), and the run stopped at the end
    of a batch with its last.ckpt. Now submitit's handler, which the run kept aside (fmnist_lab.train), requeues
    the job and exits; or it raises when the job used up its requeues (max_num_timeout), which the run's
    metrics.json then says."""
    handler = signal.getsignal(signal.SIGUSR2)
    if not callable(handler):
        return failure
    try:
        handler(signal.SIGUSR2, None)
    except Exception as err:
        why = str(err).removeprefix("Job not requeued because: ").rstrip(".")
        failure = (f"{failure.split(';')[0]}; submitit requeues it no more ({why}). Raise hydra.launcher.timeout_min "
                   "or max_num_timeout, then run the same sweep again: the job continues from its last.ckpt.")
        if is_rank_zero():
            run.update(error=failure)
    return failure


class RunStart(Callback):
    """Checks Hydra runs before it writes anything into the run folder (its config, its log file): the folder
    must take files, and a run that `resume=` names must not be written by another live process."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_rank_zero():  # DDP ranks > 0 join the run that rank zero checked
            return
        run = RunDir(config.hydra.run.dir)
        try:
            if config.get("resume") is not None and (pid := run.writer()) is not None:
                raise RunBusyError(run.busy_message(pid))
            run.check_writable()
        except (RunBusyError, RunDirError) as err:
            print(f"error: {err.strerror if isinstance(err, RunDirError) else err}", file=sys.stderr)
            raise SystemExit(1) from None


def job_ended(run: RunDir) -> bool:
    """The job's metrics.json says it finished or failed (not: missing, or interrupted)."""
    metrics = run.read_metrics()
    return bool(metrics) and metrics.get("status", "ok") in ("ok", "failed")

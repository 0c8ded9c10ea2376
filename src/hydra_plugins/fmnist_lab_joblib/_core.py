"""How fmnist_lab's joblib launcher runs a sweep and stops it (see __init__.py).

The sweep process tells its workers that the sweep stops through a file, `<sweep dir>/.stopping-<pid>`. A thread
in every worker watches that file and the sweep process, and sends its worker SIGTERM while either says stop:
a job in its training loop stops at the end of a batch and marks itself interrupted (fmnist_lab.train); a job
elsewhere gets SweepStopped raised and `execute_job` marks it. A job that has not started when the sweep stops
is not started. The sweep process waits for every job to come back, writes a row for each job that did not
write its own (summary.csv, see _stopped.py), and exits 143/130. Once the sweep process is gone, a worker without
a job ends at once.

Only joblib's public API: `Parallel` with `return_as="generator_unordered"` (jobs come back as they end, so an
interrupted one stops the rest at once) and the loky backend's `initializer` (each worker watches the sweep from
its start, before it gets a job).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import DictConfig, OmegaConf

from fmnist_lab import outcome
from fmnist_lab.run_dir import BadFileError, RunDir, atomic_write
from fmnist_lab.sweep_rows import job_config, mark_unfinished
from hydra_plugins.fmnist_lab_joblib._stopped import end_stopped_sweep

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sweep:
    """What a worker needs to end with its sweep."""

    pid: int  # the sweep process
    stop_file: Path  # written by the sweep process when it stops

    def orphaned(self) -> bool:
        """This is a worker whose sweep process is gone (even SIGKILLed: a worker's parent is the sweep process)."""
        return os.getpid() != self.pid and os.getppid() != self.pid

    def stopping(self) -> bool:
        return self.orphaned() or self.stop_file.exists()


class SweepStopped(BaseException):
    """SIGTERM raised in a job outside its training loop. Not an Exception, as KeyboardInterrupt is not: no
    `except Exception` of the job may take it for a failure and mark the job failed."""


class SweepAborted(BaseException):
    """Raised in the sweep process while jobs run, with the reason: joblib ends its workers at once."""


@dataclass
class Job:
    """The job of this process: idle, running (its task function runs: SIGTERM stops it) or stopping (SIGTERM
    is stopping it; more wait)."""

    sweep: Sweep | None = None
    state: str = "idle"


JOB = Job()


def stop_job(signum: int) -> None:
    """SIGTERM stops the job that runs in this process, if one does, by raising SweepStopped. Not in its training
    loop: there fmnist_lab.train and Lightning take SIGTERM first, stop at the end of a batch and mark the job
    interrupted themselves."""
    if JOB.state == "running":
        JOB.state = "stopping"
        raise SweepStopped(signum)


def on_worker_signal(signum: int, frame: Any) -> None:
    """A worker's SIGTERM, and its Ctrl-C between jobs (during a job Python's own handler takes Ctrl-C)."""
    if signum == signal.SIGTERM:
        stop_job(signum)
    if JOB.state != "idle":
        return  # its job is stopping: it comes back to the sweep, then the worker idles
    if JOB.sweep.orphaned() or (signum == signal.SIGTERM and not JOB.sweep.stopping()):
        # nothing to finish: end as the signal's default would (also a SIGTERM sent to an idle worker by hand,
        # which joblib then reports as a dead worker)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    # else an idle worker of a sweep that stops (or Ctrl-C, which reached the sweep process too): the sweep process
    # ends its workers when every job is back


def start_worker(sweep: Sweep) -> None:
    """Each worker, before its first job: its SIGTERM and SIGINT handler, and the thread that passes the sweep's
    stop on to its job and ends the worker with the sweep process."""
    JOB.sweep = sweep
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_worker_signal)

    def watch() -> None:
        while True:
            if not sweep.stopping():
                time.sleep(0.5)
                continue
            # SIGTERM whatever stopped the sweep: a job takes a second one as it took the first (noted), where a
            # second Ctrl-C would stop it at once (fmnist_lab.train). Again every few seconds: until its training
            # loop has begun a job only notes it, and a worker that stopped its job idles (and then ends, once the
            # sweep process is gone).
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(2)

    threading.Thread(target=watch, name="end-with-the-sweep", daemon=True).start()


@dataclass
class Stoppable:
    """The job's task function, marked running while it runs: SIGTERM raises only there, never while Hydra
    writes the job's config or SweepSummary its row. Ctrl-C gets Python's own handler there, as in a single run,
    which fmnist_lab.train turns into a stop at the end of a batch."""

    task_function: Any

    def __call__(self, cfg: DictConfig) -> Any:
        main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
        previous = signal.signal(signal.SIGINT, signal.default_int_handler) if main_thread else None
        JOB.state = "running"
        try:
            return self.task_function(cfg)
        finally:
            if JOB.state == "running":
                JOB.state = "idle"
            if main_thread:
                signal.signal(signal.SIGINT, previous)


def execute_job(idx: int, overrides: Sequence[str], hydra_context: Any, config: DictConfig, task_function: Any,
                singleton_state: dict, sweep: Sweep) -> tuple[int, JobReturn | None, tuple[str, int] | None]:
    """One job, in a worker (in the sweep process itself when joblib runs a single job at a time). Returns
    (idx, Hydra's JobReturn, or None when the job did not end through Hydra, which wrote no row for it; why it
    was interrupted and the exit code that says so, or None)."""
    if sweep.stopping():
        return idx, None, ("not started", outcome.exit_code(signal.SIGTERM))
    setup_globals()
    Singleton.set_state(singleton_state)
    sweep_config = job_config(hydra_context, config, overrides, idx)
    HydraConfig.instance().set_config(sweep_config)
    started = time.time()
    try:
        ret = run_job(hydra_context=hydra_context, config=sweep_config, task_function=Stoppable(task_function),
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    except (SweepStopped, KeyboardInterrupt) as stop:
        signum = signal.SIGINT if isinstance(stop, KeyboardInterrupt) else signal.SIGTERM
        why = f"{outcome.SIGNALS[signum]} stopped the job outside its training loop"
        output_dir = OmegaConf.select(sweep_config, "hydra.runtime.output_dir", default=None)
        if output_dir:  # run_job sets it before the task function starts
            mark_unfinished(RunDir(output_dir), why, signum)
        return idx, None, (why, outcome.exit_code(signum))
    finally:
        JOB.state = "idle"
    run = RunDir(ret.hydra_cfg.hydra.runtime.output_dir)
    try:
        metrics = run.read_metrics()
        # marked now, not by an earlier sweep (a job that fails to resume leaves that mark as it was)
        now = metrics.get("status") == "interrupted" and run.metrics.stat().st_mtime >= started - 1
    except (BadFileError, OSError):
        now = False
    return idx, ret, (metrics.get("error", "interrupted"), outcome.signal_exit_code(metrics)) if now else None


class SweepSignals:
    """The sweep process's SIGTERM and SIGINT, from SweepSummary.on_multirun_start to the end of the process. The
    first stops the sweep: the workers stop their jobs (a launch still to come starts none), and the launch ends
    with every job's row and exit 143/130. A second one while jobs run ends the workers at once; while the launch
    writes the books it waits; anywhere else it ends the sweep process as its default would."""

    def __init__(self, config: DictConfig) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        self.sweep = Sweep(os.getpid(), sweep_dir / f".stopping-{os.getpid()}")
        self.reason: str | None = None  # why the sweep stops
        self.exit_code = 0
        self.abortable = False  # joblib runs jobs: a second signal may end its workers at once
        self.finishing = False  # the launch writes the stopped sweep's books: it ends in a moment anyway
        self.sweep.stop_file.unlink(missing_ok=True)  # one that a killed sweep with this pid left (a container's)
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, self.on_signal)
        # after loky has ended the workers at exit (threading's exit hooks run first): a worker never sees it go
        atexit.register(self.sweep.stop_file.unlink, missing_ok=True)

    def on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.reason is None:
            # os.write: a print here could meet the main thread inside a print, which Python refuses
            os.write(2, f"\n{name}: stopping the sweep; running jobs stop at the end of a batch and are marked "
                        "interrupted (send it again to end them at once)\n".encode())
            self.stop(f"{name} to the sweep process", outcome.exit_code(signum))
            stop_job(signal.SIGTERM)  # a job that runs in this process (n_jobs=1; during it Ctrl-C is Python's)
        elif self.abortable:
            raise SweepAborted(f"a second {name} ended the workers at once")
        elif not self.finishing:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def stop(self, reason: str, exit_code: int) -> None:
        self.reason, self.exit_code = reason, exit_code
        try:
            atomic_write(self.sweep.stop_file, lambda tmp: tmp.write_text(reason))
        except OSError as err:  # the workers cannot be told: end them at once instead
            if self.abortable:
                raise SweepAborted(f"{reason}; the workers could not be told ({err.strerror}), so joblib ended them "
                                   "at once") from None


SIGNALS: SweepSignals | None = None  # the sweep process's, once installed (catch_signals)


def parallel_options(options: dict[str, Any]) -> dict[str, Any]:
    """hydra-joblib-launcher's options as joblib.Parallel takes them (numbers given as text become numbers)."""
    options = {**options, "backend": "loky"}  # the threading backend cannot run Hydra jobs
    for key in ("pre_dispatch", "batch_size", "max_nbytes"):
        try:
            options[key] = int(options[key]) if options.get(key) else options.get(key)
        except ValueError:
            pass
    return options


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
    from joblib import Parallel, delayed

    setup_globals()
    config, signals = launcher.config, launcher.signals
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    options = parallel_options(dict(launcher.joblib))
    jobs = {initial_job_idx + i: list(overrides) for i, overrides in enumerate(job_overrides)}
    log.info(f"Joblib.Parallel({','.join(f'{k}={v}' for k, v in options.items())}) is launching {len(jobs)} jobs")
    log.info(f"Launching jobs, sweep output dir : {sweep_dir}")
    for idx, overrides in jobs.items():
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")

    returns: dict[int, JobReturn] = {}
    results = None
    signals.abortable = True
    try:
        if signals.reason is None:  # else a signal came before the launch: no job starts
            state = Singleton.get_state()
            results = Parallel(**options, return_as="generator_unordered", initializer=start_worker,
                               initargs=(signals.sweep,))(
                delayed(execute_job)(idx, overrides, launcher.hydra_context, config, launcher.task_function, state,
                                     signals.sweep) for idx, overrides in jobs.items())
            for idx, ret, interrupted in results:
                if ret is not None:
                    returns[idx] = ret
                if interrupted and signals.reason is None:  # a signal to its worker: the sweep stops with it
                    signals.stop(f"job {idx} was interrupted ({interrupted[0]})", interrupted[1])
    except BrokenProcessPool as err:  # joblib has ended every other worker
        codes = re.search(r"exit codes of the workers are \{([^}]*)\}", str(err))
        signals.reason = (f"a worker process died ({codes[1] if codes else type(err).__name__}: killed, or out of "
                          "memory) and joblib ended the other workers with it")
        signals.exit_code = 1
    except SweepAborted as err:  # joblib has ended the workers
        signals.reason = str(err)
    except Exception as err:  # a job's error that Hydra did not catch (joblib has ended the workers): a bug
        log.exception("the launch failed")
        signals.reason, signals.exit_code = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}", 1
    finally:
        signals.abortable = False
        if results is not None:
            results.close()
    if signals.reason is not None:
        signals.finishing = True
        end_stopped_sweep(launcher, jobs, returns, signals.reason, signals.exit_code)
    return [returns[idx] for idx in jobs]

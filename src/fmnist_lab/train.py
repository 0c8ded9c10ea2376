"""One training job as a straight line: seed; build the data module, model, callbacks, loggers and trainer from
the config; fit; test the best checkpoint; write the weights, metrics.json and the report."""

from __future__ import annotations

import io
import logging
import platform
import shlex
import signal
import sys
import threading
from contextlib import contextmanager, nullcontext, redirect_stderr
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.tuner import Tuner
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

import fmnist_lab
from fmnist_lab.artifacts import parameter_counts, save_weights
from fmnist_lab.build import build, plain
from fmnist_lab.callbacks import FitTimer
from fmnist_lab.checkpoint_callbacks import RunStamp, SignalRelay
from fmnist_lab.config import ConfigError
from fmnist_lab.data import CLASSES
from fmnist_lab.logs import quiet_libraries
from fmnist_lab.lr_find_plot import run_title, write_lr_find_png
from fmnist_lab.models import Classifier
from fmnist_lab.outcome import ArtifactError, interrupted, mark_interrupted
from fmnist_lab.provenance import source_version, task, timestamp
from fmnist_lab.results import log_failed, log_final, print_result, take_results
from fmnist_lab.run_dir import RunDir, config_identity, write_json

log = logging.getLogger(__name__)


@contextmanager
def distributed_job():
    """Under DDP every rank leaves a job together, whether it ended well or not: rank zero writes the results
    while the others wait, and the next job of a sweep run under torchrun starts in step. The process group
    stays up for that next job (the same world; a new one could not meet again through torchrun's store)."""
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()


@contextmanager
def signals_noted():
    """SIGTERM and Ctrl-C anywhere in the job are noted instead of killing the process between two writes.
    During fit and test Lightning calls the SIGTERM handler after its own and stops training at the end of a
    batch, and the job checks the note between its phases (stop_if_signalled). A first Ctrl-C is turned into
    that same SIGTERM: a KeyboardInterrupt would land anywhere (between a backward pass and its optimizer step,
    say), and a checkpoint saved there resumes into a different run. A second Ctrl-C stops at once.
    In a job that submitit started (hydra/launcher=slurm), SLURM's warning before the time limit (USR2, for which it set
    a handler that requeues the job) takes the same path; the CLI hands it to submitit once the run has stopped."""
    noted: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield noted
        return

    def on_sigint(signum, frame) -> None:
        if signal.SIGINT in noted:
            raise KeyboardInterrupt
        noted.append(signum)
        signal.raise_signal(signal.SIGTERM)

    def on_slurm_warning(signum, frame) -> None:
        noted.append(signum)
        signal.raise_signal(signal.SIGTERM)

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, frame: noted.append(signum))}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where Ctrl-C is ignored (nohup, &)
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, on_sigint)
    if callable(signal.getsignal(signal.SIGUSR2)):  # submitit's: elsewhere USR2 keeps its default
        previous[signal.SIGUSR2] = signal.signal(signal.SIGUSR2, on_slurm_warning)
    try:
        yield noted
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stop_if_signalled(run: RunDir, trainer: pl.Trainer, noted: list[int], context: dict[str, Any]) -> None:
    """After a signal, whatever the phase: mark the run interrupted (it is not finished), with `context` (when it
    started, the code that ran), and stop it."""
    if not (noted or trainer.received_sigterm or trainer.interrupted):
        return
    ctrl_c = signal.SIGINT in noted or (trainer.interrupted and not noted)
    signum = signal.SIGUSR2 if signal.SIGUSR2 in noted else signal.SIGINT if ctrl_c else signal.SIGTERM
    if trainer.is_global_zero:
        mark_interrupted(run, signum, trainer.global_step, trainer.current_epoch, **context)
    raise interrupted(run, signum, trainer.global_step)


def prepare_run(cfg: DictConfig) -> RunDir:
    """The job's run directory (Hydra's; we never chdir into it), refused before any work when it cannot take
    files, with the libraries' console noise turned down."""
    run = RunDir(cfg.paths.output_dir)
    run.check_writable()
    quiet_libraries()
    return run


def seed(cfg: DictConfig) -> None:
    if cfg.seed is not None:  # `if cfg.seed` would silently drop seed=0
        pl.seed_everything(cfg.seed, workers=True, verbose=False)


def train(cfg: DictConfig, resume: bool = False) -> dict[str, Any]:
    """Run one job and return its metrics (also written to `<run dir>/metrics.json`). With `resume`, continue
    the run in cfg.paths.output_dir from its last.ckpt: same directory, same TensorBoard run, same counters."""
    run = prepare_run(cfg)
    identity = config_identity(OmegaConf.to_container(cfg, resolve=False))
    ckpt_path, purge_step = None, None
    if resume:  # an unfinished run (the CLI answers for a finished one)
        ckpt_path, purge_step = run.resume_point(identity)
        log.info(f"resuming {run.path} from {ckpt_path} (step {purge_step})")
    seed(cfg)
    # a run directory with curves but nothing to resume from: a sweep job started again from scratch
    purge_from = purge_step + 1 if purge_step is not None else 0 if run.tensorboard.is_dir() else None
    source = source_version()  # before training: the code that runs, not what it is edited into meanwhile
    with distributed_job(), signals_noted() as noted:
        timer = FitTimer()
        datamodule, model, trainer = build(cfg, purge_from, RunStamp(identity), SignalRelay(noted), timer)
        params = parameter_counts(model.net)
        log.info("parameters: {total:,} total, {trainable:,} trainable, {frozen:,} frozen".format(**params))
        context = {"started": timestamp(), "device": str(trainer.strategy.root_device), "git": source}
        test, best = fit_and_test(cfg, run, trainer, model, datamodule, ckpt_path, context)
        stop_if_signalled(run, trainer, noted, context)
        metrics = run_metrics(cfg, run, trainer, model, test, {
            "train_seconds": timer.seconds, "best_checkpoint": run.relative(best), "params": params,
            "resumed_from_step": purge_step}, context)
        if not trainer.is_global_zero:  # the other DDP ranks trained and tested; rank zero writes the results
            return {}
        return write_results(cfg, run, trainer, model, metrics, lambda: stop_if_signalled(run, trainer, noted, context))


def fit_and_test(cfg: DictConfig, run: RunDir, trainer: pl.Trainer, model: Classifier,
                 datamodule: pl.LightningDataModule, ckpt_path: Path | None, context: dict[str, Any]
                 ) -> tuple[dict[str, float], str]:
    """Train, then test the best checkpoint: the test results and that checkpoint's path. A signal ends either
    early ({} and "": the caller stops the run); any other error marks how far the run got, gives the loggers
    the failed run's row (TensorBoard's HPARAMS, MLflow), and goes on up."""
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        best = next((c.best_model_path for c in trainer.checkpoint_callbacks if c.monitor), "")
        # The test set is touched once, after training, by the checkpoint with the best validation accuracy.
        (test,) = trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False, weights_only=True)
        return test, best
    except (SIGTERMException, SystemExit) as err:  # Lightning ends a Ctrl-C with exit(1)
        if not (isinstance(err, SIGTERMException) or trainer.interrupted):
            raise
        return {}, ""
    except Exception:
        if trainer.is_global_zero:  # how far it got, for `fmnist_lab.runs`; the CLI adds the error
            run.update(epochs=trainer.current_epoch, global_step=trainer.global_step, **context)
            log_failed(trainer, plain(cfg), run.read_metrics())
        raise


def run_metrics(cfg: DictConfig, run: RunDir, trainer: pl.Trainer, model: Classifier, test: dict[str, float],
                timing: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """metrics.json of a tested run, but for what its RunResults callbacks add. `timing`: train_seconds,
    best_checkpoint, params and resumed_from_step, in that order."""
    return {
        "test/acc": test["test/acc"],
        "test/loss": test["test/loss"],
        "test_images": int(test["test/images"]),
        "task": task(run),
        "val/acc_best": model.best_val_acc(),  # a collective under DDP: every rank gets this far
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        **timing,
        "seed": cfg.seed,
        "device": str(trainer.strategy.root_device),
        "precision": str(trainer.precision),
        "cpu_threads": torch.get_num_threads(),
        "world_size": trainer.world_size,  # processes that trained (DDP ranks)
        "started": context["started"],
        "finished": timestamp(),
        "versions": {"fmnist_lab": fmnist_lab.__version__, "torch": torch.__version__, "lightning": pl.__version__,
                     "python": platform.python_version()},
        "git": context["git"],
    }


def write_results(cfg: DictConfig, run: RunDir, trainer: pl.Trainer, model: Classifier, metrics: dict[str, Any],
                  check_signals: Any) -> dict[str, Any]:
    """The tested weights, metrics.json (with what the RunResults callbacks add), the loggers' final record and
    the console's result; ArtifactError after all of it when a callback reports one (a failed ONNX check)."""
    save_weights(model.net, model.hparams.net, run.path, CLASSES, model.hparams.tta)  # the tested (best) weights
    files, errors = take_results(trainer.callbacks, metrics, [run.metrics, run.model_json, run.config])
    run.write_metrics(metrics)
    check_signals()  # the last moment a signal can still undo "finished"
    # after the run's own files: a logger may fail
    log_final(trainer.loggers, plain(cfg), metrics, files, "failed" if errors else "success")
    if errors:  # after metrics.json, so the failed run still records everything it measured
        raise ArtifactError(" ".join(errors))
    print_result(run, metrics, tensorboard=any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers))
    return metrics


def find_lr(cfg: DictConfig) -> dict[str, Any]:
    """tune=lr_find: Lightning's learning-rate range test on the run's model and data, instead of training. Writes
    lr_find.png (`lr_find_plot`: the loss against the rate, network and optimizer named, the suggestion marked),
    lr_find.json (Lightning's results as recorded) and metrics.json into the run directory and prints the suggested
    rate with the command that trains with it."""
    run = prepare_run(cfg)
    seed(cfg)
    # the finder trains throw-away steps: no checkpoints, curves or report of them
    datamodule, model, trainer = build(OmegaConf.merge(cfg, {"logger": None, "callbacks": None}))
    tune = cfg.tune
    started = timestamp()
    # Lightning's finder always draws a tqdm bar on stderr: on a terminal it is live, in a pipe or log it is noise
    with nullcontext() if sys.stderr.isatty() else redirect_stderr(io.StringIO()):
        finder = Tuner(trainer).lr_find(model, datamodule=datamodule, min_lr=tune.min_lr, max_lr=tune.max_lr,
                                        num_training=tune.num_training, mode=tune.mode,
                                        early_stop_threshold=tune.early_stop_threshold, update_attr=False)
    if finder is None:  # Lightning skips it under fast_dev_run
        raise ConfigError("Invalid config: tune=lr_find does not run with debug=fast_dev_run; drop the debug option.")
    suggestion = finder.suggestion()
    title = run_title(type(model.net).__name__, plain(cfg.model), plain(cfg.optimizer))
    write_lr_find_png(run.lr_find_png, finder.results, suggestion, title)
    write_json(run.lr_find_json, {"suggestion": suggestion, **plain(tune), **finder.results})
    metrics = {"task": "lr_find", "lr_suggestion": suggestion, "steps": len(finder.results["lr"]), "seed": cfg.seed,
               "device": str(trainer.strategy.root_device), "started": started,
               "finished": timestamp(), "git": source_version()}
    run.write_metrics(metrics)
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    others = " ".join(shlex.quote(o) for o in overrides if not o.startswith(("tune", "lr=")))
    if suggestion is None:
        print(f"no suggestion: the loss did not fall over {metrics['steps']} steps from {tune.min_lr} to "
              f"{tune.max_lr}; see {run.lr_find_png} and try other bounds (tune.min_lr, tune.max_lr).")
    else:
        print(f"suggested lr: {suggestion:.3g} (the loss's steepest descent; plot: {run.lr_find_png})\n"
              f"train with it: python -m fmnist_lab lr={suggestion:.3g} {others}".rstrip())
    return metrics



"""One training job as a straight line: seed; build the data module, model, callbacks, loggers and trainer from
the config; fit; test the best checkpoint; write the weights, metrics.json and the report."""

from __future__ import annotations

import inspect
import logging
import platform
import shlex
import signal
import subprocess
import threading
import time
import warnings
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.tuner import Tuner
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

import fmnist_lab
from fmnist_lab.artifacts import DIVERGED, freeze, parameter_counts, save_weights, warm_start
from fmnist_lab.callbacks import RunStamp, SignalRelay, show, to_log_file
from fmnist_lab.config import ConfigError
from fmnist_lab.data import CLASSES
from fmnist_lab.gpu_step import CudaGraphs
from fmnist_lab.models import Classifier, UnknownNetworkError
from fmnist_lab.report import pyplot
from fmnist_lab.run_dir import Interrupted, RunDir, atomic_write, config_identity, save_torch, write_json
from fmnist_lab.tracking import MLflowLogger, swept_knobs

log = logging.getLogger(__name__)


class ArtifactError(RuntimeError):
    """An artifact failed its check (e.g. ONNX verification); the run's other outputs are kept."""


def plain(node: Any) -> Any:
    """A resolved plain container: what goes into checkpoints and logs (never a DictConfig)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def quiet_libraries() -> None:
    """Lightning's log lines go through Hydra's handlers (console + the run's log file) once, minus ads;
    the ONNX exporter's pass-by-pass INFO lines are left out."""
    logging.getLogger("lightning").handlers.clear()  # its own console handler doubles every line under Hydra
    # A console that went away (`| head`) must not print a traceback per log line; callbacks.show then points
    # stdout at /dev/null, and the run's log file keeps every line.
    logging.raiseExceptions = False
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "Tip:" not in r.getMessage())
    for name in ("onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # Lightning-internal
    # A resumed run's checkpoint folder is its own, expected to be there.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # Under DDP every logged value is already the same on all ranks (torchmetrics combines them in compute(), the
    # train loss is reduced before it is read), so no `sync_dist`: that would add collectives that only rank
    # zero's console line triggers, and a collective called by one rank alone hangs or aborts the job.
    warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints go to a temporary file that is renamed into place: a kill in the middle of a save never
    leaves a truncated last.ckpt (Lightning's own save writes the final path directly)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_torch(checkpoint, Path(path))


def build(cfg: DictConfig, purge_from: int | None = None, *extra: pl.Callback
          ) -> tuple[pl.LightningDataModule, Classifier, pl.Trainer]:
    """Data module, model and trainer from the config, with the `extra` callbacks. `purge_from`: TensorBoard
    drops the run folder's events from this step on (a resumed run: those logged after its checkpoint; a job
    run again from scratch into its sweep folder: all of them), so the curves repeat no step."""
    datamodule = instantiate(cfg.data)
    try:
        model = Classifier(net=plain(cfg.model), optimizer=plain(cfg.optimizer),
                           scheduler=plain(cfg.scheduler) or None, num_classes=cfg.model.get("num_classes", 10),
                           fused_optimizer=cfg.gpu.fused_optimizer)
    except UnknownNetworkError as err:  # the network's own checks: arguments, sizes
        raise ConfigError(f"Invalid config: {err}") from err
    try:  # both need the network built, so they are checked here, still before any data is read
        if cfg.finetune.init_from:
            loaded = warm_start(model.net, cfg.finetune.init_from, cfg.finetune.strict)
            log.info(f"finetune.init_from={cfg.finetune.init_from}: loaded {len(loaded)} tensors "
                     f"({', '.join(loaded)})")
        if cfg.finetune.freeze:
            log.info(f"finetune.freeze: froze {', '.join(freeze(model.net, cfg.finetune.freeze))}")
    except FileNotFoundError as err:
        raise ConfigError(f"Invalid config: finetune.init_from={cfg.finetune.init_from!r}. {err}") from err
    except ValueError as err:  # warm_start and freeze name the key themselves
        raise ConfigError(f"Invalid config: {err}") from err
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    callbacks += [CudaGraphs()] if cfg.gpu.cuda_graphs else []
    callbacks += extra
    purge = {"purge_step": purge_from} if purge_from is not None else {}  # SummaryWriter's: drops steps >= it
    try:
        loggers = [instantiate(c, **(purge if "TensorBoard" in c._target_ else {}))
                   for c in (cfg.get("logger") or {}).values() if c and "_target_" in c]
    except InstantiationException as err:  # Hydra wraps what a logger raises, e.g. MLflowLogger's unusable store
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise
    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():  # submitit owns requeueing (see conf/hydra/launcher/slurm.yaml), not Lightning
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins,
                          enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
                          # only the configured checkpoints: with none, Lightning would add its own epoch=N.ckpt
                          enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                          enable_model_summary=False)
    return datamodule, model, trainer


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
    how, code = ("Ctrl-C", 130) if ctrl_c else ("SIGTERM", 128 + signal.SIGTERM)
    if signal.SIGUSR2 in noted:
        how, code = "USR2 (SLURM's warning before the time limit, or of preemption)", 128 + signal.SIGUSR2
    if trainer.is_global_zero:
        run.mark_interrupted(how, trainer.global_step, trainer.current_epoch, **context)
    raise Interrupted(f"{how} stopped the run at step {trainer.global_step}; {run.metrics} marks it interrupted. "
                      f"Continue it with: python -m fmnist_lab resume={run.path}", code)


def now() -> str:
    """The local time with its offset, as metrics.json records when a run started and finished."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


def open_run(cfg: DictConfig) -> RunDir:
    """The job's run directory (Hydra's; we never chdir into it), refused before any work when it cannot take
    files, with the libraries' console noise turned down."""
    run = RunDir(cfg.paths.output_dir)
    run.check_writable()
    quiet_libraries()
    return run


def train(cfg: DictConfig, resume: bool = False) -> dict[str, Any]:
    """Run one job and return its metrics (also written to `<run dir>/metrics.json`). With `resume`, continue
    the run in cfg.paths.output_dir from its last.ckpt: same directory, same TensorBoard run, same counters."""
    run = open_run(cfg)
    identity = config_identity(OmegaConf.to_container(cfg, resolve=False))
    ckpt_path, purge_step = None, None
    if resume:  # an unfinished run (the CLI answers for a finished one)
        ckpt_path, purge_step = run.resume_point(identity)
        log.info(f"resuming {run.path} from {ckpt_path} (step {purge_step})")
    if cfg.seed is not None:  # `if cfg.seed` would silently drop seed=0
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
    # a run directory with curves but nothing to resume from: a sweep job started again from scratch
    purge_from = purge_step + 1 if purge_step is not None else 0 if run.tensorboard.is_dir() else None
    source = source_version()  # before training: the code that runs, not what it is edited into meanwhile
    with distributed_job(), signals_noted() as noted:
        datamodule, model, trainer = build(cfg, purge_from, RunStamp(identity), SignalRelay(noted))
        params = parameter_counts(model.net)
        log.info("parameters: {total:,} total, {trainable:,} trainable, {frozen:,} frozen".format(**params))
        started = now()
        context = {"started": started, "device": str(trainer.strategy.root_device), "git": source}
        start = time.perf_counter()
        try:
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
            train_seconds = time.perf_counter() - start
            best = next((c.best_model_path for c in trainer.checkpoint_callbacks if c.monitor), "")
            # The test set is touched once, after training, by the checkpoint with the best validation accuracy.
            (test,) = trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False,
                                   weights_only=True)
        except (SIGTERMException, SystemExit) as err:  # Lightning ends a Ctrl-C with exit(1)
            if not (isinstance(err, SIGTERMException) or trainer.interrupted):
                raise
        except Exception:
            if trainer.is_global_zero:  # how far it got, for `fmnist_lab.runs`; the CLI adds the error
                run.update(epochs=trainer.current_epoch, global_step=trainer.global_step, **context)
            raise
        stop_if_signalled(run, trainer, noted, context)
        metrics = {
            "test/acc": test["test/acc"],
            "test/loss": test["test/loss"],
            "test_images": int(test["test/images"]),
            "task": cfg.task_name,  # debug: numbers from slices of the data (debug=limit, fast_dev_run, overfit)
            "val/acc_best": model.best_val_acc(),  # a collective under DDP: every rank gets this far
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            "train_seconds": round(train_seconds, 3),
            "best_checkpoint": run.relative(best),
            "params": params,
            "resumed_from_step": purge_step,
            "seed": cfg.seed,
            "device": str(trainer.strategy.root_device),
            "precision": str(trainer.precision),
            "cpu_threads": torch.get_num_threads(),
            "world_size": trainer.world_size,  # processes that trained (DDP ranks)
            "started": started,
            "finished": now(),
            "versions": {"fmnist_lab": fmnist_lab.__version__, "torch": torch.__version__, "lightning": pl.__version__,
                         "python": platform.python_version()},
            "git": source,
        }
        if not trainer.is_global_zero:  # the other DDP ranks trained and tested; rank zero writes the results
            return {}
        save_weights(model.net, model.hparams.net, run.path, CLASSES)  # the tested (best) weights
        files = [run.metrics, run.model_json, run.config]  # for loggers that keep a run's files
        for callback in trainer.callbacks:  # e.g. the ONNX export's verification result and its model.onnx
            metrics.update(getattr(callback, "metrics", None) or {})
            files += getattr(callback, "files", None) or []
        run.write_metrics(metrics)
        stop_if_signalled(run, trainer, noted, context)  # the last moment a signal can still undo "finished"
        errors = [callback.error for callback in trainer.callbacks if getattr(callback, "error", None)]
        # after the run's own files: a logger may fail
        log_final(trainer.loggers, plain(cfg), metrics, files, "failed" if errors else "success")
        if errors:  # after metrics.json, so the failed run still records everything it measured
            raise ArtifactError(" ".join(errors))
        report(run, metrics, tensorboard=any("tensorboard" in type(lg).__name__.lower() for lg in trainer.loggers))
        return metrics


def find_lr(cfg: DictConfig) -> dict[str, Any]:
    """tune=lr_find: Lightning's learning-rate range test on the run's model and data, instead of training. Writes
    lr_find.png (loss against rate, the suggestion marked), lr_find.json and metrics.json into the run directory
    and prints the suggested rate with the command that trains with it."""
    run = open_run(cfg)
    if cfg.seed is not None:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
    # the finder trains throw-away steps: no checkpoints, curves or report of them
    datamodule, model, trainer = build(OmegaConf.merge(cfg, {"logger": None, "callbacks": None}))
    tune = cfg.tune
    started = now()
    finder = Tuner(trainer).lr_find(model, datamodule=datamodule, min_lr=tune.min_lr, max_lr=tune.max_lr,
                                    num_training=tune.num_training, mode=tune.mode,
                                    early_stop_threshold=tune.early_stop_threshold, update_attr=False)
    if finder is None:  # Lightning skips it under fast_dev_run
        raise ConfigError("Invalid config: tune=lr_find does not run with debug=fast_dev_run; drop the debug option.")
    suggestion = finder.suggestion()
    plt = pyplot()
    figure = finder.plot(suggest=suggestion is not None, show=False)
    figure.axes[0].set_title(f"suggested lr: {suggestion:.3g}" if suggestion else "no suggestion")
    atomic_write(run.lr_find_png, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)
    write_json(run.lr_find_json, {"suggestion": suggestion, **plain(tune), **finder.results})
    metrics = {"task": "lr_find", "lr_suggestion": suggestion, "steps": len(finder.results["lr"]), "seed": cfg.seed,
               "device": str(trainer.strategy.root_device), "started": started,
               "finished": now(), "git": source_version()}
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


def source_version() -> dict[str, Any] | None:
    """The git commit of the fmnist_lab checkout that runs, and whether its tracked files had changes; None
    when fmnist_lab is installed from a wheel (or git is missing)."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(Path(fmnist_lab.__file__).parent), *args], capture_output=True,
                              text=True, timeout=30)
    try:
        # an installed copy can sit inside some checkout (a venv in a repo): only our own tracked files count
        if git("ls-files", "--error-unmatch", "__init__.py").returncode != 0:
            return None
        commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        return None
    if commit.returncode != 0:
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def log_final(loggers: list, config: dict, metrics: dict, files: list[Path], status: str) -> None:
    """The job's settings and final numbers to every logger, through each logger's public API. TensorBoard's
    HPARAMS tab shows them side by side (as hp/* scalars, so the real curves keep only their real points), and
    one `tensorboard --logdir <sweep dir>` compares every job; MLflow also gets the run's files. A logger that
    fails costs a warning, not the run."""
    hparams = swept_knobs(config)
    final = {f"hp/{k.replace('/', '_')}": metrics[k] for k in ("test/acc", "test/loss", "val/acc_best")
             if metrics[k] is not None}
    for logger in loggers:
        try:
            if isinstance(logger, MLflowLogger):  # its own names: test/acc beside the curves of the same name
                logger.log_hyperparams(hparams)
                numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
                logger.log_metrics({k: v for k, v in numbers.items() if k not in ("seed", "cpu_threads", "world_size")},
                                   step=metrics["global_step"])
                logger.log_files(files)
            elif "metrics" in inspect.signature(logger.log_hyperparams).parameters:
                logger.log_hyperparams(hparams, final)
            else:  # e.g. CSVLogger: the parameters, then the numbers as one more row
                logger.log_hyperparams(hparams)
                logger.log_metrics(final, step=metrics["global_step"])
            logger.finalize(status)
        except Exception as err:
            log.warning(f"{type(logger).__name__} could not record the final metrics ({type(err).__name__}: {err}); "
                        "the run's own files (metrics.json, checkpoints, weights) are complete.")


def report(run: RunDir, metrics: dict, tensorboard: bool) -> None:
    """The result in a few lines: the test numbers, the files the run left (only those it wrote: a
    fast_dev_run saves no checkpoint), and how to see the curves."""
    acc = f"test/acc {metrics['test/acc']:.4f}"
    rest = (f"test/loss {metrics['test/loss']:.4g}  "
            f"({metrics['epochs']} epochs, {metrics['train_seconds']:.1f} s training on {metrics['device']})")
    show(rest, bold=acc)
    to_log_file(f"{acc}  {rest}")
    if not metrics["test/loss"] < DIVERGED:  # chance level is ln(10) = 2.3: the logits have blown up
        show(f"warning: test/loss {metrics['test/loss']:.3g}: training diverged; try a smaller lr.")
    files = [f.name + ("/" if f.is_dir() else "") for f in (run.metrics, run.checkpoints, run.weights) if f.exists()]
    files += ["model.onnx (verified)"] if metrics.get("onnx", {}).get("ok") else []
    show(f"artifacts: {run.path}  ({', '.join(files)})")
    if tensorboard:
        show(f"curves:    tensorboard --logdir {run.tensorboard}")

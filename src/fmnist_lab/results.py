"""What a tested run hands out: the results its callbacks add to metrics.json, its settings and final numbers to
every logger, and the few lines of its result on the console."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from fmnist_lab import swept
from fmnist_lab.artifacts import DIVERGED
from fmnist_lab.callbacks import RunResults
from fmnist_lab.console import show, to_log_file
from fmnist_lab.run_dir import RunDir
from fmnist_lab.tensorboard_hparams import final_numbers, number, record
from fmnist_lab.tracking import MLflowLogger, logged_settings, recorded_store

log = logging.getLogger(__name__)


def take_results(callbacks: list[pl.Callback], metrics: dict[str, Any], files: list[Path]
                 ) -> tuple[list[Path], list[str]]:
    """What the RunResults callbacks add (e.g. the ONNX export's verification result and its model.onnx): their
    metrics into `metrics`, each key from one writer; the run's files for the loggers; the errors that fail it."""
    errors = []
    for callback in callbacks:
        if isinstance(callback, RunResults):
            if taken := metrics.keys() & callback.metrics.keys():
                raise RuntimeError(f"{type(callback).__name__} gives {', '.join(sorted(taken))}, which the run or "
                                   "another callback gives already: a key of metrics.json has one writer.")
            metrics.update(callback.metrics)
            files = [*files, *callback.files]
            errors += [callback.error] if callback.error else []
    return files, errors


def log_final(loggers: list, config: dict, metrics: dict, files: list[Path], status: str) -> None:
    """The job's settings and final numbers to every logger, through each logger's public API. TensorBoard's
    HPARAMS tab shows them side by side (as hp/* scalars, so the real curves keep only their real points), the swept
    keys and the objective first, and one `tensorboard --logdir <sweep dir>` compares every job; MLflow also gets
    the run's files. `metrics` may lack numbers (a failed job's): their cells stay empty. A logger that fails costs
    a warning, not the run."""
    hparams = logged_settings(config)
    final = final_numbers(metrics, config.get("optimized_metric"))
    step = metrics.get("global_step")
    for logger in loggers:
        try:
            if isinstance(logger, MLflowLogger):  # its own names: test/acc beside the curves of the same name
                logger.log_hyperparams(hparams)
                numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
                logger.log_metrics({k: v for k, v in numbers.items() if k not in ("seed", "cpu_threads", "world_size")},
                                   step=step)
                logger.log_files(files)
            elif isinstance(logger, TensorBoardLogger):
                record(logger, hparams, final, swept.current(), status, step)
            else:  # e.g. CSVLogger: the parameters, then the numbers as one more row
                logger.log_hyperparams(hparams)
                logger.log_metrics({k: v for k, v in final.items() if v is not None}, step=step)
            logger.finalize(status)
        except Exception as err:
            log.warning(f"{type(logger).__name__} could not record the final metrics ({type(err).__name__}: {err}); "
                        "the run's own files (metrics.json, checkpoints, weights) are complete.")


def log_failed(trainer: pl.Trainer, config: dict, metrics: dict) -> None:
    """A job that failed in training (an error, a loss that diverged) to every logger, as log_final records a
    finished one: its settings, the numbers it logged last (val/acc_best of its last epoch; none where it had
    none), status failed, so that it has its row among the others (TensorBoard's HPARAMS, MLflow's runs).
    `metrics`: what metrics.json holds of it."""
    logged = {k: number(v) for k, v in trainer.callback_metrics.items()}
    log_final(trainer.loggers, config, {**logged, **metrics, "global_step": trainer.global_step}, [], "failed")


def command(tool: str, *args: Any) -> str:
    """`tool args`, to paste into any shell: the tool's script beside this Python (the venv's bin/, which a shell
    without the venv active does not have on its PATH), else the bare name."""
    script = Path(sys.executable).parent / tool
    return shlex.join([str(script) if script.is_file() else tool, *map(str, args)])


def viewers(run: RunDir, tensorboard: bool) -> list[str]:
    """One line per logger that wrote the run: the command that shows it, or its file."""
    lines = [f"curves:    {command('tensorboard', '--logdir', run.tensorboard)}"] if tensorboard else []
    lines += [f"metrics:   {path}" for path in sorted(run.path.rglob("metrics.csv"))]  # CSVLogger's
    if store := recorded_store(run):
        lines.append(f"mlflow:    {command('mlflow', 'ui', '--backend-store-uri', store)}")
    return lines


def print_result(run: RunDir, metrics: dict, tensorboard: bool) -> None:
    """The result in a few lines: the test numbers, the files the run left (only those it wrote: a
    fast_dev_run saves no checkpoint), and how to see what each logger recorded."""
    acc = f"test/acc {metrics['test/acc']:.4f}"
    rest = (f"test/loss {metrics['test/loss']:.4g}  "
            f"({metrics['epochs']} epoch{'s' * (metrics['epochs'] != 1)}, {metrics['train_seconds']:.1f} s training "
            f"on {metrics['device']})")
    show(rest, bold=acc)
    to_log_file(f"{acc}  {rest}")
    if not metrics["test/loss"] < DIVERGED:  # chance level is ln(10) = 2.3: the logits have blown up
        show(f"warning: test/loss {metrics['test/loss']:.3g}: training diverged; try a smaller lr.")
    files = [f.name + ("/" if f.is_dir() else "") for f in (run.metrics, run.checkpoints, run.weights) if f.exists()]
    files += ["model.onnx (verified)"] if metrics.get("onnx", {}).get("ok") else []
    show(f"artifacts: {run.path}  ({', '.join(files)})")
    for line in viewers(run, tensorboard):
        show(line)

"""One training job: seed, build from the config, fit, test the best checkpoint, write metrics.json."""

from __future__ import annotations

import json
import logging
import os
import platform
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies.launchers import subprocess_script
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

import fmnist_lab
from fmnist_lab.callbacks import AtomicCheckpointIO
from fmnist_lab.data import CLASSES
from fmnist_lab.files import write_json
from fmnist_lab.model import Classifier, freeze, parameter_counts, save_weights, warm_start

log = logging.getLogger(__name__)
INIT_KEYS = {"init_from": None, "init_strict": True, "freeze": []}
# trainer.* keys that are not Trainer arguments: the step's (read by Classifier) and a callback's
STEP_KEYS = {"cuda_graphs": "auto", "gradient_clip_val": None, "gradient_clip_algorithm": "norm",
             "ckpt_every_n_steps": 0}


class ArtifactError(RuntimeError):
    """An artifact failed its check (e.g. ONNX verification); the run's other outputs are kept."""


class ResumeError(RuntimeError):
    """A run cannot be continued: no checkpoint, or a damaged one."""


def plain(node: Any) -> Any:
    """A resolved plain container: what goes into checkpoints and logs (never a DictConfig)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def quiet_libraries() -> None:
    """Lightning's log lines go through Hydra's handlers (console + the run's log file) once, minus ads;
    the ONNX exporter's pass-by-pass INFO lines are left out."""
    logging.getLogger("lightning").handlers.clear()  # its own console handler doubles every line under Hydra
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "Tip:" not in r.getMessage())
    for name in ("onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # Lightning-internal
    # On resume: DeviceBatches does continue mid-epoch (FashionMNISTDataModule._batches_done), and the run's own
    # checkpoint folder is expected to be there.
    warnings.filterwarnings("ignore", message=r".*your dataloader is not resumable")
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # Under DDP every logged value is already the same on all ranks (torchmetrics combines them in compute(), the
    # train loss is reduced before it is read), so no `sync_dist`: that would add collectives that only rank
    # zero's console line triggers, and a collective called by one rank alone hangs or aborts the job.
    warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting")
    # Lightning counts batch groups (data.group_batches); train/loss is logged by optimizer step regardless.
    warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging")


def build(cfg: DictConfig, purge_step: int | None = None) -> tuple[pl.LightningDataModule, Classifier, pl.Trainer]:
    """Data module, model and trainer from the config. `purge_step` (on resume, the checkpoint's step):
    TensorBoard drops what the interrupted run logged after it, so the continued curves repeat no step."""
    datamodule = instantiate(cfg.data)
    net_config = plain(cfg.model)
    # How to initialize and what to freeze belong to this run, not to the architecture a checkpoint records.
    init_from, init_strict, frozen = (net_config.pop(k, d) for k, d in INIT_KEYS.items())
    # The model owns the optimizer step, so the step's settings go to it rather than to the Trainer.
    trainer_cfg = {k: v for k, v in cfg.trainer.items() if k not in STEP_KEYS}
    step = {k: cfg.trainer.get(k, default) for k, default in STEP_KEYS.items() if k != "ckpt_every_n_steps"}
    model = Classifier(net=net_config, optimizer=plain(cfg.optimizer), scheduler=plain(cfg.scheduler) or None,
                       num_classes=cfg.model.get("num_classes", 10),
                       log_every_n_steps=cfg.trainer.get("log_every_n_steps", 50), **step)
    if init_from:
        loaded = warm_start(model.net, init_from, init_strict)
        log.info(f"model.init_from={init_from}: loaded {len(loaded)} tensors ({', '.join(loaded)})")
    if frozen:
        log.info(f"model.freeze: froze {', '.join(freeze(model.net, frozen))}")
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    # SummaryWriter's purge_step drops events at steps >= it: those logged after the checkpoint was taken
    loggers = [instantiate(c, **({"purge_step": purge_step + 1} if purge_step and "TensorBoard" in c._target_ else {}))
               for c in (cfg.get("logger") or {}).values() if c and "_target_" in c]
    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():  # submitit owns requeueing (see conf/hydra/launcher/slurm.yaml), not Lightning
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False, plugins=plugins,
                          enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
                          enable_model_summary=False)
    return datamodule, model, trainer


def resume_point(out: Path) -> tuple[Path, int]:
    """checkpoints/last.ckpt of an unfinished run and its global step; a clear error if there is none."""
    last = out / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise ResumeError(f"resume: {out} has no checkpoints/last.ckpt (it stopped before its first checkpoint), "
                          "so there is nothing to continue; start a new run with the same overrides instead.")
    try:
        return last, int(torch.load(last, map_location="cpu", weights_only=True)["global_step"])
    except Exception as err:
        raise ResumeError(f"resume: {last} cannot be read ({type(err).__name__}: {err}). It is damaged; "
                          "checkpoints/best.ckpt may still be intact, or start a new run.") from err


DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def rank_command(local_rank: int) -> tuple[list[str], str]:
    """How Lightning's DDP launcher starts ranks 1..n-1 of this job. Lightning's own version re-runs sys.argv,
    which inside a sweep (`-m`) would start the whole sweep again in every rank; this re-runs only this job:
    its own overrides, in its own run directory, without a second copy of .hydra/."""
    job = HydraConfig.get()
    return [sys.executable, "-m", "fmnist_lab", *job.overrides.task, f'hydra.run.dir="{job.runtime.output_dir}"',
            f"hydra.job.name={job.job.name}_rank{local_rank}", "hydra.output_subdir=null"], os.getcwd()


subprocess_script._hydra_subprocess_cmd = rank_command


@contextmanager
def distributed_job(trainer: pl.Trainer):
    """One job's DDP world ends with the job, so the next job of a sweep in this process starts its own: the
    ranks meet, the process group closes, the ranks Lightning started here exit (killed if the job failed:
    they may wait on rank zero forever), and the launcher's variables leave this process."""
    before = {k: os.environ.get(k) for k in DDP_ENV}

    def joined() -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    ok = False
    try:
        yield
        if joined():
            torch.distributed.barrier()  # rank zero has written the results; only now may the ranks exit
        ok = True
    finally:
        if joined():
            torch.distributed.destroy_process_group()
        ranks = getattr(trainer.strategy.launcher, "procs", None) or []
        for process in ranks:
            if not ok:
                process.kill()
            process.wait()
        # Lightning's watchdog thread kills this process when a rank exits non-zero; it watches this list,
        # and an empty one ends it, so a failed job cannot take the rest of the sweep down with it.
        ranks.clear()
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def train(cfg: DictConfig, resume: bool = False) -> dict[str, Any]:
    """Run one job and return its metrics (also written to `<run dir>/metrics.json`). With `resume`, continue
    the run in cfg.paths.output_dir from its last.ckpt: same directory, same TensorBoard run, same counters."""
    out = Path(cfg.paths.output_dir)  # Hydra's run dir; we never chdir into it
    out.mkdir(parents=True, exist_ok=True)
    quiet_libraries()
    ckpt_path, purge_step = None, None
    if resume:
        done = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
        if done and done.get("status") != "failed":
            print(f"{out} already finished ({done['epochs']} epochs, test/acc {done['test/acc']:.4f}); "
                  "nothing to resume.")
            return done
        ckpt_path, purge_step = resume_point(out)
        log.info(f"resuming {out} from {ckpt_path} (step {purge_step})")
    if cfg.seed is not None:  # `if cfg.seed` would silently drop seed=0
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, model, trainer = build(cfg, purge_step)
    with distributed_job(trainer):
        params = parameter_counts(model.net)
        log.info("parameters: {total:,} total, {trainable:,} trainable, {frozen:,} frozen".format(**params))

        started = datetime.now().astimezone().isoformat(timespec="seconds")
        start = time.perf_counter()
        try:
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except SIGTERMException:  # SaveOnInterrupt has saved last.ckpt; exit non-zero like a killed process
            raise SystemExit(128 + signal.SIGTERM) from None
        train_seconds = time.perf_counter() - start

        checkpoint = trainer.checkpoint_callback
        best = checkpoint.best_model_path if isinstance(checkpoint, ModelCheckpoint) else ""
        # The test set is touched once, after training, by the checkpoint with the best validation accuracy.
        (test,) = trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False,
                               weights_only=True)

        metrics = {
            "test/acc": test["test/acc"],
            "test/loss": test["test/loss"],
            "val/acc_best": float(model.val_acc_best.compute()) if model.val_acc_best.update_called else None,
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            "train_seconds": round(train_seconds, 3),
            "best_checkpoint": best or None,
            "params": params,
            "resumed_from_step": purge_step,
            "seed": cfg.seed,
            "device": str(trainer.strategy.root_device),
            "step": model.step_mode,  # cuda_graph | direct | lightning (see Classifier.step_blockers)
            "cpu_threads": torch.get_num_threads(),
            "started": started,
            "finished": datetime.now().astimezone().isoformat(timespec="seconds"),
            "versions": {"fmnist_lab": fmnist_lab.__version__, "torch": torch.__version__, "lightning": pl.__version__,
                         "python": platform.python_version()},
        }
        # After the metrics: val_acc_best.compute() is a collective under DDP, so every rank must get this far.
        if not trainer.is_global_zero:  # the other DDP ranks trained and tested; rank zero writes the results
            return {}
        # TensorBoard's HPARAMS tab: this job's config next to its final numbers (as hp/* scalars, so the real
        # curves keep only their real points); one `tensorboard --logdir <sweep dir>` compares every job.
        hparams = {k: v for k, v in plain(cfg).items() if k not in ("paths", "hydra")}
        final = {f"hp/{k.replace('/', '_')}": metrics[k] for k in ("test/acc", "test/loss", "val/acc_best")
                 if metrics[k] is not None}
        for logger in trainer.loggers:
            logger.log_hyperparams(hparams, final)
            logger.finalize("success")
        save_weights(model.net, model.hparams.net, out, CLASSES)  # the tested (best) weights
        for callback in trainer.callbacks:  # e.g. the ONNX export's verification result
            metrics.update(getattr(callback, "metrics", None) or {})
        write_json(out / "metrics.json", metrics)
        errors = [callback.error for callback in trainer.callbacks if getattr(callback, "error", None)]
        if errors:  # after metrics.json, so the failed run still records everything it measured
            raise ArtifactError(" ".join(errors))
        report(out, metrics, tensorboard=any("tensorboard" in type(lg).__name__.lower() for lg in trainer.loggers))
        return metrics


def report(out: Path, metrics: dict, tensorboard: bool) -> None:
    console = Console(highlight=False, soft_wrap=True)  # paths stay whole for copying
    console.print(f"[bold]test/acc {metrics['test/acc']:.4f}[/]  test/loss {metrics['test/loss']:.4f}  "
                  f"({metrics['epochs']} epochs, {metrics['train_seconds']:.1f} s training on {metrics['device']})")
    onnx_note = ", model.onnx (verified)" if metrics.get("onnx", {}).get("ok") else ""
    console.print(f"artifacts: {out}  (metrics.json, checkpoints/, model_weights.pth{onnx_note})")
    if tensorboard:
        console.print(f"curves:    tensorboard --logdir {out / 'tensorboard'}")

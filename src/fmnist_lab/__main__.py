"""`python -m fmnist_lab [overrides]`: train with the Hydra config in conf/train.yaml (`-m` for sweeps)."""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fmnist_lab.config import register

log = logging.getLogger(__name__)
register()  # the typed schema conf/train.yaml builds on


def config_dir() -> str:
    """The configs: inside the package for a wheel install, the repo's top-level conf/ for an editable one."""
    packaged = Path(__file__).with_name("conf")
    return str(packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "conf")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """One job. Returns the objective for sweepers: `optimized_metric`, or None for a failed job."""
    # Heavy imports here, not at the top, so `--help` and config errors answer at once.
    from fmnist_lab.config import validate
    from fmnist_lab.sweep import is_multirun, record_failure, share_machine

    if not is_multirun():
        return single_run(cfg)

    share_machine(cfg)
    try:
        validate(cfg)
        from fmnist_lab.train import train

        # A requeued SLURM job (preempted, or out of time) starts again in its own directory: continue there.
        # Only then: a sweep run again into an old sweep directory must not pick up another config's run.
        requeued = int(os.environ.get("SLURM_RESTART_COUNT", 0)) > 0
        requeued = requeued and (Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt").is_file()
        value = train(cfg, resume=requeued).get(cfg.get("optimized_metric"))
    except Exception as err:  # one job's failure must not end the sweep: record it, report it, go on
        record_failure(cfg, err)
        log.error(f"job failed: {type(err).__name__}: {err}")
        return None  # Optuna counts a trial without a value as failed
    return value if value is not None and math.isfinite(value) else None


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)


def single_run(cfg: DictConfig) -> float | None:
    """A run from the command line: known problems end in one paragraph and exit code 1, no traceback."""
    from fmnist_lab.config import ConfigError, validate
    from fmnist_lab.sweep import record_failure

    try:
        validate(cfg)
    except ConfigError as err:
        fail(str(err))
    from fmnist_lab.data import DataError
    from fmnist_lab.model import CaptureError
    from fmnist_lab.train import ArtifactError, ResumeError, train

    try:
        if cfg.resume is None:
            metrics = train(cfg)
        else:  # continue with the config the run was started with (Hydra has put us in its directory)
            original = OmegaConf.load(Path(cfg.paths.output_dir) / ".hydra" / "config.yaml")
            others = [o for o in HydraConfig.get().overrides.task if not o.startswith("resume=")]
            if others:
                log.warning(f"resume uses the run's own config; ignoring {' '.join(others)}")
            metrics = train(original, resume=True)
    except ResumeError as err:
        fail(str(err))
    except (DataError, ArtifactError, FloatingPointError, CaptureError) as err:
        record_failure(cfg, err)
        fail(f"{err}\nThe run is marked failed in {Path(cfg.paths.output_dir) / 'metrics.json'}; its checkpoints "
             "(up to the last good epoch) are kept.")
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()

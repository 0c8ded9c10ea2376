"""`python -m fmnist_lab [overrides]`: train with the Hydra config in conf/train.yaml (`-m` for sweeps)."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

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
    from fmnist_lab.config import ConfigError, validate
    from fmnist_lab.sweep import is_multirun, record_failure, share_machine

    if not is_multirun():
        try:
            validate(cfg)
            from fmnist_lab.data import DataError
            from fmnist_lab.train import ArtifactError, train

            metrics = train(cfg)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(1) from None
        except (DataError, ArtifactError, FloatingPointError) as err:
            record_failure(cfg, err)
            print(f"error: {err}\nThe run is marked failed in {Path(cfg.paths.output_dir) / 'metrics.json'}; "
                  "its checkpoints (the last good epoch) are kept.", file=sys.stderr)
            raise SystemExit(1) from None
        return metrics.get(cfg.get("optimized_metric"))

    share_machine(cfg)
    try:
        validate(cfg)
        from fmnist_lab.train import train

        value = train(cfg).get(cfg.get("optimized_metric"))
    except Exception as err:  # one job's failure must not end the sweep: record it, report it, go on
        record_failure(cfg, err)
        log.error(f"job failed: {type(err).__name__}: {err}")
        return None  # Optuna counts a trial without a value as failed
    return value if value is not None and math.isfinite(value) else None


if __name__ == "__main__":
    main()

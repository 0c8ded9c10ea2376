"""`python -m fmnist_lab [overrides]`: train with the Hydra config in conf/train.yaml."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig


def config_dir() -> str:
    """The configs: inside the package for a wheel install, the repo's top-level conf/ for an editable one."""
    packaged = Path(__file__).with_name("conf")
    return str(packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "conf")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    # Heavy imports here, not at the top, so `--help` and config errors answer at once.
    from fmnist_lab.data import DataError
    from fmnist_lab.train import ArtifactError, train

    try:
        metrics = train(cfg)
    except (DataError, ArtifactError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""How long `python -m fmnist_lab.runs` takes over many run folders, start-up included.

    python scripts/bench_runs.py [--runs 500] [--rounds 3]

Writes `--runs` run folders the size of real ones (the composed default config as .hydra/config.yaml,
hydra.yaml, overrides.yaml and a metrics.json; a tenth of them failed, a tenth unfinished, with a log file and
a checkpoint) into a temporary folder, then times the listing, `--group` and `--filter` in fresh processes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fmnist_lab.config import config_dir, register


def write_runs(root: Path, count: int) -> None:
    register()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True, overrides=["paths.output_dir=unused"])
    hydra_yaml = OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, ["hydra"]))
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    for i in range(count):
        run = root / "outputs" / "multirun" / "2026-01-01" / f"{i // 50:02d}-00-00" / str(i % 50)
        (run / ".hydra").mkdir(parents=True)
        cfg.seed, cfg.lr = i % 5, [0.01, 0.05, 0.1][i % 3]
        (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        (run / ".hydra" / "hydra.yaml").write_text(hydra_yaml)
        (run / ".hydra" / "overrides.yaml").write_text(f"- seed={i % 5}\n- lr={cfg.lr}\n")
        if i % 10 == 9:  # unfinished: no metrics.json, a log and a checkpoint
            (run / "fmnist_lab.log").write_text("".join(f"[x][INFO] - epoch {e}/10: val/acc 0.8\n" for e in (1, 2)))
            (run / "checkpoints").mkdir()
            (run / "checkpoints" / "last.ckpt").write_bytes(b"")
            continue
        metrics = {"test/acc": 0.88 + i % 7 / 1000, "test/loss": 0.33, "val/acc_best": 0.89, "epochs": 10,
                   "train_seconds": 14.2, "device": "cpu", "started": f"2026-01-01T{i // 50:02d}:00:{i % 50:02d}"}
        if i % 10 == 8:
            metrics = {"status": "failed", "error": "FloatingPointError: nan", "epochs": 3}
        (run / "metrics.json").write_text(json.dumps(metrics, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_runs(root, args.runs)
        print(f"| `python -m fmnist_lab.runs ...` over {args.runs} runs | median s (of {args.rounds}) |\n|---|---|")
        for extra in ([], ["--group"], ["--filter", "lr=0.05", "--sort", "test/acc"]):
            times = []
            for _ in range(args.rounds):
                start = time.perf_counter()
                result = subprocess.run([sys.executable, "-m", "fmnist_lab.runs", *extra], cwd=root,
                                        capture_output=True, text=True)
                times.append(time.perf_counter() - start)
                assert result.returncode == 0, result.stderr
            print(f"| {' '.join(extra) or '(list all)'} | {statistics.median(times):.2f} |")


if __name__ == "__main__":
    main()

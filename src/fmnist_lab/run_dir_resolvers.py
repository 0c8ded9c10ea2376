"""Which folder a run writes into: the run that `resume=` names, or a new one that no other run shares. These are
the resolvers conf/train.yaml names (`run_dir`, `unique_dir`, `config_subdir`; registered by
`fmnist_lab.config.register`), and what `validate` and a failed run's clean-up ask about them."""

from __future__ import annotations

import itertools
import os
import sys
from datetime import datetime
from pathlib import Path

from fmnist_lab.run_dir import RunDir


def find_run(resume: str, log_dir: str) -> Path | None:
    """The run directory that `resume` names (`latest`: the newest run under log_dir), or None."""
    if resume == "latest":  # run folders are named <date>/<time>, so the name order is the start order
        runs = sorted(p.parent.parent for p in Path(log_dir).glob("*/*/checkpoints/last.ckpt"))
        return runs[-1].resolve() if runs else None
    return Path(resume).resolve() if RunDir(resume).config.exists() else None


def run_dir(resume: str | None, log_dir: str, fresh: str) -> str:
    """Hydra's run directory (the `run_dir` resolver): the run that `resume` names, else a new
    `<log_dir>/<date>/<time>` (also when `resume` names nothing: `validate` then stops with the error, which
    a resolver could only print as a traceback)."""
    found = find_run(resume, log_dir) if resume is not None else None
    return str(found) if found else unique_dir(f"{log_dir}/{fresh}")


CLAIMED: dict[str, str] = {}  # base name -> the directory this process created for it


def unique_dir(base: str) -> str:
    """`base`, else `base_1`, `base_2`, ...: the first that this process creates itself, so runs (or sweeps)
    started in the same second from the same folder never share a directory (os.mkdir either creates or fails,
    atomically). Asked again, the same process gets the same directory."""
    if base not in CLAIMED:
        try:
            Path(base).parent.mkdir(parents=True, exist_ok=True)
            for n in itertools.count():
                candidate = base if n == 0 else f"{base}_{n}"
                try:
                    os.mkdir(candidate)
                except FileExistsError:
                    continue
                CLAIMED[base] = candidate
                break
        except OSError as err:  # Hydra asks before any fmnist_lab code runs: say it here, and stop
            print(f"error: cannot create the run folder {base}: {err.strerror}. Choose a writable place with "
                  "paths.log_dir=... (or hydra.run.dir=...).", file=sys.stderr)
            raise SystemExit(1) from err
    return CLAIMED[base]


def created_here(path: str | Path) -> bool:
    """Whether this process created the run folder `path` (a new run's, by unique_dir)."""
    return Path(path).resolve() in {Path(p).resolve() for p in CLAIMED.values()}


def config_subdir(resume: str | None) -> str:
    """Where Hydra saves the config: a resumed run keeps the original `.hydra/` and adds its own below it."""
    return ".hydra" if resume is None else f".hydra/resumed-{datetime.now():%Y-%m-%d_%H-%M-%S}"

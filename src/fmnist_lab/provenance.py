"""When, from which code and on what data a run ran, as metrics.json records it."""

from __future__ import annotations

import re
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

import fmnist_lab
from fmnist_lab.run_dir import RunDir
from fmnist_lab.untrusted import BadFileError, load_yaml

DEBUG_OPTION = re.compile(r"\+*debug=(?!null$|none$)\S+", re.I)  # an override choosing a conf/debug/ option


def task(run: RunDir) -> str:
    """"debug" for a run started with a debug= option, whose numbers come from slices of the data (its own
    .hydra/overrides.yaml says, also when it is resumed), else "train"."""
    try:
        overrides = load_yaml(run.overrides)
    except (BadFileError, OSError):  # no Hydra record: a run started from Python
        return "train"
    started_with = overrides if isinstance(overrides, list) else []
    return "debug" if any(DEBUG_OPTION.fullmatch(str(o)) for o in started_with) else "train"


def timestamp() -> str:
    """The local time with its offset, as metrics.json records when a run started and finished."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


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

"""Which runs `python -m fmnist_lab.runs` shows and in what order: every run below the folders, newest first,
those that pass --filter (values compared by meaning, not by spelling), sorted best first by --sort."""

from __future__ import annotations

import functools
import math
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from fmnist_lab.run_reader import Run, RunsError
from fmnist_lab.run_values import UNUSABLE, plain
from fmnist_lab.untrusted import YAML_LOADER, BadFileError, check_yaml

LOWER_IS_BETTER = ("loss", "ece", "seconds")
MAX_WANTED = 1000  # characters of a --filter value read as YAML


def newest_first(run: Run) -> tuple[float, str]:
    when = run.when
    return (when.timestamp() if isinstance(when, datetime) else -math.inf), str(run.path)  # no date: last


def find_runs(folders: list[Path]) -> list[Run]:
    """Every folder below `folders` that holds a `.hydra/` (Hydra's record of a run or sweep job)."""
    runs: dict[Path, Run] = {}
    for folder in folders:
        if not folder.is_dir():
            raise RunsError(f"{folder} is not a folder. Name the folder your runs are in (paths.log_dir, "
                            "default outputs/), e.g. python -m fmnist_lab.runs outputs")
        for here, dirs, _ in os.walk(folder.resolve()):
            if ".hydra" in dirs:
                runs[Path(here)] = Run(Path(here))
                dirs.clear()  # a run holds no other run; its checkpoints and curves need no walk
            else:
                dirs[:] = [d for d in dirs if d not in ("tensorboard", "checkpoints", "csv", "mlartifacts")]
    return sorted(runs.values(), key=newest_first, reverse=True)  # a sweep's jobs: 2, 1, 0


def number(value: Any) -> float | None:
    """A finite number, from a number or its text ("1e-1"); None for anything else (bools included)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        value = float(value)
    except (ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None


@functools.lru_cache(maxsize=64)  # asked once per run
def wanted_value(text: str) -> Any:
    """A --filter value as YAML reads it (`[512,512]` a list, `0.1` a number, `true` a bool); the text itself
    when it is no YAML value runs can compare (too long, anchors, nested too deep)."""
    try:
        if len(text) > MAX_WANTED:
            return text
        check_yaml(text, Path("--filter"))  # no aliases: the bomb a file could hold, a user could type
        value = plain(yaml.load(text, Loader=YAML_LOADER))
    except (BadFileError, yaml.YAMLError, ValueError, RecursionError):
        return text
    return text if value is UNUSABLE else value


def same(value: Any, wanted: Any) -> bool:
    """Equal by meaning: lists and mappings item by item, numbers as numbers (0.1 == 1e-1), text without case."""
    if isinstance(value, list) and isinstance(wanted, list):
        return len(value) == len(wanted) and all(map(same, value, wanted))
    if isinstance(value, dict) and isinstance(wanted, dict):
        return value.keys() == wanted.keys() and all(same(value[k], wanted[k]) for k in value)
    if number(value) is not None and number(wanted) is not None:
        return math.isclose(number(value), number(wanted), rel_tol=1e-9)
    if isinstance(value, str) and isinstance(wanted, str):
        return value.lower() == wanted.strip().lower()
    return type(value) is type(wanted) and value == wanted  # None, bools; an unusable value matches nothing


def matches(run: Run, condition: str) -> bool:
    """`key=value` or `key!=value`, the value compared by meaning (see `same`)."""
    key, negate, wanted = re.fullmatch(r"([^=!]+)(!?)=(.*)", condition).groups()
    value = run.value(key.strip())
    if key.strip() == "model":  # the group option (cnn) or the network's class (CNN)
        found = wanted.strip().lower() in (str(run.choices.get("model", "")).lower(), str(run.model).lower())
    elif value is None:
        found = wanted.strip().lower() in ("null", "none", "~")
    else:
        found = same(value, wanted_value(wanted)) or same(value, wanted)  # `yes`: a bool to YAML, text in a config
    return found != bool(negate)


def sort_runs(runs: list[Run], key: str, reverse: bool) -> list[Run]:
    """Best first: descending, except for losses, errors and times; runs without the value go last."""
    ascending = any(word in key for word in LOWER_IS_BETTER) != reverse
    have = [r for r in runs if number(r.value(key)) is not None]
    have.sort(key=lambda r: number(r.value(key)), reverse=not ascending)
    return have + [r for r in runs if number(r.value(key)) is None]

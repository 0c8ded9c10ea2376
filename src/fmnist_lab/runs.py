"""`python -m fmnist_lab.runs [folder ...]`: every run below the folders (default `outputs/`), single runs and
sweep jobs, finished, failed, interrupted or still running, in one table, newest first.

    python -m fmnist_lab.runs --filter model=cnn --sort test/acc --last 20
    python -m fmnist_lab.runs outputs/multirun --group     # mean and std over runs that differ only in seed
    python -m fmnist_lab.runs diff <run dir A> <run dir B> # config keys that differ, metrics side by side
    python -m fmnist_lab.runs --json                       # or --csv, for scripts

It reads only what runs wrote (metrics.json, .hydra/*.yaml and the tail of the log file) and imports neither
torch nor Hydra, so it answers at once for hundreds of runs. Every one of those files may come from elsewhere
or be damaged: they are read through fmnist_lab.untrusted (no FIFO, no size or YAML alias bomb), and a value
that runs cannot use shows as `?`, with a note that names the file and the key, instead of stopping the listing.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import re
import shlex
import statistics
import sys
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from typing import Any

import yaml

from fmnist_lab.run_dir import RunDir
from fmnist_lab.untrusted import YAML_LOADER, BadFileError, check_yaml, load_yaml, open_regular, read_json

# keys that say where a run went or how it was watched, not what it computed: ignored by --group
NOT_THE_RECIPE = ("seed", "resume", "paths", "logger")
METRICS = ("test/acc", "val/acc_best", "test/loss", "test/macro_f1", "test/ece", "epochs", "global_step",
           "train_seconds")
LOWER_IS_BETTER = ("loss", "ece", "seconds")
EPOCH_LINE = re.compile(rb"epoch (\d{1,9})(?:/(\d{1,9}))?:")  # at most 9 digits: int() of any match is cheap
LOG_TAIL = 16384  # the last epoch line is near the end of the log
MAX_DEPTH = 32  # nesting that a config or metrics value may have; Hydra's and fmnist_lab's files nest far less
MAX_REAL = 1e100  # larger scores, losses or times are damage (and would overflow the mean and std of --group)
MAX_COUNT = 10**12  # epochs, steps, images
MAX_WORD = 100  # characters of a status, task, device or precision
MAX_CELL = 300  # characters shown of one table cell or note; --json and --csv give whole values
MAX_WANTED = 1000  # characters of a --filter value read as YAML


class RunsError(ValueError):
    """A folder or run named on the command line that cannot be read; the message says which and why."""


class Unusable:
    """A value in a run's file that runs cannot use: `?` in a table, null in --json, empty in --csv, and the run
    gets a note that names the file and the key."""

    def __repr__(self) -> str:
        return "?"


UNUSABLE = Unusable()


def preview(value: Any) -> str:
    """A short description of a value from a file, for a note (never its whole text)."""
    if value is UNUSABLE:
        return "data that JSON cannot hold (bytes, a number of over 100 digits, or nesting deeper than 32)"
    if isinstance(value, str):
        return json.dumps(value[:40] + ("..." if len(value) > 40 else ""))
    if isinstance(value, dict | list):
        return "a mapping" if isinstance(value, dict) else "a list"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**15:
        return f"a number of about {int(value.bit_length() * 0.30103) + 1} digits"
    if isinstance(value, bool | int | float) or value is None:
        return json.dumps(value)
    return f"a {type(value).__name__}"


def real(value: Any) -> Any:
    """A finite number (a score, a loss, seconds) as float, else UNUSABLE."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return UNUSABLE
    try:
        value = float(value)
    except OverflowError:  # an int beyond any float
        return UNUSABLE
    return value if math.isfinite(value) and abs(value) < MAX_REAL else UNUSABLE


def count(value: Any) -> Any:
    """A whole number from 0 (epochs, steps, images), else UNUSABLE."""
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_COUNT
    return value if ok else UNUSABLE


def word(value: Any) -> Any:
    """One short printable line of text (a status, a device), else UNUSABLE."""
    ok = isinstance(value, str) and 0 < len(value) <= MAX_WORD and value.isprintable()
    return value if ok else UNUSABLE


def recorded_status(value: Any) -> Any:
    """A status as a run records it (failed, interrupted, ...), else UNUSABLE: never one that runs itself finds
    out (a file cannot say that a process is writing the run, or how it was made)."""
    return word(value) if value not in ("running", "unfinished", "lr_find", "debug") else UNUSABLE


def text(value: Any) -> Any:
    """Text of any length (an error message: its first line is shown), else UNUSABLE."""
    return value if isinstance(value, str) else UNUSABLE


def moment(value: Any) -> Any:
    """An ISO 8601 date and time as an aware datetime in local time (naive: local already), else UNUSABLE."""
    try:
        return datetime.fromisoformat(value).astimezone()
    except (TypeError, ValueError, OverflowError, OSError):  # not text, not a date, beyond the years datetime holds
        return UNUSABLE


def dotted_name(value: Any) -> Any:
    """A class's import path (fmnist_lab.models.CNN), else UNUSABLE."""
    ok = isinstance(value, str) and re.fullmatch(r"[A-Za-z_][\w.]{0,199}", value)
    return value if ok else UNUSABLE


def commit(value: Any) -> Any:
    """The `git` record of a run ({"commit": <hash>, "dirty": bool}), else UNUSABLE."""
    if not isinstance(value, dict) or not isinstance(value.get("commit"), str) \
            or not re.fullmatch(r"[0-9a-f]{4,64}", value["commit"]):
        return UNUSABLE
    return {"commit": value["commit"], "dirty": value.get("dirty") if isinstance(value.get("dirty"), bool) else None}


def plain(value: Any, depth: int = 0) -> Any:
    """A value from a YAML or JSON file as JSON data: dates as ISO text, sets as lists, mapping keys as text;
    UNUSABLE for what JSON cannot hold (bytes, numbers of over 100 digits) and for nesting deeper than MAX_DEPTH.
    A mapping keeps its usable keys; a list with an unusable item is unusable as a whole."""
    if depth > MAX_DEPTH:
        return UNUSABLE
    if value is None or isinstance(value, bool | str | float):
        return value
    if isinstance(value, int):
        return value if abs(value) < 10**100 else UNUSABLE
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(plain(k, depth + 1)): plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [plain(v, depth + 1) for v in value]
        return UNUSABLE if any(v is UNUSABLE for v in items) else items
    return UNUSABLE


# what runs reads from metrics.json: key -> (the usable form, what the key should hold); other keys: plain data
METRIC_KINDS: dict[str, tuple[Callable[[Any], Any], str]] = {
    **{key: (real, "a number") for key in ("test/acc", "val/acc_best", "test/loss", "test/macro_f1", "test/ece",
                                           "train_seconds", "lr_suggestion")},
    **{key: (count, "a whole number from 0") for key in ("epochs", "global_step", "test_images")},
    **{key: (word, "a short line of text") for key in ("task", "device", "precision")},
    "status": (recorded_status, "a status a run records (failed, interrupted)"),
    "error": (text, "text"),
    "started": (moment, "a date and time (ISO 8601)"),
    "git": (commit, 'a mapping with the "commit" hash'),
}


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"optimizer.lr": ..., "model.hidden": [512, 512]}: nested mappings to dotted keys (lists stay whole)."""
    if not isinstance(node, dict):
        return {prefix: node}
    if not node and prefix:
        return {prefix: {}}
    return {k: v for key, value in node.items()
            for k, v in flatten(value, f"{prefix}.{key}" if prefix else key).items()}


def resolve(flat: dict[str, Any]) -> dict[str, Any]:
    """Whole-value references to other keys (`optimizer.lr: ${lr}`) replaced by their value; anything else
    (Hydra's own `${hydra:...}`, string interpolation) stays as written."""
    def value(v: Any, depth: int = 0) -> Any:
        match = re.fullmatch(r"\$\{([\w.]+)\}", v) if isinstance(v, str) else None
        return value(flat[match[1]], depth + 1) if match and match[1] in flat and depth < 10 else v
    return {k: value(v) for k, v in flat.items()}


class Run:
    """One run directory, read lazily: the listing needs metrics.json, overrides and the config only. What it
    cannot use in them is collected in `problems`, one note per file or key."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files = RunDir(path)
        self.problems: dict[str, str] = {}  # file or file:key -> one paragraph naming it and what to do
        self.config_lost = False  # config.yaml is there but unusable: its keys are unknown, not absent

    @property
    def notes(self) -> list[str]:
        return list(self.problems.values())

    def note(self, where: str, message: str) -> None:
        self.problems.setdefault(where, message)

    def name(self, path: Path) -> str:
        """A file of the run as a note names it: relative to the run, whose folder the note line gives."""
        return path.relative_to(self.path).as_posix() if path.is_relative_to(self.path) else str(path)

    def why(self, err: Exception, path: Path) -> str:
        """One paragraph for a file of the run that cannot be read: which, why, and what to do."""
        if isinstance(err.__cause__, json.JSONDecodeError | RecursionError):  # metrics.json
            return f"{self.name(path)} is damaged: it is not valid JSON ({err.__cause__}); restore it from a copy."
        if isinstance(err, BadFileError):  # its message names the file and says what to do
            return str(err).replace(f"{self.path}{os.sep}", "")
        if isinstance(err, OSError):
            return f"{self.name(path)} cannot be read ({err.strerror}); check its permissions."
        why = str(err).split(":")[0][:100]  # e.g. a number of more digits than Python converts
        return f"{self.name(path)} is damaged ({type(err).__name__}: {why}); restore it from a copy."

    def load(self, path: Path, reader: Callable[[Path], Any]) -> tuple[Any, str | None]:
        """(the file's data, None), or (None, why) when it cannot be used; FileNotFoundError when it is absent."""
        try:
            return reader(path), None
        except FileNotFoundError:
            raise
        except (OSError, ValueError, RecursionError) as err:  # BadFileError is a ValueError
            return None, self.why(err, path)

    def yaml_file(self, path: Path) -> Any:
        """A .hydra/*.yaml file's data as plain JSON data; None when absent, UNUSABLE (and a note) when damaged."""
        try:
            data, why = self.load(path, load_yaml)
        except FileNotFoundError:
            return None
        if why:
            self.note(self.name(path), why)
            return UNUSABLE
        data = plain(data)
        if data is UNUSABLE:
            self.note(self.name(path), f"{self.name(path)} holds {preview(data)}, so runs cannot use it. Restore the "
                                       "file from a copy.")
        return data

    def unusable(self, file: str, key: str, value: Any, what: str) -> Unusable:
        self.note(f"{file}:{key}", f"{file}: {key} is {preview(value)}, not {what}, so runs cannot use it and shows "
                                   f"?. Restore {file} from a copy if you need the value.")
        return UNUSABLE

    @functools.cached_property
    def metrics(self) -> dict[str, Any]:
        try:
            metrics, why = self.load(self.files.metrics, read_json)
        except FileNotFoundError:
            return {}  # still running, or killed before the end
        if isinstance(metrics, dict):
            return metrics
        return {"status": "damaged", "error": why or f"metrics.json holds {preview(metrics)}, not a mapping of "
                                                     "results; restore it from a copy."}

    def metric(self, key: str) -> Any:
        """metrics.json's value for `key` in the form runs uses; None when absent (or null), else UNUSABLE."""
        value = self.metrics.get(key)
        if value is None:
            return None
        kind, what = METRIC_KINDS.get(key, (plain, "plain data"))
        usable = kind(value)
        return usable if usable is not UNUSABLE else self.unusable("metrics.json", key, value, what)

    @functools.cached_property
    def overrides(self) -> list[str]:
        overrides = self.yaml_file(self.files.overrides)
        if overrides is None:
            return []
        if overrides is UNUSABLE:
            return ["?"]
        if not isinstance(overrides, list):
            self.unusable(".hydra/overrides.yaml", "its content", overrides, "a list of overrides")
            return ["?"]
        bad = [o for o in overrides if not isinstance(o, str)]
        if bad:
            self.unusable(".hydra/overrides.yaml", "an item", bad[0], "an override (text)")
        return [o if isinstance(o, str) else "?" for o in overrides]

    @functools.cached_property
    def written(self) -> dict[str, Any]:
        """.hydra/config.yaml as Hydra saved it (interpolations unresolved), flattened to dotted keys."""
        config = self.yaml_file(self.files.config)
        if config is not None and config is not UNUSABLE and not isinstance(config, dict):
            self.unusable(".hydra/config.yaml", "its content", config, "a config mapping")
        self.config_lost = config is not None and not isinstance(config, dict)
        flat = flatten(config) if isinstance(config, dict) else {}
        for key in [k for k, v in flat.items() if v is UNUSABLE]:
            self.unusable(".hydra/config.yaml", key, UNUSABLE, "plain data")
        return flat

    @functools.cached_property
    def config(self) -> dict[str, Any]:
        return resolve(self.written)

    def setting_as_written(self, key: str) -> Any:
        """A config key's value; None when absent, UNUSABLE when config.yaml cannot be read (so it is unknown)."""
        return self.config.get(key, UNUSABLE if self.config_lost else None)

    def setting(self, key: str, kind: Callable[[Any], Any], what: str) -> Any:
        """A config key runs shows (model._target_, max epochs): None when absent, UNUSABLE when of another kind."""
        value = self.setting_as_written(key)
        if value is None:  # or a mapping, which the flat config holds as its keys
            value = {k[len(key) + 1:]: v for k, v in self.config.items() if k.startswith(f"{key}.")} or None
        if value is None or value is UNUSABLE:
            return value
        usable = kind(value)
        return usable if usable is not UNUSABLE else self.unusable(".hydra/config.yaml", key, value, what)

    @functools.cached_property
    def choices(self) -> dict[str, Any]:
        """The option picked in each config group (model: cnn, optimizer: adamw), from .hydra/hydra.yaml."""
        hydra = self.yaml_file(self.files.hydra_config)
        choices = hydra.get("hydra", {}) if isinstance(hydra, dict) else None
        choices = choices.get("runtime", {}) if isinstance(choices, dict) else None
        choices = choices.get("choices") if isinstance(choices, dict) else None
        if hydra is not None and hydra is not UNUSABLE and not isinstance(choices, dict):  # no group to match
            self.note("hydra.yaml", ".hydra/hydra.yaml holds no hydra.runtime.choices mapping, so the run matches "
                                    "no config group option (--filter model=...); restore the file from a copy.")
            return {}
        return {k: v if v is None or word(v) is not UNUSABLE else self.unusable(".hydra/hydra.yaml", k, v,
                                                                                "an option name")
                for k, v in (choices or {}).items() if not k.startswith("hydra/")}

    @functools.cached_property
    def writer(self) -> int | None:
        """The pid of the process writing (training) the run right now, -1 if it has not said, else None."""
        return self.files.writer()

    @functools.cached_property
    def debug_overrides(self) -> bool:
        """Made with a debug= option: runs from before metrics.json recorded it as task "debug"."""
        return any(re.fullmatch(r"\+*debug=(?!null$|none$)\S+", o, re.I) for o in self.overrides)

    @functools.cached_property
    def status(self) -> str:
        if self.writer is not None:
            return "running"  # whatever metrics.json says: it may be a resumed run's earlier stop
        if not self.metrics:
            return "unfinished"  # killed before it could write anything
        status = self.metric("status")
        if status not in (None, "ok"):
            return "?" if status is UNUSABLE else status
        task = self.metric("task")
        if task == "lr_find":
            return "lr_find"  # tune=lr_find: a suggested rate, not a trained model
        return "debug" if task == "debug" or self.debug_overrides else "ok"

    @functools.cached_property
    def when(self) -> datetime | Unusable:
        """When the run started: metrics.json's `started`, else when Hydra saved its config (at the start)."""
        started = self.metric("started")
        if started is not None:
            return started
        try:
            mtime = os.stat(self.files.config).st_mtime
            return datetime.fromtimestamp(mtime).astimezone() if mtime > 0 else UNUSABLE  # 0: a date lost in a copy
        except (OSError, OverflowError, ValueError):
            return UNUSABLE

    @functools.cached_property
    def epochs(self) -> Any:
        """Epochs completed: metrics.json's count, else the last epoch line in the run's log."""
        epochs = self.metric("epochs")
        return epochs if epochs is not None else self.logged_epochs()

    def logged_epochs(self) -> int | None:
        for log in sorted(self.path.glob("*.log")):
            try:
                with open_regular(log) as f:
                    f.seek(max(0, os.fstat(f.fileno()).st_size - LOG_TAIL))
                    found = EPOCH_LINE.findall(f.read(LOG_TAIL))
            except (OSError, BadFileError) as err:  # a FIFO or a device named *.log: never waited on
                self.note(self.name(log), self.why(err, log))
                continue
            if found:
                return int(found[-1][0])
        return None

    @property
    def max_epochs(self) -> Any:
        key = "trainer.max_epochs" if "trainer.max_epochs" in self.config else "epochs"
        return self.setting(key, count, "a whole number from 0")

    @property
    def model(self) -> Any:
        target = self.setting("model._target_", dotted_name, "a class's dotted name")
        return target.rsplit(".", 1)[-1] if isinstance(target, str) else target or ""

    @property
    def commit(self) -> Any:
        git = self.metric("git")
        return git["commit"] if isinstance(git, dict) else git

    @property
    def resumable(self) -> bool:
        return self.status in ("interrupted", "unfinished") and self.files.last.is_file()

    def value(self, key: str) -> Any:
        """What --filter and --sort compare: a metric, a group choice (model=cnn), a config key (lr, model.hidden)
        or a column (status, device, model)."""
        if key == "status":
            return self.status
        if key in self.metrics and not isinstance(self.metrics[key], dict):
            return self.metric(key)
        if key in self.config:  # before the choices: hydra.yaml is the largest file to read
            return self.config[key]
        if key in self.choices:
            return self.choices[key]
        return {"model": self.model, "device": self.metric("device")}.get(key, self.setting_as_written(key))

    def row(self) -> dict[str, Any]:
        when = self.when
        row = {"when": f"{when:%Y-%m-%d %H:%M:%S}" if isinstance(when, datetime) else UNUSABLE,
               "status": self.status, "overrides": " ".join(self.overrides), "model": self.model}
        row.update({k: self.metric(k) for k in ("test/acc", "val/acc_best", "test/loss")})
        resume = f"python -m fmnist_lab resume={shlex.quote(display(self.path))}" if self.resumable else None
        row.update({"epochs": self.epochs, "max_epochs": self.max_epochs, "train_seconds": self.metric("train_seconds"),
                    "device": self.metric("device"), "dir": display(self.path), "error": self.metric("error"),
                    "resume": resume, "git": self.metric("git"), "lr_suggestion": self.metric("lr_suggestion"),
                    "test_images": self.metric("test_images"), "writer": self.writer})
        row["notes"] = self.notes  # last: reading the values above is what finds the problems
        return row


def display(path: Path) -> str:
    """A path as the user would type it: relative to the current folder when below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


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


def fmt(value: Any, digits: int = 4) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e6 else f"{value:.{digits}g}"
    return str(value)


def printable(line: str) -> str:
    """A line safe to print on a terminal and short: control characters (escape sequences, newlines) and
    unpaired surrogates written as escapes, cut to MAX_CELL characters."""
    line = line if len(line) <= MAX_CELL else line[:MAX_CELL - 3] + "..."
    return line if line.isprintable() else "".join(c if c.isprintable() else ascii(c)[1:-1] for c in line)


def table(headers: list[str], rows: list[list[str]]) -> str:
    rows = [[printable(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def run_notes(r: dict[str, Any]) -> list[str]:
    """The lines under the table for one row: what happened to the run, then what runs could not read."""
    status, where = r["status"], r["dir"]
    lines = []
    if status == "lr_find":
        rate = r["lr_suggestion"]
        rate = f"{rate:.3g}" if isinstance(rate, float) else "?" if rate is UNUSABLE else "none (see its lr_find.png)"
        lines.append(f"lr_find: {where}: suggested lr {rate}")
    elif status == "debug":
        images = f" ({r['test_images']} test images)" if isinstance(r["test_images"], int) else ""
        lines.append(f"debug: {where}: made with a debug= option, so its numbers come from slices of the data"
                     f"{images}, not a full training and test; --group leaves it out.")
    elif status == "running":
        who = f"process {r['writer']}" if r["writer"] and r["writer"] > 0 else "another process"
        lines.append(f"running: {where} (epoch {fmt(r['epochs'])}): {who} is writing it right now.")
    elif status not in ("ok", "?"):
        lines.append(f"{status}: {where} (epoch {fmt(r['epochs'])}): {why_stopped(r)}")
        if r["resume"]:
            lines.append(f"    continue it with: {r['resume']}")
    return lines + [f"note: {where}: {note}" for note in r["notes"]]


def why_stopped(r: dict[str, Any]) -> str:
    """The first line of a failed, interrupted or damaged run's error, or why there is none."""
    if isinstance(r["error"], str):
        return (r["error"].splitlines() or [""])[0]
    if r["error"] is UNUSABLE:
        return "?"
    return "no metrics.json: still running, or killed" if r["status"] == "unfinished" else "no error recorded"


def listing(rows: list[dict[str, Any]]) -> str:
    def epochs(r: dict[str, Any]) -> str:
        if r["status"] in ("ok", "debug") or r["epochs"] is None:
            return fmt(r["epochs"])
        return f"{fmt(r['epochs'])}/{fmt(r['max_epochs'])}" if r["max_epochs"] is not None else fmt(r["epochs"])

    text = table(["when", "status", "overrides", "model", "test/acc", "val/acc_best", "epochs", "train s",
                  "device", "dir"],
                 [[fmt(r["when"]), r["status"], r["overrides"] or "(defaults)", fmt(r["model"]), fmt(r["test/acc"]),
                   fmt(r["val/acc_best"]), epochs(r), fmt(r["train_seconds"], 1), fmt(r["device"]), r["dir"]]
                  for r in rows])
    notes = [printable(line) for r in rows for line in run_notes(r)]
    return text + ("\n\n" + "\n".join(notes) if notes else "")


def recipe(run: Run) -> str:
    """What --group compares: the run's whole config but for the seed and where its files went."""
    keep = {k: v for k, v in run.written.items()  # as written: `data.seed: ${seed}` is the same in every run
            if not any(k == n or k.startswith(f"{n}.") for n in NOT_THE_RECIPE)}
    return json.dumps(keep, sort_keys=True, default=str)


def groups(runs: list[Run]) -> list[dict[str, Any]]:
    """Finished runs grouped by recipe: count, seeds, and mean and sample standard deviation of the scores."""
    by_recipe: dict[str, list[Run]] = {}
    for run in runs:
        if run.status == "ok":
            by_recipe.setdefault(recipe(run), []).append(run)
    result = []
    for members in by_recipe.values():
        group = {"runs": len(members), "seeds": [r.config.get("seed") for r in members], "model": members[0].model,
                 # what every run of the group was given (one may have spelled out a default another left out)
                 "overrides": " ".join(o for o in members[0].overrides if not o.startswith("seed=")
                                       and all(o in r.overrides for r in members)),
                 "dirs": [display(r.path) for r in members]}
        for key in ("test/acc", "val/acc_best"):
            values = [r.metric(key) for r in members if isinstance(r.metric(key), float)]
            group[f"{key} mean"] = statistics.fmean(values) if values else None
            group[f"{key} std"] = statistics.stdev(values) if len(values) > 1 else None
        group["notes"] = [f"{display(r.path)}: {note}" for r in members for note in r.notes]
        result.append(group)
    return sorted(result, key=lambda g: -(g["test/acc mean"] or 0.0))


def group_table(rows: list[dict[str, Any]]) -> str:
    def mean_std(g: dict[str, Any], key: str) -> str:
        if g[f"{key} mean"] is None:
            return "-"
        std = g[f"{key} std"]
        return f"{g[f'{key} mean']:.4f} ± {std:.4f}" if std is not None else f"{g[f'{key} mean']:.4f}"

    text = table(["runs", "model", "overrides (but seed)", "test/acc mean ± std", "val/acc_best mean ± std", "seeds"],
                 [[str(g["runs"]), fmt(g["model"]), g["overrides"] or "(defaults)", mean_std(g, "test/acc"),
                   mean_std(g, "val/acc_best"), " ".join(fmt(s) for s in g["seeds"])] for g in rows])
    notes = [printable(f"note: {note}") for g in rows for note in g["notes"]]
    return text + ("\n\n" + "\n".join(notes) if notes else "")


def open_run(name: str) -> Run:
    path = Path(name).expanduser()
    if not RunDir(path).hydra.is_dir():
        raise RunsError(f"{name} is not a run directory (it has no .hydra/ folder). Name a folder that "
                        "`python -m fmnist_lab.runs` lists in its dir column.")
    return Run(path.resolve())


def diff(a: Run, b: Run) -> dict[str, Any]:
    keys = sorted(set(a.config) | set(b.config))
    config = {k: [a.setting_as_written(k), b.setting_as_written(k)] for k in keys
              if a.setting_as_written(k) != b.setting_as_written(k) and not k.startswith("paths.")}
    metrics = {"status": [a.status, b.status]}
    metrics.update({k: [a.metric(k), b.metric(k)] for k in (*METRICS, "device", "precision")})
    metrics["git"] = [r.commit for r in (a, b)]
    return {"runs": [display(a.path), display(b.path)], "config": config, "metrics": metrics,
            "notes": [diff_notes(a), diff_notes(b)]}


def diff_notes(run: Run) -> list[str]:
    """What runs could not read of the run; for a damaged metrics.json, why (the listing's status line says it)."""
    error = run.metric("error") if run.status == "damaged" else None
    return ([error] if isinstance(error, str) else []) + run.notes


def diff_text(d: dict[str, Any]) -> str:
    def show(v: Any, metric: bool = False) -> str:  # config values as written, metrics rounded
        if v is None:
            return "(absent)"
        if v is UNUSABLE:
            return "?"
        return fmt(v) if metric and isinstance(v, float) else v if isinstance(v, str) else json_text(v)

    a, b = d["runs"]
    config = table(["config key", "A", "B"], [[k, show(x), show(y)] for k, (x, y) in d["config"].items()]) \
        if d["config"] else "The configs are the same (but for where the runs wrote their files)."
    metrics = table(["", "A", "B"], [[k, show(x, True), show(y, True)] for k, (x, y) in d["metrics"].items()])
    notes = [printable(f"note: {run}: {note}") for run, notes in zip((a, b), d["notes"], strict=True)
             for note in notes]
    return f"A: {a}\nB: {b}\n\n{config}\n\n{metrics}" + ("\n\n" + "\n".join(notes) if notes else "")


def json_text(data: Any, indent: int | None = None) -> str:
    """JSON for the user: an unusable value as null (the notes say which)."""
    return json.dumps(data, indent=indent, default=lambda v: None)


def write_csv(rows: list[dict[str, Any]]) -> None:
    def cell(v: Any) -> Any:
        v = json_text(v) if isinstance(v, dict | list) else "" if v is UNUSABLE else v
        # text from a file may hold unpaired surrogates, which no terminal encoding takes
        return v.encode("utf-8", "backslashreplace").decode() if isinstance(v, str) else v

    writer = csv.DictWriter(sys.stdout, list(rows[0]) if rows else ["dir"], extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: cell(v) for k, v in r.items()})


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fmnist_lab.runs",
        description="List the runs below the folders (default outputs/), newest first. "
                    "`python -m fmnist_lab.runs diff A B` compares two runs.")
    p.add_argument("folders", nargs="*", type=Path, help="folders to search (default: outputs)")
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="keep runs where KEY (a config group like model or optimizer, a config key like lr or "
                        "model.hidden, a metric, status, device) equals VALUE (read as YAML: [512,512] is a list, "
                        "1e-1 the number 0.1); KEY!=VALUE for the others; repeatable")
    p.add_argument("--sort", metavar="KEY", help="sort by a metric or config key, best first (highest; lowest for "
                                                 "losses, ece and seconds)")
    p.add_argument("--reverse", action="store_true", help="reverse the --sort order")
    p.add_argument("--last", type=int, metavar="N", help="only the N newest runs (after --filter)")
    p.add_argument("--group", action="store_true",
                   help="group finished runs whose configs differ only in seed: count, mean and std")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON")
    out.add_argument("--csv", action="store_true", help="print CSV")
    return p


def main_diff(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m fmnist_lab.runs diff",
                                description="The config keys that differ between two runs, and their metrics "
                                            "side by side.")
    p.add_argument("a", help="run directory A")
    p.add_argument("b", help="run directory B")
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    d = diff(open_run(args.a), open_run(args.b))
    print(json_text(d, indent=2) if args.json else diff_text(d))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["diff"]:
            return main_diff(argv[1:])
        args = parser().parse_args(argv)
        for condition in args.filter:
            if not re.fullmatch(r"[^=!]+!?=.*", condition):
                raise RunsError(f"--filter {condition!r}: write KEY=VALUE or KEY!=VALUE, e.g. --filter model=cnn")
        runs = [r for r in find_runs(args.folders or [Path("outputs")]) if all(matches(r, c) for c in args.filter)]
        runs = runs[:args.last] if args.last is not None else runs
        if args.sort:
            runs = sort_runs(runs, args.sort, args.reverse)
        rows = groups(runs) if args.group else [r.row() for r in runs]
        if args.json:
            print(json_text(rows, indent=2))
        elif args.csv:
            write_csv(rows)
        elif not rows:
            print("no runs found" + (" matching the filters" if args.filter else "") + " in "
                  + ", ".join(str(f) for f in args.folders or ["outputs"]))
        else:
            print(group_table(rows) if args.group else listing(rows))
        return 0
    except RunsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def cli() -> int:
    """main() for a shell, where the reader of the output may stop early (`runs | head -1`): then end quietly
    with the status of a command killed by SIGPIPE, as the Python docs' recipe for SIGPIPE does."""
    try:
        code = main()
        sys.stdout.flush()  # inside the try: a closed pipe often shows only here
        return code
    except BrokenPipeError:
        # Python flushes stdout again at exit, which would fail too and print a traceback: point it at devnull
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # SIGPIPE


if __name__ == "__main__":
    sys.exit(cli())

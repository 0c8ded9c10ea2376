"""One run's folder as `python -m fmnist_lab.runs` reads it: metrics.json, .hydra/*.yaml and the tail of the log,
read lazily and through fmnist_lab.untrusted, with a note for each file or key that runs cannot use."""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from fmnist_lab.provenance import DEBUG_OPTION
from fmnist_lab.run_dir import RunDir
from fmnist_lab.run_values import (
    METRIC_KINDS,
    UNUSABLE,
    Unusable,
    count,
    dotted_name,
    flatten,
    plain,
    preview,
    resolve,
    word,
)
from fmnist_lab.untrusted import BadFileError, load_yaml, open_regular, read_json

EPOCH_LINE = re.compile(rb"epoch (\d{1,9})(?:/(\d{1,9}))?:")  # at most 9 digits: int() of any match is cheap
LOG_TAIL = 16384  # the last epoch line is near the end of the log


class RunsError(ValueError):
    """A folder or run named on the command line that cannot be read; the message says which and why."""


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
        return any(DEBUG_OPTION.fullmatch(o) for o in self.overrides)

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

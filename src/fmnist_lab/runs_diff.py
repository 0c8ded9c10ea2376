"""`python -m fmnist_lab.runs diff A B`: the config keys that differ between two runs and their metrics side by
side. A config value shows resolved where it refers to another key of the same config, else as written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fmnist_lab.run_dir import RunDir
from fmnist_lab.run_reader import Run, RunsError, display
from fmnist_lab.run_values import UNUSABLE
from fmnist_lab.runs_table import fmt, json_text, printable, table

# what diff puts side by side, then the device, precision and git commit
COMPARED_METRICS = ("test/acc", "val/acc_best", "test/loss", "test/macro_f1", "test/ece", "epochs", "global_step",
                    "train_seconds")


def open_run(name: str) -> Run:
    path = Path(name).expanduser()
    if not RunDir(path).hydra.is_dir():
        raise RunsError(f"{name} is not a run directory (it has no .hydra/ folder). Name a folder that "
                        "`python -m fmnist_lab.runs` lists in its dir column.")
    return Run(path.resolve())


class NotSet:
    """A config key that one run's config does not hold: `(not set)` in the table, null in --json."""

    def __repr__(self) -> str:
        return "(not set)"


NOT_SET = NotSet()


def setting(run: Run, key: str) -> Any:
    """A config key's value, references resolved where runs can (see run_values.resolve), else as written;
    NOT_SET when the config does not hold it, UNUSABLE when config.yaml cannot be read (so it is unknown)."""
    if key in run.config:
        return run.config[key]
    return UNUSABLE if run.config_lost else NOT_SET


def diff(a: Run, b: Run) -> dict[str, Any]:
    keys = sorted(set(a.config) | set(b.config))
    config = {k: [setting(a, k), setting(b, k)] for k in keys
              if setting(a, k) != setting(b, k) and not k.startswith("paths.")}
    metrics = {"status": [a.status, b.status]}
    metrics.update({k: [a.metric(k), b.metric(k)] for k in (*COMPARED_METRICS, "device", "precision")})
    metrics["git"] = [r.commit for r in (a, b)]
    return {"runs": [display(a.path), display(b.path)], "config": config, "metrics": metrics,
            "notes": [diff_notes(a), diff_notes(b)]}


def diff_notes(run: Run) -> list[str]:
    """What runs could not read of the run; for a damaged metrics.json, why (the listing's status line says it)."""
    error = run.metric("error") if run.status == "damaged" else None
    return ([error] if isinstance(error, str) else []) + run.notes


def looks_like_another_value(text: str) -> bool:
    """Text that, printed bare, would read as blank, as a marker, or as a value of another kind (a number, null,
    true, a list): `""` and `"0.1"` must not show as nothing, or as the number a config next to it holds."""
    if not text or text != text.strip() or text in ("?", "(absent)", repr(NOT_SET)):
        return True
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    except (ValueError, RecursionError):  # a number of more digits than Python converts; nesting too deep to tell
        return True
    return True


def show(v: Any, metric: bool = False) -> str:
    """A table cell, never blank: config values as written (text in quotes where it would look like another
    value), metrics rounded, `(absent)` for a metric the run did not record."""
    if v is None:
        return "(absent)" if metric else "null"
    if v is UNUSABLE or v is NOT_SET:
        return repr(v)
    if isinstance(v, str):
        return json_text(v) if looks_like_another_value(v) else v
    return fmt(v) if metric and isinstance(v, float) else json_text(v)


def diff_text(d: dict[str, Any]) -> str:
    a, b = d["runs"]
    config = table(["config key", "A", "B"], [[show(k), show(x), show(y)] for k, (x, y) in d["config"].items()]) \
        if d["config"] else "The configs are the same (but for where the runs wrote their files)."
    metrics = table(["", "A", "B"], [[k, show(x, True), show(y, True)] for k, (x, y) in d["metrics"].items()])
    notes = [printable(f"note: {run}: {note}") for run, notes in zip((a, b), d["notes"], strict=True)
             for note in notes]
    return f"A: {a}\nB: {b}\n\n{config}\n\n{metrics}" + ("\n\n" + "\n".join(notes) if notes else "")

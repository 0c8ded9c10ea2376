"""`python -m fmnist_lab.runs diff A B`: the config keys that differ between two runs, as written, and their
metrics side by side."""

from __future__ import annotations

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


def diff(a: Run, b: Run) -> dict[str, Any]:
    keys = sorted(set(a.config) | set(b.config))
    config = {k: [a.setting_as_written(k), b.setting_as_written(k)] for k in keys
              if a.setting_as_written(k) != b.setting_as_written(k) and not k.startswith("paths.")}
    metrics = {"status": [a.status, b.status]}
    metrics.update({k: [a.metric(k), b.metric(k)] for k in (*COMPARED_METRICS, "device", "precision")})
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

"""`python -m fmnist_lab.runs --group`: finished runs whose configs differ only in seed, with the mean and
standard deviation of their scores."""

from __future__ import annotations

import json
import statistics
from typing import Any

from fmnist_lab.run_reader import Run, display
from fmnist_lab.runs_table import fmt, printable, table

# keys that say where a run went or how it was watched, not what it computed: ignored by --group
NOT_THE_RECIPE = ("seed", "resume", "paths", "logger")


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

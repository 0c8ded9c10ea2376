"""What a sweep optimizes: `optimized_metric`, one metric or a list of them, each maximized or minimized; the
finished jobs that no other job beats (the Pareto front); and a run's value of it, as a sweeper gets it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from omegaconf import ListConfig

MODES = {"max": "max", "maximize": "max", "min": "min", "minimize": "min"}


@dataclass(frozen=True)
class Objective:
    """What a sweep optimizes: `optimized_metric`, one metric or a list of them, and for each max or min."""
    metrics: tuple[str, ...]
    modes: tuple[str, ...]

    @classmethod
    def of(cls, metric: Any, modes: Any, key: str) -> Objective:
        """From `optimized_metric` and the direction(s) given at `key`; SystemExit with one paragraph when they do
        not fit together."""
        metrics = tuple(metric) if isinstance(metric, list | tuple | ListConfig) else (metric,)
        given = list(modes) if isinstance(modes, list | tuple | ListConfig) else [modes]
        if not metrics or not all(isinstance(m, str) and m for m in metrics) or len(set(metrics)) < len(metrics):
            raise SystemExit(f"error: optimized_metric={list(metrics)} is neither one metric's name nor a list of "
                             "different names. Give one metric of metrics.json (e.g. optimized_metric=val/acc_best), "
                             "or a list of different ones for a multi-objective sweep "
                             "(optimized_metric=[val/acc_best,train_seconds]).")
        if len(given) != len(metrics) or not all(str(mode) in MODES for mode in given):
            example = ",".join("max" if "acc" in m else "min" for m in metrics)
            raise SystemExit(f"error: optimized_metric={list(metrics)} names {len(metrics)} metric(s), and {key} gives "
                             f"{', '.join(map(str, given)) or 'no direction'}. A sweep needs one direction per metric, "
                             "in the same order, each max or min (maximize or minimize): set e.g. "
                             f"{key}=[{example}], or change optimized_metric.")
        return cls(metrics, tuple(MODES[str(mode)] for mode in given))

    @classmethod
    def of_search(cls, metric: Any, direction: str, directions: Any) -> Objective:
        """An Optuna search's objective: `hydra.sweeper.direction`, or its `directions` for several metrics."""
        if directions is None and isinstance(metric, str):
            return cls.of(metric, direction, "hydra.sweeper.direction")
        return cls.of(metric, [] if directions is None else directions, "hydra.sweeper.directions")

    @property
    def multi(self) -> bool:
        return len(self.metrics) > 1

    def title(self) -> str:
        return ", ".join(f"{metric} ({mode})" for metric, mode in zip(self.metrics, self.modes, strict=True))

    def row_values(self, row: dict[str, Any]) -> list[float] | None:
        """A finished job's objective values from its summary row; None for a job without all of them."""
        text = (row.get("objectives") or "") if self.multi else (row.get("objective") or "")
        try:
            values = [float(v) for v in text.split()]
        except ValueError:
            return None
        ok = row["status"] == "ok" and len(values) == len(self.metrics) and all(map(math.isfinite, values))
        return values if ok else None

    def pareto_front(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The finished jobs that no other job beats in every metric (each at least as good, one better): with one
        metric, the best job(s)."""
        signed = [(row, [v if mode == "max" else -v for v, mode in zip(values, self.modes, strict=True)])
                  for row in rows if (values := self.row_values(row)) is not None]
        return [row for row, a in signed
                if not any(b != a and all(y >= x for x, y in zip(a, b, strict=True)) for _, b in signed)]


def objective_values(metrics: dict, metric: Any) -> float | list[float] | None:
    """The value of `optimized_metric` in a run's metrics (a list for a list of metrics); None when one of them is
    missing or not a finite number: a sweeper counts the job as failed."""
    names = [metric] if isinstance(metric, str) else list(metric)
    values = [metrics.get(name) for name in names]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        return None
    return values[0] if isinstance(metric, str) else values

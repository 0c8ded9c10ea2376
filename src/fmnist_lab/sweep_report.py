"""A sweep's summary for reading, from summary.csv: summary.md (the jobs ranked by the objective, the best or the
Pareto front marked, failures with their error), summary.png (the objective against each swept parameter) and
the table on the console."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmnist_lab.run_dir import atomic_write
from fmnist_lab.sweep_objective import Objective
from fmnist_lab.sweep_rows import latest, read_rows

ROUND_STEPS = [1, 2, 2.5, 5, 10]  # tick spacings a reader counts in (matplotlib's default adds 1.5, 3, 4, 6, 8)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def write_summary(sweep_dir: Path, objective: Objective) -> None:
    """summary.md and summary.png from summary.csv, and the table on the console."""
    rows = ranked(latest(read_rows(sweep_dir / "summary.csv")), objective)
    if not rows:
        return
    table = markdown(rows, objective)
    text = f"# Sweep {sweep_dir}\n\nObjective: {objective.title()}\n\n"
    if objective.multi:
        front = objective.pareto_front(rows)
        text += (f"Pareto front (the finished jobs that no other job beats in every objective): jobs "
                 f"{', '.join(r['job'] for r in front)} ({len(front)} of "
                 f"{sum(objective.row_values(r) is not None for r in rows)})\n\n")
    atomic_write(sweep_dir / "summary.md", lambda tmp: tmp.write_text(text + table))
    plot(rows, objective, sweep_dir / "summary.png")
    print(f"\n{table}\nsummary: {sweep_dir / 'summary.md'} (and summary.csv, summary.png)")


def ranked(rows: list[dict[str, str]], objective: Objective) -> list[dict[str, str]]:
    """Finished jobs by objective, best first (with several objectives: the Pareto front first, each part by the
    first objective), then the ones without a score by job number."""
    front = {id(row) for row in objective.pareto_front(rows)}

    def key(row):
        values = objective.row_values(row)
        first = (values[0] if objective.modes[0] == "min" else -values[0]) if values else 0.0
        return (values is None, id(row) not in front, first, int(row["job"]))
    return sorted(rows, key=key)


def short(value: str) -> str:
    """A float as 4 significant digits, for reading (Optuna proposes lr=0.0031622776601683794); whole numbers and
    text as they are."""
    try:
        int(value)
        return value
    except ValueError:
        pass
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value


def short_overrides(overrides: str) -> str:
    """The overrides with their float values rounded by `short`: for display only, summary.csv keeps them exact
    so that a job can be run again."""
    return " ".join(key + sep + short(value) if sep else part
                    for part in overrides.split(" ") for key, sep, value in [part.partition("=")])


def markdown(rows: list[dict[str, str]], objective: Objective) -> str:
    """The summary table: the best job marked, or with several objectives each job of the Pareto front."""
    def fmt(value: Any, digits: int = 4) -> str:
        try:
            return f"{float(value):.{digits}f}"
        except (TypeError, ValueError):
            return value or "-"

    front = {id(row) for row in objective.pareto_front(rows)}
    mark = "**Pareto front**" if objective.multi else "**best**"
    lines = [f"| | job | model | {' | '.join(objective.metrics)} | test/acc | test/loss | epochs | train s | overrides "
             "| status |", "|---|---|---|" + "---|" * len(objective.metrics) + "---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        best = mark if id(r) in front and (objective.multi or i == 0) else ""
        values = objective.row_values(r) or [r["objective"] if not objective.multi else "-"] * len(objective.metrics)
        status = "ok" if r["status"] == "ok" else f"{r['status']}: {r['error']}"
        lines.append(f"| {best} | {r['job']} | {r.get('model') or '-'} | {' | '.join(fmt(v) for v in values)} "
                     f"| {fmt(r['test/acc'])} | {fmt(r['test/loss'])} | {r['epochs'] or '-'} "
                     f"| {fmt(r['train_seconds'], 1)} | `{short_overrides(r['overrides'])}` | {status} |")
    return "\n".join(lines) + "\n"


def swept_parameters(rows: list[dict[str, str]]) -> dict[str, list[str]]:
    """key -> value per row, for the override keys whose values differ between jobs."""
    per_row = [dict(o.split("=", 1) for o in r["overrides"].split() if "=" in o) for r in rows]
    keys = sorted({k for overrides in per_row for k in overrides})
    values = {k: [o.get(k, "") for o in per_row] for k in keys}
    return {k: v for k, v in values.items() if len(set(v)) > 1}


def plot(rows: list[dict[str, str]], objective: Objective, path: Path) -> Figure:
    """The objective against each swept parameter: numeric on a (log, for wide ranges) axis, others grouped;
    the best job is a star. Jobs without a score (failed, interrupted) are red crosses on a strip of their own
    below, at their parameter value, so that none can be read as a score. Returns the (closed) figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    done = [r for r in rows if objective.row_values(r) is not None]
    front = {id(r) for r in objective.pareto_front(rows)}
    params = swept_parameters(rows) or {"job": [r["job"] for r in rows]}
    strip = len(done) < len(rows)
    fig, axes = plt.subplots(1 + strip, len(params), figsize=(4.2 * len(params), 3.6 + 0.8 * strip),
                             sharex="col", squeeze=False, height_ratios=[4, 1] if strip else None)
    for column, (name, values) in enumerate(params.items()):
        ax, bottom = axes[0][column], axes[-1][column]  # bottom: the failed strip, else ax; x is labelled there
        x = dict(zip((id(r) for r in rows), x_positions(ax, bottom, values), strict=True))
        scatter_scores(ax, [(x[id(r)], r) for r in done], front, objective)
        if strip:
            failed_strip(bottom, [x[id(r)] for r in rows if objective.row_values(r) is None])
        bottom.set_xlabel(name)
        ax.set_ylabel(objective.metrics[0])
        ax.yaxis.set_major_locator(MaxNLocator(nbins=5, steps=ROUND_STEPS))
        # the best job's star is 16 pt across, and its mitred tips reach further: at the highest score or an end
        # of the x range, matplotlib's 5% margin puts the axes' edge through it. These keep every marker whole
        # (the failed strip's crosses too: it shares x).
        ax.margins(x=0.08, y=0.15)
        ax.grid(alpha=0.3)
    if done:  # with no finished job there is nothing to name
        axes[0][0].legend(fontsize=8)
    failed = f" ({len(rows) - len(done)} without a score)" if strip else ""
    fig.suptitle(f"{path.parent.name}: {objective.title()} over {len(rows)} jobs{failed}", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return fig


def x_positions(ax: Axes, bottom: Axes, values: list[str]) -> list[float]:
    """Where each job's value of a swept parameter lies on the x axis, with its ticks on `bottom`: numbers as
    they are (on a log axis when they span decades), other values one column of points each."""
    try:
        positions = [float(v) for v in values]
        positive = [p for p in positions if p > 0]
        if len(positive) == len(positions) and max(positive) / min(positive) >= 20:
            ax.set_xscale("log")  # learning rates and other rates span decades
        ticks = dict(zip(positions, values, strict=True))
        if len(ticks) <= 8:  # a grid's few values: a tick at each, named as swept (rounded)
            bottom.set_xticks(list(ticks), [short(v) for v in ticks.values()], rotation=30, ha="right", fontsize=8)
            bottom.set_xticks([], minor=True)
        else:  # a search's many values: a tick at a few round numbers between them
            round_ticks(bottom, min(positions), max(positions))
    except ValueError:  # categorical: one column of points per value
        categories = sorted(set(values))
        positions = [categories.index(v) for v in values]
        bottom.set_xticks(range(len(categories)), [short(v) or "-" for v in categories], rotation=30, ha="right",
                          fontsize=8)
    return positions


def round_ticks(bottom: Axes, low: float, high: float) -> None:
    """At most about 6 ticks on x at round numbers, each labelled in a few characters (0.002, 1e-05): a tick
    at each of an Optuna search's values would print them on top of each other."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    if bottom.get_xscale() == "log":  # 1-2-5 on a narrow span, else decades: 2 to 6 ticks
        decades = math.log10(high / low)
        subs = (1.0, 2.0, 5.0) if decades < 1.5 else (1.0, 3.0) if decades < 2.5 else (1.0,)
        bottom.xaxis.set_major_locator(LogLocator(subs=subs, numticks=6))
        bottom.xaxis.set_minor_formatter(NullFormatter())  # matplotlib labels minor ticks on a narrow log span
    else:
        bottom.xaxis.set_major_locator(MaxNLocator(nbins=5, steps=ROUND_STEPS))
    bottom.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.3g}"))
    bottom.tick_params(axis="x", labelsize=8)


def scatter_scores(ax: Axes, points: list[tuple[float, dict[str, str]]], front: set[int],
                   objective: Objective) -> None:
    """The finished jobs at (x, their first objective); a star on the best job, or on each of the Pareto front."""
    ys = [objective.row_values(r)[0] for _, r in points]
    stars = [(x, y) for (x, r), y in zip(points, ys, strict=True) if id(r) in front][:None if objective.multi else 1]
    ax.scatter([x for x, _ in points], ys, label="finished")
    if points:
        ax.scatter([x for x, _ in stars], [y for _, y in stars], marker="*", s=250, color="gold",
                   edgecolor="black", label="Pareto front" if objective.multi else "best")


def failed_strip(bottom: Axes, xs: list[float]) -> None:
    """The jobs without a score, as red crosses at their parameter value on a strip below the scores."""
    bottom.scatter(xs, [0] * len(xs), marker="x", color="red", s=60)
    bottom.set_yticks([])
    bottom.set_ylabel("failed", rotation=0, ha="right", va="center")
    bottom.grid(alpha=0.3, axis="x")

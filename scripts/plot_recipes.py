"""docs/recipes.png: test accuracy against training time of every recipe, drawn from the runs' own files.

Each finished run below the given folders is a point (its metrics.json's test/acc and train_seconds), grouped by
its `experiment=` choice (no choice: the default recipe); each recipe's mean is marked and labelled. Runs that
did not finish, debug runs and runs on another device than --device are left out, and said so.

    python scripts/plot_recipes.py docs/recipe_runs --out docs/recipes.png
    python scripts/plot_recipes.py outputs/multirun/2026-11-29 --device cpu   # your own runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fmnist_lab.runs_selection import find_runs  # noqa: E402


def recipe_points(folders: list[Path], device: str) -> dict[str, list[tuple[float, float]]]:
    """{recipe: [(train_seconds, test accuracy %), ...]} of the finished, full runs on `device`."""
    points: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for run in find_runs(folders):
        acc, seconds = run.metric("test/acc"), run.metric("train_seconds")
        usable = run.status == "ok" and isinstance(acc, float) and isinstance(seconds, int | float)
        if not usable or run.metric("device") != device:
            print(f"left out: {run.path} (status {run.status}, device {run.metric('device')})", file=sys.stderr)
            continue
        points[run.choices.get("experiment") or "default"].append((float(seconds), 100 * acc))
    return dict(points)


def draw(points: dict[str, list[tuple[float, float]]], out: Path, title: str) -> None:
    figure, axes = plt.subplots(figsize=(8, 5), dpi=120)
    for i, (recipe, runs) in enumerate(sorted(points.items(), key=lambda item: min(s for s, _ in item[1]))):
        color = f"C{i}"
        seconds, accuracy = zip(*runs, strict=True)
        axes.scatter(seconds, accuracy, color=color, alpha=0.6, s=25)
        mean = (statistics.mean(seconds), statistics.mean(accuracy))
        axes.scatter(*mean, color=color, marker="D", s=80, edgecolor="black", zorder=3)
        axes.annotate(f"{recipe}: {mean[1]:.2f}% in {mean[0]:.0f} s ({len(runs)} seeds)", mean,
                      textcoords="offset points", xytext=(8, -4), fontsize=8)
    axes.set_xscale("log")
    axes.set_xlabel("training time, train_seconds (log scale)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(title, fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.margins(x=0.35)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="folders with run directories (searched below)")
    parser.add_argument("--out", type=Path, default=Path("docs/recipes.png"))
    parser.add_argument("--device", default="cpu", help="only runs that trained on this device (cpu or cuda)")
    parser.add_argument("--title", default="fmnist_lab recipes on 2 CPU cores: each seed a dot, the mean a diamond")
    args = parser.parse_args(argv)
    points = recipe_points(args.folders, args.device)
    if not points:
        print(f"No finished run on {args.device} below {', '.join(map(str, args.folders))}.", file=sys.stderr)
        return 1
    draw(points, args.out, args.title)
    for recipe, runs in sorted(points.items()):
        print(f"{recipe}: {len(runs)} runs, mean test/acc {statistics.mean(a for _, a in runs):.2f}%, "
              f"mean train_seconds {statistics.mean(s for s, _ in runs):.0f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m fmnist_lab.runs [folder ...]`: every run below the folders (default `outputs/`), single runs and
sweep jobs, finished, failed or interrupted, in one table, newest first.

    python -m fmnist_lab.runs --filter model=cnn --sort test/acc --last 20
    python -m fmnist_lab.runs outputs/multirun --group     # mean and std over runs that differ only in seed
    python -m fmnist_lab.runs diff <run dir A> <run dir B> # config keys that differ, metrics side by side
    python -m fmnist_lab.runs --json                       # or --csv, for scripts

It reads only what runs wrote (metrics.json, .hydra/*.yaml and the tail of the log file) and imports neither
torch nor Hydra, so it answers at once for hundreds of runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shlex
import statistics
import sys
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from fmnist_lab.run_dir import BadFileError, RunDir, read_json

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: ~10x faster
# keys that say where a run went or how it was watched, not what it computed: ignored by --group
NOT_THE_RECIPE = ("seed", "resume", "paths", "logger")
METRICS = ("test/acc", "val/acc_best", "test/loss", "test/macro_f1", "test/ece", "epochs", "global_step",
           "train_seconds")
LOWER_IS_BETTER = ("loss", "ece", "seconds")
EPOCH_LINE = re.compile(rb"epoch (\d+)(?:/(\d+))?:")


class RunsError(ValueError):
    """A folder or run named on the command line that cannot be read; the message says which and why."""


def load_yaml(path: Path) -> Any:
    try:
        return yaml.load(path.read_text(), Loader=Loader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


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
    """One run directory, read lazily: the listing needs metrics.json, overrides and the config only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files = RunDir(path)

    @cached_property
    def metrics(self) -> dict[str, Any]:
        try:
            metrics = read_json(self.files.metrics)
        except FileNotFoundError:
            return {}
        except (OSError, BadFileError) as err:  # named by the JSON or OS error underneath
            why = type(err.__cause__ or err).__name__
            return {"status": "damaged", "error": f"metrics.json cannot be read ({why})"}
        return metrics if isinstance(metrics, dict) else {"status": "damaged", "error": "metrics.json holds no mapping"}

    @cached_property
    def overrides(self) -> list[str]:
        overrides = load_yaml(self.files.overrides)
        return [str(o) for o in overrides] if isinstance(overrides, list) else []

    @cached_property
    def written(self) -> dict[str, Any]:
        """.hydra/config.yaml as Hydra saved it (interpolations unresolved), flattened to dotted keys."""
        config = load_yaml(self.files.config)
        return flatten(config) if isinstance(config, dict) else {}

    @cached_property
    def config(self) -> dict[str, Any]:
        return resolve(self.written)

    @cached_property
    def choices(self) -> dict[str, Any]:
        """The option picked in each config group (model: cnn, optimizer: adamw), from .hydra/hydra.yaml."""
        hydra = load_yaml(self.files.hydra_config)
        try:
            choices = hydra["hydra"]["runtime"]["choices"]
            return {k: v for k, v in choices.items() if not k.startswith("hydra/")}
        except (TypeError, KeyError, AttributeError):  # missing or damaged: no group to match
            return {}

    @cached_property
    def status(self) -> str:
        if not self.metrics:
            return "unfinished"  # still running, or killed before it could write anything
        if self.metrics.get("task") == "lr_find" and "status" not in self.metrics:
            return "lr_find"  # tune=lr_find: a suggested rate, not a trained model
        return str(self.metrics.get("status", "ok"))

    @cached_property
    def when(self) -> datetime:
        try:
            return datetime.fromisoformat(self.metrics["started"]).astimezone()  # naive: local time
        except (KeyError, TypeError, ValueError):  # a run that stopped early: Hydra saved its config at the start
            try:
                return datetime.fromtimestamp(self.files.config.stat().st_mtime).astimezone()
            except OSError:
                return datetime.fromtimestamp(0).astimezone()

    @cached_property
    def epochs(self) -> int | None:
        """Epochs completed: metrics.json's count, else the last epoch line in the run's log."""
        if isinstance(self.metrics.get("epochs"), int):
            return self.metrics["epochs"]
        for log in sorted(self.path.glob("*.log")):
            try:
                with log.open("rb") as f:
                    f.seek(max(0, log.stat().st_size - 16384))
                    found = EPOCH_LINE.findall(f.read())
            except OSError:
                continue
            if found:
                return int(found[-1][0])
        return None

    @property
    def max_epochs(self) -> Any:
        return self.config.get("trainer.max_epochs", self.config.get("epochs"))

    @property
    def model(self) -> str:
        return str(self.config.get("model._target_", "")).rsplit(".", 1)[-1]

    @property
    def resumable(self) -> bool:
        return self.status in ("interrupted", "unfinished") and self.files.last.is_file()

    def value(self, key: str) -> Any:
        """What --filter and --sort compare: a metric, a group choice (model=cnn), a config key (lr, model.hidden)
        or a column (status, device, model)."""
        if key == "status":
            return self.status
        if key in self.metrics and not isinstance(self.metrics[key], dict):
            return self.metrics[key]
        if key in self.config:  # before the choices: hydra.yaml is the largest file to read
            return self.config[key]
        if key in self.choices:
            return self.choices[key]
        return {"model": self.model, "device": self.metrics.get("device")}.get(key)

    def row(self) -> dict[str, Any]:
        m = self.metrics
        row = {"when": self.when.strftime("%Y-%m-%d %H:%M:%S"), "status": self.status,
               "overrides": " ".join(self.overrides), "model": self.model}
        row.update({k: m.get(k) for k in ("test/acc", "val/acc_best", "test/loss")})
        resume = f"python -m fmnist_lab resume={shlex.quote(display(self.path))}" if self.resumable else None
        row.update({"epochs": self.epochs, "max_epochs": self.max_epochs, "train_seconds": m.get("train_seconds"),
                    "device": m.get("device"), "dir": display(self.path), "error": m.get("error"),
                    "resume": resume, "git": m.get("git"), "lr_suggestion": m.get("lr_suggestion")})
        return row


def display(path: Path) -> str:
    """A path as the user would type it: relative to the current folder when below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


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
    return sorted(runs.values(), key=lambda r: (r.when, str(r.path)), reverse=True)  # a sweep's jobs: 2, 1, 0


def number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def matches(run: Run, condition: str) -> bool:
    """`key=value` or `key!=value`; numbers compare as numbers (lr=0.1 matches 1e-1), text without case."""
    key, negate, wanted = re.fullmatch(r"([^=!]+)(!?)=(.*)", condition).groups()
    value = run.value(key.strip())
    if key.strip() == "model":  # the group option (cnn) or the network's class (CNN)
        same = wanted.lower() in (str(run.choices.get("model", "")).lower(), run.model.lower())
    elif number(value) is not None and number(wanted) is not None:
        same = math.isclose(number(value), number(wanted), rel_tol=1e-9)
    else:
        same = str(value).lower() == wanted.strip().lower() if value is not None else wanted.lower() in ("null", "none")
    return same != bool(negate)


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
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def listing(rows: list[dict[str, Any]]) -> str:
    def epochs(r: dict[str, Any]) -> str:
        if r["status"] == "ok" or r["epochs"] is None:
            return fmt(r["epochs"])
        return f"{r['epochs']}/{r['max_epochs']}" if r["max_epochs"] is not None else str(r["epochs"])

    text = table(["when", "status", "overrides", "model", "test/acc", "val/acc_best", "epochs", "train s",
                  "device", "dir"],
                 [[r["when"], r["status"], r["overrides"] or "(defaults)", r["model"] or "-", fmt(r["test/acc"]),
                   fmt(r["val/acc_best"]), epochs(r), fmt(r["train_seconds"], 1), fmt(r["device"]), r["dir"]]
                  for r in rows])
    notes = []
    for r in rows:
        if r["status"] == "lr_find":
            rate = f"{r['lr_suggestion']:.3g}" if r["lr_suggestion"] else "none (see its lr_find.png)"
            notes.append(f"lr_find: {r['dir']}: suggested lr {rate}")
        elif r["status"] != "ok":
            why = r["error"] or "no metrics.json: still running, or killed"
            notes.append(f"{r['status']}: {r['dir']} (epoch {fmt(r['epochs'])}): {str(why).splitlines()[0]}")
            if r["resume"]:
                notes.append(f"    continue it with: {r['resume']}")
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
            values = [number(r.metrics.get(key)) for r in members if number(r.metrics.get(key)) is not None]
            group[f"{key} mean"] = statistics.fmean(values) if values else None
            group[f"{key} std"] = statistics.stdev(values) if len(values) > 1 else None
        result.append(group)
    return sorted(result, key=lambda g: -(g["test/acc mean"] or 0.0))


def group_table(rows: list[dict[str, Any]]) -> str:
    def mean_std(g: dict[str, Any], key: str) -> str:
        if g[f"{key} mean"] is None:
            return "-"
        std = g[f"{key} std"]
        return f"{g[f'{key} mean']:.4f} ± {std:.4f}" if std is not None else f"{g[f'{key} mean']:.4f}"

    return table(["runs", "model", "overrides (but seed)", "test/acc mean ± std", "val/acc_best mean ± std", "seeds"],
                 [[str(g["runs"]), g["model"] or "-", g["overrides"] or "(defaults)", mean_std(g, "test/acc"),
                   mean_std(g, "val/acc_best"), " ".join(str(s) for s in g["seeds"])] for g in rows])


def open_run(name: str) -> Run:
    path = Path(name).expanduser()
    if not RunDir(path).hydra.is_dir():
        raise RunsError(f"{name} is not a run directory (it has no .hydra/ folder). Name a folder that "
                        "`python -m fmnist_lab.runs` lists in its dir column.")
    return Run(path.resolve())


def diff(a: Run, b: Run) -> dict[str, Any]:
    keys = sorted(set(a.config) | set(b.config))
    config = {k: [a.config.get(k), b.config.get(k)] for k in keys
              if a.config.get(k) != b.config.get(k) and not k.startswith("paths.")}
    metrics = {"status": [a.status, b.status]}
    metrics.update({k: [a.metrics.get(k), b.metrics.get(k)] for k in (*METRICS, "device", "precision")})
    metrics["git"] = [(r.metrics.get("git") or {}).get("commit") for r in (a, b)]
    return {"runs": [display(a.path), display(b.path)], "config": config, "metrics": metrics}


def diff_text(d: dict[str, Any]) -> str:
    def show(v: Any, metric: bool = False) -> str:  # config values as written, metrics rounded
        if v is None:
            return "(absent)"
        return fmt(v) if metric and isinstance(v, float) else v if isinstance(v, str) else json.dumps(v)

    a, b = d["runs"]
    config = table(["config key", "A", "B"], [[k, show(x), show(y)] for k, (x, y) in d["config"].items()]) \
        if d["config"] else "The configs are the same (but for where the runs wrote their files)."
    metrics = table(["", "A", "B"], [[k, show(x, True), show(y, True)] for k, (x, y) in d["metrics"].items()])
    return f"A: {a}\nB: {b}\n\n{config}\n\n{metrics}"


def write_csv(rows: list[dict[str, Any]]) -> None:
    writer = csv.DictWriter(sys.stdout, list(rows[0]) if rows else ["dir"], extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in r.items()})


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fmnist_lab.runs",
        description="List the runs below the folders (default outputs/), newest first. "
                    "`python -m fmnist_lab.runs diff A B` compares two runs.")
    p.add_argument("folders", nargs="*", type=Path, help="folders to search (default: outputs)")
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="keep runs where KEY (a config group like model or optimizer, a config key like lr or "
                        "model.hidden, a metric, status, device) equals VALUE; KEY!=VALUE for the others; repeatable")
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["diff"]:
            p = argparse.ArgumentParser(prog="python -m fmnist_lab.runs diff",
                                        description="The config keys that differ between two runs, and their "
                                                    "metrics side by side.")
            p.add_argument("a", help="run directory A")
            p.add_argument("b", help="run directory B")
            p.add_argument("--json", action="store_true", help="print JSON")
            args = p.parse_args(argv[1:])
            d = diff(open_run(args.a), open_run(args.b))
            print(json.dumps(d, indent=2) if args.json else diff_text(d))
            return 0
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
            print(json.dumps(rows, indent=2))
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


if __name__ == "__main__":
    sys.exit(main())

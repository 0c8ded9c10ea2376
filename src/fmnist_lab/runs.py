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
import os
import re
import sys
from pathlib import Path

from fmnist_lab.run_reader import RunsError
from fmnist_lab.runs_diff import diff, diff_text, open_run
from fmnist_lab.runs_groups import group_table, groups
from fmnist_lab.runs_selection import find_runs, matches, sort_runs
from fmnist_lab.runs_table import json_text, listing, write_csv


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
    p.add_argument("--last", type=int, metavar="N",
                   help="only the first N runs of the table, after --filter and --sort: the N newest, or with "
                        "--sort the N best by that key (--group groups those N runs)")
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
        if args.last is not None and args.last < 1:
            raise RunsError(f"--last {args.last}: give how many runs to show, a whole number from 1, e.g. --last 20")
        runs = [r for r in find_runs(args.folders or [Path("outputs")]) if all(matches(r, c) for c in args.filter)]
        if args.sort:
            runs = sort_runs(runs, args.sort, args.reverse)
        runs = runs[:args.last]  # after the sort, so that with --sort these are the N best by its key
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

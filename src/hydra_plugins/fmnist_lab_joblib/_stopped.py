"""The books of a sweep that fmnist_lab's joblib launcher stopped (see _core.py): a row in summary.csv for every
job that did not end through Hydra, the summary, one paragraph and the exit code."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn

from fmnist_lab.sweep import objective_of_sweep
from fmnist_lab.sweep_report import write_summary
from fmnist_lab.sweep_rows import append_row, job_dir, latest, read_rows, unfinished_row


def end_stopped_sweep(launcher: Any, jobs: dict[int, list[str]], returns: dict[int, JobReturn], reason: str,
                      exit_code: int) -> None:
    """Every job that did not end through Hydra gets its row in summary.csv (interrupted, unless it ended
    anyway), then the summary, one paragraph and the exit."""
    config = launcher.config
    sweep_dir = Path(str(config.hydra.sweep.dir))
    csv = sweep_dir / "summary.csv"
    objective = objective_of_sweep(config)
    unfinished = []
    if csv.is_file():  # SweepSummary keeps the sweep's books
        ended = {r["run_dir"] for r in read_rows(csv) if r["status"] in ("ok", "failed")}
        for idx, overrides in jobs.items():
            if idx in returns:  # Hydra ran it to its end: SweepSummary wrote its row
                continue
            run_dir = job_dir(launcher, overrides, idx)
            if str(run_dir) not in ended:  # else a job of a continued sweep that had ended: its row is there
                row = unfinished_row(idx, overrides, run_dir, f"the sweep stopped ({reason})", objective)
                append_row(csv, row)
        rows = {r["job"]: r for r in latest(read_rows(csv))}
        unfinished = [str(idx) for idx in jobs if rows.get(str(idx), {}).get("status") == "interrupted"]
        write_summary(sweep_dir, objective)
    interrupted = (f"{len(unfinished)} of its {len(jobs)} jobs are marked interrupted (jobs {', '.join(unfinished)})"
                   if unfinished else f"none of its {len(jobs)} jobs was cut off")
    books = f"; every job's result is in {csv} (table: {sweep_dir / 'summary.md'})" if csv.is_file() else ""
    print(f"sweep stopped: {reason}. {interrupted}{books}. Run the same command again with "
          f"hydra.sweep.dir={sweep_dir} to continue the sweep: jobs that ended keep their results.", file=sys.stderr)
    raise SystemExit(exit_code)

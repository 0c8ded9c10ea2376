"""How `python -m fmnist_lab.runs` prints: cells and tables safe for a terminal, the listing of runs with the
lines under it that say what happened to each, and JSON and CSV for scripts."""

from __future__ import annotations

import csv
import json
import sys
from typing import Any

from fmnist_lab.run_values import UNUSABLE

MAX_CELL = 300  # characters shown of one table cell or note; --json and --csv give whole values


def fmt(value: Any, digits: int = 4) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e6 else f"{value:.{digits}g}"
    return str(value)


def printable(line: str) -> str:
    """A line safe to print on a terminal and short: control characters (escape sequences, newlines) and
    unpaired surrogates written as escapes, cut to MAX_CELL characters."""
    line = line if len(line) <= MAX_CELL else line[:MAX_CELL - 3] + "..."
    return line if line.isprintable() else "".join(c if c.isprintable() else ascii(c)[1:-1] for c in line)


def table(headers: list[str], rows: list[list[str]]) -> str:
    rows = [[printable(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def run_notes(r: dict[str, Any]) -> list[str]:
    """The lines under the table for one row: what happened to the run, then what runs could not read."""
    status, where = r["status"], r["dir"]
    lines = []
    if status == "lr_find":
        rate = r["lr_suggestion"]
        rate = f"{rate:.3g}" if isinstance(rate, float) else "?" if rate is UNUSABLE else "none (see its lr_find.png)"
        lines.append(f"lr_find: {where}: suggested lr {rate}")
    elif status == "debug":
        images = f" ({r['test_images']} test images)" if isinstance(r["test_images"], int) else ""
        lines.append(f"debug: {where}: made with a debug= option, so its numbers come from slices of the data"
                     f"{images}, not a full training and test; --group leaves it out.")
    elif status == "running":
        who = f"process {r['writer']}" if r["writer"] and r["writer"] > 0 else "another process"
        lines.append(f"running: {where} (epoch {fmt(r['epochs'])}): {who} is writing it right now.")
    elif status not in ("ok", "?"):
        lines.append(f"{status}: {where} (epoch {fmt(r['epochs'])}): {why_stopped(r)}")
        if r["resume"]:
            lines.append(f"    continue it with: {r['resume']}")
    return lines + [f"note: {where}: {note}" for note in r["notes"]]


def why_stopped(r: dict[str, Any]) -> str:
    """The first line of a failed, interrupted or damaged run's error, or why there is none."""
    if isinstance(r["error"], str):
        return (r["error"].splitlines() or [""])[0]
    if r["error"] is UNUSABLE:
        return "?"
    return "no metrics.json: still running, or killed" if r["status"] == "unfinished" else "no error recorded"


def listing(rows: list[dict[str, Any]]) -> str:
    def epochs(r: dict[str, Any]) -> str:
        if r["status"] in ("ok", "debug") or r["epochs"] is None:
            return fmt(r["epochs"])
        return f"{fmt(r['epochs'])}/{fmt(r['max_epochs'])}" if r["max_epochs"] is not None else fmt(r["epochs"])

    text = table(["when", "status", "overrides", "model", "test/acc", "val/acc_best", "epochs", "train s",
                  "device", "dir"],
                 [[fmt(r["when"]), r["status"], r["overrides"] or "(defaults)", fmt(r["model"]), fmt(r["test/acc"]),
                   fmt(r["val/acc_best"]), epochs(r), fmt(r["train_seconds"], 1), fmt(r["device"]), r["dir"]]
                  for r in rows])
    notes = [printable(line) for r in rows for line in run_notes(r)]
    return text + ("\n\n" + "\n".join(notes) if notes else "")


def json_text(data: Any, indent: int | None = None) -> str:
    """JSON for the user: an unusable value as null (the notes say which)."""
    return json.dumps(data, indent=indent, default=lambda v: None)


def write_csv(rows: list[dict[str, Any]]) -> None:
    def cell(v: Any) -> Any:
        v = json_text(v) if isinstance(v, dict | list) else "" if v is UNUSABLE else v
        # text from a file may hold unpaired surrogates, which no terminal encoding takes
        return v.encode("utf-8", "backslashreplace").decode() if isinstance(v, str) else v

    writer = csv.DictWriter(sys.stdout, list(rows[0]) if rows else ["dir"], extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: cell(v) for k, v in r.items()})

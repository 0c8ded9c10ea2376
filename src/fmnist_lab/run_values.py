"""What a value read from a run's files must be for `python -m fmnist_lab.runs` to use it: one check per kind of
value (a score, a count, a date, ...) that gives the value in the form runs uses or UNUSABLE, a short preview of
a value for a note, plain JSON data from YAML, and a config as dotted keys.

Every run's file may come from elsewhere or be damaged, so no check trusts the type or size of what it is given.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from datetime import date, datetime
from typing import Any

MAX_DEPTH = 32  # nesting that a config or metrics value may have; Hydra's and fmnist_lab's files nest far less
MAX_REAL = 1e100  # larger scores, losses or times are damage (and would overflow the mean and std of --group)
MAX_COUNT = 10**12  # epochs, steps, images
MAX_WORD = 100  # characters of a status, task, device or precision


class Unusable:
    """A value in a run's file that runs cannot use: `?` in a table, null in --json, empty in --csv, and the run
    gets a note that names the file and the key."""

    def __repr__(self) -> str:
        return "?"


UNUSABLE = Unusable()


def preview(value: Any) -> str:
    """A short description of a value from a file, for a note (never its whole text)."""
    if value is UNUSABLE:
        return "data that JSON cannot hold (bytes, a number of over 100 digits, or nesting deeper than 32)"
    if isinstance(value, str):
        return json.dumps(value[:40] + ("..." if len(value) > 40 else ""))
    if isinstance(value, dict | list):
        return "a mapping" if isinstance(value, dict) else "a list"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**15:
        return f"a number of about {int(value.bit_length() * 0.30103) + 1} digits"
    if isinstance(value, bool | int | float) or value is None:
        return json.dumps(value)
    return f"a {type(value).__name__}"


def real(value: Any) -> Any:
    """A finite number (a score, a loss, seconds) as float, else UNUSABLE."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return UNUSABLE
    try:
        value = float(value)
    except OverflowError:  # an int beyond any float
        return UNUSABLE
    return value if math.isfinite(value) and abs(value) < MAX_REAL else UNUSABLE


def count(value: Any) -> Any:
    """A whole number from 0 (epochs, steps, images), else UNUSABLE."""
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_COUNT
    return value if ok else UNUSABLE


def word(value: Any) -> Any:
    """One short printable line of text (a status, a device), else UNUSABLE."""
    ok = isinstance(value, str) and 0 < len(value) <= MAX_WORD and value.isprintable()
    return value if ok else UNUSABLE


def recorded_status(value: Any) -> Any:
    """A status as a run records it (failed, interrupted, ...), else UNUSABLE: never one that runs itself finds
    out (a file cannot say that a process is writing the run, or how it was made)."""
    return word(value) if value not in ("running", "unfinished", "lr_find", "debug") else UNUSABLE


def text(value: Any) -> Any:
    """Text of any length (an error message: its first line is shown), else UNUSABLE."""
    return value if isinstance(value, str) else UNUSABLE


def moment(value: Any) -> Any:
    """An ISO 8601 date and time as an aware datetime in local time (naive: local already), else UNUSABLE."""
    try:
        return datetime.fromisoformat(value).astimezone()
    except (TypeError, ValueError, OverflowError, OSError):  # not text, not a date, beyond the years datetime holds
        return UNUSABLE


def dotted_name(value: Any) -> Any:
    """A class's import path (fmnist_lab.models.CNN), else UNUSABLE."""
    ok = isinstance(value, str) and re.fullmatch(r"[A-Za-z_][\w.]{0,199}", value)
    return value if ok else UNUSABLE


def git_record(value: Any) -> Any:
    """The `git` record of a run ({"commit": <hash>, "dirty": bool}), else UNUSABLE."""
    if not isinstance(value, dict) or not isinstance(value.get("commit"), str) \
            or not re.fullmatch(r"[0-9a-f]{4,64}", value["commit"]):
        return UNUSABLE
    return {"commit": value["commit"], "dirty": value.get("dirty") if isinstance(value.get("dirty"), bool) else None}


def plain(value: Any, depth: int = 0) -> Any:
    """A value from a YAML or JSON file as JSON data: dates as ISO text, sets as lists, mapping keys as text;
    UNUSABLE for what JSON cannot hold (bytes, numbers of over 100 digits) and for nesting deeper than MAX_DEPTH.
    A mapping keeps its usable keys; a list with an unusable item is unusable as a whole."""
    if depth > MAX_DEPTH:
        return UNUSABLE
    if value is None or isinstance(value, bool | str | float):
        return value
    if isinstance(value, int):
        return value if abs(value) < 10**100 else UNUSABLE
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(plain(k, depth + 1)): plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [plain(v, depth + 1) for v in value]
        return UNUSABLE if any(v is UNUSABLE for v in items) else items
    return UNUSABLE


# what runs reads from metrics.json: key -> (the usable form, what the key should hold); other keys: plain data
METRIC_KINDS: dict[str, tuple[Callable[[Any], Any], str]] = {
    **{key: (real, "a number") for key in ("test/acc", "val/acc_best", "test/loss", "test/macro_f1", "test/ece",
                                           "train_seconds", "lr_suggestion")},
    **{key: (count, "a whole number from 0") for key in ("epochs", "global_step", "test_images")},
    **{key: (word, "a short line of text") for key in ("task", "device", "precision")},
    "status": (recorded_status, "a status a run records (failed, interrupted)"),
    "error": (text, "text"),
    "started": (moment, "a date and time (ISO 8601)"),
    "git": (git_record, 'a mapping with the "commit" hash'),
}


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"optimizer.lr": ..., "model.hidden": [512, 512]}: nested mappings to dotted keys (lists stay whole)."""
    if not isinstance(node, dict):
        return {prefix: node}
    if not node and prefix:
        return {prefix: {}}
    return {k: v for key, value in node.items()
            for k, v in flatten(value, f"{prefix}.{key}" if prefix else key).items()}


# a whole value that names another key: ${lr}, ${model.hidden}, or from the mapping holding it ${.lr} (a sibling)
# and ${..lr} (a key of the mapping above); resolvers (${hydra:...}, ${now:...}) and text around it do not match
REFERENCE = re.compile(r"\$\{(\.*)([\w-]+(?:\.[\w-]+)*)\}")


def referenced(key: str, value: Any) -> str | None:
    """The dotted key (as `flatten` writes it) that `value`, found at `key`, refers to as a whole; else None."""
    match = REFERENCE.fullmatch(value) if isinstance(value, str) else None
    if not match:
        return None
    dots, name = match.groups()
    if not dots:
        return name
    parents = key.split(".")
    return ".".join([*parents[:-len(dots)], name]) if len(dots) <= len(parents) else None  # past the top: none


def resolve(flat: dict[str, Any]) -> dict[str, Any]:
    """Each value that refers to another key (`optimizer.lr: ${lr}`), followed through any chain of references,
    replaced by the value at the chain's end; left as written when the chain ends in what runs does not resolve
    itself (a resolver such as ${hydra:...}, text with a reference inside, a missing key), loops, or is longer
    than MAX_DEPTH. Nothing is ever run: the file is untrusted, and runs imports no OmegaConf."""
    def value(key: str) -> Any:
        seen, at = {key}, key
        while (target := referenced(at, flat[at])) is not None:
            if target in seen or target not in flat or len(seen) > MAX_DEPTH:
                return flat[key]
            seen.add(target)
            at = target
        found = flat[at]
        return flat[key] if isinstance(found, str) and "${" in found else found
    return {k: value(k) for k in flat}

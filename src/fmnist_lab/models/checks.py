"""The checks every network here runs on its arguments before it allocates anything, and the caps they share:
a description from a file (a model.json from elsewhere) is refused with a message naming the argument."""

from __future__ import annotations

import reprlib

# Far above anything that helps on 28x28 images, far below what exhausts a machine: a description asking for
# more is refused before anything is allocated.
MAX_WIDTH, MAX_CLASSES = 16_384, 1_000


def whole(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def one_of(value, choices: dict) -> bool:
    return isinstance(value, str) and value in choices  # a list or dict from a file is not even hashable


def refuse_unless(*checks: tuple[bool, str, object, str]) -> None:
    """ValueError naming the first argument whose check (ok, key, value, what is allowed) failed."""
    for ok, key, value, allowed in checks:
        if not ok:
            raise ValueError(f"model.{key}={reprlib.repr(value)} is not a network fmnist_lab builds: use {allowed}.")

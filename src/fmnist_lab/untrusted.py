"""Reading files that a user did not write: a run's metrics.json, its saved configs (.hydra/*.yaml), a model's
model.json, images. Whatever such a file holds, reading it neither blocks nor allocates without bound nor
runs code:
- only regular files are opened, without waiting (a FIFO or a device named metrics.json is refused at once);
- a text file is read up to a size limit;
- YAML with anchors or aliases is refused (fmnist_lab and Hydra never write them, and a few hundred bytes of
  nested aliases expand to gigabytes);
- a saved config's interpolations may only refer to other keys or call the resolvers in `SAFE_RESOLVERS`,
  which have no side effects (`${oc.create:...}`, `${oc.decode:...}` could build objects to instantiate).

It imports neither torch nor Hydra: `python -m fmnist_lab.runs` reads every run through it.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import IO, Any

import yaml

MAX_TEXT_BYTES = 8 << 20  # metrics.json, model.json and saved configs are kilobytes
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: ~10x faster
# Resolvers a saved config may call: the ones fmnist_lab's configs use that only compute a value. Left out on
# purpose: oc.create and oc.decode (they build nodes, e.g. a `_target_`, from text), oc.env (a file from
# elsewhere would read this machine's environment), and run_dir/unique_dir (they create folders).
SAFE_RESOLVERS = frozenset({"hydra", "now", "oc.select", "abspath", "rank_suffix", "slurm_tasks"})
# what may follow `${`: a key (`lr`, `.tasks_per_node`, `a.b[0]`) and `}`, or a resolver's name and `:`
INTERPOLATION = re.compile(r"\$\{\s*([\w.\-\[\]]+)\s*([:}])")


class BadFileError(ValueError):
    """A file of a run or a model that cannot be used (damaged, not what it should be, or not fmnist_lab's);
    the message names the file and says why."""


def open_regular(path: Path) -> IO[bytes]:
    """`path` opened for reading if it is a regular file; BadFileError for a FIFO, a device or a socket, which
    a read could wait on forever (opened without blocking first, so even the open cannot hang)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) \
                else "a folder" if stat.S_ISDIR(mode) else "not a regular file"
            raise BadFileError(f"{path} is {kind}, not a file; it is not read. Replace it with the file it should "
                               "be, or remove it.")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def is_regular_file(path: Path) -> bool:
    """A regular file (following links), as `open_regular` accepts: never a FIFO or a device."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def read_bytes(path: Path, limit: int = MAX_TEXT_BYTES) -> bytes:
    """The whole file, which must be a regular file of at most `limit` bytes; BadFileError naming it if not."""
    with open_regular(path) as f:
        # the size first: a huge file is refused without reading it; the bounded read catches one that grows
        data = f.read(limit + 1) if os.fstat(f.fileno()).st_size <= limit else None
    if data is None or len(data) > limit:
        raise BadFileError(f"{path} is larger than {limit:,} bytes, far more than fmnist_lab writes there; it is "
                           "not read. Restore the file from a copy, or remove it.")
    return data


def read_text(path: Path, limit: int = MAX_TEXT_BYTES) -> str:
    try:
        return read_bytes(path, limit).decode()
    except UnicodeDecodeError as err:
        raise BadFileError(f"{path} is damaged: it is not UTF-8 text ({err.reason}). Restore it from a copy, or "
                           "remove it.") from err


def read_json(path: Path) -> Any:
    """A JSON file of a run or a model (metrics.json, model.json); BadFileError naming it when it is damaged."""
    text = read_text(path)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:  # ValueError: bad JSON, or an integer of thousands of digits
        raise BadFileError(f"{path} is damaged: it is not valid JSON ({type(err).__name__}: {err}). Restore it "
                           "from a copy, or remove it.") from err


def check_yaml(text: str, source: Path) -> None:
    """BadFileError when the YAML text uses anchors or aliases, or cannot be parsed."""
    if "&" not in text and "*" not in text:  # neither an anchor nor an alias: no second parse needed
        return
    try:
        for event in yaml.parse(text, Loader=YAML_LOADER):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise BadFileError(f"{source} uses YAML anchors or aliases, which neither fmnist_lab nor Hydra "
                                   "writes (and which can expand a small file into gigabytes); it is not read. "
                                   "Restore the file from a copy.")
    except yaml.YAMLError as err:
        raise BadFileError(f"{source} is damaged: it is not valid YAML ({type(err).__name__}). Restore it from a "
                           "copy, or remove it.") from err


def load_yaml(path: Path) -> Any:
    """A YAML file of a run (its plain data: no tags, anchors or aliases); BadFileError naming it otherwise."""
    text = read_text(path)
    check_yaml(text, path)
    try:
        return yaml.load(text, Loader=YAML_LOADER)
    except (yaml.YAMLError, ValueError, RecursionError) as err:  # ValueError: a number of thousands of digits
        raise BadFileError(f"{path} is damaged: it is not valid YAML ({type(err).__name__}). Restore it from a "
                           "copy, or remove it.") from err


def strings(node: Any) -> list[str]:
    """Every string in a plain config tree, keys included."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*strings(k), *strings(v))]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


def unsafe_interpolations(node: Any) -> list[str]:
    """The interpolations in a plain (unresolved) config tree that are neither a reference to a key nor a call
    of a resolver in SAFE_RESOLVERS: anything that could build objects, run code or touch the machine."""
    found = []
    for text in strings(node):
        for start in [m.start() for m in re.finditer(r"\$\{", text)]:
            match = INTERPOLATION.match(text, start)
            if not match or (match[2] == ":" and match[1] not in SAFE_RESOLVERS):
                found.append(text[start:start + 80])
    return found

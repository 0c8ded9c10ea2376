"""Classify image files with a trained model.

usage: python -m fmnist_lab.predict model=<run dir|.ckpt|.pth|.onnx> [top_k=3] [--json] <images or folders>

  model=      the model: a run directory, a .ckpt, a .pth (with its model.json beside it) or an .onnx file
  top_k=      how many of the likeliest classes to list per image (default: 3)
  --json      print the results as JSON instead of one line per image
  images      image files, and folders searched for image files
  -h, --help  print this help and exit

Images should look like FashionMNIST: 28x28 grayscale, light garment on black. Other sizes and colour
images are converted (with a warning). An `.onnx` model runs on ONNX Runtime alone: this module imports
torch only for the other model kinds, so it serves where only onnxruntime, numpy and Pillow are installed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np

from fmnist_lab.image_files import image_files, read_image
from fmnist_lab.predictor import load_predictor

# Images per forward pass, in predict and evaluate: memory stays bounded whatever the number of files, as
# fmnist_lab.models.registry caps a network's activations per image (at most 2 GB for a batch).
INFERENCE_BATCH = 100


class UsageError(ValueError):
    """A bad command line: says which argument and what is expected."""


class KeyValueParser(argparse.ArgumentParser):
    """argparse for the command lines of predict and evaluate, which take `key=value` options as
    `python -m fmnist_lab` takes overrides: `key=value` is read as `--key=value`, so argparse types, defaults
    and checks every option. The help is the command's module docstring `doc`, whose second paragraph is the
    usage. A usage error raises UsageError ending in the usage, for `main` to print and return 2."""

    def __init__(self, doc: str) -> None:
        super().__init__(usage=doc.split("\n\n")[1].removeprefix("usage: "), add_help=False, allow_abbrev=False)
        self.doc = doc
        self.keys: list[str] = []
        self.required: list[str] = []

    def add_option(self, key: str, required: bool = False, **kwargs) -> None:
        """The option `key=value`; `kwargs` as for `add_argument` (type, default). Its value is attribute `key`
        of the parsed arguments, with `_` for `.` (data.root: data_root)."""
        self.keys.append(key)
        self.required += [key] if required else []
        self.add_argument(f"--{key}", dest=key.replace(".", "_"), **kwargs)

    def parse(self, argv: Sequence[str]) -> argparse.Namespace | None:
        """The options, flags and positional arguments of `argv`; None when it asks for help (-h or --help,
        whatever else it holds)."""
        if "-h" in argv or "--help" in argv:
            return None
        args = self.parse_intermixed_args([self.as_option(arg) for arg in argv])  # paths before and after flags
        missing = [f"{key}=..." for key in self.required if getattr(args, key.replace(".", "_")) is None]
        if missing:
            self.error(f"missing {', '.join(missing)}")
        return args

    def as_option(self, arg: str) -> str:
        """`arg` as argparse reads it: `--key=value` for an option's `key=value`; a path (which may hold `=`
        too) as it is."""
        key, sep, _ = arg.partition("=")
        if arg.startswith("-") or not sep:
            return arg
        if key in self.keys:
            return f"--{arg}"
        if not Path(arg).exists():
            self.error(f"unknown option {key!r}; known: {', '.join(self.keys)}")
        return arg

    def format_help(self) -> str:
        return self.doc.strip() + "\n"

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}.\nusage: {self.usage}")


def command_line() -> KeyValueParser:
    parser = KeyValueParser(__doc__)
    parser.add_option("model", required=True)
    parser.add_option("top_k", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("images", nargs="*")
    return parser


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def classify(files: Sequence[Path], predict: Callable[[np.ndarray], np.ndarray], classes: list[str], k: int,
             warn: Callable[[str], None]) -> list[dict]:
    """One result per file: its `k` likeliest classes, or why it has none."""
    results, images = [], []
    for path in files:
        try:
            images.append(read_image(path, warn))
            results.append({"file": str(path)})
        except ValueError as err:
            results.append({"file": str(path), "error": str(err)})
    probabilities = iter(softmax(predict(np.stack(images))) if images else [])
    for result in results:
        if "error" in result:
            continue
        p = next(probabilities)
        if not np.isfinite(p).all():
            result["error"] = ("the model gives non-finite logits (nan or inf) for it, as a network whose training "
                               "diverged does; train it again with a lower lr")
            continue
        top = np.argsort(-p)[:k]
        result.update({"class": classes[top[0]], "probability": float(p[top[0]]),
                       "top_k": [{"class": classes[i], "probability": float(p[i])} for i in top]})
    return results


def main(argv: Sequence[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # file names print whatever the terminal's encoding
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = command_line()
    try:
        args = parser.parse(sys.argv[1:] if argv is None else argv)
        if args is not None and not args.images:
            parser.error("give image files or folders")
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args is None:
        parser.print_help()
        return 0
    results: list[dict] = []
    try:
        predict, classes = load_predictor(args.model)
        k = max(1, min(args.top_k, len(classes)))
        files = image_files(args.images)
        for start in range(0, len(files), INFERENCE_BATCH):  # printed batch by batch: `| head` sees them at once
            batch = classify(files[start:start + INFERENCE_BATCH], predict, classes, k, warn)
            results += batch
            print_results(batch, k, lines=not args.json)
    except (FileNotFoundError, ValueError) as err:  # BadFileError and a refused network are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(results, indent=2))
    return 1 if any("error" in r for r in results) else 0


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def print_results(results: list[dict], k: int, lines: bool) -> None:
    """Each failure as an error line on stderr; with `lines`, each prediction as a line on stdout."""
    for result in results:
        if "error" in result:
            print(f"error: {result['file']}: {result['error']}", file=sys.stderr)
        elif lines:
            others = ", ".join(f"{t['class']} {t['probability']:.1%}" for t in result["top_k"])
            print(f"{result['file']}: {result['class']} {result['probability']:.1%}  (top {k}: {others})")


def run_main(main: Callable[[], int]) -> None:
    """`sys.exit(main())`, ending quietly when the reader of stdout goes away (`... | head`): the Python docs'
    SIGPIPE recipe, with the status of a process that SIGPIPE ended (128 + 13)."""
    try:
        status = main()
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python flushes stdout again at exit: into nothing now
        status = 141
    sys.exit(status)


if __name__ == "__main__":
    run_main(main)

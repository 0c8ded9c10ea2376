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

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
USAGE = __doc__.split("\n\n")[1].removeprefix("usage: ")


class UsageError(ValueError):
    """A bad command line: says which argument and what is expected."""


def asked_for_help(argv: Sequence[str], doc: str) -> bool:
    """-h or --help: print the module's help (`doc`) and say so; answered before anything loads torch."""
    if "-h" in argv or "--help" in argv:
        print(doc.strip())
        return True
    return False


def parse_args(argv: Sequence[str], options: dict[str, object], usage: str) -> tuple[dict, list[str], set[str]]:
    """Split `key=value` options (typed like their defaults; None means str), `--flags` and positional paths."""
    values, paths, flags = dict(options), [], set()
    for arg in argv:
        key, sep, value = arg.partition("=")
        if arg.startswith("--"):
            flags.add(arg)
        elif sep and key in options:
            default = options[key]
            try:
                values[key] = type(default)(value) if default is not None else value
            except ValueError:
                raise UsageError(f"{key}={value!r}: expected {type(default).__name__}.\nusage: {usage}") from None
        elif sep and not Path(arg).exists():
            raise UsageError(f"unknown option {key!r}; known: {', '.join(options)}.\nusage: {usage}")
        else:
            paths.append(arg)
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise UsageError(f"missing {', '.join(f'{k}=...' for k in missing)}.\nusage: {usage}")
    return values, paths, flags


def image_files(paths: Sequence[str]) -> list[Path]:
    """Files as given (a bad one still reaches the reader, which reports it) and image files in folders."""
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
    return files


def read_image(path: Path, warn: Callable[[str], None]) -> np.ndarray:
    """float32 [1, 28, 28] in [0, 1], as ToTensor gives for a FashionMNIST image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
    except FileNotFoundError:
        raise ValueError("no such file") from None
    except Image.DecompressionBombError:
        raise ValueError(f"not read: its decoded size is absurd (over {2 * Image.MAX_IMAGE_PIXELS:,} pixels, PIL's "
                         "decompression-bomb limit)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:  # PIL's decoders raise all of these
        raise ValueError(f"not a readable image ({err.__class__.__name__})") from None
    changes = []
    if image.mode != "L":
        changes.append(f"{image.mode} to grayscale")
        image = image.convert("L")
    if image.size != (28, 28):
        changes.append(f"{image.size[0]}x{image.size[1]} to 28x28")
        image = image.resize((28, 28), Image.Resampling.BILINEAR)
    if changes:
        warn(f"{path}: converted {' and '.join(changes)}")
    pixels = np.asarray(image, dtype=np.float32)[None] / 255.0
    border = np.concatenate([pixels[0, [0, -1]].ravel(), pixels[0, :, [0, -1]].ravel()])
    if border.mean() > 0.5:
        warn(f"{path}: light background; FashionMNIST garments are light on black (invert the image?)")
    return pixels


def load_predictor(model: str) -> tuple[Callable[[np.ndarray], np.ndarray], list[str]]:
    """A function from images [N, 1, 28, 28] to logits [N, 10], and the class names."""
    from fmnist_lab.run_dir import BadFileError, read_json

    path = Path(model)
    if path.suffix == ".onnx":
        import onnxruntime as ort

        if not path.is_file():
            raise FileNotFoundError(f"model={model}: no such file.")
        try:  # ONNX Runtime also refuses external data that points outside the model's folder
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as err:  # its errors have no common public base class
            cause = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise BadFileError(f"{path} is not an ONNX model ONNX Runtime can load: {cause}") from err
        try:
            classes = json.loads(session.get_modelmeta().custom_metadata_map["classes"])
        except (KeyError, json.JSONDecodeError):
            raise BadFileError(f"{path} has no fmnist_lab metadata (the class names); export it with "
                                 "fmnist_lab, or use the run's model_weights.pth.") from None
        return (lambda x: session.run(["logits"], {"image": x})[0]), classes

    import torch

    from fmnist_lab.artifacts import load_model
    from fmnist_lab.data import CLASSES

    net = load_model(path)
    description = (path if path.is_dir() else path.parent) / "model.json"
    classes = read_json(description).get("classes", list(CLASSES)) if description.is_file() else list(CLASSES)

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(x)).numpy()

    return predict, classes


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def main(argv: Sequence[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # file names print whatever the terminal's encoding
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    argv = sys.argv[1:] if argv is None else argv
    if asked_for_help(argv, __doc__):
        return 0
    try:
        options, paths, flags = parse_args(argv, {"model": None, "top_k": 3}, USAGE)
        if not paths or flags - {"--json"}:
            raise UsageError(f"give image files or folders; the only flag is --json.\nusage: {USAGE}")
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        predict, classes = load_predictor(options["model"])
    except (FileNotFoundError, ValueError) as err:  # BadFileError and a refused network are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 1

    def warn(message: str) -> None:
        print(f"warning: {message}", file=sys.stderr)

    results, images = [], []
    for path in image_files(paths):
        try:
            images.append(read_image(path, warn))
            results.append({"file": str(path)})
        except ValueError as err:
            results.append({"file": str(path), "error": str(err)})
    probabilities = iter(softmax(predict(np.stack(images))) if images else [])
    k = max(1, min(options["top_k"], len(classes)))
    for result in results:
        if "error" in result:
            continue
        p = next(probabilities)
        top = np.argsort(-p)[:k]
        result.update({"class": classes[top[0]], "probability": float(p[top[0]]),
                       "top_k": [{"class": classes[i], "probability": float(p[i])} for i in top]})

    if "--json" in flags:
        print(json.dumps(results, indent=2))
    for result in results:
        if "error" in result:
            print(f"error: {result['file']}: {result['error']}", file=sys.stderr)
        elif "--json" not in flags:
            others = ", ".join(f"{t['class']} {t['probability']:.1%}" for t in result["top_k"])
            print(f"{result['file']}: {result['class']} {result['probability']:.1%}  (top {k}: {others})")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

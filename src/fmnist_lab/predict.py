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
import os
import reprlib
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from fmnist_lab.untrusted import BadFileError, read_bytes

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
# The decoders PIL may use: those of the suffixes above. PIL picks a decoder by content, and some (EPS, PDF)
# hand the file to other programs, such as Ghostscript.
IMAGE_FORMATS = ["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP"]
USAGE = __doc__.split("\n\n")[1].removeprefix("usage: ")
# Images per forward pass, in predict and evaluate: memory stays bounded whatever the number of files, as
# fmnist_lab.models.registry caps a network's activations per image (at most 2 GB for a batch).
INFERENCE_BATCH = 100
# An .onnx file: models.registry.MAX_WEIGHTS float32 weights are 200 MB (experiment=mlp_best's export: 7.5 MB).
MAX_ONNX_BYTES = 256 << 20
# ONNX Runtime's memory for the tensors of one batch: experiment=cnn_best needs about 0.1 GB for 100 images.
ORT_MEMORY = 1 << 30
MAX_CLASSES, MAX_CLASS_NAME = 1_000, 200  # as fmnist_lab.models.mlp; a name is printed on every line


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

    from fmnist_lab.untrusted import BadFileError, open_regular

    try:
        f = open_regular(path)  # a FIFO or a device is refused without waiting on it
    except FileNotFoundError:
        raise ValueError("no such file") from None
    except BadFileError as err:
        raise ValueError(str(err).removeprefix(f"{path} ")) from None
    except OSError as err:
        raise ValueError(f"cannot be opened ({err.strerror})") from None
    with f:
        try:
            with Image.open(f, formats=IMAGE_FORMATS) as image:
                image.load()
        except Image.DecompressionBombError:
            raise ValueError(f"not read: its decoded size is absurd (over {2 * Image.MAX_IMAGE_PIXELS:,} pixels, "
                             "PIL's decompression-bomb limit)") from None
        except UnidentifiedImageError:
            raise ValueError(f"not a readable image (not {', '.join(IMAGE_FORMATS)})") from None
        except (OSError, SyntaxError, ValueError) as err:  # PIL's decoders raise all these
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


def check_classes(value: object, source: str, count: int | None = None) -> list[str]:
    """`value` if it is a list of `count` class names (one per logit; any number up to MAX_CLASSES when None);
    BadFileError naming `source` (the file and key) otherwise."""
    names = value if isinstance(value, list) and 1 <= len(value) <= MAX_CLASSES else []
    if names and all(isinstance(n, str) and 0 < len(n) <= MAX_CLASS_NAME and n.isprintable() for n in names) \
            and count in (None, len(names)):
        return names
    wanted = f"{count:,} class names" if count else "class names"
    raise BadFileError(f"{source} is {reprlib.repr(value)}, not a list of {wanted} (printable strings of at most "
                       f"{MAX_CLASS_NAME} characters, one per logit the network gives). Use the files a run wrote, "
                       "or correct the list.")


def load_predictor(model: str) -> tuple[Callable[[np.ndarray], np.ndarray], list[str]]:
    """A function from images [N, 1, 28, 28] to logits [N, classes], and the class names; BadFileError (a
    ValueError) naming the model when it fails on a batch or gives anything else."""
    path = Path(model)
    if path.suffix == ".onnx":
        run, classes = onnx_predictor(path)
    else:
        import torch

        from fmnist_lab.artifacts import load_classifier

        net, classes = load_classifier(path)

        def run(x: np.ndarray) -> np.ndarray:
            try:
                with torch.no_grad():
                    return net(torch.from_numpy(x)).numpy()
            except RuntimeError as err:  # e.g. out of memory
                raise BadFileError(f"{path}: the network failed on a batch of {len(x)} images "
                                   f"({str(err).splitlines()[0] if str(err) else type(err).__name__}). Free "
                                   "memory, or use a model that a run wrote.") from err

    def predict(x: np.ndarray) -> np.ndarray:
        logits = run(x)
        if not (isinstance(logits, np.ndarray) and logits.dtype.kind == "f" and logits.shape == (len(x), len(classes))):
            shape = list(logits.shape) if isinstance(logits, np.ndarray) else type(logits).__name__
            raise BadFileError(f"{path} gives {shape} for {len(x)} images, not float logits [{len(x)}, {len(classes)}] "
                               "(one per class name); use a model that a run wrote.")
        return logits

    return predict, classes


def onnx_predictor(path: Path) -> tuple[Callable[[np.ndarray], np.ndarray], list[str]]:
    """ONNX Runtime's run of the model at `path`, and its class names (fmnist_lab's metadata)."""
    session = onnx_session(path)
    try:
        classes = json.loads(session.get_modelmeta().custom_metadata_map["classes"])
    except (KeyError, json.JSONDecodeError, RecursionError):
        raise BadFileError(f"{path} has no fmnist_lab metadata (the class names); export it with "
                           "fmnist_lab, or use the run's model_weights.pth.") from None
    inputs, outputs = [i.name for i in session.get_inputs()], {o.name: o.shape for o in session.get_outputs()}
    if inputs != ["image"] or "logits" not in outputs:
        raise BadFileError(f"{path} takes {inputs} and gives {list(outputs)}, where an fmnist_lab model takes `image` "
                           "[N, 1, 28, 28] and gives `logits`; export it with fmnist_lab.")
    width = outputs["logits"][-1] if outputs["logits"] else None
    classes = check_classes(classes, f"{path} (metadata classes)", width if isinstance(width, int) else None)

    def run(x: np.ndarray) -> np.ndarray:
        try:
            return session.run(["logits"], {"image": x})[0]
        except Exception as err:  # its errors have no common public base class
            cause = str(err).splitlines()[0] if str(err) else type(err).__name__
            if "Available memory" in str(err):
                cause = (f"it asks for more than the {ORT_MEMORY:,} bytes fmnist_lab lets ONNX Runtime use for a "
                         "batch (an fmnist_lab export needs a few MB); use a model that a run exported")
            if "Available memory" not in str(err):
                cause += "; export the model again with fmnist_lab"
            raise BadFileError(f"ONNX Runtime could not run {path} on a batch of {len(x)} images: {cause}") from err

    return run, classes


def onnx_session(path: Path):
    """An ONNX Runtime session for `path` that reads no file but `path` (no external data) and uses at most
    ORT_MEMORY bytes for the tensors of a run."""
    import onnxruntime as ort

    try:
        data = read_bytes(path, MAX_ONNX_BYTES)  # a regular file only: a FIFO is refused without waiting
    except FileNotFoundError:
        raise FileNotFoundError(f"model={path}: no such file.") from None
    # The arena that serves every tensor of a run; registered for the process (again: no change), and used by
    # the sessions that ask for it.
    cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(cpu, ort.OrtArenaCfg(ORT_MEMORY, 1, -1, -1))  # 1: grow only as requested
    options = ort.SessionOptions()
    options.add_session_config_entry("session.use_env_allocators", "1")
    options.log_severity_level = 4  # its own log lines would repeat, in its words, the error reported here
    with tempfile.TemporaryDirectory() as empty:
        # loaded from bytes, a model's external data would be looked for here: nowhere, so no other file is read
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", empty)
        try:  # constant folding runs nodes while loading, outside the arena: left out (exports are folded)
            return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"],
                                        disabled_optimizers=["ConstantFolding"])
        except Exception as err:  # its errors have no common public base class
            cause = str(err).splitlines()[0] if str(err) else type(err).__name__
            if "External data" in cause:
                raise BadFileError(f"{path} keeps tensors in external data files, which fmnist_lab does not read "
                                   "(its exports are one self-contained file); export the model again as one "
                                   "file.") from err
            raise BadFileError(f"{path} is not an ONNX model ONNX Runtime can load: {cause}") from err


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

    def warn(message: str) -> None:
        print(f"warning: {message}", file=sys.stderr)

    results: list[dict] = []
    try:
        predict, classes = load_predictor(options["model"])
        k = max(1, min(options["top_k"], len(classes)))
        files = image_files(paths)
        for start in range(0, len(files), INFERENCE_BATCH):  # printed batch by batch: `| head` sees them at once
            batch = classify(files[start:start + INFERENCE_BATCH], predict, classes, k, warn)
            results += batch
            for result in batch:
                if "error" in result:
                    print(f"error: {result['file']}: {result['error']}", file=sys.stderr)
                elif "--json" not in flags:
                    others = ", ".join(f"{t['class']} {t['probability']:.1%}" for t in result["top_k"])
                    print(f"{result['file']}: {result['class']} {result['probability']:.1%}  (top {k}: {others})")
    except (FileNotFoundError, ValueError) as err:  # BadFileError and a refused network are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 1
    if "--json" in flags:
        print(json.dumps(results, indent=2))
    return 1 if any("error" in r for r in results) else 0


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

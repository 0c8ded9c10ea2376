"""A trained model as a function from images [N, 1, 28, 28] to logits, with its class names: an `.onnx` file on
ONNX Runtime alone, any other model file on PyTorch. This module imports torch only for the latter, so it
serves where only onnxruntime and numpy are installed."""

from __future__ import annotations

import json
import reprlib
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fmnist_lab.untrusted import BadFileError, read_bytes

# An .onnx file: models.registry.MAX_WEIGHTS float32 weights are 200 MB (experiment=mlp_best's export: 7.5 MB).
MAX_ONNX_BYTES = 256 << 20
# ONNX Runtime's memory for the tensors of one batch: experiment=cnn_best needs about 0.1 GB for 100 images.
ORT_MEMORY = 1 << 30
MAX_CLASSES, MAX_CLASS_NAME = 1_000, 200  # as fmnist_lab.models.checks; a name is printed on every line


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


"""Reading back the model files a run wrote, as data: the network description, weights and class names of a
run directory, a Lightning .ckpt, or a .pth with its model.json beside it, each checked for its type.

Every load is `torch.load(..., weights_only=True)`: tensors and plain containers only, never code.
"""

from __future__ import annotations

import os
import pickle
import reprlib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from fmnist_lab.predictor import check_classes  # torch-free, for predict's ONNX path too
from fmnist_lab.run_dir import RunDir
from fmnist_lab.untrusted import BadFileError, open_regular, read_json

# A run's model_weights.pth holds at most 200 MB (models.registry.MAX_WEIGHTS float32 numbers) and a checkpoint
# adds the optimizer's state, about twice that again: 1 GiB is above both, and it bounds what torch.load
# allocates for a file, whose zip entries may be compressed.
MAX_MODEL_BYTES = 1 << 30


class UnsafeFileError(BadFileError):
    """A file that would need arbitrary unpickling (e.g. a whole model saved with `torch.save(model)`)."""


def read_file(path: Path) -> Any:
    """`torch.load(path, weights_only=True)`: tensors and plain containers only, never arbitrary code, from a
    regular file (never a blocking read) in torch's zip format of at most MAX_MODEL_BYTES, packed or unpacked."""
    try:
        f = open_regular(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: give a run directory, a .ckpt or a .pth file.") from None
    with f:
        check_archive(f, path)
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise UnsafeFileError(
                f"{path} holds pickled Python objects, not just tensors (a model saved with `torch.save(model)`?). "
                "Loading it could run arbitrary code, so fmnist_lab refuses it. Save `model.state_dict()` instead, "
                "or use a run's model_weights.pth or checkpoints/best.ckpt.") from err
        except Exception as err:  # empty, truncated, another format; the unpickler fails on junk in many ways
            raise not_a_model_file(path, err) from err


def check_archive(f: BinaryIO, path: Path) -> None:
    """BadFileError unless `f` is a zip archive, as torch.save has written since torch 1.6 (the legacy format
    allocates whatever sizes its pickle declares), of at most MAX_MODEL_BYTES packed and unpacked."""
    size = os.fstat(f.fileno()).st_size
    if size <= MAX_MODEL_BYTES:
        try:
            with zipfile.ZipFile(f) as archive:  # reads only the directory at the end of the file
                size = sum(entry.file_size for entry in archive.infolist())
        except (zipfile.BadZipFile, EOFError, ValueError) as err:
            raise not_a_model_file(path, err) from err
        f.seek(0)
    if size > MAX_MODEL_BYTES:
        raise BadFileError(f"{path} holds {size:,} bytes, more than the {MAX_MODEL_BYTES:,} of the largest model "
                           "fmnist_lab builds with its optimizer state; it is not read. Give a model file that a run "
                           "wrote.")


def not_a_model_file(path: Path, err: BaseException) -> BadFileError:
    return BadFileError(f"{path} is not a model file: it is not a PyTorch save, or it is damaged or truncated "
                          f"({type(err).__name__}). Give a run directory, its model_weights.pth or a checkpoint.")


@dataclass
class ModelFiles:
    """What a run directory, a .ckpt or a .pth with its model.json hold, each checked for its type."""

    net: dict  # the network description, for build_net
    state: dict[str, torch.Tensor]
    described_by: str  # the file and key `net` comes from, for errors
    weights: Path  # the file the state_dict comes from
    classes: list[str] | None  # model.json's class names (a checkpoint has none)
    tta: bool = False  # tested with test-time augmentation (fmnist_lab.models.FlipAverage)


def read_model(path: str | Path) -> ModelFiles:
    """The network description, weights and class names of a run directory, a Lightning .ckpt, or a .pth with
    model.json beside it; BadFileError naming the file and key when one is not what a run writes."""
    path = Path(path)
    if path.is_dir():
        run = RunDir(path)
        found = run.model_file()
        if found is None:
            raise FileNotFoundError(f"{path} holds no model: looked for {run.weights}, {run.best} and {run.last}.")
        path = found
    data = read_file(path)
    if path.suffix == ".ckpt":
        hyper = data.get("hyper_parameters") if isinstance(data, dict) else None
        net = hyper.get("net") if isinstance(hyper, dict) else None
        state = data.get("state_dict") if isinstance(data, dict) else None
        for key, value in (("hyper_parameters.net", net), ("state_dict", state)):
            if not isinstance(value, dict):
                raise BadFileError(f"{path} is not an fmnist_lab checkpoint: it has no {key} mapping. Give a "
                                   "checkpoint that a run wrote (checkpoints/best.ckpt), its model_weights.pth, or "
                                   "the run directory.")
        state = {k.removeprefix("net."): v for k, v in state.items() if isinstance(k, str) and k.startswith("net.")}
        tta = check_tta(hyper.get("tta", False), f"{path} (key hyper_parameters.tta)")
        return ModelFiles(net, check_state(state, path), f"{path} (key hyper_parameters.net)", path, None, tta)
    description = path.with_name("model.json")
    if not description.exists():  # exists, not is_file: a FIFO there is reported by read_json, without waiting
        raise FileNotFoundError(f"{path} is a bare state_dict; {description} must sit beside it to say which "
                                "architecture the weights belong to (every run writes the pair).")
    if not isinstance(data, dict):
        raise BadFileError(f"{path} holds a {type(data).__name__}, not a state_dict. Use the model_weights.pth a run "
                           "wrote, or the run's checkpoints/best.ckpt.")
    entry = read_json(description)
    if not isinstance(entry, dict):
        raise BadFileError(f"{description} holds a {type(entry).__name__}, not the mapping a run writes there (net, "
                           "classes, input). Use the model.json that a run wrote with the weights.")
    net = entry.get("net")
    if not isinstance(net, dict):
        raise BadFileError(f"{description} (key net) does not describe a network: {reprlib.repr(net)} is no "
                           "mapping of `_target_` and arguments. Use the model.json that a run wrote with the weights, "
                           "or the run's checkpoints/best.ckpt.")
    classes = check_classes(entry.get("classes"), f"{description} (key classes)")  # their number: load_classifier
    tta = check_tta(entry.get("tta", False), f"{description} (key tta)")
    return ModelFiles(net, check_state(data, path), f"{description} (key net)", path, classes, tta)


def check_tta(value: object, source: str) -> bool:
    """`value` if it is true or false (what a run writes: whether it tested with test-time augmentation)."""
    if not isinstance(value, bool):
        raise BadFileError(f"{source} is {reprlib.repr(value)}, not true or false: it says whether the model is "
                           "used with test-time augmentation. Use the files a run wrote.")
    return value


def check_state(state: dict, path: Path) -> dict[str, torch.Tensor]:
    """`state` if it maps names to tensors, as a state_dict does; BadFileError naming the first entry that does not."""
    for key, value in state.items():
        if not (isinstance(key, str) and isinstance(value, torch.Tensor)):
            raise BadFileError(f"{path} is not a state_dict: its entry {reprlib.repr(key)} holds a "
                               f"{type(value).__name__}, not a tensor. Give the weights or checkpoint a run wrote.")
    return state

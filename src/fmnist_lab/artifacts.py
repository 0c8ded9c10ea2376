"""What a trained network leaves behind and how it comes back: the weights file and its model.json, safe
loading of any of them, warm start, frozen layers, and the ONNX export with its check against PyTorch.

Every load is `torch.load(..., weights_only=True)`: tensors and plain containers only, never code.
"""

from __future__ import annotations

import json
import os
import pickle
import reprlib
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

import fmnist_lab
from fmnist_lab.data.idx import CLASSES
from fmnist_lab.models import build_net
from fmnist_lab.predict import check_classes  # torch-free, for predict's ONNX path too
from fmnist_lab.run_dir import BadFileError, RunDir, atomic_write, read_json, save_torch, write_json
from fmnist_lab.untrusted import open_regular

INPUT_DESCRIPTION = "float32 [N, 1, 28, 28]: grayscale pixels in [0, 1], light garment on black (as ToTensor gives)"


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


def save_weights(net: nn.Module, net_config: dict, folder: Path, classes: Sequence[str]) -> Path:
    """`model_weights.pth` (the state_dict, as in the PyTorch tutorial) + `model.json` (how to rebuild it)."""
    run = RunDir(folder)
    write_json(run.model_json, {"net": net_config, "classes": list(classes), "input": INPUT_DESCRIPTION})
    return save_torch(net.state_dict(), run.weights)


@dataclass
class ModelFiles:
    """What a run directory, a .ckpt or a .pth with its model.json hold, each checked for its type."""

    net: dict  # the network description, for build_net
    state: dict[str, torch.Tensor]
    described_by: str  # the file and key `net` comes from, for errors
    weights: Path  # the file the state_dict comes from
    classes: list[str] | None  # model.json's class names (a checkpoint has none)


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
        return ModelFiles(net, check_state(state, path), f"{path} (key hyper_parameters.net)", path, None)
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
    return ModelFiles(net, check_state(data, path), f"{description} (key net)", path, classes)


def check_state(state: dict, path: Path) -> dict[str, torch.Tensor]:
    """`state` if it maps names to tensors, as a state_dict does; BadFileError naming the first entry that does not."""
    for key, value in state.items():
        if not (isinstance(key, str) and isinstance(value, torch.Tensor)):
            raise BadFileError(f"{path} is not a state_dict: its entry {reprlib.repr(key)} holds a "
                               f"{type(value).__name__}, not a tensor. Give the weights or checkpoint a run wrote.")
    return state


def read_weights(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(net config, state_dict) from a run directory, a Lightning .ckpt, or a .pth with model.json beside it."""
    files = read_model(path)
    return files.net, files.state


def load_model(path: str | Path) -> nn.Module:
    """An eval-mode network on the CPU from a run directory, a .ckpt or a .pth (always `weights_only`), built
    only as a registered architecture within the size caps (fmnist_lab.models.build_net)."""
    return build_model(read_model(path))


def build_model(files: ModelFiles) -> nn.Module:
    net = build_net(files.net, files.described_by)
    try:
        net.load_state_dict(files.state)
    except (RuntimeError, TypeError, ValueError) as err:  # missing or extra names, other shapes
        cause = " ".join(str(err).split())[:300]
        raise BadFileError(f"{files.weights}: its weights do not fit the network that {files.described_by} "
                           f"describes ({cause}). Use the files a run wrote together.") from err
    return net.eval()


def load_classifier(path: str | Path) -> tuple[nn.Module, list[str]]:
    """`load_model`, and its class names, one per logit: model.json's, or FashionMNIST's for a checkpoint."""
    files = read_model(path)
    net = build_model(files)
    with torch.no_grad():
        width = net(torch.zeros(1, 1, 28, 28)).shape[1]
    if files.classes is not None:
        return net, check_classes(files.classes, f"{files.weights.with_name('model.json')} (key classes)", width)
    if width != len(CLASSES):
        raise BadFileError(f"{files.weights} gives {width} logits per image, but a checkpoint names no classes and "
                           f"FashionMNIST has {len(CLASSES)}. Give the run directory or its model_weights.pth, whose "
                           "model.json names the classes.")
    return net, list(CLASSES)


def warm_start(net: nn.Module, path: str | Path, strict: bool = True) -> list[str]:
    """Copy weights from a run/.ckpt/.pth into `net`; `strict=False` takes every tensor whose name and shape
    match and skips the rest. Returns the names of the tensors loaded."""
    _, state = read_weights(path)
    own = net.state_dict()
    loaded = [k for k, v in state.items() if k in own and own[k].shape == v.shape]
    if strict and not (len(loaded) == len(own) == len(state)):
        mismatched = sorted((set(own) | set(state)) - set(loaded))
        raise ValueError(f"finetune.init_from={path} does not match this model ({', '.join(mismatched)} differ in "
                         "name or shape); set finetune.strict=false to load only the tensors that match.")
    net.load_state_dict({k: state[k] for k in loaded}, strict=False)
    return loaded


def freeze(net: nn.Module, layers: Sequence[int | str]) -> list[str]:
    """Freeze layers given as an index into the layers with weights, Conv2d and Linear in order (0 = first,
    -1 = last), or a module name (`layers.0`, `features.1`: a whole block). Frozen parameters get
    `requires_grad=False` and stay out of the optimizer; a frozen block's batch norm still updates its running
    statistics in training."""
    weighted = [name for name, m in net.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    modules = dict(net.named_modules())
    names = []
    for layer in layers:
        if isinstance(layer, int):
            if not -len(weighted) <= layer < len(weighted):
                raise ValueError(f"finetune.freeze: index {layer} is out of range; the model has {len(weighted)} "
                                 f"Conv2d/Linear layers ({', '.join(weighted)}).")
            layer = weighted[layer]
        if layer not in modules or not layer:
            raise ValueError(f"finetune.freeze: no layer named {layer!r}; use an index or a module name such as "
                             f"{', '.join(weighted)}.")
        modules[layer].requires_grad_(False)
        names.append(layer)
    return names


def parameter_counts(net: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


# --- ONNX ---------------------------------------------------------------------------------------------


def first_images(loader, count: int) -> torch.Tensor:
    """The first `count` images a loader yields, as CPU float32."""
    batches, total = [], 0
    for x, _ in loader:
        batches.append(x.cpu().float())
        total += len(x)
        if total >= count:
            break
    return torch.cat(batches)[:count]


def export_onnx(net: nn.Module, path: Path, extra_metadata: dict[str, str], opset: int | None = None) -> None:
    import onnx  # here, not at the top: runs without the export never load it

    example = torch.rand(2, 1, 28, 28)
    program = torch.onnx.export(net, (example,), dynamo=True, input_names=["image"], output_names=["logits"],
                                dynamic_shapes={"x": {0: "batch"}}, external_data=False, opset_version=opset,
                                verbose=False)
    proto = program.model_proto
    metadata = {"classes": json.dumps(list(CLASSES)), "input": INPUT_DESCRIPTION,
                "output": "logits [N, 10]; softmax gives class probabilities",
                "fmnist_lab_version": fmnist_lab.__version__, **extra_metadata}
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    atomic_write(path, lambda tmp: onnx.save_model(proto, str(tmp), save_as_external_data=False))


# A trained classifier's logits are tens. Up to LOGIT_SCALE, verify_onnx allows `atol` as given; beyond it
# float32 rounding grows with the logits, and so does the allowance. Beyond DIVERGED (a cross-entropy of 1e4
# for one wrong image) training has diverged, and that, not the export, is what a mismatch reports.
LOGIT_SCALE, DIVERGED = 100.0, 1e4


def verify_onnx(net: nn.Module, path: Path, images: torch.Tensor, atol: float = 1e-4) -> dict:
    import onnx
    import onnxruntime as ort

    result: dict = {"path": str(path), "checker": False, "max_abs_diff": None, "argmax_equal": False,
                    "batch_sizes": [1, len(images)], "atol": atol, "ok": False, "problem": None}
    try:
        onnx.checker.check_model(str(path), full_check=True)
        result["checker"] = True
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        diffs, same, finite, scale = [], True, True, 0.0
        for batch in (images[:1], images):
            with torch.no_grad():
                expected = net(batch).numpy()
            (got,) = session.run(["logits"], {"image": batch.numpy()})
            finite &= bool(np.isfinite(expected).all())
            scale = max(scale, float(np.abs(expected).max()))
            diffs.append(float(abs(got - expected).max()))
            same &= bool((got.argmax(1) == expected.argmax(1)).all())
        allowed = atol * max(1.0, scale / LOGIT_SCALE)
        result.update(max_abs_diff=max(diffs), argmax_equal=same, max_abs_logit=scale, allowed=allowed)
        result["problem"] = onnx_problem(finite, scale, max(diffs), allowed, same)
        result["diverged"] = result["problem"] is not None and (not finite or scale > DIVERGED)
    except Exception as err:  # a checker or runtime failure is a verification result, reported the same way
        result["problem"] = f"{type(err).__name__}: {err}"
    result["ok"] = result["problem"] is None
    return result


def onnx_problem(finite: bool, scale: float, diff: float, allowed: float, same: bool) -> str | None:
    """What is wrong when ONNX Runtime and PyTorch disagree, or None."""
    if not finite:
        return ("the network diverged: its PyTorch logits are not finite (nan or inf), so the export cannot be "
                "compared with it; train again with a lower lr")
    if diff <= allowed and same:
        return None
    measured = f"max |logit difference| {diff:.2e} (allowed {allowed:.0e}), argmax equal: {same}"
    if scale > DIVERGED:
        return (f"the network diverged: its logits reach {scale:.1e} (a trained classifier's are tens), where "
                f"float32 rounding makes PyTorch and ONNX Runtime disagree ({measured}); train again with a lower lr")
    return measured

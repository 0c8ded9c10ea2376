"""What a trained network leaves behind and how it comes back: the weights file and its model.json, safe
loading of any of them, warm start, frozen layers, and the ONNX export with its check against PyTorch.

Every load is `torch.load(..., weights_only=True)`: tensors and plain containers only, never code.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fmnist_lab
from fmnist_lab.data.idx import CLASSES
from fmnist_lab.models import build_net
from fmnist_lab.run_dir import BadFileError, RunDir, atomic_write, read_json, save_torch, write_json

INPUT_DESCRIPTION = "float32 [N, 1, 28, 28]: grayscale pixels in [0, 1], light garment on black (as ToTensor gives)"


class UnsafeFileError(BadFileError):
    """A file that would need arbitrary unpickling (e.g. a whole model saved with `torch.save(model)`)."""


def read_file(path: Path) -> Any:
    """`torch.load(path, weights_only=True)`: tensors and plain containers only, never arbitrary code."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give a run directory, a .ckpt or a .pth file.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not zipfile.is_zipfile(path):  # random bytes also fail as a pickle
            raise not_a_model_file(path, err) from err
        raise UnsafeFileError(
            f"{path} holds pickled Python objects, not just tensors (a model saved with `torch.save(model)`?). "
            "Loading it could run arbitrary code, so fmnist_lab refuses it. Save `model.state_dict()` instead, "
            "or use a run's model_weights.pth or checkpoints/best.ckpt."
        ) from err
    except Exception as err:  # empty, truncated, another format; the unpickler fails on junk in many ways
        raise not_a_model_file(path, err) from err


def not_a_model_file(path: Path, err: BaseException) -> BadFileError:
    return BadFileError(f"{path} is not a model file: it is not a PyTorch save, or it is damaged or truncated "
                          f"({type(err).__name__}). Give a run directory, its model_weights.pth or a checkpoint.")


def save_weights(net: nn.Module, net_config: dict, folder: Path, classes: Sequence[str]) -> Path:
    """`model_weights.pth` (the state_dict, as in the PyTorch tutorial) + `model.json` (how to rebuild it)."""
    run = RunDir(folder)
    write_json(run.model_json, {"net": net_config, "classes": list(classes), "input": INPUT_DESCRIPTION})
    return save_torch(net.state_dict(), run.weights)


def read_weights(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(net config, state_dict) from a run directory, a Lightning .ckpt, or a .pth with model.json beside it."""
    path = Path(path)
    if path.is_dir():
        run = RunDir(path)
        found = run.model_file()
        if found is None:
            raise FileNotFoundError(f"{path} holds no model: looked for {run.weights}, {run.best} and {run.last}.")
        path = found
    data = read_file(path)
    if path.suffix == ".ckpt":
        net_config = data.get("hyper_parameters", {}).get("net") if isinstance(data, dict) else None
        if not isinstance(net_config, dict) or not isinstance(data.get("state_dict"), dict):
            raise BadFileError(f"{path} is not an fmnist_lab checkpoint: it has no `net` hyperparameters or no "
                               "state_dict. Give a checkpoint that a run wrote (checkpoints/best.ckpt), its "
                               "model_weights.pth, or the run directory.")
        return net_config, {k.removeprefix("net."): v for k, v in data["state_dict"].items() if k.startswith("net.")}
    description = path.with_name("model.json")
    if not description.is_file():
        raise FileNotFoundError(f"{path} is a bare state_dict; {description} must sit beside it to say which "
                                "architecture the weights belong to (every run writes the pair).")
    net_config = read_json(description)
    if not (isinstance(net_config, dict) and isinstance(net_config.get("net"), dict) and isinstance(data, dict)):
        raise BadFileError(f"{description} does not describe a network (no `net` entry), or {path} is not a "
                           "state_dict. Use the model.json and model_weights.pth that a run wrote together, or "
                           "the run's checkpoints/best.ckpt.")
    return net_config["net"], data


def load_model(path: str | Path) -> nn.Module:
    """An eval-mode network on the CPU from a run directory, a .ckpt or a .pth (always `weights_only`), built
    only as a registered architecture (fmnist_lab.models.build_net)."""
    net_config, state = read_weights(path)
    net = build_net(net_config, str(path))
    net.load_state_dict(state)
    return net.eval()


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


def verify_onnx(net: nn.Module, path: Path, images: torch.Tensor, atol: float = 1e-4) -> dict:
    import onnx
    import onnxruntime as ort

    result: dict = {"path": str(path), "checker": False, "max_abs_diff": None, "argmax_equal": False,
                    "batch_sizes": [1, len(images)], "atol": atol, "ok": False, "problem": None}
    try:
        onnx.checker.check_model(str(path), full_check=True)
        result["checker"] = True
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        diffs, same = [], True
        for batch in (images[:1], images):
            with torch.no_grad():
                expected = net(batch).numpy()
            (got,) = session.run(["logits"], {"image": batch.numpy()})
            diffs.append(float(abs(got - expected).max()))
            same &= bool((got.argmax(1) == expected.argmax(1)).all())
        result.update(max_abs_diff=max(diffs), argmax_equal=same)
        if max(diffs) > atol or not same:
            result["problem"] = f"max |logit difference| {max(diffs):.2e} (allowed {atol:.0e}), argmax equal: {same}"
    except Exception as err:  # a checker or runtime failure is a verification result, reported the same way
        result["problem"] = f"{type(err).__name__}: {err}"
    result["ok"] = result["problem"] is None
    return result

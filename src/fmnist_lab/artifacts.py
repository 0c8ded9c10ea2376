"""What a trained network leaves behind and how it comes back: the weights file and its model.json, the
network rebuilt from them (read by fmnist_lab.model_files), warm start, frozen layers, and the ONNX export with
its check against PyTorch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

import fmnist_lab
from fmnist_lab.data.idx import CLASSES
from fmnist_lab.model_files import ModelFiles, read_model
from fmnist_lab.models import build_net, shipped
from fmnist_lab.predictor import check_classes
from fmnist_lab.run_dir import BadFileError, RunDir, atomic_write, save_torch, write_json

INPUT_DESCRIPTION = "float32 [N, 1, 28, 28]: grayscale pixels in [0, 1], light garment on black (as ToTensor gives)"


def save_weights(net: nn.Module, net_config: dict, folder: Path, classes: Sequence[str], tta: bool = False) -> Path:
    """`model_weights.pth` (the state_dict, as in the PyTorch tutorial) + `model.json` (how to rebuild it, and
    `tta`: whether the run tested it with test-time augmentation, which loading it then applies too)."""
    run = RunDir(folder)
    write_json(run.model_json, {"net": net_config, "classes": list(classes), "input": INPUT_DESCRIPTION, "tta": tta})
    return save_torch(net.state_dict(), run.weights)


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
    return shipped(net, files.tta).eval()


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

"""Files a user did not write, given to predict and evaluate: a few hundred bytes of model file never allocate
gigabytes, a FIFO never hangs, a crafted value is one `error:` paragraph naming the file and key (never a
traceback), and `| head` ends quietly. Models are tiny and written by hand; nothing here trains."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fmnist_lab.artifacts import export_onnx, save_weights, verify_onnx
from fmnist_lab.data import CLASSES
from fmnist_lab.evaluate import comparison, evaluate
from fmnist_lab.evaluate import main as evaluate_main
from fmnist_lab.models import MLP, register
from fmnist_lab.predict import INFERENCE_BATCH
from fmnist_lab.predict import main as predict_main

NET = {"_target_": "fmnist_lab.models.MLP", "hidden": [8]}


def write_png(path: Path, seed: int) -> Path:
    """A dark 28x28 image with a light block, as FashionMNIST has them (so predict prints no warning)."""
    pixels = np.zeros((28, 28), np.uint8)
    pixels[6 + seed % 10:18 + seed % 10, 8:20] = 200
    Image.fromarray(pixels, mode="L").save(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> SimpleNamespace:
    """A run folder (model_weights.pth + model.json) and the ONNX export of one tiny MLP, and three images."""
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    net = MLP(hidden=[8]).eval()
    (folder / "run").mkdir()
    save_weights(net, NET, folder / "run", CLASSES)
    export_onnx(net, folder / "model.onnx", {})
    (folder / "images").mkdir()
    for i in range(3):
        write_png(folder / "images" / f"{i}.png", i)
    return SimpleNamespace(net=net, run=folder / "run", onnx=folder / "model.onnx", images=folder / "images")


def copy_run(tiny, tmp_path: Path, model_json: object = None) -> Path:
    """A copy of the tiny run; `model_json`, when given, replaces its model.json (any JSON value)."""
    run = shutil.copytree(tiny.run, tmp_path / "run")
    if model_json is not None:
        (run / "model.json").write_text(json.dumps(model_json))
    return run


def assert_one_error(code: int, err: str, *words: str) -> None:
    """Exit 1 and one `error:` paragraph that holds every word in `words` (the file, the key)."""
    assert code == 1, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err


# --- crafted values in model.json and checkpoints ---------------------------------------------------------

HOSTILE_NET = {  # each value for one key of the tiny MLP's description; every one must be refused
    "_target_": [5, None, ["fmnist_lab.models.MLP"], "builtins.open", "fmnist_lab.models.mlp"],
    "hidden": ["8", 8, None, [0], [-8], [True], [8.5], [[8]], {"8": 8}, [10**9], [8] * 33],
    "activation": [5, None, ["relu"], {"relu": 1}, "swish"],
    "dropout": ["0", -0.1, 1, float("nan"), float("inf"), None, [0]],
    "norm": [5, None, ["batch"], {"batch": 1}, "group"],
    "final_relu": ["false", 1, None, []],
    "normalize": ["true", 0, None, {}],
    "in_features": [100, 0, "784", None, 10**9, 784.0],  # 100: builds, but cannot take a 28x28 image
    "num_classes": [0, 5, "10", None, 10**6, 10.0],  # 5: builds, but the weights do not fit it
    "extra": [1],  # an argument the MLP does not take
}
NET_CASES = [({**NET, key: value}, f"{key}={value!r}") for key, values in HOSTILE_NET.items() for value in values]
NET_CASES += [(value, f"net={value!r}") for value in (5, None, "MLP", [NET])]
HOSTILE_CLASSES = [5, None, "abcdefghij", [], ["a"] * 9, ["a"] * 11, [1] * 10, [None] * 10, ["a\nb"] * 10,
                   ["x" * 201] * 10, [""] * 10, {str(i): c for i, c in enumerate(CLASSES)}]


def model_json_cases():
    good = {"net": NET, "classes": list(CLASSES), "input": "float32 [N, 1, 28, 28]"}
    cases = [({**good, "net": net}, "net", label) for net, label in NET_CASES]
    cases += [({**good, "classes": value}, "classes", f"classes={value!r}"[:60]) for value in HOSTILE_CLASSES]
    cases += [({"net": NET}, "classes", "no classes"), ({"classes": list(CLASSES)}, "net", "no net")]
    cases += [(value, "holds a", f"model.json={value!r}"[:60]) for value in ([], "x", 5, [good])]
    return [pytest.param(description, key, id=label) for description, key, label in cases]


@pytest.mark.parametrize(("description", "key"), model_json_cases())
def test_a_crafted_model_json_is_one_error_naming_the_file_and_key(tiny, tmp_path, capsys, description, key):
    run = copy_run(tiny, tmp_path, description)
    assert_one_error(predict_main([f"model={run}", str(tiny.images)]), capsys.readouterr().err,
                     str(run / "model.json"), key)
    assert_one_error(evaluate_main([f"run={run}", "device=cpu"]), capsys.readouterr().err,
                     str(run / "model.json"), key)


def checkpoint_cases():
    state = {f"net.{k}": v for k, v in MLP(hidden=[8]).state_dict().items()}
    good = {"hyper_parameters": {"net": NET}, "state_dict": state}
    cases = [({**good, "hyper_parameters": {"net": net}}, "hyper_parameters.net", label) for net, label in NET_CASES]
    cases += [({**good, "hyper_parameters": value}, "net", f"hyper_parameters={value!r}") for value in (5, [], None)]
    cases += [({**good, "state_dict": value}, "state_dict", f"state_dict={value!r}") for value in (5, [], None)]
    cases += [(value, "fmnist_lab checkpoint", f"checkpoint={value!r}") for value in (5, [], torch.zeros(3))]
    cases += [({**good, "state_dict": {**state, "net.layers.0.weight": 5}}, "not a tensor", "weight=5"),
              ({**good, "state_dict": {**state, "net.layers.0.weight": torch.zeros(3)}}, "do not fit", "shape"),
              ({**good, "state_dict": {5: torch.zeros(3)}}, "do not fit", "int key"),
              ({**good, "state_dict": {**state, "net.extra": torch.zeros(3)}}, "do not fit", "extra tensor")]
    return [pytest.param(checkpoint, words, id=label) for checkpoint, words, label in cases]


@pytest.mark.parametrize(("checkpoint", "words"), checkpoint_cases())
def test_a_crafted_checkpoint_is_one_error_naming_the_file(tmp_path, capsys, checkpoint, words):
    path = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, path)
    image = write_png(tmp_path / "shoe.png", 0)
    assert_one_error(predict_main([f"model={path}", str(image)]), capsys.readouterr().err, str(path), words)
    assert_one_error(evaluate_main([f"run={path}", "device=cpu"]), capsys.readouterr().err, str(path), words)


HOSTILE_CONFIGS = [("data: 5", "key data is 5"), ("data: [1, 2]", "key data is"), ("data: x", "key data is"),
                   ("data: {root: 5}", "key data.root is 5"), ("data: {root: [a]}", "key data.root is"),
                   ("data: {root: '${nowhere}'}", "key data.root cannot be resolved")]
HOSTILE_METRICS = [([], "no mapping"), ("x", "no mapping"), ({"test/acc": "high"}, "key test/acc"),
                   ({"test/acc": 2}, "key test/acc"), ({"test/acc": float("nan")}, "key test/acc"),
                   ({"status": 5}, "key status"), ({"status": "failed", "error": 5}, "key error"),
                   ({"test/acc": 0.5, "test_images": "all"}, "key test_images"),
                   ({"test/acc": 0.5, "test_images": -3}, "key test_images"),
                   ({"test/acc": 0.5, "test_images": 2.5}, "key test_images"), ({"task": 5}, "key task")]


@pytest.mark.parametrize(("config", "words"), HOSTILE_CONFIGS, ids=[c for c, _ in HOSTILE_CONFIGS])
def test_evaluate_names_a_crafted_run_config_and_its_key(tiny, tmp_path, capsys, config, words):
    run = copy_run(tiny, tmp_path)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(config + "\n")
    assert_one_error(evaluate_main([f"run={run}", "device=cpu"]), capsys.readouterr().err,
                     str(run / ".hydra" / "config.yaml"), words)


@pytest.mark.parametrize(("metrics", "words"), HOSTILE_METRICS, ids=[repr(m) for m, _ in HOSTILE_METRICS])
def test_evaluate_names_a_crafted_metrics_json_and_its_key(tiny, tmp_path, capsys, metrics, words):
    run = copy_run(tiny, tmp_path)
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert_one_error(evaluate_main([f"run={run}", "device=cpu"]), capsys.readouterr().err,
                     str(run / "metrics.json"), words)


def test_oversized_model_files_are_refused_before_they_are_read(tiny, tmp_path, capsys):
    """A .pth over 1 GiB, one whose zip directory claims a 4 GB entry, and an .onnx over 256 MiB (sparse files:
    nothing is written to disk)."""
    image = write_png(tmp_path / "shoe.png", 0)
    big = copy_run(tiny, tmp_path) / "model_weights.pth"
    with big.open("r+b") as f:
        f.truncate((1 << 30) + 1)
    claims = tmp_path / "claims" / "model_weights.pth"
    shutil.copytree(tiny.run, claims.parent)
    data = bytearray(claims.read_bytes())
    entry = data.index(b"PK\x01\x02")  # the first central directory header; its uncompressed size is at +24
    data[entry + 24:entry + 28] = (0xFFFFFF00).to_bytes(4, "little")
    claims.write_bytes(data)
    onnx = tmp_path / "big.onnx"
    with onnx.open("wb") as f:
        f.truncate((256 << 20) + 1)
    for path, words in ((big, "holds 1,073,741,825 bytes, more than"), (claims, "bytes, more than the 1,073,741,824"),
                        (onnx, "is larger than 268,435,456 bytes")):
        assert_one_error(predict_main([f"model={path}", str(image)]), capsys.readouterr().err, str(path), words)


# --- size caps, bounded batches ----------------------------------------------------------------------------


@pytest.mark.parametrize(("net", "words"), [
    ({"_target_": "fmnist_lab.models.MLP", "hidden": [4096] * 4}, "would have 53,"),  # 214 MB: just over the cap
    ({"_target_": "fmnist_lab.models.CNN", "channels": [512], "convs_per_block": 8}, "activation values per image"),
], ids=["mlp-weights", "cnn-activations"])
def test_a_model_json_over_the_size_caps_is_refused(tiny, tmp_path, capsys, net, words):
    run = copy_run(tiny, tmp_path, {"net": net, "classes": list(CLASSES)})
    assert_one_error(predict_main([f"model={run}", str(tiny.images)]), capsys.readouterr().err,
                     str(run / "model.json"), words, "refused before anything was allocated")


def onnx_asking_for(path: Path, elements: int) -> Path:
    """A 300-byte ONNX model that fills a tensor of `elements` floats for every batch, then returns 10 pixels."""
    from onnx import TensorProto, helper, numpy_helper

    constants = {"shape": [1, elements], "start": [0], "end": [10], "axis": [1]}
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"],
                              value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])),
             helper.make_node("ReduceMax", ["big"], ["zero"], keepdims=0),  # 1.0: keeps `big` in the graph
             helper.make_node("Flatten", ["image"], ["flat"]),
             helper.make_node("Slice", ["flat", "start", "end", "axis"], ["first"]),
             helper.make_node("Mul", ["first", "zero"], ["logits"])]
    graph = helper.make_graph(nodes, "bomb",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 28, 28])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.metadata_props.add(key="classes", value=json.dumps(list(CLASSES)))
    path.write_bytes(model.SerializeToString())
    return path


def test_the_reported_memory_bombs_end_in_one_error_in_a_4_gb_process(tiny, tmp_path):
    """The attack's files, in a process that may map 4 GB: a 32 x 16384 MLP (8.4 GB), a CNN with 2048 channels
    and 8 convolutions a block, and a small ONNX graph that asks for 1.6 GB. Each is one error, the network
    refused before it is built, the ONNX graph when ONNX Runtime's arena runs out."""
    models = {"mlp": copy_run(tiny, tmp_path / "mlp", {"net": {**NET, "hidden": [16384] * 32},
                                                        "classes": list(CLASSES)}),
              "cnn": copy_run(tiny, tmp_path / "cnn", {"net": {"_target_": "fmnist_lab.models.CNN",
                                                               "channels": [2048] * 4, "convs_per_block": 8},
                                                       "classes": list(CLASSES)}),
              "onnx": onnx_asking_for(tmp_path / "bomb.onnx", 400_000_000)}
    script = f"""
import contextlib, io, json, sys
from fmnist_lab.predict import main
results = {{}}
for name, model in {({k: str(v) for k, v in models.items()})!r}.items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        results[name] = [main([f"model={{model}}", {str(tiny.images)!r}]), err.getvalue()]
print(json.dumps(results))
"""

    def four_gb() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            preexec_fn=four_gb)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert_one_error(*results["mlp"], "8,335,032,330 weights", "refused before anything was allocated")
    assert_one_error(*results["cnn"], "1,170,754,986 weights", "refused before anything was allocated")
    assert_one_error(*results["onnx"], str(models["onnx"]), "more than the 1,073,741,824 bytes")


class BatchRecorder(torch.nn.Module):
    """A linear classifier that records the size of every batch it is given."""

    sizes: list[int] = []

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(784, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        BatchRecorder.sizes.append(len(x))
        return self.layer(x.flatten(1))


def test_predict_and_evaluate_run_bounded_batches(real_root, tmp_path, capsys):
    register("tests.BatchRecorder", BatchRecorder)
    save_weights(BatchRecorder(), {"_target_": "tests.BatchRecorder"}, tmp_path, CLASSES)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2 * INFERENCE_BATCH + 50):
        write_png(images / f"{i:03d}.png", i)
    BatchRecorder.sizes.clear()
    assert predict_main([f"model={tmp_path}", str(images), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2 * INFERENCE_BATCH + 50
    assert max(BatchRecorder.sizes) == INFERENCE_BATCH
    BatchRecorder.sizes.clear()
    assert evaluate(tmp_path, str(real_root), "cpu")["count"] == 10_000
    assert max(BatchRecorder.sizes) == INFERENCE_BATCH and sum(BatchRecorder.sizes) >= 10_000


# --- FIFOs and devices -----------------------------------------------------------------------------------


def test_fifos_and_devices_are_errors_and_never_block(tiny, tmp_path):
    """A FIFO among the images (in a folder and on the command line) and /dev/zero are error lines, and the
    other images are predicted; a FIFO as model.json, .pth, .ckpt, .onnx or a run's config.yaml is one error.
    In a child process with a timeout: a read that blocks fails the test instead of hanging it."""
    images = shutil.copytree(tiny.images, tmp_path / "images")
    os.mkfifo(images / "fifo.png")
    fifo_json = copy_run(tiny, tmp_path / "json")
    (fifo_json / "model.json").unlink()
    os.mkfifo(fifo_json / "model.json")
    fifo_config = copy_run(tiny, tmp_path / "config")
    (fifo_config / ".hydra").mkdir()
    os.mkfifo(fifo_config / ".hydra" / "config.yaml")
    fifo_pth = copy_run(tiny, tmp_path / "pth") / "fifo.pth"  # model.json beside it
    fifo_ckpt, fifo_onnx = tmp_path / "a.ckpt", tmp_path / "a.onnx"
    for path in (fifo_pth, fifo_ckpt, fifo_onnx):
        os.mkfifo(path)
    image = str(images / "0.png")
    cases = {"images": ("predict", [f"model={tiny.run}", str(images), str(images / "fifo.png"), "/dev/zero"]),
             "onnx images": ("predict", [f"model={tiny.onnx}", str(images), str(images / "fifo.png")]),
             "model.json": ("predict", [f"model={fifo_json}", image]),
             "pth": ("predict", [f"model={fifo_pth}", image]),
             "ckpt": ("evaluate", [f"run={fifo_ckpt}", "device=cpu"]),
             "onnx": ("predict", [f"model={fifo_onnx}", image]),
             "config": ("evaluate", [f"run={fifo_config}", "device=cpu"])}
    script = f"""
import contextlib, io, json
from fmnist_lab import evaluate, predict
results = {{}}
for name, (module, argv) in {cases!r}.items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        results[name] = [getattr({{"predict": predict, "evaluate": evaluate}}[module], "main")(argv), out.getvalue(),
                         err.getvalue()]
print(json.dumps(results))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("images", "onnx images"):
        code, out, err = results[name]
        predicted = sorted(line.split(":")[0] for line in out.splitlines())
        assert code == 1 and predicted == [str(images / f"{i}.png") for i in range(3)], (out, err)
        assert err.count(f"error: {images / 'fifo.png'}: is a FIFO, not a file") == 2, err
        assert "Traceback" not in err
    assert "error: /dev/zero: is a device, not a file" in results["images"][2]
    for name, path in (("model.json", fifo_json / "model.json"), ("pth", fifo_pth), ("ckpt", fifo_ckpt),
                       ("onnx", fifo_onnx), ("config", fifo_config / ".hydra" / "config.yaml")):
        code, out, err = results[name]
        assert_one_error(code, err, f"error: {path} is a FIFO, not a file")


def test_an_image_is_decoded_only_as_a_format_its_suffixes_name(tiny, tmp_path, capsys):
    """PIL picks a decoder by content: an EPS file named .png would be handed to Ghostscript. Only the decoders
    of the image suffixes predict looks for are used."""
    eps = tmp_path / "shoe.png"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nshowpage\n")
    assert predict_main([f"model={tiny.onnx}", str(eps), str(tiny.images / "0.png")]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"error: {eps}: not a readable image (not PNG, JPEG, BMP, GIF, TIFF, WEBP)\n"
    assert captured.out.startswith(f"{tiny.images / '0.png'}: ")


# --- a closed stdout --------------------------------------------------------------------------------------


def piped_to_true(*args: str, module: str) -> subprocess.CompletedProcess:
    """`python -m <module> <args> | true` in bash: stdout is a real pipe whose reader has gone by the time the
    command writes. The status is the command's."""
    command = " ".join([sys.executable, "-m", module, *args])
    return subprocess.run(["bash", "-c", f"{command} | true; exit ${{PIPESTATUS[0]}}"], capture_output=True,
                          text=True, timeout=300)


def test_a_closed_stdout_ends_predict_and_evaluate_quietly(tiny, real_root):
    for result in (piped_to_true(f"model={tiny.onnx}", str(tiny.images), module="fmnist_lab.predict"),
                   piped_to_true(f"run={tiny.run}", "device=cpu", f"data.root={real_root}",
                                 module="fmnist_lab.evaluate")):
        assert result.returncode == 141 and result.stderr == "", result.stderr[-3000:]


# --- ONNX: diverged networks, evaluation ------------------------------------------------------------------


def test_onnx_verification_scales_with_the_logits_and_names_a_diverged_network(tmp_path):
    """A faithful export of a network with ~1e20 logits passes (float32 differences scale with the logits);
    one that does not match, with such logits or non-finite ones, is reported as a diverged network."""
    torch.manual_seed(0)
    huge, other = MLP(hidden=[16]).eval(), MLP(hidden=[16]).eval()
    with torch.no_grad():
        for net in (huge, other):
            net.layers[-1].weight.mul_(1e20)
            net.layers[-1].bias.mul_(1e20)
    images = torch.rand(64, 1, 28, 28)
    export_onnx(huge, tmp_path / "huge.onnx", {})
    faithful = verify_onnx(huge, tmp_path / "huge.onnx", images)
    assert faithful["ok"] and faithful["problem"] is None and faithful["max_abs_logit"] > 1e19
    assert faithful["max_abs_diff"] > faithful["atol"]  # an absolute tolerance would fail this faithful export
    mismatch = verify_onnx(other, tmp_path / "huge.onnx", images)
    assert not mismatch["ok"] and mismatch["problem"].startswith("the network diverged: its logits reach")
    assert "lower lr" in mismatch["problem"] and "max |logit difference|" in mismatch["problem"]
    with torch.no_grad():
        huge.layers[0].weight[0, 0] = float("nan")
    nan = verify_onnx(huge, tmp_path / "huge.onnx", images)
    assert not nan["ok"] and nan["problem"].startswith("the network diverged: its PyTorch logits are not finite")


def test_evaluate_runs_an_onnx_model_as_its_pytorch_twin(tiny, real_root, capsys):
    assert evaluate_main([f"run={tiny.onnx}", "device=cpu", f"data.root={real_root}"]) == 0
    out = capsys.readouterr().out
    accuracy = float(out.split("test/acc ")[1].split()[0])
    assert f"10,000 test images, model {tiny.onnx}" in out
    assert abs(accuracy - evaluate(tiny.run, str(real_root), "cpu")["test/acc"]) <= 0.0002  # float32 ties at most


def test_evaluate_compares_with_the_run_only_over_as_many_test_images(tiny, real_root, tmp_path, capsys):
    """debug=limit tests 2,000 images: that test/acc is shown, not compared; a run without test_images (older
    than the key) is compared as before."""
    run = copy_run(tiny, tmp_path)
    (run / "metrics.json").write_text(json.dumps({"status": "ok", "test/acc": 0.5, "test_images": 2000,
                                                  "task": "debug"}))
    assert evaluate_main([f"run={run}", "device=cpu", f"data.root={real_root}"]) == 0
    out = capsys.readouterr().out
    assert "the run (task debug) recorded test/acc 0.5000 over 2,000 test images, not 10,000: the two are not " \
           "compared" in out and "difference" not in out
    result = {"test/acc": 0.52, "count": 10_000}
    for recorded in ({"test/acc": 0.5, "test_images": 10_000}, {"test/acc": 0.5}):
        assert comparison(recorded, result) == "the run recorded test/acc 0.5000 (difference +2.00 points)"

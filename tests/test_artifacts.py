"""ONNX export and verification, the weights file, load_model, evaluate, predict, warm start and freezing."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from tensorboard.plugins.hparams import api_pb2

from conftest import compose_cfg, run_cli
from fmnist_lab import load_model
from fmnist_lab.artifacts import first_images, freeze, save_weights, verify_onnx, warm_start
from fmnist_lab.callbacks import OnnxExport
from fmnist_lab.data import CLASSES, FashionMNISTDataModule, load_split
from fmnist_lab.evaluate import evaluate
from fmnist_lab.model_files import UnsafeFileError
from fmnist_lab.models import CNN, MLP, Classifier, UnknownNetworkError, register
from fmnist_lab.predict import main as predict_main
from fmnist_lab.train import train
from test_tracking import hparams_entry

NET = {"_target_": "fmnist_lab.models.MLP", "hidden": [32]}
SGD = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.05, "momentum": 0.9}


@pytest.fixture(scope="module")
def tiny_trained(synthetic_root, tmp_path_factory):
    """A tiny model trained for a few steps with the OnnxExport callback attached, as a run has it."""
    folder = tmp_path_factory.mktemp("tiny")
    dm = FashionMNISTDataModule(root=str(synthetic_root), batch_size=64, seed=0)
    model = Classifier(NET, SGD)
    export = OnnxExport(path=str(folder / "model.onnx"))
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=30, limit_val_batches=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[export])
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    return model.net.eval(), folder / "model.onnx", export, dm


def test_onnx_export_is_verified_self_contained_and_described(tiny_trained):
    net, path, export, dm = tiny_trained
    assert export.error is None and export.metrics["onnx"]["ok"] and export.metrics["onnx"]["checker"]
    assert export.metrics["onnx"]["max_abs_diff"] <= 1e-4 and export.metrics["onnx"]["batch_sizes"] == [1, 256]
    # the recorded difference is the one measured on the first 256 real test images, at batch sizes 1 and 256
    images = first_images(dm.test_dataloader(), 256)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        diffs = [float(abs(session.run(["logits"], {"image": x.numpy()})[0] - net(x).numpy()).max())
                 for x in (images[:1], images)]
    assert 0 < export.metrics["onnx"]["max_abs_diff"] == max(diffs)
    assert [p.name for p in path.parent.iterdir() if p.name != "model.onnx"] == []  # no external-data sidecar
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["classes"]) == list(CLASSES) and "[0, 1]" in meta["input"]
    assert meta["fmnist_lab_version"] and 0 <= float(meta["test_acc"]) <= 1


def test_onnx_batch_axis_is_dynamic_and_normalization_is_inside(tiny_trained):
    net, path, _, _ = tiny_trained
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"] and session.get_outputs()[0].name == "logits"
    for n in (1, 37):
        x = torch.rand(n, 1, 28, 28)
        (logits,) = session.run(["logits"], {"image": x.numpy()})
        assert logits.shape == (n, 10)
        np.testing.assert_allclose(logits, net(x).detach().numpy(), atol=1e-4)  # raw [0, 1] pixels in


def test_verification_catches_a_model_that_does_not_match(tiny_trained, tmp_path):
    net, path, _, _ = tiny_trained
    other = MLP(hidden=[32])  # different weights: the export no longer matches this network
    result = verify_onnx(other, path, torch.rand(256, 1, 28, 28))
    assert not result["ok"] and result["problem"].startswith("max |logit difference|")  # not "diverged"
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not onnx")
    result = verify_onnx(net, broken, torch.rand(4, 1, 28, 28))
    assert not result["ok"] and not result["checker"] and result["problem"]


def test_strict_verification_failure_fails_the_run_after_writing_metrics(synthetic_root, tmp_path):
    """A negative tolerance fails every comparison: the strict default fails the run after metrics.json is
    written; strict=false keeps the run with a warning."""
    common = [f"data.root={synthetic_root}", "device=cpu", "debug=limit", "epochs=1", "logger=none",
              "callbacks.onnx_export.atol=-1"]
    with pytest.raises(RuntimeError, match=r"ONNX verification failed .*max \|logit difference\|.*strict=false"):
        train(compose_cfg(*common, output_dir=tmp_path))
    assert "allowed -1e+00" in json.loads((tmp_path / "metrics.json").read_text())["onnx"]["problem"]
    with pytest.warns(UserWarning, match="ONNX verification failed"):
        lenient = train(compose_cfg(*common, "callbacks.onnx_export.strict=false", output_dir=tmp_path / "lenient"))
    assert lenient["onnx"]["ok"] is False and lenient["onnx"]["checker"] is True


def test_a_run_failed_by_its_export_check_is_failed_in_every_logger(synthetic_root, tmp_path):
    """Exit 1 and status failed in metrics.json, and so in MLflow (read back through MlflowClient) and in
    TensorBoard's HPARAMS row; MLflow's final numbers sit at the run's last step, beside its curves."""
    result = run_cli(tmp_path, f"data.root={synthetic_root}", "device=cpu", "debug=limit", "epochs=1",
                     "logger=[tensorboard,mlflow]", "callbacks.onnx_export.atol=-1", check=False)
    assert result.returncode == 1 and "ONNX verification failed" in result.stderr
    (run,) = (tmp_path / "outputs").glob("20*/*")  # outputs/<date>/<time>; outputs/ also holds MLflow's files
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["global_step"] not in (0, metrics["epochs"])
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    (tracked,) = client.search_runs([client.get_experiment_by_name("fmnist_lab").experiment_id])
    assert tracked.info.status == "FAILED"
    steps = {m.step for m in client.get_metric_history(tracked.info.run_id, "test/acc")}  # the test's and the final's
    assert steps == {metrics["global_step"]}
    (folder,) = {p.parent for p in (run / "tensorboard").rglob("events.out.tfevents.*")}
    assert hparams_entry(folder)[2].status == api_pb2.STATUS_FAILURE


def test_load_model_from_weights_checkpoint_and_refuses_pickles(tiny_trained, tmp_path):
    net, *_ = tiny_trained
    save_weights(net, NET, tmp_path, CLASSES)
    x = torch.rand(5, 1, 28, 28)
    for source in (tmp_path, tmp_path / "model_weights.pth"):
        loaded = load_model(source)
        assert not loaded.training and torch.equal(loaded(x), net(x))
    assert json.loads((tmp_path / "model.json").read_text())["classes"] == list(CLASSES)

    pickled = tmp_path / "pickled" / "model_weights.pth"
    pickled.parent.mkdir()
    torch.save(MLP(), pickled)  # the tutorial's whole-model save
    (pickled.parent / "model.json").write_text((tmp_path / "model.json").read_text())
    with pytest.raises(UnsafeFileError, match=r"could run arbitrary code"):
        load_model(pickled)
    with pytest.raises(FileNotFoundError, match=r"model.json must sit beside it"):
        (tmp_path / "model.json").unlink()
        load_model(tmp_path / "model_weights.pth")


def test_partial_warm_start_and_freeze_options(tmp_path):
    save_weights(MLP(), {"_target_": "fmnist_lab.models.MLP"}, tmp_path, CLASSES)
    narrower = MLP(hidden=[512, 256])
    with pytest.raises(ValueError, match=r"layers.2.weight.*finetune.strict=false"):
        warm_start(narrower, tmp_path)
    # the first layer and the output bias ([10]) match in name and shape; the rest is skipped
    assert warm_start(narrower, tmp_path, strict=False) == ["layers.0.weight", "layers.0.bias", "layers.4.bias"]
    assert freeze(narrower, [0, "layers.4"]) == ["layers.0", "layers.4"]
    assert [p.requires_grad for p in narrower.parameters()] == [False, False, True, True, False, False]
    with pytest.raises(ValueError, match=r"index 3 is out of range; the model has 3 Conv2d/Linear layers"):
        freeze(narrower, [3])
    with pytest.raises(ValueError, match=r"no layer named 'fc1'"):
        freeze(narrower, ["fc1"])


def test_the_cnn_trains_exports_loads_predicts_and_freezes_by_name(synthetic_root, tmp_path, capsys):
    """Everything a run gives the MLP, for the CNN: a trained model, an ONNX export that matches it, weights and
    checkpoints that load back, predictions, and a warm start with a conv block frozen by its module name."""
    small = ["model=cnn", "model.channels=[8,16]", "model.hidden=32"]
    common = [f"data.root={synthetic_root}", "device=cpu", "debug=limit", "epochs=1", "logger=none", *small]
    run = tmp_path / "run"
    metrics = train(compose_cfg(*common, output_dir=run))
    assert metrics["test/acc"] > 0.9 and metrics["onnx"]["ok"] and metrics["onnx"]["max_abs_diff"] <= 1e-4
    assert metrics["params"]["total"] == sum(p.numel() for p in CNN(channels=[8, 16], hidden=32).parameters())

    images, labels = load_split(synthetic_root, "test")
    x = images[:64].unsqueeze(1).float() / 255
    net = load_model(run)
    assert isinstance(net, CNN) and not net.training
    with torch.no_grad():
        expected = net(x)
        assert torch.equal(load_model(run / "checkpoints" / "best.ckpt")(x), expected)
    session = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(["logits"], {"image": x.numpy()})[0], expected.numpy(), atol=1e-4)

    png = tmp_path / "image.png"
    Image.fromarray(images[0].numpy(), mode="L").save(png)
    capsys.readouterr()  # the run's own report
    assert predict_main([f"model={run / 'model.onnx'}", str(png), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["class"] == CLASSES[int(labels[0])]

    assert freeze(CNN(channels=[8, 16], hidden=32), [0, -1]) == ["features.0.0", "head.3"]
    warm = train(compose_cfg(*common, f"finetune.init_from={run}", "finetune.freeze=[features.0]", "callbacks=none",
                             output_dir=tmp_path / "warm"))
    assert warm["params"]["frozen"] == 8 * 9 + 2 * 8  # the first conv and its batch norm's scale and shift
    before = torch.load(run / "model_weights.pth", weights_only=True)
    after = torch.load(tmp_path / "warm" / "model_weights.pth", weights_only=True)
    assert all(torch.equal(after[k], before[k]) for k in ("features.0.0.weight", "features.0.1.weight"))
    assert not torch.equal(after["features.1.0.weight"], before["features.1.0.weight"])


@pytest.mark.slow
def test_evaluate_matches_the_runs_test_accuracy(real_run, tmp_path):
    run, _ = real_run
    recorded = json.loads((run / "metrics.json").read_text())["test/acc"]
    out = run_cli(tmp_path, f"run={run}", "device=cpu", module="fmnist_lab.evaluate").stdout
    accuracy = float(out.split("test/acc ")[1].split()[0])
    assert abs(accuracy - recorded) <= 0.001 and "10,000 test images" in out and "the run recorded" in out
    from_checkpoint = evaluate(run / "checkpoints" / "best.ckpt", device="cpu")  # in-process: quicker
    assert abs(from_checkpoint["test/acc"] - recorded) <= 0.001 and from_checkpoint["count"] == 10_000


@pytest.fixture(scope="module")
def test_pngs(real_root, tmp_path_factory):
    """40 real test images as PNG files named after their true class, plus a corrupt one."""
    folder = tmp_path_factory.mktemp("pngs")
    images, labels = load_split(real_root, "test")
    for i in range(40):
        Image.fromarray(images[i].numpy(), mode="L").save(folder / f"{i:02d}_{int(labels[i])}.png")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("model_file", ["model.onnx", "", "model_weights.pth", "checkpoints/best.ckpt"])
def test_predict_real_images(real_run, test_pngs, capsys, model_file):
    run, _ = real_run
    assert predict_main([f"model={run / model_file}", str(test_pngs), "--json"]) == 0  # in-process: quicker
    predictions = json.loads(capsys.readouterr().out)
    assert len(predictions) == 40 and all(len(p["top_k"]) == 3 for p in predictions)
    correct = sum(CLASSES.index(p["class"]) == int(p["file"].rsplit("_", 1)[1][0]) for p in predictions)
    assert correct >= 32  # a 1-epoch model gets ~85%
    assert all(p["top_k"][0]["probability"] == p["probability"] >= p["top_k"][1]["probability"] for p in predictions)


@pytest.mark.slow
def test_predict_reports_bad_files_and_predicts_the_rest(real_run, test_pngs, tmp_path):
    run, _ = real_run
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    rgb = tmp_path / "big.jpg"
    Image.open(test_pngs / "00_9.png").convert("RGB").resize((64, 64)).save(rgb)
    result = run_cli(tmp_path, f"model={run / 'model.onnx'}", "top_k=2", str(test_pngs / "00_9.png"), str(corrupt),
                     str(tmp_path / "missing.png"), str(rgb), module="fmnist_lab.predict", check=False)
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{test_pngs / '00_9.png'}: Ankle boot") and "(top 2:" in lines[0]
    assert f"error: {corrupt}: not a readable image" in result.stderr
    assert f"error: {tmp_path / 'missing.png'}: no such file" in result.stderr
    assert "converted RGB to grayscale and 64x64 to 28x28" in result.stderr


@pytest.mark.slow
def test_onnx_predict_runs_without_torch(real_run, test_pngs):
    run, _ = real_run
    code = ("import sys; sys.modules['torch'] = None  # any `import torch` now fails\n"
            "from fmnist_lab.predict import main\n"
            f"sys.exit(main(['model={run / 'model.onnx'}', '{test_pngs / '01_2.png'}']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{test_pngs / '01_2.png'}: Pullover")


@pytest.mark.slow
def test_warm_start_with_a_frozen_layer(real_run, tmp_path):
    """From the real run's weights, one short epoch with the first layer frozen: that layer stays bit-identical,
    the others move, and the result beats the same short epoch from scratch."""
    run, _ = real_run
    common = ["device=cpu", "epochs=1", "trainer.limit_train_batches=20", "logger=none", "callbacks=none"]
    warm = train(compose_cfg(*common, f"finetune.init_from={run}", "finetune.freeze=[0]", output_dir=tmp_path / "warm"))
    fresh = train(compose_cfg(*common, output_dir=tmp_path / "fresh"))
    assert warm["params"] == {"total": 669_706, "trainable": 669_706 - 784 * 512 - 512, "frozen": 784 * 512 + 512}
    assert warm["test/acc"] > fresh["test/acc"] + 0.02

    source = torch.load(run / "model_weights.pth", weights_only=True)
    after = torch.load(tmp_path / "warm" / "model_weights.pth", weights_only=True)
    assert torch.equal(after["layers.0.weight"], source["layers.0.weight"])
    assert torch.equal(after["layers.0.bias"], source["layers.0.bias"])
    assert not torch.equal(after["layers.2.weight"], source["layers.2.weight"])


@pytest.mark.parametrize("entry", [
    {"_target_": "builtins.open", "file": "WRITTEN", "mode": "w"},  # instantiating it would create a file
    {"_target_": "fmnist_lab.models.MLP", "hidden": [100_000]},     # 78M parameters: refused, never allocated
    {"_target_": "fmnist_lab.models.MLP", "hidden": [8], "_partial_": True},
])
def test_a_model_file_names_an_architecture_never_code(tmp_path, entry):
    """model.json and a checkpoint's hyperparameters are data: only registered networks, with arguments they
    take and sizes in bounds, are built from them; anything else is one paragraph naming the file."""
    save_weights(MLP(hidden=[8]), {"_target_": "fmnist_lab.models.MLP", "hidden": [8]}, tmp_path, CLASSES)
    description = json.loads((tmp_path / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps({**description, "net": entry}))
    with pytest.raises(UnknownNetworkError, match=str(tmp_path)) as err:
        load_model(tmp_path)
    assert "\n" not in str(err.value) and not (tmp_path / "WRITTEN").exists() and not Path("WRITTEN").exists()

    checkpoint = tmp_path / "crafted.ckpt"
    state = {f"net.{k}": v for k, v in MLP(hidden=[8]).state_dict().items()}
    torch.save({"hyper_parameters": {"net": entry}, "state_dict": state}, checkpoint)
    with pytest.raises(UnknownNetworkError, match="crafted.ckpt"):
        load_model(checkpoint)


def test_a_registered_network_loads_from_its_files(tmp_path):
    class Tiny(torch.nn.Module):
        def __init__(self, width: int = 4) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(784, 10)

        def forward(self, x):
            return self.layer(x.flatten(1))

    register("tests.Tiny", Tiny)
    net = Tiny()
    save_weights(net, {"_target_": "tests.Tiny", "width": 4}, tmp_path, CLASSES)
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(load_model(tmp_path)(x), net(x))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG header for a width x height grayscale image and no pixel data: what PIL's size check reads."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def onnx_without_metadata(path: Path) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((784, 10), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Flatten", ["image"], ["f"]),
                               helper.make_node("MatMul", ["f", "w"], ["logits"])], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 28, 28])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], [weight])
    path.write_bytes(helper.make_model(graph).SerializeToString())
    return path


def onnx_reaching_outside(folder: Path) -> Path:
    """An ONNX file whose weights are external data in ../secret.bin, outside its own folder."""
    from onnx import TensorProto

    model = onnx.load(str(onnx_without_metadata(folder / "plain.onnx")))
    weight = model.graph.initializer[0]
    (folder.parent / "secret.bin").write_bytes(weight.raw_data)
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", str(784 * 10 * 4))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    path = folder / "outside.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def test_predict_names_each_bad_model_file_and_why(tiny_trained, tmp_path, capsys):
    """Random, empty, truncated or foreign model files: one line naming the file and the reason, exit 1."""
    (tmp_path / "onnx").mkdir()
    good_onnx = tiny_trained[1].read_bytes()
    cases = {
        "random.ckpt": (os.urandom(4096), "is not a model file"),
        "empty.ckpt": (b"", "is not a model file"),
        "junk.pth": (b"\x80\x02\x86.", "is not a model file"),  # a pickle that fails with IndexError
        "random.onnx": (os.urandom(4096), "is not an ONNX model ONNX Runtime can load"),
        "truncated.onnx": (good_onnx[: len(good_onnx) // 2], "is not an ONNX model ONNX Runtime can load"),
    }
    image = tmp_path / "shoe.png"
    Image.fromarray(np.zeros((28, 28), np.uint8), mode="L").save(image)
    files = {name: (tmp_path / name, reason) for name, (content, reason) in cases.items()}
    for path, _ in files.values():
        path.write_bytes(cases[path.name][0])
    files["plain.onnx"] = (onnx_without_metadata(tmp_path / "onnx" / "plain.onnx"), "has no fmnist_lab metadata")
    files["outside.onnx"] = (onnx_reaching_outside(tmp_path / "onnx"), "keeps tensors in external data files")
    for path, reason in files.values():
        assert predict_main([f"model={path}", str(image)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path} ") and reason in err and len(err.strip().splitlines()) == 1, err


def test_predict_reports_an_image_bomb_and_odd_file_names_and_predicts_the_rest(tiny_trained, tmp_path):
    _, onnx_path, _, _ = tiny_trained
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(30_000, 30_000))
    odd = Path(os.fsdecode(bytes(tmp_path / "caf") + b"\xe9.png"))  # a name that is not valid UTF-8
    Image.fromarray(np.zeros((28, 28), np.uint8), mode="L").save(odd)
    result = run_cli(tmp_path, f"model={onnx_path}", str(bomb), str(odd), module="fmnist_lab.predict", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "bomb.png: not read: its decoded size is absurd" in result.stderr
    assert len(result.stdout.strip().splitlines()) == 1 and "caf" in result.stdout  # the odd name printed

"""The training techniques (fmnist_lab.techniques): each does what it says on real batches, the model a run
validates, tests and ships is the one the technique made, and a run with them resumes exactly."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import WeightAveraging
from omegaconf import OmegaConf
from PIL import Image

from conftest import compose_cfg, only_run_dir, run_cli
from fmnist_lab.artifacts import load_model
from fmnist_lab.build import build
from fmnist_lab.config import ConfigError, validate
from fmnist_lab.config_schema import with_defaults
from fmnist_lab.data import FashionMNISTDataModule
from fmnist_lab.evaluate import evaluate
from fmnist_lab.models import Classifier, FlipAverage, build_net
from fmnist_lab.techniques import BatchMix, with_warmup
from test_resume import QUICK, start_and_signal

# two short epochs on the real data: enough for the averages and the exports to be what a user gets
REAL = ["device=cpu", "epochs=2", "logger=none", "trainer.limit_train_batches=40", "trainer.limit_val_batches=2"]
MLP = {"_target_": "fmnist_lab.models.MLP", "hidden": [64]}


@pytest.fixture(scope="module")
def real_batch(real_root) -> tuple[torch.Tensor, torch.Tensor]:
    """128 real training images [128, 1, 28, 28] in [0, 1], and their labels."""
    data = FashionMNISTDataModule(root=str(real_root))
    images, labels = data.tensors("train")
    return images[:128].float().div(255).unsqueeze(1), labels[:128]


def net_state(checkpoint: dict, key: str = "state_dict") -> dict[str, torch.Tensor]:
    return {k.removeprefix("net."): v for k, v in checkpoint[key].items() if k.startswith("net.")}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_label_smoothing_spreads_the_training_target_over_all_classes(real_batch):
    x, y = real_batch
    smoothed = Classifier(net=MLP, optimizer={"_target_": "torch.optim.SGD", "_partial_": True},
                          label_smoothing=0.1)
    loss = smoothed.training_step((x, y), 0)
    log_p = F.log_softmax(smoothed.net(x), dim=1)
    expected = 0.9 * F.nll_loss(log_p, y) + 0.1 * (-log_p.mean(dim=1)).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    assert not torch.allclose(loss, F.cross_entropy(smoothed.net(x), y), atol=1e-4)


def test_mixup_blends_two_images_and_their_labels(real_batch):
    x, y = real_batch
    torch.manual_seed(0)
    mixed, target = BatchMix(mixup=1.0, alpha=1.0)(x, y)
    other = y.roll(1, 0)  # torchvision pairs each image with the one before it
    lam = float(target[0, y[0]]) if y[0] != other[0] else None
    assert target.shape == (128, 10) and torch.allclose(target.sum(1), torch.ones(128))
    assert lam is not None and 0 < lam < 1
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.roll(1, 0), atol=1e-6)
    assert torch.allclose(target, lam * F.one_hot(y, 10) + (1 - lam) * F.one_hot(other, 10), atol=1e-6)


def test_cutmix_pastes_a_box_of_another_image_with_labels_weighted_by_its_area(real_batch):
    x, y = real_batch
    torch.manual_seed(1)
    mixed, target = BatchMix(cutmix=1.0)(x, y)
    pasted = (mixed != x) & (mixed == x.roll(1, 0))
    box = pasted.any(0)[0]  # one box for the whole batch
    rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
    assert 0 < box.sum() < 28 * 28 and box.sum() == len(rows) * len(cols)  # a rectangle
    inside = torch.zeros(28, 28, dtype=torch.bool)
    inside[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
    assert torch.equal(mixed[:, :, inside], x.roll(1, 0)[:, :, inside])
    assert torch.equal(mixed[:, :, ~inside], x[:, :, ~inside])
    area = inside.float().mean()
    expected = (1 - area) * F.one_hot(y, 10) + area * F.one_hot(y.roll(1, 0), 10)
    assert torch.allclose(target, expected, atol=1e-6)


def test_mixup_and_cutmix_each_take_their_share_of_the_batches(real_batch):
    x, y = real_batch
    mix = BatchMix(mixup=0.3, cutmix=0.2)
    torch.manual_seed(2)
    kinds = {"mixup": 0, "cutmix": 0, "none": 0}
    for _ in range(600):
        mixed, target = mix(x[:4], y[:4])
        if target.dim() == 1:
            kinds["none"] += 1
        else:
            kinds["cutmix" if ((mixed == x[:4]) | (mixed == x[:4].roll(1, 0))).all() else "mixup"] += 1
    assert abs(kinds["mixup"] / 600 - 0.3) < 0.06 and abs(kinds["cutmix"] / 600 - 0.2) < 0.06
    assert not BatchMix() and BatchMix()(x, y)[1] is y  # off by default: the batch is untouched


def test_warmup_grows_the_rate_linearly_then_the_cosine_decays_it_to_the_last_epoch():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3)
    cosine = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[1] / "conf/scheduler/cosine.yaml"))
    from hydra.utils import instantiate

    scheduler = with_warmup(optimizer, instantiate(cosine), warmup_epochs=2, epochs=lambda: 6)
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    cos = [0.15 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert rates == pytest.approx([0.1, 0.2, *cos])  # lr/3, 2lr/3, then the whole decay over the 4 epochs left
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3)
    assert with_warmup(optimizer, instantiate(cosine), 0, lambda: 6).T_max == 6  # no warmup: the run's epochs


def test_ema_is_what_a_run_validates_tests_and_ships(real_root, tmp_path):
    """Every checkpoint's weights are the average; the raw weights are kept only for resuming. The test and
    model_weights.pth are the best checkpoint's average (Lightning's own callback would test the raw weights)."""
    run_cli(tmp_path, *REAL, "ema.decay=0.9")
    run = only_run_dir(tmp_path)
    best = torch.load(run / "checkpoints/best.ckpt", weights_only=True)
    weights = torch.load(run / "model_weights.pth", weights_only=True)
    assert same(weights, net_state(best)) and not same(weights, net_state(best, "current_model_state"))
    last = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert int(last["averaging_state"]["n_averaged"]) == last["global_step"] == 80  # every step
    metrics = json.loads((run / "metrics.json").read_text())
    assert evaluate(run, str(real_root), "cpu")["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert metrics["onnx"]["ok"] and metrics["test/acc"] > 0.6


def test_swa_averages_from_its_start_epoch_and_ships_the_average(real_root, tmp_path):
    run_cli(tmp_path, *REAL, "epochs=3", "swa.start_epoch=2")
    run = only_run_dir(tmp_path)
    last = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert int(last["averaging_state"]["n_averaged"]) == 2 * 40  # the steps of epochs 2 and 3, not of epoch 1
    assert not same(net_state(last), net_state(last, "current_model_state"))
    best = torch.load(run / "checkpoints/best.ckpt", weights_only=True)
    weights = torch.load(run / "model_weights.pth", weights_only=True)
    assert same(weights, net_state(best))
    metrics = json.loads((run / "metrics.json").read_text())
    assert evaluate(run, str(real_root), "cpu")["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert metrics["onnx"]["ok"]


def test_tta_averages_each_image_with_its_mirror_in_the_test_evaluate_predict_and_onnx(real_root, tmp_path):
    run_cli(tmp_path, *REAL, "tta=true", "model=cnn", "model.channels=[8,16]", "model.hidden=32")
    run = only_run_dir(tmp_path)
    assert json.loads((run / "model.json").read_text())["tta"] is True
    shipped = load_model(run)  # what evaluate and predict use
    plain = build_net(json.loads((run / "model.json").read_text())["net"], "test").eval()
    plain.load_state_dict(torch.load(run / "model_weights.pth", weights_only=True))
    images = FashionMNISTDataModule(root=str(real_root)).tensors("test")[0][:256].float().div(255).unsqueeze(1)
    with torch.no_grad():
        expected = (plain(images) + plain(images.flip(-1))) / 2
        assert isinstance(shipped, FlipAverage) and torch.allclose(shipped(images), expected, atol=1e-5)
        assert not torch.allclose(plain(images), expected, atol=1e-2)
    (onnx_logits,) = ort.InferenceSession(str(run / "model.onnx")).run(["logits"], {"image": images.numpy()})
    assert np.abs(onnx_logits - expected.numpy()).max() < 1e-4  # the graph averages too
    metrics = json.loads((run / "metrics.json").read_text())
    assert evaluate(run, str(real_root), "cpu")["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    for i in range(3):
        Image.fromarray((images[i, 0] * 255).round().byte().numpy()).save(tmp_path / f"{i}.png")
    answers = [json.loads(run_cli(tmp_path, f"model={model}", "--json", *(f"{i}.png" for i in range(3)),
                                  module="fmnist_lab.predict").stdout) for model in (run, run / "model.onnx")]
    probabilities = expected[:3].softmax(1)
    for answer in answers:  # PyTorch and ONNX Runtime: each image's averaged answer
        assert [a["probability"] for a in answer] == pytest.approx(probabilities.max(1).values.tolist(), abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("techniques", [
    ["ema.decay=0.99", "label_smoothing=0.1", "mix.mixup=0.3", "mix.cutmix=0.3", "warmup_epochs=1", "tta=true"],
    ["swa.start_epoch=2", "mix.cutmix=0.5", "warmup_epochs=1"],
], ids=["ema+smoothing+mix+warmup+tta", "swa+cutmix+warmup"])
def test_a_run_with_the_techniques_resumes_exactly(synthetic_root, tmp_path, techniques):
    """Stopped by SIGTERM in the middle of epoch 2 and resumed, a run ends as the uninterrupted one: the
    averager's state, the mixing draws and the warmup schedule all come back from the checkpoint."""
    common = [f"data.root={synthetic_root}", *QUICK, "logger=none", *techniques]
    for folder in ("straight", "stopped"):
        (tmp_path / folder).mkdir()
    run_cli(tmp_path / "straight", *common, "epochs=3")
    stopped = start_and_signal(tmp_path / "stopped", signal.SIGTERM, *common)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    run = only_run_dir(tmp_path / "stopped")
    step = torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"]
    assert 200 < step < 400
    run_cli(tmp_path / "stopped", f"resume={run}")
    straight = only_run_dir(tmp_path / "straight")
    a, b = (json.loads((r / "metrics.json").read_text()) for r in (straight, run))
    assert b["resumed_from_step"] == step and b["global_step"] == a["global_step"] == 600
    assert (a["test/acc"], a["test/loss"], a["val/acc_best"]) == (b["test/acc"], b["test/loss"], b["val/acc_best"])
    for name in ("model_weights.pth", "checkpoints/last.ckpt"):
        state_a, state_b = (torch.load(r / name, weights_only=True) for r in (straight, run))
        if name.endswith(".ckpt"):
            assert same(state_a["current_model_state"], state_b["current_model_state"])
            state_a, state_b = state_a["state_dict"], state_b["state_dict"]
        assert same(state_a, state_b), name


def test_a_run_saved_before_the_techniques_existed_resumes_with_them_off(tmp_path):
    """resume= builds from the run's saved config, which predates these keys: they are added, off."""
    config = OmegaConf.to_container(compose_cfg("device=cpu", output_dir=tmp_path), resolve=False)
    for key in ("ema", "swa", "label_smoothing", "mix", "warmup_epochs", "tta"):
        del config[key]
    _, model, trainer = build(with_defaults(OmegaConf.create(config)))
    assert not any(isinstance(c, WeightAveraging) for c in trainer.callbacks) and not model.mix
    assert (model.hparams.label_smoothing, model.hparams.warmup_epochs, model.hparams.tta) == (0.0, 0, False)


@pytest.mark.parametrize("overrides, key", [
    (["ema.decay=1.5"], "ema.decay"),
    (["ema.decay=0.99", "swa.start_epoch=2"], "ema.decay=0.99 and swa.start_epoch=2"),
    (["swa.start_epoch=0"], "swa.start_epoch"),
    (["epochs=3", "swa.start_epoch=4"], "swa.start_epoch"),
    (["label_smoothing=1.0"], "label_smoothing"),
    (["mix.mixup=0.7", "mix.cutmix=0.5"], "mix.mixup=0.7 and mix.cutmix=0.5"),
    (["mix.cutmix=-0.1"], "mix.cutmix"),
    (["mix.alpha=0"], "mix.alpha"),
    (["epochs=3", "warmup_epochs=3"], "warmup_epochs"),
])
def test_technique_settings_that_cannot_work_are_refused_with_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"Invalid config: {key}"):
        validate(compose_cfg(*overrides))

"""Training is Lightning's: the same math as a plain loop, and every Trainer feature a Lightning user expects
(clipping, accumulation, mixed precision, callbacks on each step) works on the real pipeline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import compose_cfg
from fmnist_lab.build import build
from fmnist_lab.callbacks import RunResults
from fmnist_lab.data import DeviceLoader, FashionMNISTDataModule
from fmnist_lab.gpu_step import CudaGraphs
from fmnist_lab.models import Classifier
from fmnist_lab.train import train

ROOT = Path(__file__).resolve().parents[1]
SGD = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.05, "momentum": 0.9}
NET = {"_target_": "fmnist_lab.models.MLP", "hidden": [64]}


def fit(root: Path, steps: int, **trainer_options) -> tuple[Classifier, torch.nn.Module, tuple, pl.Trainer]:
    """A small model trained `steps` batches by Lightning, a copy of its starting weights, and the train split."""
    torch.manual_seed(0)
    model = Classifier(NET, SGD)
    start = Classifier(NET, SGD).net
    start.load_state_dict(model.net.state_dict())
    dm = FashionMNISTDataModule(root=str(root), batch_size=32, seed=7)
    train_split = dm.tensors("train")  # fit releases it at the end
    options = dict(accelerator="cpu", max_epochs=1, limit_train_batches=steps, limit_val_batches=0, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = pl.Trainer(**{**options, **trainer_options})
    trainer.fit(model, datamodule=dm)
    return model, start, train_split, trainer


def batches(train_split: tuple, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `count` training batches of epoch 0, as the data module serves them (seed 7, batch 32)."""
    return [b for _, b in zip(range(count), DeviceLoader(lambda: train_split, 32, shuffle=True, seed=7), strict=False)]


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=atol, msg=name)


def test_training_is_the_plain_loop_on_the_same_batches(synthetic_root):
    """Lightning + device-resident batches + the device-side loss sums end with the same weights as the
    textbook loop over the same batches: nothing in the pipeline changes the math."""
    model, net, train_split, trainer = fit(synthetic_root, 25)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for x, y in batches(train_split, 25):
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
    assert_same_weights(model.net, net, atol=1e-6)
    assert trainer.global_step == 25


def test_gradient_clipping_is_lightnings(synthetic_root):
    model, net, train_split, trainer = fit(synthetic_root, 10, gradient_clip_val=0.05)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for x, y in batches(train_split, 10):
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.05)
        optimizer.step()
    assert_same_weights(model.net, net, atol=1e-6)


class StepGradientNorms(pl.Callback):
    """The total norm of the gradients each optimizer step uses: read as the step starts, after clipping."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def record(optimizer, args, kwargs) -> None:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            self.norms.append(float(torch.nn.utils.get_total_norm(grads)))

        trainer.optimizers[0].register_step_pre_hook(record)


@pytest.mark.parametrize("clip", [0.01, None])
def test_gradient_clipping_from_the_config_bounds_every_step(synthetic_root, tmp_path, clip):
    """trainer.gradient_clip_val as a user sets it on the command line reaches the Trainer: every step's
    gradients have at most that norm; without it the same steps' gradients are larger."""
    cfg = compose_cfg("device=cpu", "epochs=1", "logger=none", "callbacks=none", f"data.root={synthetic_root}",
                      "trainer.limit_train_batches=10", "trainer.limit_val_batches=0",
                      f"trainer.gradient_clip_val={'null' if clip is None else clip}", output_dir=tmp_path)
    norms = StepGradientNorms()
    datamodule, model, trainer = build(cfg, None, norms)
    trainer.fit(model, datamodule=datamodule)
    assert len(norms.norms) == 10
    if clip is None:
        assert max(norms.norms) > 0.05  # so the clipped run's bound is the clipping's doing
    else:
        assert max(norms.norms) <= clip * (1 + 1e-4)


def test_every_trainer_key_of_the_config_reaches_the_trainer(tmp_path):
    """conf/trainer/ passes its keys to lightning.pytorch.Trainer: each, set away from its default, is what the
    built Trainer has."""
    values = {"max_epochs": 3, "log_every_n_steps": 7, "check_val_every_n_epoch": 2, "gradient_clip_val": 0.5,
              "gradient_clip_algorithm": "value", "accumulate_grad_batches": 3, "limit_train_batches": 11,
              "limit_val_batches": 0.5, "limit_test_batches": 4, "overfit_batches": 0.0, "precision": "bf16-mixed"}
    cfg = compose_cfg("device=cpu", *(f"trainer.{k}={v}" for k, v in values.items()), output_dir=tmp_path)
    _, _, trainer = build(cfg)
    built = {k: getattr(trainer, k) for k in values}
    built["gradient_clip_algorithm"] = str(built["gradient_clip_algorithm"].value)
    assert built == values
    assert set(OmegaConf.to_container(cfg.trainer)) - {"_target_", "accelerator", "devices", "default_root_dir",
                                                       "deterministic", "fast_dev_run"} == set(values)


def test_gradient_accumulation_is_lightnings(synthetic_root):
    """accumulate_grad_batches=3: one optimizer step per 3 batches, on the mean of their gradients."""
    model, net, train_split, trainer = fit(synthetic_root, 12, accumulate_grad_batches=3)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for i, (x, y) in enumerate(batches(train_split, 12)):
        (F.cross_entropy(net(x), y) / 3).backward()
        if i % 3 == 2:
            optimizer.step()
            optimizer.zero_grad()
    assert_same_weights(model.net, net, atol=1e-6)
    assert trainer.global_step == 4


class CountOptimizerSteps(RunResults):
    """A callback on Lightning's per-step hook; its count lands in metrics.json (a RunResults' `metrics`)."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics = {"optimizer_steps_seen": 0}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.metrics["optimizer_steps_seen"] += 1


@pytest.mark.slow
@pytest.mark.parametrize("feature", [
    "trainer.accumulate_grad_batches=2",
    "trainer.precision=bf16-mixed",
    "trainer.gradient_clip_val=1.0",
    "+callbacks.count_steps._target_=test_training.CountOptimizerSteps",
])
def test_trainer_features_train_a_real_run(real_root, tmp_path, feature):
    """Each feature, from the command line's config, trains the real data to a sane accuracy."""
    metrics = train(compose_cfg("device=cpu", "epochs=1", "trainer.limit_train_batches=150", "logger=none",
                                "~callbacks.onnx_export", feature, output_dir=tmp_path))
    assert metrics["test/acc"] > 0.78, metrics["test/acc"]
    steps = 75 if "accumulate" in feature else 150
    assert metrics["global_step"] == steps
    if "precision" in feature:
        assert metrics["precision"] == "bf16-mixed"
    if "count_steps" in feature:
        assert metrics["optimizer_steps_seen"] == steps


def test_cuda_graphs_without_a_cuda_device_train_eagerly_after_one_warning(synthetic_root):
    torch.manual_seed(0)
    model, graphs = Classifier(NET, SGD), CudaGraphs()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=5, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[graphs])
    with pytest.warns(UserWarning, match=r"gpu.cuda_graphs=true, but the batch is not on a CUDA device") as caught:
        trainer.fit(model, datamodule=FashionMNISTDataModule(root=str(synthetic_root), batch_size=32))
    assert sum("cuda_graphs" in str(w.message) for w in caught) == 1 and trainer.global_step == 5
    assert graphs.metrics == {"cuda_graphs": False}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh runs it on one)")
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_cuda_graphs_train_like_the_eager_step_on_gpu(synthetic_root, optimizer):
    """The captured forward + backward (full batches replayed, the partial last batch eager) ends where the eager
    step ends, with fused and unfused optimizers alike."""
    opt = SGD if optimizer == "sgd" else {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}
    nets = []
    for callbacks in ([CudaGraphs()], []):
        torch.manual_seed(0)
        model = Classifier(NET, opt, fused_optimizer=optimizer == "adam")
        dm = FashionMNISTDataModule(root=str(synthetic_root), batch_size=1024, seed=7)
        trainer = pl.Trainer(accelerator="gpu", devices=1, max_epochs=2, limit_val_batches=0, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=callbacks)
        trainer.fit(model, datamodule=dm)
        nets.append(model.net.cpu())
        assert trainer.global_step == 2 * 54  # 53 full batches of 1024 + a partial one per epoch
    assert_same_weights(*nets, atol=1e-4)


@pytest.mark.slow
def test_bench_script_runs_and_prints_the_table(real_root, tmp_path):
    out = tmp_path / "bench.md"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--device", "cpu", "--epochs", "2",
                             "--limit", "5", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| (")]
    assert [row.split("|")[1].strip()[:3] for row in rows] == ["(a)", "(b)", "(c)", "(e)"]
    accuracy = {}
    for row in rows:
        cells = [c.strip() for c in row.split("|")[2:-1]]
        assert float(cells[0]) > 0 and cells[2].endswith("x")
        assert 0 < float(cells[5]) <= float(cells[6])  # peak RSS while running, then with the exit
        accuracy[row.split("|")[1].strip()[:3]] = float(cells[-1])
    # (b), (c) and (e) train the same recipe (SGD, lr 0.05, momentum 0.9): 10 steps take each well above chance
    # (0.1), to about the same place; the seed loop's lr=1e-3 without momentum barely moves in 10 steps
    assert all(abs(accuracy[p] - accuracy["(c)"]) < 0.05 for p in ("(b)", "(e)")) and accuracy["(c)"] > 0.4
    assert 0.05 < accuracy["(a)"] < accuracy["(c)"]
    assert "| (c) raw PyTorch loop, device-resident batches | " in out.read_text() and "1.00x" in rows[2]


def test_a_key_of_metrics_json_has_one_writer():
    """A RunResults callback that gives a key the run (or another callback) gives already is a bug, said at once,
    never a silent overwrite."""
    from fmnist_lab.callbacks import RunResults
    from fmnist_lab.results import take_results

    first, second = RunResults(), RunResults()
    first.metrics, first.files = {"onnx": {"ok": True}}, [Path("model.onnx")]
    second.metrics, second.error = {"test/macro_f1": 0.9}, "a check failed"
    metrics = {"test/acc": 0.9}
    files, errors = take_results([first, second], metrics, [Path("metrics.json")])
    assert metrics == {"test/acc": 0.9, "onnx": {"ok": True}, "test/macro_f1": 0.9}
    assert files == [Path("metrics.json"), Path("model.onnx")] and errors == ["a check failed"]
    clash = RunResults()
    clash.metrics = {"test/acc": 1.0}
    with pytest.raises(RuntimeError, match="gives test/acc, which the run or another callback gives already"):
        take_results([clash], metrics, [])


@pytest.mark.parametrize(("overrides", "task"), [
    (None, "train"), ([], "train"), (["experiment=cnn", "trainer.limit_train_batches=30"], "train"),
    (["debug=limit"], "debug"), (["+debug=overfit", "lr=0.1"], "debug"), (["debug=null"], "train"),
    ("damaged: [", "train")])
def test_the_task_is_debug_for_a_run_started_with_a_debug_option(tmp_path, overrides, task):
    """metrics.json's `task` comes from the run's own .hydra/overrides.yaml (a resumed run keeps its first
    overrides there), not from a key each config sets."""
    from fmnist_lab.provenance import task as task_of
    from fmnist_lab.run_dir import RunDir

    run = RunDir(tmp_path)
    if overrides is not None:
        run.hydra.mkdir()
        run.overrides.write_text(overrides if isinstance(overrides, str) else "".join(f"- {o}\n" for o in overrides))
    assert task_of(run) == task

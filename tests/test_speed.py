"""The fast path computes the same thing as a plain loop, and the benchmark script keeps working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.core.optimizer import LightningOptimizer

from conftest import compose_cfg
from fmnist_lab.config import ConfigError, validate
from fmnist_lab.data import DeviceBatches, FashionMNISTDataModule
from fmnist_lab.model import CapturedStep, CaptureError, Classifier

ROOT = Path(__file__).resolve().parents[1]
SGD = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.05, "momentum": 0.9}


def plain_loop(net, images, labels, steps: int, lr: float, seed: int) -> None:
    """The textbook loop over the same batches the data module serves."""
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    for i, (x, y) in enumerate(DeviceBatches(images, labels, 32, shuffle=True, seed=seed)):
        if i == steps:
            break
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("group", [1, 8])
def test_fast_path_matches_a_plain_eager_loop(synthetic_root, group):
    """Lightning + device-resident batches (grouped or not) + device-side loss sums end with the same weights
    as the textbook loop over the same batches: the speed-ups change no math."""
    steps = 25  # with groups of 8: three whole groups and a partial one
    torch.manual_seed(0)
    model = Classifier({"_target_": "fmnist_lab.model.MLP", "hidden": [64]}, SGD, log_every_n_steps=10)
    plain_net = Classifier(model.hparams.net, SGD).net
    plain_net.load_state_dict(model.net.state_dict())

    dm = FashionMNISTDataModule(root=str(synthetic_root), batch_size=32, seed=7, group_batches=group)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=steps, limit_val_batches=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    dm.setup("fit")
    train = dm.splits["train"]  # fit releases it at the end
    trainer.fit(model, datamodule=dm)
    plain_loop(plain_net, *train, steps, lr=0.05, seed=7)

    assert_same_weights(model.net, plain_net, atol=1e-6)
    assert trainer.global_step == steps and trainer.num_training_batches == -(-steps // group)
    assert model.direct  # nothing hooks into the step, so it bypassed Lightning's wrappers


def test_gradient_clipping_clips_every_step(synthetic_root):
    """trainer.gradient_clip_val reaches the model's own step: same weights as clip_grad_norm_ in a plain loop."""
    torch.manual_seed(0)
    model = Classifier({"_target_": "fmnist_lab.model.MLP", "hidden": [64]}, SGD, gradient_clip_val=0.05)
    plain_net = Classifier(model.hparams.net, SGD).net
    plain_net.load_state_dict(model.net.state_dict())
    dm = FashionMNISTDataModule(root=str(synthetic_root), batch_size=32, seed=7, group_batches=8)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=10, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    dm.setup("fit")
    train = dm.splits["train"]  # fit releases it at the end
    trainer.fit(model, datamodule=dm)

    optimizer = torch.optim.SGD(plain_net.parameters(), lr=0.05, momentum=0.9)
    for _, (x, y) in zip(range(10), DeviceBatches(*train, 32, shuffle=True, seed=7), strict=False):
        optimizer.zero_grad()
        F.cross_entropy(plain_net(x), y).backward()
        torch.nn.utils.clip_grad_norm_(plain_net.parameters(), 0.05)
        optimizer.step()
    assert not model.direct and trainer.global_step == 10
    assert_same_weights(model.net, plain_net, atol=1e-6)


def test_callbacks_with_step_hooks_are_called_on_every_step(synthetic_root):
    class CountSteps(Callback):
        calls = 0

        def on_before_optimizer_step(self, *args) -> None:
            self.calls += 1

    counter = CountSteps()
    model = Classifier({"_target_": "fmnist_lab.model.MLP", "hidden": [64]}, SGD)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=12, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[counter])
    trainer.fit(model, datamodule=FashionMNISTDataModule(root=str(synthetic_root), batch_size=32, group_batches=8))
    assert not model.direct and counter.calls == trainer.global_step == 12


def test_groups_hold_every_batch_once_in_order():
    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1).expand(100, 28, 28).contiguous()
    labels = torch.arange(100)
    flat = list(DeviceBatches(images, labels, 8, shuffle=True, seed=3))
    groups = list(DeviceBatches(images, labels, 8, shuffle=True, seed=3, group=4))
    assert [len(g) for g in groups] == [4, 4, 4, 1] and len(DeviceBatches(images, labels, 8, group=4)) == 4
    for (x, y), (gx, gy) in zip(flat, [b for g in groups for b in g], strict=True):
        assert torch.equal(x, gx) and torch.equal(y, gy)
    # `limit` counts batches, not groups; a resumed epoch skips the batches already trained
    limited = DeviceBatches(images, labels, 8, shuffle=True, seed=3, group=4, limit=6)
    assert len(limited) == 2 and [len(g) for g in limited] == [4, 2]
    resumed = DeviceBatches(images, labels, 8, shuffle=True, seed=3, group=4, batches_done=lambda: 8)
    assert torch.equal(torch.cat([y for g in resumed for _, y in g]), torch.cat([y for _, y in flat[8:]]))


@pytest.mark.parametrize(("override", "message"), [
    ("trainer.cuda_graphs=on", "CUDA graphs need a CUDA GPU"),
    ("trainer.cuda_graphs=maybe", "Use auto"),
    ("trainer.cuda_graphs=on trainer.gradient_clip_val=1.0", "gradient_clip_val is set"),
    ("+trainer.accumulate_grad_batches=4", "raise batch_size instead"),
    ("data.group_batches=0", "an integer >= 1"),
])
def test_step_settings_that_cannot_work_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg("device=cpu", *override.split()))


def test_a_step_that_cannot_be_captured_names_the_switch(monkeypatch):
    """A network that needs the host (e.g. `.item()`) fails inside the CUDA graph capture; the run then stops
    with one paragraph that names trainer.cuda_graphs=off, not with CUDA's message alone. (CPU: the capture
    itself is replaced by one that fails as CUDA's does.)"""
    class FailingCapture:
        def __enter__(self):
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\n"
                               "CUDA kernel errors might be asynchronously reported at some other API call.")

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph: FailingCapture())
    model = Classifier({"_target_": "fmnist_lab.model.MLP", "hidden": [16]}, SGD)
    step = CapturedStep(model, LightningOptimizer(torch.optim.SGD(model.parameters(), lr=0.05)))
    message = r"not permitted when stream is capturing\. .*trainer\.cuda_graphs=off"
    with pytest.raises(CaptureError, match=message) as err:
        step.capture(torch.rand(4, 1, 28, 28), torch.zeros(4, dtype=torch.long), [0.05])
    assert "\n" not in str(err.value)  # one paragraph; CUDA's advice lines stay in the chained exception


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the lent GPU machine)")
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_cuda_graph_step_matches_the_eager_step_on_gpu(synthetic_root, optimizer):
    """The captured step (warm-up, capture, replays, eager partial last batch, a new capture when the cosine
    schedule changes the rate) ends where the eager path ends, and counts the same steps."""
    opt = SGD if optimizer == "sgd" else {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}
    cosine = {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "_partial_": True, "T_max": 2}
    nets, steps = [], []
    for graphs in ("on", "off"):
        torch.manual_seed(0)
        model = Classifier({"_target_": "fmnist_lab.model.MLP", "hidden": [64]}, opt, cosine, log_every_n_steps=10,
                           cuda_graphs=graphs)
        dm = FashionMNISTDataModule(root=str(synthetic_root), batch_size=1024, seed=7, group_batches=8)
        trainer = pl.Trainer(accelerator="gpu", devices=1, max_epochs=2, limit_val_batches=0, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(model, datamodule=dm)
        assert (model.graph is not None) == (graphs == "on")
        nets.append(model.net.cpu())
        steps.append(trainer.global_step)
    assert steps[0] == steps[1] == 2 * 54  # 53 full batches of 1024 + a partial one per epoch
    assert_same_weights(*nets, atol=1e-5 if optimizer == "sgd" else 1e-4)


@pytest.mark.slow
def test_bench_script_runs_and_prints_the_table(real_root, tmp_path):
    out = tmp_path / "bench.md"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--device", "cpu", "--epochs", "2",
                             "--limit", "5", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| (")]
    assert [row.split("|")[1].strip()[:3] for row in rows] == ["(a)", "(b)", "(c)", "(e)"]
    for row in rows:
        cells = [c.strip() for c in row.split("|")[2:-1]]
        assert float(cells[0]) > 0 and cells[2].endswith("x") and 0 <= float(cells[-1]) <= 1
        assert 0 < float(cells[5]) <= float(cells[6])  # peak RSS while running, then with the exit
    assert "| (c) raw PyTorch loop, device-resident batches | " in out.read_text() and "1.00x" in rows[2]

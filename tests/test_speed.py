"""The fast path computes the same thing as a plain loop, and the benchmark script keeps working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from fmnist_lab.data import DeviceBatches, FashionMNISTDataModule
from fmnist_lab.model import Classifier

ROOT = Path(__file__).resolve().parents[1]
SGD = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.05, "momentum": 0.9}


def test_fast_path_matches_a_plain_eager_loop(synthetic_root):
    """Lightning + device-resident batches + device-side loss sums end with the same weights as the textbook
    loop over the same batches: the speed-ups change no math."""
    steps = 25
    torch.manual_seed(0)
    model = Classifier({"_target_": "fmnist_lab.model.MLP", "hidden": [64]}, SGD, log_every_n_steps=10)
    plain_net = Classifier(model.hparams.net, SGD).net
    plain_net.load_state_dict(model.net.state_dict())

    dm = FashionMNISTDataModule(root=str(synthetic_root), batch_size=32, seed=7)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=steps, limit_val_batches=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, datamodule=dm)

    images, labels = dm.splits["train"]
    optimizer = torch.optim.SGD(plain_net.parameters(), lr=0.05, momentum=0.9)
    for i, (x, y) in enumerate(DeviceBatches(images, labels, 32, shuffle=True, seed=7)):
        if i == steps:
            break
        optimizer.zero_grad()
        F.cross_entropy(plain_net(x), y).backward()
        optimizer.step()

    for (name, fast), slow in zip(model.net.state_dict().items(), plain_net.state_dict().values(), strict=True):
        torch.testing.assert_close(fast, slow, rtol=0, atol=1e-6, msg=name)
    assert trainer.global_step == steps


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
    assert "| (c) raw PyTorch loop, device-resident batches | " in out.read_text() and "1.00x" in rows[2]

"""Bad input stops a run before any work, with one paragraph naming the key or file, and exit code 1."""

from __future__ import annotations

import json

import pytest

from conftest import compose_cfg, run_cli

BAD_CONFIG = [
    ("epochs=0", "epochs=0", "at least 1"),
    ("epochs=ten", "full_key: epochs", "could not be converted to Integer"),
    ("lr=-0.1", "lr=-0.1", "finite number > 0"),
    ("lr=nan", "lr=nan", "finite number > 0"),
    ("optimizer.lr=0", "optimizer.lr=0", "finite number > 0"),
    ("batch_size=0", "batch_size=0", "from 1 to the 55,000 training images"),
    ("batch_size=70000", "batch_size=70000", "from 1 to the 55,000 training images"),
    ("data.val_size=60000", "data.val_size=60000", "1..59999"),
    ("device=tpu", "device='tpu'", "auto, cpu, gpu"),
    ("optimizer=sgdd", "Could not find 'optimizer/sgdd'", "adam\n\tadamw\n\tsgd"),
    ("data.backend=disk", "data.backend='disk'", "data.backend=device"),
    ("data.augment.flip=2", "data.augment.flip=2", "a probability from 0 to 1"),
    ("trainer.precision=8-bit", "trainer.precision='8-bit'", "bf16-mixed"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0", "an integer >= 1"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1", "a positive number"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0", "an integer >= 1"),
    ("gpu.cuda_graphs=true", "gpu.cuda_graphs=True", "need a CUDA GPU"),
    ("gpu.cuda_graphs=maybe", "gpu.cuda_graphs", "Value 'maybe' is not a valid bool"),
    ("seed=-1", "seed=-1", "from 0 to 2**32 - 1"),
    ("seed=4294967296", "seed=4294967296", "from 0 to 2**32 - 1"),
    ("optimizer.momentum=1.0", "optimizer.momentum=1.0", "0 <= optimizer.momentum < 1"),
    ("trainer.devices=2", "trainer.devices=2", "add trainer=ddp"),
    ("finetune.init_from=nowhere", "finetune.init_from='nowhere'", "give a run directory, a .ckpt or a .pth"),
]
# Checked when the network is built, still before any data is read (in-process: the CLI path is the one above)
BAD_NETWORK = [
    ("model.hidden=[512,0]", r"model.hidden=\[512, 0\] .*widths from 1 to 16384"),
    ("model.hidden=[100000]", r"model.hidden=\[100000\] .*widths from 1 to 16384"),
    ("model.dropout=1.5", r"model.dropout=1.5 .*0 <= dropout < 1"),
    ("+model.hiden=[64]", r"takes no argument 'hiden' \(it takes hidden, activation"),
    ("finetune.freeze=[3]", r"finetune.freeze: index 3 is out of range; the model has 3 Conv2d/Linear layers"),
    ("model=cnn model.channels=[8,8,8,8,8]", r"model.channels=\[8, 8, 8, 8, 8\] .*a list of 1 to 4 widths"),
    ("model=cnn model.convs_per_block=0", r"model.convs_per_block=0 .*an integer from 1 to 8"),
    ("model=cnn finetune.freeze=[features.9]", r"no layer named 'features.9'; .* features.0.0, features.1.0"),
]


@pytest.mark.parametrize(("override", "names", "explains"), BAD_CONFIG, ids=[b[0] for b in BAD_CONFIG])
def test_bad_config_is_one_clear_error(tmp_path, override, names, explains):
    result = run_cli(tmp_path, override, "device=cpu" if "device" not in override else "seed=1", check=False)
    assert result.returncode == 1
    assert names in result.stderr and explains in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not list(tmp_path.rglob(".hydra"))  # nothing ran: no run folder for `fmnist_lab.runs` to list


def test_a_config_error_answers_before_torch_and_lightning_load(tmp_path):
    """Loading them takes seconds (Lightning alone 9-16 s on a 2-core machine): a typo is told at once."""
    result = run_cli(tmp_path, "epochs=0", check=False, blocked=("torch", "lightning"))
    assert result.returncode == 1 and "epochs=0" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(("override", "message"), BAD_NETWORK, ids=[b[0] for b in BAD_NETWORK])
def test_bad_network_settings_are_one_clear_error_before_any_data(tmp_path, override, message):
    from fmnist_lab.build import build
    from fmnist_lab.config import ConfigError

    with pytest.raises(ConfigError, match=message) as err:
        build(compose_cfg("device=cpu", "data.root=/nonexistent", *override.split(), output_dir=tmp_path))
    assert "\n" not in str(err.value)


def test_gpu_without_a_gpu_is_an_error_not_a_cpu_run(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU, so device=gpu is valid here")
    result = run_cli(tmp_path, "device=gpu", check=False)
    assert result.returncode == 1 and "device='gpu'" in result.stderr and "device=cpu" in result.stderr
    assert "Traceback" not in result.stderr


def test_diverging_run_stops_early_and_is_marked_failed(synthetic_root, tmp_path):
    result = run_cli(tmp_path, f"data.root={synthetic_root}", "lr=1e4", "epochs=5", "device=cpu", "logger=none",
                     "~callbacks.onnx_export", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "training loss became nan by step 50 (epoch 0)" in result.stderr and "smaller `lr`" in result.stderr
    (metrics_file,) = (tmp_path / "outputs").rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["status"] == "failed" and "FloatingPointError" in metrics["error"]

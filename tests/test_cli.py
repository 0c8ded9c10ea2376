"""The real CLI on the real data set, run the way a user runs it: a subprocess in another directory."""

from __future__ import annotations

import csv
import errno
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from conftest import compose_cfg, only_run_dir, run_cli
from fmnist_lab.build import plain
from fmnist_lab.data import CLASSES
from fmnist_lab.lr_find_plot import lr_find_figure, run_title


@pytest.mark.slow
def test_one_epoch_on_real_data_writes_the_whole_contract(real_run):
    run, result = real_run

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test/acc"] >= 0.80
    assert metrics["epochs"] == 1 and metrics["seed"] == 42 and metrics["device"] == "cpu"
    assert metrics["precision"] == "32-true" and metrics.get("status", "ok") == "ok"
    assert 0 < metrics["train_seconds"] < 600 and metrics["val/acc_best"] >= 0.80
    assert f"test/acc {metrics['test/acc']:.4f}" in result.stdout and "tensorboard --logdir" in result.stdout

    for name in ("best.ckpt", "last.ckpt"):
        checkpoint = torch.load(run / "checkpoints" / name, weights_only=True)
        assert checkpoint["hyper_parameters"]["net"]["hidden"] == [512, 512]
    weights = torch.load(run / "model_weights.pth", weights_only=True)
    assert set(weights) == {f"layers.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    assert metrics["onnx"]["ok"] and metrics["onnx"]["max_abs_diff"] <= 1e-4 and (run / "model.onnx").is_file()
    assert metrics["params"] == {"total": 669_706, "trainable": 669_706, "frozen": 0}
    assert metrics["best_checkpoint"] == "checkpoints/best.ckpt"  # relative: the run can move
    assert (run / ".hydra" / "config.yaml").is_file() and (run / ".hydra" / "overrides.yaml").is_file()

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/acc", "test/loss", "test/acc", "train/lr"} <= scalars
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == [*range(50, 430, 50), 430]  # 55,000 / 128 -> 430 steps: every 50, and the epoch's rest
    assert events.Scalars("test/acc")[-1].value == pytest.approx(metrics["test/acc"])
    # the report: per-class accuracies (the easy classes far above the hard ones), F1, calibration, figures
    per_class = metrics["test/per_class_acc"]
    assert list(per_class) == list(CLASSES) and per_class["Trouser"] > 0.9 > per_class["Shirt"]
    assert 0.75 < metrics["test/macro_f1"] < 1 and 0 < metrics["test/ece"] < 0.1
    assert (run / "confusion_matrix.png").is_file() and (run / "misclassified.png").is_file()

    # piped, the console shows each epoch's line once and no bar; the log file keeps those lines and the result
    (epoch,) = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    (final,) = [line for line in result.stdout.splitlines() if line.startswith("test/acc ")]
    assert re.fullmatch(r"epoch 1/1: val/acc 0\.\d{4} val/loss \d\.\d{4} \(\d+\.\d s\)", epoch)
    assert "━" not in result.stdout + result.stderr and (result.stdout + result.stderr).count(epoch) == 1
    log = (run / "fmnist_lab.log").read_text().splitlines()
    for line in (epoch, final):
        assert sum(entry.endswith(f"[fmnist_lab.results][INFO] - {line}") for entry in log) == 1, log
    # the code that ran: this checkout's commit, and whether it had uncommitted changes then
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True).stdout

    assert metrics["git"] == {"commit": git("rev-parse", "HEAD").strip(),
                              "dirty": bool(git("status", "--porcelain", "--untracked-files=no").strip())}
    # TensorBoard's HPARAMS tab: the knobs a user sweeps, not the config's paths and _target_ names
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = set(plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams)
    assert {"lr", "batch_size", "epochs", "seed", "model", "model/hidden", "optimizer", "optimizer/momentum",
            "scheduler", "data/augment/flip", "trainer/precision"} <= hparams
    assert len(hparams) < 40 and not [h for h in hparams if "_target_" in h or "dir" in h or "root" in h]


@pytest.mark.slow
def test_lr_find_suggests_a_rate_and_saves_its_plot(real_root, tmp_path):
    result = run_cli(tmp_path, "tune=lr_find", "device=cpu", "optimizer=adam")
    run = only_run_dir(tmp_path)
    found = json.loads((run / "lr_find.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    # 100 rates, unless the loss blew up first (Adam does towards lr=1)
    assert 20 < len(found["lr"]) == len(found["loss"]) == metrics["steps"] <= 100
    assert 1e-6 <= found["suggestion"] == metrics["lr_suggestion"] <= 1.0 and found["lr"][0] == pytest.approx(1e-6)
    rate = f"{found['suggestion']:.3g}"
    assert f"suggested lr: {rate} " in result.stdout
    assert f"train with it: python -m fmnist_lab lr={rate} device=cpu optimizer=adam" in result.stdout
    assert "Finding best initial lr" not in result.stderr  # Lightning's tqdm bar stays off a pipe
    with Image.open(run / "lr_find.png") as png:
        assert png.format == "PNG" and png.size[0] > 300
        assert png.text["Title"] == "lr_find: MLP hidden=[512, 512], Adam"  # drawn by lr_find_figure
    assert not list(run.glob("checkpoints/*")) and not list(run.glob(".lr_find*"))  # nothing trained is kept
    listing = run_cli(tmp_path, module="fmnist_lab.runs").stdout
    assert f"lr_find: {run.relative_to(tmp_path)}: suggested lr {rate}" in listing

    # Lightning's own numbers, kept in lr_find.json, start at half the untrained network's loss; the plotted
    # curve starts flat at it (ln 10 for 10 classes), which is how the debiasing finds this Lightning's smoothing
    assert found["loss"][0] < 0.6 * found["loss"][10]
    (curve, *_) = lr_find_figure(found, found["suggestion"], "MLP, Adam").axes[0].lines
    assert abs(curve.get_ydata()[0] - math.log(10)) < 0.1 and max(curve.get_ydata()[:10]) < 1.02 * math.log(10)


# What Lightning's finder recorded (results["loss"], 4 digits) for the MLP with SGD (momentum 0.9) on the real
# data, 100 rates from 1e-6 to 1: its smoothing halves the first value and reaches the true level only slowly.
RECORDED_LOSSES = [
    1.1654, 1.5491, 1.7456, 1.8560, 1.9355, 1.9926, 2.0361, 2.0660, 2.0924, 2.1147, 2.1321, 2.1462, 2.1582, 2.1698,
    2.1792, 2.1872, 2.1947, 2.2012, 2.2080, 2.2135, 2.2184, 2.2232, 2.2284, 2.2318, 2.2350, 2.2375, 2.2410, 2.2440,
    2.2464, 2.2485, 2.2499, 2.2515, 2.2530, 2.2552, 2.2564, 2.2575, 2.2587, 2.2599, 2.2609, 2.2615, 2.2622, 2.2630,
    2.2646, 2.2653, 2.2662, 2.2663, 2.2667, 2.2666, 2.2663, 2.2658, 2.2652, 2.2646, 2.2633, 2.2621, 2.2605, 2.2586,
    2.2564, 2.2536, 2.2510, 2.2470, 2.2418, 2.2371, 2.2305, 2.2243, 2.2171, 2.2085, 2.1973, 2.1845, 2.1687, 2.1505,
    2.1318, 2.1096, 2.0849, 2.0586, 2.0297, 2.0042, 1.9778, 1.9541, 1.9218, 1.9019, 1.8949, 1.9151, 1.9337, 1.9281,
    1.9221, 1.9054, 1.8949, 1.8777, 1.8597, 1.8443, 1.8270, 1.8205, 1.8176, 1.7999, 1.7852, 1.7779, 1.7695, 1.7629,
    1.8644, 2.9185]


def test_the_lr_find_plot_starts_at_the_untrained_loss_and_names_the_run():
    """Drawn from a recorded result: no climb from 1.17 to 2.27 over rates too small to change the network, but
    a flat start at its loss (ln 10), the fall after 1e-3, the suggestion marked, and a title that says what ran."""
    lrs = [1e-6 * 10 ** (6 * i / 99) for i in range(100)]
    results = {"lr": lrs, "loss": RECORDED_LOSSES}
    suggestion = lrs[68]
    run = "MLP hidden=[512, 512], SGD (momentum=0.9)"
    ax = lr_find_figure(results, suggestion, run).axes[0]
    curve, rate, dot = ax.lines
    x, y = curve.get_xdata(), curve.get_ydata()
    assert list(x) == lrs and ax.get_xscale() == "log" and len(y) == 100
    assert y[0] > 0.98 * max(y[1:40])  # the first point is not below the following ones
    assert all(abs(loss - math.log(10)) < 0.01 for loss in y[:40]) and min(y) < 1.8
    low, high = ax.get_ylim()  # the last rate's jump (to 2.93) leaves the top; the rest fills the height
    assert low < min(y) and max(y[:-1]) < high < y[-1] and high - y[0] >= y[0] - min(y)
    assert list(rate.get_xdata()) == [suggestion] * 2 and (dot.get_xdata()[0], dot.get_ydata()[0]) == (x[68], y[68])
    assert ax.get_title() == f"lr_find: {run}\nsuggested lr 0.0132 (steepest fall)"

    (curve,) = lr_find_figure(results, None, run).axes[0].lines
    assert curve.axes.get_title().endswith("\nno suggestion: the loss did not fall")


@pytest.mark.parametrize(("overrides", "title"), [
    ([], "MLP hidden=[512, 512], SGD (momentum=0.9)"),
    (["model=cnn", "optimizer.weight_decay=5e-4"],
     "CNN channels=[32, 64, 128], SGD (momentum=0.9, weight_decay=0.0005)"),
    (["optimizer=adamw", "model.hidden=[256]"], "MLP hidden=[256], AdamW (weight_decay=0.01)"),
    (["optimizer=adam", "model.hidden=[]"], "MLP hidden=[], Adam"),
])
def test_the_lr_find_title_names_network_and_optimizer_as_configured(overrides, title):
    cfg = compose_cfg("tune=lr_find", *overrides)
    network = cfg.model._target_.rsplit(".", 1)[-1]
    assert run_title(network, plain(cfg.model), plain(cfg.optimizer)) == title


@pytest.mark.slow
def test_the_cnn_recipe_learns_the_real_data_in_a_short_epoch(real_root, tmp_path):
    """experiment=cnn as shipped, cut to one epoch of 100 batches, validated and tested on a fifth of each split:
    the CNN, its augmentation and the recipe's optimizer learn the real data (chance is 10%; the full 10 epochs
    reach about 93%)."""
    run_cli(tmp_path, "experiment=cnn", "epochs=1", "trainer.limit_train_batches=100", "trainer.limit_val_batches=0.2",
            "trainer.limit_test_batches=0.2", "device=cpu", "logger=none",
            "~callbacks.onnx_export", "~callbacks.report")  # the CNN's export and report are tested on synthetic data
    run = only_run_dir(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test/acc"] > 0.8 and metrics["val/acc_best"] > 0.8 and metrics["global_step"] == 100
    assert metrics["params"]["total"] == 653_658
    assert json.loads((run / "model.json").read_text())["net"]["_target_"] == "fmnist_lab.models.CNN"


@pytest.mark.slow
def test_seed_zero_and_data_root_are_honoured(synthetic_root, tmp_path):
    """seed=0 is a real seed: two runs on the same device agree exactly (dropout draws random numbers too);
    data.root is the data trained and tested on: the synthetic classes, which a few batches learn perfectly
    (the real data set's test/acc after such a run is far below 0.99)."""
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        run_cli(tmp_path / name, "seed=0", f"data.root={synthetic_root}", "debug=limit", "epochs=1", "device=cpu",
                "logger=none", "model.dropout=0.2", "~callbacks.onnx_export")
        runs.append(json.loads((only_run_dir(tmp_path / name) / "metrics.json").read_text()))
    assert runs[0]["seed"] == 0 and runs[0]["test/acc"] > 0.99
    for key in ("test/acc", "test/loss", "val/acc_best", "global_step"):
        assert runs[0][key] == runs[1][key]


def test_missing_data_is_one_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fmnist_lab", f"data.root={tmp_path}", "device=cpu"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"data.root={tmp_path}" in result.stderr and "make data" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_csv_logger_gets_the_final_metrics_and_the_run_keeps_its_files(synthetic_root, tmp_path):
    """logger=csv (whose log_hyperparams takes no metrics) trains, tests and records the final numbers."""
    from conftest import compose_cfg
    from fmnist_lab.train import train

    metrics = train(compose_cfg(f"data.root={synthetic_root}", "device=cpu", "debug=limit", "epochs=1", "logger=csv",
                                "~callbacks.onnx_export", output_dir=tmp_path))
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "model_weights.pth").is_file()
    (csv_file,) = tmp_path.rglob("metrics.csv")
    rows = list(csv.DictReader(csv_file.open()))
    final = [r for r in rows if r.get("hp/test_acc")]
    assert len(final) == 1 and float(final[0]["hp/test_acc"]) == pytest.approx(metrics["test/acc"])
    assert any(r.get("val/acc") for r in rows)  # the curves are there too


def test_a_taken_run_directory_name_gets_a_suffix(tmp_path):
    from fmnist_lab.run_dir_resolvers import unique_dir

    base = tmp_path / "2026-01-01" / "12-00-00"
    base.mkdir(parents=True)  # another process started a run in the same second
    first = unique_dir(str(base))
    assert first == f"{base}_1" and Path(first).is_dir() and unique_dir(str(base)) == first  # stable when asked again


@pytest.mark.slow
def test_runs_started_together_in_one_folder_each_get_their_own_directory(synthetic_root, tmp_path):
    """Three runs launched at once from the same folder: three directories, each with its own config and
    results: runs started in the same second never share one."""
    processes = [subprocess.Popen([sys.executable, "-m", "fmnist_lab", f"seed={seed}", f"data.root={synthetic_root}",
                                   "device=cpu", "debug=limit", "epochs=1", "logger=none", "~callbacks.onnx_export",
                                   "~callbacks.report"],
                                  cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for seed in (1, 2, 3)]
    assert all(p.wait(timeout=300) == 0 for p in processes), [p.stderr.read()[-1500:] for p in processes]
    runs = sorted(p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir())
    assert len(runs) == 3
    for run in runs:
        seed = json.loads((run / "metrics.json").read_text())["seed"]
        assert f"seed={seed}" in (run / ".hydra" / "overrides.yaml").read_text()


@pytest.mark.parametrize("overrides", [["data.root={tmp}"], ["resume={tmp}/nope"]], ids=["no data", "no run"])
def test_a_run_that_cannot_start_leaves_no_run_folder_behind(tmp_path, overrides):
    """Nothing trained, so nothing for `fmnist_lab.runs` to list: the error is on the console alone (bad values
    and files: tests/test_errors.py)."""
    result = run_cli(tmp_path, "device=cpu", *(o.format(tmp=tmp_path) for o in overrides), check=False)
    # the error paragraph (Lightning may warn before it, e.g. where SLURM's srun is installed)
    assert result.returncode == 1 and "\nerror: " in f"\n{result.stderr}" and "Traceback" not in result.stderr
    assert not list(tmp_path.rglob(".hydra")) and not list(tmp_path.rglob("metrics.json"))


@pytest.mark.parametrize("name", ["a" * 300, "file/run"], ids=["name too long", "path through a file"])
def test_a_run_folder_that_cannot_be_made_is_one_paragraph(tmp_path, name):
    (tmp_path / "file").write_text("not a folder")
    result = run_cli(tmp_path, "device=cpu", f"hydra.run.dir={tmp_path / name}", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"\nerror: {tmp_path / name} cannot be created (" in f"\n{result.stderr}"
    assert "hydra.run.dir=" in result.stderr


@pytest.mark.slow
def test_a_run_folder_has_one_writer(synthetic_root, tmp_path):
    """While a run trains, resume= (by name or as latest) is refused before anything is written into its folder,
    and the run goes on undisturbed."""
    process = subprocess.Popen([sys.executable, "-m", "fmnist_lab", f"data.root={synthetic_root}", "device=cpu",
                                "logger=none", "epochs=50", "trainer.limit_train_batches=50"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in process.stdout:
            if line.startswith("epoch 1/50"):
                break
        run = only_run_dir(tmp_path)
        before = sorted(p.relative_to(run) for p in run.rglob("*") if "checkpoints" not in p.parts)
        for resume in (str(run), "latest"):
            result = run_cli(tmp_path, f"resume={resume}", check=False)
            assert result.returncode == 1 and "Traceback" not in result.stderr
            assert f"{run} is being written by process {process.pid}" in result.stderr
        assert sorted(p.relative_to(run) for p in run.rglob("*") if "checkpoints" not in p.parts) == before
        assert process.poll() is None  # still training
    finally:
        process.kill()
        process.wait()


@pytest.mark.slow
def test_a_closed_stdout_does_not_stop_the_run(synthetic_root, tmp_path):
    """`python -m fmnist_lab | head -1`: the reader goes after the first line, the run trains on and finishes."""
    process = subprocess.Popen([sys.executable, "-m", "fmnist_lab", f"data.root={synthetic_root}", "device=cpu",
                                "logger=none", "epochs=3", "trainer.limit_train_batches=20", "~callbacks.onnx_export"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.readline()  # a log line: the next ones, the epoch lines and the result meet a closed pipe
    process.stdout.close()
    assert process.wait(timeout=300) == 0, process.stderr.read()[-2000:]
    assert b"Traceback" not in process.stderr.read()
    metrics = json.loads((only_run_dir(tmp_path) / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and metrics.get("status", "ok") == "ok"


def test_fast_dev_run_names_only_the_files_it_wrote_and_is_recorded_as_a_debug_run(synthetic_root, tmp_path):
    result = run_cli(tmp_path, "debug=fast_dev_run", "device=cpu", f"data.root={synthetic_root}")
    run = only_run_dir(tmp_path)
    assert not (run / "checkpoints").exists()  # Lightning saves none in a fast_dev_run
    (artifacts,) = [line for line in result.stdout.splitlines() if line.startswith("artifacts:")]
    assert "checkpoints/" not in artifacts and "metrics.json" in artifacts and "model_weights.pth" in artifacts
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "debug" and metrics["test_images"] == 1000  # one test batch


def test_a_write_error_says_what_the_run_kept(tmp_path):
    """A full disk before the first checkpoint: the message must not claim a checkpoint that is not there, nor
    offer a resume with nothing to resume from."""
    from fmnist_lab.run_dir import RunDir, describe_write_error

    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.json"))
    message = describe_write_error(full, tmp_path)
    assert "no space left on device" in message and "it had saved no checkpoint yet" in message
    assert "intact" not in message and "resume=" not in message and message.endswith("start it again.")
    RunDir(tmp_path).checkpoints.mkdir()
    RunDir(tmp_path).last.write_bytes(b"a checkpoint")
    message = describe_write_error(full, tmp_path)
    assert f"its last good checkpoint {RunDir(tmp_path).last} is intact" in message
    assert message.endswith(f"continue with: python -m fmnist_lab resume={tmp_path}")


@pytest.mark.parametrize(("module", "arguments"), [
    ("fmnist_lab.evaluate", ["run=", "data.root=", "device=", "report=", "out="]),
    ("fmnist_lab.predict", ["model=", "top_k=", "--json"]),
])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_evaluate_and_predict_answer_help_without_loading_torch(module, arguments, flag, tmp_path):
    # help is at hand where torch is slow to load or (predict with an ONNX model) not installed at all
    result = run_cli(tmp_path, flag, module=module, blocked=("torch",))
    assert f"\nusage: python -m {module} " in result.stdout and not result.stderr
    described = {line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")}
    assert set(arguments) <= described  # each argument on a line of its own, with what it means


@pytest.mark.parametrize(("module", "missing"), [("fmnist_lab.evaluate", "run=..."),
                                                  ("fmnist_lab.predict", "model=...")])
def test_evaluate_and_predict_without_their_model_say_so_and_fail(module, missing, tmp_path):
    result = run_cli(tmp_path, module=module, check=False)
    assert result.returncode == 2 and not result.stdout
    assert result.stderr.startswith(f"error: missing {missing}") and f"usage: python -m {module} " in result.stderr



def test_evaluate_out_without_report_is_refused_not_ignored(tmp_path):
    result = run_cli(tmp_path, "run=somewhere", f"out={tmp_path}", module="fmnist_lab.evaluate", check=False)
    assert result.returncode == 2 and "report is off: add report=true, or drop out=." in result.stderr

"""Multirun sweeps with real Hydra launchers and sweepers, in subprocesses, on small synthetic data."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

from conftest import run_cli, web_server
from fmnist_lab.sweep_objective import Objective
from fmnist_lab.sweep_report import markdown, plot, ranked
from fmnist_lab.swept import run_name, swept_keys, swept_values
from fmnist_lab.tensorboard_hparams import run_folder

ACCURACY = Objective(("val/acc_best",), ("max",))
QUICK = ["debug=limit", "device=cpu", "~callbacks.onnx_export", "~callbacks.report"]  # neither is what sweeps test


def sweep(cwd: Path, *args: str, check: bool = True):
    result = run_cli(cwd, "-m", *args, check=check)
    (sweep_dir,) = (cwd / "outputs" / "multirun").glob("*/*")
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    return result, sweep_dir, rows


def tensorboard_run(run_dir: Path) -> Path:
    """The folder of a run's TensorBoard events: tensorboard/ itself, or a sweep job's tensorboard/<swept values>."""
    (folder,) = {path.parent for path in (run_dir / "tensorboard").rglob("*tfevents*")}
    return folder


def hparams_session(run_dir: Path) -> tuple[set[str], set[str]]:
    """Hyperparameter names and metric tags of a run's TensorBoard HPARAMS entry."""
    events = EventAccumulator(str(tensorboard_run(run_dir)))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    data = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    return set(session.session_start_info.hparams), {m.name.tag for m in data.experiment.metric_infos}


@pytest.mark.slow
def test_grid_sweep_keeps_every_job_and_fails_loudly_on_a_divergent_one(synthetic_root, tmp_path):
    result, sweep_dir, rows = sweep(tmp_path, "lr=0.05,10000,0.123456789", f"data.root={synthetic_root}", "epochs=3",
                                    *QUICK, check=False)
    assert result.returncode == 1
    assert f"1 of 3 sweep jobs failed (jobs 1); see {sweep_dir.relative_to(tmp_path) / 'summary.md'}" in result.stderr
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"] and rows[1]["overrides"].startswith("lr=10000 ")
    step = int(re.search(r"training loss became nan by step (\d+) \(epoch 0\)", rows[1]["error"])[1])
    assert step <= 21  # stopped within the first epoch (21 steps here), not after 3 epochs of NaN

    best = max((r for r in rows if r["status"] == "ok"), key=lambda r: float(r["objective"]))
    table = (sweep_dir / "summary.md").read_text()
    assert re.search(rf"\| \*\*best\*\* \| {best['job']} \| MLP \| {float(best['objective']):.4f} \|", table)
    assert "failed: FloatingPointError: training loss became nan" in table
    assert rows[2]["overrides"].startswith("lr=0.123456789 ") and "| `lr=0.1235 " in table  # the csv re-runs it
    with Image.open(sweep_dir / "summary.png") as png:
        assert png.format == "PNG" and png.size[0] > 200
    for row in rows:
        metrics = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())
        assert metrics.get("status", "ok") == row["status"]

    params, metric_tags = hparams_session(Path(best["run_dir"]))
    assert {"lr", "batch_size", "optimizer/momentum"} <= params
    assert {"hp/test_acc", "hp/val_acc_best"} <= metric_tags


@pytest.mark.slow
def test_joblib_runs_jobs_in_parallel_with_split_threads(synthetic_root, tmp_path):
    result, _, rows = sweep(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "lr=0.01,0.1",
                            f"data.root={synthetic_root}", *QUICK)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    # the two jobs' console lines interleave: each says which job it is
    epoch_lines = [line for line in result.stdout.splitlines() if re.search(r"epoch \d+/\d+:", line)]
    assert epoch_lines and all(re.match(r"job [01]: epoch ", line) for line in epoch_lines), epoch_lines
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert f"{threads} CPU thread{'s' * (threads != 1)} for this one" in result.stdout
    metrics = [json.loads((Path(r["run_dir"]) / "metrics.json").read_text()) for r in rows]
    assert all(m["cpu_threads"] == max(1, (os.cpu_count() or 1) // 2) for m in metrics)
    (a_start, a_end), (b_start, b_end) = [(datetime.fromisoformat(m["started"]),
                                           datetime.fromisoformat(m["finished"])) for m in metrics]
    assert a_start <= b_end and b_start <= a_end  # the two jobs overlapped in time


@pytest.mark.slow
def test_submitit_local_launcher_runs_jobs_that_share_the_cores(synthetic_root, tmp_path):
    """Two jobs at once as local processes: like joblib's, each takes its share of the CPU threads. The two
    are the two networks, and the summary says which job trained which."""
    _, sweep_dir, rows = sweep(tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                               "model=mlp,cnn", f"data.root={synthetic_root}", *QUICK)
    assert sorted(r["status"] for r in rows) == ["ok", "ok"] and (sweep_dir / ".submitit").is_dir()
    metrics = [json.loads((Path(r["run_dir"]) / "metrics.json").read_text()) for r in rows]
    assert all(m["test/acc"] > 0.5 and m["cpu_threads"] == max(1, (os.cpu_count() or 1) // 2) for m in metrics)
    assert {r["overrides"].split()[0]: r["model"] for r in rows} == {"model=mlp": "MLP", "model=cnn": "CNN"}
    table = (sweep_dir / "summary.md").read_text()
    assert re.search(r"\| \d \| CNN \| [\d.]+ \|", table) and re.search(r"\| \d \| MLP \| [\d.]+ \|", table)


@pytest.mark.slow
def test_optuna_search_survives_a_diverging_trial_and_a_kill_and_continues_its_study(synthetic_root, tmp_path):
    sweep_dir = tmp_path / "search"
    # learning rates that train: the continued search's sampler is reseeded, so its trials are not foreseeable
    common = ["hparams_search=optuna", f"hydra.sweep.dir={sweep_dir}", f"data.root={synthetic_root}",
              "hydra.sweeper.n_jobs=1", "lr=tag(log, interval(0.001, 0.03))", "optimizer.momentum=0.9", *QUICK]
    # every trial of this first run diverges, whatever Optuna proposes: a failed trial, not a crash
    first = run_cli(tmp_path, "-m", *common, "hydra.sweeper.n_trials=1", "hydra.sweeper.max_failure_rate=1.0",
                    "optimizer.lr=10000", check=False)
    assert first.returncode == 1 and "1 of 1 sweep jobs failed" in first.stderr
    assert "Traceback" not in first.stderr

    # killed while its second trial trains: that trial is left RUNNING in the study
    process = subprocess.Popen([sys.executable, "-m", "fmnist_lab", "-m", *common, "hydra.sweeper.n_trials=4"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if "epoch 1/" in line:
            process.kill()
            break
    process.wait(timeout=60)
    assert trial_states(sweep_dir) == ["FAIL", "RUNNING"]

    run_cli(tmp_path, "-m", *common, "hydra.sweeper.n_trials=4")  # continues: 4 trials in all
    assert trial_states(sweep_dir) == ["FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    with sqlite3.connect(sweep_dir / "optuna.db") as db:
        params = db.execute("select trial_id, param_name, param_value from trial_params").fetchall()
    by_trial = {}
    for trial, name, value in params:
        by_trial.setdefault(trial, {})[name] = value
    assert len({tuple(sorted(p.items())) for p in by_trial.values()}) == len(by_trial)  # no repeated trial
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["failed", "ok", "ok"] and len({r["run_dir"] for r in rows}) == 3
    assert "**best**" in (sweep_dir / "summary.md").read_text()



@pytest.mark.slow
def test_a_multi_objective_search_shows_its_pareto_front_in_summary_study_and_dashboard(synthetic_root, tmp_path):
    """optimized_metric as a list and hydra.sweeper.directions: every trial has both values (those of its run's
    metrics.json), and summary.md marks the Pareto front that Optuna's study holds (study.best_trials)."""
    import optuna

    sweep_dir = tmp_path / "search"
    result = run_cli(tmp_path, "-m", "hparams_search=optuna", f"hydra.sweep.dir={sweep_dir}",
                     f"data.root={synthetic_root}", "optimized_metric=[test/loss,train_seconds]",
                     "hydra.sweeper.directions=[minimize,minimize]", "hydra.sweeper.n_trials=4",
                     # a space where every trial trains (lr 0.3 with momentum 0.96 diverges): all four finish
                     "lr=tag(log, interval(0.001, 0.03))", "optimizer.momentum=0.9", *QUICK)
    assert "A new study created" not in result.stdout + result.stderr  # Optuna's own lines stay off the console
    study = optuna.load_study(study_name="fmnist_lab", storage=f"sqlite:///{sweep_dir}/optuna.db")
    assert study.directions == [optuna.study.StudyDirection.MINIMIZE] * 2
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    for trial in study.trials:
        metrics = json.loads((Path(trial.user_attrs["run_dir"]) / "metrics.json").read_text())
        assert trial.values == [metrics["test/loss"], metrics["train_seconds"]]

    rows = {r["run_dir"]: r for r in csv.DictReader((sweep_dir / "summary.csv").open())}
    front = sorted(int(rows[t.user_attrs["run_dir"]]["job"]) for t in study.best_trials)
    text = (sweep_dir / "summary.md").read_text()
    assert "Objective: test/loss (min), train_seconds (min)" in text
    listed = re.search(r"Pareto front \(the finished jobs that no other job beats in every objective\): jobs ([\d, ]+) "
                       r"\((\d+) of 4\)", text)
    assert sorted(int(j) for j in listed[1].split(", ")) == front and int(listed[2]) == len(front)
    marked = re.findall(r"^\| \*\*Pareto front\*\* \| (\d+) \| MLP \| [\d.]+ \| [\d.]+ \|", text, re.MULTILINE)
    assert sorted(map(int, marked)) == front
    assert all(r["objectives"] == f"{r['test/loss']} {r['train_seconds']}" for r in rows.values())

    # the README's `optuna-dashboard sqlite:///<sweep dir>/optuna.db` serves the study: its trials, named
    # objectives and Pareto front, read back over the dashboard's HTTP API
    dashboard = str(Path(sys.executable).with_name("optuna-dashboard"))
    with web_server(tmp_path, dashboard, f"sqlite:///{sweep_dir}/optuna.db", "--host", "127.0.0.1", "--port",
                    "{port}") as url:
        (listed_study,) = json.loads(urllib.request.urlopen(f"{url}/api/studies", timeout=30).read())["study_summaries"]
        served = json.loads(urllib.request.urlopen(f"{url}/api/studies/{listed_study['study_id']}", timeout=30).read())
    assert served["name"] == "fmnist_lab" and served["objective_names"] == ["test/loss", "train_seconds"]
    assert [(t["number"], t["state"], t["values"]) for t in served["trials"]] == \
        [(t.number, "Complete", t.values) for t in study.trials]
    assert [{p["name"]: p["param_external_value"] for p in t["params"]} for t in served["trials"]] == \
        [{name: str(value) for name, value in t.params.items()} for t in study.trials]
    run_dirs = [{a["key"]: a["value"] for a in t["user_attrs"]}["run_dir"] for t in served["best_trials"]]
    assert sorted(int(rows[run_dir]["job"]) for run_dir in run_dirs) == front


def test_the_pareto_front_of_the_summary_is_the_one_optuna_finds():
    """Random scores with ties, two and three objectives in mixed directions: the summary's front is the set of
    trials Optuna's study.best_trials gives."""
    import random

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rng = random.Random(3)
    for modes in (("max", "min"), ("min", "max", "max")):
        for _ in range(20):
            scores = [[rng.choice([0.1, 0.2, 0.3, 0.4]) for _ in modes] for _ in range(12)]
            study = optuna.create_study(directions=[{"max": "maximize", "min": "minimize"}[m] for m in modes])
            for values in scores:
                study.add_trial(optuna.trial.create_trial(values=values))
            rows = [{"job": str(i), "status": "ok", "objectives": " ".join(map(str, values))}
                    for i, values in enumerate(scores)]
            objective = Objective(tuple(f"m{i}" for i in range(len(modes))), modes)
            ours = sorted(int(r["job"]) for r in objective.pareto_front(rows))
            assert ours == sorted(t.number for t in study.best_trials)
            assert [r["job"] for r in ranked(rows, objective)][:len(ours)] == \
                [r["job"] for r in ranked([r for r in rows if int(r["job"]) in ours], objective)]


@pytest.mark.parametrize(("args", "expected"), [
    (["hparams_search=optuna", "optimized_metric=[val/acc_best,train_seconds]"],
     "error: optimized_metric=['val/acc_best', 'train_seconds'] names 2 metric(s), and hydra.sweeper.directions "
     "gives no direction. A sweep needs one direction per metric, in the same order, each max or min (maximize or "
     "minimize): set e.g. hydra.sweeper.directions=[max,min], or change optimized_metric."),
    (["hparams_search=optuna", "hydra.sweeper.directions=[maximize,upward]",
      "optimized_metric=[val/acc_best,train_seconds]"],
     "hydra.sweeper.directions gives maximize, upward. A sweep needs one direction per metric"),
    (["hparams_search=optuna", "hydra.sweeper.directions=[maximize,minimize]"],
     "error: optimized_metric=['val/acc_best'] names 1 metric(s), and hydra.sweeper.directions gives maximize, "
     "minimize."),
    (["hparams_search=optuna", "hydra/sweeper/sampler=cmaes", "optimized_metric=[val/acc_best,train_seconds]",
      "hydra.sweeper.directions=[maximize,minimize]"],
     "error: hydra/sweeper/sampler=cmaes searches for one objective, and this search has 2 (val/acc_best (max), "
     "train_seconds (min)). Choose hydra/sweeper/sampler=tpe (the default), gp, random or grid"),
    (["optimized_metric=[val/acc_best,train_seconds]"],  # a grid sweep
     "and hydra.callbacks.summary.mode gives max. A sweep needs one direction per metric"),
    (["hparams_search=optuna", "optimized_metric=[val/acc_best,val/acc_best]", "hydra.sweeper.directions=[max,max]"],
     "error: optimized_metric=['val/acc_best', 'val/acc_best'] is neither one metric's name nor a list of different "
     "names."),
])
def test_objectives_and_directions_that_do_not_fit_are_refused_before_any_job(tmp_path, args, expected):
    sweep_dir = tmp_path / "search"
    assert expected in refused(tmp_path, sweep_dir, *args)
    assert not sweep_dir.exists() or not any(p.is_dir() for p in sweep_dir.iterdir())


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_study_made_for_other_objectives_is_not_continued_by_a_search_with_new_ones(tmp_path):
    """Its trials' values would be mixed with values of other metrics, or compared the wrong way round."""
    import optuna

    sweep_dir = tmp_path / "search"
    sweep_dir.mkdir()
    storage = f"sqlite:///{sweep_dir}/optuna.db"
    optuna.create_study(study_name="fmnist_lab", storage=storage, direction="maximize")
    paragraph = refused(tmp_path, sweep_dir, "hparams_search=optuna", "optimized_metric=[val/acc_best,train_seconds]",
                        "hydra.sweeper.directions=[maximize,minimize]")
    assert paragraph.startswith(f"error: the study fmnist_lab in {storage} was made for maximize, and this search is "
                                "for val/acc_best (max), train_seconds (min), so no trial was run.")

    optuna.create_study(study_name="named", storage=storage, direction="minimize").set_metric_names(["test/loss"])
    paragraph = refused(tmp_path, sweep_dir, "hparams_search=optuna", "hydra.sweeper.study_name=named",
                        "optimized_metric=train_seconds", "hydra.sweeper.direction=minimize")
    assert paragraph.startswith(f"error: the study named in {storage} was made for test/loss (min), and this search "
                                "is for train_seconds (min), so no trial was run.")
    assert not any(p.is_dir() for p in sweep_dir.iterdir())

def trial_states(sweep_dir: Path) -> list[str]:
    with sqlite3.connect(sweep_dir / "optuna.db") as db:
        return [s for (s,) in db.execute("select state from trials order by number")]


@pytest.mark.slow
def test_a_used_sweep_folder_is_continued_by_the_same_sweep_and_refused_to_another(synthetic_root, tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = ["-m", "lr=0.05,0.1", f"data.root={synthetic_root}", f"hydra.sweep.dir={sweep_dir}", *QUICK]
    run_cli(tmp_path, *args)
    before = {p: p.read_bytes() for p in sweep_dir.rglob("*") if p.is_file() and p.parent.name != ".hydra"
              and not p.name.endswith(".log")
              and p.name not in ("multirun.yaml", "summary.md", "summary.png", ".writer.lock")}  # the lock: its pid

    again = run_cli(tmp_path, *args)  # the same sweep: both jobs had finished, so nothing is trained again
    assert again.stdout.count("artifacts: ") == 0
    after = {p: p.read_bytes() for p in before}
    assert after == before and len(list(csv.DictReader((sweep_dir / "summary.csv").open()))) == 2

    other = run_cli(tmp_path, "-m", "lr=0.2,0.3", f"data.root={synthetic_root}", f"hydra.sweep.dir={sweep_dir}",
                    *QUICK, check=False)
    assert other.returncode == 1 and f"{sweep_dir} holds another sweep" in other.stderr
    assert {p: p.read_bytes() for p in before} == before  # nothing of the first sweep was touched


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


@pytest.mark.slow
def test_killing_a_parallel_sweep_leaves_no_workers_behind(synthetic_root, tmp_path):
    """SIGKILL on a joblib sweep: its workers stop their jobs as a SIGTERM would (last.ckpt, marked
    interrupted) and exit, instead of living on for minutes with a trained job's memory each."""
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "lr=0.01,0.1", f"data.root={synthetic_root}",
            "epochs=30", f"hydra.sweep.dir={tmp_path / 's'}", *QUICK]
    process = subprocess.Popen([sys.executable, "-m", "fmnist_lab", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if re.match(r"job \d+: epoch 2/", line):  # a worker is training (parallel jobs label their lines)
            break
    workers = children(process.pid)
    process.kill()
    process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.5)
    alive = [pid for pid in workers if Path(f"/proc/{pid}/stat").exists()
             and " Z " not in Path(f"/proc/{pid}/stat").read_text()]
    assert workers and not alive
    statuses = [json.loads(p.read_text()).get("status") for p in (tmp_path / "s").glob("*/metrics.json")]
    assert statuses and set(statuses) <= {"interrupted", None}


def summary_row(job: int, status: str, objective: str, overrides: str, error: str = "") -> dict[str, str]:
    """A summary.csv row as `read_rows` gives it."""
    return {"job": str(job), "status": status, "objective": objective, "val/acc_best": objective,
            "test/acc": objective, "test/loss": "0.41237" if objective else "", "epochs": "3",
            "train_seconds": "12.3456", "overrides": overrides, "error": error, "run_dir": f"/sweep/{job}",
            "model": "MLP"}


def test_summary_table_shows_rounded_overrides_and_numbers():
    exact = "optimizer.lr=0.0031622776601683794 seed=7 lr=1e-3 model.hidden=[512,512] data.root=/d/0.5 ~logger"
    table = markdown([summary_row(0, "ok", "0.912345", exact)], ACCURACY)
    assert ("| **best** | 0 | MLP | 0.9123 | 0.9123 | 0.4124 | 3 | 12.3 "
            "| `optimizer.lr=0.003162 seed=7 lr=0.001 model.hidden=[512,512] data.root=/d/0.5 ~logger` | ok |") in table


def test_summary_plot_draws_failed_jobs_apart_from_the_scores(tmp_path):
    """A failed job's cross sits on a strip of its own under the scores, at its parameter value (among the scores
    it would read as a low score); the swept values are the rounded tick labels."""
    lrs = ["0.0031622776601683794", "3.1622776601683795", "0.00031622776601683794", "0.1"]
    rows = ranked([summary_row(0, "ok", "0.81", f"optimizer.lr={lrs[0]} model=mlp"),
                   summary_row(1, "failed", "", f"optimizer.lr={lrs[1]} model=cnn", "FloatingPointError: nan"),
                   summary_row(2, "ok", "0.85", f"optimizer.lr={lrs[2]} model=cnn"),
                   summary_row(3, "ok", "0.83", f"optimizer.lr={lrs[3]} model=mlp")], ACCURACY)
    fig = plot(rows, ACCURACY, tmp_path / "summary.png")

    scores = [ax for ax in fig.axes if ax.get_ylabel() == "val/acc_best"]
    strips = [ax for ax in fig.axes if ax.get_ylabel() == "failed"]
    assert len(scores) == len(strips) == 2 and len(fig.axes) == 4  # model and optimizer.lr, each with a strip
    lr_scores, lr_strip = (next(ax for ax in group if ax.get_xscale() == "log") for group in (scores, strips))
    assert lr_strip.get_shared_x_axes().joined(lr_strip, lr_scores) and lr_strip.get_xlabel() == "optimizer.lr"
    points = [tuple(p) for c in lr_scores.collections for p in c.get_offsets()]
    assert {y for _, y in points} == {0.81, 0.83, 0.85} and float(lrs[1]) not in {x for x, _ in points}
    assert (float(lrs[2]), 0.85) in [tuple(c.get_offsets()[0]) for c in lr_scores.collections
                                     if len(c.get_offsets()) == 1]  # the best job's star
    assert [tuple(p) for c in lr_strip.collections for p in c.get_offsets()] == [(float(lrs[1]), 0.0)]
    assert {t.get_text() for t in lr_strip.get_xticklabels()} == {"0.003162", "3.162", "0.0003162", "0.1"}
    with Image.open(tmp_path / "summary.png") as png:
        assert png.format == "PNG"

    without_failures = plot([r for r in rows if r["status"] == "ok"], ACCURACY, tmp_path / "ok.png")
    assert [ax.get_ylabel() for ax in without_failures.axes] == ["val/acc_best"] * 2  # no empty strip


def cut_markers(fig) -> list[tuple[str, float, float]]:
    """The drawn points whose marker (its size at the figure's dpi, and its edge: at a star's 36-degree tips the
    mitred edge reaches 1/sin(18 degrees) half-widths beyond the point) crosses an edge of their axes: (the
    axes' y label, x, y) each."""
    cut = []
    for ax in fig.axes:
        box = ax.bbox
        for collection in ax.collections:
            edge = max(collection.get_linewidths(), default=0) / 2 / np.sin(np.radians(18))
            offsets = collection.get_offsets()
            for (x, y), size in zip(offsets, np.broadcast_to(collection.get_sizes(), len(offsets)), strict=True):
                radius = (np.sqrt(size) / 2 + edge) * fig.dpi / 72
                px, py = ax.transData.transform((x, y))
                if not (box.x0 + radius < px < box.x1 - radius and box.y0 + radius < py < box.y1 - radius):
                    cut.append((ax.get_ylabel(), float(x), float(y)))
    return cut


def test_summary_plot_is_titled_by_sweep_and_objective_and_cuts_no_marker(tmp_path):
    """The best job's star at the highest score sits wholly inside its axes, as does every other marker; the
    figure says which sweep it shows and what it optimizes."""
    for name in ("grid", "lr-sweep", "search"):
        (tmp_path / name).mkdir()
    # `-m lr=0.05,0.1`: the two jobs at opposite corners, the star in the top right one
    two_jobs = ranked([summary_row(0, "ok", "0.756", "lr=0.05"), summary_row(1, "ok", "0.783", "lr=0.1")], ACCURACY)
    fig = plot(two_jobs, ACCURACY, tmp_path / "grid" / "summary.png")
    assert fig.get_suptitle() == "grid: val/acc_best (max) over 2 jobs" and cut_markers(fig) == []
    low, high = fig.axes[0].get_ylim()
    assert low + 0.1 * (high - low) < 0.756 and 0.783 < high - 0.1 * (high - low)

    rows = ranked([summary_row(0, "ok", "0.81", "optimizer.lr=0.001 model=mlp"),
                   summary_row(1, "failed", "", "optimizer.lr=3.0 model=cnn", "FloatingPointError: nan"),
                   summary_row(2, "ok", "0.85", "optimizer.lr=0.01 model=cnn"),
                   summary_row(3, "ok", "0.83", "optimizer.lr=0.1 model=mlp")], ACCURACY)
    fig = plot(rows, ACCURACY, tmp_path / "lr-sweep" / "summary.png")
    assert fig.get_suptitle() == "lr-sweep: val/acc_best (max) over 4 jobs (1 without a score)"
    assert cut_markers(fig) == []

    two = Objective(("test/loss", "train_seconds"), ("min", "min"))
    front = [{**summary_row(i, "ok", "", f"lr={lr}"), "objectives": f"{loss} {seconds}"}
             for i, (lr, loss, seconds) in enumerate([(0.01, 0.3, 20.0), (0.1, 0.4, 10.0)])]
    fig = plot(front, two, tmp_path / "search" / "summary.png")
    assert fig.get_suptitle() == "search: test/loss (min), train_seconds (min) over 2 jobs" and not cut_markers(fig)


def shown_tick_labels(axis, minor: bool = False) -> list[str]:
    """The tick labels an axis shows: those of its ticks inside its view, not empty."""
    low, high = sorted(axis.get_view_interval())
    return [label.get_text() for label, at in zip(axis.get_ticklabels(minor=minor), axis.get_ticklocs(minor=minor),
                                                  strict=True) if low <= at <= high and label.get_text()]


def test_a_search_with_many_values_has_a_few_short_tick_labels(tmp_path):
    """20 different float values of each swept parameter, as Optuna proposes them: a rate over decades on a log
    axis and a dropout on a linear one each get a few round labels, not one per value."""
    rng = np.random.default_rng(0)
    lrs, dropouts = rng.permutation(np.geomspace(1e-3, 3e-2, 20)), rng.permutation(np.linspace(0.05, 0.5, 20))
    rows = [summary_row(i, "ok", f"{0.8 + 0.06 * rng.random():.4f}", f"optimizer.lr={lr!r} model.dropout={dropout!r}")
            for i, (lr, dropout) in enumerate(zip(lrs.tolist(), dropouts.tolist(), strict=True))]
    fig = plot(ranked(rows, ACCURACY), ACCURACY, tmp_path / "summary.png")
    assert {ax.get_xlabel(): ax.get_xscale() for ax in fig.axes} == {"model.dropout": "linear", "optimizer.lr": "log"}
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            texts = shown_tick_labels(axis)
            assert 2 <= len(texts) <= 8 and all(len(t) <= 8 for t in texts), (ax.get_xlabel(), texts)
        assert not shown_tick_labels(ax.xaxis, minor=True)
    assert not cut_markers(fig)


def refused(cwd: Path, sweep_dir: Path | str, *args: str) -> str:
    """A sweep into `sweep_dir` that must be refused before any job: exit 1 and one paragraph (no traceback),
    which is returned."""
    result = run_cli(cwd, "-m", "lr=0.05,0.1", f"data.root={cwd / 'no-data'}", f"hydra.sweep.dir={sweep_dir}", *args,
                     check=False, timeout=120)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Error executing job" not in result.stderr
    (paragraph,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    return paragraph


def test_a_sweep_folder_that_cannot_be_written_is_refused_in_one_paragraph(tmp_path):
    """Hydra writes multirun.yaml there before any job: without this check, the sweep ends in an OSError
    traceback."""
    if os.geteuid() == 0:  # root writes anywhere but in sysfs
        read_only = Path("/sys/fs")
    else:
        read_only = tmp_path / "read-only"
        read_only.mkdir(mode=0o555)
    assert refused(tmp_path, read_only) == (
        f"error: the sweep folder {read_only} cannot be created or written: it is not writable (Permission denied). "
        "Choose a writable folder with hydra.sweep.dir=..., or leave it out for a new folder under paths.log_dir.")

    (tmp_path / "a-file").write_text("")
    through_a_file = refused(tmp_path, tmp_path / "a-file" / "sweep")
    assert through_a_file.startswith(f"error: the sweep folder {tmp_path / 'a-file' / 'sweep'} cannot be created or "
                                     f"written: {tmp_path / 'a-file'} is a file, not a folder (Not a directory). "
                                     "Choose another path with hydra.sweep.dir=...")

    too_long = refused(tmp_path, tmp_path / ("x" * 300))
    assert "the path, or a name in it, is longer than the file system allows (File name too long). Choose a " \
           "shorter path with hydra.sweep.dir=..." in too_long


def test_a_sweep_into_a_single_run_folder_is_refused(tmp_path):
    """Otherwise the jobs would go into the run's folder, where `python -m fmnist_lab.runs` never looks."""
    run = tmp_path / "outputs" / "2024-01-01" / "12-00-00"
    (run / ".hydra").mkdir(parents=True)
    assert refused(tmp_path, run).startswith(f"error: {run} is the folder of a single run (it holds .hydra/); a sweep "
                                             "there would put its jobs inside that run")
    assert sorted(p.name for p in run.iterdir()) == [".hydra"]  # nothing was written there


@pytest.mark.parametrize("content, why", [
    ("hydra:\n  overrides:\n    task: &a [lr=0.05]\nother: *a\n", "uses YAML anchors or aliases"),
    ("hydra: [unclosed\n", "is damaged: it is not valid YAML"),
    ("hydra:\n  overrides:\n    task: 3\n", "is damaged: it holds no hydra.overrides.task list."),
])
def test_an_earlier_multirun_yaml_is_read_as_untrusted_data(tmp_path, content, why):
    """Not OmegaConf.load, which expands aliases, and only warns of a damaged file while the sweep runs on."""
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / "multirun.yaml").write_text(content)
    paragraph = refused(tmp_path, sweep_dir)
    assert paragraph.startswith(f"error: {sweep_dir / 'multirun.yaml'} {why}")
    assert f"to tell whether the sweep folder {sweep_dir} holds this sweep, so nothing was run" in paragraph


def test_an_optuna_job_folder_with_damaged_overrides_stops_the_search_with_its_name(tmp_path):
    """Closing the trials of a stopped search reads each job's overrides.yaml as untrusted data (not with
    OmegaConf.load, which expands aliases)."""
    from hydra_plugins.fmnist_lab_optuna import recorded_value

    overrides = tmp_path / "search" / "3_2024" / ".hydra" / "overrides.yaml"
    overrides.parent.mkdir(parents=True)
    overrides.write_text("- &a optimizer.lr=0.1\n- *a\n")
    with pytest.raises(SystemExit) as stop:
        recorded_value({"optimizer.lr": 0.1}, tmp_path / "search", "val/acc_best")
    assert str(stop.value).startswith(f"error: {overrides} uses YAML anchors or aliases")
    assert f"move its job folder {overrides.parent.parent} out of {tmp_path / 'search'}" in str(stop.value)


def test_the_search_space_is_read_in_hydras_sweep_syntax():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from hydra_plugins.fmnist_lab_optuna import search_space

    params = {"lr": "tag(log, interval(0.001, 0.3))", "batch_size": "choice(64, 128)", "epochs": "range(1, 4)",
              "optimizer.momentum": "interval(0.5, 0.99)", "model.hidden": 'choice("[256,256]", "[512,512]")'}
    space, fixed = search_space(params, ["seed=3", "data.val_size=range(1000, 3000, 1000)", "batch_size=32"])
    assert space == {"lr": FloatDistribution(0.001, 0.3, log=True), "epochs": IntDistribution(1, 3),
                     "optimizer.momentum": FloatDistribution(0.5, 0.99),
                     "model.hidden": CategoricalDistribution(["[256,256]", "[512,512]"]),
                     "data.val_size": IntDistribution(1000, 2000, step=1000)}
    assert fixed == ["seed=3", "batch_size=32"]  # a value given on the command line is not searched


@pytest.mark.slow
def test_a_study_written_by_optuna_2_is_refused_with_the_upgrade_command_that_makes_it_continue(tmp_path):
    """tests/data/optuna-2.10.db: a study of 2 finished trials, written by optuna 2.10.1 (SQLAlchemy 1.4)."""
    sweep_dir = tmp_path / "search"
    sweep_dir.mkdir()
    study = sweep_dir / "optuna.db"
    shutil.copy(Path(__file__).parent / "data" / "optuna-2.10.db", study)
    before = study.read_bytes()
    common = ["-m", "hparams_search=optuna", f"hydra.sweep.dir={sweep_dir}", "hydra.sweeper.n_trials=3",
              "hydra.sweeper.n_jobs=1", *QUICK]
    result = run_cli(tmp_path, *common, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    error = result.stderr[result.stderr.index("error: the study storage"):]
    assert "written by Optuna 2.10.1" in error and "no trial was run" in error
    command = re.search(r"`(optuna storage upgrade --storage [^`]+)`", error)[1]
    assert study.read_bytes() == before  # untouched until the user says so

    subprocess.run([str(Path(sys.executable).parent / "optuna"), *command.split()[1:]], check=True,
                   capture_output=True)
    run_cli(tmp_path, *common)  # the study continues: one more trial makes its 3
    assert trial_states(sweep_dir) == ["COMPLETE", "COMPLETE", "COMPLETE"]


def sampler_of(name: str, *overrides: str):
    """The sampler `hydra/sweeper/sampler=<name>` builds, as the search gets it (instantiated by Hydra)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from fmnist_lab.cli import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=optuna", f"hydra/sweeper/sampler={name}", *overrides],
                      return_hydra_config=True)
    return instantiate(cfg.hydra.sweeper.sampler)


def proposals(sampler, space: dict, trials: int) -> list[dict]:
    """What `sampler` proposes for `space` over `trials` trials of a maximization (the objective peaks at
    lr=0.01, momentum=0.9)."""
    import math

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=sampler, direction="maximize")
    for _ in range(trials):
        trial = study.ask(space)
        study.tell(trial, -(math.log10(trial.params["lr"]) + 2) ** 2 - (trial.params["momentum"] - 0.9) ** 2)
    return [t.params for t in study.trials]


@pytest.mark.parametrize(("name", "kind"), [("tpe", "TPESampler"), ("cmaes", "CmaEsSampler"), ("gp", "GPSampler")])
def test_each_model_based_sampler_proposes_from_its_own_model(name, kind):
    """After its random start-up trials, each sampler's proposals differ from a random sampler's with the same
    seed: they come from its own model (CMA-ES also records its generations in the trials)."""
    from optuna.distributions import FloatDistribution
    from optuna.samplers import RandomSampler

    from hydra_plugins.fmnist_lab_optuna import make_sampler

    space = {"lr": FloatDistribution(1e-4, 1.0, log=True), "momentum": FloatDistribution(0.5, 0.99)}
    sampler, limit = make_sampler(sampler_of(name, "seed=7"), space)
    assert type(sampler).__name__ == kind and limit is None
    ours, random = proposals(sampler, space, 9), proposals(RandomSampler(seed=7), space, 9)
    assert ours[5:] != random[5:]
    assert all(1e-4 <= p["lr"] <= 1.0 and 0.5 <= p["momentum"] <= 0.99 for p in ours)


def test_the_random_and_grid_samplers_cover_the_space_as_they_should():
    import optuna

    from hydra_plugins.fmnist_lab_optuna import make_sampler, search_space, tell

    space, _ = search_space({"batch_size": "choice(64, 128)", "epochs": "range(1, 4)"}, [])
    sampler, combinations = make_sampler(sampler_of("grid", "seed=7"), space)
    assert type(sampler).__name__ == "GridSampler" and combinations == 6
    study = optuna.create_study(sampler=sampler)
    for _ in range(combinations):
        tell(study, study.ask(space), 0.0)  # the last one ends the grid: no error
    assert sorted((t.params["batch_size"], t.params["epochs"]) for t in study.trials) == \
        [(b, e) for b in (64, 128) for e in (1, 2, 3)]  # every combination once

    assert type(make_sampler(sampler_of("random", "seed=7"), space)[0]).__name__ == "RandomSampler"
    space, _ = search_space({"lr": "interval(0.001, 0.1)"}, [])
    with pytest.raises(SystemExit, match=r"sampler=grid .* lr is an interval.*choice\(...\) or range\(...\)"):
        make_sampler(sampler_of("grid"), space)


def test_the_swept_keys_are_the_sweeps_overrides_with_several_values_and_its_search_space():
    keys = swept_keys(["lr=0.01,0.1", "batch_size=range(32,129,32)", "model=mlp,cnn", "epochs=3", "+x=1",
                       "~callbacks.report"], {"optimizer.momentum": "interval(0.5, 0.99)", "lr": "interval(0.001, 1)"})
    assert keys == ["lr", "batch_size", "model", "optimizer.momentum"]
    values = swept_values(["lr=0.0031622776601683794", "epochs=3", "optimizer.momentum=0.9", "model=cnn",
                           "batch_size=64", "~callbacks.report"], keys)
    assert values == [("lr", "0.0031622776601683794"), ("optimizer.momentum", "0.9"), ("model", "cnn"),
                      ("batch_size", "64")]
    assert run_name(values) == "lr=0.003162,optimizer.momentum=0.9,model=cnn,batch_size=64"
    assert swept_keys(["lr=0.1", "epochs=3"], None) == [] and run_name([]) == ""  # one value each: no sweep


def test_a_job_keeps_writing_its_curves_where_they_are(tmp_path):
    """The TensorBoard folder a run's events go to: a new sweep job's is named by its swept values, a single run's
    is tensorboard/ itself, and a run that has curves keeps their folder, also when it is resumed on its own
    (resume=<job folder>: a single run then, without swept values)."""
    root = tmp_path / "job" / "tensorboard"
    assert run_folder(root, "lr=0.1") == "lr=0.1" and run_folder(root, "") == ""
    (root / "lr=0.1").mkdir(parents=True)
    (root / "lr=0.1" / "events.out.tfevents.1795984961.host.1.0").touch()
    assert run_folder(root, "") == "lr=0.1" and run_folder(root, "lr=0.1") == "lr=0.1"
    earlier = tmp_path / "earlier" / "tensorboard"  # events directly in tensorboard/: the run goes on there
    earlier.mkdir(parents=True)
    (earlier / "events.out.tfevents.1795984961.host.1.0").touch()
    assert run_folder(earlier, "lr=0.1") == ""


FRESH_SHELL = ("env", "-i", f"PATH={os.defpath}", f"HOME={Path.home()}")  # a shell where the venv is not active


def served(url: str, body: dict | None = None) -> Any:
    """A TensorBoard server's JSON answer at `url` (POSTed `body` for the hparams plugin's queries)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=60).read())


def printed(result: subprocess.CompletedProcess, label: str) -> list[str]:
    """What the jobs printed after `label:` (the lines that name each logger's command or file)."""
    return re.findall(rf"^{label}: +(.+)$", result.stdout, re.MULTILINE)


@pytest.mark.slow
def test_each_sweep_job_is_named_by_its_swept_values_in_tensorboard_and_mlflow(synthetic_root, tmp_path):
    """A 2x2 grid whose jobs with lr=10000 diverge: each job's TensorBoard run is named by its swept values (and a
    resumed job keeps writing there), HPARAMS opens on the swept keys and the objective, every MLflow run, a failed
    one too, carries the swept values in its name and as params, and the commands the jobs print work as printed
    from a shell without the venv."""
    result, sweep_dir, rows = sweep(tmp_path, "lr=0.05,10000", "batch_size=64,128", "logger=[tensorboard,csv,mlflow]",
                                    f"data.root={synthetic_root}", "epochs=1", *QUICK, check=False)
    names = ["lr=0.05,batch_size=64", "lr=0.05,batch_size=128", "lr=10000,batch_size=64", "lr=10000,batch_size=128"]
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "failed"]
    jobs = [Path(r["run_dir"]) for r in rows]
    assert [tensorboard_run(job) for job in jobs] == [job / "tensorboard" / name
                                                      for job, name in zip(jobs, names, strict=True)]

    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    tracked = {r.data.tags["run_dir"]: r for r in client.search_runs([client.get_experiment_by_name("fmnist_lab")
                                                                      .experiment_id])}
    for job, name, row in zip(jobs, names, rows, strict=True):
        run = tracked[str(job.resolve())]
        assert run.info.run_name == f"{name} ({job.resolve().relative_to((tmp_path / 'outputs').resolve())})"
        assert {k: run.data.params[k] for k in ("lr", "batch_size")} == dict(v.split("=") for v in name.split(","))
        assert run.info.status == ("FINISHED" if row["status"] == "ok" else "FAILED")
    best = json.loads((jobs[0] / "metrics.json").read_text())["val/acc_best"]
    assert tracked[str(jobs[0].resolve())].data.metrics["val/acc_best"] == pytest.approx(best)

    bin_dir = Path(sys.executable).parent
    tensorboard = bin_dir / "tensorboard"
    assert printed(result, "curves") == [f"{tensorboard} --logdir {job / 'tensorboard'}" for job in jobs[:2]]
    assert printed(result, "metrics") == [str(job / "csv" / "metrics.csv") for job in jobs[:2]]
    assert "hp/val_acc_best" in (jobs[0] / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert set(printed(result, "mlflow")) == {f"{bin_dir / 'mlflow'} ui --backend-store-uri "
                                               f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"}
    command = shlex.split(printed(result, "curves")[0])
    with web_server(tmp_path, *FRESH_SHELL, *command, "--host", "127.0.0.1", "--port", "{port}") as url:
        runs = served(f"{url}/data/runs")
        experiment = served(f"{url}/data/plugin/hparams/experiment", {"experimentName": ""})
        groups = served(f"{url}/data/plugin/hparams/session_groups", {
            "experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE"],
            "colParams": [], "startIndex": 0, "sliceSize": 10})["sessionGroups"]
    assert runs == [names[0]]
    # the columns the page ticks: the first five hparams and metrics, so the swept keys, then the objective
    assert [(h["name"], h["differs"]) for h in experiment["hparamInfos"]] == [("batch_size", True), ("lr", True)]
    assert experiment["metricInfos"][0]["name"]["tag"] == "hp/val_acc_best"
    (group,) = groups
    assert group["name"] == names[0] and group["sessions"][0]["status"] == "STATUS_SUCCESS"
    assert {m["name"]["tag"]: m["value"] for m in group["metricValues"]}["hp/val_acc_best"] == pytest.approx(best)
    for job in jobs[2:]:  # a diverged job has its HPARAMS row too, marked failed
        events = EventAccumulator(str(tensorboard_run(job)))
        events.Reload()
        end = plugin_data_pb2.HParamsPluginData.FromString(
            events.PluginTagToContent("hparams")["_hparams_/session_end_info"])
        assert end.session_end_info.status == api_pb2.STATUS_FAILURE, job

    # resume=<job folder> runs it outside its sweep: it still writes into its own run's folder
    (jobs[0] / "metrics.json").unlink()
    before = len(list(tensorboard_run(jobs[0]).iterdir()))
    resumed = run_cli(tmp_path, f"resume={jobs[0]}")
    assert tensorboard_run(jobs[0]) == jobs[0] / "tensorboard" / names[0]
    assert len(list(tensorboard_run(jobs[0]).iterdir())) > before and "MLflow" not in resumed.stderr
    assert len(client.search_runs([run.info.experiment_id])) == 4

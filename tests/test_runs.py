"""`python -m fmnist_lab.runs`: every run of many invocations in one table, seed statistics, diffs."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import signal
import statistics
import subprocess
from pathlib import Path

import pytest

from conftest import run_cli
from fmnist_lab.runs import main as runs_main
from test_resume import QUICK, start_and_signal
from test_runs_hostile import CONFIG, FINISHED, in_process, write_run

SMALL = ["trainer.limit_train_batches=30", "trainer.limit_val_batches=2", "epochs=2"]


@pytest.fixture(scope="module")
def tree(synthetic_root, tmp_path_factory) -> Path:
    """A week of work in one outputs/: a finished run, a failed one, an interrupted one and a 3-seed sweep of
    the finished run's recipe."""
    cwd = tmp_path_factory.mktemp("runs")
    common = [f"data.root={synthetic_root}", *QUICK, *SMALL]
    run_cli(cwd, *common)
    assert run_cli(cwd, *common, "lr=1e4", check=False).returncode == 1
    assert start_and_signal(cwd, signal.SIGTERM, f"data.root={synthetic_root}", *QUICK).returncode == 143
    run_cli(cwd, "-m", "seed=0,1,2", *common)
    return cwd


def kinds(rows: list[dict]) -> dict[str, dict]:
    """The single runs of the tree by what happened to them (the sweep's jobs are the rows with a seed)."""
    single = [r for r in rows if not r["overrides"].startswith("seed=")]
    return {kind: next(r for r in single if r["status"] == status)
            for kind, status in (("finished", "ok"), ("failed", "failed"), ("interrupted", "interrupted"))}


def runs(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli(cwd, *args, module="fmnist_lab.runs")


def metrics_of(cwd: Path) -> dict[Path, dict]:
    return {p.parent: json.loads(p.read_text()) for p in (cwd / "outputs").rglob("metrics.json")}


def rows_of(cwd: Path, *args: str) -> list[dict]:
    return json.loads(runs(cwd, "--json", *args).stdout)


@pytest.mark.slow
def test_runs_lists_finished_failed_interrupted_and_sweep_jobs_newest_first(tree):
    rows = rows_of(tree)
    assert sorted(r["status"] for r in rows) == ["failed", "interrupted", "ok", "ok", "ok", "ok"]
    jobs = [r["overrides"].split()[0] for r in rows if r["overrides"].startswith("seed=")]
    assert jobs == ["seed=2", "seed=1", "seed=0"]  # one after another in their sweep: the last one first
    assert [r["when"] for r in rows] == sorted((r["when"] for r in rows), reverse=True)
    by_dir = {str(tree / r["dir"]): r for r in rows}
    for path, metrics in metrics_of(tree).items():
        row = by_dir.pop(str(path))
        assert row["test/acc"] == metrics.get("test/acc") and row["model"] == "MLP"
    assert not by_dir  # every row is a run folder, every run folder a row

    finished, failed, interrupted = kinds(rows).values()
    assert finished["epochs"] == 2 and finished["test/acc"] > 0.9 and finished["device"] == "cpu"
    assert failed["epochs"] == 0 and failed["error"].startswith("FloatingPointError: training loss became nan")
    assert failed["resume"] is None
    assert interrupted["epochs"] == 1 and interrupted["max_epochs"] == 3
    assert interrupted["error"].startswith("SIGTERM at step ")
    assert interrupted["resume"] == f"python -m fmnist_lab resume={interrupted['dir']}"

    text = runs(tree).stdout
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["when", "status", "overrides", "model"]
    assert len([line for line in lines[1:7] if line.strip()]) == 6
    assert f"interrupted: {interrupted['dir']} (epoch 1): SIGTERM at step" in text
    assert f"    continue it with: python -m fmnist_lab resume={interrupted['dir']}" in text
    assert f"failed: {failed['dir']} (epoch 0): FloatingPointError: training loss became nan" in text
    (line,) = [line for line in lines[1:7] if line.split()[2] == "interrupted"]
    assert " 1/3 " in line  # 1 of its 3 epochs done


@pytest.mark.slow
def test_runs_filters_sorts_limits_and_writes_csv(tree):
    all_rows = rows_of(tree)
    assert [r["status"] for r in rows_of(tree, "--filter", "status=failed")] == ["failed"]
    assert len(rows_of(tree, "--filter", "lr=1e4")) == 1 and len(rows_of(tree, "--filter", "lr!=10000")) == 5
    assert len(rows_of(tree, "--filter", "model=mlp")) == 6 == len(rows_of(tree, "--filter", "model=MLP"))
    assert rows_of(tree, "--filter", "model=cnn") == [] and "no runs found matching" in runs(tree, "--filter",
                                                                                           "model=cnn").stdout
    assert [r["overrides"].split()[0] for r in rows_of(tree, "--filter", "seed=1")] == ["seed=1"]
    assert len(rows_of(tree, "--filter", "optimizer=sgd", "--filter", "status=ok")) == 4

    ranked = rows_of(tree, "--sort", "test/acc")
    scores = [r["test/acc"] for r in ranked if r["test/acc"] is not None]
    assert scores == sorted(scores, reverse=True) and len(scores) == 4
    assert all(r["test/acc"] is None for r in ranked[4:])
    assert [r["test/acc"] for r in rows_of(tree, "--sort", "test/acc", "--reverse")][:4] == scores[::-1]
    losses = [r["test/loss"] for r in rows_of(tree, "--sort", "test/loss")][:4]
    assert losses == sorted(losses)
    assert rows_of(tree, "--last", "2") == all_rows[:2]

    table = list(csv.DictReader(io.StringIO(runs(tree, "--csv").stdout)))
    assert [r["dir"] for r in table] == [r["dir"] for r in all_rows]
    for line, row in zip(table, all_rows, strict=True):
        assert (float(line["test/acc"]) if line["test/acc"] else None) == row["test/acc"]


def test_runs_group_std_is_the_sample_standard_deviation(tmp_path, capsys):
    """Three seeds scoring 0.90, 0.92 and 0.97: the table gives the sample std (n - 1), 0.0361; dividing by n
    would give 0.0294."""
    for seed, acc in ((0, 0.90), (1, 0.92), (2, 0.97)):
        write_run(tmp_path / "outputs" / f"seed{seed}", {**FINISHED, "test/acc": acc, "seed": seed},
                  config=CONFIG.replace("seed: 1", f"seed: {seed}"), overrides=f"- seed={seed}\n")
    text = in_process(capsys, "--group", str(tmp_path / "outputs"))
    assert f"0.9300 ± {statistics.stdev([0.90, 0.92, 0.97]):.4f}" in text and "0.9300 ± 0.0361" in text


@pytest.mark.slow
def test_runs_group_gives_the_mean_and_std_over_seeds(tree):
    groups = rows_of(tree, "--group")
    recipe = [m for m in metrics_of(tree).values() if m.get("status", "ok") == "ok"]
    assert len(recipe) == 4  # the single run (seed 42) and the three sweep jobs share one recipe
    (group,) = groups  # failed and interrupted runs are not statistics
    assert group["runs"] == 4 and sorted(group["seeds"]) == [0, 1, 2, 42]
    for key in ("test/acc", "val/acc_best"):
        values = [m[key] for m in recipe]
        assert group[f"{key} mean"] == pytest.approx(statistics.fmean(values), abs=1e-12)
        assert group[f"{key} std"] == pytest.approx(statistics.stdev(values), abs=1e-12)
    text = runs(tree, "--group").stdout
    mean, std = group["test/acc mean"], group["test/acc std"]
    assert f"{mean:.4f} ± {std:.4f}" in text and "4 " in text.splitlines()[1]


@pytest.mark.slow
def test_runs_diff_shows_the_differing_keys_and_both_runs_metrics(tree):
    rows = rows_of(tree)
    single = kinds(rows)
    finished, failed = single["finished"]["dir"], single["failed"]["dir"]
    d = json.loads(runs(tree, "diff", finished, failed, "--json").stdout)
    assert d["config"] == {"lr": [0.05, 10000.0], "optimizer.lr": [0.05, 10000.0]}
    assert d["metrics"]["status"] == ["ok", "failed"] and d["metrics"]["test/acc"][0] == single["finished"]["test/acc"]
    text = runs(tree, "diff", finished, failed).stdout
    assert re.search(r"^optimizer\.lr +0\.05 +10000\.0$", text, re.M)
    assert re.search(rf"^test/acc +{single['finished']['test/acc']:.4f} +\(absent\)$", text, re.M)
    jobs = [r["dir"] for r in rows if r["overrides"].startswith("seed=")]  # seeds 2 and 1
    seeds = runs(tree, "diff", jobs[0], jobs[1]).stdout.split("\n\n")[1]
    assert re.search(r"^seed +2 +1$", seeds, re.M) and "lr" not in seeds

    bad = run_cli(tree, "diff", finished, str(tree), module="fmnist_lab.runs", check=False)
    assert bad.returncode == 1 and "is not a run directory (it has no .hydra/ folder)" in bad.stderr


@pytest.mark.slow
def test_runs_needs_neither_torch_nor_hydra(tree):
    blocked = ("torch", "lightning", "hydra", "omegaconf")
    assert "± " in run_cli(tree, "--group", module="fmnist_lab.runs", blocked=blocked).stdout
    assert "seed=2" in run_cli(tree, "--last", "3", module="fmnist_lab.runs", blocked=blocked).stdout


def test_an_unfinished_run_shows_its_last_logged_epoch_and_how_to_continue(tmp_path, capsys, monkeypatch):
    """A run killed outright (or still running) has no metrics.json: its log file says how far it got."""
    run = tmp_path / "outputs" / "2026-01-01" / "10-00-00"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("epochs: 10\nmodel:\n  _target_: fmnist_lab.models.CNN\n")
    (run / ".hydra" / "overrides.yaml").write_text("- model=cnn\n")
    (run / "fmnist_lab.log").write_text("[x][INFO] - epoch 1/10: val/acc 0.8\n[x][INFO] - epoch 2/10: val/acc 0.85\n")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    damaged = tmp_path / "outputs" / "2026-01-01" / "09-00-00"
    shutil.copytree(run / ".hydra", damaged / ".hydra")
    (damaged / "metrics.json").write_text("{not json")
    monkeypatch.chdir(tmp_path)
    assert runs_main([]) == 0
    out = capsys.readouterr().out
    assert "unfinished: outputs/2026-01-01/10-00-00 (epoch 2): no metrics.json: still running, or killed" in out
    assert "continue it with: python -m fmnist_lab resume=outputs/2026-01-01/10-00-00" in out
    assert ("damaged: outputs/2026-01-01/09-00-00 (epoch -): metrics.json is damaged: it is not valid JSON (Expecting "
            "property name enclosed in double quotes: line 1 column 2 (char 1)); restore it from a copy.") in out
    assert " 2/10 " in out and "CNN" in out

    (run / ".hydra" / "hydra.yaml").write_text("- not: a mapping\n")  # damaged: no group choices, no crash
    assert runs_main(["--filter", "model=cnn", "--filter", "optimizer!=sgd", "--json"]) == 0
    assert [r["dir"] for r in json.loads(capsys.readouterr().out)] == [  # both hold a CNN config
        "outputs/2026-01-01/10-00-00", "outputs/2026-01-01/09-00-00"]

    assert runs_main(["nowhere"]) == 1
    assert "nowhere is not a folder" in capsys.readouterr().err
    assert runs_main(["--filter", "model"]) == 1
    assert "--filter 'model': write KEY=VALUE" in capsys.readouterr().err


def test_last_keeps_the_best_runs_of_the_sorted_table(tmp_path, capsys, monkeypatch):
    """--last after --sort: the best run is the oldest, so the newest two sorted would leave it out."""
    for day, acc in ((1, 0.95), (2, 0.90), (3, 0.80), (4, 0.85)):
        write_run(tmp_path / "outputs" / f"day{day}", {**FINISHED, "test/acc": acc,
                                                       "started": f"2026-01-0{day}T10:00:00"})
    monkeypatch.chdir(tmp_path)

    def dirs(*args: str) -> list[str]:
        return [r["dir"] for r in json.loads(in_process(capsys, "--json", *args))]

    assert dirs("--sort", "test/acc", "--last", "2") == ["outputs/day1", "outputs/day2"]
    assert dirs("--sort", "test/acc", "--reverse", "--last", "2") == ["outputs/day3", "outputs/day4"]
    assert dirs("--last", "2") == ["outputs/day4", "outputs/day3"]  # no --sort: the newest
    assert dirs("--filter", "test/acc!=0.95", "--sort", "test/acc", "--last", "1") == ["outputs/day2"]
    (group,) = json.loads(in_process(capsys, "--group", "--json", "--sort", "test/acc", "--last", "2"))
    assert group["dirs"] == ["outputs/day1", "outputs/day2"]  # --group groups those runs
    assert runs_main(["--last", "0"]) == 1
    assert capsys.readouterr().err == ("error: --last 0: give how many runs to show, a whole number from 1, e.g. "
                                       "--last 20\n")


def test_diff_shows_each_setting_resolved_or_as_written_and_never_a_blank_cell(tmp_path, capsys, monkeypatch):
    extra = ("paths:\n  output_dir: ${hydra:runtime.output_dir}\nrun_dir: ${paths.output_dir}\n"
             "note: null\nversion: ''\nlimit: '0.1'\n")
    write_run(tmp_path / "a", FINISHED, CONFIG + "optimizer:\n  lr: ${..lr}\n" + extra)
    write_run(tmp_path / "b", FINISHED, CONFIG.replace("lr: 0.1", "lr: 0.2") + "optimizer:\n  lr: ${lr}\n"
              + "limit: 0.1\n")
    monkeypatch.chdir(tmp_path)
    d = json.loads(in_process(capsys, "diff", "a", "b", "--json"))
    assert d["config"] == {"limit": ["0.1", 0.1], "lr": [0.1, 0.2], "note": [None, None], "optimizer.lr": [0.1, 0.2],
                           "run_dir": ["${paths.output_dir}", None], "version": ["", None]}
    rows = in_process(capsys, "diff", "a", "b").split("\n\n")[1].splitlines()
    assert [line.split() for line in rows] == [
        ["config", "key", "A", "B"], ["limit", '"0.1"', "0.1"], ["lr", "0.1", "0.2"], ["note", "null", "(not", "set)"],
        ["optimizer.lr", "0.1", "0.2"], ["run_dir", "${paths.output_dir}", "(not", "set)"],
        ["version", '""', "(not", "set)"]]

"""`python -m fmnist_lab.runs` over run folders that came from elsewhere or were damaged: every file it reads is
untrusted, so no value, file kind or YAML trick may hang it or stop the listing. Run folders are written by
hand here (no training), and whatever could hang runs in a subprocess with a timeout and a memory cap."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from fmnist_lab.runs import main as runs_main

CONFIG = ("seed: 1\nepochs: 2\nlr: 0.1\nmodel:\n  _target_: fmnist_lab.models.MLP\n  hidden: [512, 512]\n"
          "trainer:\n  max_epochs: ${epochs}\n")
HYDRA = "hydra:\n  runtime:\n    choices:\n      model: mlp\n      optimizer: sgd\n"
FINISHED = {"test/acc": 0.9, "val/acc_best": 0.91, "test/loss": 0.3, "test/macro_f1": 0.9, "test/ece": 0.01,
            "epochs": 2, "global_step": 100, "train_seconds": 5.0, "device": "cpu", "precision": "32-true",
            "started": "2026-01-01T10:00:00", "git": {"commit": "0123abcd", "dirty": False}, "task": "train"}


def alias_bomb(sequence: bool = False) -> str:
    """YAML of under a kilobyte whose aliases expand to 9**9 strings: nine levels, each nine aliases of the one
    before, as mappings (a config) or as a sequence of lists (an overrides list)."""
    def level(name: str, items: list[str]) -> str:
        if sequence:
            return f"- &{name} [{', '.join(items)}]\n"
        return f"{name}: &{name} {{{', '.join(f'{name}{i}: {item}' for i, item in enumerate(items))}}}\n"
    pairs = zip("abcdefgh", "bcdefghi", strict=True)
    return level("a", ["lol"] * 9) + "".join(level(b, [f"*{a}"] * 9) for a, b in pairs)


BOMBS = {".hydra/config.yaml": alias_bomb(), ".hydra/overrides.yaml": alias_bomb(sequence=True),
         ".hydra/hydra.yaml": alias_bomb() + "hydra: {runtime: {choices: {model: *i}}}\n"}


def write_run(path: Path, metrics: dict | str | None = None, config: str = CONFIG, overrides: str = "- lr=0.1\n",
              hydra: str | None = HYDRA) -> Path:
    """A run folder as training leaves it; `metrics` as JSON text when a str (to write what json.dumps can't)."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(config)
    (path / ".hydra" / "overrides.yaml").write_text(overrides)
    if hydra is not None:
        (path / ".hydra" / "hydra.yaml").write_text(hydra)
    if metrics is not None:
        (path / "metrics.json").write_text(metrics if isinstance(metrics, str) else json.dumps(metrics))
    return path


def cap_memory() -> None:  # a bomb that slipped through fails at 2 GiB instead of taking the machine's memory
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def runs(cwd: Path, *args: str, timeout: int = 30) -> subprocess.CompletedProcess:
    """`python -m fmnist_lab.runs <args>` in a fresh process, as a user runs it; a hang fails the test."""
    return subprocess.run([sys.executable, "-m", "fmnist_lab.runs", *args], cwd=cwd, capture_output=True, text=True,
                          encoding="utf-8", timeout=timeout, preexec_fn=cap_memory)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stdout


def table_dirs(text: str) -> set[str]:
    """The dir column of a listing: the last word of each table line (notes follow a blank line)."""
    return {line.split()[-1] for line in text.split("\n\n")[0].splitlines()[1:]}


def in_process(capsys, *args: str) -> str:
    """runs' main in this process (fast); an exception fails the test as a traceback would fail the user."""
    capsys.readouterr()
    assert runs_main(list(args)) == 0
    return capsys.readouterr().out


# --- files that are not what they should be: alias bombs, FIFOs, devices ---------------------------------------

@pytest.mark.parametrize("name", [".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml"])
def test_a_yaml_alias_bomb_is_refused_at_once_and_the_run_still_listed(tmp_path, name):
    bomb = write_run(tmp_path / "outputs" / "bomb", FINISHED)
    (bomb / name).write_text(BOMBS[name])
    assert len(BOMBS[name]) < 1000
    write_run(tmp_path / "outputs" / "good", FINISHED)
    note = f"note: outputs/bomb: {name} uses YAML anchors or aliases"
    text = ok(runs(tmp_path, "--filter", "model=mlp", "--filter", "lr!=0.2"))  # reads all three files
    assert note in text and "outputs/bomb" in table_dirs(text)
    rows = json.loads(ok(runs(tmp_path, "--json", "--filter", "optimizer!=adam")))
    (row,) = [r for r in rows if r["dir"] == "outputs/bomb"]
    assert any(n.startswith(f"{name} uses YAML anchors or aliases") for n in row["notes"])
    if name == ".hydra/config.yaml":  # what the config would have told is unknown, not absent
        assert row["model"] is None and " ? " in text
    diff = ok(runs(tmp_path, "diff", "outputs/good", "outputs/bomb"))
    assert "B: outputs/bomb\n" in diff and (note in diff) == (name != ".hydra/hydra.yaml")  # not read by diff


@pytest.mark.parametrize("name", ["metrics.json", ".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml",
                                  "fmnist_lab.log"])
def test_a_fifo_or_device_in_place_of_any_file_is_refused_without_waiting(tmp_path, name):
    metrics = None if name == "fmnist_lab.log" else FINISHED  # the log is read when metrics.json has no epochs
    for kind in ("fifo", "device"):
        run = write_run(tmp_path / "outputs" / kind, metrics)
        (run / name).unlink(missing_ok=True)
        if kind == "fifo":
            os.mkfifo(run / name)
        else:
            (run / name).symlink_to("/dev/zero")
    write_run(tmp_path / "outputs" / "good", FINISHED)
    text = ok(runs(tmp_path, "--filter", "optimizer!=adam"))  # --filter on a group reads hydra.yaml
    assert {"outputs/fifo", "outputs/device", "outputs/good"} == table_dirs(text)
    start = "damaged: outputs/{} (epoch -): " if name == "metrics.json" else "note: outputs/{}: "
    assert start.format("fifo") + f"{name} is a FIFO, not a file; it is not read." in text
    assert start.format("device") + f"{name} is a device, not a file; it is not read." in text
    for kind in ("fifo", "device"):
        d = json.loads(ok(runs(tmp_path, "diff", "outputs/good", f"outputs/{kind}", "--json")))
        assert d["runs"][1] == f"outputs/{kind}"
        if name not in (".hydra/hydra.yaml", "fmnist_lab.log"):  # the files diff reads
            assert any(n.startswith(f"{name} is a ") for n in d["notes"][1]), d["notes"]


# --- any value of any key: a fuzz over what runs reads ------------------------------------------------------------

HOSTILE_JSON = {
    "text": '"abc"', "negative": "-1", "list": "[1, 2]", "mapping": '{"a": 1}', "true": "true", "false": "false",
    "null": "null", "huge int": "1" + "0" * 400, "NaN": "NaN", "Infinity": "Infinity", "-Infinity": "-Infinity",
    "deep list": "[" * 500 + "]" * 500, "long text": json.dumps("x" * 100_000),
    "year 10000": '"9999-12-31T23:00:00-14:00"', "year 0": '"0001-01-01T00:00:00+14:00"',
    "control characters": json.dumps("\x1b[2J\nnext line"), "lone surrogate": '"\\ud800"',
    "too many digits": "1" * 5000,  # beyond what Python turns into an int: the whole file is unreadable
}
WRONG_FOR_EVERY_KEY = ("list", "mapping", "true", "false", "huge int", "NaN", "Infinity", "-Infinity", "deep list")
SHOWN = ("status", "task", "started", "test/acc", "val/acc_best", "test/loss", "epochs", "train_seconds", "device",
         "error", "git", "lr_suggestion", "test_images")  # read for the listing
COMPARED = ("test/macro_f1", "test/ece", "global_step", "precision")  # read by diff only
DIFFED = ("status", "test/acc", "val/acc_best", "test/loss", "test/macro_f1", "test/ece", "epochs", "global_step",
          "train_seconds", "device", "precision", "git")
BASE = {"lr_suggestion": {"task": "lr_find", "lr_suggestion": 0.01, "started": "2026-01-01T10:00:00"},
        "error": {"status": "failed", "error": "RuntimeError: x", "epochs": 0},
        "test_images": {**FINISHED, "task": "debug", "test_images": 32}}


def slug(text: str) -> str:
    return text.replace("/", "_").replace(" ", "_")


@pytest.fixture(scope="module")
def fuzz_tree(tmp_path_factory) -> Path:
    """outputs/<key>/<hostile value>: a realistic metrics.json with one key replaced, for each key runs reads."""
    cwd = tmp_path_factory.mktemp("fuzz")
    for key in (*SHOWN, *COMPARED):
        for label, value in HOSTILE_JSON.items():
            metrics = json.dumps(BASE.get(key, FINISHED))[:-1] + f", {json.dumps(key)}: {value}}}"  # the last wins
            write_run(cwd / "outputs" / slug(key) / slug(label), metrics)
    write_run(cwd / "good", FINISHED)
    return cwd


def fuzz_dirs(key: str | None = None) -> set[str]:
    keys = (*SHOWN, *COMPARED) if key is None else (key,)
    return {f"outputs/{slug(k)}/{slug(label)}" for k in keys for label in HOSTILE_JSON}


def test_no_value_of_any_metrics_key_stops_any_listing_mode(fuzz_tree):
    text = ok(runs(fuzz_tree, timeout=120))
    assert table_dirs(text) == fuzz_dirs()
    assert "\x1b" not in text and "\\u001b[2J" in text  # a file's escape sequences are shown, not obeyed
    rows = json.loads(ok(runs(fuzz_tree, "--json", timeout=120)))
    assert {r["dir"] for r in rows} == fuzz_dirs()
    assert {r["dir"] for r in csv.DictReader(io.StringIO(ok(runs(fuzz_tree, "--csv", timeout=120))))} == fuzz_dirs()
    assert len(table_dirs(ok(runs(fuzz_tree, "--last", "5", timeout=120)))) == 5
    grouped = json.loads(ok(runs(fuzz_tree, "--group", "--json", timeout=120)))
    assert ok(run_cli(fuzz_tree, "--csv", module="fmnist_lab.runs", check=False, timeout=120,
                      blocked=("torch", "lightning", "hydra", "omegaconf")))  # it never needs them
    assert {d for g in grouped for d in g["dirs"]} == {r["dir"] for r in rows if r["status"] == "ok"}
    assert ok(runs(fuzz_tree, "--group", timeout=120)).startswith("runs ")

    by_dir = {r["dir"]: r for r in rows}
    for key in SHOWN:
        for label in WRONG_FOR_EVERY_KEY:
            row = by_dir[f"outputs/{slug(key)}/{slug(label)}"]
            assert any(n.startswith(f"metrics.json: {key} is ") for n in row["notes"]), (key, label, row["notes"])
            if key not in (*BASE, "test/acc", "status"):  # the rest of the row as usual
                assert row["test/acc"] == 0.9 and row["status"] == "ok" and row["model"] == "MLP", (key, label)
        row = by_dir[f"outputs/{slug(key)}/too_many_digits"]
        assert row["status"] == "damaged"
        assert row["error"].startswith("metrics.json is damaged: it is not valid JSON (ValueError")
    for key in ("test/acc", "epochs", "train_seconds", "device"):  # a value it cannot use shows as ?
        assert by_dir[f"outputs/{slug(key)}/list"][key] is None
    assert by_dir["outputs/started/year_10000"]["when"] is None


@pytest.mark.parametrize("key", [*SHOWN, *COMPARED])
def test_no_value_of_a_metrics_key_stops_filter_sort_or_diff(fuzz_tree, capsys, monkeypatch, key):
    monkeypatch.chdir(fuzz_tree)
    folder = f"outputs/{slug(key)}"
    assert table_dirs(in_process(capsys, folder, "--sort", key)) == fuzz_dirs(key)
    assert table_dirs(in_process(capsys, folder, "--sort", key, "--reverse")) == fuzz_dirs(key)
    assert table_dirs(in_process(capsys, folder, "--filter", f"{key}!=no such value")) == fuzz_dirs(key)
    for wanted in ("1", "abc", "[1, 2]", "null", "true"):
        in_process(capsys, folder, "--json", "--filter", f"{key}={wanted}")
    for label in HOSTILE_JSON:
        run = f"{folder}/{slug(label)}"
        assert f"B: {run}\n" in in_process(capsys, "diff", "good", run)
        d = json.loads(in_process(capsys, "diff", run, "good", "--json"))
        if label in WRONG_FOR_EVERY_KEY and key in DIFFED:  # ? (null in JSON) and a note
            assert any(n.startswith(f"metrics.json: {key} is ") for n in d["notes"][0]), (label, d["notes"])
            assert d["metrics"][key][0] in (None, "?")


def test_the_reported_values_show_a_question_mark_and_a_note(tmp_path, capsys, monkeypatch):
    """The issue's three: a start date past the year 9999, a text lr suggestion, a text git record."""
    write_run(tmp_path / "outputs" / "late", {**FINISHED, "started": "9999-12-31T23:00:00-14:00"})
    write_run(tmp_path / "outputs" / "rate", {"task": "lr_find", "lr_suggestion": "abc"})
    write_run(tmp_path / "outputs" / "git", {**FINISHED, "git": "abc"})
    monkeypatch.chdir(tmp_path)
    text = in_process(capsys)
    last = text.split("\n\n")[0].splitlines()[-1]
    assert last.startswith("?  ") and last.endswith("outputs/late")  # no usable date: ? and last
    assert ('note: outputs/late: metrics.json: started is "9999-12-31T23:00:00-14:00", not a date and time '
            "(ISO 8601), so runs cannot use it and shows ?.") in text
    assert "lr_find: outputs/rate: suggested lr ?\n" in text
    assert 'note: outputs/rate: metrics.json: lr_suggestion is "abc", not a number' in text
    diff = in_process(capsys, "diff", "outputs/late", "outputs/git")
    assert re.search(r"^git +0123abcd +\?$", diff, re.M)
    assert 'note: outputs/git: metrics.json: git is "abc", not a mapping with the "commit" hash' in diff


# --- the YAML files: any value in the slots runs reads --------------------------------------------------------------

HOSTILE_YAML = {
    "text": "abc", "list": "[1, 2]", "mapping": "{a: 1}", "true": "true", "null": "null", "huge int": "1" + "0" * 400,
    "NaN": ".nan", "Infinity": ".inf", "deep list": "[" * 200 + "]" * 200, "long text": "x" * 100_000,
    "date": "2024-01-01", "bytes": "!!binary aGVsbG8=", "set": "!!set {a: null, b: null}",
    "too many digits": "0x" + "f" * 4000, "python tag": "!!python/object/apply:os.system [echo hi]",
    "control characters": '"\\x1b[2J\\nnext"',
}
SLOTS = {  # where the value goes: file -> text
    "seed": {"config.yaml": CONFIG.replace("seed: 1", "seed: {}")},
    "epochs": {"config.yaml": CONFIG.replace("epochs: 2", "epochs: {}")},  # trainer.max_epochs: ${epochs}
    "model_target": {"config.yaml": CONFIG.replace("fmnist_lab.models.MLP", "{}")},
    "model_hidden": {"config.yaml": CONFIG.replace("[512, 512]", "{}")},
    "lr": {"config.yaml": CONFIG.replace("lr: 0.1", "lr: {}")},
    "config": {"config.yaml": "{}"},
    "overrides": {"overrides.yaml": "{}"},
    "override": {"overrides.yaml": "- lr=0.1\n- {}\n"},
    "choice": {"hydra.yaml": HYDRA.replace("model: mlp", "model: {}")},
    "hydra": {"hydra.yaml": "{}"},
}


@pytest.fixture(scope="module")
def yaml_tree(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("yaml_fuzz")
    for slot, files in SLOTS.items():
        for label, value in HOSTILE_YAML.items():
            texts = {"config.yaml": CONFIG, "overrides.yaml": "- lr=0.1\n", "hydra.yaml": HYDRA}
            texts.update({name: text.replace("{}", value) for name, text in files.items()})
            write_run(cwd / "outputs" / slot / slug(label), FINISHED, texts["config.yaml"], texts["overrides.yaml"],
                      texts["hydra.yaml"])
    write_run(cwd / "good", FINISHED)
    return cwd


def test_no_value_in_the_yaml_files_stops_any_mode(yaml_tree, capsys, monkeypatch):
    every = {f"outputs/{slot}/{slug(label)}" for slot in SLOTS for label in HOSTILE_YAML}
    assert table_dirs(ok(runs(yaml_tree, "--filter", "model=mlp", "--filter", "optimizer!=adam"))) <= every
    rows = {r["dir"]: r for r in json.loads(ok(runs(yaml_tree, "--json", timeout=120)))}
    assert set(rows) == every
    assert {r["dir"] for r in csv.DictReader(io.StringIO(ok(runs(yaml_tree, "--csv", timeout=120))))} == every
    assert table_dirs(ok(runs(yaml_tree, "--sort", "lr", timeout=120))) == every
    grouped = json.loads(ok(runs(yaml_tree, "--group", "--json", timeout=120)))
    assert sum(g["runs"] for g in grouped) == len(every)
    assert ok(runs(yaml_tree, "--group", timeout=120)).startswith("runs ")

    for label in HOSTILE_YAML:  # the shown config values: ? and a note naming the file
        for slot, column in (("model_target", "model"), ("epochs", "max_epochs"), ("config", "model")):
            row = rows[f"outputs/{slot}/{slug(label)}"]
            if label != "null" and not (label == "text" and slot == "model_target") \
                    and not (label == "mapping" and slot == "config"):
                assert row[column] is None and any(".hydra/config.yaml" in n for n in row["notes"]), (slot, label)
        row = rows[f"outputs/overrides/{slug(label)}"]
        if label not in ("null", "list", "set"):  # a set of strings is as good a list of overrides
            assert row["overrides"] == "?" and any(".hydra/overrides.yaml" in n for n in row["notes"]), label

    monkeypatch.chdir(yaml_tree)
    for slot in SLOTS:
        for wanted in ("model=mlp", "model.hidden=[512,512]", "lr=1e-1", "seed=1"):
            in_process(capsys, f"outputs/{slot}", "--filter", wanted)
        for label in HOSTILE_YAML:
            run = f"outputs/{slot}/{slug(label)}"
            assert f"A: {run}\n" in in_process(capsys, "diff", run, "good")
            json.loads(in_process(capsys, "diff", "good", run, "--json"))


def test_references_that_loop_or_chain_too_far_show_as_written_and_stop_nothing(tmp_path, capsys, monkeypatch):
    """Config references runs follows itself (no resolver runs): a loop, a chain past MAX_DEPTH, a reference past
    the top, a resolver, or text around a reference show as written; a chain within the bound resolves."""
    chain = "".join(f"c{i}: ${{c{i + 1}}}\n" for i in range(20)) + "c20: 7\n"  # 20 references to follow
    endless = "".join(f"e{i}: ${{e{i + 1}}}\n" for i in range(5000)) + "e5000: 7\n"
    loops = "l1: ${l2}\nl2: ${l3}\nl3: ${l1}\nself: ${self}\nup: ${..lr}\n"
    other = "when: ${now:%H}\nnested: ${c${c20}}\nsub:\n  tmp: ${oc.env:HOME}/x\n  copy: ${.tmp}\n"
    write_run(tmp_path / "a", FINISHED, CONFIG + chain + endless + loops + other)
    write_run(tmp_path / "b", FINISHED)
    monkeypatch.chdir(tmp_path)
    config = json.loads(in_process(capsys, "diff", "a", "b", "--json"))["config"]
    assert config["c0"] == config["c19"] == [7, None]
    assert config["e0"] == ["${e1}", None] and config["e4990"] == [7, None]
    assert [config[k][0] for k in ("l1", "l2", "l3", "self", "up")] == ["${l2}", "${l3}", "${l1}", "${self}", "${..lr}"]
    assert [config[k][0] for k in ("when", "nested", "sub.tmp", "sub.copy")] == [
        "${now:%H}", "${c${c20}}", "${oc.env:HOME}/x", "${.tmp}"]
    assert re.search(r"^l1 +\$\{l2\} +\(not set\)$", in_process(capsys, "diff", "a", "b"), re.M)
    assert table_dirs(in_process(capsys, ".", "--filter", "l1=${l2}")) == {"a"}
    assert table_dirs(in_process(capsys, ".", "--sort", "c0")) == {"a", "b"}


# --- closed pipes, missing dates, debug runs, runs being written ----------------------------------------------------

@pytest.mark.parametrize("mode", [[], ["--json"]])
def test_runs_ends_quietly_when_its_reader_stops_early(tmp_path, mode):
    """`runs | head -1`: more output than a pipe holds, so runs is still writing when head closes the pipe."""
    for i in range(300):
        write_run(tmp_path / "outputs" / f"{i:03d}", FINISHED, overrides=f"- lr=0.1\n- tag={'x' * 200}{i}\n")
    command = f"set -o pipefail; {sys.executable} -m fmnist_lab.runs {' '.join(mode)} | head -1"
    result = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.stdout.split()[0] in ("when", "[")
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, result.stderr
    assert result.returncode in (0, 141)  # 141: as if killed by SIGPIPE, what head's writers conventionally end with


def test_a_run_with_no_usable_date_shows_a_question_mark_and_comes_last(tmp_path, capsys, monkeypatch):
    dated = write_run(tmp_path / "outputs" / "dated", FINISHED)
    (dated / ".hydra" / "config.yaml").unlink()  # metrics.json's date is enough
    no_config = write_run(tmp_path / "outputs" / "no_config")
    (no_config / ".hydra" / "config.yaml").unlink()  # stopped before Hydra saved anything
    zero = write_run(tmp_path / "outputs" / "zero_mtime")
    os.utime(zero / ".hydra" / "config.yaml", (0, 0))  # a copy that lost its dates
    monkeypatch.chdir(tmp_path)
    lines = in_process(capsys).split("\n\n")[0].splitlines()[1:]
    assert [line.split()[-1] for line in lines] == ["outputs/dated", "outputs/zero_mtime", "outputs/no_config"]
    assert lines[0].startswith("2026-01-01 10:00:00 ")
    assert all(line.startswith("?  ") and "1970" not in line for line in lines[1:])
    assert [r["when"] for r in json.loads(in_process(capsys, "--json"))] == ["2026-01-01 10:00:00", None, None]


def test_a_debug_run_is_listed_as_debug_and_left_out_of_groups(tmp_path, capsys, monkeypatch):
    write_run(tmp_path / "outputs" / "full", FINISHED)
    write_run(tmp_path / "outputs" / "debug", {**FINISHED, "task": "debug", "test_images": 32},
              overrides="- lr=0.1\n- debug=fast_dev_run\n")
    write_run(tmp_path / "outputs" / "old_debug", {**FINISHED, "task": "train"},  # before task "debug" existed
              overrides="- lr=0.1\n- debug=limit\n")
    monkeypatch.chdir(tmp_path)
    text = in_process(capsys)
    statuses = {line.split()[-1]: line.split()[2] for line in text.split("\n\n")[0].splitlines()[1:]}
    assert statuses == {"outputs/full": "ok", "outputs/debug": "debug", "outputs/old_debug": "debug"}
    assert ("debug: outputs/debug: made with a debug= option, so its numbers come from slices of the data (32 test "
            "images), not a full training and test; --group leaves it out.") in text
    (group,) = json.loads(in_process(capsys, "--group", "--json"))
    assert group["runs"] == 1 and group["dirs"] == ["outputs/full"]
    found = json.loads(in_process(capsys, "--json", "--filter", "status=debug"))
    assert sorted(r["dir"] for r in found) == ["outputs/debug", "outputs/old_debug"]
    assert [r["dir"] for r in json.loads(in_process(capsys, "--json", "--filter", "status=ok"))] == ["outputs/full"]


WRITER = """
import sys, time
from fmnist_lab.run_dir import RunDir
with RunDir(sys.argv[1]).writing():
    print("writing", flush=True)
    time.sleep(120)
"""


def test_a_run_being_written_is_running_with_no_resume_command(tmp_path, capsys, monkeypatch):
    """A resumed run whose metrics.json still says interrupted, held by a live training process."""
    run = write_run(tmp_path / "outputs" / "resumed", {"status": "interrupted", "error": "SIGTERM at step 5",
                                                       "epochs": 1, "started": "2026-01-01T10:00:00"})
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    write_run(tmp_path / "outputs" / "claims", {**FINISHED, "status": "running"})  # only a live process says so
    monkeypatch.chdir(tmp_path)
    before = in_process(capsys)
    assert 'note: outputs/claims: metrics.json: status is "running", not a status a run records' in before
    assert "continue it with: python -m fmnist_lab resume=outputs/resumed" in before  # not yet held
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "writing\n"
        text = in_process(capsys)
        statuses = {line.split()[-1]: line.split()[2] for line in text.split("\n\n")[0].splitlines()[1:]}
        assert statuses == {"outputs/resumed": "running", "outputs/claims": "?"}
        assert f"running: outputs/resumed (epoch 1): process {writer.pid} is writing it right now." in text
        assert "continue it with" not in text and "interrupted: " not in text and text.count("writing it") == 1
        rows = json.loads(in_process(capsys, "--json", "--filter", "status=running"))
        assert [(r["dir"], r["writer"]) for r in rows] == [("outputs/resumed", writer.pid)]
    finally:
        writer.kill()
        writer.wait(timeout=30)
    assert "continue it with: python -m fmnist_lab resume=outputs/resumed" in in_process(capsys)  # the lock went


# --- --filter compares by meaning -----------------------------------------------------------------------------------

def test_filter_values_compare_as_yaml_values(tmp_path, capsys, monkeypatch):
    write_run(tmp_path / "outputs" / "wide", FINISHED)
    write_run(tmp_path / "outputs" / "narrow", FINISHED, config=CONFIG.replace("[512, 512]", "[256, 256]"))
    monkeypatch.chdir(tmp_path)

    def found(*conditions: str) -> list[str]:
        rows = json.loads(in_process(capsys, "--json", *(f"--filter={c}" for c in conditions)))
        return sorted(r["dir"] for r in rows)

    for wanted in ("[512,512]", "[512, 512]", "[ 512,512 ]", "[512.0, 5.12e2]"):
        assert found(f"model.hidden={wanted}") == ["outputs/wide"], wanted
        assert found(f"model.hidden!={wanted}") == ["outputs/narrow"], wanted
    assert found("model.hidden=[512]") == [] and found("model.hidden=512") == []
    assert found("lr=1e-1") == found("lr=0.1") == found("lr=0.10") == ["outputs/narrow", "outputs/wide"]
    assert found("lr=0.2") == [] and found("model=MLP") == found("model=mlp") == ["outputs/narrow", "outputs/wide"]
    assert found("missing.key=null") == ["outputs/narrow", "outputs/wide"]
    # typed by the user, but read with the same care: an alias bomb, deep nesting, broken YAML
    for wanted in ("[&a [x, x, x], &b [*a, *a, *a], [*b, *b, *b]]", "&a [*a]", "[" * 10_000, "{a: [b", "x" * 100_000):
        assert found(f"model.hidden={wanted}") == []

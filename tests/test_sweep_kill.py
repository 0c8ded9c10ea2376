"""A parallel (joblib) sweep stopped from outside, as real processes and real signals: whatever the moment, no
process is left behind, every job has its row in summary.csv, and the sweep process exits with one paragraph."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

TAG = "FMNIST_LAB_TEST_SWEEP"  # in the environment of the sweep process, and so of every process it starts


def tagged(tag: str) -> list[int]:
    """The live processes (zombies aside) whose environment carries `tag`, whoever their parent is now."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"{TAG}={tag}".encode() in environ.read_bytes().split(b"\0") and \
                    (environ.parent / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(environ.parent.name))
        except (OSError, IndexError):
            continue
    return found


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {timeout} s")


class Sweep:
    """`python -m fmnist_lab -m` with the joblib launcher, 2 jobs at once, in its own folder."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.tag, self.dir = uuid.uuid4().hex, cwd / "sweep"
        self.out, self.err = (cwd / "stdout.txt").open("w+"), (cwd / "stderr.txt").open("w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fmnist_lab", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
             f"hydra.sweep.dir={self.dir}", "device=cpu", "~callbacks.onnx_export", "~callbacks.report", *args],
            cwd=cwd, env={**os.environ, TAG: self.tag}, stdout=self.out, stderr=self.err)

    def workers(self) -> list[int]:
        """joblib's worker processes (loky's, beside its resource tracker)."""
        return [pid for pid in tagged(self.tag) if b"LokyProcess" in Path(f"/proc/{pid}/cmdline").read_bytes()]

    def logged(self, text: str) -> bool:
        """A job's log has `text`."""
        return any(text in log.read_text() for log in self.dir.glob("*/fmnist_lab.log"))

    def end(self, timeout: float = 120) -> tuple[int, str]:
        """The exit code and stderr, once the sweep process has ended and no process of it is left (a few seconds
        at most after it: workers never outlive it)."""
        code = self.process.wait(timeout=timeout)
        wait_for(lambda: not tagged(self.tag), 15, "end of every process of the sweep")
        self.err.seek(0)
        return code, self.err.read()

    def rows(self) -> list[dict[str, str]]:
        with (self.dir / "summary.csv").open() as f:
            return list(csv.DictReader(f))

    def kill_everything(self) -> None:
        for pid in tagged(self.tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def start_sweep(tmp_path):
    sweeps = []

    def start(*args: str) -> Sweep:
        sweeps.append(Sweep(tmp_path, *args))
        return sweeps[-1]

    yield start
    for sweep in sweeps:  # a failed test leaves no process behind either
        sweep.kill_everything()


def one_paragraph(stderr: str, sweep: Sweep, start: str) -> str:
    """The sweep process's last word: one paragraph that says why it stopped and where every job's row is."""
    assert "Traceback" not in stderr
    (paragraph,) = [line for line in stderr.splitlines() if line.startswith("sweep stopped:")]
    assert paragraph.startswith(start) and f"every job's result is in {sweep.dir / 'summary.csv'}" in paragraph
    assert f"Run the same command again with hydra.sweep.dir={sweep.dir} to continue" in paragraph
    return paragraph


def statuses(sweep: Sweep) -> dict[str, str]:
    """Job number -> the status in metrics.json, for the jobs that got a folder."""
    return {p.parent.name: json.loads(p.read_text()).get("status", "ok") for p in sweep.dir.glob("*/metrics.json")}


@pytest.mark.slow
def test_sigterm_while_the_workers_start_marks_every_job_interrupted(start_sweep, synthetic_root):
    """SIGTERM as joblib's workers start (before they import torch): the sweep process must not die at once,
    leaving both workers behind, one training job 0 to its end, and summary.csv without a row."""
    sweep = start_sweep("lr=0.01,0.1", f"data.root={synthetic_root}", "debug=limit", "epochs=30")
    wait_for(sweep.workers, 120, "joblib worker")
    sweep.process.send_signal(signal.SIGTERM)
    code, stderr = sweep.end()
    assert code == 128 + signal.SIGTERM
    one_paragraph(stderr, sweep, "sweep stopped: SIGTERM to the sweep process. 2 of its 2 jobs are marked "
                                 "interrupted (jobs 0, 1)")
    rows = sweep.rows()
    assert sorted(r["job"] for r in rows) == ["0", "1"] and {r["status"] for r in rows} == {"interrupted"}
    assert set(statuses(sweep).values()) <= {"interrupted"}  # a job that had started is marked: it continues


@pytest.mark.slow
def test_ctrl_c_during_training_stops_each_job_as_a_run_and_ends_the_sweep(start_sweep, synthetic_root):
    sweep = start_sweep("lr=0.01,0.1", f"data.root={synthetic_root}", "debug=limit", "epochs=30")
    wait_for(lambda: sweep.logged("epoch 1/"), 300, "epoch")
    sweep.process.send_signal(signal.SIGINT)
    code, stderr = sweep.end()
    assert code == 130
    one_paragraph(stderr, sweep, "sweep stopped: SIGINT to the sweep process.")
    rows = sweep.rows()
    assert sorted(r["job"] for r in rows) == ["0", "1"] and {r["status"] for r in rows} == {"interrupted"}
    assert statuses(sweep)["0"] == statuses(sweep)["1"] == "interrupted"  # a job in training marks itself


@pytest.mark.slow
def test_a_killed_worker_ends_the_sweep_with_every_job_marked(start_sweep, synthetic_root):
    """SIGKILL of a worker (as the OOM killer does): joblib ends the other worker at once. The sweep must not end
    in joblib's TerminatedWorkerError with summary.csv empty and the other job unmarked."""
    sweep = start_sweep("lr=0.01,0.1", f"data.root={synthetic_root}", "debug=limit", "epochs=30")
    wait_for(lambda: sweep.logged("parameters:"), 300, "job that has built its network")
    os.kill(sweep.workers()[0], signal.SIGKILL)
    code, stderr = sweep.end()
    assert code == 1
    paragraph = one_paragraph(stderr, sweep, "sweep stopped: a worker process died (SIGKILL(-9): killed, or out of "
                                             "memory) and joblib ended the other workers with it.")
    assert "2 of its 2 jobs are marked interrupted (jobs 0, 1)" in paragraph
    rows = sweep.rows()
    assert sorted(r["job"] for r in rows) == ["0", "1"] and {r["status"] for r in rows} == {"interrupted"}
    assert all("a worker process died (SIGKILL(-9)" in r["error"] for r in rows)
    assert statuses(sweep) and set(statuses(sweep).values()) == {"interrupted"}  # the jobs that had started

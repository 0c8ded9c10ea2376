"""Shared fixtures: synthetic IDX files in the official layout, the real data set, config composition."""

from __future__ import annotations

import gzip
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from fmnist_lab.cli import config_dir
from fmnist_lab.data import DEBIAN_ROOT, FILES, IMAGE_MAGIC, LABEL_MAGIC

REAL_ROOT = DEBIAN_ROOT


def pytest_configure(config):
    # Under pytest-xdist (make test) every core runs a worker: each worker, and every process its tests start,
    # gets one CPU thread. Two threads per process on two busy cores made the suite slower than running it in
    # one process, as OpenMP's threads spin waiting for cores that the other worker holds.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def idx_bytes(data: torch.Tensor, magic: int) -> bytes:
    return struct.pack(f">I{data.dim()}I", magic, *data.shape) + data.numpy().tobytes()


def write_idx(path: Path, data: torch.Tensor, magic: int) -> Path:
    raw = idx_bytes(data, magic)
    path.write_bytes(gzip.compress(raw, compresslevel=1) if path.suffix == ".gz" else raw)
    return path


def synthetic_split(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable fake images: class c lights up rows 2c..2c+3 on top of noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (count,), generator=g, dtype=torch.uint8)
    images = torch.randint(0, 60, (count, 28, 28), generator=g, dtype=torch.uint8)
    rows = (2 * labels.long()).unsqueeze(1) + torch.arange(4)  # [N, 4]
    images[torch.arange(count).unsqueeze(1), rows + 4] = 220
    return images, labels


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A data root with full-size (60k/10k) synthetic files: raw train files, gzipped test files."""
    root = tmp_path_factory.mktemp("synthetic_fmnist")
    for split, count, suffix in (("train", 60_000, ""), ("test", 10_000, ".gz")):
        images, labels = synthetic_split(count, seed=len(split))
        write_idx(root / (FILES[split][0] + suffix), images, IMAGE_MAGIC)
        write_idx(root / (FILES[split][1] + suffix), labels, LABEL_MAGIC)
    return root


@pytest.fixture(scope="session")
def real_root() -> Path:
    if not (REAL_ROOT / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.fail(f"The real FashionMNIST files are missing from {REAL_ROOT}: run `make data`.")
    return REAL_ROOT


def compose_cfg(*overrides: str, output_dir: Path | str = "unused"):
    """The config `python -m fmnist_lab <overrides>` would run, with the run dir set to `output_dir`."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={output_dir}", *overrides])


def run_cli(cwd: Path, *args: str, module: str = "fmnist_lab", check: bool = True, timeout: int = 600,
            blocked: tuple[str, ...] = ()):
    """`python -m <module> <args>` in `cwd`, as a user runs it; the `blocked` packages (torch, ...) cannot be
    imported: for what must answer before they load."""
    command = [sys.executable, "-m", module, *args]
    if blocked:
        command[1:] = ["-c", f"import runpy, sys; sys.modules.update(dict.fromkeys({blocked!r})); "
                             f"sys.argv = [{module!r}, *{args!r}]; runpy.run_module({module!r}, run_name='__main__')"]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@contextmanager
def web_server(cwd: Path, *command: str) -> Iterator[str]:
    """A web UI started as the README starts it, `command` with "{port}" as a free port on 127.0.0.1; its base URL
    once it answers. Stopped with its whole process group after."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([part.replace("{port}", str(port)) for part in command], cwd=cwd,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240  # seconds on an idle machine, a minute or more on a busy one
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, f"{command[0]} did not answer within 240 s"
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def only_run_dir(root: Path) -> Path:
    (run,) = [p for p in (root / "outputs").glob("*/*") if p.is_dir()]
    return run


@pytest.fixture(scope="session")
def real_run(real_root, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One real 1-epoch CLI run on the real data, shared by the tests that inspect its artifacts."""
    cwd = tmp_path_factory.mktemp("real_run")
    result = run_cli(cwd, "epochs=1", "device=cpu")
    return only_run_dir(cwd), result

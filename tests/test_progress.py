"""What training shows while it runs: one result line per epoch on a terminal (a live bar meanwhile, erased) and
in pipes, and the epoch lines and the final result in the run's log file."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from fmnist_lab.console import EpochProgress

# 200 training batches an epoch, long enough for the bar to be drawn; no ONNX export or test report
QUICK = ["epochs=2", "device=cpu", "~callbacks.onnx_export", "~callbacks.report", "trainer.limit_train_batches=200",
         "trainer.limit_val_batches=2", "logger=none"]
EPOCH_LINE = r"epoch {}/2: val/acc \d\.\d{{4}} val/loss \d+\.\d{{4}} \(\d+\.\d s\)"


def run_in_terminal(cwd: Path, *args: str, timeout: float = 300) -> str:
    """`python -m fmnist_lab <args>` with a pseudo-terminal as its stdout and stderr: all it wrote to it."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # 40 rows, 160 columns
    env = {**os.environ, "TERM": "xterm-256color"}
    process = subprocess.Popen([sys.executable, "-m", "fmnist_lab", *args], cwd=cwd, stdin=subprocess.DEVNULL,
                               stdout=slave, stderr=slave, env=env)
    os.close(slave)  # the child holds the only copy: reading ends when it exits
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                chunks.append(chunk)
        assert process.wait(timeout=30) == 0, b"".join(chunks)[-3000:].decode(errors="replace")
    finally:
        process.kill()
        os.close(master)
    return b"".join(chunks).decode(errors="replace")


def screen(output: str) -> list[str]:
    """The lines a terminal shows after `output`: enough of a terminal for Rich's live display, which redraws and
    erases itself with carriage returns, cursor-up and erase-line codes (colours and other codes change no text)."""
    lines, row, col = [""], 0, 0
    for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r|\n|[^\x1b\r\n]+", output):
        if token == "\n":
            row, col = row + 1, 0
            lines += [""] * (row + 1 - len(lines))
        elif token == "\r":
            col = 0
        elif token.startswith("\x1b["):
            arg, code = token[2:-1].lstrip("?"), token[-1]
            if code == "A":
                row = max(0, row - int(arg or 1))
            elif code == "K":
                lines[row] = "" if arg == "2" else lines[row][:col]
            elif code == "G":
                col = int(arg or 1) - 1
        elif not token.startswith("\x1b"):
            line = lines[row].ljust(col)
            lines[row] = line[:col] + token + line[col + len(token):]
            col += len(token)
    return [line.rstrip() for line in lines]


def test_a_terminal_keeps_one_result_line_per_epoch_counted_from_1(synthetic_root, tmp_path):
    output = run_in_terminal(tmp_path, f"data.root={synthetic_root}", *QUICK)
    shown = screen(output)

    epochs = [line for line in shown if line.lower().startswith("epoch")]
    assert len(epochs) == 2, shown
    for number, line in enumerate(epochs, 1):
        assert re.fullmatch(EPOCH_LINE.format(number), line), line
    assert any(line.startswith("test/acc ") for line in shown), shown
    # the bar showed each epoch's batches while it ran, and none of it is left on the screen
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output)
    assert "epoch 1/2" in plain.replace("epoch 1/2:", "") and "200/200" in plain
    assert not any("200/200" in line or "━" in line for line in shown), shown
    assert "Epoch 0" not in plain and "epoch 0" not in plain


def test_without_an_epoch_limit_the_line_says_only_the_epoch(capsys):
    """max_epochs=-1 trains until max_steps: "epoch 2:", not "epoch 2/-1:"."""
    trainer = pl.Trainer(max_epochs=-1, max_steps=6, limit_train_batches=3, limit_val_batches=1, logger=False,
                         callbacks=[EpochProgress(refresh_rate=1)], enable_checkpointing=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(BoringModel())
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert [line.split(" (")[0] for line in lines] == ["epoch 1:", "epoch 2:"]


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`", "ignore:You're resuming from a checkpoint")
def test_a_run_resumed_mid_epoch_prints_the_rest_of_its_epochs(tmp_path, capsys):
    """The live bar starts at the batch the resumed epoch continues from (no epoch start comes first)."""
    options = dict(max_epochs=3, limit_train_batches=4, limit_val_batches=1, logger=False, enable_model_summary=False,
                   accelerator="cpu")
    mid_epoch = ModelCheckpoint(tmp_path, "mid", every_n_train_steps=6)  # step 6 of 4 an epoch: in epoch 2
    pl.Trainer(callbacks=[EpochProgress(), mid_epoch], **{**options, "max_steps": 7}).fit(BoringModel())
    capsys.readouterr()
    pl.Trainer(callbacks=[EpochProgress(refresh_rate=1, live=True)], enable_checkpointing=False,
               **options).fit(BoringModel(), ckpt_path=tmp_path / "mid.ckpt")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert [line.split(" (")[0] for line in lines] == ["epoch 2/3:", "epoch 3/3:"]


@pytest.mark.slow
def test_a_run_prints_only_its_own_lines_and_its_log_file_keeps_the_libraries(synthetic_root, tmp_path):
    """No line a user cannot act on: Lightning's INFO lines, library warnings (SLURM's `srun` hint, a torch
    FutureWarning) go to the run's log file alone; hydra.verbose=true brings them back to the console."""
    args = [sys.executable, "-m", "fmnist_lab", f"data.root={synthetic_root}", "debug=limit", "epochs=1", "device=cpu"]
    (tmp_path / "quiet").mkdir()
    quiet = subprocess.run(args, cwd=tmp_path / "quiet", capture_output=True, text=True, timeout=600)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    lines = (quiet.stdout + quiet.stderr).splitlines()
    assert 3 <= len(lines) <= 20, lines
    noise = [line for line in lines if re.search(r"Warning|site-packages|\[INFO\]|lightning|GPU available", line)]
    assert not noise, noise
    assert any(line.startswith("test/acc ") for line in lines) and not any("\033[" in line for line in lines)
    (log_file,) = (tmp_path / "quiet" / "outputs").glob("*/*/fmnist_lab.log")
    assert "GPU available" in log_file.read_text()  # Lightning's lines are kept, in the file

    (tmp_path / "verbose").mkdir()
    verbose = subprocess.run([*args, "hydra.verbose=true"], cwd=tmp_path / "verbose", capture_output=True, text=True,
                             timeout=600)
    assert verbose.returncode == 0 and "GPU available" in verbose.stdout + verbose.stderr

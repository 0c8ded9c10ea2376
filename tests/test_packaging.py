"""The wheel carries the configs, and an installed wheel runs from any directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_the_configs_and_runs_from_anywhere(tmp_path):
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("fmnist_lab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    conf = ROOT / "conf"
    repo_configs = {f"fmnist_lab/conf/{p.relative_to(conf).as_posix()}" for p in conf.rglob("*.yaml")}
    assert "fmnist_lab/conf/train.yaml" in repo_configs and repo_configs <= names

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}  # ahead of the editable install on sys.path
    where = subprocess.run([sys.executable, "-c", "import fmnist_lab.cli as m; print(m.__file__, m.config_dir())"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert where == [str(target / "fmnist_lab" / "cli.py"), str(target / "fmnist_lab" / "conf")]
    result = subprocess.run([sys.executable, "-m", "fmnist_lab", "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "model: cnn, mlp" in result.stdout, result.stderr
    assert re.search(r"experiment: cnn, cnn_best, .*seed_tutorial", result.stdout)

#!/usr/bin/env bash
# The GPU path in one command: the CUDA tests, a default run, a CUDA-graph run and experiment=speedrun on the GPU,
# and the GPU bench, summed up in one table. About 6 minutes on one H100.
#   bash scripts/gpu_check.sh [data folder]
# On a machine without Hydra (the lent GPU machine), put the wheels from shared/wheels/device in .whl/ first;
# they are installed into /tmp/site for this script only.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD/src
fi
ROOT=${1:-}
[ -z "$ROOT" ] && [ -d .gpu-data ] && ROOT=$PWD/.gpu-data
DATA=(); [ -n "$ROOT" ] && DATA=("data.root=$ROOT")
OUT=$(mktemp -d)
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.cuda.get_device_name())" \
    > "$OUT/gpu.txt" || { echo "gpu_check: no CUDA GPU visible to PyTorch"; exit 1; }

step() {  # name, command...: runs it, keeps its output and exit code and time
    local name=$1; shift
    local start=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    echo "$? $((SECONDS - start))" > "$OUT/$name.status"
}
if "$PY" -c "import pytest" 2>/dev/null; then
    step tests timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_training.py -k cuda
fi
step run timeout 180 "$PY" -m fmnist_lab device=gpu "hydra.run.dir=$OUT/run" "${DATA[@]}"
step graphs timeout 180 "$PY" -m fmnist_lab device=gpu gpu.cuda_graphs=true "hydra.run.dir=$OUT/graphs" "${DATA[@]}"
step speedrun timeout 300 "$PY" -m fmnist_lab experiment=speedrun device=gpu "hydra.run.dir=$OUT/speedrun" "${DATA[@]}"
BENCH=(--device cuda --epochs 3 --rounds 1 --out "$OUT/bench.md"); [ -n "$ROOT" ] && BENCH+=(--root "$ROOT")
step bench timeout 240 "$PY" scripts/bench.py "${BENCH[@]}"

"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"\nGPU: {(out / 'gpu.txt').read_text().strip()}\n\n| check | exit | seconds | result |\n|---|---|---|---|")
for name in ("tests", "run", "graphs", "speedrun", "bench"):
    status = out / f"{name}.status"
    if not status.is_file():
        print(f"| {name} | - | - | not run (no pytest here) |")
        continue
    code, seconds = status.read_text().split()
    log = (out / f"{name}.log").read_text().strip().splitlines()
    result = log[-1] if log else ""
    metrics = out / name / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        result = (f"test/acc {m['test/acc']:.4f}, {m['epochs']} epochs, train {m['train_seconds']:.1f} s, "
                  f"epoch s {m.get('epoch_seconds')}, cuda_graphs {m.get('cuda_graphs', '-')}, onnx ok "
                  f"{m.get('onnx', {}).get('ok')}")
    print(f"| {name} | {code} | {seconds} | {result.replace('|', '/')[:300]} |")
bench = out / "bench.md"
print("\n" + (bench.read_text() if bench.is_file() else "bench: no table (see its log)"))
for name in ("tests", "run", "graphs", "speedrun", "bench"):
    status = out / f"{name}.status"
    if status.is_file() and status.read_text().split()[0] != "0":
        print(f"--- {name} (last lines) ---\n" + "\n".join((out / f"{name}.log").read_text().splitlines()[-25:]))
PYEOF

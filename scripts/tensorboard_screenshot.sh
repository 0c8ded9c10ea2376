#!/usr/bin/env bash
# A screenshot of TensorBoard's HPARAMS tab over a sweep, taken in a real headless browser (Debian chromium).
#   bash scripts/tensorboard_screenshot.sh <sweep dir> [out.png]
# e.g. after: python -m fmnist_lab -m lr=0.02,0.1 batch_size=64,256 debug=limit hydra.sweep.dir=outputs/multirun/shot
# Installs chromium with apt-get when it is missing (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
SWEEP_DIR=${1:?usage: tensorboard_screenshot.sh <sweep dir> [out.png]}
OUT=${2:-docs/tensorboard_hparams.png}
PY=${PY:-.venv/bin/python}
compgen -G "$SWEEP_DIR/*/tensorboard" >/dev/null || { echo "error: $SWEEP_DIR holds no job with a tensorboard/ folder: give the folder of a sweep that logged to TensorBoard (logger=tensorboard, the default)." >&2; exit 1; }

if ! command -v chromium >/dev/null; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
fi

PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$(dirname "$PY")/tensorboard" --logdir "$SWEEP_DIR" --host 127.0.0.1 --port "$PORT" 2>/dev/null &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
URL="http://127.0.0.1:$PORT"
for _ in $(seq 240); do
    curl -sf "$URL/data/runs" | grep -q tensorboard && break
    sleep 0.5
done
# the tab loads its table with JavaScript after the page: give it virtual time to finish
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,1000 \
    --virtual-time-budget=20000 --screenshot="$(realpath -m "$OUT")" "$URL/#hparams" 2>/dev/null
echo "screenshot: $OUT ($URL/#hparams)"

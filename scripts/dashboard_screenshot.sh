#!/usr/bin/env bash
# A screenshot of optuna-dashboard showing a search's study, taken in a real headless browser (Debian chromium).
#   bash scripts/dashboard_screenshot.sh <sweep dir> [out.png] [page]
# page: the dashboard's path after /dashboard/studies/<id>, e.g. "" (history) or /analytics (Pareto front).
# Installs chromium with apt-get when it is missing (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
SWEEP_DIR=${1:?usage: dashboard_screenshot.sh <sweep dir> [out.png] [page]}
OUT=${2:-docs/optuna_dashboard.png}
PAGE=${3:-}
PY=${PY:-.venv/bin/python}
test -f "$SWEEP_DIR/optuna.db" || { echo "error: $SWEEP_DIR/optuna.db does not exist: give the folder of an Optuna search (hparams_search=optuna)." >&2; exit 1; }

if ! command -v chromium >/dev/null; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
fi

PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$(dirname "$PY")/optuna-dashboard" "sqlite:///$(realpath "$SWEEP_DIR")/optuna.db" --host 127.0.0.1 --port "$PORT" \
    --quiet &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
URL="http://127.0.0.1:$PORT"
for _ in $(seq 240); do
    curl -sf "$URL/api/studies" >/dev/null && break
    sleep 0.5
done
STUDY=$(curl -sf "$URL/api/studies" | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["study_summaries"][0]["study_id"])')
# the page draws its plots with JavaScript after loading: give it virtual time to finish
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,1100 \
    --virtual-time-budget=20000 --screenshot="$(realpath -m "$OUT")" "$URL/dashboard/studies/$STUDY$PAGE" 2>/dev/null
echo "screenshot: $OUT ($URL/dashboard/studies/$STUDY$PAGE)"

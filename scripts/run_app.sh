#!/usr/bin/env bash
# Start the brainseg web application: the API (uvicorn app:app on 127.0.0.1:8000) and the
# Streamlit page (http://localhost:8501). Ctrl-C stops both.
#
#   bash scripts/run_app.sh
#
# Environment: PYTHON (default python3), API_PORT (8000), UI_PORT (8501),
# BRAINSEG_MODEL_DIR (default: the repository's models/), and the BRAINSEG_* service settings.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
API_PORT=${API_PORT:-8000}
UI_PORT=${UI_PORT:-8501}
API_URL="http://127.0.0.1:${API_PORT}"

# Install the pinned requirements only when something is missing.
if ! "$PY" -c "import brainseg, fastapi, uvicorn, multipart, onnxruntime, nibabel, streamlit, httpx" 2>/dev/null; then
  echo "installing requirements (pip install -r requirements.txt)..."
  "$PY" -m pip install --disable-pip-version-check -r requirements.txt
fi

if [ -z "${BRAINSEG_MODEL_DIR:-}" ] && [ ! -f models/registry.json ]; then
  echo "warning: models/registry.json not found; the page will open but cannot segment until models are trained and shipped (or set BRAINSEG_MODEL_DIR)" >&2
fi

pids=()
cleanup() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  echo "stopped."
}
trap cleanup INT TERM EXIT

"$PY" -m uvicorn app:app --host 127.0.0.1 --port "$API_PORT" --http brainseg.serving.protocol:H11WithHeaderTimeout &
pids+=($!)

echo "waiting for the API at ${API_URL}/health ..."
if ! "$PY" - "$API_URL/health" "${pids[0]}" <<'PYEOF'
import os, sys, time, urllib.request
url, pid = sys.argv[1], int(sys.argv[2])
deadline = time.time() + 120
while time.time() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("the API process exited; see the messages above")
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.3)
sys.exit(f"the API did not answer {url} within 120 s")
PYEOF
then
  exit 1
fi

BRAINSEG_API_URL="$API_URL" "$PY" -m streamlit run streamlit_app.py \
  --server.headless true --server.port "$UI_PORT" --server.address 127.0.0.1 --browser.gatherUsageStats false &
pids+=($!)

echo
echo "API:  ${API_URL}  (docs: ${API_URL}/docs)"
echo "Open http://localhost:${UI_PORT}"
echo "Press Ctrl-C to stop both."
# Return (and clean up) as soon as either process ends.
wait -n "${pids[@]}"

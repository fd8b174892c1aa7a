#!/usr/bin/env bash
# Make (or refresh) the project's virtual environment and build the extension in it.
# Sourced by tools/test.sh and tools/bigr.sh; safe to run again (pip skips what is installed,
# the extension rebuilds incrementally in build/).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BIGR_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.bigr-deps"
REQS="torch==2.14.1 numpy safetensors pillow tqdm scikit-build-core pybind11 cmake ninja pytest pytest-benchmark"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$REQS" ]; then
  echo "[bigr] installing dependencies into $VENV (first run: a few minutes)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q $REQS >&2
  echo "$REQS" > "$STAMP"
fi
echo "[bigr] building the extension (incremental)" >&2
"$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e "$ROOT" >&2
export PATH="$VENV/bin:$PATH"

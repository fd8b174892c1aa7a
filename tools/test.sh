#!/usr/bin/env bash
# The README's test command: set up the environment, then run the test suite.
# Extra arguments go to pytest (e.g. tools/test.sh -k sampler).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
bash tools/browser.sh
python -m bigr_engine.info
python -m pytest python_tests -q "$@"

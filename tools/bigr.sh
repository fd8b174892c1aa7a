#!/usr/bin/env bash
# Run the `bigr` command from the project's environment (set up on first use).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec bigr "$@"

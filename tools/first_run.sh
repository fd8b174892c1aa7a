#!/usr/bin/env bash
# Times the README's main command as a new user meets it: a fresh clone of HEAD with its own new venv, the first
# `bash tools/bigr.sh generate --out samples` (dependency install + build + generation) and a later one. Appends a
# row to bench/results/<device>/first_run.csv. Usage: bash tools/first_run.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
W="$(mktemp -d "${TMPDIR:-/tmp}/bigr-first-run.XXXX")"
trap 'rm -rf "$W"' EXIT
git clone -q "$ROOT" "$W/repo"
cd "$W/repo"
t0=$(date +%s.%N); bash tools/bigr.sh generate --out "$W/samples" > "$W/first.log" 2>&1; t1=$(date +%s.%N)
bash tools/bigr.sh generate --out "$W/samples" > "$W/later.log" 2>&1; t2=$(date +%s.%N)
DEV="cpu-$(uname -m)-$(nproc)t"
OUT="$ROOT/bench/results/$DEV/first_run.csv"
mkdir -p "$(dirname "$OUT")"
[ -f "$OUT" ] || echo "first_run_s,later_run_s,commit,date,device,command" > "$OUT"
python3 - "$t0" "$t1" "$t2" "$(git rev-parse --short HEAD)" "$DEV" "$OUT" <<'PY'
import datetime, sys
t0, t1, t2 = map(float, sys.argv[1:4])
row = [f"{t1 - t0:.1f}", f"{t2 - t1:.1f}", sys.argv[4], datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       sys.argv[5], "bash tools/first_run.sh"]
open(sys.argv[6], "a").write(",".join(row) + "\n")
print(f"first run {t1 - t0:.1f} s, later run {t2 - t1:.1f} s -> {sys.argv[6]}")
PY

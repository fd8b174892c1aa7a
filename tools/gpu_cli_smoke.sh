#!/usr/bin/env bash
# Every `bigr` command end to end on tiny inputs on one device (default cuda): part of tools/gpu_check.sh, and
# `DEVICE=cpu bash tools/gpu_cli_smoke.sh` dry-runs it here. Stops at the first failing command (its output shows).
set -euo pipefail
D="${DEVICE:-cuda}"
W="$(mktemp -d "${TMPDIR:-/tmp}/bigr-cli-smoke.XXXX")"
trap 'rm -rf "$W"' EXIT
B="${BIGR:-bigr}"
run() { echo "+ bigr $*"; "$B" "$@"; }
"${PYTHON:-python3}" - "$W/imgs" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
root = Path(sys.argv[1])
g = np.random.default_rng(0)
for c in ("a", "b"):
    (root / c).mkdir(parents=True)
    for i in range(6):
        Image.fromarray(g.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
PY
FAST=(--iters 2 --steps 2)
run generate --device "$D" --classes 0,3 --per-class 2 "${FAST[@]}" --out "$W/gen" --quiet
run generate --device "$D" --classes 1 --greedy --dtype float32 "${FAST[@]}" --out "$W/gen32" --quiet
run sample-many --device "$D" --num-images 4 --per-class 2 --classes 0,1 "${FAST[@]}" --shard-size 3 --out "$W/many" --quiet
run train-tokenizer "$W/imgs" --out "$W/tok" --img-size 16 --bits 8 --nf 32 --ch-mult 1,2 --emb-dim 32 --steps 3 --batch-size 4 --quiet
TOK="$W/tok/bae.safetensors"
run encode-dataset "$W/imgs" --bae "$TOK" --out "$W/codes" --device "$D" --quiet
run train "$W/codes" --out "$W/run" --dim 64 --layers 1 --transcoder-blocks 1 --steps 3 --batch-size 4 --warmup 1 \
    --device "$D" --bae "$TOK" --sample-every 3 --quiet
M=(--ckpt "$W/run/bigr.safetensors" --bae "$TOK" --device "$D")
IMG="$W/imgs/a/0.png"
run inpaint "${M[@]}" "$IMG" --box 0,0,8,8 "${FAST[@]}" --out "$W/inpaint"
run outpaint "${M[@]}" "$IMG" --box 4,4,12,12 "${FAST[@]}" --out "$W/outpaint"
run edit "${M[@]}" "$IMG" --box 0,0,8,8 --class 1 "${FAST[@]}" --out "$W/edit"
run interpolate "${M[@]}" --class-a 0 --class-b 1 --weights 1,0.5,0 "${FAST[@]}" --out "$W/interp"
run enrich "${M[@]}" "$IMG" --rounds 2 "${FAST[@]}" --out "$W/enrich"
run embed "${M[@]}" --layer 0 --out "$W/feats.npy" --labels-out "$W/labels.npy" "$W/imgs"
run probe --train "$W/feats.npy" --train-labels "$W/labels.npy" --test "$W/feats.npy" --test-labels "$W/labels.npy" --epochs 2 --warmup-epochs 1
run tsne "$W/feats.npy" "$W/labels.npy" --out "$W/tsne.png" --iters 50 --perplexity 3
echo "every bigr command ran on $D"

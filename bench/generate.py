"""Generation benchmark: the reference sampler and the engine, timed in one process on random weights.

    python bench/generate.py --preset small                       # CPU, ~5M params, 64 tokens
    python bench/generate.py --preset BiGR-L --device cuda --dtype bfloat16 --batch 64

Paper settings by default (iterations 20, transcoder steps 100, CFG 2.5). Each backend is warmed up,
then timed `--repeats` times (device events on GPU); the median is reported as ms/image and images/s,
with peak memory, and written to bench/results/<device>/generate.{csv,json}.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bigr_engine as be  # noqa: E402

PRESETS = {
    "small": dict(dim=256, n_layer=4, n_head=4, bits=16, num_tokens=64, num_classes=10, transcoder_blocks=2, transcoder_dim=256),
    "tiny": dict(dim=128, n_layer=2, n_head=2, bits=16, num_tokens=64, num_classes=10, transcoder_blocks=2, transcoder_dim=128),
}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device)).replace(" ", "_")
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}t"


def time_one(fn, device: str, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return times


def write_results(out_root, name: str, rows: list[dict], device: str, argv=None):
    """Append rows (with date, device, torch version and the command) to <out_root>/<device>/<name>.{csv,jsonl}."""
    out = Path(out_root) / device_name(device)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    command = f"python bench/{name}.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for r in rows:
        r.update(date=stamp, device=device_name(device), torch=torch.__version__, command=command)
    new = not (out / f"{name}.csv").exists()
    with open(out / f"{name}.csv", "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    with open(out / f"{name}.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help=f"{sorted(PRESETS)} or a released preset (BiGR-L, BiGR-XL, ...)")
    ap.add_argument("--bits", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch", type=int, default=None, help="images per call (default 8 on CPU, 64 on GPU)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--cfg", type=float, default=2.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", default="reference,engine")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    cfg = be.BiGRConfig(**PRESETS[args.preset]) if args.preset in PRESETS else be.bigr_preset(args.preset, bits=args.bits)
    dtype = getattr(torch, args.dtype)
    model = be.BiGR(cfg).to(args.device, dtype).eval()
    batch = args.batch or (64 if args.device.startswith("cuda") else 8)
    labels = torch.arange(batch) % cfg.num_classes
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.preset}: {params / 1e6:.1f}M params, N={cfg.num_tokens}, K={cfg.bits}, batch {batch}, "
          f"iters {args.iters}, steps {args.steps}, cfg {args.cfg}, {args.dtype} on {device_name(args.device)}")
    rows = []
    for backend in args.backends.split(","):
        run = lambda: model.generate(labels, cfg=args.cfg, iters=args.iters, steps=args.steps, seed=0, backend=backend)  # noqa: E731
        run()  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = time_one(run, args.device, args.repeats)
        med = statistics.median(times)
        peak = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else float("nan")
        rows.append(dict(backend=backend, preset=args.preset, dtype=args.dtype, batch=batch, iters=args.iters,
                         steps=args.steps, cfg=args.cfg, seconds=med, ms_per_image=1e3 * med / batch,
                         images_per_s=batch / med, peak_mib=peak))
        print(f"  {backend:10s} {1e3 * med / batch:9.2f} ms/image  {batch / med:8.2f} images/s  "
              f"(median of {args.repeats}: {', '.join(f'{t:.2f}' for t in times)} s)")
    if len(rows) >= 2:
        print(f"  speed-up of {rows[-1]['backend']} over {rows[0]['backend']}: {rows[0]['seconds'] / rows[-1]['seconds']:.2f}x")
    write_results(args.out, "generate", rows, args.device, argv)

if __name__ == "__main__":
    main()

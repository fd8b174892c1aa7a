"""A bounded load test of `bigr serve` on loopback, against `sample-many` in the same process.

    python bench/serve.py                                  # bundled model, CPU: 1, 4, 16, 64 clients
    python bench/serve.py --clients 16 --requests 128 --max-batch 16 --max-wait-ms 10

The server (`bigr serve`, uvicorn) runs as its own process on 127.0.0.1, as in a deployment (clients in the server's
process would compete with the model for the GIL); each client thread here sends single-image
/v1/generate requests (a class and seed of its own) one after another until --requests were sent at that level.
Per level: images/s, p50/p95/p99 latency, the mean batch size (from /metrics), and the server's resident memory before
and after. The baseline is `sample_many` (apps.sample_many, PNGs off) with batch = --max-batch, timed first. Rows go
to bench/results/<device>/serve.{csv,jsonl}.
"""
from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bigr_engine as be  # noqa: E402
from generate import write_results  # noqa: E402


def rss_mib(pid) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def metric(client, url, name) -> float:
    for line in client.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,4,16,64", help="concurrency levels (default 1,4,16,64)")
    ap.add_argument("--requests", type=int, default=64, help="requests per level (default 64)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument("--max-queue", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="torch threads of the server (and of the baseline)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    import httpx

    from bigr_engine.apps.sample_many import sample_many
    if args.threads:
        torch.set_num_threads(args.threads)
    model, bae = be.load_default(device=args.device)
    C = model.cfg.num_classes

    # baseline: sample-many at the same batch size (a warm-up run, then the median of 3)
    n_base = max(args.max_batch * 4, 64)
    n_base -= n_base % C
    rates = []
    with tempfile.TemporaryDirectory() as tmp:
        sample_many(model, bae, Path(tmp) / "w", num_images=C, per_class=1, classes=range(C), batch_size=args.max_batch,
                    png=False, progress=False)
        for k in range(3):
            t = time.perf_counter()
            sample_many(model, bae, Path(tmp) / f"b{k}", num_images=n_base, per_class=1, classes=range(C),
                        batch_size=args.max_batch, shard_size=10 ** 6, png=False, progress=False, seed=k)
            rates.append(n_base / (time.perf_counter() - t))
    base_rate = statistics.median(rates)
    del model, bae
    print(f"sample-many, batch {args.max_batch}: {base_rate:.2f} images/s")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "bigr_engine", "serve", "--port", str(port), "--device", args.device,
           "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), "--max-queue", str(args.max_queue)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(timeout=600)
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            if client.get(url + "/readyz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    rows = []
    for level in (int(c) for c in args.clients.split(",")):
        counter = iter(range(args.requests))
        lock = threading.Lock()
        latencies, statuses = [], []

        def worker(_):
            with httpx.Client(timeout=600) as c:
                while True:
                    with lock:
                        i = next(counter, None)
                    if i is None:
                        return
                    t0 = time.perf_counter()
                    r = c.post(url + "/v1/generate", json={"classes": [i % C], "seed": i})
                    with lock:
                        latencies.append(time.perf_counter() - t0)
                        statuses.append(r.status_code)
        b0, n0 = metric(client, url, "bigr_batch_images_sum"), metric(client, url, "bigr_batch_images_count")
        c0, k0 = metric(client, url, "bigr_compute_seconds_sum"), metric(client, url, "bigr_compute_seconds_count")
        mem0 = rss_mib(proc.pid)
        t = time.perf_counter()
        with ThreadPoolExecutor(level) as pool:
            list(pool.map(worker, range(level)))
        wall = time.perf_counter() - t
        b1, n1 = metric(client, url, "bigr_batch_images_sum"), metric(client, url, "bigr_batch_images_count")
        c1, k1 = metric(client, url, "bigr_compute_seconds_sum"), metric(client, url, "bigr_compute_seconds_count")
        q = statistics.quantiles(latencies, n=100)
        ok = statuses.count(200)
        row = dict(clients=level, requests=args.requests, ok=ok, images_per_s=ok / wall,
                   vs_sample_many=(ok / wall) / base_rate, sample_many_images_per_s=base_rate,
                   p50_s=statistics.median(latencies), p95_s=q[94], p99_s=q[98],
                   mean_batch=(b1 - b0) / max(n1 - n0, 1), mean_batch_compute_s=(c1 - c0) / max(k1 - k0, 1),
                   max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, rss_mib_before=mem0, rss_mib_after=rss_mib(proc.pid),
                   threads=torch.get_num_threads())
        rows.append(row)
        print(f"  {level:3d} clients: {row['images_per_s']:6.2f} images/s ({row['vs_sample_many']:.2f}x sample-many), "
              f"p50 {row['p50_s']:.3f} s, p95 {row['p95_s']:.3f} s, p99 {row['p99_s']:.3f} s, mean batch "
              f"{row['mean_batch']:.1f} (its compute {row['mean_batch_compute_s']:.3f} s), RSS {mem0:.0f} -> "
              f"{row['rss_mib_after']:.0f} MiB, {ok}/{args.requests} ok")
    proc.terminate()   # SIGTERM: uvicorn's graceful shutdown
    proc.wait(60)
    write_results(args.out, "serve", rows, args.device, argv)


if __name__ == "__main__":
    main()

"""posterior_step and unmask_topk microbenchmark: the compiled ops against their plain-PyTorch twins, and against the
device's copy bandwidth on the bytes each op must move.

    python bench/sampling_ops.py                                    # CPU
    python bench/sampling_ops.py --device cuda --batch 64 --tokens 256 --bits 32 --dtype bfloat16

Shapes are one engine round of BiGR at batch B with CFG: posterior_step sees B*n tokens of K bits (conditional and
unconditional logits in the matmul dtype, x_t uint8 in, x_(t') uint8 out); unmask_topk sees p0 (B, n, K) float32,
positions (B, n) int64, and writes k tokens' bits into uint8 codes (B, N, K) and their mask entries.
Bytes counted are the fewest each op must move (every input read once, every output written once). The copy
bandwidth is a large device-to-device copy (bytes read + written over the time). Validates each op against its twin
first (bit-identical, exits 1 otherwise); appends to bench/results/<device>/sampling_ops.{csv,jsonl}.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import device_name, time_one, write_results  # noqa: E402

from bigr_engine import ops
from bigr_engine.ops import rng
from bigr_engine.ops import reference as R  # noqa: E402
from bigr_engine.ops.reference import schedule_tables  # noqa: E402


def copy_bandwidth(device: str, repeats: int) -> float:
    n = (1 << 28) if device.startswith("cuda") else (1 << 25)   # 1 GiB / 128 MiB of float32
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = statistics.median(time_one(lambda: dst.copy_(src), device, repeats))
    return 2 * src.numel() * src.element_size() / t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="logits dtype")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64, help="N tokens per image (all masked: the first round)")
    ap.add_argument("--bits", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev, B, N, K = args.device, args.batch, args.tokens, args.bits
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    tabs = {k: v.to(dev) for k, v in schedule_tables(256).items()}
    si = torch.arange(B, device=dev) * 7 + 3
    idx = torch.arange(N, device=dev).expand(B, N).contiguous()
    lc = (torch.randn(B * N, K, generator=g) * 3).to(dev, dtype)
    lu = (torch.randn(B * N, K, generator=g) * 3).to(dev, dtype)
    x = (torch.rand(B * N, K, generator=g) < 0.5).to(dev, torch.uint8)
    p0 = torch.rand(B, N, K, generator=g).to(dev)
    k = torch.full((B,), N // 4, device=dev)
    stream = rng.stream(rng.TRANSCODER_STEP, 3, 5)

    def posterior(fn, out):
        fn(lc, lu, x, out, 2.5, 1.0, 200, 150, tabs["k_final"], tabs["b_final"], tabs["beta"], 11, si, stream, idx,
           False)

    def unmask(fn, codes, mask):
        fn(p0, idx, k, codes, mask, 1.0, 11, si, rng.stream(rng.GUMBEL, 3), rng.stream(rng.TOKEN_BITS, 3), False)

    # validate: bit-identical to the twins (float32 arithmetic in both)
    outs = [torch.full((B * N, K), 0xFF, dtype=torch.uint8, device=dev) for _ in range(2)]
    posterior(ops.posterior_step, outs[0])
    posterior(R.posterior_step_ref, outs[1])
    cm = [(torch.full((B, N, K), 0xFF, dtype=torch.uint8, device=dev), torch.ones(B, N, dtype=torch.bool, device=dev))
          for _ in range(2)]
    unmask(ops.unmask_topk, *cm[0])
    unmask(R.unmask_topk_ref, *cm[1])
    ok = torch.equal(outs[0], outs[1]) and torch.equal(cm[0][0], cm[1][0]) and torch.equal(cm[0][1], cm[1][1])
    print(f"validate: ops equal their twins: {'ok' if ok else 'MISMATCH'}")
    if not ok:
        sys.exit(1)

    bw = copy_bandwidth(dev, args.repeats)
    out = outs[0]
    codes, mask = cm[0]
    mask_full = torch.ones_like(mask)
    fresh = lambda: mask.copy_(mask_full)  # noqa: E731  (unmask_topk clears mask entries: restore them, timed apart)
    t_fresh = statistics.median(time_one(fresh, dev, args.repeats))
    cases = {
        "posterior_step": (lambda fn: posterior(fn, out),
                           B * N * K * (2 * lc.element_size() + 1 + 1)),          # logits c+u, x_t, out
        "unmask_topk": (lambda fn: (fresh(), unmask(fn, codes, mask)),
                        B * N * (K * 4 + 8 + 1) + B * (N // 4) * (K + 1)),        # p0, index, mask read; bits + mask written
    }
    rows = []
    print(f"B={B} N={N} K={K} logits {args.dtype} on {device_name(dev)}; copy bandwidth {bw / 1e9:.1f} GB/s")
    for name, (call, nbytes) in cases.items():
        for backend, fn in (("reference", getattr(R, name + "_ref")), ("engine", getattr(ops, name))):
            call(fn)  # warm-up
            t = statistics.median(time_one(lambda: call(fn), dev, args.repeats))
            if name == "unmask_topk":
                t = max(t - t_fresh, 1e-9)
            rows.append(dict(op=name, backend=backend, dtype=args.dtype, batch=B, tokens=N, bits=K, us=1e6 * t,
                             bytes=nbytes, gbps=nbytes / t / 1e9, copy_gbps=bw / 1e9, fraction_of_copy=nbytes / t / bw,
                             threads=torch.get_num_threads()))
            print(f"  {name:15s} {backend:10s} {1e6 * t:10.1f} us  {nbytes / t / 1e9:8.2f} GB/s "
                  f"({100 * nbytes / t / bw:5.1f}% of copy)")
    write_results(args.out, "sampling_ops", rows, dev, argv)


if __name__ == "__main__":
    main()

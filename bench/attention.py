"""rope_attention microbenchmark: the fused op against the reference (separate RoPE ops + SDPA), one process.

    python bench/attention.py                                   # CPU, B=8 S=65 H=4 d=64 float32 (a 8x8 BiGR grid)
    python bench/attention.py --device cuda --dtype bfloat16 --batch 64 --seq 1025 --heads 16 --backward

Validates the op against ops.reference.attention_reference first (exits 1 on a mismatch), then times the backends in
interleaved rounds (device events on GPU) and reports the median in microseconds and TFLOP/s (4*B*H*S*S*d for the
forward, 2.5x that for forward + backward), appended to bench/results/<device>/attention.{csv,jsonl}.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import device_name, time_one, write_results  # noqa: E402  (the one timing/results helper)

from bigr_engine import ops
from bigr_engine.ops.reference import attention_reference, rope_2d_table  # noqa: E402


def sdpa_only(qkv, cos, sin):
    """SDPA without RoPE: a lower bound for what the reference spends outside the rotation."""
    q, k, v = qkv.unbind(2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=65, help="1 + G*G (condition token + G x G grid)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--backward", action="store_true", help="time forward + backward instead of the forward")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    B, S, H, d = args.batch, args.seq, args.heads, args.head_dim
    G = round((S - 1) ** 0.5)
    if G * G + 1 != S:
        ap.error(f"--seq {S} is not 1 + G*G")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    qkv = torch.randn(B, S, 3, H, d, device=args.device).to(dtype)
    cos, sin = rope_2d_table(G, d, device=args.device)
    grad_out = torch.randn(B, S, H * d, device=args.device, dtype=dtype)
    fused = lambda x, c, s: ops.rope_attention(x, c, s)[0]  # noqa: E731
    backends = {"reference": attention_reference, "sdpa-only": sdpa_only, "engine": fused}

    # Validate: the engine within a few times the reference's own error against float64.
    oracle = attention_reference(qkv.double(), cos, sin)
    ref_err = (attention_reference(qkv, cos, sin).double() - oracle).abs().max().item()
    err = (fused(qkv, cos, sin).double() - oracle).abs().max().item()
    ok = err <= 3 * ref_err + torch.finfo(dtype).eps
    print(f"validate: engine max error {err:.3g}, reference's {ref_err:.3g} (vs float64): {'ok' if ok else 'MISMATCH'}")
    if not ok:
        sys.exit(1)

    x = qkv.detach().clone().requires_grad_(args.backward)
    if args.backward:
        def step(fn):
            x.grad = None
            fn(x, cos, sin).backward(grad_out)
    else:
        def step(fn):
            with torch.no_grad():
                fn(x, cos, sin)
    times = {name: [] for name in backends}
    for name, fn in backends.items():
        for _ in range(3):
            step(fn)  # warm-up
    for _ in range(args.rounds):  # interleaved, so that a noisy neighbour hurts every backend alike
        for name, fn in backends.items():
            times[name] += time_one(lambda: step(fn), args.device, args.per_round)

    flops = 4 * B * H * S * S * d * (2.5 if args.backward else 1.0)
    threads = torch.get_num_threads()
    what = "forward + backward" if args.backward else "forward"
    print(f"rope_attention {what}: B={B} S={S} H={H} d={d} {args.dtype} on {device_name(args.device)}")
    rows = []
    for name in backends:
        med = statistics.median(times[name])
        rows.append(dict(backend=name, mode=what, dtype=args.dtype, batch=B, seq=S, heads=H, head_dim=d,
                         threads=threads, us=1e6 * med, tflops=flops / med / 1e12, max_err=err if name == "engine" else
                         ref_err if name == "reference" else float("nan")))
        print(f"  {name:10s} {1e6 * med:10.1f} us  {flops / med / 1e9:8.2f} GFLOP/s")
    ref_us = rows[0]["us"]
    print(f"  engine vs reference: {ref_us / rows[-1]['us']:.2f}x")

    write_results(args.out, "attention", rows, args.device, argv)

if __name__ == "__main__":
    main()

"""Transcoder-block ops microbenchmark: the fused ops against the release's plain-PyTorch composite, one process.

    OMP_NUM_THREADS=1 python bench/transcoder.py                       # CPU, M=512 rows, D=256 (the small preset)
    python bench/transcoder.py --device cuda --dtype bfloat16 --rows 16384 --dim 1024 --backward

Cases: `ln_modulate` (F.layer_norm + modulate vs the fused op), `gated_residual` (x + gate * h vs the op) and `block`
(one transcoder ResBlock, fused kernels off vs on, its linear layers included). Validates each op against the composite in
float64 first (exits 1 on a mismatch), then times the two sides in interleaved rounds (device events on GPU) and
reports the median in microseconds, appended to bench/results/<device>/transcoder.{csv,jsonl}.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import device_name, time_one, write_results  # noqa: E402  (the one timing/results helper)

from bigr_engine import ops
from bigr_engine.models.transcoder import LN_EPS, ResBlock, ln_modulate_plain  # noqa: E402
from bigr_engine.ops import loader  # noqa: E402


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--rows", type=int, default=512, help="M: tokens (x CFG branches) through the transcoder at once")
    ap.add_argument("--dim", type=int, default=256, help="D: the transcoder's hidden size")
    ap.add_argument("--backward", action="store_true", help="time forward + backward instead of the forward")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--per-round", type=int, default=20)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    if not (loader.has_op("bigr::ln_modulate") and loader.has_op("bigr::gated_residual")):
        sys.exit("error: the extension lacks the transcoder ops; rebuild with: pip install --no-build-isolation -e .")

    if args.threads:
        torch.set_num_threads(args.threads)
    M, D, dev = args.rows, args.dim, args.device
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    x = (1.5 + 2 * torch.randn(M, D, generator=g)).to(dev, dtype)
    proj = (0.5 * torch.randn(M, 3 * D, generator=g)).to(dev, dtype)  # adaLN output: shift, scale, gate are views
    shift, scale, gate = proj.chunk(3, dim=-1)
    h = torch.randn(M, D, generator=g).to(dev, dtype)
    c = torch.randn(M, D, generator=g).to(dev, dtype)
    block = ResBlock(D).to(dev, dtype)

    # Validate: each op within a few times the composite's own error against float64 (plus an ulp).
    ok = True
    checks = {
        "ln_modulate": (lambda a, s, t: ops.ln_modulate(a, s, t, LN_EPS)[0], ln_modulate_plain, (x, shift, scale)),
        "gated_residual": (ops.gated_residual, lambda a, b, d: a + b * d, (x, gate, h)),
    }
    errs = {}
    for name, (fused, plain, inputs) in checks.items():
        oracle = plain(*(t.double() for t in inputs))
        ref_err, err = max_err(plain(*inputs), oracle), max_err(fused(*inputs), oracle)
        errs[name] = (err, ref_err)
        good = err <= 3 * ref_err + torch.finfo(dtype).eps * max(1.0, oracle.abs().max().item())
        ok &= good
        print(f"validate {name}: op max error {err:.3g}, composite's {ref_err:.3g} (vs float64): "
              f"{'ok' if good else 'MISMATCH'}")
    if not ok:
        sys.exit(1)

    def run_block(fused):
        def fn(a):
            return block(a, c, fused)
        return fn

    cases = {
        "ln_modulate": {"composite": lambda a: ln_modulate_plain(a, shift, scale),
                        "engine": lambda a: ops.ln_modulate(a, shift, scale, LN_EPS)[0]},
        "gated_residual": {"composite": lambda a: a + gate * h, "engine": lambda a: ops.gated_residual(a, gate, h)},
        "block": {"composite": run_block(False), "engine": run_block(True)},
    }
    xin = x.detach().clone().requires_grad_(args.backward)
    grad_y = torch.randn(M, D, device=dev, dtype=dtype)
    if args.backward:
        def step(fn):
            xin.grad = None
            fn(xin).backward(grad_y)
    else:
        def step(fn):
            with torch.no_grad():
                fn(xin)

    what = "forward + backward" if args.backward else "forward"
    threads = torch.get_num_threads()
    print(f"transcoder ops {what}: M={M} D={D} {args.dtype} on {device_name(dev)}")
    rows = []
    for case, sides in cases.items():
        times = {side: [] for side in sides}
        for fn in sides.values():
            for _ in range(3):
                step(fn)  # warm-up
        for _ in range(args.rounds):  # interleaved, so that a noisy neighbour hurts both sides alike
            for side, fn in sides.items():
                times[side] += time_one(lambda: step(fn), dev, args.per_round)
        med = {side: statistics.median(t) for side, t in times.items()}
        err, ref_err = errs.get(case, (float("nan"), float("nan")))
        for side in sides:
            rows.append(dict(case=case, backend=side, mode=what, dtype=args.dtype, rows=M, dim=D, threads=threads,
                             us=1e6 * med[side], max_err=err if side == "engine" else ref_err))
        print(f"  {case:15s} composite {1e6 * med['composite']:9.1f} us   engine {1e6 * med['engine']:9.1f} us   "
              f"{med['composite'] / med['engine']:.2f}x")

    write_results(args.out, "transcoder", rows, dev, argv)


if __name__ == "__main__":
    main()

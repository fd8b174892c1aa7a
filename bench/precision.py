"""How far the engine's reduced-precision and fused-op paths move greedy codes from the float32 reference.

    python bench/precision.py                        # bundled model, CPU
    python bench/precision.py --device cuda

Greedy sampling (every draw its mode) makes the codes a deterministic function of the arithmetic, so the fraction of
bits equal to the float32 reference loop's measures what rounding changes. Reported per number of unmasking rounds:
with one round every token is decided from the same (all-masked) context; with more, a token that flips changes the
context of every later one, so trajectories drift apart. Appends to bench/results/<device>/precision.{csv,jsonl}.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import write_results  # noqa: E402

import bigr_engine as be  # noqa: E402
from bigr_engine.sampling import engine
from bigr_engine.ops import kernels
from bigr_engine.sampling import reference as sampler
from bigr_engine.sampling.options import SamplingOptions

VARIANTS = {  # name: engine.generate keywords
    "engine-torch fp32": dict(ops=False, dtype=torch.float32),
    "engine ops fp32": dict(ops=True, dtype=torch.float32),
    "engine bf16": dict(dtype=torch.bfloat16),
    "engine fp16": dict(dtype=torch.float16),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=40, help="images (classes in turn)")
    ap.add_argument("--rounds", default="1,2,4,8,16", help="unmasking rounds to try")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    model, _ = be.load_default(device=args.device)
    labels = torch.arange(args.images) % model.cfg.num_classes
    variants = {k: v for k, v in VARIANTS.items() if not v.get("ops") or kernels.choose(model.device).uses("posterior_step")}
    rows = []
    print(f"bundled model, {args.images} images, greedy, {args.steps} steps; fraction of bits equal to the fp32 reference")
    for iters in map(int, args.rounds.split(",")):
        opts = SamplingOptions(greedy=True, iters=iters, steps=args.steps)
        torch.backends.cuda.matmul.allow_tf32 = False
        ref = sampler.generate(model, labels, opts)
        line = []
        for name, kw in variants.items():
            got = engine.generate(model, labels, opts, cuda_graph=False, **kw)
            bits, tokens = (got == ref).float().mean().item(), (got == ref).all(-1).float().mean().item()
            rows.append(dict(variant=name, rounds=iters, steps=args.steps, images=args.images, bits_equal=bits,
                             tokens_equal=tokens))
            line.append(f"{name} {100 * bits:6.2f}%")
        print(f"  {iters:3d} rounds: " + "  ".join(line))
    write_results(args.out, "precision", rows, args.device, argv)


if __name__ == "__main__":
    main()

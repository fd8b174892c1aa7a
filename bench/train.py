"""Training-step throughput: the plain-PyTorch ops against the engine's fused ops, in one process, random weights.

    python bench/train.py --preset small                                   # CPU, float32, batch 32
    python bench/train.py --preset BiGR-L --device cuda --batch 64         # GPU: BiGR-L shapes, bfloat16 autocast

One step is what `bigr train` does per step: the masked-modeling loss (transformer + transcoder x repeat), backward,
gradient clipping, AdamW and the EMA update. Each backend trains its own copy of the same initial model; both run
the same step keys (hence the same masks and transcoder work) in interleaved rounds, so that a noisy neighbour hurts
both alike. Before timing, the two losses of one step are compared (exit 1 on a mismatch). The median over rounds is
reported as ms/step and images/s, appended to bench/results/<device>/train.{csv,jsonl}.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import PRESETS, device_name, time_one, write_results  # noqa: E402  (the one timing/results helper)

import bigr_engine as be  # noqa: E402
from bigr_engine.train.bigr import kernels_for, masked_modeling_loss, param_groups  # noqa: E402
from bigr_engine.train.state import Ema  # noqa: E402


class Trainer:
    """One backend's model, optimiser and EMA, and its training step."""

    def __init__(self, model, ops: str, device, autocast_dtype, repeat: int):
        self.model = copy.deepcopy(model).train()
        self.kernels, self.note = kernels_for(ops, device, autocast_dtype or torch.float32, model.cfg.head_dim)
        self.opt = torch.optim.AdamW(param_groups(self.model, 0.02), lr=1e-4, betas=(0.9, 0.95))
        self.ema = Ema(self.model, 0.9999)
        self.device_type = torch.device(device).type
        self.dtype = autocast_dtype
        self.repeat = repeat

    def loss(self, codes, labels, index, key: int):
        with torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return masked_modeling_loss(self.model, codes, labels, index, seed=0, step=key, repeat=self.repeat,
                                        kernels=self.kernels)

    def step(self, codes, labels, index, key: int):
        self.loss(codes, labels, index, key).mean().backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self.model)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help=f"{sorted(PRESETS)} or a released preset (BiGR-L, BiGR-XL, ...)")
    ap.add_argument("--bits", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="autocast dtype of the matmuls (default bfloat16 on cuda, float32 on cpu)")
    ap.add_argument("--batch", type=int, default=None, help="images per step (default 32 on CPU, 64 on GPU)")
    ap.add_argument("--repeat", type=int, default=4, help="transcoder repeats per masked token (the release's 4)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-round", type=int, default=3, help="steps per timed unit")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per backend first")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = args.device.startswith("cuda")
    dtype_name = args.dtype or ("bfloat16" if gpu else "float32")
    autocast_dtype = None if dtype_name == "float32" else getattr(torch, dtype_name)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True  # the release trains with TF32 matmuls
    torch.manual_seed(0)
    cfg = be.BiGRConfig(**PRESETS[args.preset]) if args.preset in PRESETS else be.bigr_preset(args.preset, bits=args.bits)
    model = be.BiGR(cfg).to(args.device)
    B = args.batch or (64 if gpu else 32)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 2, (B, cfg.num_tokens, cfg.bits), generator=g, dtype=torch.uint8).to(args.device)
    labels = (torch.arange(B) % cfg.num_classes).to(args.device)
    index = torch.arange(B, device=args.device)
    trainers = {name: Trainer(model, name, args.device, autocast_dtype, args.repeat) for name in ("reference", "engine")}
    del model
    if trainers["engine"].note:
        print(f"note: {trainers['engine'].note}")
    params = sum(p.numel() for p in trainers["reference"].model.parameters())
    print(f"{args.preset}: {params / 1e6:.1f}M params, N={cfg.num_tokens}, K={cfg.bits}, heads {cfg.n_head}x{cfg.head_dim}, "
          f"batch {B}, transcoder repeat {args.repeat}, {dtype_name} on {device_name(args.device)}")

    # Validate: the same weights give the same per-sample losses (float32: rounding only; bfloat16: its own noise).
    ref_loss = trainers["reference"].loss(codes, labels, index, 0).detach().double()
    eng_loss = trainers["engine"].loss(codes, labels, index, 0).detach().double()
    rel = ((eng_loss - ref_loss).abs() / ref_loss.abs()).max().item()
    tol = 1e-4 if autocast_dtype is None else 3e-2
    print(f"validate: per-sample loss max relative difference {rel:.3g} (tolerance {tol:g}): "
          f"{'ok' if rel <= tol else 'MISMATCH'}")
    if not rel <= tol:
        sys.exit(1)

    key = 0
    for name, t in trainers.items():
        for i in range(args.warmup):
            t.step(codes, labels, index, key + i)
    key += args.warmup
    times = {name: [] for name in trainers}
    for _ in range(args.rounds):
        for name, t in trainers.items():
            def unit(t=t, key=key):
                for i in range(args.per_round):
                    t.step(codes, labels, index, key + i)
            times[name] += [s / args.per_round for s in time_one(unit, args.device, 1)]
        key += args.per_round

    peak = torch.cuda.max_memory_allocated() / 2**20 if gpu else float("nan")
    rows = []
    for name, t in trainers.items():
        med = statistics.median(times[name])
        rows.append(dict(backend=name, attention="fused" if t.note is None and name == "engine" else "reference",
                         transcoder_ops=t.kernels.fused_blocks, preset=args.preset, dtype=dtype_name, batch=B, repeat=args.repeat,
                         threads=torch.get_num_threads(), ms_per_step=1e3 * med, images_per_s=B / med, peak_mib=peak,
                         max_rel_loss_diff=rel))
        print(f"  {name:10s} {1e3 * med:9.1f} ms/step  {B / med:8.1f} images/s  "
              f"(median of {args.rounds} rounds of {args.per_round}: {', '.join(f'{1e3 * s:.0f}' for s in times[name])} ms)")
    ratio = rows[0]["ms_per_step"] / rows[1]["ms_per_step"]
    for r in rows:  # every row has every column (one CSV header)
        r["speedup_vs_reference"] = rows[0]["ms_per_step"] / r["ms_per_step"]
    print(f"  engine vs reference: {ratio:.2f}x")
    write_results(args.out, "train", rows, args.device, argv)


if __name__ == "__main__":
    main()

"""Generation benchmark: the reference sampler and the engine, timed in one process on random weights.

    python bench/generate.py --preset small                       # CPU, ~5M params, 64 tokens
    python bench/generate.py --preset BiGR-L --device cuda --batch 64

Paper settings by default (iterations 20, transcoder steps 100, CFG 2.5). Each backend (BACKENDS below) is warmed
up, then timed `--repeats` times (device events on GPU); the median is reported as ms/image and images/s, with
peak memory and the useful TFLOP/s (the matmul FLOPs the engine must do, over the time) against the measured matmul
rate, and appended to bench/results/<device>/generate.{csv,jsonl}.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bigr_engine as be  # noqa: E402
from bigr_engine.sampling import engine  # noqa: E402
from results_io import append_results  # noqa: E402  (standard library only; tested by python_tests/test_bench_results.py)

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
    """Append rows (with date, device, torch version and the command) to <out_root>/<device>/<name>.{csv,jsonl}.
    The CSV keeps one header: new columns widen it and the file is rewritten (results_io.append_results)."""
    out = Path(out_root) / device_name(device)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    command = f"python bench/{name}.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for r in rows:
        r.update(date=stamp, device=device_name(device), torch=torch.__version__, command=command)
    append_results(out, name, rows)   # one schema per CSV: a header that grows is rewritten (bench/results_io.py)


BACKENDS = {
    # name: (model.generate backend, autocast dtype or None, engine ops, CUDA graph)
    "reference": ("reference", None, None, None),            # the release's algorithm, float32 (TF32 matmuls on GPU)
    "reference-bf16": ("reference", torch.bfloat16, None, None),  # the same under bfloat16 autocast
    "engine-torch": ("engine", torch.float32, False, False),   # the engine's algorithm in plain PyTorch, float32
    "engine": ("engine", None, None, None),                   # defaults: compiled ops, bf16 + CUDA graphs on GPU
    "engine-bf16": ("engine", torch.bfloat16, None, False),    # on CPU: the extra factor of bf16 matmuls
}
# What the "reference" backend is, written beside every ratio against it (rows before this column existed were timed
# against reference v1: two transcoder calls per step and the counter RNG hashed in Python, about 1.4x slower).
REFERENCE_IMPL = ("v2: the release's algorithm (all N tokens through the transcoder every step, the two CFG branches "
                  "in one call, time and condition embeddings per row and step), draws by the compiled rng_uniform")


def generation_flops(cfg, batch: int, iters: int, steps: int, use_cfg: bool, engine: bool) -> float:
    """Matmul FLOPs of one call (2 per multiply-add; attention's QK^T and PV included, embeddings and norms not).
    engine=True counts the work the engine must do (masked tokens only in the transcoder), else the release's."""
    from bigr_engine.sampling.engine import rounds_for
    from bigr_engine.sampling.options import SamplingOptions
    D, L, N, S = cfg.dim, cfg.n_layer, cfg.num_tokens, cfg.num_tokens + 1
    hidden = cfg.ffn_dim
    per_token_tr = L * (4 * D * D + 3 * D * hidden)          # qkv + wo, SwiGLU feed-forward
    Hd, Kb, nb = cfg.transcoder_dim, cfg.bits, cfg.transcoder_blocks
    per_token_tc = nb * (2 * Hd * Hd + 3 * Hd * Hd) + Kb * Hd + Hd * Kb + 2 * Hd * Hd   # blocks, in/out, final adaLN
    branches = 2 if use_cfg else 1
    total = 0.0
    for r in rounds_for(SamplingOptions(iters=iters, steps=steps), N):
        total += branches * batch * (S * per_token_tr + L * 2 * S * S * D)
        n = r.n if engine else N
        total += branches * batch * n * (steps * per_token_tc + D * Hd)
    return 2.0 * total


def matmul_rate(device: str, dtype: torch.dtype) -> float:
    """Measured dense matmul FLOP/s at a large square size: the roofline the useful-TFLOP/s figure is set against."""
    n = 4096 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    t = statistics.median(time_one(lambda: a @ b, device, 5))
    return 2 * n ** 3 / t


def make_labels(cfg, batch: int, device) -> torch.Tensor:
    """Class ids, or for a text model random prompt conditions (MiniLM's width, lengths 3..L tokens, left-padded)."""
    if not cfg.is_text:
        return torch.arange(batch, device=device) % cfg.num_classes
    from bigr_engine.models.text import pack_condition
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, cfg.text_tokens + 1, (batch,), generator=g)
    mask = torch.arange(cfg.text_tokens)[None] >= cfg.text_tokens - lengths[:, None]
    return pack_condition(torch.randn(batch, cfg.text_tokens, cfg.text_dim, generator=g), mask).to(device)


def validate(model, cfg, device: str) -> None:
    """Before timing, a short greedy run (2 images, 4 rounds, 5 steps) against the reference: the float32 engine in
    plain PyTorch must give its codes exactly; with the compiled ops (whose fused attention and LayerNorm round
    differently, which can flip a bit whose p0 is within rounding of 0.5: common with untrained weights) at least
    99% of bits (a broken op lands near 50%). bfloat16's agreement is printed only: on these random weights most
    logits sit near 0, where bf16 flips many greedy decisions (the bundled trained model keeps 99.7% per round).
    Exits 1 otherwise."""
    from bigr_engine.ops import kernels
    from bigr_engine.sampling import reference as sampler
    from bigr_engine.sampling.options import SamplingOptions
    labels = make_labels(cfg, 2, model.device)
    opts = SamplingOptions(greedy=True, iters=4, steps=5)
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = sampler.generate(model, labels, opts)
    plain = torch.equal(engine.generate(model, labels, opts, ops=False, dtype=torch.float32, cuda_graph=False), ref)
    report, ok = [f"engine-torch fp32 {'identical' if plain else 'DIFFERENT'}"], plain
    runs = [("bf16", dict(dtype=torch.bfloat16), 0.0)]
    if kernels.choose(model.device).uses("posterior_step"):
        runs.insert(0, ("engine fp32", dict(ops=True, dtype=torch.float32), 0.99))
    for name, kw, floor in runs:
        agree = (engine.generate(model, labels, opts, cuda_graph=False, **kw) == ref).float().mean().item()
        ok &= agree >= floor
        report.append(f"{name} {100 * agree:.2f}% of bits")
    print("validate (greedy codes vs the reference): " + ", ".join(report))
    if not ok:
        sys.exit(1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help=f"{sorted(PRESETS)} or a released preset (BiGR-L, BiGR-XL, ...)")
    ap.add_argument("--bits", type=int, default=16)
    ap.add_argument("--text", type=int, metavar="TOKENS", help="the preset as a text model with TOKENS text positions "
                    "(MiniLM's 384-d embeddings, no adaLN) instead of the class token")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="images per call (default 8 on CPU, 64 on GPU)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--cfg", type=float, default=2.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", default=None,
                    help=f"comma-separated, from {sorted(BACKENDS)} (default: reference,engine-torch,engine on CPU; "
                         "reference,reference-bf16,engine on GPU); the first is the baseline of the speed-ups")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    gpu = args.device.startswith("cuda")
    names = (args.backends or ("reference,reference-bf16,engine" if gpu else "reference,engine-torch,engine")).split(",")
    for name in names:
        if name not in BACKENDS:
            ap.error(f"unknown backend {name!r}: choose from {sorted(BACKENDS)}")

    torch.manual_seed(0)
    text = dict(text_dim=384, text_tokens=args.text, use_adaln=False) if args.text else {}
    cfg = be.BiGRConfig(**{**PRESETS[args.preset], **text}) if args.preset in PRESETS else \
        be.bigr_preset(args.preset, bits=args.bits, **text)
    model = be.BiGR(cfg).to(args.device).eval()
    if cfg.is_text:
        model.transformer.null_text.copy_(make_labels(cfg, 1, "cpu")[0])
    batch = args.batch or (64 if gpu else 8)
    labels = make_labels(cfg, batch, args.device)
    params = sum(p.numel() for p in model.parameters())
    use_cfg = args.cfg != 1.0
    peak_rate = matmul_rate(args.device, torch.bfloat16 if gpu else torch.float32)
    print(f"{args.preset}: {params / 1e6:.1f}M params, N={cfg.num_tokens}, K={cfg.bits}, batch {batch}, "
          f"iters {args.iters}, steps {args.steps}, cfg {args.cfg} on {device_name(args.device)}; "
          f"measured {'bf16' if gpu else 'fp32'} matmul rate {peak_rate / 1e12:.2f} TFLOP/s")
    validate(model, cfg, args.device)
    rows = []
    for name in names:
        backend, dtype, ops, graph = BACKENDS[name]
        torch.backends.cuda.matmul.allow_tf32 = name == "reference"   # the release enables TF32
        kw = dict(cfg=args.cfg, iters=args.iters, steps=args.steps, seed=0, backend=backend)
        if backend == "engine":
            kw.update(dtype=dtype, cuda_graph=graph)

        def run():
            with torch.autocast(args.device.split(":")[0], dtype=dtype or torch.float32,
                                enabled=backend == "reference" and dtype is not None):
                if backend == "engine" and ops is not None:
                    return engine.generate(model, labels, be.SamplingOptions(
                        cfg=args.cfg, iters=args.iters, steps=args.steps), None, False, ops=ops, dtype=dtype,
                        cuda_graph=graph)
                return model.generate(labels, **kw)
        run()  # warm-up (and graph capture)
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = time_one(run, args.device, args.repeats)
        med = statistics.median(times)
        peak = torch.cuda.max_memory_allocated() / 2**20 if gpu else float("nan")
        useful = generation_flops(cfg, batch, args.iters, args.steps, use_cfg, engine=True) / med
        rows.append(dict(backend=name, preset=args.preset + (f"+text{args.text}" if args.text else ""), batch=batch, iters=args.iters, steps=args.steps,
                         cfg=args.cfg, seconds=med, ms_per_image=1e3 * med / batch, images_per_s=batch / med,
                         peak_mib=peak, useful_tflops=useful / 1e12, matmul_tflops=peak_rate / 1e12,
                         fraction_of_matmul=useful / peak_rate, threads=torch.get_num_threads()))
        print(f"  {name:15s} {1e3 * med / batch:9.2f} ms/image  {batch / med:8.2f} images/s  "
              f"useful {useful / 1e12:6.3f} TFLOP/s ({100 * useful / peak_rate:4.1f}% of matmul)  "
              f"peak {peak:8.1f} MiB  (median of {args.repeats}: {', '.join(f'{t:.3f}' for t in times)} s)")
    for r in rows:   # every row gets the column (the CSV header comes from the first row)
        r["baseline"] = rows[0]["backend"]
        r["reference_impl"] = REFERENCE_IMPL
        r["speedup"] = rows[0]["seconds"] / r["seconds"]
        if r is not rows[0]:
            print(f"  speed-up of {r['backend']} over {rows[0]['backend']}: {r['speedup']:.2f}x")
    write_results(args.out, "generate", rows, args.device, argv)


if __name__ == "__main__":
    main()

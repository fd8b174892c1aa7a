"""Exported pipelines against the PyTorch engine, per image, in one process.

    python bench/deploy.py                                   # CPU: the bundled model, fp32, ORT vs the engine
    python bench/deploy.py --device cuda --preset BiGR-L --batch 64 --tensorrt    # a GPU with the tensorrt package

The model is exported (bigr export onnx) to a temporary folder, loaded in ONNX Runtime (OnnxPipeline) and, with
--tensorrt, built into TensorRT engines (TensorRTPipeline, bf16 graphs, the engine's CUDA sampling kernels). Every
backend first generates the same batch as the engine (the baseline) and reports the fraction of code bits that agree
(greedy and sampled), then is timed (--repeats, median). Rows go to bench/results/<device>/deploy.{csv,jsonl}.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bigr_engine as be  # noqa: E402
from generate import device_name, write_results  # noqa: E402


def timed(fn, repeats: int, cuda: bool) -> list[float]:
    out = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bundled", help="bundled (the default model, its tuned settings) or a released "
                                                        "preset with random weights (BiGR-L, ...)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iters", type=int, help="default: the model's")
    ap.add_argument("--steps", type=int, help="default: the model's")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch and ONNX Runtime intra-op threads (default: torch's)")
    ap.add_argument("--tensorrt", action="store_true", help="also build and time TensorRT engines (GPU)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    from bigr_engine.export.onnx_export import export_onnx
    from bigr_engine.export.pipeline import OnnxPipeline
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    cuda = args.device.startswith("cuda")
    if args.preset == "bundled":
        model, bae = be.load_default(device=args.device)
    else:
        torch.manual_seed(0)
        model, bae = be.BiGR(be.bigr_preset(args.preset)).to(args.device).eval(), None
    opts = {k: v for k, v in dict(iters=args.iters, steps=args.steps).items() if v is not None}
    labels = np.arange(args.batch) % model.cfg.num_classes
    dtype = "bfloat16" if cuda else "float32"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        backends = {"engine": lambda **kw: model.generate(labels, dtype=dtype, **opts, **kw).cpu().numpy()}
        t = time.perf_counter()
        if not cuda:   # ONNX Runtime's CPU provider: float32 graphs
            export_onnx(model, bae, Path(tmp) / "onnx", dtype="float32", progress=False)
            ort = OnnxPipeline(Path(tmp) / "onnx", threads=threads)
            backends["onnxruntime"] = lambda **kw: ort.generate(labels, **opts, **kw)
        if args.tensorrt:
            from bigr_engine.export.tensorrt import TensorRTPipeline, build_engines
            export_onnx(model, bae, Path(tmp) / "bf16", dtype="bfloat16", progress=False)
        export_s = time.perf_counter() - t
        if args.tensorrt:
            build_engines(Path(tmp) / "bf16", Path(tmp) / "engines", [1, 8, args.batch], progress=False)
            trt = TensorRTPipeline(Path(tmp) / "engines")
            backends["tensorrt"] = lambda **kw: trt.generate(labels, **opts, **kw)
        want = {m: backends["engine"](**kw) for m, kw in (("greedy", dict(greedy=True)), ("sampled", dict(seed=0)))}
        for name, fn in backends.items():
            agree = {m: float((fn(**kw) == want[m]).mean())
                     for m, kw in (("greedy", dict(greedy=True)), ("sampled", dict(seed=0)))}
            times = timed(lambda: fn(seed=0), args.repeats, cuda)
            med = statistics.median(times)
            rows.append(dict(backend=name, preset=args.preset, batch=args.batch, engine_dtype=dtype,
                             seconds=med, ms_per_image=1e3 * med / args.batch, images_per_s=args.batch / med,
                             greedy_bits_agree=agree["greedy"], sampled_bits_agree=agree["sampled"],
                             threads=threads, export_s=export_s))
            print(f"  {name:12s} {1e3 * med / args.batch:8.2f} ms/image  {args.batch / med:8.2f} images/s  "
                  f"bits agreeing with the engine: greedy {agree['greedy']:.5f}, sampled {agree['sampled']:.5f}  "
                  f"(median of {args.repeats}: {', '.join(f'{x:.3f}' for x in times)} s)")
    for r in rows:
        r["vs_engine"] = rows[0]["seconds"] / r["seconds"]
        if r is not rows[0]:
            print(f"  {r['backend']}: {r['vs_engine']:.2f}x the engine's images/s")
    print(f"export took {export_s:.1f} s on {device_name(args.device)}")
    write_results(args.out, "deploy", rows, args.device, argv)


if __name__ == "__main__":
    main()

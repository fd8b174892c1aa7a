"""Per-image latency of the C++ API (bigr::Pipeline, no Python at run time) against the Python engine, on the CPU.

    python bench/cpp.py                       # the bundled model, batches 1, 4 and 16, torch's thread count
    python bench/cpp.py --threads 1 --batches 1,16
    python bench/cpp.py --device cuda        # a GPU: both sides on it, in Python's default dtype there (bfloat16)

The bundled model is exported (bigr export cpp) to a temporary folder and bench/cpp (bigr-latency) is built against
the installed CMake package. For each batch both sides first generate the same batch (seed 0, the model's settings)
and the fraction of code bits that agree is reported (1.0: bit for bit); then each is timed after a warm-up call
(--repeats, median). The C++ side runs in its own process (a C++ program cannot run inside this one); both use the
same number of intra-op threads. Rows go to bench/results/<device>/cpp.{csv,jsonl}, with the glibc malloc
settings of the run (MALLOC_* variables, which both processes inherit): at batch 16 they change both sides' speed
(the README gives the numbers).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
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

BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    """cmake and ninja from the venv (tools/env.sh installs them), else from PATH."""
    return str(BIN / name) if (BIN / name).exists() else (shutil.which(name) or name)


def build(dst: Path) -> Path:
    for cmd in ([_tool("cmake"), "-S", str(Path(__file__).parent / "cpp"), "-B", str(dst), "-G", "Ninja",
                 f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}", "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={be.cmake_prefix_path}"], [_tool("cmake"), "--build", str(dst)]):
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    return dst / "bigr-latency"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="intra-op threads on both sides (default: torch's)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    from bigr_engine.export.cpp_export import export_cpp
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    model, bae = be.load_default(device=args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_cpp(model, bae, tmp / "model", class_names=model.class_names)
        t = time.perf_counter()
        exe = build(tmp / "build")
        build_s = time.perf_counter() - t
        for batch in (int(b) for b in args.batches.split(",")):
            labels = torch.arange(batch) % model.cfg.num_classes
            want = model.generate(labels, seed=0).cpu().numpy()   # also the warm-up (a CUDA graph capture on a GPU)
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                model.generate(labels, seed=0).cpu()
                times.append(time.perf_counter() - t)
            r = subprocess.run([str(exe), str(tmp / "model"), str(batch), str(args.repeats), str(threads),
                                str(tmp / "codes.npy"), args.device], check=True, capture_output=True, text=True)
            cpp_times = json.loads(r.stdout)["seconds"]
            agree = float((np.load(tmp / "codes.npy") == want).mean())
            py, cc = statistics.median(times), statistics.median(cpp_times)
            for name, med, ts in (("python-engine", py, times), ("cpp", cc, cpp_times)):
                rows.append(dict(backend=name, preset="bundled", batch=batch, dtype="bfloat16" if args.device.startswith("cuda") else "float32", seconds=med,
                                 ms_per_image=1e3 * med / batch, images_per_s=batch / med, bits_agree=agree,
                                 vs_python=py / med, threads=threads, build_s=build_s,
                                 malloc_env=" ".join(f"{k}={v}" for k, v in sorted(os.environ.items())
                                                     if k.startswith("MALLOC_")) or "default"))
            print(f"batch {batch:3d}: python {1e3 * py / batch:7.2f} ms/image, C++ {1e3 * cc / batch:7.2f} ms/image "
                  f"-> C++ {py / cc:.2f}x; code bits agreeing {agree:.5f} (medians of {args.repeats})")
    print(f"bench/cpp built in {build_s:.0f} s on {device_name(args.device)}")
    write_results(args.out, "cpp", rows, args.device, argv)


if __name__ == "__main__":
    main()

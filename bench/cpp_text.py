"""The C++ text encoder (bigr::Pipeline's prompts: BERT WordPiece + the BERT encoder) against Python's, at scale.

    python bench/cpp_text.py                     # every caption of train.captions' tables + 5000 random ASCII strings
    python bench/cpp_text.py --random 20000 --codes 64

The bundled text model is exported (bigr export cpp --text) to a temporary folder, and python_tests/cpp/checks
(pipeline-checks) and examples/cpp (bigr-generate) are built against the installed CMake package. Reported:
- token ids: C++ `tokenize` vs the Hugging Face fast tokenizer as models.text.TextEncoder calls it, per prompt;
- embeddings: C++ `encode_text` vs TextEncoder, in batches of 64 captions: how many are bit-equal, the largest
  difference, and Python's own float32 error (against the encoder run in float64) for scale;
- codes: `bigr-generate --prompt` vs model.generate on --codes captions (the model's settings, seed 0), in batches
  of 16: how many images have equal codes.
The caption tables are the training and held-out phrasings the bundled model was trained and evaluated on.
Appends a row to bench/results/<device>/cpp_text.{csv,jsonl}.
"""
from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import bigr_engine as be  # noqa: E402
from generate import write_results  # noqa: E402

BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    import shutil
    return str(BIN / name) if (BIN / name).exists() else (shutil.which(name) or name)


def build(src: Path, dst: Path) -> None:
    for cmd in ([_tool("cmake"), "-S", str(src), "-B", str(dst), "-G", "Ninja",
                 f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}", "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={be.cmake_prefix_path}"],
                [_tool("cmake"), "--build", str(dst)]):
        subprocess.run(cmd, check=True, capture_output=True, text=True)


def write_prompts(path: Path, prompts) -> Path:
    """pipeline-checks' prompt file: each prompt as a uint32 little-endian byte count, then its bytes."""
    path.write_bytes(b"".join(len(p.encode()).to_bytes(4, "little") + p.encode() for p in prompts))
    return path


def random_ascii(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    alphabet = [chr(c) for c in range(32, 127)] * 3 + list("aeiou     ") * 4 + ["\t", "\n", "\x00", "\x07", "\x7f"]
    return ["".join(rng.choice(alphabet, size=rng.integers(0, 60))) for _ in range(n)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--random", type=int, default=5000, help="random ASCII prompts for the tokenizer (default 5000)")
    ap.add_argument("--codes", type=int, default=32, help="captions generated on both sides (default 32)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads on both sides (default 2)")
    args = ap.parse_args(argv)
    from bigr_engine.export.cpp_export import export_cpp
    from bigr_engine.io.default import load_default_text
    from bigr_engine.train.captions import caption_table
    torch.set_num_threads(args.threads)
    model, bae = load_default_text()
    enc = model.text_encoder
    captions = sorted({c for split in (False, True, "held_out_readable") for _, c, _, _ in caption_table(split)})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        d = export_cpp(model, bae, tmp / "model", class_names=model.class_names)
        t = time.perf_counter()
        build(ROOT / "python_tests" / "cpp" / "checks", tmp / "checks")
        build(ROOT / "examples" / "cpp", tmp / "example")
        print(f"built pipeline-checks and bigr-generate in {time.perf_counter() - t:.0f} s")
        checks = str(tmp / "checks" / "pipeline-checks")

        prompts = captions + random_ascii(7, args.random)
        subprocess.run([checks, "tokenize", str(d), str(write_prompts(tmp / "p.bin", prompts)), str(tmp / "ids.npy"),
                        str(tmp / "mask.npy")], check=True)
        want = enc.tokenizer(prompts, padding="max_length", max_length=enc.max_tokens, truncation=True,
                             return_tensors="np")
        same = np.all(np.load(tmp / "ids.npy") == want["input_ids"], axis=1)
        masks = np.array_equal(np.load(tmp / "mask.npy"), want["attention_mask"])
        print(f"token ids equal: {same[:len(captions)].sum()}/{len(captions)} captions, "
              f"{same[len(captions):].sum()}/{args.random} random ASCII strings; masks equal: {masks}")

        m64 = copy.deepcopy(enc.model).double()
        equal = total = 0
        diff = err32 = err_cpp = 0.0
        for lo in range(0, len(captions), 64):
            batch = captions[lo:lo + 64]
            subprocess.run([checks, "encode", str(d), str(write_prompts(tmp / "e.bin", batch)), str(tmp / "emb.npy")],
                           check=True)
            got = torch.from_numpy(np.load(tmp / "emb.npy"))
            ref, mask = enc(batch)
            tokens = enc.tokenizer(batch, padding="max_length", max_length=enc.max_tokens, truncation=True,
                                   return_tensors="pt")
            with torch.inference_mode():
                oracle = m64(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
            oracle = oracle.masked_fill(~mask[..., None], 0.0)
            equal += sum(bool(torch.equal(a, b)) for a, b in zip(got, ref))
            total += len(batch)
            diff = max(diff, float((got - ref).abs().max()))
            err32 = max(err32, float((ref.double() - oracle).abs().max()))
            err_cpp = max(err_cpp, float((got.double() - oracle).abs().max()))
        print(f"embeddings bit-equal: {equal}/{total} captions (batches of 64); max |C++ - Python| {diff:.3g}; "
              f"max error vs float64: Python {err32:.3g}, C++ {err_cpp:.3g}")

        chosen = captions[::max(1, len(captions) // args.codes)][:args.codes]
        cmd = [str(tmp / "example" / "bigr-generate"), "--model", str(d), "--out", str(tmp / "gen"), "--codes-out",
               str(tmp / "codes.npy"), "--threads", str(args.threads), "--batch-size", "16"]
        for p in chosen:
            cmd += ["--prompt", p]
        subprocess.run(cmd, check=True, capture_output=True)
        got = np.load(tmp / "codes.npy")
        want = np.concatenate([
            model.generate(chosen[lo:lo + 16], sample_index=list(range(lo, min(lo + 16, len(chosen))))).numpy()
            for lo in range(0, len(chosen), 16)])
        codes_equal = int(np.all(got == want, axis=(1, 2)).sum())
        print(f"codes equal: {codes_equal}/{len(chosen)} images (bigr-generate --prompt "
              f"vs model.generate, the model's settings, seed 0)")
    write_results(ROOT / "bench" / "results", "cpp_text", [dict(
        captions=len(captions), caption_ids_equal=int(same[:len(captions)].sum()), random_strings=args.random,
        random_ids_equal=int(same[len(captions):].sum()), masks_equal=bool(masks), embeddings_bit_equal=equal,
        embeddings_total=total, max_abs_diff=diff, python_err_vs_f64=err32, cpp_err_vs_f64=err_cpp,
        codes_images=len(chosen), codes_equal=codes_equal, threads=args.threads)], "cpu", argv)


if __name__ == "__main__":
    main()

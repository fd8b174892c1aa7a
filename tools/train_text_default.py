"""The recipe of the bundled text-to-image model: a text-conditioned BiGR on Fashion-MNIST captions, on a CPU.

    python tools/train_text_default.py --work runs/text      # resumable; then copies into bigr_engine/assets/

Steps: encode the training set with the bundled B-AE (the class model's tokenizer) to packed codes; give every image
eight true captions (bigr_engine/train/captions.py: its class by a synonym, optionally its measured brightness and
width, in one of the training templates); embed the distinct captions and the empty prompt once with the MiniLM
text encoder (16 tokens, left-padded) and store them next to the codes; train the text model (no adaLN: conditioning
through the 16 text tokens only), warm-started from the bundled class model's blocks, token embedding and transcoder;
write it as safetensors plus `default_text.json` into the package. Needs the `text` extra.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import bigr_engine as be
from bigr_engine.io.default import ASSETS, default_info
from bigr_engine.models.text import minilm, pack_condition
from bigr_engine.train import captions, fashion_mnist as fm
from bigr_engine.train.bigr import TextConditions, TrainRecipe, train
from bigr_engine.train.codes_dataset import CodesDataset, encode_dataset

TEXT_TOKENS = 16
BIGR = be.BiGRConfig(dim=128, n_layer=4, n_head=2, bits=16, num_tokens=64, num_classes=10, use_adaln=False,
                     transcoder_blocks=2, transcoder_dim=128, text_dim=384, text_tokens=TEXT_TOKENS)
SAMPLING = dict(cfg=3.0, iters=16, steps=25, gumbel=1.0, gumbel_schedule="down", temperature=1.0, deterministic=True)


def caption_conditions(work: Path, labels: np.ndarray, attrs: dict) -> TextConditions:
    """The distinct captions' conditions, each image's caption ids and the empty prompt's, cached in work/."""
    path = work / "captions.pt"
    if path.exists():
        d = torch.load(path)
        return TextConditions(d["table"], d["ids"], d["null"])
    texts, ids = captions.assign(labels, attrs, slots=8)
    enc = minilm(max_tokens=TEXT_TOKENS)
    table = torch.cat([pack_condition(*enc(texts[i:i + 256])) for i in range(0, len(texts), 256)])
    null = pack_condition(*enc([""]))[0]
    torch.save({"texts": texts, "table": table, "ids": torch.from_numpy(ids), "null": null}, path)
    return TextConditions(table, torch.from_numpy(ids), null)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/text", help="working folder (codes, captions, checkpoints); resumable")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--no-install", action="store_true", help="do not copy the result into bigr_engine/assets")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    info = default_info()
    bae = be.load_bae(ASSETS / info["bae"])
    images, labels = fm.load("train")
    encode_dataset(bae, fm.as_rgb32(images), torch.as_tensor(labels), work / "codes")
    data = CodesDataset(work / "codes")
    conds = caption_conditions(work, labels, captions.measure(images, labels))
    init = be.load_bigr(ASSETS / info["bigr"]).state_dict()   # warm start: blocks, token embedding, transcoder
    recipe = TrainRecipe(steps=args.steps, batch_size=args.batch_size, lr=6e-4, warmup=100, ema=0.998,
                         transcoder_repeat=2, save_every=250, class_dropout=0.1)
    _, ema = train(data, conds, BIGR, recipe, work / "bigr", init=init)
    out = be.save_model(ema, work / "bigr_text_fmnist.safetensors")
    (work / "default_text.json").write_text(json.dumps({
        "bigr": out.name, "bae": info["bae"], "text_encoder": {"name": "minilm", "max_tokens": TEXT_TOKENS},
        "class_names": fm.CLASSES, "sampling": SAMPLING, "image_transform": "fashion-mnist-rgb32",
        "recipe": {"command": "python tools/train_text_default.py", "steps": args.steps,
                   "batch_size": args.batch_size, "warm_start": info["bigr"]},
    }, indent=2) + "\n")
    print(f"trained in {time.time() - t0:.0f} s: {out}")
    if not args.no_install:
        for name in (out.name, out.with_suffix(".json").name, "default_text.json"):
            shutil.copy(work / name, ASSETS / name)
        print(f"installed into {ASSETS}")


if __name__ == "__main__":
    main()

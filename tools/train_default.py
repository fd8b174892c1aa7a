"""The recipe of the bundled default model: a B-AE and a BiGR trained on Fashion-MNIST, on a CPU.

    python tools/train_default.py --work runs/default      # resumable; then copies into bigr_engine/assets/

Steps: train the tokenizer (32x32 RGB-padded images -> 8x8 tokens of 16 bits), encode the training set
to packed codes, train BiGR on them, and write both models as safetensors plus `default.json`
(class names and the sampling settings tuned for this model) into the package.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

import bigr_engine as be
from bigr_engine.train import fashion_mnist as fm
from bigr_engine.train.codes_dataset import CodesDataset, encode_dataset
from bigr_engine.train.bigr import TrainRecipe, train
from bigr_engine.train.tokenizer import TokenizerRecipe, train_tokenizer

ASSETS = Path(be.__file__).parent / "assets"
BAE = be.BAEConfig(nf=32, ch_mult=[1, 2, 2], res_blocks=1, attn_resolutions=[], emb_dim=64, codebook_size=16, img_size=32)
BIGR = be.BiGRConfig(dim=128, n_layer=4, n_head=2, bits=16, num_tokens=64, num_classes=10,
                     transcoder_blocks=2, transcoder_dim=128)
SAMPLING = dict(cfg=3.0, iters=16, steps=25, gumbel=1.0, gumbel_schedule="down", temperature=1.0, deterministic=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/default", help="working folder (checkpoints, logs, codes); resumable")
    ap.add_argument("--tokenizer-steps", type=int, default=2000)
    ap.add_argument("--disc-start", type=int, default=None,
                    help="step at which the patch-GAN starts (default: never; the shipped tokenizer is L1-only, "
                         "since the GAN phase was too slow for a 2-core CPU budget)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--no-install", action="store_true", help="do not copy the result into bigr_engine/assets")
    args = ap.parse_args(argv)
    work = Path(args.work)
    t0 = time.time()

    bae_file = work / "bae_fmnist.safetensors"
    if not bae_file.exists():
        images, _ = fm.load("train")
        bae = train_tokenizer(fm.as_rgb32(images), BAE, TokenizerRecipe(steps=args.tokenizer_steps, batch_size=32,
                                                                       disc_start=args.disc_start or args.tokenizer_steps),
                              work / "tokenizer")
        be.save_model(bae, bae_file)
    bae = be.load_bae(bae_file)

    codes_dir = work / "codes"
    images, labels = fm.load("train")
    encode_dataset(bae, fm.as_rgb32(images), torch.as_tensor(labels), codes_dir)
    data = CodesDataset(codes_dir)

    recipe = TrainRecipe(steps=args.steps, batch_size=args.batch_size, lr=1e-3, warmup=200, ema=0.999,
                         transcoder_repeat=2, save_every=250)
    _, ema = train(data, data.labels, BIGR, recipe, work / "bigr")
    bigr_file = be.save_model(ema, work / "bigr_fmnist.safetensors")
    (work / "default.json").write_text(json.dumps({
        "bigr": "bigr_fmnist.safetensors", "bae": "bae_fmnist.safetensors", "class_names": fm.CLASSES,
        "sampling": SAMPLING, "image_transform": "fashion-mnist-rgb32",
        "recipe": {"tokenizer_steps": args.tokenizer_steps, "steps": args.steps, "batch_size": args.batch_size},
    }, indent=2) + "\n")
    print(f"trained in {time.time() - t0:.0f} s: {bigr_file}, {bae_file}")
    if not args.no_install:
        ASSETS.mkdir(exist_ok=True)
        for name in ("bigr_fmnist.safetensors", "bigr_fmnist.json", "bae_fmnist.safetensors", "bae_fmnist.json", "default.json"):
            shutil.copy(work / name, ASSETS / name)
        print(f"installed into {ASSETS}")


if __name__ == "__main__":
    main()

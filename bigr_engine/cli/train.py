"""`bigr encode-dataset`, `bigr train-tokenizer` and `bigr train`."""
from __future__ import annotations

from pathlib import Path

import torch

from bigr_engine.cli.common import pick_device
from bigr_engine.io.distributed import is_main_process
from bigr_engine.errors import BigrError


def _images_and_labels(source: str, size: int, split: str):
    from bigr_engine.train import fashion_mnist as fm
    if source == "fashion-mnist":
        if size != 32:
            raise BigrError(f"Fashion-MNIST is padded to 32x32 for the tokenizer, but this tokenizer takes {size}x{size}")
        images, labels = fm.load(split)
        return fm.as_rgb32(images), torch.as_tensor(labels)
    from bigr_engine.io.images import load_image_folder
    images, labels, _ = load_image_folder(source, size)
    return images, labels


def cmd_encode_dataset(args) -> int:
    import bigr_engine as be
    from bigr_engine.train.codes_dataset import encode_dataset
    bae = be.load_bae(args.bae, device=pick_device(args.device))
    if args.captions:   # (image, caption) pairs: codes plus the captions' text conditions, encoded once
        from bigr_engine.models.text import load_text_encoder
        from bigr_engine.train.caption_dataset import load_caption_dataset, prepare_caption_dataset
        encoder = load_text_encoder(args.text_encoder, args.text_tokens)
        prepare_caption_dataset(bae, encoder, args.source, args.out, progress=not args.quiet)
        codes, conds, _ = load_caption_dataset(args.out)
        print(f"wrote {len(codes)} packed codes and {len(conds.table)} distinct captions' conditions to {args.out}")
        return 0
    images, labels = _images_and_labels(args.source, bae.cfg.img_size, args.split)
    encode_dataset(bae, images, labels, args.out, shard_size=args.shard_size, progress=not args.quiet)
    print(f"wrote {len(labels)} packed codes to {args.out}")
    return 0


def cmd_train_tokenizer(args) -> int:
    import bigr_engine as be
    from bigr_engine.train.tokenizer import TokenizerRecipe, train_tokenizer
    cfg = be.BAEConfig(nf=args.nf, ch_mult=[int(c) for c in args.ch_mult.split(",")], res_blocks=args.res_blocks,
                       attn_resolutions=[], emb_dim=args.emb_dim, codebook_size=args.bits, img_size=args.img_size)
    images, _ = _images_and_labels(args.source, cfg.img_size, "train")
    recipe = TokenizerRecipe(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             disc_start=args.disc_start if args.disc_start is not None else args.steps)
    bae = train_tokenizer(images, cfg, recipe, Path(args.out), progress=not args.quiet)
    dst = be.save_model(bae, Path(args.out) / "bae.safetensors")
    print(f"wrote {dst}")
    return 0


def cmd_train(args) -> int:
    import bigr_engine as be
    from bigr_engine.train.codes_dataset import CodesDataset
    from bigr_engine.train.bigr import TrainRecipe, init_distributed, train
    from bigr_engine.train.caption_dataset import CAPTIONS, load_caption_dataset
    init_distributed()
    text = {}
    if (Path(args.data) / CAPTIONS).is_file():   # a caption dataset: a text model (no adaLN, the text tokens)
        data, labels, _ = load_caption_dataset(args.data)
        text = dict(text_dim=labels.table.shape[-1] - 1, text_tokens=labels.table.shape[1], use_adaln=False)
        classes = 1 if args.num_classes is None else args.num_classes
    else:
        data = CodesDataset(args.data)
        labels = data.labels
        classes = int(data.labels.max()) + 1 if args.num_classes is None else args.num_classes
    cfg = be.BiGRConfig(dim=args.dim, n_layer=args.layers, n_head=args.dim // 64 if args.heads is None else args.heads,
                        bits=data.bits, num_tokens=data.num_tokens, num_classes=classes,
                        transcoder_blocks=args.transcoder_blocks, transcoder_dim=args.transcoder_dim or args.dim, **text)
    recipe = TrainRecipe(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                         warmup=args.warmup, ema=args.ema, seed=args.seed, ops=args.ops, sample_every=args.sample_every)
    device = pick_device(args.device)
    bae = be.load_bae(args.bae, device=device) if args.bae else None  # only to decode the sample grids
    _, ema = train(data, labels, cfg, recipe, Path(args.out), device=device, progress=not args.quiet, bae=bae)
    if is_main_process():
        dst = be.save_model(ema, Path(args.out) / "bigr.safetensors")
        print(f"wrote {dst} (EMA weights)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("encode-dataset", help="images -> bit-packed code shards for training")
    p.add_argument("source", help="an image folder (ImageFolder layout) or 'fashion-mnist'")
    p.add_argument("--bae", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="train", choices=["train", "test"], help="Fashion-MNIST split")
    p.add_argument("--shard-size", type=int, default=10000)
    p.add_argument("--captions", action="store_true", help="SOURCE is (image, caption) pairs: a JSONL manifest "
                   "({\"image\": PATH, \"caption\": TEXT or [TEXT, ...]} per line) or a folder of images each with a "
                   ".txt caption file; the captions are embedded once (--text-encoder) and stored beside the codes, "
                   "and `bigr train` on the folder trains a text model")
    p.add_argument("--text-encoder", default="minilm", metavar="minilm|DIR", help="with --captions: minilm (default) "
                   "or a local Hugging Face encoder folder (e.g. a T5)")
    p.add_argument("--text-tokens", type=int, default=120, help="with --captions: text positions, prompts left-padded "
                   "(default 120, the paper's)")
    p.add_argument("--device")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_encode_dataset)

    p = sub.add_parser("train-tokenizer", help="train a B-AE tokenizer (L1 + patch-GAN)")
    p.add_argument("source", help="an image folder or 'fashion-mnist'")
    p.add_argument("--out", required=True, help="working folder (resumable)")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--bits", type=int, default=16)
    p.add_argument("--nf", type=int, default=32)
    p.add_argument("--ch-mult", default="1,2,2")
    p.add_argument("--res-blocks", type=int, default=1)
    p.add_argument("--emb-dim", type=int, default=64)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--disc-start", type=int, help="step at which the GAN loss starts (default: off)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train_tokenizer)

    p = sub.add_parser("train", help="train BiGR on a codes dataset (torchrun for several processes)")
    p.add_argument("data", help="a folder written by `bigr encode-dataset`")
    p.add_argument("--out", required=True, help="working folder (resumable)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int)
    p.add_argument("--transcoder-blocks", type=int, default=2)
    p.add_argument("--transcoder-dim", type=int)
    p.add_argument("--num-classes", type=int)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ops", choices=["engine", "reference"], default="engine",
                   help="engine: the extension's fused attention (and transcoder ops) where built, else the plain-PyTorch "
                        "path with a warning; reference: plain PyTorch. A run may resume with the other (default engine)")
    p.add_argument("--bae", metavar="TOKENIZER", help="the B-AE the codes were encoded with: decodes the sample grids "
                   "RUN/samples/step_XXXXXXX.png (without it no grids are written)")
    p.add_argument("--sample-every", type=int, default=1000, metavar="STEPS",
                   help="a grid of EMA samples every STEPS steps and at the end (default 1000; 0 = none)")
    p.add_argument("--device")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

"""The `bigr` command: generate, convert, info, datasets and training; applications in cli_apps.

Every user error is one line on stderr ("error: ...", naming the problem and the fix) and exit status 2;
outputs are written only after all work succeeded, through temporary files renamed into place.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .errors import BigrError

ASSETS = Path(__file__).parent / "assets"


# ---- classes -------------------------------------------------------------------------------------

def imagenet_names() -> list[str]:
    path = ASSETS / "imagenet_classes.txt"
    return path.read_text().splitlines() if path.is_file() else []


def class_names(model) -> list[str]:
    """Names for the model's classes: its own list if it carries one, ImageNet's for 1000-class models."""
    names = getattr(model, "class_names", None)
    if names:
        return list(names)
    return imagenet_names() if model.cfg.num_classes == 1000 else []


def resolve_classes(text: str | None, model) -> list[int]:
    """'1,2,tabby' -> ids. Names match any comma-separated synonym of a class, case-insensitively;
    entries are separated by commas or semicolons (a name's synonyms never need typing in full)."""
    C = model.cfg.num_classes
    if not text:
        return sorted({round(i * (C - 1) / 3) for i in range(4)})
    names = class_names(model)
    lookup = {}
    for i, line in enumerate(names):
        for syn in line.split(","):
            lookup.setdefault(syn.strip().lower(), i)
        lookup.setdefault(line.strip().lower(), i)
    ids = []
    for part in [p.strip() for p in text.replace(";", ",").split(",") if p.strip()]:
        if part.lstrip("-").isdigit():
            c = int(part)
            if not 0 <= c < C:
                raise BigrError(f"class id {c} is out of range: this model has classes 0..{C - 1}")
        elif part.lower() in lookup:
            c = lookup[part.lower()]
        elif names:
            near = [n.split(",")[0] for n in names if part.lower() in n.lower()][:5]
            hint = f"; did you mean {', '.join(near)}?" if near else "; pass a class id instead"
            raise BigrError(f"unknown class name {part!r}{hint}")
        else:
            raise BigrError(f"unknown class name {part!r}: this model carries no class names; pass ids 0..{C - 1}")
        ids.append(c)
    return ids


# ---- generate ------------------------------------------------------------------------------------

def _device(name: str | None) -> torch.device:
    try:
        dev = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise BigrError(f"unknown device {name!r}; pass cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BigrError("--device cuda was asked for but no CUDA GPU is visible; pass --device cpu")
    return dev


def load_models(args, device):
    import bigr_engine as be
    dtype = getattr(torch, args.dtype)
    if args.ckpt is None and args.bae is None:
        try:
            return be.load_default(device=device, dtype=dtype)
        except BigrError:
            raise BigrError("no model given and no bundled default is installed: pass --ckpt bigr_L_d24.pt (a released "
                            "BiGR .pt or a .safetensors from `bigr convert`) and --bae binaryae_ema_1000000.th") from None
    if args.ckpt is None or args.bae is None:
        missing = "--ckpt (the BiGR model)" if args.ckpt is None else "--bae (the B-AE tokenizer the model was trained with)"
        raise BigrError(f"pass {missing} too: --ckpt and --bae go together (or give neither to use the bundled default)")
    model = be.load_bigr(args.ckpt, device=device, dtype=dtype)
    bae = be.load_bae(args.bae, device=device)
    return model, bae


def cmd_generate(args) -> int:
    from tqdm.auto import tqdm

    import bigr_engine as be
    from .cli_apps import _sheet, _to_pil, _write_all
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise BigrError(f"--out {out} is an existing file; pass a folder")
    device = _device(args.device)
    model, bae = load_models(args, device)
    be.check_pair(model, bae)
    ids = resolve_classes(args.classes, model)
    sampling = dict(getattr(model, "default_sampling", {}) or {})
    for k in ("cfg", "iters", "steps", "gumbel", "cfg_schedule", "gumbel_schedule", "temperature"):
        if getattr(args, k) is not None:
            sampling[k] = getattr(args, k)
    labels = torch.tensor(ids).repeat_interleave(args.per_class)
    images = []
    with tqdm(total=len(labels), desc="generate", unit="img", disable=args.quiet) as bar:
        for lo in range(0, len(labels), args.batch_size):
            chunk = labels[lo:lo + args.batch_size]
            codes = model.generate(chunk, seed=args.seed, greedy=args.greedy, sample_index=torch.arange(lo, lo + len(chunk)),
                                   **sampling)
            with torch.no_grad():
                images.append(bae.decode(codes).float().cpu())
            bar.update(len(chunk))
    images = torch.cat(images)
    files = {out / f"{i:05d}_{int(c)}.png": _to_pil(img) for i, (img, c) in enumerate(zip(images, labels))}
    nrow = args.nrow or (args.per_class if args.per_class > 1 else min(8, len(images)))
    pils = list(files.values())
    files[out / "grid.png"] = _sheet([pils[r:r + nrow] for r in range(0, len(pils), nrow)])
    written = _write_all(files)
    print(f"wrote {len(written) - 1} images and {out / 'grid.png'}")
    return 0


def cmd_convert(args) -> int:
    import bigr_engine as be
    overrides = {"img_size": args.img_size} if args.img_size else {}
    dst = be.convert(args.src, args.dst, **overrides)
    print(f"wrote {dst} and {dst.with_suffix('.json')}")
    return 0


def cmd_info(args) -> int:
    from .info import main as info_main
    return info_main()


# ---- datasets and training -----------------------------------------------------------------------

def _images_and_labels(source: str, size: int, split: str):
    from . import fashion_mnist as fm
    if source == "fashion-mnist":
        if size != 32:
            raise BigrError(f"Fashion-MNIST is padded to 32x32 for the tokenizer, but this tokenizer takes {size}x{size}")
        images, labels = fm.load(split)
        return fm.as_rgb32(images), torch.as_tensor(labels)
    from .datasets import load_image_folder
    images, labels, _ = load_image_folder(source, size)
    return images, labels


def cmd_encode_dataset(args) -> int:
    import bigr_engine as be
    from .codes_dataset import encode_dataset
    bae = be.load_bae(args.bae, device=_device(args.device))
    images, labels = _images_and_labels(args.source, bae.cfg.img_size, args.split)
    encode_dataset(bae, images, labels, args.out, shard_size=args.shard_size, progress=not args.quiet)
    print(f"wrote {len(labels)} packed codes to {args.out}")
    return 0


def cmd_train_tokenizer(args) -> int:
    import bigr_engine as be
    from .train_tokenizer import TokenizerRecipe, train_tokenizer
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
    from .codes_dataset import CodesDataset
    from .train import TrainRecipe, init_distributed, train
    init_distributed()
    data = CodesDataset(args.data)
    classes = int(data.labels.max()) + 1 if args.num_classes is None else args.num_classes
    cfg = be.BiGRConfig(dim=args.dim, n_layer=args.layers, n_head=args.dim // 64 if args.heads is None else args.heads,
                        bits=data.bits, num_tokens=data.num_tokens, num_classes=classes,
                        transcoder_blocks=args.transcoder_blocks, transcoder_dim=args.transcoder_dim or args.dim)
    recipe = TrainRecipe(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                         warmup=args.warmup, ema=args.ema, seed=args.seed)
    device = _device(args.device)
    _, ema = train(data, data.labels, cfg, recipe, Path(args.out), device=device, progress=not args.quiet)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        dst = be.save_model(ema, Path(args.out) / "bigr.safetensors")
        print(f"wrote {dst} (EMA weights)")
    return 0


# ---- parser --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from . import cli_apps
    ap = argparse.ArgumentParser(prog="bigr", description="bigr-engine: BiGR image generation on binary latent codes")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="class-conditional generation to PNGs and a grid")
    p.add_argument("--ckpt", help="BiGR model (released .pt or .safetensors); default: the bundled model")
    p.add_argument("--bae", help="B-AE tokenizer (released .th or .safetensors); default: the bundled one")
    p.add_argument("--classes", help="class ids or names, comma-separated (default: a few spread over the range)")
    p.add_argument("--per-class", type=int, default=1, help="images per class")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (paper: 2.5)")
    p.add_argument("--iters", type=int, help="unmasking iterations (paper: 20)")
    p.add_argument("--steps", type=int, help="transcoder denoising steps (paper: 100)")
    p.add_argument("--gumbel", type=float, help="Gumbel temperature of the unmasking order")
    p.add_argument("--cfg-schedule", choices=["constant", "linear"])
    p.add_argument("--gumbel-schedule", choices=["constant", "down", "up"])
    p.add_argument("--temperature", type=float)
    p.add_argument("--greedy", action="store_true", help="every draw replaced by its mode (fully deterministic)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--nrow", type=int, help="images per row of the grid")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("convert", help="released checkpoint -> safetensors + JSON config")
    p.add_argument("src")
    p.add_argument("dst", help="output .safetensors path (a .json config is written beside it)")
    p.add_argument("--img-size", type=int, help="B-AE image size when it cannot be read off the weights")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="versions, build, kernels and ops")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("encode-dataset", help="images -> bit-packed code shards for training")
    p.add_argument("source", help="an image folder (ImageFolder layout) or 'fashion-mnist'")
    p.add_argument("--bae", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="train", choices=["train", "test"], help="Fashion-MNIST split")
    p.add_argument("--shard-size", type=int, default=10000)
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
    p.add_argument("--device")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    cli_apps.register(sub)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:  # argparse already printed "error: ..." with the usage
        return int(e.code or 0)
    try:
        return int(args.func(args) or 0)
    except BigrError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

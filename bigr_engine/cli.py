"""The `bigr` command: generate, convert, info, datasets and training; applications in cli_apps.

Every user error is one line on stderr ("error: ...", naming the problem and the fix) and exit status 2;
outputs are written only after all work succeeded, through temporary files renamed into place.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

from .errors import BigrError

ASSETS = Path(__file__).parent / "assets"


# ---- classes -------------------------------------------------------------------------------------

# Shown when --classes is left out of a 1000-class (ImageNet) model: well-known classes over the range.
IMAGENET_SHOWCASE = [1, 88, 207, 281, 388, 417, 812, 980]


def imagenet_names() -> list[str]:
    """The ImageNet-1k class names in index order, one line per class, synonyms comma-separated."""
    path = ASSETS / "imagenet_classes.txt"
    return path.read_text(encoding="utf-8").splitlines() if path.is_file() else []


def class_names(model) -> list[str]:
    """Names for the model's classes: its own list if it carries one, ImageNet's for 1000-class models."""
    names = getattr(model, "class_names", None)
    if names:
        return list(names)
    return imagenet_names() if model.cfg.num_classes == 1000 else []


def default_classes(model) -> list[int]:
    """A few classes spread over the model's range (well-known ones for ImageNet models)."""
    C = model.cfg.num_classes
    if C == 1000 and not getattr(model, "class_names", None):
        return list(IMAGENET_SHOWCASE)
    return sorted({round(i * (C - 1) / 3) for i in range(4)})


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def _class_lookup(names: list[str]):
    """-> three maps name -> set of ids, tried in order: a class's whole line, its first name, any synonym."""
    whole, first, any_syn = {}, {}, {}
    for i, line in enumerate(names):
        syns = [_norm(s) for s in line.split(",") if s.strip()]
        whole.setdefault(_norm(line), set()).add(i)
        if syns:
            first.setdefault(syns[0], set()).add(i)
        for s in syns:
            any_syn.setdefault(s, set()).add(i)
    return whole, first, any_syn


def _name_to_id(part: str, names: list[str], lookup) -> int:
    key = _norm(part)
    for table in lookup:
        ids = table.get(key)
        if ids and len(ids) == 1:
            return next(iter(ids))
        if ids:
            options = ", ".join(f"{i} ({names[i].split(',')[0].strip()})" for i in sorted(ids))
            raise BigrError(f"class name {part!r} is ambiguous: it names classes {options}; pass the id instead")
    short = [n.split(",")[0].strip() for n in names]
    near = [n for n in short if key in _norm(n)][:5]
    if not near:
        import difflib
        near = difflib.get_close_matches(key, [_norm(n) for n in short], n=5, cutoff=0.75)
    hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else f"; pass a class id 0..{len(names) - 1} instead"
    raise BigrError(f"unknown class name {part!r}{hint}")


def resolve_classes(text: str | None, model) -> list[int]:
    """'1,2,tabby' -> ids; None or '' -> `default_classes`. Names match any comma-separated synonym of a
    class, case-insensitively ('_' reads as a space); a name shared by several classes is an error that
    lists them. Entries are separated by commas (or semicolons)."""
    C = model.cfg.num_classes
    parts = [p.strip() for p in (text or "").replace(";", ",").split(",") if p.strip()]
    if not parts:
        return default_classes(model)
    names = class_names(model)
    lookup = _class_lookup(names) if names else None
    ids = []
    for part in parts:
        if part.lstrip("+-").isdigit():
            c = int(part)
            if not 0 <= c < C:
                raise BigrError(f"class id {c} is out of range: this model has classes 0..{C - 1}; pass ids in that range")
        elif names:
            c = _name_to_id(part, names, lookup)
        else:
            raise BigrError(f"unknown class name {part!r}: this model carries no class names; pass ids 0..{C - 1}")
        ids.append(c)
    return ids


# ---- generate ------------------------------------------------------------------------------------

NO_MODEL = ("no model given: pass --ckpt bigr_L_d24.pt (a released BiGR .pt or a .safetensors from `bigr convert`) "
            "and --bae binaryae_ema_1000000.th (the B-AE tokenizer it was trained with)")


def _device(name: str | None) -> torch.device:
    try:
        dev = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise BigrError(f"unknown device {name!r}; pass cpu or cuda") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BigrError(f"--device {name} was asked for but no CUDA GPU is visible; pass --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BigrError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible; pass cuda:0")
    elif dev.type != "cpu":
        raise BigrError(f"unsupported device {name!r}; pass cpu or cuda")
    return dev


DTYPE_CHOICES = ["auto", "float32", "bfloat16", "float16"]
DTYPE_HELP = ("the engine's matmul precision under autocast (weights and probabilities stay float32): auto = bfloat16 "
              "on CUDA, float32 on CPU")


def load_models(args, device):
    """(model, bae) from --ckpt/--bae, or from `bigr_engine.load_default()` when neither is given."""
    import bigr_engine as be
    from .errors import CheckpointError
    if args.ckpt is None and args.bae is None:
        loader = getattr(be, "load_default", None)
        if loader is None:
            raise BigrError(NO_MODEL)
        try:
            return loader(device=device)
        except CheckpointError:
            raise  # a default is installed but broken: say which file
        except BigrError:
            raise BigrError(NO_MODEL) from None
    if args.ckpt is None or args.bae is None:
        missing = "--ckpt (the BiGR model)" if args.ckpt is None else "--bae (the B-AE tokenizer the model was trained with)"
        raise BigrError(f"pass {missing} too: --ckpt and --bae go together (or give neither to use the bundled default)")
    model = be.load_bigr(args.ckpt, device=device)
    bae = be.load_bae(args.bae, device=device)
    return model, bae


def check_out_dir(out: Path, flag: str = "--out") -> None:
    """Fail early (before any work) when `out` cannot become a folder we can write into."""
    if out.exists() and not out.is_dir():
        raise BigrError(f"{flag} {out} is an existing file; pass a folder (it is created if missing)")
    p = out
    while not p.exists() and p != p.parent:
        p = p.parent
    if p.exists() and not p.is_dir():
        raise BigrError(f"{flag} {out}: {p} is a file, not a folder; pass a folder path")
    if p.exists() and not os.access(p, os.W_OK | os.X_OK):
        raise BigrError(f"{flag} {out}: {p} is not writable; pass a folder you can write to")


def cmd_generate(args) -> int:
    from tqdm.auto import tqdm

    import bigr_engine as be
    from .imageio import make_grid, png_bytes, to_uint8, write_files_atomic
    out = Path(args.out)
    check_out_dir(out)
    device = _device(args.device)
    model, bae = load_models(args, device)
    be.check_pair(model, bae)
    ids = resolve_classes(args.classes, model)
    sampling = sampling_from_args(args, model)
    labels = torch.tensor(ids, dtype=torch.long).repeat_interleave(args.per_class)
    n = len(labels)
    chunks = []
    with tqdm(total=n, desc="generate", unit="img", disable=args.quiet) as bar:
        for lo in range(0, n, args.batch_size):
            batch = labels[lo:lo + args.batch_size]
            # Sample i of the run is keyed by (seed, i): the batch size does not change any image.
            codes = model.generate(batch, seed=args.seed, sample_index=torch.arange(lo, lo + len(batch)), **sampling)
            # One image per decoder call: the decoder's float rounding depends on the batch it runs in, which
            # could move a pixel by one level in the PNG; decoded alone, image i depends only on its codes.
            with torch.inference_mode():
                chunks += [to_uint8(bae.decode(codes[j:j + 1])) for j in range(len(codes))]
            bar.update(len(batch))
    images = np.concatenate(chunks)
    nrow = args.nrow or (args.per_class if args.per_class > 1 else min(8, n))
    files = {out / f"{i:05d}_{int(c)}.png": png_bytes(img) for i, (img, c) in enumerate(zip(images, labels))}
    files[out / "grid.png"] = png_bytes(make_grid(images, nrow))
    write_files_atomic(files)  # only now, after everything succeeded, do files appear in --out
    print(f"wrote {n} images ({images.shape[2]}x{images.shape[1]}) to {out}/ and the grid {out / 'grid.png'}")
    return 0


def cmd_convert(args) -> int:
    import bigr_engine as be
    dst = Path(args.dst)
    if dst.is_dir():
        raise BigrError(f"DST {dst} is an existing folder; pass the path of the .safetensors file to write, "
                        f"e.g. {dst / (Path(args.src).stem + '.safetensors')}")
    if dst.suffix != ".safetensors":
        dst = dst.with_suffix(".safetensors")
    if dst.is_dir():
        raise BigrError(f"{dst} is an existing folder; pass the path of the .safetensors file to write")
    check_out_dir(dst.parent, "DST folder")
    overrides = {}
    if args.img_size:
        from .loading import detect_kind
        if detect_kind(args.src) != "bae":
            raise BigrError(f"--img-size applies to B-AE tokenizers only, but {args.src} is a BiGR model; leave it out")
        overrides["img_size"] = args.img_size
    written = be.convert(args.src, dst, **overrides)
    print(f"wrote {written} and {written.with_suffix('.json')}")
    return 0


def _versions() -> str:
    import platform

    from . import __version__
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible"
    return "\n".join([f"bigr-engine {__version__}", f"python      {platform.python_version()}",
                      f"torch       {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
                      f"numpy       {np.__version__}", f"gpu         {gpu}"])


def cmd_info(args) -> int:
    try:
        from .info import main as info_main
    except ImportError:  # the build report is not available: print what we can
        print(_versions())
        return 0
    return int(info_main() or 0)


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
                         warmup=args.warmup, ema=args.ema, seed=args.seed, ops=args.ops, sample_every=args.sample_every)
    device = _device(args.device)
    bae = be.load_bae(args.bae, device=device) if args.bae else None  # only to decode the sample grids
    _, ema = train(data, data.labels, cfg, recipe, Path(args.out), device=device, progress=not args.quiet, bae=bae)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        dst = be.save_model(ema, Path(args.out) / "bigr.safetensors")
        print(f"wrote {dst} (EMA weights)")
    return 0


# ---- parser --------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error format: one line "error: ..." on stderr and exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message}; see `{self.prog} -h`\n")


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def add_model_and_sampling_flags(p, classes_help: str) -> None:
    """The model, class and sampling flags `generate` and `sample-many` share (defaults None: the model's own)."""
    p.add_argument("--ckpt", metavar="MODEL", help="BiGR model (released .pt or .safetensors); default: the bundled model")
    p.add_argument("--bae", metavar="TOKENIZER", help="B-AE tokenizer (released .th or .safetensors); default: the bundled one")
    p.add_argument("--classes", help="class ids or names, comma-separated, " + classes_help)
    p.add_argument("--seed", type=int, default=0, help="random seed; image i depends only on (seed, i)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (default 2.5, or the bundled model's)")
    p.add_argument("--iters", type=int, help="unmasking iterations (default 20, or the bundled model's)")
    p.add_argument("--steps", type=int, help="transcoder denoising steps (default 100, or the bundled model's)")
    p.add_argument("--gumbel", type=float, help="Gumbel temperature of the unmasking order (default 0, or the bundled model's)")
    p.add_argument("--cfg-schedule", choices=["constant", "linear"], help="guidance over the iterations (default constant)")
    p.add_argument("--gumbel-schedule", choices=["constant", "down", "up"], help="Gumbel temperature over the iterations "
                   "(default constant)")
    p.add_argument("--temperature", type=float, help="transcoder logit temperature (default 1)")
    p.add_argument("--greedy", action="store_true", help="every draw replaced by its mode (fully deterministic)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)


def sampling_from_args(args, model) -> dict:
    """model.generate keywords from add_model_and_sampling_flags' flags over the model's own defaults (the bundled
    model carries tuned ones)."""
    sampling = dict(getattr(model, "default_sampling", {}) or {})
    for k in ("cfg", "iters", "steps", "gumbel", "cfg_schedule", "gumbel_schedule", "temperature"):
        if getattr(args, k) is not None:
            sampling[k] = getattr(args, k)
    if args.greedy:
        sampling["greedy"] = True
    sampling["dtype"] = args.dtype
    return sampling


def build_parser() -> argparse.ArgumentParser:
    from . import cli_apps
    ap = _Parser(prog="bigr", description="bigr-engine: BiGR image generation on binary latent codes")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="class-conditional generation to PNGs and a grid",
                       description="Generate --per-class images for each class and write DIR/{index:05d}_{class}.png plus "
                                   "DIR/grid.png, only once all of them succeeded. Image i depends only on the seed, i, "
                                   "its class and the sampling options (not on --batch-size). Without --ckpt/--bae the "
                                   "bundled default model is used, with its tuned sampling settings.")
    add_model_and_sampling_flags(p, "e.g. 207,tabby (ImageNet names for 1000-class models; default: a few classes "
                                    "spread over the range)")
    p.add_argument("--per-class", type=positive_int, default=1, help="images per class (default 1)")
    p.add_argument("--out", default="samples", metavar="DIR", help="output folder: DIR/{index:05d}_{class}.png and DIR/grid.png "
                   "(default samples)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per model call (does not change the images)")
    p.add_argument("--nrow", type=positive_int, help="images per row of the grid (default: --per-class if > 1, else up to 8)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("convert", help="released checkpoint -> safetensors + JSON config")
    p.add_argument("src", metavar="SRC", help="released BiGR .pt or B-AE .th (or one of our .safetensors); the kind is read off the keys")
    p.add_argument("dst", metavar="DST", help="output .safetensors path (a .json config is written beside it)")
    p.add_argument("--img-size", type=positive_int, help="B-AE image size when it cannot be read off the weights")
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

    cli_apps.register(sub)
    from . import sample_many
    sample_many.register(sub)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:  # -h (status 0) or a usage error, already printed as one "error: ..." line
        return e.code if isinstance(e.code, int) else 2
    try:
        return int(args.func(args) or 0)
    except BigrError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a file or folder the user named cannot be read or written
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error: cannot access{where}: {e.strerror or e}; check the path and its permissions", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())

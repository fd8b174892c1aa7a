"""`bigr generate`, `bigr convert` and `bigr info`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bigr_engine.cli.common import (add_model_and_sampling_flags, check_out_dir, load_models, pick_device,
                                    positive_int, report_earlier_files, sampling_from_args, with_run_manifest)
from bigr_engine.errors import BigrError
from bigr_engine.models.classes import class_names, resolve_classes


def cmd_generate(args) -> int:
    from tqdm.auto import tqdm

    import bigr_engine as be
    from bigr_engine.io.files import write_files_atomic
    from bigr_engine.io.images import decode_to_uint8, make_grid, png_bytes
    out = Path(args.out)
    check_out_dir(out)
    if args.prompt:
        return _generate_prompts(args, out)
    if args.onnx:
        model, generate, decode, sampling = _onnx_pipeline(args)
        if model.is_text:
            raise BigrError(f"{args.onnx} is a text-to-image model's export: pass --prompt \"...\" instead of --classes")
    else:
        device = pick_device(args.device)
        model, bae = load_models(args, device)
        be.check_pair(model, bae)
        if model.cfg.is_text:
            raise BigrError(f"{args.ckpt} is a text-to-image model: pass --prompt \"...\" instead of --classes")
        sampling = sampling_from_args(args, model)
        generate = model.generate
        decode = lambda codes: decode_to_uint8(bae, codes)  # noqa: E731
    ids = resolve_classes(args.classes, model)
    labels = torch.tensor(ids, dtype=torch.long).repeat_interleave(args.per_class)
    n = len(labels)
    chunks = []
    with tqdm(total=n, desc="generate", unit="img", disable=args.quiet) as bar:
        for lo in range(0, n, args.batch_size):
            batch = labels[lo:lo + args.batch_size]
            # Sample i of the run is keyed by (seed, i): the batch size does not change any image.
            codes = generate(batch, seed=args.seed, sample_index=torch.arange(lo, lo + len(batch)), **sampling)
            # decoded in fixed-shape batches, as sample-many does: the same (seed, i) gives the same pixels
            chunks.append(decode(codes))
            bar.update(len(batch))
    images = np.concatenate(chunks)
    nrow = args.nrow or (args.per_class if args.per_class > 1 else min(8, n))
    if args.by_class:   # ImageFolder layout (root/<class>/<image>), which `bigr embed` and `bigr probe` read
        names = class_names(model)
        folder = {int(c): _folder_name(names[int(c)] if int(c) < len(names) else str(int(c)), int(c))
                  for c in set(labels.tolist())}
        files = {out / folder[int(c)] / f"{i:05d}.png": png_bytes(img) for i, (img, c) in enumerate(zip(images, labels))}
    else:
        files = {out / f"{i:05d}_{int(c)}.png": png_bytes(img) for i, (img, c) in enumerate(zip(images, labels))}
    files[out / "grid.png"] = png_bytes(make_grid(images, nrow))
    files = with_run_manifest(out, files, args)
    write_files_atomic(files)  # only now, after everything succeeded, do files appear in --out
    print(f"wrote {n} image{'s' if n != 1 else ''} ({images.shape[2]}x{images.shape[1]}) to {out}/ and the grid {out / 'grid.png'}")
    report_earlier_files(out, files)
    return 0


def _generate_prompts(args, out: Path) -> int:
    """--prompt TEXT (repeatable): --per-class images of each prompt from a text model (the bundled one by default)
    -> DIR/{index:05d}_p{prompt}.png, DIR/grid.png (a row per prompt) and DIR/prompts.txt. With --onnx, a text
    model's export on ONNX Runtime."""
    import bigr_engine as be
    from bigr_engine.io.images import decode_to_uint8
    for flag, given in (("--classes", args.classes), ("--by-class", args.by_class)):
        if given:
            raise BigrError(f"--prompt and {flag} do not go together: a text model takes prompts, not classes")
    prompts = [p.strip() for p in args.prompt]
    if args.onnx:   # a text model's export on ONNX Runtime: the same codes as the engine's for the same prompts
        pipe, _, decode, sampling = _onnx_pipeline(args)
        if not pipe.is_text:
            raise BigrError(f"{args.onnx} is a class-conditional export: --prompt needs a text model's export "
                            f"(`bigr export onnx --text`), or pass --classes")

        def generate(batch, seed, sample_index, **options):
            return pipe.generate(batch, seed=seed, sample_index=sample_index.numpy(), **options)
        return _write_prompt_images(args, out, prompts, generate, decode, sampling)
    device = pick_device(args.device)
    if args.ckpt is None and args.bae is None:
        from bigr_engine.io.default import load_default_text
        model, bae = load_default_text(device=device)
    else:
        model, bae = load_models(args, device)
        if not model.cfg.is_text:
            raise BigrError(f"{args.ckpt} is a class-conditional model: --prompt needs a text-to-image model "
                            f"(or leave out --ckpt/--bae for the bundled one)")
        from bigr_engine.models.text import load_text_encoder
        model.text_encoder = load_text_encoder(args.text_encoder, model.cfg.text_tokens, device=device)
    be.check_pair(model, bae)
    return _write_prompt_images(args, out, prompts, model.generate, lambda codes: decode_to_uint8(bae, codes),
                                sampling_from_args(args, model))


def _write_prompt_images(args, out: Path, prompts, generate, decode, sampling) -> int:
    from tqdm.auto import tqdm

    from bigr_engine.io.files import write_files_atomic
    from bigr_engine.io.images import make_grid, png_bytes
    labels = [p for p in prompts for _ in range(args.per_class)]
    which = [j for j in range(len(prompts)) for _ in range(args.per_class)]
    chunks = []
    with tqdm(total=len(labels), desc="generate", unit="img", disable=args.quiet) as bar:
        for lo in range(0, len(labels), args.batch_size):
            batch = labels[lo:lo + args.batch_size]
            codes = generate(batch, seed=args.seed, sample_index=torch.arange(lo, lo + len(batch)), **sampling)
            chunks.append(decode(codes))
            bar.update(len(batch))
    images = np.concatenate(chunks)
    files = {out / f"{i:05d}_p{j}.png": png_bytes(img) for i, (img, j) in enumerate(zip(images, which))}
    files[out / "grid.png"] = png_bytes(make_grid(images, args.nrow or args.per_class))
    files[out / "prompts.txt"] = "".join(f"p{j}\t{p}\n" for j, p in enumerate(prompts)).encode()
    files = with_run_manifest(out, files, args)
    write_files_atomic(files)
    print(f"wrote {len(labels)} image{'s' if len(labels) != 1 else ''} of {len(prompts)} prompt"
          f"{'s' if len(prompts) != 1 else ''} to {out}/ and the grid {out / 'grid.png'}")
    report_earlier_files(out, files)
    return 0


def _folder_name(name: str, class_id: int) -> str:
    """A class's folder under --by-class: its id and first name, with path-unsafe characters replaced."""
    import re
    first = name.split(",")[0].strip()
    return f"{class_id:04d}_{re.sub(r'[^A-Za-z0-9._-]+', '-', first).strip('-') or class_id}"


def _onnx_pipeline(args):
    """--onnx DIR: the exported pipeline on ONNX Runtime, with the flags checked against what it supports."""
    from bigr_engine.export.pipeline import OnnxPipeline
    from bigr_engine.io.images import to_uint8
    clash = [flag for flag, given in (("--ckpt", args.ckpt), ("--bae", args.bae), ("--device", args.device),
                                      ("--dtype", args.dtype != "auto"), ("--reuse", args.reuse not in ("exact", "off")))
             if given]
    if clash:
        raise BigrError(f"{', '.join(clash)} cannot be combined with --onnx: the export fixes the model, tokenizer and "
                        f"precision, and runs the exact loop; leave {'it' if len(clash) == 1 else 'them'} out")
    pipe = OnnxPipeline(args.onnx)
    if not pipe.has_tokenizer:
        raise BigrError(f"{args.onnx} was exported without a tokenizer, so it cannot write images; export with --bae "
                        f"(or the bundled default)")
    sampling = sampling_from_args(args, pipe)                  # checked before any work starts
    sampling = {k: v for k, v in sampling.items() if k not in ("dtype", "reuse")}   # fixed by the export

    def generate(batch, seed, sample_index, **options):
        return pipe.generate(batch.numpy(), seed=seed, sample_index=sample_index.numpy(), **options)
    return pipe, generate, lambda codes: to_uint8(pipe.decode(codes)), sampling


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
        from bigr_engine.io.checkpoints import detect_kind
        if detect_kind(args.src) != "bae":
            raise BigrError(f"--img-size applies to B-AE tokenizers only, but {args.src} is a BiGR model; leave it out")
        overrides["img_size"] = args.img_size
    written = be.convert(args.src, dst, **overrides)
    print(f"wrote {written} and {written.with_suffix('.json')}")
    return 0


def _versions() -> str:
    import platform

    from bigr_engine import __version__
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible"
    return "\n".join([f"bigr-engine {__version__}", f"python      {platform.python_version()}",
                      f"torch       {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
                      f"numpy       {np.__version__}", f"gpu         {gpu}"])


def cmd_info(args) -> int:
    try:
        from bigr_engine.info import main as info_main
    except ImportError:  # the build report is not available: print what we can
        print(_versions())
        return 0
    return int(info_main(['--selftest'] if args.selftest else []) or 0)


def register(sub) -> None:
    p = sub.add_parser("generate", help="class-conditional generation to PNGs and a grid",
                       description="Generate --per-class images for each class and write DIR/{index:05d}_{class}.png plus "
                                   "DIR/grid.png, only once all of them succeeded. Image i depends only on the seed, i, "
                                   "its class and the sampling options (not on --batch-size, in float32). Without --ckpt/--bae the "
                                   "bundled default model is used, with its tuned sampling settings.")
    add_model_and_sampling_flags(p, "e.g. 207,tabby (ImageNet names for 1000-class models; default: a few classes "
                                    "spread over the range)")
    p.add_argument("--per-class", type=positive_int, default=1, help="images per class, or per prompt (default 1)")
    p.add_argument("--prompt", action="append", metavar="TEXT", help="text-to-image: images of this prompt (repeat "
                   "for several) from a text model; without --ckpt/--bae the bundled one (needs the `text` extra); "
                   "writes DIR/{index:05d}_p{prompt}.png, DIR/grid.png and DIR/prompts.txt")
    p.add_argument("--text-encoder", default="minilm", metavar="minilm|DIR", help="the text encoder of a --ckpt text "
                   "model: minilm (default) or a local Hugging Face encoder folder (e.g. a T5)")
    p.add_argument("--out", default="samples", metavar="DIR", help="output folder: DIR/{index:05d}_{class}.png and DIR/grid.png "
                   "(default samples)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per model call; in float32 it does not change the images (bfloat16 matmuls on a GPU may round differently per batch size: pass --dtype float32 where that matters)")
    p.add_argument("--nrow", type=positive_int, help="images per row of the grid (default: --per-class if > 1, else up to 8)")
    p.add_argument("--by-class", action="store_true", help="write DIR/<class>/{index:05d}.png (the image-folder "
                   "layout `bigr embed` and `bigr probe` read) instead of DIR/{index:05d}_{class}.png")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--onnx", metavar="DIR", help="run an export of `bigr export onnx` on ONNX Runtime instead of "
                   "the PyTorch engine (the same codes in float32; pixels within one level); a text model's export takes "
                   "--prompt")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("convert", help="released checkpoint -> safetensors + JSON config")
    p.add_argument("src", metavar="SRC", help="released BiGR .pt or B-AE .th (or one of our .safetensors); the kind is read off the keys")
    p.add_argument("dst", metavar="DST", help="output .safetensors path (a .json config is written beside it)")
    p.add_argument("--img-size", type=positive_int, help="B-AE image size when it cannot be read off the weights")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="versions, build, kernels and ops")
    p.add_argument("--selftest", action="store_true", help="run every compiled op against its twin on each device")
    p.set_defaults(func=cmd_info)

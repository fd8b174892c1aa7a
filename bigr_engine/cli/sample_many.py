"""`bigr sample-many`: the command half of apps.sample_many (flags, devices under torchrun, messages)."""
from __future__ import annotations

import sys
from pathlib import Path

from bigr_engine.apps.sample_many import sample_many
from bigr_engine.cli.common import (add_model_and_sampling_flags, check_out_dir, load_models, pick_device, positive_int,
                                    sampling_from_args)
from bigr_engine.io.distributed import process_rank
from bigr_engine.models.classes import resolve_classes


def cmd_sample_many(args) -> int:
    import bigr_engine as be
    out = Path(args.out)
    check_out_dir(out)
    rank, world, local = process_rank()
    device = pick_device(args.device)
    if device.type == "cuda" and device.index is None and world > 1:
        device = pick_device(f"cuda:{local}")  # one GPU per process under torchrun
    model, bae = load_models(args, device)
    be.check_pair(model, bae)
    classes = resolve_classes(args.classes, model) if args.classes else list(range(model.cfg.num_classes))
    per_class = args.per_class
    num_images = args.num_images or per_class * len(classes)
    sampling = sampling_from_args(args, model)
    try:
        dst = sample_many(model, bae, out, num_images=num_images, per_class=per_class, classes=classes, seed=args.seed,
                          sampling=sampling, batch_size=args.batch_size, shard_size=args.shard_size, png=not args.no_png,
                          backend=args.backend, rank=rank, world=world, progress=not args.quiet)
    except KeyboardInterrupt:  # unlike `generate`, finished shards stay: say so rather than "nothing was written"
        print(f"error: interrupted; finished shards are kept in {out / 'shards'}; rerun the same command to resume",
              file=sys.stderr)
        return 130
    who = "" if world == 1 else f"rank {rank}/{world}: "
    if dst is None:
        print(f"{who}wrote its shards to {out}/shards; the last process to finish (or a rerun) writes the final npz")
    elif not args.quiet or rank == 0:
        print(f"{who}{num_images} images in {dst}" + ("" if args.no_png else f" and {out / 'png'}/"))
    return 0


def register(subparsers) -> None:
    """Add `sample-many` to the `bigr` command's subparsers."""
    p = subparsers.add_parser(
        "sample-many", help="many samples (e.g. 50k for FID) in resumable shards; torchrun for several processes",
        description="Generate --num-images images: --per-class images of each class in order, repeated (num-images must "
                    "be a multiple of per-class x classes). Image i is keyed by (seed, i), so in float32 it does not depend on "
                    "--batch-size, the number of processes or resuming. Shards are written atomically; a rerun skips "
                    "finished ones; DIR/manifest.json refuses a rerun with other settings. At the end: "
                    "DIR/samples_<N>x<H>x<W>x3.npz (arr_0 uint8 images, arr_1 labels) and DIR/png/<index:06d>_<class>.png. "
                    "Data-parallel: torchrun --nproc_per_node=G -m bigr_engine sample-many ...")
    p.add_argument("--num-images", type=positive_int, help="images in all (default: --per-class x the number of classes)")
    p.add_argument("--per-class", type=positive_int, default=50, help="consecutive images per class (default 50)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing; resumable)")
    add_model_and_sampling_flags(p, "(default: every class of the model)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per model call; in float32 it does not change the images (bfloat16 matmuls on a GPU may round differently per batch size: pass --dtype float32 where that matters)")
    p.add_argument("--shard-size", type=positive_int, default=1000, help="images per resumable shard (default 1000)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available; cuda:LOCAL_RANK under torchrun)")
    p.add_argument("--backend", default="engine", choices=["engine", "reference"], help="sampling loop (same images; "
                   "default engine, the fast one)")
    p.add_argument("--no-png", action="store_true", help="write only the npz files, no PNGs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sample_many)

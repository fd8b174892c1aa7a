"""`bigr` subcommands for the zero-shot applications and representations.

The main CLI calls ``register(subparsers)``; each subcommand's ``func(args)`` returns an exit code and
raises BigrError on bad input. Image outputs are written to temporary files and renamed into place only
after everything succeeded, so a failed run leaves no partial output.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from bigr_engine.cli.common import (add_model_flags as _add_models, load_models, pick_device, report_earlier_files,
                                    with_run_manifest)
from bigr_engine.errors import BigrError
from bigr_engine.io.files import write_files_atomic

DEFAULT_OUT = "bigr_out"


# ---- argument groups ---------------------------------------------------------------------------

def _add_sampling(p: argparse.ArgumentParser, variations: bool = True):
    g = p.add_argument_group("sampling (defaults: the model's own settings, as for `bigr generate`)")
    g.add_argument("--seed", type=int, default=0, help="random seed (results are keyed by seed and sample index)")
    if variations:
        g.add_argument("--variations", type=int, default=1, help="results per input (default 1)")
    g.add_argument("--iters", type=int, help="unmasking iterations")
    g.add_argument("--steps", type=int, help="transcoder denoising steps")
    g.add_argument("--cfg", type=float, help="classifier-free guidance scale (no effect with the null class)")
    g.add_argument("--gumbel", type=float, help="Gumbel temperature of the unmasking order")
    g.add_argument("--temperature", type=float, help="transcoder logit temperature")
    g.add_argument("--cfg-schedule", choices=["constant", "linear"])
    g.add_argument("--gumbel-schedule", choices=["constant", "down", "up"])


def _add_images(p: argparse.ArgumentParser, mask_help: str):
    p.add_argument("images", nargs="+", metavar="IMAGE", help="input images of any size (centre-cropped and resized to the tokenizer's size)")
    m = p.add_mutually_exclusive_group(required=True)
    m.add_argument("--mask", action="append", metavar="PNG", help=mask_help + " One mask for all images, or "
                   "--mask repeated once per image (in order); each of its image's size.")
    m.add_argument("--box", metavar="X0,Y0,X1,Y1", help="a rectangle instead of mask files, in the tokenizer-size frame "
                                                          "after crop and resize (x0 <= x < x1, y0 <= y < y1)")
    p.add_argument("--blend", action="store_true", help="Poisson-blend each result into the input (needs opencv-python-headless)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default {DEFAULT_OUT})")


def _sampling(args) -> dict:
    """The sampling flags given (None = the model's default)."""
    return dict(seed=args.seed, iters=args.iters, steps=args.steps, cfg=args.cfg, gumbel=args.gumbel,
                temperature=args.temperature, cfg_schedule=args.cfg_schedule, gumbel_schedule=args.gumbel_schedule)


def _load_checked(args):
    """The models, with every sampling flag and --variations checked against them before any work starts."""
    if getattr(args, "variations", 1) < 1:
        raise BigrError(f"--variations must be at least 1, got {args.variations}")
    model, bae = _load(args)
    model.sampling_options(**_sampling(args))
    return model, bae


def register(subparsers) -> None:
    """Add inpaint, outpaint, edit, interpolate, enrich, embed, probe and tsne to an argparse subparsers object."""
    p = subparsers.add_parser("inpaint", help="regenerate the masked part of images (null class)",
                              description="Regenerate the white part of each mask; the rest of the image is kept as encoded.")
    _add_models(p)
    _add_images(p, "Mask PNGs, white = regenerate.")
    _add_sampling(p)
    p.set_defaults(func=cmd_inpaint, app="inpaint")

    p = subparsers.add_parser("outpaint", help="keep the masked part of images and regenerate the rest",
                              description="Keep the white part of each mask (or the box) and regenerate everything else.")
    _add_models(p)
    _add_images(p, "Mask PNGs, white = keep.")
    _add_sampling(p)
    p.set_defaults(func=cmd_inpaint, app="outpaint")

    p = subparsers.add_parser("edit", help="regenerate the masked part of images as a given class",
                              description="Class-conditional inpainting: the white part of each mask is regenerated as --class.")
    _add_models(p)
    _add_images(p, "Mask PNGs, white = regenerate.")
    p.add_argument("--class", dest="label", required=True, metavar="CLASS", help="class id or name to paint in")
    _add_sampling(p)
    p.set_defaults(func=cmd_inpaint, app="edit")

    p = subparsers.add_parser("interpolate", help="generate along a class interpolation",
                              description="Generate with the condition w*table[a] + (1-w)*table[b] for each weight w; "
                                          "every weight of a variation shares its random draws.")
    _add_models(p)
    p.add_argument("--class-a", required=True, metavar="CLASS", help="class id or name at weight 1")
    p.add_argument("--class-b", required=True, metavar="CLASS", help="class id or name at weight 0 (the null "
                                                                      "class id too)")
    p.add_argument("--weights", default="1,0.75,0.5,0.25,0", help="comma-separated weights of class a (default 1,0.75,0.5,0.25,0)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default {DEFAULT_OUT})")
    _add_sampling(p)
    p.set_defaults(func=cmd_interpolate)

    p = subparsers.add_parser("enrich", help="add detail to low-resolution images",
                              description="Upsample each (centre-cropped) image bilinearly to the tokenizer's size, encode it, "
                                          "and in --rounds rounds regenerate a share of every ds x ds token block.")
    _add_models(p)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="low-resolution images (centre-cropped to a square)")
    p.add_argument("--ds", type=int, default=2, help="token block side (default 2)")
    p.add_argument("--rounds", type=int, default=4, help="rounds; each regenerates 1/rounds of every block (default 4)")
    p.add_argument("--low-res", type=int, default=None, metavar="PX", help="first shrink each crop to PX x PX (to try enrichment on a sharp image)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default {DEFAULT_OUT})")
    _add_sampling(p)
    p.set_defaults(func=cmd_enrich)

    p = subparsers.add_parser("embed", help="write BiGR image features (.npy)",
                              description="Encode images (deterministic bits) and write the pooled residual stream after --layer "
                                          "with the null class: an (n, D) float32 .npy. An image-folder source "
                                          "(root/<class>/<image>) also writes its labels and class names.")
    _add_models(p)
    p.add_argument("source", nargs="+", metavar="SOURCE", help="one image folder (ImageFolder layout) or image files")
    p.add_argument("--layer", type=int, help="last transformer block to run, 0-based (default: the paper's 10th / 15th "
                                             "/ 32nd layer of L / XL / XXL, counting from 1; the middle block of "
                                             "other models)")
    p.add_argument("--out", required=True, metavar="FEATS.npy", help="features file to write")
    p.add_argument("--labels-out", default=None, metavar="LABELS.npy", help="labels file for a folder source (default: FEATS_labels.npy)")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=cmd_embed)

    p = subparsers.add_parser("probe", help="linear probe: top-1/top-5 accuracy of features",
                              description="Train BatchNorm + Linear with LARS (warm-up then cosine) on training features and "
                                          "report test accuracy. TRAIN/TEST are .npy feature files (with --train-labels / "
                                          "--test-labels) or image folders (embedded with --ckpt/--bae, default the "
                                          "bundled model, after --layer).")
    _add_models(p)
    p.add_argument("--train", required=True, metavar="FEATS.npy|DIR")
    p.add_argument("--test", required=True, metavar="FEATS.npy|DIR")
    p.add_argument("--train-labels", metavar="LABELS.npy")
    p.add_argument("--test-labels", metavar="LABELS.npy")
    p.add_argument("--layer", type=int, default=None, help="block whose features to use (image folders only; default "
                                                           "as for `bigr embed`)")
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--base-lr", type=float, default=0.1, help="learning rate per 256 samples of batch (default 0.1)")
    p.add_argument("--warmup-epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_probe)

    p = subparsers.add_parser("tsne", help="t-SNE scatter plot of features (.png)",
                              description="Exact t-SNE of an (n, D) .npy feature file, drawn coloured by label.")
    p.add_argument("feats", metavar="FEATS.npy")
    p.add_argument("labels", metavar="LABELS.npy")
    p.add_argument("--classes", metavar="CLASSES.txt", help="class names, one per line (as `bigr embed` writes)")
    p.add_argument("--out", required=True, metavar="PLOT.png")
    p.add_argument("--perplexity", type=float, default=30.0)
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--max-points", type=int, default=3000, help="plot a seeded random subset of at most this many points")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tsne)


# ---- helpers -----------------------------------------------------------------------------------

def _load(args):
    import bigr_engine as be
    model, bae = load_models(args, pick_device(args.device))
    be.check_pair(model, bae)
    return model, bae


def _class_id(text, model, name: str = "class", allow_null: bool = False) -> int:
    from bigr_engine.models.classes import class_ids
    C = model.cfg.num_classes
    try:
        c = int(str(text).strip())
    except ValueError:
        c = class_ids([str(text)], model)[0]   # a class name, or a clear error naming the valid ones
    top = C if allow_null else C - 1
    if c is None or not 0 <= c <= top:
        extra = f" (or {C} for the null class)" if allow_null else ""
        raise BigrError(f"unknown {name} {text!r}: this model has class ids 0..{C - 1}{extra}")
    return c


def _parse_box(text: str, size: int) -> torch.Tensor:
    from bigr_engine.io.images import box_mask
    try:
        x0, y0, x1, y1 = (int(v) for v in text.split(","))
    except ValueError:
        raise BigrError(f"--box must be four integers x0,y0,x1,y1, got {text!r}") from None
    return box_mask((x0, y0, x1, y1), size, f"--box {text}")


def _read_inputs(paths, size: int):
    """-> (images (B,3,S,S), original PIL sizes)."""
    from bigr_engine.io.images import center_crop_resize, open_image, to_tensor
    ims, sizes = [], []
    for p in paths:
        im = open_image(p)
        sizes.append(im.size)
        ims.append(to_tensor(center_crop_resize(im, size)))
    return torch.stack(ims), sizes


def _read_masks(paths, image_paths, image_sizes, size: int) -> torch.Tensor:
    """Mask PNGs (white = selected) -> (B,S,S) bool, cropped and resized like their images."""
    from bigr_engine.io.images import mask_from_image, open_image
    if len(paths) not in (1, len(image_paths)):
        raise BigrError(f"got {len(paths)} masks for {len(image_paths)} images; pass one mask per image or one for all")
    masks = []
    for i, ip in enumerate(image_paths):
        mp = paths[i if len(paths) > 1 else 0]
        im = open_image(mp)
        if im.size != image_sizes[i]:
            raise BigrError(f"mask {mp} is {im.size[0]}x{im.size[1]} but image {ip} is {image_sizes[i][0]}x{image_sizes[i][1]}; "
                            f"masks must have their image's size")
        masks.append(mask_from_image(im, size))
    return torch.stack(masks)


def _to_pil(img: torch.Tensor):
    from PIL import Image
    arr = (img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(arr)


def _mask_pil(mask: torch.Tensor):
    m = mask.float()[None].expand(3, -1, -1)
    return _to_pil(m)


def _sheet(rows: list[list]):
    """PIL images in rows -> one sheet (2 px grey gaps, so that white masks stay visible)."""
    from PIL import Image
    gap = 2
    w = max(im.size[0] for row in rows for im in row)
    h = max(im.size[1] for row in rows for im in row)
    cols = max(len(row) for row in rows)
    sheet = Image.new("RGB", (cols * w + (cols + 1) * gap, len(rows) * h + (len(rows) + 1) * gap), (128, 128, 128))
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            sheet.paste(im, (gap + c * (w + gap), gap + r * (h + gap)))
    return sheet


def _write_all(files: dict) -> list[Path]:
    """{path: PIL image | numpy array | str} -> io.files.write_files_atomic (all renamed into place, or none)."""
    def as_data(obj):
        if isinstance(obj, np.ndarray):
            return lambda f: np.save(f, obj)
        if isinstance(obj, str):
            return obj
        return lambda f: obj.save(f, format="PNG")
    return write_files_atomic({path: as_data(obj) for path, obj in files.items()})


def _stems(paths) -> list[str]:
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) != len(stems):
        stems = [f"{i:03d}_{s}" for i, s in enumerate(stems)]
    return stems


def _check_blend_available():
    try:
        import cv2  # noqa: F401
    except ImportError:
        raise BigrError("--blend needs OpenCV: install it with `pip install opencv-python-headless`, or leave out --blend") from None


def poisson_blend(result: torch.Tensor, original: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Seamless (Poisson) cloning of `result` into `original` over `region` (S,S) bool, with OpenCV.
    Images (3,S,S) in [0,1]; pixels outside the region stay the original's. The images are padded by
    reflection so that regions touching the border work."""
    import cv2
    region = region.bool().cpu().numpy()
    if not region.any():
        return original.clone()
    if region.all():
        return result.clone()
    pad = 8

    def u8(x):
        arr = (x.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
        return cv2.copyMakeBorder(np.ascontiguousarray(arr), pad, pad, pad, pad, cv2.BORDER_REFLECT)

    src, dst = u8(result), u8(original)
    mask = np.zeros(src.shape[:2], np.uint8)
    mask[pad:-pad, pad:-pad][region] = 255
    ys, xs = np.nonzero(mask)
    x, y = int(xs.min()), int(ys.min())
    w, h = int(xs.max()) - x + 1, int(ys.max()) - y + 1
    out = cv2.seamlessClone(src, dst, mask, (x + w // 2, y + h // 2), cv2.NORMAL_CLONE)[pad:-pad, pad:-pad]
    out = torch.from_numpy(out.astype(np.float32) / 255.0).permute(2, 0, 1)
    # OpenCV solves over the region's bounding box, so pixels in holes of the region can drift: keep them.
    return torch.where(torch.from_numpy(region)[None], out, original.detach().float().cpu())


def _report(paths: list[Path]):
    for p in paths:
        print(f"wrote {p}")


# ---- commands ----------------------------------------------------------------------------------

def cmd_inpaint(args) -> int:
    """inpaint / outpaint / edit."""
    from bigr_engine.apps import zero_shot as apps
    if args.blend:
        _check_blend_available()
    model, bae = _load_checked(args)
    S = bae.cfg.img_size
    label = _class_id(args.label, model) if args.app == "edit" else None
    images, sizes = _read_inputs(args.images, S)
    B, v = images.shape[0], args.variations
    if args.box is not None:
        masks = _parse_box(args.box, S)[None].expand(B, -1, -1)
    else:
        masks = _read_masks(args.mask, args.images, sizes, S)
    invert = args.app == "outpaint"
    codes, _ = apps.inpaint_codes(model, bae, images, masks, label, variations=v, invert=invert, **_sampling(args))
    results = apps.decode_codes(bae, codes).cpu()
    region = ~masks if invert else masks           # pixels that were asked to be regenerated
    files, rows = {}, []
    out = Path(args.out)
    for i, stem in enumerate(_stems(args.images)):
        row = [_to_pil(images[i]), _mask_pil(region[i])]
        for j in range(v):
            img = results[i * v + j]
            files[out / f"{stem}_{args.app}_{j}.png"] = _to_pil(img)
            if args.blend:
                img = poisson_blend(img, images[i], region[i])
                files[out / f"{stem}_{args.app}_{j}_blend.png"] = _to_pil(img)
            row.append(_to_pil(img))
        rows.append(row)
    files[out / f"{args.app}_sheet.png"] = _sheet(rows)
    files = with_run_manifest(out, files, args)
    _report(_write_all(files))
    report_earlier_files(out, files)
    return 0


def cmd_interpolate(args) -> int:
    from bigr_engine.apps import zero_shot as apps
    try:
        weights = [float(w) for w in args.weights.split(",")]
    except ValueError:
        raise BigrError(f"--weights must be comma-separated numbers, got {args.weights!r}") from None
    model, bae = _load_checked(args)
    a = _class_id(args.class_a, model, "class", allow_null=True)
    b = _class_id(args.class_b, model, "class", allow_null=True)
    imgs = apps.interpolate(model, bae, a, b, weights, variations=args.variations, **_sampling(args)).cpu()
    out, W = Path(args.out), len(weights)
    files, rows = {}, []
    for j in range(args.variations):
        row = []
        for k, w in enumerate(weights):
            pil = _to_pil(imgs[j * W + k])
            files[out / f"interpolate_{a}-{b}_{j}_w{k}.png"] = pil
            row.append(pil)
        rows.append(row)
    files[out / "interpolate_sheet.png"] = _sheet(rows)
    files = with_run_manifest(out, files, args)
    _report(_write_all(files))
    report_earlier_files(out, files)
    print("weights of class a per column: " + ", ".join(f"w{k}={w:g}" for k, w in enumerate(weights)))
    return 0


def cmd_enrich(args) -> int:
    from bigr_engine.apps import zero_shot as apps
    from bigr_engine.io.images import center_crop_resize, open_image, to_tensor
    if args.low_res is not None and args.low_res < 1:
        raise BigrError(f"--low-res must be a positive pixel size, got {args.low_res}")
    if args.ds < 1 or args.rounds < 1:
        raise BigrError(f"--ds and --rounds must be positive, got --ds {args.ds} --rounds {args.rounds}")
    model, bae = _load_checked(args)
    S = bae.cfg.img_size
    crops = []
    for p in args.images:
        im = open_image(p)
        crops.append(center_crop_resize(im, args.low_res if args.low_res else min(im.size)))
    sizes = {c.size for c in crops}
    if len(sizes) > 1:  # one batch needs one size: bring every crop to the tokenizer's size first
        from PIL import Image
        crops = [c.resize((S, S), Image.Resampling.BILINEAR) for c in crops]
    low = torch.stack([to_tensor(c) for c in crops])
    v = args.variations
    results = apps.enrich(model, bae, low, ds=args.ds, rounds=args.rounds, variations=v, **_sampling(args)).cpu()
    upsampled = apps.upsample_to_tokenizer(bae, low)
    out = Path(args.out)
    files, rows = {}, []
    for i, stem in enumerate(_stems(args.images)):
        row = [_to_pil(upsampled[i])]
        for j in range(v):
            pil = _to_pil(results[i * v + j])
            files[out / f"{stem}_enrich_{j}.png"] = pil
            row.append(pil)
        rows.append(row)
    files[out / "enrich_sheet.png"] = _sheet(rows)
    files = with_run_manifest(out, files, args)
    _report(_write_all(files))
    report_earlier_files(out, files)
    return 0


def _embed_source(model, bae, sources, layer, batch_size):
    """-> (features (n,D) numpy, labels or None, class names or None)."""
    from bigr_engine.apps import representations as reps
    from bigr_engine.io.images import image_folder, list_image_folder, read_image
    S = bae.cfg.img_size
    if len(sources) == 1 and Path(sources[0]).is_dir():
        _, _, classes = list_image_folder(sources[0])
        feats, labels = reps.embed(model, bae, image_folder(sources[0], S, batch_size), layer, return_labels=True)
        return feats.numpy(), labels.numpy(), classes
    for s in sources:
        if Path(s).is_dir():
            raise BigrError(f"{s} is a folder: pass one image folder, or image files")
    images = torch.stack([read_image(p, S) for p in sources])
    return reps.embed(model, bae, images, layer, batch_size=batch_size).numpy(), None, None


def cmd_embed(args) -> int:
    if args.batch_size < 1:
        raise BigrError(f"--batch-size must be positive, got {args.batch_size}")
    out = Path(args.out)
    if out.suffix != ".npy":
        out = out.with_name(out.name + ".npy")
    model, bae = _load(args)
    feats, labels, classes = _embed_source(model, bae, args.source, args.layer, args.batch_size)
    files = {out: feats.astype(np.float32)}
    if labels is not None:
        lab = Path(args.labels_out) if args.labels_out else out.with_name(out.stem + "_labels.npy")
        files[lab] = labels.astype(np.int64)
        files[lab.with_name(lab.stem + "_classes.txt")] = "".join(c + "\n" for c in classes)
    _report(_write_all(files))
    print(f"{feats.shape[0]} images, {feats.shape[1]} features each (layer "
          f"{model.default_layer() if args.layer is None else args.layer})")
    return 0


def _load_npy(path, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise BigrError(f"{what} file not found: {path}") from None
    except (ValueError, OSError) as e:
        raise BigrError(f"cannot read {what} {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                        f"pass a .npy file (as `bigr embed` writes)") from None


def cmd_probe(args) -> int:
    from bigr_engine.apps import representations as reps
    model = bae = None
    data = {}
    for split, src, lab in (("train", args.train, args.train_labels), ("test", args.test, args.test_labels)):
        if Path(src).is_dir():
            if model is None:
                model, bae = _load(args)
            feats, labels, _ = _embed_source(model, bae, [src], args.layer, 64)
        else:
            if lab is None:
                raise BigrError(f"pass --{split}-labels LABELS.npy with the {split} features {src}")
            feats, labels = _load_npy(src, f"{split} features"), _load_npy(lab, f"{split} labels")
        data[split] = (feats, labels)
    res = reps.linear_probe(*data["train"], *data["test"], epochs=args.epochs, batch_size=args.batch_size,
                            base_lr=args.base_lr, warmup_epochs=args.warmup_epochs, seed=args.seed)
    n_tr, n_te = len(data["train"][1]), len(data["test"][1])
    print(f"linear probe ({n_tr} train, {n_te} test, {res.classes} classes): "
          f"top-1 {100 * res.top1:.2f}%  top-5 {100 * res.top5:.2f}%")
    return 0


def cmd_tsne(args) -> int:
    from bigr_engine.apps import representations as reps
    feats, labels = _load_npy(args.feats, "features"), _load_npy(args.labels, "labels")
    if feats.ndim != 2 or labels.ndim != 1 or len(feats) != len(labels):
        raise BigrError(f"features {args.feats} {feats.shape} and labels {args.labels} {labels.shape} do not match: "
                        f"pass (n, D) features and (n,) labels")
    if args.max_points < 4:
        raise BigrError(f"--max-points must be at least 4, got {args.max_points}")
    if len(feats) > args.max_points:
        keep = np.sort(np.random.RandomState(args.seed).choice(len(feats), args.max_points, replace=False))
        feats, labels = feats[keep], labels[keep]
    names = None
    if args.classes:
        try:
            names = Path(args.classes).read_text().splitlines()
        except OSError as e:
            raise BigrError(f"cannot read class names {args.classes}: {e.strerror or e}") from None
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        out = out.with_name(out.name + ".png")
    reps.tsne_plot(feats, labels, out, class_names=names, perplexity=args.perplexity, iters=args.iters, seed=args.seed)
    _report([out])
    return 0

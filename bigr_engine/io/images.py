"""Image data for the engine's tools.

Image folders use the ImageFolder layout: ``root/<class name>/<image>``, classes in sorted order get
ids 0, 1, ...; every image is centre-cropped to a square and resized to the tokenizer's size with PIL.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from bigr_engine.errors import BigrError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def mask_from_image(img, size: int) -> torch.Tensor:
    """A mask image (white = selected) -> (size, size) bool, centre-cropped and resized like its image (nearest)."""
    from PIL import Image
    gray = np.asarray(center_crop_resize(img.convert("L"), size, Image.Resampling.NEAREST))
    return torch.from_numpy(gray >= 128)


def box_mask(box, size: int, what: str) -> torch.Tensor:
    """(x0, y0, x1, y1) integers -> (size, size) bool, True inside x0 <= x < x1, y0 <= y < y1; `what` names the
    argument in the error."""
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
        raise BigrError(f"{what} is not a non-empty rectangle inside the {size}x{size} frame "
                        f"(0 <= x0 < x1 <= {size}, 0 <= y0 < y1 <= {size})")
    m = torch.zeros(size, size, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def center_crop_resize(img, size: int, resample=None):
    """A PIL image -> its central square, resized to size x size (bicubic by default)."""
    from PIL import Image
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
    if s != size:
        img = img.resize((size, size), Image.Resampling.BICUBIC if resample is None else resample)
    return img


def open_image(path):
    """An image file -> a PIL RGB image. BigrError if it is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except FileNotFoundError:
        raise BigrError(f"image not found: {path}; pass the path of an existing image file") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise BigrError(f"cannot read image {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                        f"pass a PNG/JPEG/... image file") from None
    return im


def to_tensor(img) -> torch.Tensor:
    """A PIL RGB image -> (3, H, W) float in [0, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def read_image(path, size: int | None) -> torch.Tensor:
    """An image file -> (3, size, size) float in [0, 1] (RGB, centre crop, resize; size None: crop only).
    BigrError if it is missing or unreadable."""
    im = open_image(path)
    return to_tensor(center_crop_resize(im, size if size is not None else min(im.size)))


def list_image_folder(root) -> tuple[list[Path], list[int], list[str]]:
    """-> (image paths, class ids, class names) of an ImageFolder-layout directory, in a stable order."""
    root = Path(root)
    if not root.is_dir():
        raise BigrError(f"image folder not found: {root}; pass a directory laid out as root/<class name>/<image>")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths, labels = [], []
    for c, name in enumerate(classes):
        for p in sorted((root / name).rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(p)
                labels.append(c)
    if not paths:
        raise BigrError(f"no images found in {root}: expected root/<class name>/<image>.png|jpg")
    return paths, labels, classes


def image_folder(root, size: int, batch_size: int = 64) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images (b, 3, size, size) float in [0, 1], labels (b,) int64) batches of an image folder."""
    paths, labels, _ = list_image_folder(root)
    for i in range(0, len(paths), batch_size):
        chunk = paths[i:i + batch_size]
        yield torch.stack([read_image(p, size) for p in chunk]), torch.tensor(labels[i:i + batch_size], dtype=torch.long)


def load_image_folder(root, size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A whole image folder in memory -> (images (n, 3, size, size), labels (n,), class names)."""
    paths, labels, classes = list_image_folder(root)
    images = torch.stack([read_image(p, size) for p in paths])
    return images, torch.tensor(labels, dtype=torch.long), classes


# ---- outputs: float images -> uint8, grids, PNG bytes (RGB; (H,W,3) / (B,H,W,3) uint8 arrays) ----------

def to_uint8(images) -> np.ndarray:
    """(B,3,H,W) or (3,H,W) floats in [0,1] -> (B,H,W,3) or (H,W,3) uint8 (values clamped, rounded)."""
    try:
        import torch
        if isinstance(images, torch.Tensor):
            images = images.detach().float().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    arr = np.asarray(images, dtype=np.float32)
    if arr.ndim not in (3, 4) or arr.shape[-3] != 3:
        raise BigrError(f"images must be (B,3,H,W) or (3,H,W) RGB in [0,1], got shape {arr.shape}")
    arr = np.nan_to_num(arr, nan=0.0)
    out = np.rint(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(out, -3, -1))


def make_grid(images, nrow: int = 8, pad: int = 2, pad_value: int = 128) -> np.ndarray:
    """Tile images into rows of `nrow` with `pad` pixels of grey (pad_value) around and between them.

    `images`: (B,H,W,3) uint8, or (B,3,H,W) floats in [0,1] (converted with `to_uint8`). -> (H',W',3) uint8.
    The last row is filled with the pad colour where it has fewer than `nrow` images."""
    arr = np.asarray(images)
    if arr.ndim == 4 and arr.dtype != np.uint8 and arr.shape[1] == 3:
        arr = to_uint8(images)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise BigrError(f"make_grid needs (B,H,W,3) uint8 or (B,3,H,W) float images, got {arr.dtype} {arr.shape}")
    b, h, w, _ = arr.shape
    if b == 0:
        raise BigrError("make_grid got no images")
    if nrow < 1 or pad < 0:
        raise BigrError(f"make_grid needs nrow >= 1 and pad >= 0, got nrow={nrow}, pad={pad}")
    cols = min(nrow, b)
    rows = -(-b // cols)
    grid = np.full((rows * h + (rows + 1) * pad, cols * w + (cols + 1) * pad, 3), pad_value, dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y:y + h, x:x + w] = arr[i]
    return grid


def png_bytes(array) -> bytes:
    """(H,W,3) uint8 -> PNG file contents (deterministic for the same pixels)."""
    import io

    from PIL import Image
    arr = np.asarray(array)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise BigrError(f"a PNG needs an (H,W,3) uint8 array, got {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


# The decoder always runs on batches of exactly this many codes (the last one padded): its float rounding can
# depend on the batch shape, so a fixed shape keeps the pixels of a sample independent of --batch-size, of the
# shard size and world size, and of the command (generate and sample-many decode alike), while still batching
# the decoder (one image per call is slow on a GPU).
DECODE_GROUP = 16


def decode_to_uint8(bae, codes) -> np.ndarray:
    """codes (n,N,K) -> (n,H,W,3) uint8, decoded in batches of exactly DECODE_GROUP on the tokenizer's device."""
    device = next(bae.parameters()).device
    out = []
    with torch.inference_mode():
        for a in range(0, len(codes), DECODE_GROUP):
            chunk = codes[a:a + DECODE_GROUP].to(device)
            n = len(chunk)
            if n < DECODE_GROUP:
                chunk = torch.cat([chunk, chunk[:1].expand(DECODE_GROUP - n, *chunk.shape[1:])])
            out.append(to_uint8(bae.decode(chunk)[:n]))
    return np.concatenate(out) if out else np.zeros((0, bae.cfg.img_size, bae.cfg.img_size, 3), np.uint8)

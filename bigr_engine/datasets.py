"""Image data for the engine's tools.

Image folders use the ImageFolder layout: ``root/<class name>/<image>``, classes in sorted order get
ids 0, 1, ...; every image is centre-cropped to a square and resized to the tokenizer's size with PIL.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import BigrError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


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

"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (no download at run time).

Images are 28x28 grayscale; the engine's tokenizers take RGB, so `as_rgb32` pads to 32x32 with the
background value (0) and repeats the channel.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from bigr_engine.errors import BigrError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def root_dir(root=None) -> Path:
    return Path(root or os.environ.get("FASHION_MNIST_ROOT", DEFAULT_ROOT))


def load(split: str = "train", root=None) -> tuple[np.ndarray, np.ndarray]:
    """-> images (n, 28, 28) uint8, labels (n,) int64."""
    if split not in FILES:
        raise BigrError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    base = root_dir(root)
    img_file, lab_file = (base / f for f in FILES[split])
    if not img_file.is_file() or not lab_file.is_file():
        raise BigrError(f"Fashion-MNIST not found in {base}; install it with `apt-get install dataset-fashion-mnist` "
                        f"or set FASHION_MNIST_ROOT to a folder holding the four IDX .gz files")
    with gzip.open(img_file, "rb") as f:
        images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(lab_file, "rb") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8).astype(np.int64)
    if len(images) != len(labels):
        raise BigrError(f"Fashion-MNIST files in {base} disagree: {len(images)} images, {len(labels)} labels")
    return images, labels


def as_rgb32(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(n, 28, 28) uint8 -> (n, 3, 32, 32) float in [0, 1], padded by 2 pixels of background."""
    x = torch.from_numpy(np.array(images, dtype=np.float32)).div_(255.0)
    x = torch.nn.functional.pad(x, (2, 2, 2, 2))
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


def to_gray28(images: torch.Tensor) -> torch.Tensor:
    """Inverse of as_rgb32 for generated images: (n, 3, 32, 32) in [0,1] -> (n, 28, 28) float (channel mean, crop)."""
    return images.mean(1)[:, 2:30, 2:30]

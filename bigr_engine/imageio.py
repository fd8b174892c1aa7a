"""Small image helpers for outputs: float images -> uint8, grids, and PNGs written atomically.

Images are RGB. `to_uint8` takes the engine's layout, (B,3,H,W) floats in [0, 1] (a torch tensor or a
numpy array); everything else works on (H,W,3) / (B,H,W,3) uint8 numpy arrays.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np

from .errors import BigrError


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


def _temp_name(path: Path) -> Path:
    """A fresh hidden name beside `path` (same folder, so the final rename is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _write_error(path, e: OSError) -> BigrError:
    return BigrError(f"cannot write {path}: {e.strerror or e}; pass a writable output location")


def save_png_atomic(array, path) -> Path:
    """Write an (H,W,3) uint8 array as a PNG: to a temporary file beside `path`, then renamed onto it,
    so that `path` is either absent/unchanged or complete. Creates missing parent folders."""
    return write_files_atomic({path: png_bytes(array)})[0]


def write_files_atomic(files: dict) -> list[Path]:
    """{path: bytes} -> every file written to a temporary name first; only when all were written are they
    renamed into place. On any failure (or interruption) the temporary files, the files already renamed in
    this call and the folders this call created are removed again, so nothing new is left behind; an
    OSError becomes a BigrError that names the path. -> the paths written, in order."""
    staged: list[tuple[Path, Path]] = []
    made_dirs: list[Path] = []
    done: list[Path] = []
    path = None
    try:
        for path, data in files.items():
            path = Path(path)
            missing = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
            path.parent.mkdir(parents=True, exist_ok=True)
            made_dirs.extend(reversed(missing))
            if path.is_dir():
                raise IsADirectoryError(21, "is a folder")
            tmp = _temp_name(path)
            with open(tmp, "xb") as f:  # created with the usual permissions (umask), never over another file
                staged.append((tmp, path))
                f.write(data)
        for tmp, path in staged:
            os.replace(tmp, path)
            done.append(path)
    except BaseException as e:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        for p in done:
            p.unlink(missing_ok=True)
        _remove_empty(made_dirs)
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise
    return done


def _remove_empty(dirs: list[Path]):
    for d in reversed(dirs):  # deepest first
        try:
            d.rmdir()
        except OSError:
            pass

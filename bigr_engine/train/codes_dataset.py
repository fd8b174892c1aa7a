"""Datasets of bit-packed codes: what `bigr encode-dataset` writes and `bigr train` reads.

A folder holds `meta.json` (bits, tokens, count, shard size, the tokenizer's config), `labels.npy`, and
shards `codes_00000.npy` of packed words (n, N) (int32 for K <= 32 bits, int64 above: 32x smaller than
float codes at K = 32). Shards are memory-mapped for training. Encoding is resumable: finished shards
are skipped and each file is written atomically, so an interrupted run never leaves half a shard.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from bigr_engine.errors import BigrError
from bigr_engine.io.files import write_file_atomic
from bigr_engine.ops.packing import pack, unpack


@torch.no_grad()
def encode_dataset(bae, images, labels, out, shard_size: int = 10000, batch_size: int = 256,
                   deterministic: bool = True, progress: bool = True) -> Path:
    """images: (n,3,S,S) float tensor in [0,1] (or any sequence of such batches' rows), labels (n,)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(images)
    if len(labels) != n:
        raise BigrError(f"{n} images but {len(labels)} labels")
    meta = {"format": "bigr-codes/1", "bits": bae.bits, "num_tokens": bae.cfg.num_tokens, "count": n,
            "shard_size": shard_size, "tokenizer": bae.cfg.to_dict()}
    meta_path = out / "meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text()) != meta:
        raise BigrError(f"{out} holds codes from another tokenizer or dataset; pass an empty --out folder")
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    _save_npy(out / "labels.npy", np.asarray(labels, dtype=np.int64))
    shards = range(0, n, shard_size)
    device = next(bae.parameters()).device   # images go to the tokenizer's device, codes come back to the host
    bar = tqdm(total=n, desc="encode", unit="img", disable=not progress)
    for i, lo in enumerate(shards):
        path = out / f"codes_{i:05d}.npy"
        hi = min(n, lo + shard_size)
        if path.exists():
            bar.update(hi - lo)
            continue
        words = []
        for b in range(lo, hi, batch_size):
            x = torch.as_tensor(images[b:min(hi, b + batch_size)]).to(device)
            words.append(pack(bae.encode(x, deterministic=deterministic)).cpu().numpy())
            bar.update(len(x))
        _save_npy(path, np.concatenate(words))
    bar.close()
    return out


class CodesDataset:
    """Memory-mapped packed codes; indexing with a tensor of indices returns unpacked (B,N,K) uint8 codes."""

    def __init__(self, folder):
        folder = Path(folder)
        try:
            self.meta = json.loads((folder / "meta.json").read_text())
            self.labels = torch.from_numpy(np.load(folder / "labels.npy"))
        except (OSError, ValueError) as e:
            raise BigrError(f"{folder} is not a codes dataset ({e.__class__.__name__}); create it with `bigr encode-dataset`") from None
        self.bits = self.meta["bits"]
        self.num_tokens = self.meta["num_tokens"]
        size = self.meta["shard_size"]
        n_shards = -(-self.meta["count"] // size)
        self.shards = []
        for i in range(n_shards):
            path = folder / f"codes_{i:05d}.npy"
            if not path.exists():
                raise BigrError(f"{path} is missing: the encoding was interrupted; run `bigr encode-dataset` again to finish it")
            self.shards.append(np.load(path, mmap_mode="r"))
        self.shard_size = size
        if sum(len(s) for s in self.shards) != self.meta["count"] or len(self.labels) != self.meta["count"]:
            raise BigrError(f"{folder}: shard sizes do not add up to {self.meta['count']} codes; re-encode the dataset")

    def __len__(self) -> int:
        return self.meta["count"]

    def __getitem__(self, idx) -> torch.Tensor:
        idx = torch.as_tensor(idx).reshape(-1).tolist()
        words = np.stack([self.shards[i // self.shard_size][i % self.shard_size] for i in idx])
        return unpack(torch.from_numpy(words), self.bits)


def _save_npy(path: Path, array: np.ndarray) -> None:
    write_file_atomic(path, lambda f: np.save(f, array))

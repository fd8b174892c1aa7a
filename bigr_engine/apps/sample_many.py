"""`bigr sample-many`: tens of thousands of class-conditional samples (e.g. 50k for FID), sharded and resumable.

Layout of the output folder DIR:
  manifest.json                      the settings; a run with other settings into DIR is refused
  shards/shard_<s:05d>.npz           images [s*S, (s+1)*S) of the run (arr_0 uint8 (n,H,W,3), arr_1 labels, arr_2 indices)
  png/<index:06d>_<class>.png        one PNG per image (unless --no-png)
  samples_<N>x<H>x<W>x3.npz          at the end: arr_0 uint8 (N,H,W,3) in index order, arr_1 labels (the layout
                                     OpenAI's ADM evaluator reads)

Labels: blocks of `per_class` images of each listed class in order, repeated until `num_images`
(which must be a whole number of such rounds, so every class gets the same count). Image i has global
sample index i, and every random draw of `model.generate` is keyed by (seed, i): image i is the same
whatever the batch size, the number of processes or the point a run was resumed from.

Data-parallel design (no collectives): under torchrun, rank r of W takes the shards s with s % W == r.
Each shard's PNGs and npz are staged under temporary names and renamed into place, the npz last, so an
npz on disk means the shard is complete; a rerun skips those shards (with any world size). After its
own shards, each process checks whether every shard is on disk; the one that finds them all (the last
finisher, or any later rerun) assembles the final npz under an exclusive file lock, streamed shard by
shard into a temporary file that is renamed into place. torch.distributed is never initialised, so
ranks do not wait on each other, and no barrier can time out when shards are unevenly left on resume.
"""
from __future__ import annotations

import hashlib
import dataclasses
import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bigr_engine.sampling.engine import resolve_dtype
from bigr_engine.sampling.reuse import resolve_reuse
from bigr_engine.errors import BigrError
from bigr_engine.io.files import temp_name, write_file_atomic, write_files_atomic
from bigr_engine.io.images import DECODE_GROUP, decode_to_uint8

FORMAT = "bigr-sample-many/1"


# ---- the plan: which label each index gets, and the shards -----------------------------------------

@dataclass(frozen=True)
class Plan:
    num_images: int
    per_class: int
    classes: tuple[int, ...]
    shard_size: int

    def __post_init__(self):
        if self.per_class < 1:
            raise BigrError(f"--per-class must be at least 1, got {self.per_class}")
        if self.num_images < 1:
            raise BigrError(f"--num-images must be at least 1, got {self.num_images}")
        if self.shard_size < 1:
            raise BigrError(f"--shard-size must be at least 1, got {self.shard_size}")
        if not self.classes:
            raise BigrError("no classes to sample; pass --classes with at least one class")
        dup = sorted({c for c in self.classes if self.classes.count(c) > 1})
        if dup:
            raise BigrError(f"class {dup[0]} is listed more than once in --classes; list each class once")
        block = self.per_class * len(self.classes)
        if self.num_images % block:
            lower, upper = self.num_images // block * block, (self.num_images // block + 1) * block
            near = f"{lower} or {upper}" if lower else f"{upper}"
            raise BigrError(f"--num-images {self.num_images} is not a multiple of --per-class x classes = {self.per_class} x "
                            f"{len(self.classes)} = {block}; pass --num-images {near}, or change --per-class/--classes")

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def shard_range(self, s: int) -> tuple[int, int]:
        return s * self.shard_size, min(self.num_images, (s + 1) * self.shard_size)

    def labels(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Labels of images lo..hi-1: class classes[(i // per_class) % len(classes)]."""
        idx = np.arange(lo, self.num_images if hi is None else hi)
        return np.asarray(self.classes, dtype=np.int64)[(idx // self.per_class) % len(self.classes)]

    def shards_of(self, rank: int, world: int) -> range:
        return range(rank, self.num_shards, world)


# ---- paths and small atomic writes -----------------------------------------------------------------

def shard_path(out: Path, s: int) -> Path:
    return out / "shards" / f"shard_{s:05d}.npz"


def png_path(out: Path, i: int, label: int) -> Path:
    return out / "png" / f"{i:06d}_{label}.png"


def final_path(out: Path, n: int, h: int, w: int) -> Path:
    return out / f"samples_{n}x{h}x{w}x3.npz"


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A cheap identity of a module's weights: sha256 over every tensor's name, shape, dtype and its first and
    last 4096 values. Catches a different checkpoint or dtype without hashing gigabytes."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        flat = t.detach().reshape(-1)
        part = torch.cat([flat[:4096], flat[-4096:]]) if flat.numel() > 8192 else flat
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(part.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def ensure_manifest(out: Path, settings: dict) -> None:
    """Create DIR/manifest.json with `settings`, or check that the one there holds the same settings.
    Created with os.link from a complete temporary file: atomic, and only one of several ranks wins."""
    path = out / "manifest.json"
    if not path.exists():
        tmp = temp_name(path)
        tmp.write_text(json.dumps({"settings": settings}, indent=2) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another rank was first: compare with its manifest below
        finally:
            tmp.unlink(missing_ok=True)
    try:
        have = json.loads(path.read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        raise BigrError(f"{path} is not a sample-many manifest; pass another --out folder, or delete {out} to start over") from None
    if have != settings:
        diff = sorted(k for k in set(have) | set(settings) if have.get(k) != settings.get(k))
        shown = "; ".join(f"{k}: {have.get(k)!r} there, {settings.get(k)!r} now" for k in diff[:3])
        raise BigrError(f"{out} holds samples made with other settings ({shown}); rerun with the same settings to resume, "
                        f"or pass another --out folder")


def _clean_stale_temps(out: Path, plan: Plan, mine: set[int]) -> None:
    """Remove temporary files left by a killed run, for this rank's unfinished shards only (other ranks may be
    writing theirs right now). Temporary names look like .<name>.<pid>.<hex>.tmp."""
    for sub in ("png", "shards"):
        folder = out / sub
        if not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            name = entry.name
            if not (name.startswith(".") and name.endswith(".tmp")):
                continue
            target = name[1:].rsplit(".", 3)[0]
            try:
                s = int(target[len("shard_"):-len(".npz")]) if sub == "shards" else int(target.split("_")[0]) // plan.shard_size
            except ValueError:
                continue
            if s in mine:
                Path(entry.path).unlink(missing_ok=True)


# ---- generation ---------------------------------------------------------------------------------

def _make_shard(model, bae, plan: Plan, s: int, out: Path, gen: dict, batch_size: int, png: bool, bar) -> None:
    from bigr_engine.io.images import png_bytes
    lo, hi = plan.shard_range(s)
    labels = plan.labels(lo, hi)
    codes = []
    for a in range(lo, hi, batch_size):
        b = min(hi, a + batch_size)
        codes.append(model.generate_with(torch.as_tensor(labels[a - lo:b - lo]), sample_index=torch.arange(a, b),
                                         **gen).cpu())
        bar.update(b - a)
    images = decode_to_uint8(bae, torch.cat(codes))
    files = {png_path(out, lo + j, int(c)): png_bytes(img) for j, (img, c) in enumerate(zip(images, labels))} if png else {}
    # The npz goes last: write_files_atomic renames in order, so an npz on disk means the whole shard is there.
    files[shard_path(out, s)] = _npz_bytes(arr_0=images, arr_1=labels, arr_2=np.arange(lo, hi, dtype=np.int64))
    write_files_atomic(files)


def _read_shard(path: Path, plan: Plan, s: int, hw: tuple[int, int]) -> np.ndarray:
    lo, hi = plan.shard_range(s)
    try:
        with np.load(path) as z:
            images, labels, idx = z["arr_0"], z["arr_1"], z["arr_2"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise BigrError(f"{path} is unreadable ({type(e).__name__}); delete it and rerun to regenerate that shard") from None
    if (images.dtype != np.uint8 or images.shape != (hi - lo, *hw, 3) or not np.array_equal(labels, plan.labels(lo, hi))
            or not np.array_equal(idx, np.arange(lo, hi))):
        raise BigrError(f"{path} does not hold images {lo}..{hi - 1} of this run; delete it and rerun to regenerate that shard")
    return images


def merge(out: Path, plan: Plan, hw: tuple[int, int]) -> Path | None:
    """Assemble the final npz if every shard is on disk and nobody did yet; -> its path, or None if shards are
    missing. Streams shard by shard (50k ImageNet images at 256 px are ~10 GB, more than the memory to spare)."""
    import fcntl
    dst = final_path(out, plan.num_images, *hw)
    if not all(shard_path(out, s).exists() for s in range(plan.num_shards)):
        return None
    with open(out / ".merge.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the process ends, even if it is killed
        if dst.exists():
            return dst  # another process assembled it while we waited
        for entry in os.scandir(out):  # a merge killed half way left its temporary file
            if entry.name.startswith(f".{dst.name}.") and entry.name.endswith(".tmp"):
                Path(entry.path).unlink(missing_ok=True)
        def write_npz(f):   # streamed shard by shard: the final array need not fit in memory
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                with zf.open("arr_0.npy", "w", force_zip64=True) as a:
                    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                              "shape": (plan.num_images, *hw, 3)}
                    np.lib.format.write_array_header_1_0(a, header)
                    for s in range(plan.num_shards):
                        a.write(np.ascontiguousarray(_read_shard(shard_path(out, s), plan, s, hw)).tobytes())
                with zf.open("arr_1.npy", "w", force_zip64=True) as a:
                    np.lib.format.write_array(a, plan.labels())
        write_file_atomic(dst, write_npz)
    return dst


def sample_many(model, bae, out, *, num_images: int, per_class: int, classes, seed: int = 0, sampling: dict | None = None,
                batch_size: int = 64, shard_size: int = 1000, png: bool = True, backend: str = "engine",
                rank: int = 0, world: int = 1, progress: bool = True, interrupt_after: int | None = None) -> Path | None:
    """Generate this rank's shards of the run into `out` and, if every shard is then complete, the final npz.
    -> the final npz's path, or None when other ranks still have shards to write.

    sampling: sampling options of model.generate (cfg, iters, steps, gumbel, schedules, temperature, deterministic,
    greedy, order; dtype, cuda_graph, reuse); the rest take the model's own defaults (`model.default_sampling`), and all of
    them are recorded in the manifest.
    interrupt_after: stop with KeyboardInterrupt after writing that many shards (to test resuming)."""
    from tqdm.auto import tqdm
    out = Path(out)
    plan = Plan(int(num_images), int(per_class), tuple(int(c) for c in classes), int(shard_size))
    model.check_labels(torch.as_tensor(plan.classes))  # class ids in range, before any work
    if batch_size < 1:
        raise BigrError(f"--batch-size must be at least 1, got {batch_size}")
    sampling = dict(sampling or {})
    engine_options = {k: sampling.pop(k) for k in ("dtype", "cuda_graph", "reuse") if k in sampling}
    opts = model.sampling_options(**sampling, seed=int(seed))   # the model's defaults under the given options
    # every option that changes the numbers goes into the manifest; the precision resolved ("auto" -> its meaning here)
    recorded = {k: v for k, v in dataclasses.asdict(opts).items() if k != "seed"}
    recorded["dtype"] = str(resolve_dtype(engine_options.get("dtype"), model.device)).replace("torch.", "")
    reuse = resolve_reuse(engine_options.get("reuse"))
    if not reuse.exact and backend != "engine":
        raise BigrError(f"reuse {reuse.preset!r} changes samples and only the engine implements it; "
                        f"use --backend engine, or --reuse exact")
    if not reuse.exact:   # approximate reuse changes the numbers ("off" and "exact" do not, so they are not recorded)
        recorded["reuse"] = {k: v for k, v in dataclasses.asdict(reuse).items() if k != "preset"}
    hw = (bae.cfg.img_size, bae.cfg.img_size)
    settings = {
        "format": FORMAT, "num_images": plan.num_images, "per_class": plan.per_class, "classes": list(plan.classes),
        "shard_size": plan.shard_size, "seed": int(seed), "sampling": recorded, "png": bool(png),
        "image_size": list(hw), "decode_group": DECODE_GROUP,
        # Weights, dtype and device kind change the numbers; batch size, backend and world size do not.
        "model": {"config": model.cfg.to_dict(), "weights": weights_fingerprint(model),
                  "dtype": str(next(model.parameters()).dtype).replace("torch.", "")},
        "tokenizer": {"config": bae.cfg.to_dict(), "weights": weights_fingerprint(bae)},
        "device": model.device.type,
    }
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as they read back from the file
    out.mkdir(parents=True, exist_ok=True)
    ensure_manifest(out, settings)
    dst = final_path(out, plan.num_images, *hw)
    if dst.exists():
        if progress:
            print(f"{dst} is already complete; nothing to do")
        return dst
    mine = set(plan.shards_of(rank, world))
    _clean_stale_temps(out, plan, mine)
    todo = [s for s in sorted(mine) if not shard_path(out, s).exists()]
    total = sum(hi - lo for lo, hi in map(plan.shard_range, mine))
    left = sum(hi - lo for lo, hi in map(plan.shard_range, todo))
    gen = dict(opts=opts, backend=backend, **engine_options)
    desc = "sample-many" if world == 1 else f"sample-many rank {rank}/{world}"
    with tqdm(total=total, initial=total - left, desc=desc, unit="img", disable=not progress or rank != 0) as bar:
        for k, s in enumerate(todo):
            if interrupt_after is not None and k >= interrupt_after:
                raise KeyboardInterrupt(f"stopped after {k} shards (interrupt_after)")
            _make_shard(model, bae, plan, s, out, gen, batch_size, png, bar)
    return merge(out, plan, hw)

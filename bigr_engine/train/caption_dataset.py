"""(image, caption) datasets for text models: read pairs, encode them once, train from what was stored.

Sources:
- a JSONL manifest: one object per line, {"image": PATH, "caption": TEXT or [TEXT, ...]}, paths relative to the
  manifest's folder;
- a folder: every image (png, jpg, jpeg, webp) with a caption file of the same name and suffix .txt beside it (one
  caption per non-empty line).

`prepare_caption_dataset` writes the tokenizer's packed codes (codes_dataset.encode_dataset) and, beside them,
captions.pt: the distinct captions' conditions from the text encoder (models.text.pack_condition), each image's caption
ids (n, slots: an image with fewer captions repeats them) and the empty prompt's condition. Training then needs
neither the images nor the encoder again: `load_caption_dataset` -> (codes, TextConditions).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from bigr_engine.errors import BigrError
from bigr_engine.io.files import write_file_atomic
from bigr_engine.models.text import pack_condition
from bigr_engine.train.bigr import TextConditions
from bigr_engine.train.codes_dataset import CodesDataset, encode_dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CAPTIONS = "captions.pt"


def read_pairs(source) -> list[tuple[Path, list[str]]]:
    """-> [(image path, its captions)] from a JSONL manifest or a folder of images with .txt captions."""
    src = Path(source)
    if src.is_file():
        pairs = []
        for n, line in enumerate(src.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image, caps = row["image"], row["caption"]
            except (ValueError, KeyError, TypeError):
                raise BigrError(f"{src} line {n}: expected {{\"image\": PATH, \"caption\": TEXT or [TEXT, ...]}}, got "
                                f"{line[:80]!r}") from None
            caps = [caps] if isinstance(caps, str) else caps
            if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
                raise BigrError(f"{src} line {n}: \"caption\" must be a non-empty string or list of strings")
            path = (src.parent / image).resolve()
            if not path.is_file():
                raise BigrError(f"{src} line {n}: image {path} does not exist")
            pairs.append((path, [c.strip() for c in caps]))
    elif src.is_dir():
        pairs = []
        for path in sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            txt = path.with_suffix(".txt")
            if not txt.is_file():
                raise BigrError(f"{path} has no caption file {txt.name} beside it; every image of a caption folder "
                                f"needs one (or use a JSONL manifest)")
            caps = [c.strip() for c in txt.read_text().splitlines() if c.strip()]
            if not caps:
                raise BigrError(f"{txt} is empty: give at least one caption per image")
            pairs.append((path, caps))
    else:
        raise BigrError(f"{src} is neither a JSONL manifest nor a folder of images with .txt captions")
    if not pairs:
        raise BigrError(f"{src} holds no (image, caption) pairs")
    return pairs


def prepare_caption_dataset(bae, encoder, source, out, batch_size: int = 256, progress: bool = True) -> Path:
    """Encode a caption source's images to out/ (packed codes) and its captions to out/captions.pt; -> out."""
    from bigr_engine.io.images import read_image
    pairs = read_pairs(source)
    out = Path(out)
    S = bae.cfg.img_size
    images = torch.stack([read_image(p, S) for p, _ in pairs])
    encode_dataset(bae, images, torch.zeros(len(pairs), dtype=torch.long), out, progress=progress)
    texts = sorted({c for _, caps in pairs for c in caps})
    index = {t: i for i, t in enumerate(texts)}
    slots = max(len(caps) for _, caps in pairs)
    ids = torch.tensor([[index[caps[s % len(caps)]] for s in range(slots)] for _, caps in pairs])
    table = torch.cat([pack_condition(*encoder(texts[i:i + batch_size])) for i in range(0, len(texts), batch_size)])
    null = pack_condition(*encoder([""]))[0]
    meta = encoder.describe() if hasattr(encoder, "describe") else {}
    write_file_atomic(out / CAPTIONS, lambda f: torch.save({"texts": texts, "table": table, "ids": ids, "null": null,
                                                            "encoder": meta}, f))
    return out


def load_caption_dataset(folder) -> tuple[CodesDataset, TextConditions, dict]:
    """-> (codes, their TextConditions, the encoder's description) of a prepared caption dataset."""
    folder = Path(folder)
    if not (folder / CAPTIONS).is_file():
        raise BigrError(f"{folder} has no {CAPTIONS}: it is not a caption dataset; prepare one with "
                        f"`bigr encode-dataset SOURCE --captions --bae T --out DIR`")
    d = torch.load(folder / CAPTIONS, weights_only=False)
    codes = CodesDataset(folder)
    if len(d["ids"]) != len(codes):
        raise BigrError(f"{folder}: {len(d['ids'])} captioned images but {len(codes)} codes; prepare it again")
    return codes, TextConditions(d["table"], d["ids"], d["null"]), d.get("encoder", {})


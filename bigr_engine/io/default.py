"""The bundled default: a small B-AE and BiGR trained on Fashion-MNIST (recipe: tools/train_default.py)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from bigr_engine.errors import BigrError
from bigr_engine.io.checkpoints import load_bae, load_bigr
from bigr_engine.sampling.options import as_options

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def default_info() -> dict:
    path = ASSETS / "default.json"
    if not path.is_file():
        raise BigrError(f"the bundled default model is missing ({path}); reinstall bigr-engine, or pass --ckpt and --bae")
    return json.loads(path.read_text())


def load_default(device="cpu", dtype=torch.float32):
    """-> (model, bae). The model carries `class_names` and `default_sampling` (settings tuned for it)."""
    info = default_info()
    model = load_bigr(ASSETS / info["bigr"], device=device, dtype=dtype)
    bae = load_bae(ASSETS / info["bae"], device=device)
    model.class_names = list(info["class_names"])
    model.default_sampling = as_options(info["sampling"])
    return model, bae


def load_default_text(device="cpu", dtype=torch.float32):
    """-> (text model, bae): the bundled text-to-image model (recipe: tools/train_text_default.py) with its text
    encoder (MiniLM, the `text` extra) attached as `model.text_encoder`, its class names and tuned sampling."""
    path = ASSETS / "default_text.json"
    if not path.is_file():
        raise BigrError(f"the bundled text-to-image model is missing ({path}); reinstall bigr-engine, or pass --ckpt "
                        f"(a text model) and --bae")
    info = json.loads(path.read_text())
    from bigr_engine.models.text import load_text_encoder
    model = load_bigr(ASSETS / info["bigr"], device=device, dtype=dtype)
    bae = load_bae(ASSETS / info["bae"], device=device)
    enc = info["text_encoder"]
    model.text_encoder = load_text_encoder(enc["name"], enc["max_tokens"], device=device)
    model.class_names = list(info["class_names"])
    model.default_sampling = as_options(info["sampling"])
    return model, bae

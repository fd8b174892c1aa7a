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

"""What both trainers share: atomic checkpoints that resume exactly, EMA weights, JSONL logs, LR schedule."""
from __future__ import annotations

import copy
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from bigr_engine.errors import CheckpointError
from bigr_engine.io.files import write_file_atomic


class Ema:
    """Exponential moving average of a model's parameters (buffers are copied)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - self.decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


def lr_at(step: int, base_lr: float, warmup: int, total: int, schedule: str = "constant") -> float:
    """Linear warm-up, then constant or cosine decay to 0 at `total`."""
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "cosine" and total > warmup:
        return 0.5 * base_lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return base_lr


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_state(path, state: dict):
    """Write a training checkpoint atomically: a crash leaves the previous file intact."""
    write_file_atomic(path, lambda f: torch.save(state, f))


def load_state(path, kind: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"cannot resume from {path}: {str(e).splitlines()[0][:160]}; the file is corrupt; "
                              f"delete it to start over or pass another --out") from None
    if not isinstance(state, dict) or state.get("kind") != kind:
        raise CheckpointError(f"{path} is not a {kind} training checkpoint; pass another --out folder")
    return state


class JsonlLog:
    """One JSON object per line; also mirrored to TensorBoard when it is installed."""

    def __init__(self, path, tensorboard: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.path.parent / "tb"))
            except Exception:  # tensorboard is optional
                self.tb = None

    def write(self, step: int, **values):
        rec = {"step": step, "time": round(time.time() - self.t0, 2), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):  # flags and notes stay in the JSONL only
                    self.tb.add_scalar(k, v, step)

    def image(self, tag: str, image, step: int):
        """An (H,W,3) uint8 image to TensorBoard (the JSONL log records only where its PNG is)."""
        if self.tb is not None:
            self.tb.add_image(tag, image, step, dataformats="HWC")
            self.tb.flush()

"""Reading released checkpoints and our own safetensors files; `convert` between them.

Models are built on the meta device and take the loaded tensors by assignment, so loading never
holds two copies of the weights; released zip-format pickles are memory-mapped.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from bigr_engine.models.tokenizer import BinaryAutoencoder
from bigr_engine.models.config import BAEConfig, BiGRConfig, bae_preset, bigr_preset, infer_bae_config, infer_bigr_config
from bigr_engine.errors import BigrError, CheckpointError
from bigr_engine.io.files import write_files_atomic
from bigr_engine.sampling.model import BiGR
from bigr_engine.ops.reference import schedule_tables

FORMAT = "bigr-engine/1"


def read_checkpoint(path) -> tuple[dict, dict | None]:
    """-> (flat dict of tensors, our metadata or None). Raises CheckpointError with the fix on any failure."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}; pass the path of an existing .pt/.th/.safetensors file")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                sd = {k: f.get_tensor(k) for k in f.keys()}
            return sd, meta if meta.get("format") == FORMAT else None
        try:
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) pickle
    except CheckpointError:
        raise
    except Exception as e:  # corrupt, truncated, not a checkpoint at all
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first[:200]}; the file is corrupt or not a "
                              f"PyTorch/safetensors checkpoint (re-download or re-convert it)") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict; pass a BiGR or B-AE checkpoint")
    return obj, None


def _check_keys(model: torch.nn.Module, sd: dict, path, what: str):
    expected = set(model.state_dict().keys())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:6]}{' ...' if len(missing) > 6 else ''} ({len(missing)})")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''} ({len(unexpected)})")
        raise CheckpointError(f"{path} does not match the {what} it is loaded into: {'; '.join(parts)}; "
                              f"check the preset / config options or that this is the right file")
    for k, v in model.state_dict().items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{path}: {k} has shape {tuple(sd[k].shape)}, the {what} expects {tuple(v.shape)}; "
                                  f"check the preset / config options")


def _materialise(model: torch.nn.Module, sd: dict, device, dtype):
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()


# ---- BiGR ----------------------------------------------------------------------------------

def release_to_engine_bigr(sd: dict, path="checkpoint", T: int | None = None) -> dict:
    """Release keys -> ours: denoise_mlp.* -> transcoder.*, the rest -> transformer.*; the duplicated
    transcoder copy is dropped and the stored schedule tables are checked against the computed ones."""
    out = {}
    tables = {}
    for k, v in sd.items():
        if k.startswith("diffusion_processor._denoise_fn."):
            continue
        if k.startswith("diffusion_processor.scheduler."):
            tables[k.rsplit(".", 1)[1]] = v
        elif k.startswith("denoise_mlp."):
            out["transcoder." + k[len("denoise_mlp."):]] = v
        else:
            out["transformer." + k] = v
    if tables:
        ref = schedule_tables(T or next(iter(tables.values())).shape[0] - 1)
        for name, v in tables.items():
            if name in ref and not torch.allclose(v.float(), ref[name], atol=1e-5):
                raise CheckpointError(f"{path}: stored schedule table {name} differs from the Bernoulli schedule this "
                                      f"engine computes; this is not a BiGR checkpoint with the release's scheduler")
    return out


def load_bigr(path, preset: str | None = None, device="cpu", dtype=torch.float32, head_dim: int = 64) -> BiGR:
    """A BiGR model from a released `.pt` (its 'ema' weights) or from our `.safetensors`."""
    sd, meta = read_checkpoint(path)
    if meta is not None:
        if meta.get("kind") not in ("bigr", "bigr-text"):
            raise CheckpointError(f"{path} holds a {meta.get('kind')} model, not BiGR; pass it as the tokenizer (--bae) instead")
        cfg = BiGRConfig.from_dict(json.loads(meta["config"]))
    else:
        if "ema" in sd or "model" in sd:
            sd = sd.get("ema", sd.get("model"))
        sched_beta = sd.get("diffusion_processor.scheduler.beta")   # T is read off the stored tables
        if not any(k.startswith("transformer.") for k in sd):
            sd = release_to_engine_bigr(sd, path)
        plain = {k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith("transformer.")}
        plain.update({"denoise_mlp." + k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith("transcoder.")})
        if sched_beta is not None:
            plain["diffusion_processor.scheduler.beta"] = sched_beta
        if not plain:
            raise CheckpointError(f"{path} is not a BiGR checkpoint (no transformer or transcoder weights); "
                                  f"pass a bigr_*.pt file or one written by `bigr convert`")
        cfg = infer_bigr_config(plain, head_dim=head_dim)
        if preset:
            cfg = bigr_preset(preset, bits=cfg.bits, num_classes=cfg.num_classes, train_steps=cfg.train_steps)
    with torch.device("meta"):
        model = BiGR(cfg)
    _check_keys(model, sd, path, f"BiGR model ({cfg.n_layer} layers, D={cfg.dim}, K={cfg.bits})")
    return _materialise(model, sd, device, dtype)


# ---- B-AE ----------------------------------------------------------------------------------

def load_bae(path, preset: str | None = None, device="cpu", dtype=torch.float32, **config_overrides) -> BinaryAutoencoder:
    """A B-AE tokenizer from a released `.th` ('ae.' keys) or our `.safetensors`. `config_overrides` use the
    release's hyper-parameter names (nf, ch_mult, res_blocks, attn_resolutions, emb_dim, codebook_size,
    img_size, norm_first)."""
    sd, meta = read_checkpoint(path)
    if meta is not None:
        if meta.get("kind") != "bae":
            raise CheckpointError(f"{path} holds a {meta.get('kind')} model, not a B-AE tokenizer; pass it as --ckpt instead")
        cfg = BAEConfig.from_dict({**json.loads(meta["config"]), **config_overrides})
    else:
        if any(k.startswith("ae.") for k in sd):
            sd = {k[3:]: v for k, v in sd.items() if k.startswith("ae.")}
        if preset:
            cfg = bae_preset(preset, **config_overrides)
        else:
            cfg = infer_bae_config(sd, **config_overrides)
    with torch.device("meta"):
        model = BinaryAutoencoder(cfg)
    _check_keys(model, sd, path, f"B-AE tokenizer (nf={cfg.nf}, ch_mult={cfg.ch_mult}, K={cfg.codebook_size})")
    return _materialise(model, sd, device, dtype)


# ---- conversion ----------------------------------------------------------------------------

def save_model(model, dst) -> Path:
    """Write safetensors (config in its metadata) plus a JSON config beside it, atomically."""
    from safetensors.torch import save
    kind = "bae" if not isinstance(model, BiGR) else ("bigr-text" if model.cfg.is_text else "bigr")
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        dst = dst.with_suffix(".safetensors")
    config = json.dumps(model.cfg.to_dict())
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    write_files_atomic({
        dst: save(tensors, metadata={"format": FORMAT, "kind": kind, "config": config}),
        dst.with_suffix(".json"): json.dumps({"format": FORMAT, "kind": kind, "config": model.cfg.to_dict()}, indent=2) + "\n",
    })
    return dst


def detect_kind(path) -> str:
    sd, meta = read_checkpoint(path)
    if meta is not None:
        return meta["kind"]
    if "ema" in sd or "model" in sd or "tok_embeddings.weight" in sd or "transformer.tok_embeddings.weight" in sd:
        return "bigr"
    if any(k.startswith(("ae.", "encoder.blocks.")) for k in sd):
        return "bae"
    raise CheckpointError(f"{path} is neither a BiGR nor a B-AE checkpoint (no known keys)")


def convert(src, dst, **bae_overrides) -> Path:
    """Released file (or ours) -> our safetensors + JSON. Which model it is, is read off the keys."""
    kind = detect_kind(src)
    model = load_bigr(src) if kind in ("bigr", "bigr-text") else load_bae(src, **bae_overrides)
    return save_model(model, dst)


def check_pair(model: BiGR, bae: BinaryAutoencoder):
    """The tokenizer must speak the model's code: same bits per token, same token count."""
    if model.cfg.bits != bae.bits:
        raise BigrError(f"the tokenizer makes {bae.bits}-bit codes but the model was trained on {model.cfg.bits}-bit codes; "
                        f"pass the B-AE with K={model.cfg.bits} (e.g. d{model.cfg.bits}) that this model was trained with")
    if model.cfg.num_tokens != bae.cfg.num_tokens:
        raise BigrError(f"the tokenizer makes {bae.cfg.num_tokens} tokens per image but the model takes {model.cfg.num_tokens}; "
                        f"load the tokenizer with img_size={bae.cfg.downsample * model.cfg.grid}")

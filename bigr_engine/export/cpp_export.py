"""`bigr export cpp`: the model directory the C++ API (cpp/include/bigr/pipeline.h) loads.

manifest.json (format and exporting versions, the model's and tokenizer's shapes, the sampling defaults, the class
names, the decoder's block list, and each file's size and sha256) beside model.safetensors (the transformer's and
transcoder's weights, float32, under their PyTorch names, plus the constant tables: the 2D RoPE cos/sin and the
schedule's k_final, b_final, beta) and, with a tokenizer, tokenizer.safetensors (the decoder's weights). The
tables are computed here by the same functions the Python engine uses, so C++ has no twin of them to keep exact.
The decoder's blocks are listed in the order the tokenizer's construction makes them, so the C++ side interprets a
list rather than re-deriving the architecture. Files appear only once the whole export succeeded.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from bigr_engine._version import __version__
from bigr_engine.errors import BigrError
from bigr_engine.export.manifest import MANIFEST, _sha256, staged_dir
from bigr_engine.io.images import DECODE_GROUP
from bigr_engine.models import tokenizer as tok
from bigr_engine.ops.reference import rope_2d_table, schedule_tables
from bigr_engine.sampling.options import as_options

FORMAT = "bigr-engine-cpp"
FORMAT_VERSION = 1


def decoder_blocks(bae) -> list[dict]:
    """The generator's blocks as the C++ decoder reads them: kind, weight prefix and the settings of each."""
    out = []
    for i, block in enumerate(bae.generator.blocks):
        name = f"generator.blocks.{i}"
        if isinstance(block, nn.GroupNorm):
            out.append({"kind": "group_norm", "name": name, "groups": block.num_groups, "eps": block.eps})
        elif isinstance(block, nn.Conv2d):
            out.append({"kind": "conv", "name": name, "stride": block.stride[0], "padding": block.padding[0]})
        elif isinstance(block, tok.ResBlock):
            out.append({"kind": "res", "name": name, "groups": block.norm1.num_groups, "eps": block.norm1.eps,
                        "project_skip": block.project_skip})
        elif isinstance(block, tok.AttnBlock):
            out.append({"kind": "attn", "name": name, "groups": block.norm.num_groups, "eps": block.norm.eps})
        elif isinstance(block, tok.Upsample):
            out.append({"kind": "upsample", "name": name})
        else:
            raise BigrError(f"bigr export cpp: the C++ decoder has no {type(block).__name__} block ({name})")
    return out


def _tensors(module: nn.Module, prefix: str, keep=lambda k: True) -> dict:
    return {f"{prefix}{k}": v.detach().to("cpu", torch.float32).contiguous()
            for k, v in module.state_dict().items() if keep(k)}


def export_cpp(model, bae, out, class_names=None, sampling=None) -> Path:
    """Write the C++ model directory of `model` (and its tokenizer `bae`, for decoding) to `out`, a new or empty
    folder. sampling: the defaults the C++ pipeline applies (default: the model's `default_sampling`)."""
    from safetensors.torch import save_file
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BigrError(f"--out {out} exists and is not an empty folder; pass a new folder")
    cfg = model.cfg
    if cfg.is_text:
        raise BigrError("bigr export cpp takes class-conditional models; text models are not exported yet")
    if bae is not None and (bae.bits != cfg.bits or bae.cfg.grid ** 2 != cfg.num_tokens):
        raise BigrError(f"the tokenizer makes {bae.cfg.grid ** 2} tokens of {bae.bits} bits, the model takes "
                        f"{cfg.num_tokens} of {cfg.bits}: pass the tokenizer the model was trained with")
    weights = _tensors(model.transformer, "transformer.") | _tensors(model.transcoder, "transcoder.")
    cos, sin = rope_2d_table(cfg.grid, cfg.head_dim, cfg.rope_base, model.transformer.rope_cond_quirk)
    weights["tables.rope_cos"], weights["tables.rope_sin"] = cos.contiguous(), sin.contiguous()
    tables = schedule_tables(cfg.train_steps)
    for k in ("k_final", "b_final", "beta"):
        weights[f"tables.{k}"] = tables[k].contiguous()
    with staged_dir(out) as tmp:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        files = ["model.safetensors"]
        if bae is not None:
            dec = _tensors(bae.generator, "generator.", keep=lambda k: k.startswith("blocks."))
            dec["quantize.embed.weight"] = bae.quantize.embed.weight.detach().to("cpu", torch.float32).contiguous()
            save_file(dec, str(tmp / "tokenizer.safetensors"), metadata={"format": FORMAT})
            files.append("tokenizer.safetensors")
        for f in files:
            (tmp / f).chmod(0o644)
        opts = as_options(sampling if sampling is not None else getattr(model, "default_sampling", None))
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "exported_by": {"bigr_engine": __version__, "torch": torch.__version__},
            "model": cfg.to_dict() | {"head_dim": cfg.head_dim, "grid": cfg.grid},
            "tokenizer": None if bae is None else {
                "img_size": bae.cfg.img_size, "bits": bae.bits, "grid": bae.cfg.grid, "in_channels": bae.cfg.in_channels,
                "emb_dim": bae.cfg.emb_dim, "decode_group": DECODE_GROUP, "blocks": decoder_blocks(bae)},
            "sampling": dataclasses.asdict(opts),
            "class_names": list(class_names) if class_names else None,
            "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out

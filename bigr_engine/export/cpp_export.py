"""`bigr export cpp`: the model directory the C++ API (cpp/include/bigr/pipeline.h) loads.

manifest.json (format and exporting versions, the model's kind (class or text) and shapes, the tokenizer's, the
sampling defaults, the class names, the decoder's block list, a text model's encoder, and each file's size and sha256)
beside model.safetensors (the transformer's and transcoder's weights, float32, under their PyTorch names, a text
model's text_proj and null_text among them, plus the constant tables: the 2D RoPE cos/sin, with a text model's
unrotated text rows, and the schedule's k_final, b_final, beta) and, with a tokenizer, tokenizer.safetensors (the
decoder's weights). The tables are computed here by the same functions the Python engine uses, so C++ has no twin of
them to keep exact. The decoder's blocks are listed in the order the tokenizer's construction makes them, so the C++
side interprets a list rather than re-deriving the architecture. Files appear only once the whole export succeeded.

A text model's encoder, when it is a BERT with a WordPiece tokenizer (MiniLM, the bundled model's), goes with it:
text_encoder.safetensors (its weights, float32, under their Hugging Face names, the pooler left out) and vocab.txt
(the WordPiece vocabulary, line i the token of id i), and the manifest gives the tokenizer's settings (lower-casing,
the special tokens, padding left and truncation right to max_tokens, as models.text.TextEncoder calls it), so that
the C++ pipeline encodes prompts itself. Another encoder (a T5) is only described: C++ then takes its embeddings.

A text model's manifest is format version 2 (a reader of version 1 refuses it by its version rather than failing on
a missing class table); a class model's stays version 1.
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
FORMAT_VERSION = 1          # class models
TEXT_FORMAT_VERSION = 2     # text models (kind "text")


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


def _text_encoder_entry(cfg, encoder) -> dict | None:
    """The manifest's description of a text model's encoder (models.text.TextEncoder.describe), checked against the
    model: its width must be text_dim and its token count text_tokens."""
    if encoder is None:
        return None
    d = encoder.describe()
    if d["dim"] != cfg.text_dim or d["max_tokens"] != cfg.text_tokens:
        raise BigrError(f"the text encoder {d['name']!r} gives {d['max_tokens']} tokens of width {d['dim']}, the model "
                        f"takes {cfg.text_tokens} of width {cfg.text_dim}: pass the encoder the model was trained with")
    return d


def _refuse_bert(encoder, why: str):
    return BigrError(f"the text encoder {encoder.name!r} cannot run in C++: {why}; export without it "
                     f"(--text-encoder none, text_encoder=None) and pass its embeddings to generate_text")


def bert_encoder(encoder) -> tuple[dict, dict, str] | None:
    """A BERT WordPiece encoder as the C++ text encoder reads it -> (its manifest entry, its weights, vocab.txt's
    text); None when the encoder is no BERT (it runs in Python only). A BERT whose tokenizer or layers the C++ side
    does not implement is an error (the manifest would otherwise promise an encoder that tokenizes differently)."""
    model = encoder.model
    c = model.config
    if getattr(c, "model_type", None) != "bert":
        return None
    tok = encoder.tokenizer
    if getattr(c, "position_embedding_type", "absolute") != "absolute" or c.hidden_act != "gelu" or c.is_decoder:
        raise _refuse_bert(encoder, f"the C++ BERT has absolute positions and GELU (this one: "
                                    f"{c.position_embedding_type}, {c.hidden_act}, decoder {c.is_decoder})")
    if not getattr(tok, "is_fast", False):
        raise _refuse_bert(encoder, "its tokenizer is not a Hugging Face fast tokenizer (tokenizer.json)")
    spec = json.loads(tok.backend_tokenizer.to_str())
    norm, pre, wp = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    if (norm.get("type"), pre.get("type"), wp.get("type")) != ("BertNormalizer", "BertPreTokenizer", "WordPiece") \
            or not norm.get("clean_text", False):
        raise _refuse_bert(encoder, f"the C++ tokenizer is BERT's (BertNormalizer with clean_text, BertPreTokenizer, "
                                    f"WordPiece), this one has {norm.get('type')}, {pre.get('type')}, {wp.get('type')}")
    special = {}
    for t in spec.get("added_tokens", []):
        if t.get("normalized") or t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
            raise _refuse_bert(encoder, f"its added token {t['content']!r} is matched with options the C++ "
                                        f"tokenizer lacks (normalized, lstrip, rstrip or single_word)")
        special[t["content"]] = t["id"]
    vocab = wp["vocab"]
    words = [None] * len(vocab)
    for w, i in vocab.items():
        if not 0 <= i < len(words) or words[i] is not None or any(ch in w for ch in "\r\n"):
            raise _refuse_bert(encoder, "its vocabulary is not one token per id 0..V-1 without line breaks")
        words[i] = w
    ids = {k: getattr(tok, f"{k}_token_id") for k in ("cls", "sep", "pad", "unk")}
    if None in ids.values() or wp["unk_token"] != tok.unk_token:
        raise _refuse_bert(encoder, "its tokenizer lacks one of [CLS], [SEP], [PAD] and [UNK]")
    probe = "a b"   # the post-processor must be [CLS] A [SEP], the padding left and the truncation right
    if tok(probe)["input_ids"] != [ids["cls"], *tok(probe, add_special_tokens=False)["input_ids"], ids["sep"]] \
            or tok.padding_side != "left" or tok.truncation_side != "right":
        raise _refuse_bert(encoder, "its tokenizer does not give [CLS] tokens [SEP], padded left and truncated right")
    if encoder.max_tokens > c.max_position_embeddings:
        raise _refuse_bert(encoder, f"max_tokens {encoder.max_tokens} exceeds its {c.max_position_embeddings} "
                                    f"positions")
    entry = {"architecture": "bert", "weights": "text_encoder.safetensors", "vocab": "vocab.txt",
             "layers": c.num_hidden_layers, "heads": c.num_attention_heads, "intermediate": c.intermediate_size,
             "layer_norm_eps": c.layer_norm_eps, "lowercase": bool(norm.get("lowercase", True)),
             "continuing_subword_prefix": wp["continuing_subword_prefix"],
             "max_input_chars_per_word": wp["max_input_chars_per_word"],
             "special_tokens": special, "padding": "left", "truncation": "right",
             **{f"{k}_id": v for k, v in ids.items()}}
    weights = _tensors(model, "", keep=lambda k: not k.startswith("pooler."))
    return entry, weights, "".join(w + "\n" for w in words)


def export_cpp(model, bae, out, class_names=None, sampling=None, text_encoder="attached") -> Path:
    """Write the C++ model directory of `model` (and its tokenizer `bae`, for decoding) to `out`, a new or empty
    folder. sampling: the defaults the C++ pipeline applies (default: the model's `default_sampling`).
    text_encoder (a text model's): the models.text.TextEncoder described in the manifest; "attached" (the default)
    takes `model.text_encoder` when the model has one; None: no encoder (the C++ pipeline takes condition tensors)."""
    from safetensors.torch import save_file
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BigrError(f"--out {out} exists and is not an empty folder; pass a new folder")
    cfg = model.cfg
    if isinstance(text_encoder, str) and text_encoder == "attached":
        text_encoder = getattr(model, "text_encoder", None)
    encoder = _text_encoder_entry(cfg, text_encoder) if cfg.is_text else None
    bert = bert_encoder(text_encoder) if encoder is not None else None
    if encoder is not None:
        encoder["bert"] = None if bert is None else bert[0]
    if bae is not None and (bae.bits != cfg.bits or bae.cfg.grid ** 2 != cfg.num_tokens):
        raise BigrError(f"the tokenizer makes {bae.cfg.grid ** 2} tokens of {bae.bits} bits, the model takes "
                        f"{cfg.num_tokens} of {cfg.bits}: pass the tokenizer the model was trained with")
    weights = _tensors(model.transformer, "transformer.") | _tensors(model.transcoder, "transcoder.")
    cos, sin = rope_2d_table(cfg.grid, cfg.head_dim, cfg.rope_base, model.transformer.rope_cond_quirk,
                             text_tokens=cfg.text_tokens)
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
        if bert is not None:
            save_file(bert[1], str(tmp / "text_encoder.safetensors"), metadata={"format": FORMAT})
            (tmp / "vocab.txt").write_bytes(bert[2].encode())
            files += ["text_encoder.safetensors", "vocab.txt"]
        for f in files:
            (tmp / f).chmod(0o644)
        opts = as_options(sampling if sampling is not None else getattr(model, "default_sampling", None))
        manifest = {
            "format": FORMAT, "format_version": TEXT_FORMAT_VERSION if cfg.is_text else FORMAT_VERSION,
            "exported_by": {"bigr_engine": __version__, "torch": torch.__version__},
            "kind": "text" if cfg.is_text else "class",
            "model": cfg.to_dict() | {"head_dim": cfg.head_dim, "grid": cfg.grid},
            "text_encoder": encoder,
            "tokenizer": None if bae is None else {
                "img_size": bae.cfg.img_size, "bits": bae.bits, "grid": bae.cfg.grid, "in_channels": bae.cfg.in_channels,
                "emb_dim": bae.cfg.emb_dim, "decode_group": DECODE_GROUP, "blocks": decoder_blocks(bae)},
            "sampling": dataclasses.asdict(opts),
            "class_names": list(class_names) if class_names else None,
            "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out

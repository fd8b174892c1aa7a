"""`bigr export onnx`: one ONNX graph per component (export.graphs) and a manifest that says what the host needs.

The directory holds conditions.onnx, transcoder_step.onnx, and with a tokenizer decoder.onnx and encoder.onnx, plus
manifest.json (format and exporting versions, the model's shape, every graph's inputs and outputs with their dtypes
and dynamic axes, the schedule tables, the sampling defaults, the class names, and each file's size and sha256 so a
corrupt or mismatched directory is refused with a clear message). Files appear only once all exports succeeded.

A text model's export takes the condition tensor (B, L, 1 + text_dim) in its conditions graph and adds
text_encoder.onnx (token ids -> embeddings, always float32, as models.text.TextEncoder runs), the encoder's tokenizer
files (text_tokenizer/, read on the host with the `tokenizers` library), and null_condition.npy (the empty prompt's
condition, the unconditional branch of CFG), all listed in the manifest's "text" entry with their sha256.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from bigr_engine._version import __version__
from bigr_engine.errors import BigrError
from bigr_engine.export import graphs
from bigr_engine.export.manifest import FORMAT, FORMAT_VERSION, MANIFEST, _sha256, staged_dir
from bigr_engine.ops.reference import schedule_tables

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_OPSET = 23
OPSETS = range(18, 26)   # what torch's exporter writes; TensorRT 11 reads up to 25


def _export(module, args: tuple, path: Path, input_names, output_names, dynamic_shapes, opset: int) -> None:
    import logging

    import onnx
    quiet = logging.getLogger("torch.onnx")   # e.g. "torchvision is not installed. Skipping torchvision::nms"
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=list(input_names),
                                        output_names=list(output_names), dynamic_shapes=dynamic_shapes,
                                        verbose=False, optimize=True)
    finally:
        quiet.setLevel(level)
    big = sum(p.numel() * p.element_size() for p in module.parameters()) > (1 << 30)
    program.save(str(path), external_data=big)
    onnx.checker.check_model(str(path), full_check=True)   # the checker with strict shape inference


def _graph_io(path: Path) -> dict:
    """Inputs and outputs of a saved graph as {name: {"dtype": ..., "shape": [int or axis name]}}."""
    import onnx
    m = onnx.load(str(path), load_external_data=False)

    def info(values):
        out = {}
        for v in values:
            t = v.type.tensor_type
            out[v.name] = {"dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                           "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}
        return out
    return {"inputs": info(m.graph.input), "outputs": info(m.graph.output)}


def export_onnx(model, bae, out, dtype: str = "float32", opset: int = DEFAULT_OPSET, sampling=None,
                class_names=None, progress: bool = True, text_encoder=None) -> Path:
    """Export `model` (a BiGR) and, when given, `bae` (its tokenizer) to the directory `out`; -> out.

    dtype "bfloat16" puts bf16 weights and matmuls in the graphs (inputs and outputs stay float32), as TensorRT's
    strongly typed networks need; ONNX Runtime's CPU provider cannot run bf16 Gemm, so CPU parity uses float32.
    A text model is exported with its text encoder (a models.text.TextEncoder): `text_encoder`, or by default the
    model's `text_encoder` attribute (set by io.default.load_default_text)."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise BigrError(f"export needs the onnx extra ({e.name} is not installed): pip install 'bigr-engine[onnx]'") from None
    if dtype not in DTYPES:
        raise BigrError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if opset not in OPSETS:
        raise BigrError(f"--opset must be in {OPSETS.start}..{OPSETS.stop - 1}, got {opset}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BigrError(f"{out} exists and is not an empty folder; pass a new folder for the export")
    cfg = model.cfg
    encoder = None
    if cfg.is_text:
        encoder = text_encoder if text_encoder is not None else getattr(model, "text_encoder", None)
        _check_text_encoder(encoder, cfg)
    elif text_encoder is not None:
        raise BigrError("a text encoder was given, but this is a class-conditional model; leave it out (or export a "
                        "text model)")
    if bae is not None:
        from bigr_engine.io.checkpoints import check_pair
        check_pair(model, bae)
    dt = DTYPES[dtype]
    B, N, K, C = 2, cfg.num_tokens, cfg.bits, cfg.num_classes + 1
    null_text = model.transformer.null_text.detach().float().cpu().numpy() if cfg.is_text else None  # not rounded
    model = _copy_to(model, dt)
    batch = torch.export.Dim("batch", min=1, max=65536)
    tokens = torch.export.Dim("tokens", min=1, max=1 << 24)
    branches = torch.export.Dim("branches", min=1, max=2)
    if cfg.is_text:
        L = cfg.text_tokens
        real = torch.arange(L)[None] >= torch.tensor([[L - 2], [0]])              # 2 tokens, then all L
        example = torch.cat([real[..., None].float(), torch.randn(B, L, cfg.text_dim) * real[..., None]], -1)
        conditions = ("conditions", graphs.TextConditions(model, dt),
                      (torch.randint(0, 2, (B, N, K)).float(), torch.rand(B, N) < 0.5, example),
                      ("codes", "mask", "text_condition"), ("cz",),
                      {"codes": {0: batch}, "mask": {0: batch}, "text_condition": {0: batch}})
    else:
        conditions = ("conditions", graphs.Conditions(model, dt),
                      (torch.randint(0, 2, (B, N, K)).float(), torch.rand(B, N) < 0.5, torch.eye(C)[torch.arange(B) % C]),
                      ("codes", "mask", "class_weights"), ("cz",),
                      {"codes": {0: batch}, "mask": {0: batch}, "class_weights": {0: batch}})
    jobs = [
        conditions,
        ("transcoder_step", graphs.TranscoderStep(model, dt),
         (torch.randint(0, 2, (3, K)).float(), torch.randn(2, 3, cfg.transcoder_dim), torch.tensor([cfg.train_steps]),
          torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([0.9, 0.05, 0.9, 0.1]), torch.rand(3, K)),
         ("x", "cz", "step", "cfg", "temperature", "coeffs", "u"), ("p0", "x_next"),
         {"x": {0: tokens}, "cz": {0: branches, 1: tokens}, "step": None, "cfg": None, "temperature": None,
          "coeffs": None, "u": {0: tokens}}),
    ]
    if encoder is not None:   # float32 whatever the dtype: TextEncoder runs its encoder in float32
        ids, attn = _tokenize(encoder, ["", "a photo of a sneaker"])
        jobs.append(("text_encoder", graphs.TextEncoderGraph(_copy_to(encoder.model, torch.float32)), (ids, attn),
                     ("input_ids", "attention_mask"), ("last_hidden_state",),
                     {"input_ids": {0: batch}, "attention_mask": {0: batch}}))
    if bae is not None:
        bae = _copy_to(bae, dt)
        s = bae.cfg.img_size
        jobs += [
            ("decoder", graphs.Decoder(bae, dt), (torch.randint(0, 2, (B, N, K)).float(),), ("codes",), ("images",),
             {"codes": {0: batch}}),
            ("encoder", graphs.Encoder(bae, dt), (torch.rand(B, bae.cfg.in_channels, s, s),), ("images",),
             ("probs",), {"images": {0: batch}}),
        ]
    with staged_dir(out) as tmp:
        from tqdm.auto import tqdm
        graph_info = {}
        for name, module, args, ins, outs, dyn in tqdm(jobs, desc="export onnx", unit="graph", disable=not progress):
            path = tmp / f"{name}.onnx"
            _export(module.eval(), args, path, ins, outs, dyn, opset)
            files = sorted(p.name for p in tmp.iterdir() if p.name == path.name or p.name.startswith(path.name + "."))
            graph_info[name] = {"file": path.name, **_graph_io(path),
                                "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)}
                                          for f in files}}
        tables = schedule_tables(cfg.train_steps)
        exported_by = {"bigr_engine": __version__, "torch": torch.__version__, "onnx_opset": opset}
        text = None
        if encoder is not None:
            text = _write_text_files(encoder, null_text, tmp)
            import tokenizers
            import transformers
            exported_by.update(transformers=transformers.__version__, tokenizers=tokenizers.__version__)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "exported_by": exported_by,
            "dtype": dtype,
            "model": cfg.to_dict(),
            "tokenizer": None if bae is None else {"img_size": bae.cfg.img_size, "bits": bae.bits, "grid": bae.cfg.grid,
                                                   "in_channels": bae.cfg.in_channels},
            "graphs": graph_info,
            "schedule": {k: tables[k].tolist() for k in ("k_final", "b_final", "beta")},
            "sampling": _sampling_dict(sampling if sampling is not None else getattr(model, "default_sampling", None)),
            "class_names": list(class_names) if class_names else None,
            "text": text,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


TEXT_TOKENIZER = "text_tokenizer"      # the text encoder's tokenizer files (Hugging Face's save_pretrained)
NULL_CONDITION = "null_condition.npy"  # the empty prompt's condition (L, 1 + text_dim) float32, the CFG null text


def _check_text_encoder(encoder, cfg) -> None:
    if encoder is None:
        raise BigrError("a text model is exported with its text encoder: pass text_encoder=models.text.load_text_encoder"
                        "(...) (CLI: --text-encoder minilm|DIR, or --text for the bundled text model)")
    if encoder.dim != cfg.text_dim or encoder.max_tokens != cfg.text_tokens:
        raise BigrError(f"the text encoder gives {encoder.max_tokens} tokens of {encoder.dim} channels, but the model "
                        f"takes {cfg.text_tokens} of {cfg.text_dim}; pass the encoder the model was trained with")
    tok = encoder.tokenizer
    if not getattr(tok, "is_fast", False) or not hasattr(tok, "backend_tokenizer"):
        raise BigrError(f"the text encoder's tokenizer ({type(tok).__name__}) has no `tokenizers` version (tokenizer.json), "
                        f"which the exported host reads; use an encoder with a fast tokenizer")
    if tok.pad_token_id is None:
        raise BigrError(f"the text encoder's tokenizer ({type(tok).__name__}) has no padding token, so prompts cannot "
                        f"be left-padded to {encoder.max_tokens} tokens")


def _tokenize(encoder, prompts):
    """The ids and attention mask TextEncoder feeds its model (its tokenizer's left padding to max_tokens)."""
    b = encoder.tokenizer(list(prompts), padding="max_length", max_length=encoder.max_tokens, truncation=True,
                          return_tensors="pt")
    return b["input_ids"].long(), b["attention_mask"].long()


def _write_text_files(encoder, null, tmp: Path) -> dict:
    """The tokenizer files and the null condition into `tmp`; -> the manifest's "text" entry. The host's tokenization
    (the `tokenizers` library on tokenizer.json, export.pipeline.TextTokenizer) is checked here against the
    encoder's own on a few prompts, so an export whose host would tokenize differently is refused."""
    import numpy as np

    from bigr_engine.export.pipeline import TextTokenizer
    tok = encoder.tokenizer
    tok.save_pretrained(str(tmp / TEXT_TOKENIZER))
    if not (tmp / TEXT_TOKENIZER / "tokenizer.json").is_file():
        raise BigrError(f"the text encoder's tokenizer ({type(tok).__name__}) wrote no tokenizer.json, which the "
                        f"exported host reads; use an encoder with a fast tokenizer")
    np.save(tmp / NULL_CONDITION, null, allow_pickle=False)
    files = sorted(p.relative_to(tmp).as_posix() for p in (tmp / TEXT_TOKENIZER).rglob("*") if p.is_file())
    files.append(NULL_CONDITION)
    text = {"encoder": encoder.describe(), "tokens": encoder.max_tokens, "dim": encoder.dim,
            "tokenizer": f"{TEXT_TOKENIZER}/tokenizer.json", "pad_id": int(tok.pad_token_id),
            "pad_type_id": int(getattr(tok, "pad_token_type_id", 0) or 0), "pad_token": str(tok.pad_token),
            "padding_side": "left", "truncation_side": "right", "null_condition": NULL_CONDITION,
            "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in files}}
    host = TextTokenizer(tmp, text)
    probes = ["", "a photo of a sneaker", "A Dark, wide T-shirt; long sleeves!", "word " * (4 * encoder.max_tokens)]
    ids, attn = _tokenize(encoder, probes)
    h_ids, h_attn = host(probes)
    if not (np.array_equal(h_ids, ids.numpy()) and np.array_equal(h_attn, attn.numpy())):
        raise BigrError(f"the text encoder's tokenizer ({type(tok).__name__}) tokenizes differently from its "
                        f"tokenizer.json read by the `tokenizers` library, so an exported host would not give its "
                        f"conditions; use an encoder whose fast tokenizer has no Python-side steps")
    return text


def _sampling_dict(opts) -> dict:
    import dataclasses

    from bigr_engine.sampling.options import as_options
    return dataclasses.asdict(as_options(opts))


def _copy_to(module, dtype: torch.dtype):
    """A float32 / bf16 copy on the CPU for tracing (the caller's model is left as it is)."""
    import copy
    enc = getattr(module, "text_encoder", None)   # not copied: holds a lock, and is exported from its own model
    m = copy.deepcopy(module, {id(enc): None} if enc is not None else None).cpu().to(dtype)
    for attr in ("default_sampling", "class_names"):
        if hasattr(module, attr):
            setattr(m, attr, getattr(module, attr))
    return m.eval()

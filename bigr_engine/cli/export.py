"""`bigr export onnx` (graphs + manifest), `bigr export tensorrt` (engines built from an ONNX export, on a GPU) and
`bigr export cpp` (the model directory of the C++ API)."""
from __future__ import annotations

from pathlib import Path

from bigr_engine.cli.common import check_out_dir
from bigr_engine.errors import BigrError


def cmd_export_onnx(args) -> int:
    from bigr_engine.export.onnx_export import export_onnx
    out = Path(args.out)
    check_out_dir(out)
    model, bae = _load_for_export(args)
    export_onnx(model, bae, out, dtype=args.dtype, opset=args.opset, class_names=getattr(model, "class_names", None),
                progress=not args.quiet)
    graphs = sorted(p.name for p in out.glob("*.onnx"))
    extra = ", text_tokenizer/, null_condition.npy" if model.cfg.is_text else ""
    print(f"wrote {', '.join(graphs)}{extra} and manifest.json to {out}/ ({args.dtype}, opset {args.opset})")
    return 0


def _load_pair(args):
    import bigr_engine as be
    if args.ckpt is None and args.bae is not None:
        raise BigrError("--bae needs --ckpt (the BiGR model it tokenizes for); give neither for the bundled default")
    if args.ckpt is None:
        return be.load_default()
    model = be.load_bigr(args.ckpt)
    return model, (be.load_bae(args.bae) if args.bae else None)


def _load_for_export(args, encoder_optional: bool = False):
    """The model (a text model with its text encoder attached) and tokenizer to export: --text without --ckpt is the
    bundled text model (as for `bigr generate --prompt` and `bigr serve --text`), whose encoder is MiniLM; a --ckpt
    text model gets --text-encoder (minilm by default, a local folder, or with encoder_optional, none)."""
    if args.text and args.ckpt is None:
        if args.bae is not None:
            raise BigrError("--bae needs --ckpt (the BiGR model it tokenizes for); give neither for the bundled "
                            "default")
        if args.text_encoder not in (None, "minilm"):
            raise BigrError(f"the bundled text model was trained with the minilm encoder, got --text-encoder "
                            f"{args.text_encoder}; pass --ckpt with a model of that encoder")
        from bigr_engine.io.default import load_default_text
        return load_default_text()
    if args.text_encoder is not None and args.ckpt is None:
        raise BigrError("--text-encoder is for a text model: add --text (the bundled one) or --ckpt MODEL")
    model, bae = _load_pair(args)
    if model.cfg.is_text:
        spec = args.text_encoder or "minilm"
        if spec == "none" and not encoder_optional:
            raise BigrError("this export needs the text encoder: --text-encoder minilm or a local encoder folder")
        if spec != "none":
            from bigr_engine.models.text import load_text_encoder
            model.text_encoder = load_text_encoder(spec, model.cfg.text_tokens)
    elif args.text or args.text_encoder is not None:
        raise BigrError(f"{args.ckpt} is a class-conditional model: --text and --text-encoder are for text-to-image "
                        f"models (leave out --ckpt for the bundled text model)")
    return model, bae


def cmd_export_cpp(args) -> int:
    from bigr_engine.export.cpp_export import export_cpp
    out = Path(args.out)
    check_out_dir(out)
    model, bae = _load_for_export(args, encoder_optional=True)
    export_cpp(model, bae, out, class_names=getattr(model, "class_names", None))
    files = sorted(p.name for p in out.iterdir())
    print(f"wrote {', '.join(files)} to {out}/; run it with examples/cpp (bigr-generate --model {out}) or "
          f"bigr::Pipeline::load(\"{out}\")")
    return 0


def _buckets(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise BigrError(f"--batch-buckets must be comma-separated positive integers, e.g. 1,8,64; got {text!r}") from None
    if not values or values[0] < 1:
        raise BigrError(f"--batch-buckets must be comma-separated positive integers, e.g. 1,8,64; got {text!r}")
    return values


def cmd_export_tensorrt(args) -> int:
    from bigr_engine.export.tensorrt import build_engines
    out = Path(args.out)
    written = build_engines(args.onnx, out, _buckets(args.batch_buckets), progress=not args.quiet)
    print(f"wrote {len(written)} engines and the timing cache to {out}/")
    return 0


def register(sub) -> None:
    from bigr_engine.export.onnx_export import DEFAULT_OPSET, DTYPES, OPSETS
    p = sub.add_parser("export", help="deployment: ONNX graphs, TensorRT engines, the C++ model directory",
                       description="Export the model as one ONNX graph per component (bigr export onnx), or build "
                                   "TensorRT engines from such an export on a GPU machine (bigr export tensorrt).")
    kinds = p.add_subparsers(dest="kind", required=True)
    q = kinds.add_parser("onnx", help="ONNX graphs + manifest.json",
                         description="Write conditions.onnx and transcoder_step.onnx (and decoder.onnx, encoder.onnx "
                                     "when a tokenizer is given) with a dynamic batch axis, and manifest.json. Without "
                                     "--ckpt the bundled default model and tokenizer are exported (--text: the bundled "
                                     "text-to-image model). A text model's export adds text_encoder.onnx, its "
                                     "tokenizer files (text_tokenizer/) and null_condition.npy. Run the export with "
                                     "`bigr generate --onnx DIR` or bigr_engine.OnnxPipeline(DIR).")
    q.add_argument("--ckpt", metavar="MODEL", help="BiGR model (released .pt or .safetensors); default: the bundled one")
    q.add_argument("--bae", metavar="TOKENIZER", help="its B-AE tokenizer; exports the decoder and encoder graphs too")
    q.add_argument("--text", action="store_true", help="export the bundled text-to-image model (MiniLM text encoder, "
                   "the `text` extra) and its tokenizer instead of the bundled class model (a --ckpt model's kind is "
                   "read off the checkpoint)")
    q.add_argument("--text-encoder", metavar="minilm|DIR", help="the text encoder of a --ckpt text model: minilm "
                   "(default) or a local Hugging Face encoder folder (e.g. a T5); exported as text_encoder.onnx")
    q.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) folder for the export")
    q.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="weights and matmuls in the graphs (default float32; bfloat16 for TensorRT, which ONNX "
                        "Runtime's CPU provider cannot run)")
    q.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, {OPSETS.start}..{OPSETS.stop - 1} (default {DEFAULT_OPSET}: standard Attention "
                        f"and RMSNormalization)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_export_onnx)
    q = kinds.add_parser("tensorrt", help="TensorRT engines from an ONNX export (needs a GPU and `tensorrt`)",
                         description="Build one engine per graph of an ONNX export, with an optimization profile per "
                                     "batch bucket and a timing cache, using the `tensorrt` Python package on a GPU.")
    q.add_argument("--onnx", required=True, metavar="DIR", help="a folder written by `bigr export onnx`")
    q.add_argument("--out", required=True, metavar="ENGINES", help="folder for the engines")
    q.add_argument("--batch-buckets", default="1,8,64", help="images per call the profiles are tuned for "
                   "(default 1,8,64)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_export_tensorrt)
    q = kinds.add_parser("cpp", help="the model directory of the C++ API (bigr/pipeline.h)",
                         description="Write manifest.json, model.safetensors and (with a tokenizer) "
                                     "tokenizer.safetensors for bigr::Pipeline::load. Without --ckpt the bundled "
                                     "default model and tokenizer are exported (with --text: the bundled "
                                     "text-to-image model). A text model's directory also holds its text "
                                     "encoder when that is a BERT (MiniLM): text_encoder.safetensors and vocab.txt, "
                                     "so that C++ encodes prompts; another encoder is only named in the manifest.")
    q.add_argument("--ckpt", metavar="MODEL", help="BiGR model (released .pt or .safetensors); default: the bundled one")
    q.add_argument("--bae", metavar="TOKENIZER", help="its B-AE tokenizer, for decoding to images")
    q.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) folder for the model directory")
    q.add_argument("--text", action="store_true", help="export the bundled text-to-image model (and its tokenizer) "
                   "instead of the class model; needs the `text` extra (its MiniLM encoder)")
    q.add_argument("--text-encoder", metavar="minilm|DIR|none", help="a --ckpt text model's encoder: minilm "
                   "(default), a local Hugging Face encoder folder, or none (the C++ pipeline then takes condition "
                   "tensors only)")
    q.set_defaults(func=cmd_export_cpp)

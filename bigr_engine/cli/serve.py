"""`bigr serve`: the HTTP service (bigr_engine.serve) on uvicorn."""
from __future__ import annotations

from bigr_engine.cli.common import add_model_flags, load_models, pick_device, positive_int
from bigr_engine.errors import BigrError


def cmd_serve(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise BigrError(f"bigr serve needs the serve extra ({e.name} is not installed): pip install 'bigr-engine[serve]'") from None
    from bigr_engine.serve.app import Service, check_limits, create_app
    check_limits(args.max_batch, args.max_wait_ms, args.max_queue, args.timeout_s)   # before the model loads
    device = pick_device(args.device)
    if args.text and args.ckpt is None and args.bae is None:
        from bigr_engine.io.default import load_default_text
        model, bae = load_default_text(device=device)
    else:
        model, bae = load_models(args, device)
        if model.cfg.is_text:
            from bigr_engine.models.text import load_text_encoder
            model.text_encoder = load_text_encoder(args.text_encoder, model.cfg.text_tokens, device=device)
    service = Service(model, bae, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                      timeout_s=args.timeout_s, dtype=None if args.dtype == "auto" else args.dtype)
    print(f"bigr serve: http://{args.host}:{args.port}/ (max batch {args.max_batch}, max wait {args.max_wait_ms:g} ms, "
          f"queue {args.max_queue} images, timeout {args.timeout_s:g} s)", flush=True)
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.timeout_s)
    return 0


def register(sub) -> None:
    from bigr_engine.cli.common import DTYPE_CHOICES
    p = sub.add_parser("serve", help="HTTP generation service with dynamic batching, metrics and a web page",
                       description="Serve POST /v1/generate and /v1/inpaint (JSON), GET /healthz, /readyz, /v1/info, "
                                   "/metrics (Prometheus) and a page at /. Requests with the same sampling options merge "
                                   "into batches of up to --max-batch images, waiting at most --max-wait-ms; a full "
                                   "queue answers 429. Without --ckpt/--bae the bundled model is served.")
    add_model_flags(p)
    p.add_argument("--text", action="store_true", help="serve the bundled text-to-image model (requests send "
                   "\"prompt\"); a --ckpt text model is served as such without it")
    p.add_argument("--text-encoder", default="minilm", metavar="minilm|DIR", help="the text encoder of a --ckpt text "
                   "model (default minilm)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="matmul precision (default: bf16 on CUDA)")
    p.add_argument("--max-batch", type=positive_int, default=16, help="images per model call (default 16)")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="longest a request waits for company (default 10)")
    p.add_argument("--max-queue", type=positive_int, default=256, help="images allowed to wait; more answer 429 "
                                                                        "(default 256)")
    p.add_argument("--timeout-s", type=float, default=60.0, help="a request's deadline: past it, 504 and its work "
                                                                  "dropped (default 60)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)

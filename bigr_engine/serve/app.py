"""`bigr serve`: the HTTP service (FastAPI) over a loaded model, with dynamic batching (serve.batcher).

Endpoints: POST /v1/generate, POST /v1/inpaint, GET /healthz, /readyz, /v1/info, /metrics, and the page at /.
Image i of a generate request is the image `bigr generate --classes ... --per-class ... --seed s` writes for position
i: its rows keep their own seed and sample index inside any batch (engine `seeds=`), and decoding runs in the same
fixed-size groups as the CLI.
"""

import asyncio
import base64
import dataclasses
import io
import math
import threading
import time
from pathlib import Path

import torch

from bigr_engine.errors import BigrError
from bigr_engine.serve.batcher import Batcher, DeadlineExceeded, Job, QueueFull, ShuttingDown
from bigr_engine.serve.metrics import Metrics

STATIC = Path(__file__).resolve().parent / "static"
# Options of a generate request that change the graph or the schedule: requests merge only when these agree.
GENERATE_OPTIONS = ("cfg", "iters", "steps", "gumbel", "cfg_schedule", "gumbel_schedule", "temperature",
                    "deterministic", "greedy")
MAX_REQUEST_IMAGES = 1024


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def check_limits(max_batch, max_wait_ms, max_queue, timeout_s) -> None:
    """The batching limits of `bigr serve`, with the flags' names in the messages."""
    for name, v in (("--max-batch", max_batch), ("--max-queue", max_queue)):
        if int(v) < 1:
            raise BigrError(f"{name} must be a positive integer, got {v}")
    if max_wait_ms < 0 or timeout_s <= 0:
        raise BigrError(f"--max-wait-ms must be >= 0 and --timeout-s > 0, got {max_wait_ms} and {timeout_s}")


class Service:
    """The model, the batcher and the metrics behind the app. Holds no per-request state (requests are jobs)."""

    def __init__(self, model, bae, max_batch: int = 16, max_wait_ms: float = 10.0, max_queue: int = 256,
                 timeout_s: float = 60.0, dtype=None):
        import bigr_engine as be
        be.check_pair(model, bae)
        check_limits(max_batch, max_wait_ms, max_queue, timeout_s)
        self.model, self.bae, self.dtype = model, bae, dtype
        self.max_batch, self.max_queue, self.timeout_s = int(max_batch), int(max_queue), float(timeout_s)
        self.max_wait_s = max_wait_ms / 1e3
        m = self.metrics = Metrics()
        m.counter("requests_total", "HTTP requests by endpoint and status")
        m.counter("images_total", "images generated")
        m.counter("jobs_dropped_total", "queued work dropped before it ran, by reason")
        m.counter("batches_failed_total", "model calls that raised (their requests answered 500)")
        m.gauge("queue_images", "images waiting in the queue")
        m.histogram("batch_images", "images per model call", [1, 2, 4, 8, 16, 32, 64, 128, 256])
        m.histogram("queue_wait_seconds", "time from a job's arrival to its model call",
                    [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30])
        m.histogram("compute_seconds", "time of one model call (generation and decoding)",
                    [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60])
        m.histogram("request_seconds", "time from a request's arrival to its answer",
                    [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60])
        self.batcher = Batcher(self._run, self.max_batch, self.max_wait_s, self.max_queue, m,
                               batchable=lambda key: key[0] == "generate")
        self.ready = threading.Event()

    # ---- parsing requests (the CLI's checks and messages) -----------------------------------------------------------
    def _options(self, body: dict, allowed: tuple) -> dict:
        opts = {k: body[k] for k in allowed if body.get(k) is not None}
        self.model.sampling_options(**opts, seed=self._seed(body))          # every option checked here
        return opts

    @staticmethod
    def _seed(body: dict) -> int:
        seed = body.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
            raise BigrError(f"seed must be an integer in 0..2^63-1, got {seed!r}")
        return seed

    def generate_jobs(self, body: dict) -> tuple[list[Job], dict]:
        from bigr_engine.models.classes import class_ids
        from bigr_engine.sampling.reuse import PRESETS
        text = self.model.cfg.is_text
        known = set(GENERATE_OPTIONS) | {"prompt" if text else "classes", "seed", "per_class", "reuse"}
        unknown = sorted(set(body) - known)
        if text and "classes" in unknown:
            raise BigrError('this server runs a text-to-image model: send "prompt" (a string or a list of strings) '
                            'instead of "classes"')
        if not text and "prompt" in unknown:
            raise BigrError('this server runs a class-conditional model: send "classes" instead of "prompt" (serve a '
                            'text model with `bigr serve --text`)')
        if unknown:
            raise BigrError(f"unknown field(s) {', '.join(unknown)}; valid ones are {', '.join(sorted(known))}")
        if text:   # a row's label is its prompt; the worker encodes a batch's prompts at once
            prompts = body.get("prompt")
            prompts = [prompts] if isinstance(prompts, str) else prompts
            if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
                raise BigrError('"prompt" must be a string or a non-empty list of strings, e.g. {"prompt": "a dark bag"}')
            labels = prompts
        else:
            classes = body.get("classes")
            if not isinstance(classes, list) or not classes:
                raise BigrError('"classes" must be a non-empty list of class ids or names, e.g. {"classes": [7, "Bag"]}')
            ids = class_ids(classes, self.model)
            labels = self.model.check_labels(ids).tolist()
        per_class = body.get("per_class", 1)
        if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
            raise BigrError(f"per_class must be a positive integer, got {per_class!r}")
        reuse = body.get("reuse", "exact")
        if reuse not in PRESETS:
            raise BigrError(f"reuse must be one of {', '.join(PRESETS)}, got {reuse!r}")
        opts = self._options(body, GENERATE_OPTIONS)
        seed = self._seed(body)
        rows = [(c, seed, i) for i, c in enumerate(c for c in labels for _ in range(per_class))]
        if len(rows) > min(MAX_REQUEST_IMAGES, self.max_queue):
            raise BigrError(f"a request may ask for at most {min(MAX_REQUEST_IMAGES, self.max_queue)} images, got "
                            f"{len(rows)}; split it")
        key = ("generate", tuple(sorted(opts.items())), reuse)
        deadline = time.monotonic() + self.timeout_s
        jobs = [Job(key, len(part), part, deadline) for part in
                (rows[a:a + self.max_batch] for a in range(0, len(rows), self.max_batch))]
        return jobs, {"prompts" if text else "classes": [r[0] for r in rows], "seed": seed}

    def inpaint_jobs(self, body: dict) -> tuple[list[Job], dict]:
        known = set(GENERATE_OPTIONS) | {"image", "mask", "box", "class", "seed", "variations", "invert"}
        unknown = sorted(set(body) - known)
        if unknown:
            raise BigrError(f"unknown field(s) {', '.join(unknown)}; valid ones are {', '.join(sorted(known))}")
        from bigr_engine.io.images import box_mask, center_crop_resize, mask_from_image, to_tensor
        S = self.bae.cfg.img_size
        image = _decode_image(body.get("image"), "image")
        size = image.size
        img = to_tensor(center_crop_resize(image.convert("RGB"), S))
        if body.get("mask") is not None and body.get("box") is not None:
            raise BigrError('give "mask" or "box", not both')
        if body.get("mask") is not None:
            mask_im = _decode_image(body["mask"], "mask")
            if mask_im.size != size:
                raise BigrError(f"the mask is {mask_im.size[0]}x{mask_im.size[1]} but the image {size[0]}x{size[1]}; "
                                f"masks must have their image's size")
            mask = mask_from_image(mask_im, S)
        elif body.get("box") is not None:
            box = body["box"]
            if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int) for v in box)):
                raise BigrError(f'"box" must be [x0, y0, x1, y1] integers, got {box!r}')
            mask = box_mask(box, S, f'"box" {box}')
        else:
            raise BigrError('give "mask" (a base64 PNG, white = regenerate) or "box" [x0, y0, x1, y1]')
        label = body.get("class")
        if label is not None:
            from bigr_engine.models.classes import class_ids
            label = self.model.check_labels(class_ids([label], self.model)).tolist()[0]
        variations = body.get("variations", 1)
        if isinstance(variations, bool) or not isinstance(variations, int) or not 1 <= variations <= 16:
            raise BigrError(f"variations must be an integer in 1..16, got {variations!r}")
        opts = self._options(body, GENERATE_OPTIONS)
        payload = dict(image=img, mask=mask, label=label, variations=variations, seed=self._seed(body),
                       invert=bool(body.get("invert", False)), opts=opts)
        job = Job(("inpaint", id(payload)), variations, payload, time.monotonic() + self.timeout_s)
        return [job], {"seed": payload["seed"]}

    # ---- the worker's side ------------------------------------------------------------------------------------------
    def _run(self, key, payloads):
        from bigr_engine.io.images import decode_to_uint8, png_bytes
        if key[0] == "generate":
            rows = [r for p in payloads for r in p]
            opts, reuse = dict(key[1]), key[2]
            labels = [r[0] for r in rows] if self.model.cfg.is_text else torch.tensor([r[0] for r in rows])
            codes = self.model.generate(labels, seeds=torch.tensor([r[1] for r in rows]),
                                        sample_index=torch.tensor([r[2] for r in rows]), reuse=reuse,
                                        dtype=self.dtype, **opts)
            images = [png_bytes(im) for im in decode_to_uint8(self.bae, codes)]
            self.metrics.inc("images_total", len(images))
            out, a = [], 0
            for p in payloads:
                out.append(images[a:a + len(p)])
                a += len(p)
            return out
        from bigr_engine.apps import zero_shot as apps
        (p,) = payloads
        codes, _ = apps.inpaint_codes(self.model, self.bae, p["image"][None], p["mask"][None], p["label"],
                                      variations=p["variations"], seed=p["seed"], invert=p["invert"], **p["opts"])
        images = [png_bytes(im) for im in decode_to_uint8(self.bae, codes)]
        self.metrics.inc("images_total", len(images))
        return [images]

    def warm_up(self) -> None:
        """One small generation of each kind a request will run (kernel self-tests, first-call costs), then ready."""
        try:
            self._run(("generate", (), "exact"), [[("" if self.model.cfg.is_text else 0, 0, 0)]])
        finally:
            self.ready.set()

    def info(self) -> dict:
        from bigr_engine import __version__
        from bigr_engine.models.classes import class_names
        from bigr_engine.ops import loader
        build = getattr(loader, "build_info", None)
        return {"bigr_engine": __version__, "torch": torch.__version__, "device": str(self.model.device),
                "model": self.model.cfg.to_dict(), "tokenizer": {"img_size": self.bae.cfg.img_size, "bits": self.bae.bits},
                "defaults": dataclasses.asdict(self.model.default_sampling), "class_names": class_names(self.model),
                "text_to_image": self.model.cfg.is_text,
                "limits": {"max_batch": self.max_batch, "max_wait_ms": self.max_wait_s * 1e3,
                           "max_queue": self.max_queue, "timeout_s": self.timeout_s,
                           "max_request_images": min(MAX_REQUEST_IMAGES, self.max_queue)},
                "build": build() if callable(build) else None}

    def retry_after(self) -> int:
        """Seconds a shed client should wait: the queue's images at the last batch rate, at least 1."""
        _, _, n, total = self.metrics.histogram_counts("compute_seconds")
        per_batch = total / n if n else 1.0
        return max(1, math.ceil(per_batch * (self.batcher.queued_images / self.max_batch + 1)))

    def close(self):
        self.batcher.close()


def _decode_image(data, what: str):
    from PIL import Image, UnidentifiedImageError
    if not isinstance(data, str) or not data:
        raise BigrError(f'"{what}" must be a base64-encoded PNG or JPEG (a data: URL is fine)')
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        raw = base64.b64decode(data, validate=True)
        im = Image.open(io.BytesIO(raw))
        im.load()
        return im
    except (ValueError, UnidentifiedImageError, OSError) as e:
        raise BigrError(f'"{what}" is not a base64-encoded image ({type(e).__name__}); send a PNG or JPEG') from None


def create_app(service: Service):
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=service.warm_up, name="bigr-warm-up", daemon=True).start()
        yield
        await asyncio.to_thread(service.close)    # finish accepted work (uvicorn stopped taking new requests)

    app = FastAPI(title="bigr-engine", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    m = service.metrics

    def answer(endpoint: str, status: int, body: dict, t0: float, headers=None):
        m.inc("requests_total", endpoint=endpoint, status=str(status))
        m.observe("request_seconds", time.monotonic() - t0)
        return JSONResponse(body, status_code=status, headers=headers)

    async def handle(request: Request, endpoint: str, make_jobs):
        t0 = time.monotonic()
        try:
            body = await request.json()
        except Exception as e:   # the body is not JSON (json.JSONDecodeError, UnicodeDecodeError)
            return answer(endpoint, 400, {"error": f"the body must be a JSON object ({type(e).__name__}: {e})"}, t0)
        if not isinstance(body, dict):
            return answer(endpoint, 400, {"error": "the body must be a JSON object"}, t0)
        try:
            jobs, meta = make_jobs(body)
        except BigrError as e:
            return answer(endpoint, 422, {"error": _one_line(e)}, t0)
        futures = []
        try:
            for job in jobs:
                futures.append(service.batcher.submit(job))
        except QueueFull as e:
            for f in futures:
                f.cancel()
            return answer(endpoint, 429, {"error": f"{e}; retry later"}, t0,
                          headers={"Retry-After": str(service.retry_after())})
        except ShuttingDown as e:
            for f in futures:
                f.cancel()
            return answer(endpoint, 503, {"error": str(e)}, t0)
        waiting = [asyncio.wrap_future(f) for f in futures]
        deadline = jobs[0].deadline
        while True:
            done, pending = await asyncio.wait(waiting, timeout=0.05)
            if not pending:
                break
            if await request.is_disconnected():
                for f in futures:
                    f.cancel()
                m.inc("jobs_dropped_total", reason="disconnected")
                return answer(endpoint, 499, {"error": "the client disconnected"}, t0)
            if time.monotonic() > deadline:
                for f in futures:
                    f.cancel()
                return answer(endpoint, 504, {"error": f"the request took longer than --timeout-s "
                                                       f"{service.timeout_s:g}; its work was dropped"}, t0)
        images = []
        for w in waiting:
            try:
                images += w.result()
            except DeadlineExceeded as e:
                return answer(endpoint, 504, {"error": f"{e}; its work was dropped"}, t0)
            except BigrError as e:
                return answer(endpoint, 422, {"error": _one_line(e)}, t0)
            except Exception as e:   # a failure inside the batch: only its requests fail
                return answer(endpoint, 500, {"error": f"generation failed: {_one_line(e)}"}, t0)
        return answer(endpoint, 200, {"images": [base64.b64encode(b).decode() for b in images], **meta}, t0)

    @app.post("/v1/generate")
    async def generate(request: Request):
        return await handle(request, "generate", service.generate_jobs)

    @app.post("/v1/inpaint")
    async def inpaint(request: Request):
        return await handle(request, "inpaint", service.inpaint_jobs)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not service.ready.is_set():
            return JSONResponse({"status": "warming up"}, status_code=503)
        return {"status": "ready"}

    @app.get("/v1/info")
    async def info():
        return service.info()

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(m.render(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/app.js")
    async def script():
        return FileResponse(STATIC / "app.js", media_type="text/javascript")

    return app

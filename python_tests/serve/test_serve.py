"""`bigr serve` on loopback: the CLI's bytes, batching that merges, load shedding, deadlines, disconnects, bad input,
a failing batch, the observability endpoints, and the batcher's shutdown. A real uvicorn server per fixture."""
import base64
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (tools/test.sh installs it)")
pytest.importorskip("uvicorn", reason="the serve extra is not installed (tools/test.sh installs it)")
httpx = pytest.importorskip("httpx", reason="the serve extra is not installed (tools/test.sh installs it)")

import bigr_engine as be  # noqa: E402
from bigr_engine.serve.app import Service, create_app  # noqa: E402
from bigr_engine.serve.batcher import Batcher, Job, QueueFull, ShuttingDown  # noqa: E402

FAST = {"iters": 4, "steps": 5}


class Server:
    def __init__(self, service):
        import uvicorn
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.service = service
        self.server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=self.port,
                                                    log_level="error", timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(self.url("/readyz"), timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the server did not become ready")

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def post(self, path, body, **kw):
        return httpx.post(self.url(path), json=body, timeout=kw.pop("timeout", 120), **kw)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def models():
    return be.load_default()


@pytest.fixture(scope="module")
def server(models):
    s = Server(Service(*models, max_batch=8, max_wait_ms=300, max_queue=64, timeout_s=60))
    yield s
    s.stop()


def metric(server, line_start):
    text = httpx.get(server.url("/metrics")).text
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_generate_equals_the_cli_bytes(server, tmp_path):
    from bigr_engine.cli.main import main
    r = server.post("/v1/generate", {"classes": [0, "Sneaker", 9], "per_class": 2, "seed": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["classes"] == [0, 0, 7, 7, 9, 9] and body["seed"] == 3
    assert main(["generate", "--classes", "0,Sneaker,9", "--per-class", "2", "--seed", "3", "--out",
                 str(tmp_path), "--quiet"]) == 0
    for i, (b64, c) in enumerate(zip(body["images"], body["classes"])):
        assert base64.b64decode(b64) == (tmp_path / f"{i:05d}_{c}.png").read_bytes(), i


def test_concurrent_requests_merge_and_keep_their_images(server):
    before = metric(server, 'bigr_batch_images_bucket{le="1"}'), metric(server, "bigr_batch_images_count")
    bodies = [{"classes": [i % 10], "seed": 100 + i, **FAST} for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: server.post("/v1/generate", b), bodies))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    singles_after = metric(server, 'bigr_batch_images_bucket{le="1"}') - before[0]
    batches_after = metric(server, "bigr_batch_images_count") - before[1]
    assert batches_after < 8 and batches_after - singles_after >= 1, "no batch held more than one request"
    # each image is the one its request gets alone (its own seed and index inside the batch)
    for b, a in zip(bodies[:3], answers[:3]):
        alone = server.post("/v1/generate", b).json()["images"]
        assert alone == a.json()["images"]


def test_bad_input_answers_4xx_and_keeps_serving(server):
    cases = [
        ("nope", 400, "JSON"),
        ({"classes": []}, 422, "classes"),
        ({"classes": [42]}, 422, "out of range"),
        ({"classes": ["tabby"]}, 422, "unknown class name"),
        ({"classes": [1], "steps": 1000}, 422, "steps must be in"),
        ({"classes": [1], "cfg": -1}, 422, "non-negative"),
        ({"classes": [1], "seed": -5}, 422, "seed"),
        ({"classes": [1], "colour": "red"}, 422, "unknown field"),
        ({"classes": [1], "per_class": 10_000}, 422, "at most"),
    ]
    for body, status, msg in cases:
        r = (httpx.post(server.url("/v1/generate"), content=body, timeout=30) if isinstance(body, str)
             else server.post("/v1/generate", body))
        assert r.status_code == status and msg in r.json()["error"], (body, r.status_code, r.text)
    for body, msg in [({"image": "!!"}, "base64"), ({"image": _png(), "box": [0, 0, 99, 9]}, "box"),
                      ({"image": _png()}, "mask"), ({"image": _png(), "mask": _png(size=(8, 8))}, "size")]:
        r = server.post("/v1/inpaint", body)
        assert r.status_code == 422 and msg in r.json()["error"], (msg, r.text)
    assert server.post("/v1/generate", {"classes": [1], **FAST}).status_code == 200


def _png(size=(40, 48), value=None):
    from PIL import Image
    arr = np.random.RandomState(0).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_inpaint(server):
    r = server.post("/v1/inpaint", {"image": _png(), "box": [0, 0, 16, 32], "variations": 2, "class": "Bag", **FAST})
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 2


def test_observability(server, models):
    assert httpx.get(server.url("/healthz")).json() == {"status": "ok"}
    assert httpx.get(server.url("/readyz")).json() == {"status": "ready"}
    info = httpx.get(server.url("/v1/info")).json()
    assert info["class_names"] == models[0].class_names and info["defaults"]["iters"] == 16
    assert info["limits"]["max_batch"] == 8
    text = httpx.get(server.url("/metrics")).text
    for name in ("bigr_requests_total", "bigr_queue_images", "bigr_batch_images_bucket", "bigr_queue_wait_seconds_sum",
                 "bigr_compute_seconds_count", "bigr_images_total"):
        assert name in text, name
    assert 'endpoint="generate",status="200"' in text
    page = httpx.get(server.url("/"))
    assert page.status_code == 200 and "<canvas" in page.text and httpx.get(server.url("/app.js")).status_code == 200


# ---- a slow or failing model: overload, deadlines, disconnects ------------------------------------------------------

class SlowService(Service):
    """Every model call sleeps `delay` s first; classes [9] make the call raise."""
    delay = 0.5

    def _run(self, key, payloads):
        time.sleep(self.delay)
        if key[0] == "generate" and any(r[0] == 9 for p in payloads for r in p):
            raise RuntimeError("planted failure")
        return super()._run(key, payloads)


def one_at_a_time(service_cls, models):
    """A server of `service_cls` that runs one image at a time, queues two and gives each request 1 s."""
    return Server(service_cls(*models, max_batch=1, max_wait_ms=0, max_queue=2, timeout_s=1.0))


@pytest.fixture
def slow(models):
    s = one_at_a_time(SlowService, models)
    yield s
    s.stop()


def test_overload_sheds_with_429_and_nothing_else_breaks(slow):
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: slow.post("/v1/generate", {"classes": [i % 5], **FAST}), range(8)))
    codes = sorted(a.status_code for a in answers)
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429, 504}, codes
    shed = next(a for a in answers if a.status_code == 429)
    assert int(shed.headers["Retry-After"]) >= 1 and "queue is full" in shed.json()["error"]
    time.sleep(1.0)
    assert slow.post("/v1/generate", {"classes": [1], **FAST}).status_code == 200


class SlowerService(SlowService):
    delay = 1.5   # longer than the deadline by itself, so the second job is still queued when its deadline passes


@pytest.fixture
def slower(models):
    s = one_at_a_time(SlowerService, models)
    yield s
    s.stop()


def test_deadline_gives_504_and_drops_work(slower):
    slow = slower
    before = metric(slow, "bigr_images_total")
    with ThreadPoolExecutor(2) as pool:   # the queue holds 2: one runs, one waits past its deadline
        answers = list(pool.map(lambda i: slow.post("/v1/generate", {"classes": [i], "iters": 16, "steps": 25}),
                                range(2)))
    assert 504 in [a.status_code for a in answers], [(a.status_code, a.text[:80]) for a in answers]
    assert "dropped" in next(a for a in answers if a.status_code == 504).json()["error"]
    time.sleep(2.0)   # the worker skips the abandoned job instead of running it
    dropped = metric(slow, 'bigr_jobs_dropped_total{reason="cancelled"}') + \
        metric(slow, 'bigr_jobs_dropped_total{reason="deadline"}')
    assert dropped >= 1 and metric(slow, "bigr_images_total") - before <= 1


def test_disconnect_drops_work(slow):
    busy = threading.Thread(target=lambda: slow.post("/v1/generate", {"classes": [1], **FAST}))
    busy.start()
    time.sleep(0.1)
    with pytest.raises(httpx.TimeoutException):
        slow.post("/v1/generate", {"classes": [2], **FAST}, timeout=0.2)
    busy.join()
    time.sleep(1.0)
    assert metric(slow, 'bigr_jobs_dropped_total{reason="disconnected"}') >= 1
    assert metric(slow, 'bigr_jobs_dropped_total{reason="cancelled"}') >= 1


def test_a_failing_batch_fails_only_its_requests(slow):
    r = slow.post("/v1/generate", {"classes": [9], **FAST})
    assert r.status_code == 500 and "planted failure" in r.json()["error"]
    assert slow.post("/v1/generate", {"classes": [3], **FAST}).status_code == 200
    assert metric(slow, "bigr_batches_failed_total") == 1


# ---- the batcher alone ----------------------------------------------------------------------------------------------

def test_batcher_limits_and_graceful_close():
    calls = []

    def run(key, payloads):
        time.sleep(0.05)
        calls.append((key, list(payloads)))
        return [p * 10 for p in payloads]
    b = Batcher(run, max_batch=3, max_wait_s=0.2, max_queue=5)
    far = time.monotonic() + 60
    futs = [b.submit(Job(("a",), 1, i, far)) for i in range(4)] + [b.submit(Job(("b",), 1, 7, far))]
    with pytest.raises(QueueFull):
        b.submit(Job(("a",), 1, 99, far))
    b.close()   # finishes what was accepted
    assert [f.result(1) for f in futs] == [0, 10, 20, 30, 70]
    assert all(len(p) <= 3 for _, p in calls) and any(len(p) == 3 for _, p in calls)
    assert {k for k, p in calls if 7 in p} == {("b",)}        # keys never mix
    with pytest.raises(ShuttingDown):
        b.submit(Job(("a",), 1, 0, far))


def test_sigterm_finishes_accepted_requests(tmp_path):
    """`bigr serve` as its own process: a request in flight when SIGTERM arrives is answered; then the server exits."""
    import signal
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "bigr_engine", "serve", "--port", str(port), "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        result = {}
        t = threading.Thread(target=lambda: result.update(
            r=httpx.post(url + "/v1/generate", json={"classes": list(range(10)), "per_class": 2}, timeout=120)))
        t.start()
        time.sleep(0.5)                      # the request is being computed
        proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert result["r"].status_code == 200 and len(result["r"].json()["images"]) == 20
        # uvicorn shuts down gracefully, then re-raises the signal it caught, so the status says SIGTERM
        assert proc.wait(60) in (0, -signal.SIGTERM)
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()

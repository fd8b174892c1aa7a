"""`bigr serve` with a text-to-image model: {"prompt": ...} requests batch together and give each image what
model.generate gives it alone; class requests are refused with a 400 naming the fix (and prompts on a class model)."""
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed (tools/test.sh installs it)")
pytest.importorskip("uvicorn", reason="the serve extra is not installed (tools/test.sh installs it)")
pytest.importorskip("httpx", reason="the serve extra is not installed (tools/test.sh installs it)")
import bigr_engine as be  # noqa: E402
from bigr_engine.io.images import decode_to_uint8  # noqa: E402
from bigr_engine.models.text import pack_condition  # noqa: E402
from bigr_engine.serve.app import Service  # noqa: E402
from python_tests.serve.test_serve import Server  # noqa: E402

L, DIM = 6, 12


class HashEncoder:
    """A stand-in text encoder: each word is a fixed random vector (seeded by its letters), left-padded."""
    max_tokens, dim = L, DIM

    def __call__(self, prompts):
        emb, mask = torch.zeros(len(prompts), L, DIM), torch.zeros(len(prompts), L, dtype=torch.bool)
        for i, p in enumerate(prompts):
            words = (["<s>"] + p.split())[-L:]
            for j, w in enumerate(words):
                g = torch.Generator().manual_seed(sum(ord(ch) * 31 ** k for k, ch in enumerate(w)) % 2 ** 31)
                emb[i, L - len(words) + j] = torch.randn(DIM, generator=g)
                mask[i, L - len(words) + j] = True
        return emb, mask


def text_model_service() -> Service:
    """A small random text model with the HashEncoder and the bundled B-AE, served with batching."""
    _, bae = be.load_default()
    torch.manual_seed(0)
    cfg = be.BiGRConfig(dim=64, n_layer=2, n_head=1, bits=bae.bits, num_tokens=bae.cfg.grid ** 2, num_classes=1,
                        transcoder_blocks=1, transcoder_dim=32, train_steps=16, use_adaln=False, text_dim=DIM,
                        text_tokens=L)
    model = be.BiGR(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.text_encoder = HashEncoder()
    model.transformer.null_text.copy_(pack_condition(*model.text_encoder([""]))[0])
    model.default_sampling = model.default_sampling.replace(iters=4, steps=4)
    return Service(model, bae, max_batch=8, max_wait_ms=300, max_queue=64, timeout_s=60)


@pytest.fixture(scope="module")
def text_server():
    service = text_model_service()
    s = Server(service)
    yield s, service.model, service.bae
    s.stop()


def pixels(answer):
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(im)))) for im in answer.json()["images"]]


def test_prompts_equal_generate_alone(text_server):
    s, model, bae = text_server
    r = s.post("/v1/generate", {"prompt": ["a dark bag", "a light shoe"], "per_class": 2, "seed": 5})
    assert r.status_code == 200, r.text
    assert r.json()["prompts"] == ["a dark bag", "a dark bag", "a light shoe", "a light shoe"]
    got = pixels(r)
    for i, p in enumerate(["a dark bag", "a dark bag", "a light shoe", "a light shoe"]):
        codes = model.generate([p], seed=5, sample_index=[i])
        assert np.array_equal(got[i], decode_to_uint8(bae, codes)[0])
    assert s.post("/v1/generate", {"prompt": "a bag", "seed": 1}).status_code == 200
    assert httpx_get(s, "/v1/info")["text_to_image"] is True


def httpx_get(s, path):
    import httpx
    return httpx.get(s.url(path)).json()


def test_text_server_refuses_classes(text_server):
    s, _, _ = text_server
    r = s.post("/v1/generate", {"classes": [1]})
    assert r.status_code in (400, 422) and 'send "prompt"' in r.json()["error"]
    r = s.post("/v1/generate", {"prompt": [3]})
    assert r.status_code in (400, 422) and '"prompt" must be a string' in r.json()["error"]

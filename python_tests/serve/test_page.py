"""The page of `bigr serve` in headless Chromium (Debian's, installed by tools/browser.sh), driven by Playwright:
pick classes and generate, then take a generated image, draw a rectangle on it and inpaint."""
import contextlib
import shutil

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (tools/test.sh installs it)")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (tools/test.sh installs it)")
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if shutil.os.path.exists("/usr/bin/chromium") else None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium browser (tools/browser.sh installs Debian's)")

import bigr_engine as be  # noqa: E402
from bigr_engine.serve.app import Service  # noqa: E402

from test_serve import Server  # noqa: E402  (the same folder: pytest puts it on sys.path)

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextlib.contextmanager
def open_page(url: str):
    """A headless Chromium page at url -> (page, errors): the page's uncaught script errors, which the caller asserts
    empty at the end."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            yield page, errors
        finally:
            browser.close()


@pytest.fixture(scope="module")
def server():
    s = Server(Service(*be.load_default(), max_batch=8, max_wait_ms=10))
    yield s
    s.stop()


def test_generate_and_inpaint_in_the_page(server, tmp_path):
    with open_page(server.url("/")) as (page, errors):
        page.wait_for_function("document.querySelectorAll('#classes option').length === 10")
        assert "10 classes" in page.inner_text("#model")
        page.select_option("#classes", ["7", "8", "9"])
        page.fill("#iters", "4")
        page.click("#generate")
        page.wait_for_function("document.querySelectorAll('#images img').length === 3", timeout=60_000)
        assert "3 images" in page.inner_text("#generate-status")
        page.click("#images img >> nth=0")
        page.wait_for_timeout(200)
        box = page.locator("#canvas").bounding_box()
        page.mouse.move(box["x"] + 10, box["y"] + 10)
        page.mouse.down()
        page.mouse.move(box["x"] + 150, box["y"] + 200)
        page.mouse.up()
        page.click("#inpaint")
        page.wait_for_function("document.querySelectorAll('#inpaint-results img').length === 4", timeout=120_000)
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        # bad input shows the server's message
        page.fill("#iters", "1000")
        page.click("#generate")
        page.wait_for_function("document.querySelector('#generate-status').className === 'error'")
        assert "iters must be" in page.inner_text("#generate-status")
        assert not errors, errors


@pytest.fixture(scope="module")
def text_server():
    from test_serve_text import text_model_service   # noqa: E402  (the same folder)
    s = Server(text_model_service())
    yield s
    s.stop()


def test_prompts_in_the_page_of_a_text_model(text_server):
    """A text model's page asks for prompts (one per line) instead of classes; an empty box shows the server's 400."""
    with open_page(text_server.url("/")) as (page, errors):
        page.wait_for_function("document.querySelector('#model').textContent.includes('text-to-image')")
        assert page.is_hidden("#classes") and page.is_visible("#prompt")
        assert page.inner_text("#per-label") == "Per prompt"
        page.fill("#prompt", "a dark bag\n\na light sneaker\n")
        page.fill("#per-class", "2")
        page.click("#generate")
        page.wait_for_function("document.querySelectorAll('#images img').length === 4", timeout=60_000)
        assert "4 images" in page.inner_text("#generate-status")
        page.fill("#prompt", "  \n")
        page.click("#generate")
        page.wait_for_function("document.querySelector('#generate-status').className === 'error'")
        assert '"prompt" must be' in page.inner_text("#generate-status")
        assert not errors, errors

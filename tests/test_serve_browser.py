"""The playground page in a real headless browser: Debian's chromium driven by Playwright (Python),
against a live server with the tiny model. Skipped when either is missing. GPT2_SCREENSHOT=path
saves the screenshot there too (docs/serve-playground.png was made that way)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")

from gpt2 import GPT, GPTConfig  # noqa: E402
from gpt2.serve.server import ServeConfig, ServerThread, build_service, warm_up  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Without the background-networking flags Chromium tries to reach Google's services at start-up,
# and on a closed network those connections are refused.
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no chromium installed (apt-get install chromium)"),
]


def test_playground_streams_text(tmp_path):
    torch.manual_seed(0)
    service = build_service(GPT(GPTConfig.from_name("tiny")).eval(), "tiny", ServeConfig(max_batch=4))
    warm_up(service)
    shots = [tmp_path / "playground.png"]
    if os.environ.get("GPT2_SCREENSHOT"):
        shots.append(Path(os.environ["GPT2_SCREENSHOT"]))
    with ServerThread(service) as url, sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            args=ARGS,
            headless=True,
            viewport={"width": 1100, "height": 640},
        )
        try:
            page = context.new_page()
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
            page.fill("#prompt", "Once upon a time")
            page.fill("#max_tokens", "40")
            page.fill("#seed", "1")
            page.fill("#repetition_penalty", "1.3")
            page.fill("#presence_penalty", "0.5")
            with page.expect_request(lambda r: r.url.endswith("/v1/completions")) as sent:
                page.click("#go")
            body = sent.value.post_data_json  # the penalties set away from neutral go; the others do not
            assert (body["repetition_penalty"], body["presence_penalty"]) == (1.3, 0.5)
            assert "frequency_penalty" not in body and "min_p" not in body
            page.wait_for_function("document.getElementById('stats').textContent.includes('40 tokens')", timeout=20000)
            page.wait_for_function("!document.getElementById('go').disabled")
            completion = page.text_content("#completion")
            stats = page.text_content("#stats")
            assert len(completion) > 20 and page.text_content("#error") == ""
            assert "tokens/s" in stats and "first token after" in stats
            for shot in shots:
                page.screenshot(path=str(shot))
        finally:
            context.close()


def _page_server(tmp_path):
    """A page on another origin (another port): a static file server in a thread."""
    import functools
    import http.server
    import threading

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("<!doctype html><title>another origin</title><p>app</p>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "site"))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


CALL = """async ([api, key]) => {
  try {
    const r = await fetch(api + "/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Authorization": "Bearer " + key },
      body: JSON.stringify({ messages: [{ role: "user", content: "Hi" }], max_tokens: 3 }),
    });
    const body = await r.json();
    return { status: r.status, object: body.object || null };
  } catch (e) {
    return { error: String(e) };
  }
}"""


def test_a_page_on_another_origin_calls_the_api_through_cors(tmp_path):
    """JSON + Authorization make the browser send a preflight OPTIONS first: with --allowed-origins
    set to the page's origin the call succeeds; without it the browser blocks it."""
    from gpt2.serve.config import HTTPConfig

    httpd, origin = _page_server(tmp_path)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny")).eval()
    allowed = build_service(
        model, "tiny", ServeConfig(max_batch=2), HTTPConfig(api_keys=("k",), allowed_origins=(origin,))
    )
    closed = build_service(model, "tiny", ServeConfig(max_batch=2), HTTPConfig(api_keys=("k",)))
    try:
        with ServerThread(allowed) as api, ServerThread(closed) as other, sync_api.sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=CHROMIUM, args=ARGS, headless=True
            )
            try:
                page = context.new_page()
                page.goto(origin + "/")
                assert page.evaluate(CALL, [api, "k"]) == {"status": 200, "object": "chat.completion"}
                assert page.evaluate(CALL, [api, "wrong"]) == {"status": 403, "object": None}  # readable error
                blocked = page.evaluate(CALL, [other, "k"])
                assert "Failed to fetch" in blocked.get("error", ""), blocked
            finally:
                context.close()
    finally:
        httpd.shutdown()

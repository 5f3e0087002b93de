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
            page.click("#go")
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

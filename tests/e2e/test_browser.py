"""The web chat page in Debian's headless chromium (Playwright): a streamed, multi-turn chat, then New chat."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Records every length the last reply's text takes while it streams.
WATCH_REPLY = """() => {
  window.replyLengths = [];
  new MutationObserver(() => {
    const replies = document.querySelectorAll('.message.assistant .text');
    if (replies.length) window.replyLengths.push(replies[replies.length - 1].textContent.length);
  }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def server(tiny_vicuna):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "vicunaflow", "serve", "--model-path", str(tiny_vicuna), "--port", str(port)]
    # short replies keep the test quick; long enough to arrive in many pieces
    process = subprocess.Popen([*cmd, "--default-max-tokens", "48", "--max-context", "512"], env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.3)
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(skip_or_fail):
    if not Path(CHROMIUM).exists():
        skip_or_fail(f"{CHROMIUM} missing: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def test_streamed_multi_turn_chat_and_new_chat(server, browser):
    page = browser.new_page()
    sent_bodies = []
    page.on(
        "request",
        lambda r: sent_bodies.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else None,
    )
    page.goto(server)
    page.wait_for_selector("#model:not(:empty)")
    page.evaluate(WATCH_REPLY)

    page.fill("#input", "Hello, who are you?")
    page.press("#input", "Enter")
    page.wait_for_selector('.message.assistant[data-streaming="false"]', timeout=60_000)
    reply = page.inner_text(".message.assistant .text")
    lengths = page.evaluate("window.replyLengths")
    assert reply.strip() and page.locator(".message.error").count() == 0
    assert len(set(lengths)) >= 3 and lengths == sorted(lengths), lengths  # grew piece by piece while streaming
    assert page.inner_text(".message.user .text") == "Hello, who are you?"

    page.fill("#input", "Tell me more.")
    page.click("#send")
    page.wait_for_function(
        "document.querySelectorAll('.message.assistant[data-streaming=\"false\"]').length == 2", timeout=60_000
    )
    assert [m["role"] for m in sent_bodies[-1]["messages"]] == ["user", "assistant", "user"]  # multi-turn
    assert sent_bodies[-1]["stream"] is True

    page.click("#new-chat")
    assert page.locator(".message").count() == 0
    page.fill("#input", "Fresh start")
    page.press("#input", "Enter")
    page.wait_for_selector('.message.assistant[data-streaming="false"]', timeout=60_000)
    assert [m["role"] for m in sent_bodies[-1]["messages"]] == ["user"]  # history forgotten
    page.close()

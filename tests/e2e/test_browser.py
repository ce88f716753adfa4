"""The web chat and arena pages in Debian's headless chromium (Playwright), against one real two-model server.

Chat: a streamed multi-turn chat and New chat, settings that reach the server (its log line of the
request), Stop cancelling the engine request, Regenerate, model output shown as text (never HTML),
the conversation kept across a reload, a refused key, a phone-sized screen, New chat while a reply
streams, a long reply read from its start while it streams. Arena: two anonymous
streams, a vote, the names revealed and the vote line written.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from test_serve import start_server  # tests/ is on sys.path (its conftest's folder)

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KEY = "browser-key"
CHAT_MODEL = "vicuna-tiny-all-v1.1"  # the first --model-path: the chat page's default
MODELS = {CHAT_MODEL, "llama-tiny-hf"}

# Records every length the last reply's text takes while it streams (data-chars: the raw text's length,
# as the markdown view may hide characters such as ** while it is re-rendered).
WATCH_REPLY = """() => {
  window.replyLengths = [];
  new MutationObserver(() => {
    const replies = document.querySelectorAll('.message.assistant .text');
    const last = replies[replies.length - 1];
    // while it streams: the finished reply is stored trimmed and drawn again, which may end a character shorter
    if (last && last.closest('.message').dataset.streaming === 'true') window.replyLengths.push(Number(last.dataset.chars || 0));
  }).observe(document.getElementById('messages'), {subtree: true, childList: true, attributes: true});
}"""
DONE = '.message.assistant[data-streaming="false"]'
WATCH_SIDES = """() => {
  window.mostStreaming = 0;
  new MutationObserver(() => {
    const streaming = document.querySelectorAll('.side .message[data-streaming="true"]').length;
    window.mostStreaming = Math.max(window.mostStreaming, streaming);
  }).observe(document.body, {subtree: true, attributes: true, attributeFilter: ['data-streaming']});
}"""


class Server:
    def __init__(self, url: str, log: Path, results: Path):
        self.url, self.log, self.results = url, log, results

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", headers={"Authorization": f"Bearer {KEY}"}).json()  # per model

    def request_lines(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if "request: model=" in line]


@pytest.fixture(scope="module")
def server(tiny_vicuna, tiny_hf, tmp_path_factory):
    """Two models on the CPU (start_server's default on any machine: the Stop test's timing is the CPU's)."""
    folder = tmp_path_factory.mktemp("browser-server")
    args = ["--api-key", KEY, "--model-path", str(tiny_hf), "--results-dir", str(folder / "results")]
    # short replies keep the test quick; long enough to arrive in many pieces. A long context lets Stop
    # catch a reply of ~1900 tokens before it ends.
    args += ["--default-max-tokens", "48", "--max-context", "2048", "--max-batch-size", "4"]
    log = folder / "server.log"
    process, url = start_server(tiny_vicuna, *args, log=log)
    yield Server(url, log, folder / "results")
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


def new_page(browser, key: str = KEY, **context_options):
    """A page in a fresh context (empty localStorage) whose API key field holds `key`."""
    context = browser.new_context(**context_options)
    context.add_init_script(f"if (!localStorage.getItem('vicunaflow-api-key')) localStorage.setItem('vicunaflow-api-key', {json.dumps(key)})")  # fmt: skip
    page = context.new_page()
    page.sent = []  # the JSON bodies the page posted to the chat route
    page.on(
        "request",
        lambda r: page.sent.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else None,
    )
    return page


def open_chat(page, server: Server) -> None:
    page.goto(server.url)
    page.wait_for_selector("#model:not(:empty)")


def ask(page, text: str, count: int = 1) -> str:
    """Send with Enter and wait for the count-th finished answer; return its text."""
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function(
        f"document.querySelectorAll('{DONE}').length == {count} && !document.querySelector('[data-streaming=\"true\"]')",
        timeout=60_000,
    )
    return page.locator(".message.assistant .text").nth(count - 1).inner_text()


def test_streamed_multi_turn_chat_and_new_chat(server, browser):
    page = new_page(browser)
    open_chat(page, server)
    page.evaluate(WATCH_REPLY)

    reply = ask(page, "Hello, who are you?")
    lengths = page.evaluate("window.replyLengths")
    assert reply.strip() and page.locator(".message.error").count() == 0
    assert len(set(lengths)) >= 3 and lengths == sorted(lengths), lengths  # grew piece by piece while streaming
    assert page.inner_text(".message.user .text") == "Hello, who are you?"

    page.fill("#input", "Tell me more.")
    page.click("#send")
    page.wait_for_function(f"document.querySelectorAll('{DONE}').length == 2", timeout=60_000)
    assert [m["role"] for m in page.sent[-1]["messages"]] == ["user", "assistant", "user"]  # multi-turn
    assert page.sent[-1]["stream"] is True and page.sent[-1]["model"] == CHAT_MODEL

    page.fill("#input", "first line")
    page.press("#input", "Shift+Enter")  # a new line, not a message
    page.type("#input", "second line")
    assert page.input_value("#input") == "first line\nsecond line" and len(page.sent) == 2

    page.click("#new-chat")
    assert page.locator(".message").count() == 0
    ask(page, "Fresh start")
    assert [m["role"] for m in page.sent[-1]["messages"]] == ["user"]  # history forgotten
    page.context.close()


def test_settings_reach_the_server(server, browser):
    page = new_page(browser)
    open_chat(page, server)
    page.click("#settings-toggle")
    assert page.get_attribute("#settings-toggle", "aria-expanded") == "true"
    page.fill("#temperature", "0.3")
    page.fill("#top-p", "0.8")
    page.fill("#max-tokens", "7")
    page.fill("#system-prompt", "You are a terse test bot.")
    page.press("#system-prompt", "Tab")  # change events
    before = len(server.request_lines())
    ask(page, "Hi there")
    sent = page.sent[-1]
    assert (sent["temperature"], sent["top_p"], sent["max_tokens"]) == (0.3, 0.8, 7)
    assert sent["messages"][0] == {"role": "system", "content": "You are a terse test bot."}
    lines = server.request_lines()[before:]
    assert len(lines) == 1, lines
    assert f"model={CHAT_MODEL} " in lines[0] and "temperature=0.3 top_p=0.8 max_new_tokens=7 " in lines[0], lines
    assert "system=custom stream=True" in lines[0], lines
    page.reload()
    page.wait_for_selector("#model:not(:empty)")
    assert page.input_value("#temperature") == "0.3" and page.input_value("#max-tokens") == "7"  # kept
    page.context.close()


def start_a_long_reply(page, close_settings: bool = False) -> None:
    """Ask for a reply that runs to 1,900 tokens and wait until its first text is shown."""
    page.click("#settings-toggle")
    page.fill("#temperature", "0")  # greedy: the tiny model runs to max_tokens without an end token
    page.fill("#max-tokens", "1900")
    page.press("#max-tokens", "Tab")
    if close_settings:
        page.click("#settings-toggle")
    page.fill("#input", "Tell me everything")
    page.press("#input", "Enter")
    page.wait_for_function("Number(document.querySelector('.message.assistant .text').dataset.chars || 0) > 0")


def test_stop_cancels_the_engine_request(server, browser):
    page = new_page(browser)
    open_chat(page, server)
    before = server.health()["engines"][CHAT_MODEL]
    start_a_long_reply(page)
    assert page.is_visible("#stop")
    page.click("#stop")
    page.wait_for_selector(DONE)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = server.health()["engines"][CHAT_MODEL]
        if stats["cancelled"] > before["cancelled"] and stats["active"] == 0:
            break
        time.sleep(0.1)
    assert stats["cancelled"] == before["cancelled"] + 1 and stats["active"] == 0, stats
    assert stats["decode_tokens"] - before["decode_tokens"] < 1800  # stopped well before its 1900 tokens
    assert page.inner_text("#status") == "stopped" and page.is_hidden("#stop")
    assert "(stopped)" in page.inner_text(".message.assistant")  # the partial answer stays, marked
    page.context.close()


def test_regenerate_replaces_the_last_answer(server, browser):
    page = new_page(browser)
    open_chat(page, server)
    ask(page, "Who are you?")
    page.click("#regenerate")  # the answer is removed and a new one streams at once (no await before)
    page.wait_for_function(
        f"document.querySelectorAll('{DONE}').length == 1 && !document.querySelector('[data-streaming=\"true\"]')",
        timeout=60_000,
    )
    assert len(page.sent) == 2
    assert page.sent[1]["messages"] == page.sent[0]["messages"] == [{"role": "user", "content": "Who are you?"}]
    assert page.locator(".message.user").count() == 1 and page.locator(".message.assistant").count() == 1
    stored = page.evaluate("JSON.parse(localStorage.getItem('vicunaflow-conversation'))")
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[1]["content"]
    page.context.close()


INJECTION = (
    'Try <script>window.pwned = 1</script> and <img src=x onerror="window.pwned = 2"> or '
    "[click](javascript:window.pwned=3) and [docs](https://example.org/a).\n\n"
    "**bold** and `<b>code</b>`:\n\n```html\n<script>window.pwned = 4</script>\n```\n- one\n- two"
)


def sse(*pieces: str) -> str:
    chunks = [{"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def test_model_output_is_shown_as_text_never_html(server, browser):
    page = new_page(browser)
    page.route(  # the "model" answers with markup, in pieces that split the tags
        "**/v1/chat/completions",
        lambda route: route.fulfill(
            status=200, headers={"Content-Type": "text/event-stream"}, body=sse(INJECTION[:13], INJECTION[13:40], INJECTION[40:])
        ),
    )  # fmt: skip
    open_chat(page, server)
    ask(page, '<img src=y onerror="window.pwned = 5">')  # the user's own text too

    def check():
        messages = page.locator("#messages")
        assert page.evaluate("window.pwned") is None
        assert messages.locator("img, script, b").count() == 0  # none became an element
        text = page.inner_text(".message.assistant .text")
        assert "<script>window.pwned = 1</script>" in text and '<img src=x onerror="window.pwned = 2">' in text
        assert page.inner_text(".message.user .text") == '<img src=y onerror="window.pwned = 5">'
        links = messages.locator(".message.assistant a")
        assert links.count() == 1 and links.get_attribute("href") == "https://example.org/a"
        assert "[click](javascript:window.pwned=3)" in text  # an unsafe scheme stays text
        assert page.inner_text(".message.assistant strong") == "bold"
        assert page.inner_text(".message.assistant p code") == "<b>code</b>"
        assert page.inner_text(".code-block pre code") == "<script>window.pwned = 4</script>"
        assert page.locator(".code-block button.copy").count() == 1
        assert page.locator(".message.assistant li").count() == 2

    check()
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.click(".code-block button.copy")
    assert page.evaluate("navigator.clipboard.readText()") == "<script>window.pwned = 4</script>"
    page.click(".message.assistant .actions button.copy")
    assert page.evaluate("navigator.clipboard.readText()") == INJECTION  # the raw markdown
    page.reload()  # from localStorage: rendered the same way
    page.wait_for_selector(DONE)
    check()
    page.context.close()


def test_reload_keeps_the_conversation(server, browser):
    page = new_page(browser)
    open_chat(page, server)
    answer = ask(page, "Remember me")
    page.reload()
    page.wait_for_selector(DONE)
    assert page.inner_text(".message.user .text") == "Remember me"
    assert page.inner_text(".message.assistant .text") == answer
    ask(page, "And now?", count=2)  # the next question carries the restored history
    assert [m["role"] for m in page.sent[-1]["messages"]] == ["user", "assistant", "user"]
    page.context.close()


def test_refused_key_shows_a_message(server, browser):
    page = new_page(browser, key="wrong-key")
    open_chat(page, server)
    page.fill("#input", "Hello?")
    page.press("#input", "Enter")
    error = page.wait_for_selector(".message.error")
    assert "API key" in error.inner_text() and "401" in error.inner_text()
    assert error.get_attribute("role") == "alert"
    assert page.is_visible("#api-key") and page.evaluate("document.activeElement.id") == "api-key"
    page.fill("#api-key", KEY)
    page.press("#api-key", "Tab")
    page.click("#regenerate")  # the unanswered question is asked again with the right key
    page.wait_for_selector(DONE, timeout=60_000)
    assert page.locator(".message.user").count() == 1
    page.context.close()


def test_too_long_a_conversation_says_so(server, browser):
    page = new_page(browser)
    open_chat(page, server)
    page.fill("#input", "word " * 2500)  # past the 2048-token context
    page.press("#input", "Enter")
    error = page.wait_for_selector(".message.error").inner_text()
    assert "too long for this model" in error and "maximum context length is 2048 tokens" in error, error
    assert "New chat" in error or "new chat" in error
    page.context.close()


def test_phone_sized_screen(server, browser):
    page = new_page(browser, viewport={"width": 375, "height": 667}, is_mobile=True, has_touch=True)
    open_chat(page, server)
    page.click("#settings-toggle")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375  # nothing wider than the screen
    for selector in ("#input", "#send", "#regenerate", "#temperature", "#system-prompt", "#new-chat"):
        box = page.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 375 and box["y"] + box["height"] <= 667, selector
    page.click("#settings-toggle")
    ask(page, "Hi from a phone")
    box = page.locator(".message.assistant").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 375
    page.keyboard.press("Tab")  # keyboard: focus moves on, with a visible outline
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none", page.evaluate("document.activeElement.outerHTML")
    page.context.close()


def test_arena_two_anonymous_streams_then_a_vote(server, browser):
    page = new_page(browser)
    page.goto(f"{server.url}/arena")
    page.evaluate(WATCH_SIDES)
    page.fill("#input", "Name a color")
    page.press("#input", "Enter")
    page.wait_for_selector("#votes:not([hidden])", timeout=60_000)
    assert page.evaluate("window.mostStreaming") == 2  # both streamed at once (seen whatever the machine's speed)
    answers = {side: page.inner_text(f"#side-{side} .text") for side in ("left", "right")}
    assert all(answers.values()), answers
    body = page.inner_text("body")
    assert not any(model in body for model in MODELS), body  # anonymous until the vote
    assert page.inner_text("#name-left") == "Model A" and page.inner_text("#name-right") == "Model B"

    page.click("#votes button[data-vote=left]")
    page.wait_for_selector("#name-left.revealed")
    revealed = {side: page.inner_text(f"#name-{side}").split(": ", 1)[1] for side in ("left", "right")}
    assert set(revealed.values()) == MODELS

    lines = (server.results / "arena_votes.jsonl").read_text().splitlines()
    assert len(lines) == 1
    vote = json.loads(lines[0])
    assert vote["vote"] == "left" and vote["prompt"] == "Name a color"
    assert (vote["model_left"], vote["model_right"]) == (revealed["left"], revealed["right"])
    assert vote["answer_left"] and vote["answer_right"] and vote["conversation_id"] and vote["tstamp"] > 0
    assert page.is_disabled("#votes button[data-vote=right]")  # one vote a battle

    page.click("#new-round")
    assert page.inner_text("#name-left") == "Model A" and page.is_enabled("#input")
    page.context.close()


def test_new_chat_while_answering_starts_empty(server, browser):
    """Was: New chat aborted the stream, then the stopped partial answer was pushed into the new, empty
    conversation (an assistant message with no question, stored and sent with the next question)."""
    page = new_page(browser)
    open_chat(page, server)
    start_a_long_reply(page)
    page.click("#new-chat")
    page.wait_for_selector("#stop", state="hidden")
    page.wait_for_timeout(300)  # the aborted fetch settles
    assert page.locator(".message").count() == 0, page.inner_text("#messages")
    assert page.evaluate("JSON.parse(localStorage.getItem('vicunaflow-conversation'))") == []
    assert page.inner_text("#status") == "new conversation"
    ask(page, "Fresh start")
    assert [m["role"] for m in page.sent[-1]["messages"]] == ["user"]
    page.context.close()


def test_a_long_reply_lets_the_reader_scroll_up(server, browser):
    """Was: every streamed piece set the conversation's scroll to the bottom, so the start of a long reply
    could not be read while the rest arrived. Scrolled up, it stays put; at the bottom, it follows."""
    page = new_page(browser, viewport={"width": 800, "height": 500})
    open_chat(page, server)
    start_a_long_reply(page, close_settings=True)
    taller = "(() => { const m = document.getElementById('messages'); return m.scrollHeight > m.clientHeight + %d; })()"
    page.wait_for_function(taller % 100, timeout=60_000)
    bottom = "(() => { const m = document.getElementById('messages'); return m.scrollHeight - m.scrollTop - m.clientHeight; })()"  # fmt: skip
    assert page.evaluate(bottom) < 40  # it followed the reply so far
    page.evaluate("document.getElementById('messages').scrollTop = 0")
    chars = page.evaluate("Number(document.querySelector('.message.assistant .text').dataset.chars)")
    page.wait_for_function(
        f"Number(document.querySelector('.message.assistant .text').dataset.chars) > {chars} + 200", timeout=60_000
    )
    assert page.evaluate("document.getElementById('messages').scrollTop") == 0  # the reader stays where they are
    page.click("#stop")
    page.wait_for_selector(DONE)
    assert page.evaluate("document.getElementById('messages').scrollTop") == 0  # drawn again, not moved
    page.context.close()


def arena_routes(page, chat_body: str, hold: dict | None = None) -> None:
    """Answers the arena's API in the page itself: battle "b1", both sides `chat_body`; a route named in
    `hold` ("chat", "vote") is kept unanswered in hold[name] until the test fulfils it."""
    page.route(
        "**/arena/battles",
        lambda route: route.fulfill(status=200, headers={"Content-Type": "application/json"}, body='{"id": "b1"}'),
    )
    event_stream = {"Content-Type": "text/event-stream"}
    page.route(
        "**/arena/battles/b1/chat/*",
        lambda route: (
            hold.setdefault("chat", []).append(route)
            if hold is not None and "chat" in hold
            else route.fulfill(status=200, headers=event_stream, body=chat_body)
        ),
    )
    page.route(
        "**/arena/battles/b1/vote",
        lambda route: (
            hold.setdefault("vote", []).append(route)
            if hold is not None and "vote" in hold
            else route.fulfill(status=200, headers={"Content-Type": "application/json"}, body="{}")
        ),
    )


def wait_for_held(page, held: list, timeout_s: float = 30) -> None:
    """Let the page's events run until a request has reached its held route (arena_routes): a fixed 200 ms pause
    lost that race on a loaded 2-core CI machine."""
    deadline = time.monotonic() + timeout_s
    while not held:
        assert time.monotonic() < deadline, f"no request reached the held route in {timeout_s} s"
        page.wait_for_timeout(20)


def test_arena_new_round_while_answering_starts_clean(server, browser):
    """Was: New round aborted the streams, then the old battle's ending wrote its "stopped: ..." status
    over the new round."""
    page = new_page(browser)
    hold = {"chat": []}
    arena_routes(page, sse("hi"), hold)
    page.goto(f"{server.url}/arena")
    page.fill("#input", "Name a color")
    page.press("#input", "Enter")
    page.wait_for_selector('.side .message[data-streaming="true"]')
    page.click("#new-round")
    page.wait_for_selector("#stop", state="hidden")
    page.wait_for_timeout(300)  # the aborted fetches settle
    assert page.inner_text("#status") == ""
    assert page.is_hidden("#votes") and page.is_enabled("#input") and page.is_enabled("#send")
    page.context.close()


def test_arena_vote_answered_after_new_round_reveals_nothing(server, browser):
    """Was: a vote still in flight when New round was clicked, once answered, showed the old battle's
    model names over the new round's anonymous sides."""
    page = new_page(browser)
    hold = {"vote": []}
    arena_routes(page, sse("an ", "answer"), hold)
    page.goto(f"{server.url}/arena")
    page.fill("#input", "Name a color")
    page.press("#input", "Enter")
    page.wait_for_selector("#votes:not([hidden])")
    page.click("#votes button[data-vote=left]")
    wait_for_held(page, hold["vote"])
    assert len(hold["vote"]) == 1
    page.click("#new-round")
    hold["vote"][0].fulfill(
        status=200,
        headers={"Content-Type": "application/json"},
        body=json.dumps({"models": {"left": "old-left", "right": "old-right"}}),
    )
    page.wait_for_timeout(300)
    assert page.inner_text("#name-left") == "Model A" and page.inner_text("#name-right") == "Model B"
    assert page.locator(".revealed").count() == 0 and page.inner_text("#status") == ""
    page.context.close()


def test_arena_an_answer_failing_mid_stream_says_why(server, browser):
    """Was: when a side's stream failed in the same frame as its last piece of text, the pending redraw
    of that text wiped the error message from the side."""
    page = new_page(browser)
    failing = sse("partial answer").replace("data: [DONE]\n\n", 'data: {"error": {"message": "engine fell over"}}\n\n')
    arena_routes(page, failing)
    page.goto(f"{server.url}/arena")
    page.fill("#input", "Name a color")
    page.press("#input", "Enter")
    page.wait_for_function("document.getElementById('status').textContent.includes('failed')")
    page.wait_for_timeout(300)  # a few frames: any pending redraw has run
    for side in ("left", "right"):
        text = page.inner_text(f"#side-{side} .text")
        assert "partial answer" in text and "engine fell over" in text, text
    assert page.is_hidden("#votes")
    page.context.close()

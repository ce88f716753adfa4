"""Many users at once through the real HTTP server (issue 16, CPU CI): 128 streams on the tiny Vicuna.

Every stream must finish, none may be lost, and each one's text must be complete and in order: the
same greedy requests sent one at a time are the reference (batching must not change a reply). A
stub engine that emits a whole reply at once checks the path where many events of one stream are
written as one chunk.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from types import SimpleNamespace

import httpx
import pytest
from test_serve import start_server  # tests/ is on sys.path

from vicunaflow.engine import Event
from vicunaflow.serve.app import create_app

STREAMS = 128
REPLY_TOKENS = 16


@pytest.fixture(scope="module")
def server(tiny_vicuna):
    process, url = start_server(tiny_vicuna, "--max-context", "256", "--max-batch-size", str(STREAMS), "--seed", "0")
    yield url
    process.terminate()
    process.wait(timeout=30)


def prompts() -> list[list[int]]:
    """Distinct token-id prompts of different lengths (BOS, then ordinary pieces of the 1024-piece vocabulary)."""
    rng = random.Random(16)
    return [[1] + [rng.randrange(300, 1024) for _ in range(rng.randrange(4, 40))] for _ in range(STREAMS)]


async def stream(client: httpx.AsyncClient, url: str, prompt: list[int]) -> dict:
    """One streamed completion read event by event: its text, finish reason and whether [DONE] came."""
    body = {
        "model": "vicuna-tiny-all-v1.1",
        "prompt": prompt,
        "max_tokens": REPLY_TOKENS,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    reply = {"status": None, "text": "", "finish": None, "done": False, "after_done": 0}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        reply["status"] = response.status_code
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if reply["done"]:
                reply["after_done"] += 1
            elif data == "[DONE]":
                reply["done"] = True
            else:
                choice = json.loads(data)["choices"][0]
                assert reply["finish"] is None, "text after the finishing chunk"
                reply["text"] += choice["text"]
                reply["finish"] = choice["finish_reason"]
    return reply


async def run(url: str, requests: list[list[int]], at_once: bool) -> list[dict]:
    limits = httpx.Limits(max_connections=len(requests) + 4, max_keepalive_connections=len(requests) + 4)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(120.0)) as client:
        if at_once:
            return list(await asyncio.gather(*(stream(client, url, p) for p in requests)))
        return [await stream(client, url, p) for p in requests]


@pytest.mark.timeout(180)
def test_128_concurrent_streams_all_finish_complete_and_in_order(server):
    requests = prompts()
    one_at_a_time = asyncio.run(run(server, requests, at_once=False))
    together = asyncio.run(run(server, requests, at_once=True))

    engine = httpx.get(f"{server}/health").json()["engine"]
    assert engine["max_batch"] >= STREAMS // 2, f"the streams did not run together: {engine['batch_sizes']}"
    assert engine["active"] == 0 and engine["waiting"] == 0
    for i, (alone, batched) in enumerate(zip(one_at_a_time, together, strict=True)):
        for reply in (alone, batched):
            assert reply["status"] == 200 and reply["done"] and reply["after_done"] == 0, (i, reply)
            assert reply["finish"] == "length", (i, reply)
        assert batched["text"] == alone["text"], f"stream {i}: batched reply differs from the one run alone"
    assert len({r["text"] for r in together}) > STREAMS // 2, "replies should differ between prompts"


class WordTokenizer:
    """Token id n is the word "w<n> "; BOS 1, EOS 2."""

    bos_token_id, eos_token_id, all_special_ids = 1, 2, [1, 2]

    def __call__(self, text: str, add_special_tokens: bool = False, verbose: bool = True):
        return type("Encoded", (), {"input_ids": [len(word) for word in text.split()]})

    def decode(self, ids, **kwargs) -> str:
        return "".join(f"w{i} " for i in ids)


class BurstEngine:
    """Emits a whole reply from a thread without pausing, so the event loop receives many events of
    one stream at once and writes them as one chunk (the path a stream that fell behind takes)."""

    context = 4096

    def __init__(self, words: int):
        self.words, self.tokenizer = words, WordTokenizer()
        self.model = SimpleNamespace(args=SimpleNamespace(vocab_size=32000))

    def max_new_tokens(self, prompt_length: int, requested: int | None) -> int:
        return requested or self.words

    def snapshot_stats(self) -> dict:
        return {"context": self.context}

    def submit(self, prompt_ids, params, sink):
        request = SimpleNamespace(id=0, done=False, completion_tokens=0, cancel=lambda: None)

        def run():
            for n in range(1, self.words):
                sink(Event(f"w{n} "))
            sink(Event(f"w{self.words} ", finish_reason="length", completion_tokens=self.words))
            request.done = True

        threading.Thread(target=run, daemon=True).start()
        return request


def sse_payloads(body: str) -> list:
    events = [e.removeprefix("data: ") for e in body.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_a_burst_of_events_streams_complete_in_order_and_as_openai_chunks(route):
    """Hundreds of events arriving at once: every word once, in order; each chunk is exactly the JSON
    the per-event rendering made before the template (same fields, same values)."""
    words = 300
    app = create_app({"burst": BurstEngine(words)})
    if route == "completions":
        body = {"model": "burst", "prompt": [1, 5, 6], "max_tokens": words, "stream": True}
    else:
        body = {"model": "burst", "messages": [{"role": "user", "content": "hi"}], "stream": True}

    async def post() -> str:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post(f"/v1/{'chat/' if route == 'chat' else ''}completions", json=body)
            assert response.status_code == 200, response.text
            return response.text

    chunks = sse_payloads(asyncio.run(post()))
    fields = {k: chunks[0][k] for k in ("id", "object", "created", "model")}
    assert fields["model"] == "burst"
    if route == "chat":
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        chunks = chunks[1:]
    texts = []
    for chunk in chunks[:-1]:
        assert {k: chunk[k] for k in fields} == fields
        (choice,) = chunk["choices"]
        text = choice["text"] if route == "completions" else choice["delta"]["content"]
        expected = {"index": 0, "logprobs": None, "finish_reason": None}
        expected |= {"text": text} if route == "completions" else {"delta": {"content": text}}
        assert choice == expected
        texts.append(text)
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "length"
    texts.append(last.get("text") or "")
    assert "".join(texts) == "".join(f"w{n} " for n in range(1, words + 1))


def test_every_event_posted_after_the_loop_closed_raises_so_each_request_is_cancelled():
    """Once its event loop has closed, the relay must refuse every later event, not only the first: each
    request's sink cancels that request when posting fails (nobody reads its stream any more)."""
    from vicunaflow.serve.app import _Inbox, _Relay

    loop = asyncio.new_event_loop()
    relay = _Relay(loop)
    loop.close()
    for _ in range(2):  # two requests' events, from the engine thread
        with pytest.raises(RuntimeError):
            relay.post(_Inbox(), Event("token"))

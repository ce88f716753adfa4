"""Many users at once through the real HTTP server (issue 16, CPU CI): 128 streams on the tiny Vicuna.

Every stream must finish, none may be lost, and each one's text must be complete and in order: the
same greedy requests sent one at a time are the reference (batching must not change a reply).
"""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest
from test_serve import start_server  # tests/ is on sys.path

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

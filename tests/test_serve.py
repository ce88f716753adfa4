"""The OpenAI-compatible server, driven by the official `openai` client over 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

KEY = "test-key"
CONTEXT = 256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_path, *args: str, env: dict | None = None, timeout: float = 180):
    """`vicunaflow serve` in a subprocess; returns (process, base_url) once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "vicunaflow", "serve", "--model-path", str(model_path), "--port", str(port), *args]
    process = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stdout.read().decode(errors='replace')}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError("server did not start")


@pytest.fixture(scope="module")
def server(tiny_vicuna):
    # Keys from the environment (the flag is tested in test_api_key_flag); several, comma-separated.
    process, url = start_server(
        tiny_vicuna,
        "--max-context",
        str(CONTEXT),
        "--max-batch-size",
        "16",
        env={"VICUNAFLOW_API_KEYS": f"other,{KEY}"},
    )
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def model_id(client) -> str:
    return client.models.list().data[0].id


def engine_stats(server) -> dict:
    return httpx.get(f"{server}/health").json()["engine"]


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["vicuna-tiny-all-v1.1"]
    assert client.models.retrieve("vicuna-tiny-all-v1.1").id == "vicuna-tiny-all-v1.1"


def test_chat_plain_and_streamed_agree(client):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Who are you?"},
    ]
    plain = client.chat.completions.create(model=model_id(client), messages=messages, temperature=0, max_tokens=12)
    reply = plain.choices[0].message
    assert reply.role == "assistant" and reply.content
    assert plain.usage.completion_tokens <= 12 and plain.usage.prompt_tokens > 10
    stream = client.chat.completions.create(
        model=model_id(client),
        messages=messages,
        temperature=0,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # several SSE events, not one
    assert "".join(pieces) == reply.content  # greedy: the same reply streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_completions(client):
    result = client.completions.create(model=model_id(client), prompt="Once upon a time", max_tokens=10, temperature=0)
    assert result.choices[0].text and result.usage.completion_tokens <= 10
    streamed = client.completions.create(
        model=model_id(client), prompt="Once upon a time", max_tokens=10, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == result.choices[0].text


def test_wrong_or_missing_key_is_401(server):
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.models.list()
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    assert httpx.post(f"{server}/v1/chat/completions", json={}).status_code == 401


def test_malformed_bodies_are_4xx_and_server_keeps_serving(server, client):
    headers = {"Authorization": f"Bearer {KEY}"}
    bad_bodies = [b"{not json", b"[1, 2]", b'{"model": "vicuna-tiny-all-v1.1"}', b'{"model": "x", "messages": "hi"}']
    for body in bad_bodies:
        response = httpx.post(f"{server}/v1/chat/completions", content=body, headers=headers)
        assert response.status_code == 400, body
        assert response.json()["error"]["type"] == "invalid_request_error"
    response = httpx.post(
        f"{server}/v1/chat/completions",
        headers=headers,
        json={"model": "vicuna-tiny-all-v1.1", "messages": [{"role": "user", "content": "x"}], "temperature": 7},
    )
    assert response.status_code == 400 and "temperature" in response.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="last message must come from the user"):
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        client.chat.completions.create(model=model_id(client), messages=messages)
    assert client.chat.completions.create(
        model=model_id(client), messages=[{"role": "user", "content": "still there?"}], max_tokens=3
    ).choices


def test_prompt_too_long_and_max_tokens_capped(client):
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256 tokens") as err:
        client.completions.create(model=model_id(client), prompt="word " * 300, max_tokens=5)
    assert err.value.body["code"] == "context_length_exceeded"
    prompt = "word " * 200
    result = client.completions.create(model=model_id(client), prompt=prompt, max_tokens=10**6, temperature=0)
    assert result.usage.prompt_tokens + result.usage.completion_tokens <= CONTEXT
    assert (
        result.usage.completion_tokens == CONTEXT - result.usage.prompt_tokens
        or result.choices[0].finish_reason == "stop"
    )


def test_16_concurrent_requests_are_batched(server, client):
    async def run() -> list:
        async_client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=300)
        name = (await async_client.models.list()).data[0].id
        jobs = [
            async_client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": f"Question {i}"}], max_tokens=48
            )
            for i in range(16)
        ]
        return await asyncio.gather(*jobs)

    before = engine_stats(server)
    results = asyncio.run(run())
    after = engine_stats(server)
    assert len(results) == 16 and all(r.choices[0].message.content is not None for r in results)
    assert after["requests"] - before["requests"] == 16
    # batched, not queued one by one: many requests shared decode steps
    assert after["max_batch"] >= 8, after
    steps = after["steps"] - before["steps"]
    tokens = after["decode_tokens"] - before["decode_tokens"]
    assert tokens / steps > 4, (tokens, steps)


def test_disconnect_mid_stream_frees_the_slot(server):
    before = engine_stats(server)
    body = {
        "model": "vicuna-tiny-all-v1.1",
        "messages": [{"role": "user", "content": "Tell me everything"}],
        "max_tokens": 200,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, headers=headers, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        next(lines)
    # the connection is closed: the engine must cancel the request and free its row
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = engine_stats(server)
        if stats["cancelled"] > before["cancelled"] and stats["active"] == 0:
            break
        time.sleep(0.1)
    assert stats["cancelled"] == before["cancelled"] + 1 and stats["active"] == 0
    assert stats["decode_tokens"] - before["decode_tokens"] < 150  # stopped well before its 200 tokens


def test_health_and_page(server):
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["auth"] is True and health["engine"]["context"] == CONTEXT
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and "vicunaflow chat" in page.text
    assert httpx.get(f"{server}/static/app.js").status_code == 200
    assert "http" not in page.text.replace("http-equiv", "")  # no CDN assets


def test_api_key_flag(tiny_vicuna):
    process, url = start_server(tiny_vicuna, "--api-key", "flag-key", "--max-batch-size", "2")
    try:
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer flag-key"}).status_code == 200
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer test-key"}).status_code == 401
    finally:
        process.terminate()
        process.wait(timeout=30)

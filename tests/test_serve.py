"""The OpenAI-compatible server, driven by the official `openai` client over 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from vicunaflow.serve import WARM_UP_REQUESTS

KEY = "test-key"
CONTEXT = 256
SERVE = [sys.executable, "-m", "vicunaflow", "serve"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_path, *args: str, env: dict | None = None, timeout: float = 180, log: Path | None = None):
    """`vicunaflow serve` in a subprocess; returns (process, base_url) once /health answers. Its output goes to
    `log` when given (a test reading the server's log lines), else to process.stdout.

    On the CPU unless args name a --device, on any machine: the tests' float32 references and their timings
    (a reply still running after 0.3 s) are the CPU's, as in CI. On a GPU box the default device would serve
    float16 on CUDA, whose logprobs differ from the float32 reference by ~1e-3 and whose replies finish sooner.
    """
    port = free_port()
    device = () if "--device" in args else ("--device", "cpu")
    cmd = [*SERVE, "--model-path", str(model_path), "--port", str(port), *args, *device]
    env = {**os.environ, **(env or {})}
    if log is None:
        process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    else:
        with log.open("wb") as out:
            process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read() if log is None else log.read_bytes()
            raise RuntimeError(f"server exited: {output.decode(errors='replace')}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)  # not listening yet, or 503 while serve sends its warm-up requests
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


def wait_for_cancel(server, before: dict) -> dict:
    """The engine stats once one more request than `before` was cancelled and none is active (20 s at most)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = engine_stats(server)
        if stats["cancelled"] > before["cancelled"] and stats["active"] == 0:
            break
        time.sleep(0.05)
    assert stats["cancelled"] == before["cancelled"] + 1 and stats["active"] == 0, stats
    return stats


def serve_refused(*args: str) -> subprocess.CompletedProcess:
    """`vicunaflow serve ARGS` expected to refuse at once: its exit code and stderr."""
    return subprocess.run([*SERVE, *args], capture_output=True, text=True, timeout=120)


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


def test_metrics_count_a_streamed_reply(server, client):
    """/metrics of the real `serve` (the counts themselves: tests/test_metrics.py), read as Prometheus reads it."""
    from prometheus_client.parser import text_string_to_metric_families

    def generated() -> float:
        response = httpx.get(f"{server}/metrics")  # no key needed with one model, as /health
        assert response.headers["content-type"].startswith("text/plain; version=")
        families = {f.name: f for f in text_string_to_metric_families(response.text)}
        return families["vicunaflow_generation_tokens"].samples[0].value

    before = generated()
    streamed = client.completions.create(
        model=model_id(client), prompt=[1, 15, 16], max_tokens=7, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    usage = [chunk.usage for chunk in streamed if chunk.usage]
    assert (usage[-1].prompt_tokens, usage[-1].completion_tokens) == (3, 7) and generated() == before + 7


def test_too_many_replies_in_one_request_are_refused(client):
    """prompts x n is capped (OpenAI's 2,048 prompts): each is an engine request submitted from the event loop."""
    from vicunaflow.serve.app import MAX_CHOICES

    with pytest.raises(openai.BadRequestError, match=f"at most {MAX_CHOICES} a request"):
        client.completions.create(model=model_id(client), prompt=[[1, 15]] * (MAX_CHOICES // 2 + 1), n=2, max_tokens=1)


def test_too_many_stop_strings_are_refused(client):
    """The engine thread checks every stop string against each new token: 250,000 of them slowed every other
    stream 37 times, so more than MAX_STOPS (OpenAI takes 4) is a 400 naming stop."""
    from vicunaflow.serve.app import MAX_STOPS

    with pytest.raises(openai.BadRequestError, match=f"at most {MAX_STOPS} a request") as err:
        client.completions.create(model=model_id(client), prompt="hi", max_tokens=1, stop=["q"] * (MAX_STOPS + 1))
    assert err.value.body["param"] == "stop"
    ask = {"model": model_id(client), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    assert client.chat.completions.create(**ask, stop=[f"q{i}" for i in range(MAX_STOPS)]).choices


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
    for role in ("user", "system"):  # null content: only an assistant's (OpenAI's rule)
        messages = [{"role": role, "content": None}, {"role": "user", "content": "hi"}][: 1 if role == "user" else 2]
        response = httpx.post(
            f"{server}/v1/chat/completions",
            headers=headers,
            json={"model": "vicuna-tiny-all-v1.1", "messages": messages},
        )
        assert (
            response.status_code == 400 and f"a {role} message needs its content" in response.json()["error"]["message"]
        )
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="last message must come from the user"):
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        client.chat.completions.create(model=model_id(client), messages=messages)
    assert client.chat.completions.create(
        model=model_id(client), messages=[{"role": "user", "content": "still there?"}], max_tokens=3
    ).choices


def test_an_invalid_field_is_named_in_param():
    """pydantic's refusals name the request field in the error's `param`, as OpenAI's and this server's own
    checks do; a body that is not a JSON object has none to name."""
    from vicunaflow.serve.app import _validate
    from vicunaflow.serve.errors import APIError
    from vicunaflow.serve.protocol import ChatCompletionRequest, CompletionRequest

    def param(model, body: bytes):
        with pytest.raises(APIError) as err:
            _validate(model, body)
        assert err.value.status == 400 and err.value.message.startswith("Invalid request body: ")
        return err.value.param

    chat = '{"model": "m", "messages": [{"role": "user", "content": "hi"}], %s}'
    assert param(ChatCompletionRequest, (chat % '"max_tokens": "ten"').encode()) == "max_tokens"
    assert param(ChatCompletionRequest, (chat % '"stop": 5').encode()) == "stop"
    assert param(ChatCompletionRequest, b'{"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}') == (
        "messages"
    )
    assert param(CompletionRequest, b'{"model": "m", "prompt": "hi", "logprobs": 21}') == "logprobs"
    assert param(CompletionRequest, b'{"model": "m", "prompt": "hi", "seed": 18446744073709551616}') == "seed"
    for field in ("temperature", "top_p"):  # NaN (Python's json.dumps writes it) is no number in the range
        with pytest.raises(APIError, match=f"{field}: Input should be a finite number"):
            _validate(CompletionRequest, b'{"model": "m", "prompt": "hi", "%s": NaN}' % field.encode())
    part = b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "content": "hi"}]}]}'
    with pytest.raises(APIError, match="a text part needs its text"):
        _validate(ChatCompletionRequest, part)  # it was answered as an empty message
    assert param(ChatCompletionRequest, b"{not json") is None
    assert param(ChatCompletionRequest, b"[1, 2]") is None


def test_a_body_with_a_utf8_byte_order_mark_is_read():
    """PowerShell and Notepad's JSON files start with a UTF-8 BOM; json.loads (vLLM, FastChat) skips it, and so
    does this server: pydantic's parser alone refused it as "Invalid JSON: expected value at line 1 column 1"."""
    from vicunaflow.serve.app import _validate
    from vicunaflow.serve.protocol import ChatCompletionRequest

    body = b'\xef\xbb\xbf{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    assert _validate(ChatCompletionRequest, body).messages[0].text() == "hi"


def test_stream_options_are_typed(server):
    """include_usage "false" (a string, as form builders and shell scripts send it) means false, not true as
    bool() of the string read it; a value that is no boolean is a 400 naming stream_options."""
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "vicuna-tiny-all-v1.1", "prompt": [1, 15], "max_tokens": 2, "stream": True}
    for path in ("/v1/completions", "/v1/chat/completions"):
        if path.endswith("chat/completions"):
            body = {k: v for k, v in body.items() if k != "prompt"} | {"messages": [{"role": "user", "content": "hi"}]}
        for value, usage in (("false", False), ("true", True), (None, False)):
            response = httpx.post(
                f"{server}{path}", headers=headers, json=body | {"stream_options": {"include_usage": value}}
            )
            assert response.status_code == 200 and ('"usage"' in response.text) == usage, (path, value)
        response = httpx.post(
            f"{server}{path}", headers=headers, json=body | {"stream_options": {"include_usage": "maybe"}}
        )
        assert response.status_code == 400 and response.json()["error"]["param"] == "stream_options"


def test_a_streamed_batch_names_the_field_to_change(client):
    """A stream carries one prompt and one choice: the error's param is the field at fault (it said n for a batch
    of prompts sent with n=1)."""
    for fields, param in (({"prompt": [[1, 2], [3]]}, "prompt"), ({"prompt": "hi", "n": 2}, "n")):
        with pytest.raises(openai.BadRequestError, match="supports one prompt and n=1 only") as err:
            client.completions.create(model=model_id(client), max_tokens=1, stream=True, **fields)
        assert err.value.body["param"] == param


def test_top_k_samples_among_the_k_most_likely_and_min_tokens_is_refused(client):
    """FastChat's and vLLM's top_k reaches the sampler (top_k 1, their greedy, gives the greedy reply at any
    temperature; -1, their default, and 0 mean all tokens); vLLM's min_tokens is not implemented, and ignoring it
    would end a reply sooner than asked, so a value other than 0 is a 400 naming it."""
    ask = {"model": model_id(client), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    greedy = client.chat.completions.create(**ask, temperature=0).choices[0].message.content
    for seed in range(3):
        top1 = client.chat.completions.create(**ask, temperature=1.5, seed=seed, extra_body={"top_k": 1})
        assert top1.choices[0].message.content == greedy
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**ask, extra_body={"top_k": -2})
    assert err.value.body["param"] == "top_k"
    with pytest.raises(openai.BadRequestError, match="min_tokens is not supported") as err:
        client.chat.completions.create(**ask, extra_body={"min_tokens": 5})
    assert err.value.body["param"] == "min_tokens"
    for off in ({"top_k": -1}, {"top_k": 0}, {"top_k": None}, {"min_tokens": 0}):  # FastChat sends top_k -1
        assert client.chat.completions.create(**ask, extra_body=off).choices


@pytest.mark.parametrize("role", ["user", "system"])
def test_an_image_part_is_refused_not_dropped(role):
    """A text-only model cannot see an image: answering as if it had would mislead, so a part that is not
    text is a 400 naming where it is (an assistant's earlier parts are only text or its refusal)."""
    from vicunaflow.serve.app import _turns
    from vicunaflow.serve.errors import APIError
    from vicunaflow.serve.protocol import ChatCompletionRequest

    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    parts = [{"type": "text", "text": "What is in this image?"}, image]
    messages = [{"role": role, "content": parts}] + ([{"role": "user", "content": "hi"}] if role == "system" else [])
    with pytest.raises(APIError) as err:
        _turns(ChatCompletionRequest(model="m", messages=messages))
    assert err.value.status == 400 and err.value.param == "messages"
    assert "messages[0].content[1]" in err.value.message and "'image_url'" in err.value.message
    text_parts = [{"role": "user", "content": parts[:1]}, {"role": "assistant", "content": [{"type": "refusal"}]}]
    _, turns = _turns(ChatCompletionRequest(model="m", messages=[*text_parts, {"role": "user", "content": "and?"}]))
    assert turns[0][1] == "What is in this image?"


def test_prompt_too_long_and_max_tokens_capped(client):
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256 tokens") as err:
        client.completions.create(model=model_id(client), prompt="word " * 300, max_tokens=5)
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256 tokens; prompt 1 is 302 tokens"):
        client.completions.create(model=model_id(client), prompt=["hi", "word " * 300], max_tokens=5)  # which one
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


def test_seed_gives_the_same_reply_whatever_runs_alongside(server, client):
    """OpenAI's `seed`: a sampled reply is the same alone, streamed, and among concurrent requests; n > 1
    choices are seeded apart; another seed gives another reply."""
    name = model_id(client)
    ask = dict(model=name, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=24, temperature=1.0)
    alone = client.chat.completions.create(**ask, seed=7).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or "" for c in client.chat.completions.create(**ask, seed=7, stream=True)
    )
    assert streamed == alone

    async def run() -> list:
        async_client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=300)
        noise = [
            async_client.chat.completions.create(**{**ask, "messages": [{"role": "user", "content": f"Q {i}"}]})
            for i in range(6)
        ]
        return await asyncio.gather(async_client.chat.completions.create(**ask, seed=7, n=3), *noise)

    choices = [c.message.content for c in asyncio.run(run())[0].choices]
    assert choices[0] == alone and len(set(choices)) > 1
    assert client.chat.completions.create(**ask, seed=8).choices[0].message.content != alone


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
    stats = wait_for_cancel(server, before)
    assert stats["decode_tokens"] - before["decode_tokens"] < 150  # stopped well before its 200 tokens


def test_health_and_page(server):
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["auth"] is True and health["engine"]["context"] == CONTEXT
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and "vicunaflow chat" in page.text
    assert httpx.get(f"{server}/static/app.js").status_code == 200
    assert "http" not in page.text.replace("http-equiv", "")  # no CDN assets


def test_api_key_and_mixed_prefill_flags(tiny_vicuna):
    process, url = start_server(tiny_vicuna, "--api-key", "flag-key", "--max-batch-size", "2", "--mixed-prefill", "1")
    try:
        # ready only once serve's own warm-up requests went through, the key's route included
        assert httpx.get(f"{url}/health").json()["engine"]["requests"] == len(WARM_UP_REQUESTS)
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer flag-key"}).status_code == 200
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer test-key"}).status_code == 401
        # a prompt sent while another reply streams is written by that reply's decode steps, a token a step
        auth = {"Authorization": "Bearer flag-key"}
        name = httpx.get(f"{url}/v1/models", headers=auth).json()["data"][0]["id"]
        long = {"model": name, "prompt": "Tell me about llamas.", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", headers=auth, json=long, timeout=120) as streaming:
            lines = streaming.iter_lines()
            next(line for line in lines if line.startswith("data:"))  # the first reply is decoding
            short = {"model": name, "prompt": "Hi there", "max_tokens": 4}
            short = httpx.post(f"{url}/v1/completions", headers=auth, json=short, timeout=120)
            assert short.status_code == 200 and short.json()["choices"][0]["text"]
            assert "data: [DONE]" in list(lines)
        assert httpx.get(f"{url}/health", headers=auth).json()["engine"]["mixed_prefill_tokens"] > 0
    finally:
        process.terminate()
        process.wait(timeout=30)


def raw_request(server: str, head: bytes) -> socket.socket:
    host, port = server.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=30)
    connection.sendall(head)
    return connection


def read_response(connection: socket.socket) -> str:
    """Everything the server sends until it closes the connection (413 answers `Connection: close`)."""
    connection.settimeout(10)
    data = b""
    while True:
        try:
            piece = connection.recv(65536)
        except ConnectionResetError:  # the unread upload makes the close a reset: keep what arrived
            break
        if not piece:
            break
        data += piece
    return data.decode()


def test_oversized_body_is_413_before_it_is_read(server):
    """A Content-Length over the cap is answered at once: the client has sent none of its 10 MB."""
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 10000000\r\n\r\n"
    )
    with raw_request(server, head) as connection:
        response = read_response(connection)
    status, _, rest = response.partition("\r\n")
    assert status.startswith("HTTP/1.1 413"), response
    error = json.loads(rest.partition("\r\n\r\n")[2])["error"]
    assert error["code"] == "request_too_large" and "4194304 bytes" in error["message"]


def test_oversized_chunked_body_is_413_while_it_streams(server):
    """Without a Content-Length the cap holds while the body streams in: refused soon after 4 MiB, not at 12 MB."""
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Authorization: Bearer " + KEY.encode() + b"\r\n\r\n"
    )
    chunk = b"x" * 65536
    sent = 0
    with raw_request(server, head) as connection:
        while sent < 12_000_000 and not select.select([connection], [], [], 0)[0]:
            try:
                connection.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:  # the server answered and closed meanwhile
                break
            sent += len(chunk)
            time.sleep(0.002)  # let the server keep up, so `sent` says when it stopped reading
        response = read_response(connection)
    assert response.startswith("HTTP/1.1 413"), response
    assert sent < 8_000_000, sent


def test_health_answers_while_a_huge_prompt_is_tokenised(server):
    """Tokenising 3.5 MB of text takes seconds; it runs in a worker thread, not on the event loop."""
    text = "Tell me about the history of llamas and vicunas. " * (3_500_000 // 49)
    body = {"model": "vicuna-tiny-all-v1.1", "messages": [{"role": "user", "content": text}], "max_tokens": 5}
    headers = {"Authorization": f"Bearer {KEY}"}
    result = {}

    def big_request():
        result["response"] = httpx.post(f"{server}/v1/chat/completions", json=body, headers=headers, timeout=120)

    worker = threading.Thread(target=big_request)
    worker.start()
    time.sleep(0.5)  # the body has arrived; tokenisation is under way
    waits = []
    while worker.is_alive():
        start = time.monotonic()
        assert httpx.get(f"{server}/health", timeout=30).status_code == 200
        waits.append(time.monotonic() - start)
        time.sleep(0.05)
    worker.join()
    assert result["response"].status_code == 400
    assert result["response"].json()["error"]["code"] == "context_length_exceeded"
    assert len(waits) >= 5, waits  # the big request was in flight for a while...
    assert max(waits) < 1.0, waits  # ...and /health answered throughout


def test_completion_prompts_are_split_and_their_token_ids_checked():
    """A completion's prompt is one text, texts, one list of ids or lists of ids; an id outside the vocabulary
    is a 400 naming the prompt and the id."""
    from types import SimpleNamespace

    from vicunaflow.serve.app import _encode_prompts, _prompt_list
    from vicunaflow.serve.errors import APIError

    assert _prompt_list("hi") == ["hi"] and _prompt_list(["a", "b"]) == ["a", "b"]
    assert _prompt_list([1, 2]) == [[1, 2]] and _prompt_list([[1], [2, 3]]) == [[1], [2, 3]]
    for empty in ([], [[1], []]):
        with pytest.raises(APIError, match="must not be empty"):
            _prompt_list(empty)
    engine = SimpleNamespace(model=SimpleNamespace(args=SimpleNamespace(vocab_size=100)), tokenizer=None)
    assert _encode_prompts(engine, [[0, 99], [5]]) == [[0, 99], [5]]
    for prompts, bad in (([[0, 99], [5, 100, 7]], "prompt 1: token id 100 "), ([[3, -1]], "prompt 0: token id -1 ")):
        with pytest.raises(APIError, match=bad) as err:
            _encode_prompts(engine, prompts)
        assert err.value.status == 400 and err.value.param == "prompt"


def test_a_small_requests_work_runs_on_the_loop_and_a_large_ones_in_a_thread():
    """Validating or encoding a short prompt costs less than a trip through the threadpool (bench_serve.py --only
    admit); longer work leaves the event loop to the other streams (test_health_answers_while_a_huge_prompt_is_
    tokenised). Many short texts add up: each is a tokenizer call."""
    from vicunaflow.serve import app

    async def threads() -> tuple[int, int, int]:
        small = await app._work(True, threading.get_ident)
        large = await app._work(False, threading.get_ident)
        return threading.get_ident(), small, large

    loop_thread, small, large = asyncio.run(threads())
    assert small == loop_thread and large != loop_thread
    assert app._small_text(["Tell me about llamas. " * 20])  # 440 characters
    assert not app._small_text(["Tell me about llamas. " * 60])
    assert not app._small_text(["a"] * 2048)  # OpenAI's most prompts a request, one character each


def test_a_streamed_echo_decodes_its_prompt_off_the_event_loop(loaded, monkeypatch):
    """Echoing a prompt with its logprobs decodes every prompt token and its alternatives: for a long prompt,
    work that would hold up every other stream's events were it done on the loop, as it is not when not
    streamed."""
    from vicunaflow.engine import Engine, SamplingParams
    from vicunaflow.serve import app

    model, tokenizer = loaded
    decoded_on = []
    completion_logprobs = app.completion_logprobs

    def recording(rows, k):
        decoded_on.append(threading.get_ident())
        return completion_logprobs(rows, k)

    monkeypatch.setattr(app, "completion_logprobs", recording)
    params = SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True, logprobs=2, prompt_logprobs=2)

    async def stream() -> tuple[int, str]:
        chunks = app._stream_completion(engine, [1, 450, 748, 310], params, "cmpl-1", "tiny", echo=True, k=2)
        return threading.get_ident(), "".join([chunk async for chunk in chunks])

    with Engine(model, tokenizer, max_batch_size=1) as engine:
        loop_thread, text = asyncio.run(stream())
    assert text.endswith("data: [DONE]\n\n") and len(decoded_on) >= 2  # the prompt, then the reply's chunks
    assert decoded_on[0] != loop_thread and set(decoded_on[1:]) == {loop_thread}  # a few tokens each: on the loop


def test_disconnect_while_waiting_for_a_whole_reply_cancels_it(server):
    """A non-streamed request whose client gave up is cancelled, not decoded to its max_tokens."""
    before = engine_stats(server)
    # greedy: the tiny model's reply to this prompt runs to max_tokens (sampled, it may stop early)
    body = {"model": "vicuna-tiny-all-v1.1", "prompt": "Tell me everything", "max_tokens": 240, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.3)
    stats = wait_for_cancel(server, before)
    assert stats["decode_tokens"] - before["decode_tokens"] < 200  # stopped well before its 240 tokens


def test_a_disconnect_leaves_no_unretrieved_exception():
    """A non-streamed request whose client left ends quietly: the gather of its replies (which fails with its
    children's CancelledError) is retrieved, not logged by asyncio as "exception was never retrieved"."""
    import gc

    from vicunaflow.serve.app import _complete_all
    from vicunaflow.serve.errors import APIError

    class GoneClient:
        async def receive(self):
            return {"type": "http.disconnect"}

    async def reply_forever():
        await asyncio.Event().wait()

    async def run() -> tuple[int, list[str]]:
        logged = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: logged.append(context["message"]))
        try:
            await _complete_all(GoneClient(), [reply_forever(), reply_forever()])
        except APIError as err:
            status = err.status
        for _ in range(3):  # the cancelled replies finish
            await asyncio.sleep(0)
        gc.collect()  # an unretrieved exception is reported when its future is collected
        return status, logged

    # earlier tests' garbage first, outside this loop: an httpx client collected inside it schedules its aclose()
    # there, which fails on its own closed loop and would be logged here
    gc.collect()
    assert asyncio.run(run()) == (499, [])


def test_port_in_use_fails_before_loading_the_model(tmp_path):
    """The port is checked first: the model path does not even exist, and the error names the port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve_refused("--model-path", str(tmp_path / "missing"), "--port", str(port))
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "--port" in result.stderr, result.stderr
    result = serve_refused("--model-path", str(tmp_path / "missing"), "--port", "70000")
    assert result.returncode == 1 and "--port 70000: a TCP port is 1-65535" in result.stderr, result.stderr


def test_body_limit_defaults_agree():
    import inspect

    from vicunaflow.serve import serve
    from vicunaflow.serve.app import MAX_BODY_BYTES, create_app

    assert inspect.signature(serve).parameters["max_body_bytes"].default == MAX_BODY_BYTES
    assert inspect.signature(create_app).parameters["max_body_bytes"].default == MAX_BODY_BYTES

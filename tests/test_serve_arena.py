"""The arena's routes (serve/arena.py) and /health with several models, in process over fake engines:
what a vote may record, what the arena keeps in memory, what could tell its two sides apart."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from test_serve import free_port  # tests/ is on sys.path (rootdir-less test modules)

from vicunaflow import VicunaflowError
from vicunaflow.engine import Event
from vicunaflow.serve import arena
from vicunaflow.serve.app import create_app

KEY = "arena-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


class CharTokenizer:
    """One token per character (id = code point), BOS 0: prompt ids decode back to the rendered prompt."""

    bos_token_id, eos_token_id, all_special_ids = 0, 1, [0, 1]

    def __call__(self, text: str, add_special_tokens: bool = False, verbose: bool = True):
        return type("Encoded", (), {"input_ids": [ord(c) for c in text]})

    def decode(self, ids, **kwargs) -> str:
        return "".join(map(chr, ids))


class FakeRequest:
    _ids = iter(range(10**9))

    def __init__(self):
        self.id, self.done, self.completion_tokens = next(self._ids), False, 0

    def cancel(self):
        self.done = True


class FakeEngine:
    """Replies "<name> answers <n>" word by word from a thread. While `gate` is clear the last word waits;
    a prompt containing FAIL fails after its first word (as a failed generation step does)."""

    def __init__(self, name: str, context: int = 1_000_000, gate: threading.Event | None = None):
        self.name, self.context, self.tokenizer = name, context, CharTokenizer()
        self.model = SimpleNamespace(args=SimpleNamespace(vocab_size=0x110000))  # token ids are code points
        self.gate = gate or threading.Event()
        if gate is None:
            self.gate.set()
        self.requests = self.active = 0

    def max_new_tokens(self, prompt_length: int, requested: int | None) -> int:
        return requested or 16

    def snapshot_stats(self) -> dict:
        counters = dict.fromkeys(("waiting", "cancelled", "prefills", "steps", "decode_tokens"), 0)
        return {**counters, "requests": self.requests, "active": self.active, "context": self.context}

    def submit(self, prompt_ids, params, sink) -> FakeRequest:
        request, prompt = FakeRequest(), "".join(map(chr, prompt_ids[1:]))
        self.requests += 1
        self.active += 1
        words = [f"{self.name} ", "answers ", f"{self.requests}"]

        def run():
            for word in words[:-1]:
                sink(Event(word))
                if "FAIL" in prompt:
                    sink(Event("", finish_reason="error", error="RuntimeError: boom"))
                    break
            else:
                self.gate.wait(20)
                sink(Event(words[-1], finish_reason="stop", prompt_tokens=len(prompt_ids), completion_tokens=3))
            request.done = True
            self.active -= 1

        threading.Thread(target=run, daemon=True).start()
        return request


@contextlib.contextmanager
def serving(
    engines: dict,
    results: Path | None,
    keys: list[str] | None = (KEY,),
    ready: threading.Event | None = None,
    gc_pauses=None,
):
    """create_app over `engines` behind a real uvicorn in a thread: (base url, app); app.state.server is it."""
    app = create_app(engines, api_keys=list(keys or []), results_dir=results, ready=ready, gc_pauses=gc_pauses)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    app.state.server = server
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(20)


@pytest.fixture
def gate():
    gate = threading.Event()
    gate.set()
    return gate


@pytest.fixture
def server(tmp_path, gate):
    engines = {"alpha": FakeEngine("alpha", gate=gate), "beta": FakeEngine("beta", gate=gate)}
    with serving(engines, tmp_path / "results") as (url, app):
        yield url, app, tmp_path / "results" / arena.VOTES_FILE


def new_battle(url: str) -> str:
    return httpx.post(f"{url}/arena/battles", headers=AUTH).json()["id"]


def ask(url, battle, side, prompt="Pick a number", **fields) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": prompt}], **fields}
    return httpx.post(f"{url}/arena/battles/{battle}/chat/{side}", headers=AUTH, json=body, timeout=30)


def vote(url, battle, choice="tie") -> httpx.Response:
    return httpx.post(f"{url}/arena/battles/{battle}/vote", headers=AUTH, json={"vote": choice}, timeout=30)


def streamed_text(lines) -> str:
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events if e.get("choices"))


def test_a_vote_waits_for_both_whole_answers_and_records_them(server, gate):
    url, _, votes = server
    battle = new_battle(url)
    right = ask(url, battle, "right")
    assert right.status_code == 200, right.text
    gate.clear()  # the left answer stops before its last word
    body = {"messages": [{"role": "user", "content": "Pick a number"}], "stream": True}
    route = f"{url}/arena/battles/{battle}/chat/left"
    with httpx.stream("POST", route, headers=AUTH, json=body, timeout=30) as response:
        lines = response.iter_lines()
        shown = [next(lines) for _ in range(4)]  # role chunk, a blank line, the first word
        assert streamed_text(shown), shown
        during = vote(url, battle)
        assert during.status_code == 409 and "still answering" in during.json()["error"]["message"], during.text
        assert not votes.exists()  # nothing half-shown is written
        gate.set()
        left = streamed_text([*shown, *lines])
    again = ask(url, battle, "left")  # one prompt a side
    assert again.status_code == 409 and again.json()["error"]["code"] == "side_answered"
    assert vote(url, battle).status_code == 200
    (line,) = map(json.loads, votes.read_text().splitlines())
    assert (line["answer_left"], line["answer_right"]) == (left, right.json()["choices"][0]["message"]["content"])
    assert line["prompt"] == "Pick a number"


def test_a_failed_stopped_or_different_side_is_not_voted(server, gate):
    url, app, votes = server
    battle = new_battle(url)
    assert ask(url, battle, "left").status_code == 200
    body = {"messages": [{"role": "user", "content": "FAIL now"}], "stream": True}
    with httpx.stream("POST", f"{url}/arena/battles/{battle}/chat/right", headers=AUTH, json=body) as response:
        assert "generation failed" in response.read().decode()
    refused = vote(url, battle)
    assert refused.status_code == 409 and "did not finish" in refused.json()["error"]["message"], refused.text

    battle = new_battle(url)  # not streamed: a failed reply showed nothing, so the side may be asked again
    assert ask(url, battle, "left", "FAIL now").status_code == 500
    assert vote(url, battle).status_code == 400  # the left model has not answered
    assert ask(url, battle, "left").status_code == 200

    battle = new_battle(url)
    assert ask(url, battle, "left", "Pick a number").status_code == 200
    assert ask(url, battle, "right", "Pick a colour").status_code == 200
    refused = vote(url, battle)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "battle_prompts_differ"

    battle = new_battle(url)  # stopped: the client went away mid-answer
    body = {"messages": [{"role": "user", "content": "Pick a number"}], "stream": True}
    assert ask(url, battle, "left").status_code == 200
    gate.clear()
    with httpx.stream("POST", f"{url}/arena/battles/{battle}/chat/right", headers=AUTH, json=body) as response:
        next(response.iter_lines())
    deadline = time.monotonic() + 20  # the server notices the disconnect, then the engine could finish
    while app.state.arena_battles[battle]["sides"]["right"]["state"] != "stopped" and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    refused = vote(url, battle)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "battle_unfinished", refused.text
    assert not votes.exists()


def test_bodies_that_are_not_utf8_json_are_a_400(server):
    url, _, _ = server
    battle = new_battle(url)
    for route in ("chat/left", "vote"):
        response = httpx.post(f"{url}/arena/battles/{battle}/{route}", headers=AUTH, content=b'{"vote": "\xff"}')
        assert response.status_code == 400, (route, response.text)
    response = httpx.post(f"{url}/arena/battles/{battle}/chat/left", headers=AUTH, content=b"\xff\xfe")
    assert response.status_code == 400 and "Invalid request body" in response.json()["error"]["message"]
    deep_extra = '{"a": ' * 300 + "1" + "}" * 300  # json reads it; pydantic's serializer stops at its depth
    for body in (
        b"{}",  # pydantic's own message would quote the input, which holds the side's model name
        b"[" * 100_000 + b"]" * 100_000,
        f'{{"messages": [{{"role": "user", "content": "hi", "x": {deep_extra}}}]}}'.encode(),
    ):
        for side in ("left", "right"):
            response = httpx.post(f"{url}/arena/battles/{battle}/chat/{side}", headers=AUTH, content=body)
            message = response.json()["error"]["message"]
            assert response.status_code == 400 and "alpha" not in message and "beta" not in message, message
    refused = httpx.post(f"{url}/arena/battles/{battle}/vote", headers=AUTH, content=b"[" * 100_000 + b"]" * 100_000)
    assert refused.status_code == 400


def test_nothing_in_a_reply_or_health_tells_the_sides_apart(tmp_path):
    engines = {"alpha": FakeEngine("alpha", context=300), "beta": FakeEngine("beta", context=500)}
    with serving(engines, tmp_path) as (url, _):
        battle = new_battle(url)
        for fields, param in (({"logprobs": True}, "logprobs"), ({"logprobs": True, "top_logprobs": 2}, "logprobs")):
            refused = ask(url, battle, "left", **fields)
            assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text
        refused = ask(url, battle, "left", top_logprobs=0)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "top_logprobs"
        refused = ask(url, battle, "left", n=2)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "n"
        replayable = [  # /v1 would replay them, or nearly: one likely token at nearly every step
            ({"temperature": 0}, "temperature"),
            ({"temperature": 1e-6}, "temperature"),
            ({"temperature": 0.3}, "temperature"),
            ({"top_p": 1e-9}, "top_p"),
            ({"top_p": 0.2}, "top_p"),
            ({"top_k": 1}, "top_k"),
            ({"seed": 7}, "seed"),
        ]
        for fields, param in replayable:
            refused = ask(url, battle, "left", **fields)
            assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text
            assert "under 0.5" in refused.json()["error"]["message"]
        sampled = ask(url, new_battle(url), "left", temperature=0.5, top_p=0.9, top_k=40)
        assert sampled.status_code == 200, sampled.text
        reply = ask(url, new_battle(url), "left")
        assert reply.status_code == 200 and "usage" not in reply.json()
        body = {
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        streamed = httpx.post(f"{url}/arena/battles/{new_battle(url)}/chat/left", headers=AUTH, json=body)
        assert streamed.status_code == 200 and "usage" not in streamed.text and "[DONE]" in streamed.text

        public = httpx.get(f"{url}/health").json()  # no key: totals only
        assert public["models"] == ["alpha", "beta"] and "engine" not in public
        assert public["engines"] == {"alpha": {"context": 300}, "beta": {"context": 500}}
        assert public["totals"]["requests"] == engines["alpha"].requests + engines["beta"].requests > 0
        private = httpx.get(f"{url}/health", headers=AUTH).json()  # a key: each engine's counters
        assert private["engines"]["alpha"]["requests"] == engines["alpha"].requests
        assert (
            httpx.get(f"{url}/health", headers={"Authorization": "Bearer wrong"}).json()["engines"] == public["engines"]
        )
    with serving(engines, tmp_path, keys=None) as (url, _):  # no keys: never per model
        assert "requests" not in httpx.get(f"{url}/health").json()["engines"]["alpha"]
    with serving({"alpha": FakeEngine("alpha")}, tmp_path) as (url, _):  # one model, no arena: as before
        assert httpx.get(f"{url}/health").json()["engine"]["requests"] == 0


def test_serve_warms_each_model_before_health_says_ready(tmp_path):
    """`serve` streams its own warm-up requests (a completion and a chat completion) to every model through
    its socket, with a key, before /health answers 200; until then /health says "starting"."""
    from vicunaflow.serve import WARM_UP_REQUESTS, _warm_routes

    def warm(app, url, models, ready):  # warm-up ends by freezing the heap: this test process thaws it
        try:
            _warm_routes(app.state.server, "127.0.0.1", int(url.rsplit(":", 1)[1]), models, KEY, ready)
        finally:
            gc.unfreeze()

    engines = {"alpha": FakeEngine("alpha"), "beta": FakeEngine("beta")}
    ready = threading.Event()
    with serving(engines, tmp_path, ready=ready) as (url, app):
        starting = httpx.get(f"{url}/health")
        assert starting.status_code == 503 and starting.json()["status"] == "starting"
        assert starting.json()["engines"]["beta"] == {"context": 1_000_000} and starting.json()["auth"] is True
        assert all(engine.requests == 0 for engine in engines.values())
        warm(app, url, list(engines), ready)
        assert ready.is_set() and httpx.get(f"{url}/health").json()["status"] == "ok"
        assert [engine.requests for engine in engines.values()] == [len(WARM_UP_REQUESTS)] * 2
    ready = threading.Event()
    with serving(engines, tmp_path, ready=ready) as (url, app):  # a refused request: logged, ready all the same
        warm(app, url, ["gamma"], ready)
        assert ready.is_set() and httpx.get(f"{url}/health").status_code == 200


def test_health_counts_the_garbage_collections_and_warm_up_freezes_the_heap(tmp_path):
    """/health's "gc": every collection of the process by generation, with its pause; serve's warm-up
    ends by freezing the heap (serve/heap.py), so a full collection walks only what came after."""
    from vicunaflow.serve import _warm_routes, heap

    ready = threading.Event()
    try:
        with (
            heap.GCPauses() as pauses,
            serving({"alpha": FakeEngine("alpha")}, tmp_path, ready=ready, gc_pauses=pauses) as (url, app),
        ):
            assert "gc" not in httpx.get(f"{url}/health").json()  # "starting": none of the counters
            _warm_routes(app.state.server, "127.0.0.1", int(url.rsplit(":", 1)[1]), ["alpha"], KEY, ready)
            before = httpx.get(f"{url}/health").json()["gc"]
            assert before["frozen_objects"] > 10_000 and before["collections"][2] >= 1  # freeze's own collect
            gc.collect()
            after = httpx.get(f"{url}/health").json()["gc"]
            assert after["collections"][2] >= before["collections"][2] + 1 and after["max_pause_s"] > 0
            assert after["pause_s"] > before["pause_s"] and after["pause_s"] >= after["max_pause_s"]
        assert pauses not in gc.callbacks
    finally:
        gc.unfreeze()  # this test process goes on


def test_the_context_error_names_no_sizes_in_the_arena(tmp_path):
    engines = {"alpha": FakeEngine("alpha", context=300), "beta": FakeEngine("beta", context=300)}
    with serving(engines, tmp_path) as (url, app):
        battle = new_battle(url)
        refused = ask(url, battle, "right", "x" * 1000)
        error = refused.json()["error"]
        assert refused.status_code == 400 and error["code"] == "context_length_exceeded", refused.text
        assert not any(c.isdigit() for c in error["message"]), error["message"]
        # the refused prompt is not kept, and the side may be asked again
        assert app.state.arena_battles[battle]["sides"]["right"] is None
        plain = httpx.post(
            f"{url}/v1/chat/completions",
            headers=AUTH,
            json={"model": "alpha", "messages": [{"role": "user", "content": "x" * 1000}]},
        )
        assert "300 tokens" in plain.json()["error"]["message"]  # the API outside the arena says the sizes


def test_memory_is_bounded_by_count_age_and_length(tmp_path, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(arena, "_clock", lambda: now[0])
    monkeypatch.setattr(arena, "MAX_BATTLES", 3)
    monkeypatch.setattr(arena, "MAX_TEXT_CHARS", 100)
    engines = {"alpha": FakeEngine("alpha"), "beta": FakeEngine("beta")}
    with serving(engines, tmp_path) as (url, app):
        battles = app.state.arena_battles
        first = new_battle(url)
        long_prompt = "y" * 5000
        for side in ("left", "right"):
            assert ask(url, first, side, long_prompt).status_code == 200
        kept = battles[first]["sides"]["left"]
        assert kept["prompt"] == "y" * 100 and len(kept["answer"]) <= 100  # cut to MAX_TEXT_CHARS
        ids = [new_battle(url) for _ in range(4)]
        assert list(battles) == ids[1:]  # at most MAX_BATTLES, the oldest forgotten
        gone = vote(url, first)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "battle_not_found"
        now[0] += arena.BATTLE_TTL_S + 1  # an hour later every battle has expired
        assert ask(url, ids[-1], "left").status_code == 404 and not battles
        fresh = new_battle(url)
        for side in ("left", "right"):
            ask(url, fresh, side)
        assert vote(url, fresh).status_code == 200
        assert battles[fresh]["sides"] == {"left": None, "right": None}  # voted: its texts are in the file only
        stored = sum(
            len(state.get(key) or "")
            for battle in battles.values()
            for state in battle["sides"].values()
            if state
            for key in ("prompt", "answer")
        )
        assert stored <= arena.MAX_BATTLES * 2 * 2 * arena.MAX_TEXT_CHARS


def test_arena_requests_are_validated_off_the_event_loop(server, monkeypatch):
    from vicunaflow.serve.protocol import ChatCompletionRequest

    url, _, _ = server
    threads = []
    validate = ChatCompletionRequest.model_validate.__func__

    def spy(cls, *args, **kwargs):
        try:
            asyncio.get_running_loop()
            threads.append("event loop")
        except RuntimeError:
            threads.append("worker")
        return validate(cls, *args, **kwargs)

    monkeypatch.setattr(ChatCompletionRequest, "model_validate", classmethod(spy))
    assert ask(url, new_battle(url), "left").status_code == 200
    assert threads == ["worker"]


def test_several_models_with_tensor_parallelism_are_refused_before_loading(tmp_path, monkeypatch):
    from vicunaflow.loading import ModelOptions
    from vicunaflow.serve import serve

    def load(self, path):
        raise AssertionError(f"{path} was loaded")

    monkeypatch.setattr(ModelOptions, "load", load)
    paths = [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(VicunaflowError, match=r"--num-gpus 2 with 2 --model-path: tensor parallelism serves one"):
        serve(model_path=paths, model_options=ModelOptions(device="cpu", num_gpus=2), port=free_port())


def test_a_stopped_engine_is_503_on_health_and_on_requests(tmp_path):
    """An engine whose loop died of an error (Engine.failure): /health says so, and its requests are refused."""

    class StoppedEngine(FakeEngine):
        failure = "RuntimeError: bookkeeping bug"

        def snapshot_stats(self) -> dict:
            return {**super().snapshot_stats(), "failure": self.failure}

        def submit(self, prompt_ids, params, sink):
            raise VicunaflowError(f"the engine stopped after an error: {self.failure}")

    with serving({"alpha": StoppedEngine("alpha")}, tmp_path) as (url, _):
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["status"] == "error", health.text
        assert health.json()["engine"]["failure"] == "RuntimeError: bookkeeping bug"
        body = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}]}
        reply = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, json=body)
        assert reply.status_code == 503 and "bookkeeping bug" in reply.json()["error"]["message"], reply.text
        # a stream too: refused before its 200 goes out, not cut off after it
        for path, fields in (("chat/completions", body), ("completions", {"model": "alpha", "prompt": "hi"})):
            reply = httpx.post(f"{url}/v1/{path}", headers=AUTH, json={**fields, "stream": True})
            assert reply.status_code == 503 and "bookkeeping bug" in reply.json()["error"]["message"], reply.text
    with serving({"alpha": FakeEngine("alpha")}, tmp_path) as (url, _):
        health = httpx.get(f"{url}/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"

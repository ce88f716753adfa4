"""`serve --engine-process`: the engine in a child process, the HTTP side in the server's (serve/engine_process.py).

The same replies as the engine run in this process, concurrent streams complete and in order, a disconnect
cancels the request in the child, /health and /metrics read the child (off the event loop: a stalled child holds
up only them), and the child's failures reach the clients: a model it cannot load stops the server naming the
folder; a child that dies ends the open requests with an error, and /health then says so; a request after the
child is gone is refused with 503. A Ctrl-C while the child starts prints nothing from it. Several models' engine
processes load at once and warm up in turn, and one that cannot load ends the others.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import threading
import time

import httpx
import pytest
from test_serve import SERVE, free_port, start_server  # tests/ is on sys.path
from test_serve_load import REPLY_TOKENS, run  # run: streamed greedy completions of REPLY_TOKENS, EOS ignored

MODEL = "vicuna-tiny-all-v1.1"
STREAMS = 48


def launch(tiny_vicuna, *args: str):
    return start_server(tiny_vicuna, "--engine-process", "--max-context", "256", "--seed", "0", *args)


@pytest.fixture(scope="module")
def server(tiny_vicuna):
    process, url = launch(tiny_vicuna, "--max-batch-size", str(STREAMS))
    yield process, url
    process.terminate()
    process.wait(timeout=60)


def engine_children(server_pid: int) -> list[int]:
    """The server's children started by multiprocessing's spawn (not its resource tracker): the engines'."""
    listing = subprocess.run(
        ["ps", "-ww", "-o", "pid=,args=", "--ppid", str(server_pid)], capture_output=True, text=True
    )
    return [int(line.split()[0]) for line in listing.stdout.splitlines() if "spawn_main" in line]


def stream_body(prompt: list[int], max_tokens: int = REPLY_TOKENS) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}


@pytest.mark.timeout(240)
def test_concurrent_streams_match_the_engine_in_this_process(server, tiny_vicuna):
    from vicunaflow.engine import Engine, SamplingParams, load_model

    _, url = server
    prompts = [[1] + [300 + (7 * i + j) % 700 for j in range(4 + i % 20)] for i in range(STREAMS)]
    together = asyncio.run(run(url, prompts, at_once=True))
    model, tokenizer = load_model(tiny_vicuna, device="cpu")
    params = SamplingParams(temperature=0, max_new_tokens=REPLY_TOKENS, ignore_eos=True)
    with Engine(model, tokenizer, max_batch_size=4, max_context=256) as engine:
        for i, (prompt, reply) in enumerate(zip(prompts[:6], together, strict=False)):
            text = "".join(event.text for event in engine.generate(prompt, params))
            assert reply["text"] == text, f"stream {i}: the engine process's reply differs from this process's engine"
    for i, reply in enumerate(together):
        assert reply["status"] == 200 and reply["done"] and reply["finish"] == "length", (i, reply)
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["engine"]["max_batch"] >= STREAMS // 2, health["engine"]
    assert health["engine"]["active"] == 0 and health["engine"]["context"] == 256
    assert len(health["engine"]["gc"]["collections"]) == 3  # the engine process's own collections (serve/heap.py)
    assert 'vicunaflow_requests_total{model="' + MODEL in httpx.get(f"{url}/metrics").text


def test_a_disconnect_cancels_the_request_in_the_engine_process(server):
    _, url = server
    before = httpx.get(f"{url}/health").json()["engine"]
    with httpx.stream("POST", f"{url}/v1/completions", json=stream_body([1, 400, 500], 200), timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = httpx.get(f"{url}/health").json()["engine"]
        if stats["cancelled"] > before["cancelled"] and stats["active"] == 0:
            break
        time.sleep(0.05)
    assert stats["cancelled"] == before["cancelled"] + 1 and stats["active"] == 0, stats
    assert stats["decode_tokens"] - before["decode_tokens"] < 150  # stopped well before its 200 tokens


def test_health_waits_for_a_stalled_engine_process_off_the_event_loop(server):
    """/health asks the engine process over its pipe; while that waits (here the child is stopped, SIGSTOP) the
    server's other routes answer, and /health gives its last reading once CALL_TIMEOUT_S has passed."""
    from vicunaflow.serve.engine_process import CALL_TIMEOUT_S

    process, url = server
    [child] = engine_children(process.pid)
    answers = {}

    def health() -> None:
        started = time.monotonic()
        answers["health"] = httpx.get(f"{url}/health", timeout=60)
        answers["health_s"] = time.monotonic() - started

    os.kill(child, signal.SIGSTOP)
    try:
        waiting = threading.Thread(target=health)
        waiting.start()
        time.sleep(0.5)
        started = time.monotonic()
        models = httpx.get(f"{url}/v1/models", timeout=60)
        models_s = time.monotonic() - started
        waiting.join(60)
    finally:
        os.kill(child, signal.SIGCONT)
    assert models.status_code == 200 and models_s < 1.0, f"/v1/models waited {models_s:.2f} s behind /health"
    assert answers["health"].status_code == 200 and answers["health"].json()["status"] == "ok"
    assert answers["health_s"] >= CALL_TIMEOUT_S - 0.1, answers["health_s"]
    assert httpx.get(f"{url}/health").json()["engine"]["active"] == 0  # answered again once the child runs


@pytest.mark.timeout(180)
def test_remote_engine_starts_through_a_ctrl_c_and_refuses_requests_once_stopped(tiny_vicuna, capfd, tmp_path):
    """A Ctrl-C that reaches the engine process while it imports does nothing there (the server stops it; no
    traceback), and a request submitted after the engine stopped is refused at once, not left without an end."""
    import multiprocessing

    from starlette.testclient import TestClient

    from vicunaflow import VicunaflowError
    from vicunaflow.engine import SamplingParams
    from vicunaflow.loading import ModelOptions
    from vicunaflow.serve.app import create_app
    from vicunaflow.serve.engine_process import RemoteEngine

    interrupted = []

    def interrupt_the_child() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not interrupted:
            for child in multiprocessing.active_children():
                if child.name == "vicunaflow-tiny" and child.pid:
                    os.kill(child.pid, signal.SIGINT)
                    interrupted.append(child.pid)
            time.sleep(0.005)

    interrupter = threading.Thread(target=interrupt_the_child)
    interrupter.start()
    engine = RemoteEngine(
        tiny_vicuna, ModelOptions(device="cpu"), {"max_batch_size": 2, "max_context": 64}, name="tiny"
    )
    interrupter.join()
    assert interrupted, "the engine process was never seen"
    params = SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True)
    with engine:
        ended = threading.Event()
        engine.submit([1, 400, 500], params, lambda event: event.finish_reason and ended.set())
        assert ended.wait(60)
    with pytest.raises(VicunaflowError, match="the engine stopped"):
        engine.submit([1, 400], params, lambda event: None)
    refused = TestClient(create_app({"tiny": engine}, results_dir=tmp_path)).post(
        "/v1/completions", json={"model": "tiny", "prompt": [1, 400], "max_tokens": 2}
    )
    assert refused.status_code == 503 and "the engine stopped" in refused.json()["error"]["message"], refused.text
    assert "KeyboardInterrupt" not in capfd.readouterr().err


@pytest.mark.timeout(180)
def test_a_dead_engine_process_fails_its_streams_and_health_says_so(tiny_vicuna):
    process, url = launch(tiny_vicuna, "--max-batch-size", "2")
    try:
        children = engine_children(process.pid)
        assert len(children) == 1, children
        with httpx.stream("POST", f"{url}/v1/completions", json=stream_body([1, 400], 220), timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            os.kill(children[0], signal.SIGKILL)
            rest = "\n".join(lines)  # the stream ends (it must not hang) with the failure
        assert "the engine process exited unexpectedly" in rest and rest.rstrip().endswith("data: [DONE]"), rest[-500:]
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["status"] == "error", health.text
        refused = httpx.post(f"{url}/v1/completions", json=stream_body([1, 400]), timeout=30)
        assert refused.status_code == 503 and "engine" in refused.json()["error"]["message"], refused.text
        assert process.poll() is None  # the server stays up to say why
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_a_model_the_engine_process_cannot_load_stops_serve_naming_it(tiny_vicuna, tmp_path):
    broken = tmp_path / "vicuna-broken"
    shutil.copytree(tiny_vicuna, broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short: its tensors cannot be read
    result = subprocess.run(
        [*SERVE, "--engine-process", "--model-path", str(broken), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode != 0
    assert str(broken) in result.stderr and "Traceback" not in result.stderr.splitlines()[-1], result.stderr[-2000:]


@pytest.mark.parametrize("signal_sent", [signal.SIGTERM, signal.SIGKILL], ids=["terminated", "killed"])
def test_the_engine_process_ends_with_the_server(tiny_vicuna, signal_sent):
    """Stopped (SIGTERM: uvicorn shuts down, then re-raises the signal) the server stops its engine process before
    it exits; killed outright, the engine process sees it and exits on its own (its GPU memory comes back)."""
    import psutil

    process, _ = launch(tiny_vicuna, "--max-batch-size", "2")
    children = engine_children(process.pid)
    assert len(children) == 1, children
    child = psutil.Process(children[0])
    process.send_signal(signal_sent)
    process.wait(timeout=60)
    if signal_sent == signal.SIGTERM:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, "the server exited before its engine"
    else:
        child.wait(timeout=30)


def _start_two(first, second, options: dict, record: list) -> None:
    """start_engines on two models in a thread, recording what it returns or raises (and the stack, to close)."""
    import contextlib

    from vicunaflow.loading import ModelOptions
    from vicunaflow.serve.engine_process import start_engines

    stack = contextlib.ExitStack()
    try:
        record.append(start_engines({"a": first, "b": second}, ModelOptions(device="cpu"), options, None, stack))
    except BaseException as err:
        record.append(err)
    record.append(stack)


@pytest.mark.timeout(240)
def test_several_engine_processes_load_at_once_and_each_serves(tiny_vicuna, tiny_hf):
    """The second model's engine process is up before the first is ready (one after another, it started only
    then); both then serve their own model."""
    import multiprocessing

    from vicunaflow.engine import SamplingParams

    record: list = []
    starting = threading.Thread(target=_start_two, args=(tiny_vicuna, tiny_hf, {"max_context": 64}, record))
    starting.start()
    second_seen = first_ready = None
    while starting.is_alive() and (second_seen is None or first_ready is None):
        names = {child.name for child in multiprocessing.active_children()}
        if second_seen is None and "vicunaflow-b" in names:
            second_seen = time.monotonic()
        if first_ready is None and any(t.name == "vicunaflow-a-events" for t in threading.enumerate()):
            first_ready = time.monotonic()
        time.sleep(0.002)
    starting.join(200)
    engines, stack = record
    with stack:
        assert isinstance(engines, dict), engines
        assert second_seen is not None and (first_ready is None or second_seen < first_ready)
        params = SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True)
        replies = {}
        for name, engine in engines.items():
            done, tokens = threading.Event(), []

            def sink(event, tokens=tokens, done=done):
                tokens.append(event.text)
                if event.finish_reason:
                    done.set()

            engine.submit([1, 400, 500], params, sink)
            assert done.wait(60)
            replies[name] = "".join(tokens)
        assert replies["a"] != replies["b"]  # each its own model (the delta changed the weights)


@pytest.mark.timeout(240)
def test_a_model_that_cannot_load_ends_the_other_engine_processes(tiny_vicuna, tmp_path):
    import multiprocessing

    from vicunaflow import VicunaflowError

    broken = tmp_path / "vicuna-broken"
    shutil.copytree(tiny_vicuna, broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    record: list = []
    _start_two(tiny_vicuna, broken, {"max_context": 64}, record)
    error, stack = record
    stack.close()
    assert isinstance(error, VicunaflowError) and str(broken) in str(error), error
    assert not [c for c in multiprocessing.active_children() if c.name.startswith("vicunaflow-")]


@pytest.mark.timeout(240)
def test_an_engine_process_warms_up_only_holding_the_warm_lock(tiny_vicuna, capfd):
    """Engines sharing a GPU warm up in turn (start_engines passes them one lock): the autotuner times kernels,
    and beside another engine's warm-up it would pick by skewed times."""
    import multiprocessing

    from vicunaflow.loading import ModelOptions
    from vicunaflow.serve.engine_process import RemoteEngine

    lock = multiprocessing.get_context("spawn").Lock()
    options = {"max_context": 64, "warm_up": True}  # as on a GPU (on the CPU an engine does not warm up)
    log = ""
    lock.acquire()
    engine = RemoteEngine(tiny_vicuna, ModelOptions(device="cpu"), options, name="held", wait=False, warm_lock=lock)
    with engine:  # stopped (terminated if still loading) however the test ends
        deadline = time.monotonic() + 120
        while "loaded " not in log and time.monotonic() < deadline:  # the model is loaded: next, the engine
            time.sleep(0.1)
            log += capfd.readouterr().err
        assert "loaded " in log, log[-2000:]
        assert not engine._conn.poll(2.0) and " engine: " not in log + capfd.readouterr().err
        lock.release()
        engine.wait_ready()
        assert "warmed " in capfd.readouterr().err

"""Serving under load (issue 16): `vicunaflow serve` driven through its OpenAI HTTP API as users touch it.

The server runs as a subprocess on 127.0.0.1; every request is a streamed `/v1/completions` call (SSE)
with a token-id prompt (so a "128-token prompt" is exactly 128 tokens), greedy, with `ignore_eos: true`
(vLLM's extra parameter, which our API now takes too) so every reply is exactly `max_tokens` long.
Times are taken on the client, when the bytes of an event arrive: what a user sees.

    startup       Popen -> /health answers (weights load, warm-up), seconds
    first         (b) the first request after startup, then 20 single-user requests with prompt lengths
                  never seen before, then 20 at the 128-token length again: time to first token p50/p99
                  (the client process sends a GET /v1/models first, so its own set-up is not counted), and
                  the engine's share of it from /health (queue: waiting for a row; prefill: admission to
                  the first token's event); the aggregate rows report that share too
    aggregate     (a) C streams at once (C = 1 8 32 64 256), 128-token prompts, 256-token replies:
                  tokens (the finished streams' usage) / wall seconds (first send to last token), time to
                  first token and inter-token gap mean/p50/p99 over all streams; beside the client's gaps the
                  engine's own (/metrics' histogram, read before and after: its mean exact, its quantiles
                  interpolated inside a bucket, 1 ms wide at 4-10 ms): a p99 the engine does not have
                  comes from the HTTP side, or from tokens whose text was held back (tokens_per_event > 1:
                  such a token has no event of its own, so the gap to the next spans two steps)
    join          (c) 31 streams running, then a ~1500-token prompt joins: the worst inter-token gap among
                  the 31 while it prefills (between its send and its first token), against their gap before
    events        (d) how many SSE events a second the HTTP side alone can push: the real app
                  (create_app + uvicorn, as `serve` runs it) over a stub engine that emits one token per
                  stream per step with no model behind it, so what limits the rate is the HTTP/SSE path
                  (and the client, whose CPU is reported); plus the server's event-loop CPU per event.
                  Paced (a step every 20 ms, as a batch-256 7B step: one event per stream per step) and
                  flooding (a step every ms: the ceiling)
    admit         (e) what a request costs the HTTP side before the engine sees it: bursts of 256 streamed
                  completions (128-token prompts, one token each) at the same app and stub engine; the
                  event loop's CPU per request and the time to first token, with a request's validation
                  and prompt checks run in the threadpool (as before) and, in the same run, as `serve` runs
                  them (on the event loop for small requests: serve/app.py's INLINE)
    models        (f) several models in one server: a second server with the model under two names (each its
                  own engine process with its CUDA graphs, half the KV cache each), its startup (the engine
                  processes load at once, their warm-ups in turn), then each --concurrency's streams split
                  over both names at once: tokens/s over both, and that every stream of each model finished;
                  then 8 prompts sent alone to each name: how many got the same greedy reply from both

The server runs with --max-batch-size 256 and a paged KV cache of --kv-cache-tokens 131072 (7b),
98304 (13b) or 65536 (tiny): 256 streams of 128 + 256 tokens at once. Results are written after
every scenario, so a run cut short by a time limit keeps what it measured.

For every scenario the server's CPU is sampled from /proc: its main thread (uvicorn's event loop: all
HTTP/SSE work) and the whole process, so "event-loop µs per event" is the HTTP side's own cost and
1e6 / that is what it could push with a core to itself (on CPython it also shares the GIL with the
engine thread). Client streams are spread over `--client-procs` processes (each its own event loop and
connection pool: httpx.AsyncClient with a connection per stream); each process's CPU use is reported,
and a run where a client process was over 70% busy is flagged (the client may then be the bottleneck).
The aggregate and join rows also give the server's Python garbage collections between the scenario's two
/health readings: full ones (`server_gc_full`) and every pause added up (`server_gc_pause_ms`), and its engine
process's (`engine_gc_full`, `engine_gc_pause_ms`).

Models: `--size 7b|13b` writes a random LLaMA of that shape (float16, seed 0, the synthetic 32000-piece
tokenizer of bench_chat.py) once to `--scratch` as a Hugging Face folder and serves it; `--tiny` builds
the project's tiny Vicuna the way tests/conftest.py does (synth -> convert -> delta -> apply-delta) and
scales the scenarios down for a CPU smoke run.

    python bench/bench_serve.py --size 7b --scratch /tmp/vf-7b                # one H200: -> results/serve_7b.json (~4 min)
    python bench/bench_serve.py --size 13b --scratch /tmp/vf-13b
    python bench/bench_serve.py --tiny                                       # CPU: every scenario, scaled down
    python bench/bench_serve.py --tiny --only events aggregate --concurrency 64 256

References: issue 16's "today" column is our own previous server on one H200 (7B float16); it is put
next to each number. transformers has no server and FastChat's serves one request at a time per
worker, so there is no other server to run side by side here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from vicunaflow.serve.metrics import HISTOGRAMS, PREFIX

HERE = Path(__file__).resolve().parent
SCENARIOS = ("first", "aggregate", "join", "events", "admit", "models")
ONE_MODEL_SCENARIOS = {"first", "aggregate", "join"}  # one server over the model
STUB_SCENARIOS = {"events", "admit"}  # no model: the real app over StubEngine
MODEL_NAMES = ("a", "b")  # the models scenario's server: the model under two names
# the engine's histograms the bench reads from /metrics: Engine.latency's name -> the metric family
ENGINE_HISTOGRAMS = {
    key: PREFIX + name for name, key, _ in HISTOGRAMS if key in ("inter_token", "step_gpu", "gpu_idle")
}
# issue 16's "today": our previous server, one H200, 7B float16, streamed through the OpenAI API
REFERENCE_7B = {
    "aggregate_tokens_per_s": {"8": 866, "32": 3622, "64": 5326, "256": None},
    "first_request_total_s": 5.6,
    "first_request_ttft_s": 0.680,
    "ttft_repeated_length_s": 0.045,
    "ttft_new_length_s": "0.09 - 1.2 more than a repeated length",
    "gap_32_p50_ms": 6.9,
    "gap_32_p99_ms": 129,
    "ttft_32_p50_s": 1.6,
    "join_worst_gap_ms": 239,
}
GOALS_7B = {
    "aggregate_tokens_per_s": {"8": 1700, "32": 5500, "64": 9000, "256": 12000},
    "ttft_128_p99_ms": 30,
    "gap_32_p99": "<= 2 x p50",
    "join_worst_gap_ms": 40,
}
CLIENT_BUSY = 0.7  # a client process busier than this may be what limits the rate


# -- models ------------------------------------------------------------------------------------------------


def write_random_model(folder: Path, size: str, context: int) -> float:
    """A Hugging Face LLaMA folder of a real size with random float16 weights (norms: ones) and
    bench_chat's synthetic tokenizer, written once: seconds spent (0 when it was already there)."""
    if (folder / "model.safetensors.index.json").exists():
        return 0.0
    import torch

    sys.path.insert(0, str(HERE))
    from bench_chat import make_args, make_tokenizer

    from vicunaflow.checkpoint import ShardedSafetensorsWriter, TensorInfo
    from vicunaflow.engine.build import hf_shapes

    start = time.perf_counter()
    args = make_args(size, context)
    shapes = hf_shapes(args)
    staging = folder.with_name(folder.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(0)
    plan = [(name, TensorInfo(shape, torch.float16)) for name, shape in shapes.items()]
    with ShardedSafetensorsWriter(staging, plan) as writer:
        for name, shape in shapes.items():
            if len(shape) == 1:
                tensor = torch.ones(shape, dtype=torch.float16)
            else:
                tensor = torch.randn(shape, generator=generator, device=device, dtype=torch.float16).mul_(0.02).cpu()
            writer.write(name, tensor)
        writer.close()
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": args.max_position_embeddings,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float16",
        "tie_word_embeddings": False,
    }
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    make_tokenizer(args.vocab_size).save_pretrained(staging)
    staging.rename(folder)
    del tensor, generator
    if device == "cuda":
        torch.cuda.empty_cache()  # the server's fit check counts the GPU's free memory
    seconds = time.perf_counter() - start
    print(f"wrote random {size} to {folder} in {seconds:.1f} s", flush=True)
    return seconds


def make_tiny_vicuna(scratch: Path) -> Path:
    """The project's tiny Vicuna, made as tests/conftest.py makes it (once per scratch folder)."""
    from vicunaflow.convert import convert
    from vicunaflow.delta import apply_delta
    from vicunaflow.synth import synth_delta, synth_llama

    target = scratch / "vicuna-tiny-all-v1.1"
    if (target / "config.json").exists():
        return target
    raw = synth_llama(folder=scratch / "pyllama_data", model_size="tiny")
    base = convert(input_dir=raw, output_dir=scratch / "llama-tiny-hf")
    delta = synth_delta(base=base, output_dir=scratch / "vicuna-tiny-delta-v1.1")
    return apply_delta(base=base, delta=delta, target=target)


# -- the server --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess (`vicunaflow serve`, or this script's stub) on 127.0.0.1, its log in a file."""

    def __init__(self, command: list[str], port: int, log_path: Path, timeout: float):
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_file = log_path.open("wb")
        started = time.perf_counter()
        self.process = subprocess.Popen(command, stdout=self.log_file, stderr=subprocess.STDOUT)
        try:
            self._wait_for_health(started + timeout, timeout)
        except BaseException:  # SIGTERM, Ctrl-C, a failed start: never leave the server running
            self.stop()
            raise
        self.startup_s = time.perf_counter() - started

    def _wait_for_health(self, deadline: float, timeout: float) -> None:
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited ({self.process.returncode}); its log:\n{self.log_tail()}")
            if time.perf_counter() > deadline:
                raise RuntimeError(f"no /health after {timeout:.0f} s; the log:\n{self.log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.05)

    def log_tail(self, lines: int = 40) -> str:
        self.log_file.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=30).json()

    def histograms(self) -> dict[str, tuple[dict[float, float], float]]:
        """The engine's histograms from /metrics, by family (ENGINE_HISTOGRAMS): ({upper bound s: cumulative count},
        sum of s) each, ({}, 0.0) for one the server does not have."""
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        found = {name: ({}, 0.0) for name in ENGINE_HISTOGRAMS.values()}
        for family in text_string_to_metric_families(text):
            if family.name in found:
                buckets = {float(s.labels["le"]): s.value for s in family.samples if s.name.endswith("_bucket")}
                found[family.name] = buckets, sum(s.value for s in family.samples if s.name.endswith("_sum"))
        return found

    def cpu_ticks(self) -> tuple[int, int]:
        """(main thread, whole process) CPU ticks: uvicorn's event loop runs on the main thread."""
        main = total = 0
        task_dir = Path(f"/proc/{self.process.pid}/task")
        for task in task_dir.iterdir():
            with contextlib.suppress(OSError):
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                ticks = int(fields[11]) + int(fields[12])  # utime + stime
                total += ticks
                if task.name == str(self.process.pid):
                    main = ticks
        return main, total

    def stop(self) -> None:
        if self.log_file.closed:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)  # uvicorn waits for open streams to end: not for long
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_file.close()


class CpuWindow:
    """The server's CPU seconds (event loop, whole process) between enter and exit."""

    def __init__(self, server: Server):
        self.server = server
        self.tick = os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> CpuWindow:
        self.start, self.started = self.server.cpu_ticks(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        end = self.server.cpu_ticks()
        self.wall_s = time.perf_counter() - self.started
        self.loop_s = (end[0] - self.start[0]) / self.tick
        self.process_s = (end[1] - self.start[1]) / self.tick

    def report(self, events: int) -> dict:
        per_event = self.loop_s / events * 1e6 if events else None
        return {
            "server_loop_cpu_s": round(self.loop_s, 2),
            "server_loop_busy": round(self.loop_s / self.wall_s, 3),
            "server_process_cpu_s": round(self.process_s, 2),
            "loop_us_per_event": round(per_event, 1) if per_event else None,
            "loop_events_per_cpu_s": round(1e6 / per_event) if per_event else None,
            "process_us_per_event": round(self.process_s / events * 1e6, 1) if events else None,
        }


# -- the client --------------------------------------------------------------------------------------------


async def stream_completion(
    client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int, on_token=None
) -> dict:
    """One streamed completion: when it was sent, when each piece of text arrived, how it finished."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},  # the reply's token count: an event may carry several tokens
    }
    record = {"sent": time.perf_counter(), "times": [], "finish": None, "error": None, "chars": 0, "tokens": None}
    record["model"] = model
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                record["error"] = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return record
            pending, done = b"", False
            async for chunk in response.aiter_raw():
                now = time.perf_counter()
                pending += chunk
                *events, pending = pending.split(b"\n\n")
                for event in events:
                    data = event.removeprefix(b"data: ")
                    if data == b"[DONE]":
                        done = True
                        continue
                    message = json.loads(data)
                    if "error" in message:
                        record["error"] = message["error"]["message"]
                        continue
                    if message.get("usage"):
                        record["tokens"] = message["usage"]["completion_tokens"]
                    if not message["choices"]:  # the usage chunk
                        continue
                    choice = message["choices"][0]
                    if choice["text"]:
                        record["times"].append(now)
                        record["chars"] += len(choice["text"])
                        if on_token is not None:
                            on_token()
                    record["finish"] = choice["finish_reason"] or record["finish"]
            if not done and not record["error"]:  # cut short without a word: not a finished stream
                record["error"] = "the stream ended before [DONE]"
    except httpx.HTTPError as err:
        record["error"] = f"{type(err).__name__}: {err}"
    return record


def new_client(streams: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=streams + 8, max_keepalive_connections=streams + 8)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(900.0))


async def warm_client(client: httpx.AsyncClient, url: str) -> None:
    """Run this process's client code once on a route that does not reach the engine: a fresh process's
    first stream pays for its lazy set-up (~25 ms on the 2-core machine, against a warm server), which is
    not the server's time."""
    (await client.get(f"{url}/v1/models")).raise_for_status()


async def _run_jobs(url: str, model: str, jobs: list[tuple], start_at: float) -> dict:
    async with new_client(len(jobs)) as client:
        await warm_client(client, url)  # before the clock starts
        await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
        cpu, wall = time.process_time(), time.perf_counter()  # the streams' own CPU: not the set-up's
        records = await asyncio.gather(
            *(stream_completion(client, url, job[2] if len(job) > 2 else model, job[0], job[1]) for job in jobs)
        )
        return {"records": records, "cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}


def run_jobs_in_process(url: str, model: str, jobs: list[tuple], start_at: float) -> dict:
    """A client process's share of a scenario (perf_counter is CLOCK_MONOTONIC: comparable across processes):
    its records, and its CPU and wall seconds from the common start to its last stream's end. A job is (prompt,
    reply tokens), or (prompt, reply tokens, model) for another model than `model`."""
    return asyncio.run(_run_jobs(url, model, jobs, start_at))


START_MARGIN_S = 0.5  # from handing a scenario's streams to the client processes to their common start


class Clients:
    """Client processes that run streams together, each with its own event loop and connection pool."""

    def __init__(self, processes: int):
        import multiprocessing

        self.processes = processes
        self.pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
        list(self.pool.map(time.sleep, [0.01] * processes))  # start them now, not inside a measurement

    def run(self, url: str, model: str, jobs: list[tuple]) -> tuple[list[dict], dict]:
        count = max(1, min(self.processes, math.ceil(len(jobs) / 8)))
        shares = [jobs[i::count] for i in range(count)]
        start_at = time.perf_counter() + START_MARGIN_S
        futures = [self.pool.submit(run_jobs_in_process, url, model, share, start_at) for share in shares]
        results = [f.result() for f in futures]
        records = [r for result in results for r in result["records"]]
        busy = [result["cpu_s"] / max(result["wall_s"], 1e-9) for result in results]
        client = {"client_processes": count, "client_cpu_s": round(sum(r["cpu_s"] for r in results), 2)}
        client["client_busiest"] = round(max(busy), 3)
        client["client_may_limit"] = max(busy) > CLIENT_BUSY
        return records, client

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


# -- statistics --------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between the two nearest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def finished(record: dict) -> bool:
    """A stream that ran to its max_tokens (the bench asks for ignore_eos) without an error."""
    return record["finish"] == "length" and not record["error"]


def summarize(records: list[dict], reply_tokens: int) -> dict:
    """Tokens, events, time to first token and inter-token gaps over all streams of a scenario.

    tokens: the finished streams' replies as the server's usage counts them (reply_tokens each where a
    stream had no usage), not their events: a token whose text is held back (an incomplete UTF-8 byte
    piece) sends no event, and its text comes with the next token's, so `tokens_per_event` > 1 says that
    some gaps (between events, as a user sees text arrive) span more than one engine step. Streams that
    failed or were cut short add no tokens, and count in `failed`; the TTFT and gap percentiles are over
    `ttft_n` streams (those that got a first token) and `gap_n` gaps: a p99 of fewer than 100 is about the
    largest."""
    done = [r for r in records if finished(r)]
    ttft = [r["times"][0] - r["sent"] for r in records if r["times"]]
    gaps = [b - a for r in records for a, b in zip(r["times"], r["times"][1:], strict=False)]
    first_sent = min(r["sent"] for r in records)
    last = max((r["times"][-1] for r in records if r["times"]), default=first_sent)
    wall = last - first_sent
    counts = [reply_tokens if r.get("tokens") is None else r["tokens"] for r in done]
    tokens = sum(counts)
    finished_events = sum(len(r["times"]) for r in done)
    return {
        "streams": len(records),
        "finished": len(done),
        "failed": len(records) - len(done),
        "errors": sorted({str(r["error"]) for r in records if r["error"]})[:3],
        "tokens": tokens,
        "tokens_from_usage": sum(r.get("tokens") is not None for r in done),
        "short_replies": sum(c != reply_tokens for c in counts),
        "events": sum(len(r["times"]) for r in records),
        "tokens_per_event": round(tokens / finished_events, 3) if finished_events else None,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1) if wall > 0 else None,
        "ttft_n": len(ttft),
        "ttft_p50_ms": ms(percentile(ttft, 50)),
        "ttft_p99_ms": ms(percentile(ttft, 99)),
        "gap_n": len(gaps),
        "gap_mean_ms": ms(sum(gaps) / len(gaps)) if gaps else None,
        "gap_p50_ms": ms(percentile(gaps, 50)),
        "gap_p99_ms": ms(percentile(gaps, 99)),
        "gap_max_ms": ms(max(gaps, default=None)),
    }


def engine_gaps(before: tuple[dict[float, float], float], after: tuple[dict[float, float], float]) -> dict:
    """The engine's own inter-token gaps between two /metrics readings (Engine.latency): what the steps gave each
    row, before the HTTP side. The mean is exact (the histogram's sum over its count); p50 / p99 are interpolated
    inside a bucket as Prometheus' histogram_quantile, so they are only as sharp as the buckets."""
    (buckets_before, _), (buckets_after, _) = before, after
    bounds = sorted(buckets_after)
    counts = [buckets_after[b] - buckets_before.get(b, 0.0) for b in bounds]  # cumulative

    def quantile(q: float) -> float | None:
        if not counts or counts[-1] <= 0:
            return None
        rank = q * counts[-1]
        i = next(i for i, c in enumerate(counts) if c >= rank)
        if math.isinf(bounds[i]):
            return bounds[i - 1] if i else None  # above the largest bound: report that bound
        low, below = (bounds[i - 1], counts[i - 1]) if i else (0.0, 0.0)
        inside = counts[i] - below
        return low + (bounds[i] - low) * ((rank - below) / inside if inside else 1.0)

    return {
        "engine_gap_mean_ms": ms(histogram_mean(before, after)),
        "engine_gap_p50_ms": ms(quantile(0.5)),
        "engine_gap_p99_ms": ms(quantile(0.99)),
    }


def engine_gpu(before: dict, after: dict) -> dict:
    """The decode steps' mean GPU time and the GPU's mean idle time before a step, in ms to the µs, between two
    readings of Server.histograms (CUDA engines; None elsewhere): whether the GPU or the host sets the step rate."""
    row = {}
    for key, field in (("step_gpu", "engine_step_gpu_mean_ms"), ("gpu_idle", "engine_gpu_idle_mean_ms")):
        mean = histogram_mean(before[ENGINE_HISTOGRAMS[key]], after[ENGINE_HISTOGRAMS[key]])
        row[field] = None if mean is None else round(1000 * mean, 3)
    return row


def histogram_mean(before: tuple[dict[float, float], float], after: tuple[dict[float, float], float]) -> float | None:
    """The exact mean, in s, of what a histogram counted between two readings (its sum over its +Inf count), or None
    where it counted nothing."""
    (buckets_before, sum_before), (buckets_after, sum_after) = before, after
    count = buckets_after.get(math.inf, 0.0) - buckets_before.get(math.inf, 0.0)
    return (sum_after - sum_before) / count if count > 0 else None


def random_prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    """BOS and random ordinary pieces (ids past the byte pieces), exactly `length` tokens."""
    return [1] + [rng.randrange(300, vocab) for _ in range(length - 1)]


# -- scenarios ---------------------------------------------------------------------------------------------


def scenario_first(server: Server, model: str, args, vocab: int) -> dict:
    """(b) The first request after startup, new prompt lengths, then the 128-token length again."""
    rng = random.Random(1)
    reply = args.first_reply_tokens

    async def one(prompt: list[int]) -> dict:
        async with new_client(1) as client:
            return await stream_completion(client, server.url, model, prompt, reply)

    def ttft(record: dict) -> float | None:
        return record["times"][0] - record["sent"] if record["times"] else None

    async def warm() -> None:  # so the first completion measures the server's first request alone
        async with new_client(1) as client:
            await warm_client(client, server.url)

    asyncio.run(warm())
    before = server.health().get("engine", {})
    first = asyncio.run(one(random_prompt(rng, args.prompt_tokens, vocab)))
    first_engine = engine_first_token(before, server.health().get("engine", {}))
    before = server.health().get("engine", {})
    longest = min(args.context - reply - 1, 1024)
    lengths = rng.sample([n for n in range(16, longest) if n != args.prompt_tokens], args.new_lengths)
    new = [(n, ttft(asyncio.run(one(random_prompt(rng, n, vocab))))) for n in lengths]
    middle = server.health().get("engine", {})
    repeated = [ttft(asyncio.run(one(random_prompt(rng, args.prompt_tokens, vocab)))) for _ in range(args.new_lengths)]
    after = server.health().get("engine", {})
    new_times = [t for _, t in new if t is not None]
    repeated_times = [t for t in repeated if t is not None]
    return {
        "first_request_ttft_ms": ms(ttft(first)),
        "first_request_total_ms": ms(first["times"][-1] - first["sent"]) if first["times"] else None,
        "first_request_error": first["error"],
        "new_lengths": [n for n, _ in new],
        "new_length_ttft_ms": [ms(t) for _, t in new],
        "new_length_ttft_p50_ms": ms(percentile(new_times, 50)),
        "new_length_ttft_p99_ms": ms(percentile(new_times, 99)),
        "new_length_failed": len(new) - len(new_times),  # no first token: not in the percentiles
        "repeated_128_ttft_p50_ms": ms(percentile(repeated_times, 50)),
        "repeated_128_ttft_p99_ms": ms(percentile(repeated_times, 99)),
        "repeated_128_failed": len(repeated) - len(repeated_times),
        "all_after_startup_ttft_p99_ms": ms(
            percentile([t for t in (ttft(first), *new_times, *repeated_times) if t is not None], 99)
        ),
        "first_request_engine": first_engine,
        "new_length_engine": engine_first_token(before, middle),
        "repeated_128_engine": engine_first_token(middle, after),
    }


def engine_first_token(before: dict, after: dict) -> dict:
    """The engine's own share of the first tokens between two /health readings, mean ms a first token:
    waiting for a row (queue) and admission to the token's event (prefill); the client's time to first
    token less these two is the HTTP side's and the network's."""
    count = after.get("first_tokens", 0) - before.get("first_tokens", 0)
    if not count:
        return {}
    return {
        f"engine_{name}_ms": round(1000 * (after[f"first_token_{name}_s"] - before[f"first_token_{name}_s"]) / count, 2)
        for name in ("queue", "prefill")
    }


def gc_during(before: dict, after: dict) -> dict:
    """The garbage collections between two /health readings (serve/heap.py), the server's and (`serve
    --engine-process`) its engine process's: how many were full (generation 2), and every pause added up."""
    row = {}
    for who, first, last in (
        ("server", before.get("gc"), after.get("gc")),
        ("engine", before.get("engine", {}).get("gc"), after.get("engine", {}).get("gc")),
    ):
        if first and last:
            row[f"{who}_gc_full"] = last["collections"][2] - first["collections"][2]
            row[f"{who}_gc_pause_ms"] = round(1000 * (last["pause_s"] - first["pause_s"]), 1)
    return row


def scenario_aggregate(server: Server, clients: Clients, model: str, args, vocab: int) -> Iterator[dict]:
    """(a) C streams at once, fixed prompt and reply lengths: a row per concurrency and repeat, as measured (the same
    prompts each repeat: runs of one code differed by 2-5% in tokens/s, so a goal's margin wants several)."""
    for concurrency, repeat in itertools.product(args.concurrency, range(args.repeats)):
        rng = random.Random(concurrency)
        jobs = [(random_prompt(rng, args.prompt_tokens, vocab), args.reply_tokens) for _ in range(concurrency)]
        health_before, histograms_before = server.health(), server.histograms()
        with CpuWindow(server) as cpu:
            records, client = clients.run(server.url, model, jobs)
        health_after = server.health()
        before, after = health_before.get("engine", {}), health_after.get("engine", {})
        row = {"concurrency": concurrency, "repeat": repeat, **summarize(records, args.reply_tokens), **client}
        histograms = server.histograms()
        gaps = ENGINE_HISTOGRAMS["inter_token"]
        row |= engine_gaps(histograms_before[gaps], histograms[gaps]) | engine_gpu(histograms_before, histograms)
        row |= cpu.report(row["events"]) | gc_during(health_before, health_after)
        steps = after.get("steps", 0) - before.get("steps", 0)
        decoded = after.get("decode_tokens", 0) - before.get("decode_tokens", 0)
        row["engine_steps"], row["engine_mean_batch"] = steps, round(decoded / steps, 1) if steps else None
        row |= engine_first_token(before, after)
        print(json.dumps(row), flush=True)
        yield row


def scenario_join(server: Server, model: str, args, vocab: int) -> dict:
    """(c) A long prompt joins running streams: the worst gap among them while it prefills."""
    rng = random.Random(3)
    running, warm_tokens = args.join_streams, 16
    prompts = [random_prompt(rng, args.prompt_tokens, vocab) for _ in range(running)]
    long_prompt = random_prompt(rng, args.join_prompt_tokens, vocab)

    async def run() -> tuple[list[dict], dict]:
        counts = [0] * running
        all_warm = asyncio.Event()

        def counter(i: int):
            def on_token():
                counts[i] += 1
                if min(counts) >= warm_tokens:
                    all_warm.set()

            return on_token

        async with new_client(running + 1) as client:
            streams = [
                asyncio.ensure_future(
                    stream_completion(client, server.url, model, p, args.join_reply_tokens, on_token=counter(i))
                )
                for i, p in enumerate(prompts)
            ]
            warm = asyncio.ensure_future(all_warm.wait())
            await asyncio.wait([warm, *streams], return_when=asyncio.FIRST_COMPLETED)
            if all_warm.is_set():
                joining = await stream_completion(client, server.url, model, long_prompt, 16)
            else:  # a stream ended (failed) before all were streaming: nothing to join
                warm.cancel()
                joining = {"sent": time.perf_counter(), "times": [], "error": "a running stream ended early"}
            return list(await asyncio.gather(*streams)), joining

    health_before = server.health()
    cpu, wall = time.process_time(), time.perf_counter()
    records, joining = asyncio.run(run())  # the client is this process: its CPU, as Clients.run reports
    client_busy = (time.process_time() - cpu) / (time.perf_counter() - wall)
    gc = gc_during(health_before, server.health())
    sent = joining["sent"]
    first = joining["times"][0] if joining["times"] else math.inf
    during, before = [], []
    for r in records:
        for a, b in zip(r["times"], r["times"][1:], strict=False):
            if b > sent and a < first:  # this gap overlaps the long prompt's wait for its first token
                during.append(b - a)
            elif b <= sent:
                before.append(b - a)
    return {
        "running_streams": running,
        "join_prompt_tokens": args.join_prompt_tokens,
        "join_ttft_ms": ms(first - sent) if joining["times"] else None,
        "join_error": joining["error"],
        "worst_gap_during_join_ms": ms(max(during, default=None)),
        "gaps_during_join": len(during),
        "gap_before_p50_ms": ms(percentile(before, 50)),
        "gap_before_p99_ms": ms(percentile(before, 99)),
        "running_finished": sum(map(finished, records)),
        "client_busy": round(client_busy, 3),
        "client_may_limit": client_busy > CLIENT_BUSY,
        **gc,
    }


def scenario_events(clients: Clients, args, scratch: Path) -> list[dict]:
    """(d) The HTTP side alone: the real app over a stub engine (no model), many streams, paced as a GPU
    engine steps (one event per stream per step: nothing to coalesce) and flooding (a step every ms)."""
    return [events_run(clients, args, scratch, step_ms) for step_ms in args.events_step_ms]


def start_stub_server(scratch: Path, step_ms: float, threadpool: bool = False) -> Server:
    """This script as the real app over a StubEngine (serve_stub), in a process of its own, answering /health."""
    port = free_port()
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--stub-server",
        str(port),
        "--stub-step-ms",
        str(step_ms),
    ]
    command += ["--stub-threadpool"] if threadpool else []
    return Server(command, port, scratch / "stub-server.log", timeout=120)


def events_run(clients: Clients, args, scratch: Path, step_ms: float) -> dict:
    server = start_stub_server(scratch, step_ms)
    try:
        rng = random.Random(4)
        jobs = [(random_prompt(rng, 8, 32000), args.events_reply_tokens) for _ in range(args.events_streams)]
        with CpuWindow(server) as cpu:
            records, client = clients.run(server.url, "stub", jobs)
        row = summarize(records, args.events_reply_tokens)
        row = {
            "stub_step_ms": step_ms,
            "offered_events_per_s": round(args.events_streams * 1000 / step_ms) if step_ms else None,
            "streams": row["streams"],
            "finished": row["finished"],
            "failed": row["failed"],
            "errors": row["errors"],
            "events": row["events"],
            "wall_s": row["wall_s"],
            "events_per_s": round(row["events"] / row["wall_s"]) if row["wall_s"] else None,
            "gap_p50_ms": row["gap_p50_ms"],
            "gap_p99_ms": row["gap_p99_ms"],
            **client,
            **cpu.report(row["events"]),
        }
        return row
    finally:
        server.stop()


ADMIT_STREAMS, ADMIT_BURSTS = 256, 5
# serve/app.py's INLINE in the stub server: False sends every request's work to the threadpool (the app before)
ADMIT_MODES = {"threadpool": False, "serve": True}


def scenario_admit(clients: Clients, args, scratch: Path) -> list[dict]:
    """(e) Bursts of one-token completions at the stub server: the HTTP side's CPU per request, each way."""
    rows = []
    for mode, inline in ADMIT_MODES.items():
        server = start_stub_server(scratch, 20.0, threadpool=not inline)
        try:
            for burst in range(ADMIT_BURSTS):
                rng = random.Random(burst)
                jobs = [(random_prompt(rng, args.prompt_tokens, 32000), 1) for _ in range(ADMIT_STREAMS)]
                with CpuWindow(server) as cpu:
                    records, client = clients.run(server.url, "stub", jobs)
                summary = summarize(records, 1)
                rows.append({
                    "mode": mode, "burst": burst, "streams": summary["streams"], "finished": summary["finished"],
                    "errors": summary["errors"], "ttft_p50_ms": summary["ttft_p50_ms"],
                    "ttft_p99_ms": summary["ttft_p99_ms"],
                    "loop_us_per_request": round(cpu.loop_s / len(records) * 1e6, 1),
                    "process_us_per_request": round(cpu.process_s / len(records) * 1e6, 1), **client,
                })  # fmt: skip
                print("admit:", json.dumps(rows[-1]), flush=True)
        finally:
            server.stop()
    return rows


# -- the stub engine (scenarios events and admit) ----------------------------------------------------------


class StubRequest:
    def __init__(self, request_id: int, prompt_ids, params, sink):
        self.id, self.prompt_ids, self.params, self.sink = request_id, list(prompt_ids), params, sink
        self.completion_tokens = 0
        self.done = self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class StubEngine:
    """What the app sees of an Engine, with no model: each step gives every active request one
    one-word token (as the synthetic tokenizer's pieces decode), so only the HTTP side costs anything."""

    def __init__(self, tokenizer, context: int, step_s: float):
        from types import SimpleNamespace

        self.tokenizer, self.context, self.step_s = tokenizer, context, step_s
        self.model = SimpleNamespace(args=SimpleNamespace(vocab_size=len(tokenizer)))
        self.active: list[StubRequest] = []
        self.lock = threading.Lock()
        self.ids = 0
        self.steps = self.tokens = 0
        threading.Thread(target=self._loop, daemon=True, name="stub-engine").start()

    def submit(self, prompt_ids, params, sink) -> StubRequest:
        with self.lock:
            self.ids += 1
            request = StubRequest(self.ids, prompt_ids, params, sink)
            self.active.append(request)
        return request

    def max_new_tokens(self, prompt_length: int, requested: int | None) -> int:
        room = self.context - prompt_length
        return max(0, min(requested, room) if requested else room)

    def snapshot_stats(self) -> dict:
        return {"steps": self.steps, "decode_tokens": self.tokens, "context": self.context, "active": len(self.active)}

    def _loop(self) -> None:
        """A step every step_s (from the previous step's start, as a GPU step's length does not depend on
        how long the host took to hand out its events)."""
        from vicunaflow.engine import Event

        next_step = time.perf_counter()
        while True:
            next_step = max(next_step + self.step_s, time.perf_counter())  # late: no catching up in a burst
            time.sleep(next_step - time.perf_counter() if next_step > time.perf_counter() else 0)
            with self.lock:
                active = list(self.active)
            if not active:
                continue
            self.steps += 1
            for request in active:
                if request.cancelled or request.done:
                    request.done = True
                    continue
                request.completion_tokens += 1
                self.tokens += 1
                last = request.completion_tokens >= request.params.max_new_tokens
                request.done = last
                event = Event(
                    f" w{request.completion_tokens}",
                    finish_reason="length" if last else None,
                    prompt_tokens=len(request.prompt_ids),
                    completion_tokens=request.completion_tokens,
                )
                request.sink(event)
            with self.lock:
                self.active = [r for r in self.active if not r.done]


def serve_stub(port: int, step_ms: float, threadpool: bool = False) -> None:
    """The real create_app, run by uvicorn as `vicunaflow serve` runs it, over a StubEngine. threadpool: every
    request's work in the threadpool, as before serve/app.py's INLINE (scenario admit)."""
    import logging

    import uvicorn

    sys.path.insert(0, str(HERE))
    from bench_chat import make_tokenizer

    from vicunaflow.serve import SWITCH_INTERVAL_S
    from vicunaflow.serve import app as serve_app
    from vicunaflow.serve.app import create_app

    serve_app.INLINE = not threadpool
    sys.setswitchinterval(SWITCH_INTERVAL_S)  # as serve sets it

    logging.basicConfig(level=logging.WARNING)
    app = create_app({"stub": StubEngine(make_tokenizer(32000), context=2048, step_s=step_ms / 1000)})
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# -- main --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="7b", choices=["7b", "13b"])
    parser.add_argument("--tiny", action="store_true", help="the tiny Vicuna on the CPU, scenarios scaled down")
    parser.add_argument("--scratch", type=Path, help="where the model folder is written once (default: a temp dir)")
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64, 256])
    parser.add_argument("--repeats", type=int, default=1, help="(a) aggregate: runs of each concurrency (median shown)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--reply-tokens", type=int)
    parser.add_argument("--max-batch-size", type=int, help="serve --max-batch-size (default 256)")
    parser.add_argument("--max-context", type=int, default=2048)
    parser.add_argument(
        "--kv-cache-tokens", type=int, help="serve --kv-cache-tokens (default 7b: 131072, 13b: 98304, tiny: 65536)"
    )
    parser.add_argument("--serve-arg", action="append", default=[], help="more `vicunaflow serve` flags (repeat)")
    parser.add_argument("--client-procs", type=int, default=min(4, max(1, (os.cpu_count() or 2) // 4)))
    parser.add_argument("--output", type=Path)
    parser.add_argument(
        "--events-step-ms",
        type=float,
        nargs="+",
        default=[20.0, 1.0],
        help="stub engine step lengths for the events scenario (20: a batch-256 7B step on an H200)",
    )
    parser.add_argument("--stub-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--stub-step-ms", type=float, default=20.0, help=argparse.SUPPRESS)
    parser.add_argument("--stub-threadpool", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: at least 1")
    if args.stub_server:
        serve_stub(args.stub_server, args.stub_step_ms, args.stub_threadpool)
        return

    args.context = args.max_context
    args.reply_tokens = args.reply_tokens or (64 if args.tiny else 256)
    args.first_reply_tokens = 8
    args.new_lengths = 20
    args.join_streams = 31
    args.join_prompt_tokens = 1500
    args.join_reply_tokens = 160 if args.tiny else 384
    args.events_streams = 256
    args.events_reply_tokens = 200
    batch = args.max_batch_size or 256
    # the paged cache's size over all streams: 256 x (128 + 256) tokens fit; 7B 64 GiB, 13B 75 GiB on an H200
    kv_tokens = args.kv_cache_tokens or (65536 if args.tiny else {"7b": 131072, "13b": 98304}[args.size])
    tag = "tiny_cpu" if args.tiny else args.size
    output = args.output or HERE / "results" / f"serve_{tag}.json"
    scratch = args.scratch or Path(os.environ.get("TMPDIR", "/tmp")) / f"vicunaflow-bench-serve-{tag}"
    scratch.mkdir(parents=True, exist_ok=True)

    result = {
        "bench": "serve",
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "host": platform.node()},
        "model": "tiny vicuna" if args.tiny else f"random LLaMA {args.size} float16",
        "settings": {
            k: getattr(args, k)
            for k in (
                "prompt_tokens",
                "reply_tokens",
                "concurrency",
                "repeats",
                "context",
                "join_prompt_tokens",
                "client_procs",
            )
        },
        "serve_flags": [],
        "reference_previous_server_7b_h200": REFERENCE_7B,
        "goals_7b_h200": GOALS_7B,
    }
    result["settings"] |= {"max_batch_size": batch, "kv_cache_tokens": kv_tokens}

    def save() -> None:
        """After every scenario: a run cut short by its time limit keeps what it measured."""
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")

    # `timeout` sends SIGTERM: unwind through the finally blocks, so the server (holding the GPU) stops too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    clients = Clients(args.client_procs)
    try:
        if set(args.only) & ONE_MODEL_SCENARIOS:
            run_model_scenarios(result, clients, args, scratch, batch, kv_tokens, save)
        if "models" in args.only:
            result["models"] = scenario_models(clients, args, scratch, batch, kv_tokens, result)
            save()
        if "events" in args.only:
            result["events"] = scenario_events(clients, args, scratch)
            for row in result["events"]:
                print("events:", json.dumps(row), flush=True)
            save()
        if "admit" in args.only:
            result["admit"] = scenario_admit(clients, args, scratch)
            save()
    finally:
        clients.close()
    save()
    print_summary(result)
    print(f"wrote {output}")


def model_folder(result: dict, args, scratch: Path) -> tuple[Path, int]:
    """The served model's folder (written once: the seconds it took stay, a second call adds 0) and its vocabulary."""
    if args.tiny:
        return make_tiny_vicuna(scratch), 1024
    model_path = scratch / f"llama-{args.size}-random"
    seconds = round(write_random_model(model_path, args.size, args.context), 1)
    result["write_model_s"] = max(result.get("write_model_s", 0.0), seconds)
    return model_path, 32000


def serve_flags(args, batch: int, kv_tokens: int) -> list[str]:
    """`vicunaflow serve`'s flags for every model of a scenario's server (kv_tokens: each model's cache)."""
    flags = ["--max-batch-size", str(batch), "--max-context", str(args.context), "--kv-cache-tokens"]
    return [*flags, str(kv_tokens), "--seed", "0", *args.serve_arg]


def run_model_scenarios(result: dict, clients: Clients, args, scratch: Path, batch: int, kv_tokens: int, save) -> None:
    """Start `vicunaflow serve` on the model and run the scenarios that need it, first request first."""
    model_path, vocab = model_folder(result, args, scratch)
    flags = result["serve_flags"] = serve_flags(args, batch, kv_tokens)
    port = free_port()
    command = [sys.executable, "-m", "vicunaflow", "serve", "--model-path", str(model_path), "--port", str(port)]
    server = Server([*command, *flags], port, scratch / "server.log", timeout=900)
    try:
        result["startup_s"] = round(server.startup_s, 2)
        print(f"server up in {server.startup_s:.1f} s", flush=True)
        save()
        model = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
        if "first" in args.only:
            result["first"] = scenario_first(server, model, args, vocab)
            print("first:", json.dumps(result["first"]), flush=True)
            save()
        if "aggregate" in args.only:
            result["aggregate"] = []
            for row in scenario_aggregate(server, clients, model, args, vocab):
                result["aggregate"].append(row)
                save()
        if "join" in args.only:
            result["join"] = scenario_join(server, model, args, vocab)
            print("join:", json.dumps(result["join"]), flush=True)
        result["engine"] = server.health().get("engine")
        save()
    finally:
        server.stop()


def scenario_models(clients: Clients, args, scratch: Path, batch: int, kv_tokens: int, result: dict) -> dict:
    """(f) The model under two names in one server, each name's engine in its own process, then each concurrency's
    streams split over both at once. Half the KV cache each, so that two 7B or 13B models fit one H200."""
    model_path, vocab = model_folder(result, args, scratch)
    flags = serve_flags(args, batch, kv_tokens // len(MODEL_NAMES))
    port = free_port()
    command = [sys.executable, "-m", "vicunaflow", "serve", "--port", str(port)]
    for _ in MODEL_NAMES:  # the model twice, then its names in the same order
        command += ["--model-path", str(model_path)]
    for name in MODEL_NAMES:
        command += ["--model-name", name]
    row: dict = {"names": list(MODEL_NAMES), "serve_flags": flags, "runs": []}
    try:
        server = Server([*command, *flags], port, scratch / "server-models.log", timeout=900)
    except RuntimeError as err:  # e.g. the two do not fit: said, and the other scenarios keep theirs
        row["error"] = str(err)[-2000:]
        print("models:", json.dumps(row), flush=True)
        return row
    try:
        row["startup_s"] = round(server.startup_s, 2)
        print(f"two-model server up in {server.startup_s:.1f} s", flush=True)
        for concurrency, repeat in itertools.product(args.concurrency, range(args.repeats)):
            rng = random.Random(concurrency)
            jobs = [
                (random_prompt(rng, args.prompt_tokens, vocab), args.reply_tokens, MODEL_NAMES[i % len(MODEL_NAMES)])
                for i in range(concurrency)
            ]
            records, client = clients.run(server.url, MODEL_NAMES[0], jobs)
            run = {"concurrency": concurrency, "repeat": repeat, **summarize(records, args.reply_tokens), **client}
            run["finished_per_model"] = {  # the client processes' records come share by share, not in job order
                name: sum(r["model"] == name and finished(r) for r in records) for name in MODEL_NAMES
            }
            print("models:", json.dumps(run), flush=True)
            row["runs"].append(run)
        row |= replies_alone(server.url, vocab, args)
        print("models, alone:", json.dumps({k: v for k, v in row.items() if k.startswith("alone")}), flush=True)
        health = server.health()  # with several models and no key, /health gives the totals only (the arena's rule)
        row["health"] = {"status": health.get("status"), "totals": health.get("totals")}
    finally:
        server.stop()
    return row


ALONE_PROMPTS, ALONE_REPLY_TOKENS = 8, 128  # the models scenario's prompts sent alone to each name, greedy


def replies_alone(url: str, vocab: int, args) -> dict:
    """Each of ALONE_PROMPTS prompts sent alone to every name of the models scenario, one after another: do the
    names' engine processes (one folder) give the same greedy tokens to a request that has every step to itself?
    They did not while each process timed its own kernel tiles (docs/benchmarks.md, twenty-sixth session)."""
    rng = random.Random(7)
    prompts = [random_prompt(rng, args.prompt_tokens, vocab) for _ in range(ALONE_PROMPTS)]

    def tokens(name: str, prompt: list[int]) -> list[str] | None:
        body = {"model": name, "prompt": prompt, "max_tokens": ALONE_REPLY_TOKENS, "temperature": 0}
        body |= {"ignore_eos": True, "logprobs": 0}
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
        return response.json()["choices"][0]["logprobs"]["tokens"] if response.status_code == 200 else None

    replies = [[tokens(name, prompt) for name in MODEL_NAMES] for prompt in prompts]
    answered = [r for r in replies if None not in r]
    return {
        "alone_prompts": len(prompts),
        "alone_answered": len(answered),
        "alone_same_replies": sum(all(r == reply[0] for r in reply) for reply in answered),
    }


def median_row(rows: list[dict], key: str) -> dict:
    """The run whose `key` is the median, every number shown from that one run (not a median per measure,
    which would mix runs); of an even count the lower middle one, so two runs do not show the better."""
    ordered = sorted(rows, key=lambda row: row[key] or 0.0)
    return ordered[(len(ordered) - 1) // 2]


def caveats(row: dict) -> str:
    """What makes a row's numbers less than they seem: failed streams, a busy client, a p99 of few samples."""
    notes = []
    if row.get("failed"):
        notes.append(f"{row['failed']} of {row['streams']} streams failed")
    if row.get("client_may_limit"):
        notes.append("client may limit")
    small = [f"{name} n={row[f'{name}_n']}" for name in ("ttft", "gap") if row.get(f"{name}_n", 100) < 100]
    if small:
        notes.append(f"p99 of {', '.join(small)}: about the largest")
    return f" ({'; '.join(notes)})" if notes else ""


def print_summary(result: dict) -> None:
    """The docs table's rows, with issue 16's previous-server numbers (7B, one H200) beside them."""
    ref, goal = REFERENCE_7B, GOALS_7B
    lines = [f"| measure | {result['model']} | previous server 7B | goal 7B |", "|---|---|---|---|"]
    if "startup_s" in result:
        lines.append(f"| startup, s | {result['startup_s']} | — | reported |")
    if first := result.get("first"):
        lines += [
            f"| first request: TTFT / whole reply, ms | {first['first_request_ttft_ms']} / "
            f"{first['first_request_total_ms']} | 680 / 5600 | TTFT <= {goal['ttft_128_p99_ms']} |",
            f"| TTFT, 20 new lengths, p50 / p99 ms | {first['new_length_ttft_p50_ms']} / "
            f"{first['new_length_ttft_p99_ms']} | 45 + 90..1200 | — |",
            f"| TTFT, 128 tokens repeated, p50 / p99 ms | {first['repeated_128_ttft_p50_ms']} / "
            f"{first['repeated_128_ttft_p99_ms']} | ~45 | p99 <= {goal['ttft_128_p99_ms']} |",
        ]
    for concurrency in dict.fromkeys(row["concurrency"] for row in result.get("aggregate", [])):
        rows = [row for row in result["aggregate"] if row["concurrency"] == concurrency]
        row, c = median_row(rows, "tokens_per_s"), str(concurrency)
        speeds = sorted(r["tokens_per_s"] or 0.0 for r in rows)
        spread = f" (median of {len(rows)}: {speeds[0]}-{speeds[-1]})" if len(rows) > 1 else ""
        gpu_label = gpu = ""  # on CUDA: whether the GPU or the host set the step rate
        if row.get("engine_step_gpu_mean_ms") is not None:
            gpu_label = "; GPU a step / idle before it, mean ms"
            gpu = f"; {row['engine_step_gpu_mean_ms']} / {row['engine_gpu_idle_mean_ms']}"
        lines.append(
            f"| {c} streams: tokens/s; TTFT p50/p99 ms; gap p50/p99 ms{gpu_label} | {row['tokens_per_s']}{spread}; "
            f"{row['ttft_p50_ms']}/{row['ttft_p99_ms']}; {row['gap_p50_ms']}/{row['gap_p99_ms']}{gpu}"
            f"{caveats(row)} | "
            f"{ref['aggregate_tokens_per_s'].get(c) or '—'} | {goal['aggregate_tokens_per_s'].get(c) or '—'} |"
        )
    if join := result.get("join"):
        lines.append(
            f"| 1500-token prompt joins 31: worst gap ms (p50 before) | {join['worst_gap_during_join_ms']} "
            f"({join['gap_before_p50_ms']}){' (client may limit)' if join.get('client_may_limit') else ''}"
            f"{' (join failed)' if join['join_error'] else ''} | {ref['join_worst_gap_ms']} | "
            f"<= {goal['join_worst_gap_ms']} |"
        )
    for row in result.get("events", []):
        lines.append(
            f"| HTTP side, stub steps of {row['stub_step_ms']} ms: events/s; loop us/event | "
            f"{row['events_per_s']}; {row['loop_us_per_event']}{caveats(row)} | — | never the bottleneck |"
        )
    for mode in ADMIT_MODES:
        if rows := [row for row in result.get("admit", []) if row["mode"] == mode]:
            median = median_row(rows, "loop_us_per_request")
            lines.append(
                f"| HTTP side, {ADMIT_STREAMS} at once, work {mode}: loop us/request (median of {len(rows)} bursts); "
                f"its TTFT p50/p99 ms | {median['loop_us_per_request']}; "
                f"{median['ttft_p50_ms']}/{median['ttft_p99_ms']} | — | — |"
            )
    if models := result.get("models"):
        if "error" in models:
            lines.append(f"| two models in one server | failed to start: {models['error'][-200:]!r} | — | — |")
        else:
            lines.append(f"| two models in one server: startup, s | {models['startup_s']} | — | — |")
        if "alone_prompts" in models:
            lines.append(
                f"| two models: prompts sent alone, the same greedy reply from both | {models['alone_same_replies']} "
                f"of {models['alone_prompts']} ({models['alone_answered']} answered by both) | — | — |"
            )
        for run in models.get("runs", []):
            finished = ", ".join(f"{name} {n}" for name, n in run["finished_per_model"].items())
            lines.append(
                f"| two models: {run['concurrency']} streams over both: tokens/s; finished | "
                f"{run['tokens_per_s']}; {finished} of {run['streams']}{caveats(run)} | — | — |"
            )
    print("\n".join(lines))


if __name__ == "__main__":
    main()

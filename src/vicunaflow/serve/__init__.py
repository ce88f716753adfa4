"""`vicunaflow serve`: an OpenAI-compatible HTTP API and a web chat page over the batching engine.

FastChat's controller + model_worker + openai_api_server trio (three processes, pydantic 1) is
replaced by one server: FastAPI routes in `app.py` feed `vicunaflow.engine.Engine`, which batches
concurrent requests on the model, in a child process of the server (`engine_process.py`; a thread of the
server with --engine-process false). Keys come from --api-key or VICUNAFLOW_API_KEYS.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Literal

from vicunaflow import VicunaflowError
from vicunaflow.loading import DEFAULT_MODEL_OPTIONS, ModelOptions, require_servable_model
from vicunaflow.serve import heap

log = logging.getLogger(__name__)

API_KEYS_ENV = "VICUNAFLOW_API_KEYS"  # comma-separated keys, used when --api-key is not given
# How long a thread may hold the GIL while another waits for it (Python's default: 5 ms). The engine thread
# launches each step and the event loop writes every stream's events: with the default, a step could wait for
# the loop's burst of writes. On an H200 (7B, through the API, one run each) 0.5 ms gave 7,765 / 11,709 tokens/s
# at 64 / 256 streams and a repeated first-token p99 of 21.4 ms, against 7,701 / 11,528 and 27.9 ms
# (docs/benchmarks.md, "sixteenth session")
SWITCH_INTERVAL_S = 0.0005


def serve(
    *,
    model_path: list[Path] | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: list[str] | str | None = None,
    model_name: list[str] | str | None = None,
    model_options: ModelOptions = DEFAULT_MODEL_OPTIONS,
    max_batch_size: int = 16,
    max_context: int | None = None,
    prefill_chunk: int | None = None,
    prefill_burst: int | None = None,
    mixed_prefill: int = 0,
    kv_cache_tokens: int | None = None,
    kv_cache_dtype: Literal["auto", "fp8"] = "auto",
    default_max_tokens: int = 512,
    seed: int | None = None,
    cuda_graphs: bool = True,
    engine_process: bool = True,
    max_body_bytes: int = 4 * 1024 * 1024,
    results_dir: Path = Path("results/serve"),
) -> None:
    """Serve models over OpenAI's v1 API (/v1/models, /v1/chat/completions, /v1/completions), a chat page at /
    and, with two models or more, a blind arena at /arena.

    Without keys (no --api-key and no VICUNAFLOW_API_KEYS) anyone who can reach the port may use it.

    Arguments:
        model_path: a Hugging Face model directory (e.g. vicuna-13b-all-v1.1); repeat the flag to serve
            several models (one engine each, on one GPU: not with --num-gpus; requests go to the one their
            `model` names).
        host: address to listen on; 0.0.0.0 exposes the server to the network (set keys then).
        port: TCP port.
        api_key: accepted Bearer key(s): --api-key KEY, several as --api-key K1,K2 or --api-key+ K2;
            default: the comma-separated VICUNAFLOW_API_KEYS environment variable; neither: no authentication.
        model_name: the model id clients send, one per --model-path (repeat the flag); default: the directory name.
        model_options: how each model loads (vicunaflow.loading.ModelOptions: --device, --num-gpus, --load-8bit, ...).
        max_batch_size: requests decoded together; more wait in a queue.
        max_context: attend over at most this many tokens; default: the model's max_position_embeddings.
        prefill_chunk: prompt tokens prefilled per step, between decode steps of the running requests (a
            long prompt then delays them by one chunk at a time); default: the engine's, 512.
        prefill_burst: when many prompts arrive at once, prefill a chunk's worth of them for every prompt waiting
            per N requests decoding, up to N chunks in one step, so they start together (docs/engine.md); 1: a
            chunk always. Default: the engine's, 32.
        mixed_prefill: prompt tokens a decode step carries while other requests decode, instead of chunks
            between steps (steadier streams, fewer tokens/s in bursts of new prompts: docs/engine.md); 0: none.
        kv_cache_tokens: tokens the paged KV cache holds over all requests (blocks of 16, each request
            taking blocks as it grows); a request waits for room when it is full. Default: --max-batch-size
            x the context, room for every request at full length; less lets --max-batch-size go higher
            than that memory allows (e.g. 256 requests of ~800 tokens in 200000 tokens for a 7B on one H200).
            At least one full-context request (the context rounded up to blocks), checked before loading.
        kv_cache_dtype: auto: keys and values in the model's dtype; fp8: as float8 e4m3, half float16's bytes,
            so twice the tokens fit in the same memory (no faster). Each value is rounded to 3 mantissa bits
            (beyond +-448 it saturates; no scales, as vLLM's fp8 cache without calibration); attention still
            computes in the model's dtype. Its cost in quality: docs/engine.md.
        default_max_tokens: reply length when a request gives no max_tokens (always capped by the context).
        seed: sampling seed.
        cuda_graphs: on one GPU, replay each decode step from a captured CUDA graph (false: plain eager forward).
        engine_process: run each model's engine in a process of its own (as vLLM's V1 does), so the HTTP side and
            the engine's kernel launches stop taking turns at one GIL (serve/engine_process.py); with several
            models their CUDA graphs then stay on, and they load at once (their warm-ups in turn). With
            --num-gpus above 1 the engine stays in the server's process, where its tensor-parallel ranks start from.
        max_body_bytes: refuse request bodies larger than this with 413 (a 2048-token prompt is ~10 KB).
        results_dir: where the arena appends its votes (arena_votes.jsonl).
    """
    import uvicorn

    from vicunaflow.engine import Engine, check_max_context, resolve_device
    from vicunaflow.serve.app import create_app
    from vicunaflow.serve.engine_process import RemoteEngine, start_engines
    from vicunaflow.serve.fit import check_fit, check_memory_cap, estimate

    keys = _split_keys(api_key) or _split_keys(os.environ.get(API_KEYS_ENV))
    log.info(
        "serve: model_path=%s host=%s port=%d keys=%d %s max_batch_size=%d max_context=%s kv_cache_tokens=%s "
        "kv_cache_dtype=%s prefill_chunk=%s prefill_burst=%s mixed_prefill=%d",
        model_path, host, port, len(keys), model_options, max_batch_size, max_context, kv_cache_tokens,
        kv_cache_dtype, prefill_chunk, prefill_burst, mixed_prefill,
    )  # fmt: skip
    if max_batch_size < 1:
        raise VicunaflowError(f"--max-batch-size {max_batch_size}: must be at least 1")
    check_max_context(max_context)
    if default_max_tokens < 1:
        raise VicunaflowError(f"--default-max-tokens {default_max_tokens}: must be at least 1")
    if max_body_bytes < 1:
        raise VicunaflowError(f"--max-body-bytes {max_body_bytes}: must be at least 1 (a 2048-token prompt is ~10 KB)")
    if kv_cache_tokens is not None and kv_cache_tokens < 1:
        raise VicunaflowError(f"--kv-cache-tokens {kv_cache_tokens}: must be at least 1")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise VicunaflowError(f"--prefill-chunk {prefill_chunk}: must be at least 1")
    if prefill_burst is not None and prefill_burst < 1:
        raise VicunaflowError(f"--prefill-burst {prefill_burst}: must be at least 1 (chunks)")
    count = len(model_path) if isinstance(model_path, list) else 1
    if count > 1 and model_options.num_gpus > 1:
        # one tensor-parallel group per process (engine/tp.py): the second model's could not start
        raise VicunaflowError(
            f"--num-gpus {model_options.num_gpus} with {count} --model-path: tensor parallelism serves one model; "
            "several models share this process's GPU (leave out --num-gpus), or start one server per model"
        )
    if not keys and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without API keys: anyone who can reach port %d can use the model", host, port)
    _check_port(host, port)  # before the model loads: minutes wasted otherwise
    models = _named_models(model_path, model_name)
    for path in models.values():  # what load refuses (a raw Meta folder, a delta), before the first model loads
        require_servable_model(path)
    num_gpus = model_options.num_gpus
    engine_process = engine_process and num_gpus == 1  # tensor-parallel ranks start from the server's process
    resolved = resolve_device(model_options.device, num_gpus)
    sizes = dict(num_gpus=num_gpus, load_8bit=model_options.load_8bit, load_4bit=model_options.load_4bit)
    sizes |= dict(max_batch_size=max_batch_size, max_context=max_context, kv_cache_tokens=kv_cache_tokens)
    sizes |= dict(kv_cache_dtype=kv_cache_dtype)
    estimates = [estimate(p, name=n, device=resolved, **sizes) for n, p in models.items()]
    if model_options.max_gpu_memory:  # the models' weights together: they share the GPU(s)
        check_memory_cap(estimates, model_options.max_gpu_memory)
    # estimate also refused a --kv-cache-tokens below one full-context request, before any load
    if not engine_process:  # else the first engine process checks, before any loads: CUDA stays out of this process
        check_fit(estimates, device=resolved, num_gpus=num_gpus)
    if len(models) > 1 and resolved == "cuda" and cuda_graphs and not engine_process:
        # Each engine captures its graphs lazily in its own thread; a capture (global mode, after
        # torch.cuda.graph empties the allocator's cache) while another engine allocates or syncs can fail
        # both. Not run on a GPU this way (with engine processes, each capturing in its own, it was): safe first,
        # at the cost of per-step launch overhead.
        log.warning(
            "%d models share the GPU(s): CUDA graphs off (two engines capturing at once is unsafe)", len(models)
        )
        cuda_graphs = False
    with contextlib.ExitStack() as stack:
        stack.callback(sys.setswitchinterval, sys.getswitchinterval())  # serve() may run inside another program
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        gc_pauses = stack.enter_context(heap.GCPauses())
        engine_options = dict(
            max_batch_size=max_batch_size,
            max_context=max_context,
            seed=seed,
            cuda_graphs=cuda_graphs,
            kv_cache_tokens=kv_cache_tokens,
            kv_cache_dtype=kv_cache_dtype,
            mixed_prefill=mixed_prefill,
        )
        engine_options |= {} if prefill_chunk is None else {"prefill_chunk": prefill_chunk}
        engine_options |= {} if prefill_burst is None else {"prefill_burst": prefill_burst}
        if engine_process:  # all at once; the first checks, before any allocates, that all of them fit
            engines = start_engines(models, model_options, engine_options, (estimates, resolved, num_gpus), stack)
        else:
            engines = {}
            for name, path in models.items():
                model, tokenizer = model_options.load(path)
                stack.enter_context(contextlib.closing(model))  # closing: stops the other tensor-parallel ranks
                engines[name] = stack.enter_context(Engine(model, tokenizer, **engine_options))
        ready = threading.Event()

        def stop_engine_processes() -> None:  # at the graceful shutdown, before uvicorn re-raises a SIGTERM
            for engine in engines.values():
                if isinstance(engine, RemoteEngine):
                    engine.stop()

        app = create_app(
            engines,
            api_keys=keys,
            default_max_tokens=default_max_tokens,
            max_body_bytes=max_body_bytes,
            results_dir=results_dir,
            ready=ready,
            gc_pauses=gc_pauses,
            on_shutdown=stop_engine_processes,
        )
        log.info("serving %s on http://%s:%d (chat page at /, API at /v1)", ", ".join(models), host, port)
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False))
        warm = threading.Thread(
            target=_warm_routes, args=(server, host, port, list(models), keys[0] if keys else None, ready), daemon=True
        )
        warm.start()
        server.run()


# Each route's first request pays for what its code sets up on first use (on an H200 host, a 7B's first
# streamed completion took 89 ms to its first token, 8 ms of it in the engine; later ones 13 ms): the
# server sends these itself before /health says it is ready.
WARM_UP_REQUESTS = [
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 2, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2, "stream": True}),
]


def _warm_routes(server, host: str, port: int, names: list[str], key: str | None, ready: threading.Event) -> None:
    """Once the server listens, stream WARM_UP_REQUESTS to each model through its own socket, freeze the
    heap (serve/heap.py), then set `ready`. A failure is logged and serving goes on (the requests only warm)."""
    try:
        while not server.started:
            if server.should_exit:
                return
            time.sleep(0.01)
        address = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
        start = time.perf_counter()
        for name in names:
            for path, body in WARM_UP_REQUESTS:
                connection = http.client.HTTPConnection(address, port, timeout=300)
                try:
                    connection.request("POST", path, json.dumps({"model": name, **body}), headers)
                    response = connection.getresponse()
                    text = response.read()
                finally:
                    connection.close()
                if response.status != 200:
                    raise VicunaflowError(f"{path} answered {response.status}: {text[:200]!r}")
        log.info(
            "sent %d warm-up requests in %.2f s: ready", len(names) * len(WARM_UP_REQUESTS), time.perf_counter() - start
        )
    except Exception as err:  # warming is optional: say why and serve anyway
        log.warning("warm-up request failed (%s: %s); serving anyway", type(err).__name__, err)
    finally:
        heap.freeze()  # the models, the app, what warm-up set up: alive until exit, not walked again
        ready.set()


def _named_models(model_path: list[Path] | Path, model_name: list[str] | str | None) -> dict[str, Path]:
    """name -> folder: --model-name in order, else each folder's name; names must differ."""
    paths = [Path(p) for p in (model_path if isinstance(model_path, list) else [model_path])]
    names = [model_name] if isinstance(model_name, str) else list(model_name or [])
    if names and len(names) != len(paths):
        raise VicunaflowError(f"{len(names)} --model-name for {len(paths)} --model-path: give one name per model")
    names = names or [p.resolve().name for p in paths]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise VicunaflowError(f"two models are named {duplicates[0]!r}: give each a --model-name")
    return dict(zip(names, paths, strict=True))


def _split_keys(value: list[str] | str | None) -> list[str]:
    items = [value] if isinstance(value, str) else list(value or [])
    return [key.strip() for item in items for key in item.split(",") if key.strip()]


def _check_port(host: str, port: int) -> None:
    """Fail at once, naming the port, when uvicorn could not listen on it (in use, no permission, bad host).

    Binds what uvicorn (asyncio's create_server) binds: every address `host` resolves to, with
    SO_REUSEADDR, so a port left in TIME_WAIT by the previous run passes and only a real conflict fails;
    an address of a disabled family (EADDRNOTAVAIL, e.g. ::1 without IPv6) is skipped unless all are.
    """
    if not 0 < port < 65536:
        raise VicunaflowError(f"--port {port}: a TCP port is 1-65535")
    errors = []
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in addresses:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(address)
                except OSError as err:
                    if err.errno != errno.EADDRNOTAVAIL:
                        raise
                    errors.append(err)
        if errors and len(errors) == len(addresses):
            raise errors[0]
    except OSError as err:
        hint = (
            f": another process listens on port {port}; stop it or pick another --port"
            if err.errno == errno.EADDRINUSE
            else ""
        )
        raise VicunaflowError(f"cannot listen on {host}:{port}: {err.strerror or err}{hint}") from None

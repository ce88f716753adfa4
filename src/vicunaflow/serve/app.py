"""The FastAPI application: OpenAI v1 routes, Bearer keys, OpenAI-style errors, the chat and arena pages.

Several models may be served, one `Engine` each: a request goes to the engine its `model` names, an
unknown name is 404 `model_not_found`. The arena's routes (serve/arena.py) reuse the chat path.

Every generation goes through the shared `Engine` (one background thread, continuous batching); a
route only renders the prompt with vicunaflow.template, submits it, and relays the engine's events
(from its thread into the event loop through `_Relay`: one call_soon_threadsafe per burst of events, not
per event). When a client goes away, streamed
or not, the request is cancelled and its batch slot is freed at the engine's next step.

The event loop mostly moves bytes: a body is refused with 413 past `max_body_bytes` (by its
Content-Length before reading any of it, else while it streams in), and validation, template
rendering and tokenisation (seconds for a few MB of text) run in worker threads, so /health and
the other requests keep being answered meanwhile; a small request's work runs on the loop (`INLINE`),
where the trip to a thread would cost more than the work.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import dataclasses
import hmac
import json
import logging
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from json.encoder import encode_basestring as json_string  # C: a str as a JSON string, no encoder object
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from vicunaflow import VicunaflowError, template
from vicunaflow.engine import Engine, Event, SamplingParams, encode_prompt
from vicunaflow.serve.errors import APIError, describe, invalid_body, read_body, sse_event
from vicunaflow.serve.heap import GCPauses
from vicunaflow.serve.logprobs import TokenTexts, chat_logprobs, completion_logprobs, prompt_entries
from vicunaflow.serve.protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
FINISH_REASON = {"stop": "stop", "length": "length", "cancelled": "stop", "error": "error"}
# Request bodies larger than this are refused with 413. A full 2048-token prompt is ~10 KB of text;
# the cap leaves room for long contexts, many completion prompts and JSON escaping.
MAX_BODY_BYTES = 4 * 1024 * 1024
# replies one request may ask for (prompts x n): OpenAI takes at most 2,048 prompts a completions request. Each is
# an engine request submitted from the event loop, and 160,000 (20,000 prompts, n = 8) held it for 26 s
MAX_CHOICES = 2048
# stop strings a request may give (OpenAI takes 4, vLLM any number; lm-evaluation-harness sends a few): the engine
# thread checks each against every new token of the reply, and 250,000 of them (a 2.6 MB body) made every other
# stream's steps 37 times slower on the 2-core machine while that reply ran
MAX_STOPS = 64
# A request's CPU work runs on the event loop while it is small: a trip through the threadpool and back costs the
# loop more than validating a short body, tokenising a short text or range-checking a prompt's token ids (a trip:
# ~70 µs of loop CPU and ~120 µs of wait on the 2-core machine; docs/benchmarks.md, "sixteenth session"), while
# longer work in a worker thread leaves the loop to write the other streams' events between the worker's turns at
# the GIL. Each limit is about half a millisecond of work on the 2-core machine: validating ~130 µs a KB of body,
# tokenising ~480 µs a 1,000 characters and ~35 µs a call, checking ~60 µs a 1,000 token ids. INLINE False: every
# request's work in the threadpool (the bench's reference).
INLINE = True
INLINE_BODY_BYTES = 4 * 1024
INLINE_TEXT_CHARS = 1024  # characters to render and tokenise, each text counting PROMPT_CHARS more for its call
PROMPT_CHARS = 64
INLINE_TOKEN_IDS = 8 * 1024
# /health's counters when several models are served (summed over the engines)
HEALTH_TOTALS = ("requests", "active", "waiting", "cancelled", "prefills", "steps", "decode_tokens")
# The arena's lowest temperature and top_p: below, a reply is close to the greedy one, which /v1 replays.
ARENA_MIN_SAMPLING = 0.5


def create_app(
    engines: dict[str, Engine] | Engine,
    *,
    model_name: str | None = None,
    api_keys: list[str] | None = None,
    default_max_tokens: int = 512,
    max_body_bytes: int = MAX_BODY_BYTES,
    results_dir: Path | None = None,
    ready: threading.Event | None = None,
    gc_pauses: GCPauses | None = None,
    on_shutdown: Callable[[], None] | None = None,
) -> FastAPI:
    """engines: model name -> its engine, or one engine served as `model_name`. results_dir: where the
    arena writes its votes (None: the arena's vote route refuses). ready: until it is set, /health answers
    503 "starting" (`serve` sets it once its own first requests went through; None: ready at once).
    gc_pauses: the process's garbage collections, reported by /health as "gc" (serve/heap.py). on_shutdown: run
    (in a worker thread) when the server shuts down gracefully, after its last response: `serve` stops its engine
    processes there, before uvicorn re-raises a SIGTERM that would end this process without unwinding."""
    from vicunaflow.serve import arena, metrics

    if isinstance(engines, Engine):
        engines = {model_name or "model": engines}
    model_name = next(iter(engines))  # the default model of the chat page and /health

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if on_shutdown is not None:
            await run_in_threadpool(on_shutdown)

    app = FastAPI(title="vicunaflow", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    keys = [k.encode() for k in api_keys or []]
    created = int(time.time())

    def key_given(request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and any(hmac.compare_digest(token.strip().encode(), k) for k in keys)

    def authorize(request: Request) -> None:
        if keys and not key_given(request):
            raise APIError(
                401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key"
            )

    def check_model(name: str) -> Engine:
        if name not in engines:
            served = ", ".join(f"'{n}'" for n in engines)
            raise APIError(
                404,
                f"The model '{name}' does not exist; this server serves {served}.",
                code="model_not_found",
                param="model",
            )
        return engines[name]

    def sampling(
        engine: Engine,
        body,
        prompt_length: int,
        max_tokens: int | None,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        blind: bool = False,
        which: str = "the prompt",
    ) -> SamplingParams:
        """which: the prompt the context error names (in a batch, which one: "prompt 3")."""
        if prompt_length >= engine.context:
            sizes = f"maximum context length is {engine.context} tokens; {which} is {prompt_length} tokens"
            raise APIError(
                400,
                # blind (arena): the sizes would tell the models (their contexts and tokenizers) apart
                f"This model's {'context is too short for this prompt' if blind else sizes}. "
                "Shorten the messages or the prompt.",
                code="context_length_exceeded",
                param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
            )
        if body.min_tokens:
            raise APIError(
                400, "min_tokens is not supported: a reply may end sooner; leave it out, or send ignore_eos: true "
                "with max_tokens for replies of one length", param="min_tokens",
            )  # fmt: skip
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > MAX_STOPS:
            raise APIError(400, f"{len(stop)} stop strings: at most {MAX_STOPS} a request", param="stop")
        # max_tokens 0 (completions only): no reply; echo with logprobs then scores the prompt alone
        max_new = 0 if max_tokens == 0 else engine.max_new_tokens(prompt_length, max_tokens or default_max_tokens)
        params = SamplingParams(
            temperature=0.7 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(0, body.top_k or 0),  # -1 (FastChat's default) and 0: all tokens
            max_new_tokens=max_new,
            stop=stop,
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            seed=body.seed,
        )
        system = "n/a"
        if isinstance(body, ChatCompletionRequest):
            system = "custom" if any(m.role in ("system", "developer") for m in body.messages) else "default"
        log.info(
            "request: model=%s prompt_tokens=%d temperature=%g top_p=%g max_new_tokens=%d stop=%d system=%s stream=%s "
            "logprobs=%s prompt_logprobs=%s seed=%s top_k=%d",
            body.model, prompt_length, params.temperature, params.top_p, params.max_new_tokens, len(stop), system,
            body.stream, logprobs, prompt_logprobs, params.seed, params.top_k,
        )  # fmt: skip
        return params

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, err: RequestValidationError):
        return APIError(400, "Invalid request: " + describe(err.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        return APIError(err.status_code, str(err.detail), code=None).response()

    @app.exception_handler(Exception)
    async def _server_error(request: Request, err: Exception):
        log.exception("request failed")
        return APIError(500, f"Internal error: {type(err).__name__}", type="server_error").response()

    @app.get("/health")
    async def health(request: Request):
        if ready is not None and not ready.is_set():  # what the pages read, none of the counters
            contexts = {name: {"context": engine.context} for name, engine in engines.items()}
            starting = {"status": "starting", "model": model_name, "models": list(engines), "auth": bool(keys)}
            return JSONResponse(starting | {"engines": contexts}, status_code=503)
        # off the event loop: an engine in a process of its own answers over a pipe (up to CALL_TIMEOUT_S if wedged)
        stats = await run_in_threadpool(lambda: {name: engine.snapshot_stats() for name, engine in engines.items()})
        # an engine stopped by an error fails every request sent to it: 503, so a balancer or monitor
        # sees it (the reason is in that engine's "failure", and the log)
        stopped = any(s.get("failure") for s in stats.values())
        info = {"status": "error" if stopped else "ok", "model": model_name, "models": list(engines)}
        info["auth"] = bool(keys)
        if gc_pauses is not None:
            info["gc"] = gc_pauses.snapshot()
        if len(engines) == 1 or (keys and key_given(request)):
            info |= {"engine": stats[model_name], "engines": stats}
        else:
            # Several models: the arena is open, and one model's counters rising while a side answers would
            # name that side. Without a key (or with no keys set) only the totals, and each model's context.
            totals = {counter: sum(s[counter] for s in stats.values()) for counter in HEALTH_TOTALS}
            info |= {"totals": totals, "engines": {name: {"context": s["context"]} for name, s in stats.items()}}
        return JSONResponse(info, status_code=503) if stopped else info

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics(request: Request):
        # per model as /health gives it: one model, or a key when keys are set; else sums (serve/metrics.py)
        per_model = len(engines) == 1 or bool(keys and key_given(request))
        return Response(await run_in_threadpool(metrics.render, engines, per_model), media_type=metrics.CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/arena", include_in_schema=False)
    async def arena_page():
        return FileResponse(STATIC / "arena.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/v1/models")
    async def list_models(request: Request):
        authorize(request)
        cards = [_model_card(name, created, engine.context) for name, engine in engines.items()]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{name}")
    async def get_model(name: str, request: Request):
        authorize(request)
        return _model_card(name, created, check_model(name).context)

    async def chat(
        request: Request, body: ChatCompletionRequest, shown_name: str | None = None, done=None, blind: bool = False
    ):
        """Answer a validated chat request. For the arena: shown_name replaces the model's name in the reply,
        done(text) gets the whole reply once it has ended well (None when a streamed one failed or was
        stopped), and `blind` keeps out what tells models apart (usage's token counts, logprobs, n > 1,
        the context size, a greedy or seeded reply that /v1 would reproduce)."""
        engine = check_model(body.model)
        shown_name = shown_name or body.model
        if blind:  # each would tell the models apart (their tokenizers, their confidence)
            asked = {"logprobs": body.logprobs, "top_logprobs": body.top_logprobs is not None, "n": body.n > 1}
            field = next((name for name, on in asked.items() if on), None)
            if field:
                raise APIError(
                    400, f"the arena does not answer with {field}: it would tell the models apart", param=field
                )
            # a reply that can be had again (greedy, nearly greedy, or seeded) through /v1 from each model names
            # its side: a low temperature or top_p, or top_k 1, leaves one likely token at nearly every step
            replayable = {
                "temperature": body.temperature is not None and body.temperature < ARENA_MIN_SAMPLING,
                "top_p": body.top_p is not None and body.top_p < ARENA_MIN_SAMPLING,
                "top_k": body.top_k == 1,
                "seed": body.seed is not None,
            }
            field = next((name for name, on in replayable.items() if on), None)
            if field:
                raise APIError(
                    400, f"the arena samples afresh (no seed, top_k 1, or temperature or top_p under "
                    f"{ARENA_MIN_SAMPLING}; {field} here): its reply, replayed through /v1 for each model, "
                    "would name the model", param=field,
                )  # fmt: skip
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
        k = (body.top_logprobs or 0) if body.logprobs else None
        small = _small_text(message.text() for message in body.messages)
        prompt_ids = await _work(small, _chat_prompt_ids, engine.tokenizer, body)
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = sampling(engine, body, len(prompt_ids), max_tokens, logprobs=k, blind=blind)
        reply_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            if body.n != 1:
                raise APIError(400, "stream=true supports n=1 only", param="n")
            include_usage = bool(body.stream_options and body.stream_options.include_usage) and not blind
            chunks = _stream_chat(engine, prompt_ids, params, reply_id, shown_name, include_usage, done, k)
            return _sse_response(engine, chunks)
        results = await _complete_all(
            request, [_complete(engine, prompt_ids, _choice(params, i)) for i in range(body.n)]
        )

        def logprobs(last: Event) -> dict | None:
            if k is None:
                return None
            return chat_logprobs(TokenTexts(engine.tokenizer, prompt=False).add(last.logprobs, last=True), k)

        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "logprobs": await run_in_threadpool(logprobs, last),
                "finish_reason": FINISH_REASON[last.finish_reason],
            }
            for i, (text, last) in enumerate(results)
        ]
        reply = {"id": reply_id, "object": "chat.completion", "created": int(time.time()), "model": shown_name}
        reply["choices"] = choices
        if done is not None:
            done(results[0][0] if results[0][1].finish_reason in ("stop", "length") else None)
        return reply if blind else _with_usage(reply, results, len(prompt_ids))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        return await chat(request, await _parse(request, ChatCompletionRequest, max_body_bytes))

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        body = await _parse(request, CompletionRequest, max_body_bytes)
        engine = check_model(body.model)
        model_name = body.model
        prompts = _prompt_list(body.prompt)
        if len(prompts) * body.n > MAX_CHOICES:
            raise APIError(
                400, f"{len(prompts)} prompts x n={body.n} replies: at most {MAX_CHOICES} a request", param="prompt"
            )
        ids = sum(len(prompt) for prompt in prompts if not isinstance(prompt, str))
        small = _small_text(prompt for prompt in prompts if isinstance(prompt, str)) and ids <= INLINE_TOKEN_IDS
        encoded = await _work(small, _encode_prompts, engine, prompts)
        k = body.logprobs
        max_tokens = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default: 16
        prompt_k = k if body.echo else None  # echo with logprobs: the prompt tokens' logprobs too
        named = len(encoded) > 1  # in a batch, a prompt too long for the context is named by its index
        all_params = [
            sampling(engine, body, len(ids), max_tokens, k, prompt_k, which=f"prompt {i}" if named else "the prompt")
            for i, ids in enumerate(encoded)
        ]
        reply_id = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            if body.n != 1 or len(prompts) != 1:
                # param: the field to change (it named n for a batch of prompts sent with n=1)
                param = "n" if body.n != 1 else "prompt"
                raise APIError(400, "stream=true supports one prompt and n=1 only", param=param)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = _stream_completion(
                engine, encoded[0], all_params[0], reply_id, model_name, body.echo, k, include_usage
            )
            return _sse_response(engine, chunks)
        jobs = [
            _complete(engine, ids, _choice(params, i))
            for ids, params in zip(encoded, all_params, strict=True)
            for i in range(body.n)
        ]
        results = await _complete_all(request, jobs)
        prompt_of = [ids for ids in encoded for _ in range(body.n)]

        def choice(i: int, text: str, last: Event) -> dict:
            """Echoed prompt text and logprobs (CPU work: decoding every token; off the event loop)."""
            prompt = TokenTexts(engine.tokenizer, prompt=True)
            rows = prompt.add(last.prompt_logprobs or prompt_entries(prompt_of[i])) if body.echo else []
            echoed = prompt.finish()
            logprobs = None
            if k is not None:
                rows += TokenTexts(engine.tokenizer, prompt=False, offset=len(echoed)).add(last.logprobs, last=True)
                logprobs = completion_logprobs(rows, k)
            finish = FINISH_REASON[last.finish_reason]
            return {"index": i, "text": echoed + text, "logprobs": logprobs, "finish_reason": finish}

        choices = [await run_in_threadpool(choice, i, text, last) for i, (text, last) in enumerate(results)]
        return _with_usage(
            {
                "id": reply_id,
                "object": "text_completion",
                "created": int(time.time()),
                "model": model_name,
                "choices": choices,
            },
            results,
            sum(len(ids) for ids in encoded),
        )

    arena.install(app, list(engines), authorize, chat, max_body_bytes, results_dir)
    return app


# ---------------------------------------------------------------------------------------------------------


async def _parse(request: Request, model: type[BaseModel], max_bytes: int):
    """Validate a JSON body whatever its Content-Type (curl -d sends form-encoded headers)."""
    raw = await read_body(request, max_bytes)
    return await _work(len(raw) <= INLINE_BODY_BYTES, _validate, model, raw)


async def _work(small: bool, function, *args):
    """function(*args) on the event loop when `small` (and INLINE), else in the threadpool."""
    if small and INLINE:
        return function(*args)
    return await run_in_threadpool(function, *args)


def _small_text(texts) -> bool:
    """Whether tokenising these texts is work for the event loop: up to INLINE_TEXT_CHARS, a call counted too."""
    return sum(len(text) + PROMPT_CHARS for text in texts) <= INLINE_TEXT_CHARS


def _validate(model: type[BaseModel], raw: bytes):
    """A UTF-8 byte order mark (PowerShell, a JSON file saved by Notepad and sent with curl -d @file) is skipped,
    as json.loads skips it (vLLM, FastChat, the arena's routes): pydantic's parser read it as "expected value"."""
    raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as err:
        raise invalid_body(err.errors()) from None


def _model_card(name: str, created: int, context: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "vicunaflow", "max_model_len": context}


def _prompt_list(prompt: str | list) -> list[str | list[int]]:
    """A completion's prompt(s): one text, texts, one list of token ids, or lists of token ids."""
    # pydantic took the whole list as one of CompletionRequest.prompt's types: its first item tells which
    single = isinstance(prompt, str) or (prompt and isinstance(prompt[0], int))
    prompts = [prompt] if single else list(prompt)
    if not prompts or any(isinstance(p, list) and not p for p in prompts):
        raise APIError(400, "prompt must not be empty", param="prompt")
    return prompts


def _encode_prompts(engine: Engine, prompts: list[str | list[int]]) -> list[list[int]]:
    """Text prompts tokenised (with BOS), token-id prompts checked against the vocabulary (CPU work: `_work` runs
    a long one off the event loop)."""
    vocab_size = engine.model.args.vocab_size
    encoded = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            encoded.append(encode_prompt(engine.tokenizer, prompt))
            continue
        if min(prompt) < 0 or max(prompt) >= vocab_size:  # in C: the loop below only to name the bad id
            bad = next(t for t in prompt if not 0 <= t < vocab_size)
            message = f"prompt {i}: token id {bad} is outside this model's vocabulary (0..{vocab_size - 1})"
            raise APIError(400, message, param="prompt")
        encoded.append(prompt)
    return encoded


def _chat_prompt_ids(tokenizer, body: ChatCompletionRequest) -> list[int]:
    """The token ids of a chat request's prompt (CPU work: `_work` runs a long one off the event loop)."""
    system, turns = _turns(body)
    return encode_prompt(tokenizer, template.render(turns, system))


def _turns(body: ChatCompletionRequest) -> tuple[str, list[tuple[str, str | None]]]:
    """OpenAI messages -> (system prompt, Vicuna turns ending with the assistant's empty turn)."""
    system_parts, turns = [], []
    for i, message in enumerate(body.messages):
        # an image (or audio, a file) left out unsaid would be answered about as if it had been seen; an
        # assistant's parts are text or its refusal, nothing a reply depends on
        parts = message.content if isinstance(message.content, list) and message.role != "assistant" else []
        for j, part in enumerate(parts):
            if part.type != "text":
                raise APIError(
                    400,
                    f"messages[{i}].content[{j}]: this model reads text only, not a part of type {part.type!r}; "
                    'send the content as a string or as text parts ({"type": "text", "text": "..."})',
                    param="messages",
                )
        text = message.text()
        if message.role in ("system", "developer"):
            if turns:
                raise APIError(
                    400, f"messages[{i}]: a system message must come before the conversation", param="messages"
                )
            system_parts.append(text)
            continue
        role = template.ROLE_OF[message.role]
        if turns and turns[-1][0] == role:  # consecutive messages of one role read as one turn
            turns[-1] = (role, turns[-1][1] + "\n" + text)
        else:
            turns.append((role, text))
    if not turns or turns[0][0] != template.USER:
        raise APIError(400, "messages must contain a user message first (after any system message)", param="messages")
    if turns[-1][0] != template.USER:
        raise APIError(400, "the last message must come from the user", param="messages")
    system = "\n".join(system_parts) if system_parts else template.SYSTEM_PROMPT
    return system, [*turns, (template.ASSISTANT, None)]


class _Inbox:
    """One request's events on the event loop side; `take()` returns every event that has arrived."""

    __slots__ = ("events", "waiter")

    def __init__(self):
        self.events: list[Event] = []
        self.waiter: asyncio.Future | None = None

    def put(self, event: Event) -> None:
        self.events.append(event)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def take(self) -> list[Event]:
        while not self.events:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        events, self.events = self.events, []
        return events


class _Relay:
    """Engine thread -> event loop with one wake-up per burst of events, not one per event.

    A decode step emits one event per running request; handing each over with call_soon_threadsafe
    costs a write to the loop's wake-up pipe and a loop iteration apiece (at 256 streams, 256 of each
    per step, mostly while holding the GIL the engine needs). Here the engine thread appends to a list
    and only the first event of a burst schedules `_deliver`, which hands the whole burst out at once.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = weakref.ref(loop)  # weak: _relays' entry (keyed by the loop) must not keep its loop alive
        self.lock = threading.Lock()
        self.pending: list[tuple[_Inbox, Event]] = []
        self.scheduled = False

    def post(self, inbox: _Inbox, event: Event) -> None:
        """Engine thread. Raises RuntimeError when the loop is closed (for every event, so that each
        request's sink cancels its request)."""
        with self.lock:
            self.pending.append((inbox, event))
            if self.scheduled:
                return
            self.scheduled = True
        try:
            loop = self.loop()
            if loop is None:
                raise RuntimeError("the event loop is gone")
            loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:
            with self.lock:  # nothing will deliver: the next post must try (and fail) again
                self.pending.clear()
                self.scheduled = False
            raise

    def _deliver(self) -> None:
        with self.lock:
            burst, self.pending, self.scheduled = self.pending, [], False
        for inbox, event in burst:
            inbox.put(event)


_relays: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Relay] = weakref.WeakKeyDictionary()


def _sse_response(engine: Engine, chunks: AsyncIterator[str]) -> StreamingResponse:
    """A stream submits to the engine only once its 200 has gone out: a stopped engine is refused here,
    while a 503 can still be sent, not as a stream cut off after its headers."""
    failure = getattr(engine, "failure", None)
    if failure is not None:
        raise APIError(503, f"the engine stopped after an error: {failure}", type="server_error")
    return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _choice(params: SamplingParams, i: int) -> SamplingParams:
    """Choice i of n: seeded with seed + i, so a seeded request's n choices differ (and each is reproducible)."""
    return params if params.seed is None or i == 0 else dataclasses.replace(params, seed=params.seed + i)


def _submit(engine: Engine, prompt_ids: list[int], params: SamplingParams):
    """Submit to the engine; its events arrive in an _Inbox on this event loop."""
    loop = asyncio.get_running_loop()
    relay = _relays.get(loop) or _relays.setdefault(loop, _Relay(loop))
    inbox = _Inbox()

    def sink(event: Event) -> None:
        try:
            relay.post(inbox, event)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening any more
            request.cancel()

    try:
        request = engine.submit(prompt_ids, params, sink)
    except VicunaflowError as err:
        if getattr(engine, "failure", None) is None and not getattr(engine, "stopped", False):
            raise
        # the engine stopped (after an error: see /health), or its process is gone as the server shuts down
        raise APIError(503, str(err), type="server_error") from None
    return request, inbox


async def _complete_all(http_request: Request, jobs: list) -> list[tuple[str, Event]]:
    """Run the replies of one non-streamed request; cancel them all as soon as its client disconnects.

    The body has been read, so the next ASGI message can only be http.disconnect: waiting for it costs
    nothing, and a reply that streams tokens without pause is stopped as promptly as an idle one.
    """
    tasks = [asyncio.ensure_future(job) for job in jobs]
    replies = asyncio.gather(*tasks)
    disconnected = asyncio.ensure_future(_disconnect(http_request))
    try:
        await asyncio.wait({replies, disconnected}, return_when=asyncio.FIRST_COMPLETED)
        if replies.done():
            return replies.result()
        raise APIError(499, "client disconnected")
    finally:
        for task in (*tasks, disconnected):  # a cancelled _complete cancels its engine request
            task.cancel()
        # the gather then fails with its first child's CancelledError (gather does not end cancelled): read
        # it when it comes, or asyncio logs "exception was never retrieved" for every client that left
        replies.add_done_callback(lambda gathered: gathered.cancelled() or gathered.exception())


async def _disconnect(http_request: Request) -> None:
    while (await http_request.receive())["type"] != "http.disconnect":
        pass


async def _complete(engine: Engine, prompt_ids: list[int], params: SamplingParams) -> tuple[str, Event]:
    """Wait for a whole reply; cancelling this coroutine cancels the engine's request."""
    text, logprobs, prompt_logprobs = "", [], None
    async for events in _event_batches(engine, prompt_ids, params):
        for event in events:
            text += event.text
            logprobs += event.logprobs or []
            prompt_logprobs = prompt_logprobs or event.prompt_logprobs
            if event.finish_reason == "error":
                raise APIError(500, f"generation failed: {event.error}", type="server_error")
            if event.finish_reason is not None:  # the last event carries the whole reply's logprobs
                event.logprobs, event.prompt_logprobs = logprobs, prompt_logprobs
                return text, event
    raise AssertionError("the engine ended a request without its last event")


async def _event_batches(engine: Engine, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[list[Event]]:
    """The request's events as they arrive, every event waiting at once (the last batch ends with the
    finishing event): a stream that fell behind catches up in one write, not one per token."""
    request, inbox = _submit(engine, prompt_ids, params)
    try:
        while True:
            events = await inbox.take()
            yield events
            if events[-1].finish_reason is not None:
                return
    finally:
        # Runs when the reply ends and also when the client disconnects (Starlette cancels the stream).
        if not request.done:
            log.info("request %d cancelled after %d tokens: its slot is freed", request.id, request.completion_tokens)
        request.cancel()


def _chunk_template(fields: dict, choice: dict, hole: str) -> tuple[str, str]:
    """The SSE text of a chunk split around the JSON string at `choice[hole]`: rendered once per
    stream, so a plain token's chunk is two concatenations and one json.dumps of its text."""
    marker = "\x00hole\x00"
    whole = sse_event({**fields, "choices": [{**choice, hole: marker}]})
    before, after = whole.split(json.dumps(marker))
    return before, after


async def _stream_chat(
    engine, prompt_ids, params, reply_id, model_name, include_usage, done=None, k: int | None = None
) -> AsyncIterator[str]:
    """done(text): the whole reply, called before its last chunk; done(None) when it failed or was stopped."""
    created = int(time.time())
    pieces, ended = [], False
    texts = TokenTexts(engine.tokenizer, prompt=False) if k is not None else None
    fields = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model_name}
    # a token's chunk with no logprobs and no finish: the common case, from a template
    plain_before, plain_after = _chunk_template(
        fields, {"index": 0, "delta": {"content": ""}, "logprobs": None, "finish_reason": None}, "delta"
    )
    plain_before += '{"content": '
    plain_after = "}" + plain_after

    def chunk(delta: dict, finish_reason: str | None = None, event: Event | None = None) -> str:
        logprobs = None
        if k is not None and event is not None:  # the tokens sampled since the previous chunk
            logprobs = chat_logprobs(texts.add(event.logprobs or [], last=event.finish_reason is not None), k)
        elif finish_reason is None and len(delta) == 1 and "content" in delta:
            return plain_before + json_string(delta["content"]) + plain_after
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return sse_event({**fields, "choices": [choice]})

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for events in _event_batches(engine, prompt_ids, params):
            out = []
            for event in events:
                if event.text:
                    pieces.append(event.text)
                    out.append(chunk({"content": event.text}, event=event))
                if event.finish_reason == "error":
                    out.append(APIError(500, f"generation failed: {event.error}", type="server_error").sse())
                elif event.finish_reason is not None:
                    if done is not None and event.finish_reason in ("stop", "length"):
                        if out:  # this batch's text goes out first: what the client has is what is kept
                            yield "".join(out)
                            out = []
                        ended = True
                        done("".join(pieces))
                    out.append(chunk({}, FINISH_REASON[event.finish_reason], event=None if event.text else event))
                    if include_usage:
                        usage = _usage(event.prompt_tokens, event.completion_tokens)
                        out.append(sse_event({**fields, "choices": [], "usage": usage}))
            if out:
                yield "".join(out)
        yield sse_event("[DONE]")
    finally:  # also when the client went away (Starlette closes the stream)
        if done is not None and not ended:
            done(None)


async def _stream_completion(
    engine, prompt_ids, params, reply_id, model_name, echo: bool = False, k: int | None = None, include_usage=False
) -> AsyncIterator[str]:
    """With echo, the first chunk is the prompt (with its logprobs); each chunk's logprobs are its tokens'.
    include_usage: after the last choice chunk, one with no choices and the usage (OpenAI's stream_options)."""
    created = int(time.time())
    texts, first = None, True
    fields = {"id": reply_id, "object": "text_completion", "created": created, "model": model_name}
    plain_before, plain_after = _chunk_template(
        fields, {"index": 0, "text": "", "logprobs": None, "finish_reason": None}, "text"
    )

    def render(text: str, logprobs: dict | None, finish_reason: str | None) -> str:
        if logprobs is None and finish_reason is None:
            return plain_before + json_string(text) + plain_after
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return sse_event({**fields, "choices": [choice]})

    def echo_chunk(prompt_logprobs) -> tuple[str, str]:
        prompt = TokenTexts(engine.tokenizer, prompt=True)
        rows = prompt.add(prompt_logprobs or prompt_entries(prompt_ids))
        echoed = prompt.finish()
        return echoed, render(echoed, completion_logprobs(rows, k) if k is not None else None, None)

    async for events in _event_batches(engine, prompt_ids, params):
        out = []
        for event in events:
            if event.finish_reason == "error":
                out.append(APIError(500, f"generation failed: {event.error}", type="server_error").sse())
                break
            finish = FINISH_REASON[event.finish_reason] if event.finish_reason else None
            if first:
                first, echoed = False, ""
                if echo:  # the prompt's tokens (and their alternatives) decoded: off the loop, as the whole reply's
                    echoed, chunk = await run_in_threadpool(echo_chunk, event.prompt_logprobs)
                    out.append(chunk)
                if k is not None:
                    texts = TokenTexts(engine.tokenizer, prompt=False, offset=len(echoed))
            if event.text or finish:
                rows = texts.add(event.logprobs or [], last=finish is not None) if k is not None else None
                logprobs = completion_logprobs(rows, k) if rows is not None else None
                out.append(render(event.text, logprobs, finish))
            if finish and include_usage:
                usage = _usage(event.prompt_tokens, event.completion_tokens)
                out.append(sse_event({**fields, "choices": [], "usage": usage}))
        if out:
            yield "".join(out)
    yield sse_event("[DONE]")


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _with_usage(response: dict, results: list[tuple[str, Event]], prompt_tokens: int) -> dict:
    completion_tokens = sum(last.completion_tokens for _, last in results)
    response["usage"] = _usage(prompt_tokens, completion_tokens)
    return response

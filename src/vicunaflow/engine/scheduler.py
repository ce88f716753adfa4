"""The scheduler: continuous batching over one model, streaming each request's text.

Why an engine of our own instead of `model.generate`: a server must let requests join and leave a
running batch, stream text while it is produced, and free a slot the moment a client goes away. One
background thread owns the model and steps every active request together:

    admit waiting requests -> prefill the next chunk of their prompts -> decode step for all rows -> repeat

Prompts are prefilled in chunks of at most `prefill_chunk` tokens (rows x padded length), one chunk
between two decode steps: a 1500-token prompt joining 31 streams delays each of their steps by one
chunk's forward at most, instead of stalling them for the whole prompt. A chunk is an ordinary
forward at positions start..end of the prompt's cache row, attending to what earlier chunks wrote, so
greedy replies are those of a whole-prompt prefill. A prompt that ends in a chunk samples its first
token from that chunk's logits and joins the decoding rows.

With `mixed_prefill` (off by default), while rows are decoding, prompt pieces ride in the decode steps instead:
each prompt token is a row of the step, at its own position of its prompt's cache row, attending to
that row's positions up to its own, which is what a prefill computes. A decode step reads every weight
once however many rows it has, so the pieces cost a few more rows' arithmetic and attention, not a
forward of their own between two steps: on an H200 a 7B step of 32 rows took ~6 ms, and a separate
4 x 128-token prefill chunk between two steps another ~12 ms, which every running stream waited for.
Prompts asking for prompt log-probabilities, and prompts when no row decodes, go through chunks. The
price: a burst of new prompts is written mixed_prefill tokens a step, not a chunk's worth a forward.

A burst of new prompts (many users arriving at once) gets longer prefill forwards: up to `prefill_burst` chunks'
worth, one chunk for every prompt waiting per `prefill_burst` rows decoding (`_prefill_budget`). Every decoding
row waits for each prefill forward, so a lone prompt joining running streams still goes a chunk at a time, while
28 prompts arriving behind 4 rows are written in one forward: those 4 rows see one long gap instead of seven
shorter ones, and the 28 start decoding together. prefill_burst is both the cap and the rows per chunk: with 32, a
burst of 256 prompts of 128 tokens goes up to 128 a forward (16,384 tokens) while few rows decode, so the many-row
steps that follow are full sooner and the decoding rows are interrupted fewer times (7B, through the API on an
H200: 256 streams 11,254 tokens/s and a gap p99 of 39 ms, against 10,633 and 74 ms with 8 in the same call; in
another, 16 gave 11,032 where 32 gave 11,387; docs/benchmarks.md, "sixteenth session"). The price: a handful of
long prompts arriving together stall the running rows for longer forwards (8 prompts of 512 tokens behind 31 rows:
one forward of all 8, where a prefill_burst of 8 wrote them 2 a forward), and a forward of 16,384 tokens runs
eagerly with its activations (~1.5 GB for a 7B) on top of the weights and the cache: a smaller --prefill-burst
bounds both, and a forward of several chunks that runs out of device memory halves prefill_burst for the engine's
life and writes its prompts again (`_smaller_bursts`). On an H200 (7B, 32 streams through the API) chunks alone
gave an inter-token gap p99 of 3.7x its p50, every early row waiting for each of the burst's chunks
(docs/benchmarks.md, "thirteenth session").

The KV cache is paged (engine/cache.py): a request is admitted when a row is free and the blocks for
its whole prompt are (plus a block of headroom per admitted row), so concurrency is bounded by the
tokens requests hold. When a decoding row needs a block and none is free, the youngest decoding
request is preempted: its blocks are freed and it goes back to the front of the queue, to be prefilled
again (prompt and reply so far) and continue where it stopped; the oldest decoding request is never
the one preempted while others decode, so the batch always makes progress. A seeded request
(`SamplingParams.seed`) gives the same reply either way: its t-th token's random draw is seeded with
(seed, t) (engine/sampling.py), not taken from a generator that other steps advance.

The forward passes themselves (buckets, CUDA graphs, tensor-parallel ranks) are engine/runner.py's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch

from vicunaflow import VicunaflowError, attention_kernels, kernels
from vicunaflow.engine.cache import BLOCK_SIZE
from vicunaflow.engine.latency import engine_histograms
from vicunaflow.engine.model import Transformer
from vicunaflow.engine.runner import PrefillChunk, Runner
from vicunaflow.engine.sampling import SamplingParams, TokenLogprob, logprobs_of, sample, to_entries
from vicunaflow.engine.text import IncrementalDecoder, find_stop, stop_prefix_length

log = logging.getLogger(__name__)

PREFILL_CHUNK = 512  # prompt tokens per prefill forward (Engine's and `serve --prefill-chunk`'s default)
# the most chunks' worth one prefill forward writes in a burst of prompts (module docstring); 1: a chunk always
PREFILL_BURST = 32
# prompt tokens a decode step carries while rows decode (module docstring); 0: prompts go through chunks. Off by
# default: on an H200 (7B, through the API) 128 took the 32-stream inter-token gap p99 from 23.7 to 13.2 ms but
# the tokens/s from 4,555 to 4,072 (docs/engine.md, "Prompts in decode steps")
MIXED_PREFILL = 0


@dataclasses.dataclass
class Event:
    """One streamed piece of a reply; the last one has finish_reason set."""

    text: str
    finish_reason: Literal["stop", "length", "cancelled", "error"] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    # with params.logprobs: the tokens sampled since the previous event (their text may be held back,
    # or cut by a stop string; EOS included), each with its log-probability
    logprobs: list[TokenLogprob] | None = None
    # with params.prompt_logprobs: every prompt token's (first event only)
    prompt_logprobs: list[TokenLogprob] | None = None


class Request:
    _ids = itertools.count()

    def __init__(self, prompt_ids: Sequence[int], params: SamplingParams, sink: Callable[[Event], None], tokenizer):
        self.id = next(self._ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sink = sink
        self.decoder = IncrementalDecoder(tokenizer)
        self.text = ""  # emitted so far
        self.held = ""  # decoded but held back: might be the start of a stop string
        self.cancelled = False
        self.done = False
        self.pending: list[TokenLogprob] = []  # sampled tokens' logprobs not yet sent in an event
        self.prompt_logprobs: list[TokenLogprob] | None = None  # sent with the first event
        self.submitted = time.perf_counter()  # -> admitted (a row and its blocks) -> first token: Engine.stats
        self.admitted: float | None = None
        self.last_token_at: float | None = None  # its first token's time, or its latest before a preemption

    def event(self, text: str, **fields) -> Event:
        """An event carrying the log-probabilities gathered since the last one (when the request asked)."""
        event = Event(text, prompt_tokens=len(self.prompt_ids), completion_tokens=self.completion_tokens, **fields)
        if self.params.logprobs is not None:
            event.logprobs, self.pending = self.pending, []
        if self.prompt_logprobs is not None:
            event.prompt_logprobs, self.prompt_logprobs = self.prompt_logprobs, None
        return event

    def cancel(self) -> None:
        """Ask the engine to drop this request at its next step (e.g. the client disconnected)."""
        self.cancelled = True

    @property
    def completion_tokens(self) -> int:
        return len(self.decoder.ids)


@dataclasses.dataclass
class PrefillJob:
    """A request whose prompt is being written to its cache row, a chunk per engine step."""

    request: Request
    row: int
    tokens: list[int]  # to write: the prompt, or for a preempted request its prompt and reply but the last token
    resume: int | None  # preempted: the reply's last token, fed to the next decode step (nothing is sampled)
    prompt_logprobs: list[TokenLogprob] | None  # so far, when the request asked
    done: int = 0  # tokens in the cache


@dataclasses.dataclass
class DecodeStep:
    """A launched decode step: the rows it ran for, its sampled tokens (device) and their host copy."""

    rows: list[Request]
    tokens: torch.Tensor
    host: torch.Tensor
    done: torch.cuda.Event | None
    logprobs: tuple[torch.Tensor, ...] | None = None  # `logprobs_of` for the step's rows, when one asked
    pieces: list[tuple[PrefillJob, int]] = dataclasses.field(default_factory=list)  # prompt tokens it wrote
    starting: list[PrefillJob] = dataclasses.field(default_factory=list)  # prompts it ended: first tokens
    first: torch.Tensor | None = None  # their first tokens [len(starting)] (device)
    first_logprobs: tuple[torch.Tensor, ...] | None = None
    # CUDA: reached when the GPU starts the step, and where the engine's GPU work before it ended (None after a wait
    # for work): the step's GPU time and the GPU's idle time before it (Engine.latency's step_gpu / gpu_idle)
    started: torch.cuda.Event | None = None
    previous: torch.cuda.Event | None = None


class Engine:
    """Continuous batching over one model: requests join and leave a running batch.

    `submit()` is thread-safe and returns at once; events reach the request's `sink` from the
    engine thread. `generate()` is the blocking, iterator form used by the chat CLI and the bench.

    With `overlap` the engine keeps one decode step queued ahead: step t+1 is launched from step t's
    sampled tokens (still on the device) before the host detokenises and streams step t, so the GPU
    never waits for that host work. A row whose request ends at step t wastes its slot of step t+1;
    the batch only changes (admissions, finished rows) once no step is in flight.

    Log-probabilities (`SamplingParams.logprobs`) are computed on the device right after the step that
    produced the logits (a log_softmax and top-k over [rows, vocab], only in steps where a row asks), and read
    with the step's tokens: the overlap and CUDA graphs stay. Prompt log-probabilities
    (`prompt_logprobs`) make that request's prefill compute every position's logits.

    prefill_chunk: prompt tokens per prefill forward, one forward between two decode steps; prefill_burst: up to
    this many chunks' worth in one forward while prompts wait in a burst (module docstring); mixed_prefill:
    prompt tokens a decode step carries while rows decode, 0 for none (module docstring). kv_cache_tokens:
    tokens the paged KV cache holds over all rows (default: every row at full context); requests wait, or
    are preempted and resumed, when its blocks run out; kv_cache_dtype: "auto" (the model's dtype) or "fp8"
    (engine/cache.py's KV_CACHE_DTYPES: twice the tokens in the same memory). warm_up
    (default: on CUDA): run every decode bucket and prefill length class before serving, so no request
    waits for a graph capture or a Triton autotune; the log says how long it took (docs/engine.md).
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer,
        *,
        max_batch_size: int = 16,
        max_context: int | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        prefill_burst: int = PREFILL_BURST,
        mixed_prefill: int = MIXED_PREFILL,
        kv_cache_tokens: int | None = None,
        kv_cache_dtype: str = "auto",
        seed: int | None = None,
        cuda_graphs: bool = True,
        padded_decode: bool | None = None,
        decode_kernels: bool | None = None,
        overlap: bool | None = None,
        warm_up: bool | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.context = context_length(model, max_context)
        self.max_batch_size = max_batch_size
        if prefill_chunk < 1:
            raise VicunaflowError(f"prefill_chunk {prefill_chunk}: must be at least 1")
        self.prefill_chunk = prefill_chunk
        if prefill_burst < 1:
            raise VicunaflowError(f"prefill_burst {prefill_burst}: must be at least 1 (chunks)")
        self.prefill_burst = prefill_burst
        if mixed_prefill < 0:
            raise VicunaflowError(f"mixed_prefill {mixed_prefill}: must be 0 or more")
        if mixed_prefill and attention_kernels.ROPE == "attention":
            raise VicunaflowError(
                "--mixed-prefill rides prompt tokens in decode steps as rows sharing their prompt's block table, "
                "and VICUNAFLOW_ROPE=attention stores a row's new key inside the attention kernel, where another "
                "row may already be reading it: unset VICUNAFLOW_ROPE (or set it to product or separate), or drop --mixed-prefill"
            )
        self.mixed_prefill = mixed_prefill
        self.eos_id = tokenizer.eos_token_id
        self.device = model.device
        cuda = self.device.type == "cuda"
        cuda_graphs = cuda_graphs and cuda
        padded_decode = cuda_graphs if padded_decode is None else padded_decode
        supports_kernels = cuda and model.dtype in (torch.float16, torch.bfloat16) and kernels.available()
        decode_kernels = supports_kernels if decode_kernels is None else decode_kernels and supports_kernels
        # before any rank allocates anything (serve checks it earlier still, from config.json)
        blocks = kv_cache_blocks(kv_cache_tokens, context=self.context, max_batch_size=max_batch_size)
        self.runner = Runner(
            model,
            max_batch_size,
            self.context,
            cuda_graphs=cuda_graphs,
            padded=padded_decode,
            kernels=decode_kernels,
            blocks=blocks,
            kv_cache_dtype=kv_cache_dtype,
        )
        self.cache = self.runner.cache
        self.overlap = cuda if overlap is None else overlap  # CPU kernels run synchronously
        self.in_flight: DecodeStep | None = None  # launched, its tokens not yet read on the host
        self.host_tokens = [torch.zeros(max_batch_size, dtype=torch.long, pin_memory=cuda) for _ in range(2)]
        self.launches = 0
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(7), "little"))
        self.rows: list[Request] = []  # active requests; row i of the cache belongs to rows[i]
        self.lengths: list[int] = []  # tokens in the cache per row
        self.last_tokens: list[int] = []  # sampled, not yet in the cache
        self.waiting: deque[Request] = deque()
        self.prefilling: list[PrefillJob] = []  # admitted, prompt not yet all in the cache (oldest first)
        self.lock = threading.Condition()
        self.running = False
        self.failure: str | None = None  # why the loop stopped on an error no request could be blamed for
        self.thread: threading.Thread | None = None
        self.stats = {"steps": 0, "decode_tokens": 0, "prefills": 0, "max_batch": 0, "requests": 0, "cancelled": 0}
        self.stats["queued_ahead"] = 0  # steps launched while the previous one was still in flight
        self.stats["preempted"] = 0  # requests sent back to the queue for want of KV blocks
        self.stats["mixed_prefill_tokens"] = 0  # prompt tokens written by decode steps (mixed_prefill)
        # where a first token's time goes inside the engine, summed over first tokens: waiting for a row and
        # blocks (queue), then from admission to the token's event (prefill chunks, and the decode steps of
        # other rows between them); a client's time to first token adds the HTTP side and the network
        self.stats |= {"first_tokens": 0, "first_token_queue_s": 0.0, "first_token_prefill_s": 0.0}
        self.stats |= {"prompt_tokens": 0, "generated_tokens": 0}  # prompts admitted (not resumes); tokens emitted
        self.batch_sizes: Counter[int] = Counter()
        self.finished: Counter[str] = Counter()  # requests by finish reason
        # time to first token and whole requests (from submit), gaps between a reply's tokens: serve's /metrics.
        # A row's gap is the time since the previous step's tokens were read, unless it is fresh: it joined the
        # rows since (a first token, a resume), and its gap runs from its request's last_token_at (one pass
        # over the fresh rows a step, not an attribute read and a bisect per row-token)
        self.latency = engine_histograms()
        self.last_collect_at = 0.0
        # where the engine's latest GPU work ends (CUDA; a decode step's or a prefill forward's event), None after the
        # loop waited for work: a decode step's idle time before it runs from there
        self.gpu_mark: torch.cuda.Event | None = None
        self.fresh_rows: list[Request] = []
        # called by the engine thread once a piece of work has emitted its events (a prefill forward's first tokens,
        # a pass of the loop): where serve's engine process sends them, one message each (serve/engine_process.py)
        self.flush_events: Callable[[], None] | None = None
        log.info(
            "engine: %d slots x %d tokens, KV cache %d tokens (%d blocks of %d) %.1f MiB per rank, %d rank(s), "
            "CUDA graphs %s%s, overlap %s",
            max_batch_size,
            self.context,
            self.cache.blocks * self.cache.block_size,
            self.cache.blocks,
            self.cache.block_size,
            self.cache.nbytes() / 2**20,
            model.comm.world,
            "on" if cuda_graphs else "off",
            ", Triton matvec" if decode_kernels else "",
            "on" if self.overlap else "off",
        )
        if cuda if warm_up is None else warm_up:
            self._warm_up()

    def _warm_up(self) -> None:
        """Every decode shape and prefill length class once, now rather than on a request's path."""
        start = time.perf_counter()
        longest = min(self.context - 1, self.prefill_chunk)  # the longest piece a prefill forward writes
        lengths = sorted({min(2**i, longest) for i in range(4, longest.bit_length() + 1)})  # 16, 32, ..., longest
        shapes = self.runner.warm_up(lengths)
        log.info(
            "warmed %d decode shapes in %.1f s (and %d prefill lengths up to %d)",
            shapes,
            time.perf_counter() - start,
            len(lengths),
            longest,
        )

    # -- public API ---------------------------------------------------------------------------------------

    def start(self) -> Engine:
        if not self.running:
            self.running = True
            self.thread = threading.Thread(target=self._loop, name="vicunaflow-engine", daemon=True)
            self.thread.start()
        return self

    def stop(self) -> None:
        with self.lock:
            self.running = False
            self.lock.notify_all()
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, sink: Callable[[Event], None]) -> Request:
        check_prompt(prompt_ids, self.context)
        request = Request(prompt_ids, params, sink, self.tokenizer)
        with self.lock:
            if self.failure is not None:  # no thread would ever take it: refuse rather than leave it waiting
                raise VicunaflowError(f"the engine stopped after an error: {self.failure}")
            self.waiting.append(request)
            self.stats["requests"] += 1
            self.lock.notify_all()
        return request

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[Event]:
        """Submit one request and yield its events; closing the iterator early cancels the request."""
        import queue

        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        request = self.submit(prompt_ids, params, events.put)
        try:
            while True:
                event = events.get()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            request.cancel()

    def max_new_tokens(self, prompt_length: int, requested: int | None) -> int:
        return reply_room(self.context, prompt_length, requested)

    def snapshot_latency(self) -> dict[str, dict]:
        """Each latency histogram's snapshot (latency.Histogram.snapshot), by name."""
        return {name: histogram.snapshot() for name, histogram in self.latency.items()}

    def snapshot_stats(self) -> dict:
        with self.lock:
            return {
                **self.stats,
                "active": sum(not r.done for r in self.rows) + len(self.prefilling),
                "waiting": len(self.waiting),
                "batch_sizes": dict(sorted(self.batch_sizes.items())),
                "finished": dict(sorted(self.finished.items())),
                "max_batch_size": self.max_batch_size,
                "context": self.context,
                "kv_blocks": self.cache.blocks,
                "kv_blocks_free": len(self.cache.free),
                "block_size": self.cache.block_size,
                "prefill_chunk": self.prefill_chunk,
                "prefill_burst": self.prefill_burst,
                "cuda_graphs": self.runner.cuda_graphs,
                "decode_kernels": self.runner.kernels,
                "overlap": self.overlap,
                "tensor_parallel": self.model.comm.world,
                "all_reduce": getattr(self.model.comm, "mode", "none"),
                "failure": self.failure,
            }

    # -- the loop -----------------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._steps()
        finally:  # the events of the requests ended on the way out
            self._flush_events()

    def _steps(self) -> None:
        """Step until stopped. A failed step fails its requests, a failed admission its request; any other
        error (a bug in the bookkeeping) fails every request and stops the engine, reported in `failure`
        and refused by `submit`: a dead thread with clients still waiting on it would hang them forever.
        With tensor-parallel ranks a failed step stops the engine too: the others may wait in its collectives."""
        try:
            while True:
                with self.lock:
                    while self.running and not self.rows and not self.prefilling and not self.waiting:
                        self.gpu_mark = None  # the GPU waits for requests: not idle time of the steps
                        self.lock.wait()
                    if not self.running:
                        break
                    self._take_waiting()
                try:
                    self._drop_finished()
                    if self.prefilling and not self._mixes():
                        self._drain()  # rows finishing their prompt join a batch with no step in flight
                        try:
                            self._prefill_chunk()
                        except torch.OutOfMemoryError:
                            if not self._smaller_bursts():
                                raise
                        self._flush_events()  # the first tokens go out now, not after the decode step below
                    self._drop_finished()
                    if self.rows:
                        self._decode_step()
                except Exception as err:  # a failed step fails its requests, not the server
                    if self.model.comm.world > 1:  # the other ranks may wait in collectives it left: out of step
                        raise
                    log.exception("generation step failed")
                    for request in self.rows + [job.request for job in self.prefilling]:
                        if not request.done:
                            self._finish(request, "error", error=f"{type(err).__name__}: {err}")
                    self._forget_rows()
                self._flush_events()
        except Exception as err:
            log.exception("engine loop failed: the engine stops")
            if self.model.comm.world > 1:
                self.model.comm.out_of_step = True  # closing must not order the other ranks about: it ends them
            with self.lock:
                self.failure = f"{type(err).__name__}: {err}"
                self.running = False
                waiting, self.waiting = list(self.waiting), deque()
            for request in self.rows + [job.request for job in self.prefilling] + waiting:
                self._finish(request, "error", error=f"the engine stopped after an error: {self.failure}")
            return
        with self.lock:  # stopped: what is left ends here and leaves the queues, so a restart cannot revive it
            waiting, self.waiting = list(self.waiting), deque()
        for request in self.rows + [job.request for job in self.prefilling] + waiting:
            request.cancelled = True
            self._finish(request, "cancelled")
        self._forget_rows()

    def _flush_events(self) -> None:
        if self.flush_events is not None:
            self.flush_events()

    def _forget_rows(self) -> None:
        """Drop every row, prefilling prompt and step in flight, and give all blocks back (their requests ended)."""
        self.rows, self.lengths, self.last_tokens, self.in_flight, self.prefilling = [], [], [], None, []
        for row in range(self.max_batch_size):
            self.cache.release(row)

    def _admissible(self) -> bool:
        """Whether `_take_waiting` would take the first waiting request now."""
        with self.lock:
            if not self.waiting or len(self.rows) + len(self.prefilling) >= self.max_batch_size:
                return False
            request = self.waiting[0]
            return request.cancelled or self._fits(request)

    def _fits(self, request: Request) -> bool:
        """The blocks for the request's prompt (and reply so far), plus a block of headroom per running row, are free."""
        headroom = len(self.rows) + len(self.prefilling)  # a block for each running row to grow into
        tokens = len(request.prompt_ids) + max(0, request.completion_tokens - 1)
        return not headroom or self.cache.blocks_for(tokens) + headroom <= len(self.cache.free)

    def _take_waiting(self) -> None:
        """Move waiting requests to prefill, oldest first, while a row and the blocks for the whole prompt
        are free; each gets its row and blocks now. A request that does not fit waits, and so do the
        ones behind it (no long prompt is overtaken forever). Requests cancelled while they waited (their
        client left) end now, wherever they are in the queue, not when a row frees up."""
        if any(request.cancelled for request in self.waiting):
            for request in [request for request in self.waiting if request.cancelled]:
                self.waiting.remove(request)
                self._finish(request, "cancelled")
        while self.waiting and len(self.rows) + len(self.prefilling) < self.max_batch_size:
            request = self.waiting[0]
            if request.cancelled:
                self.waiting.popleft()
                self._finish(request, "cancelled")
                continue
            try:
                if not self._fits(request):
                    break
                self.waiting.popleft()
                self._admit(request)
            except Exception as err:  # this request fails, with the reason; the others are still served
                log.exception("admitting request %d failed", request.id)
                if self.waiting and self.waiting[0] is request:
                    self.waiting.popleft()
                self._finish(request, "error", error=f"{type(err).__name__}: {err}")

    def _admit(self, request: Request) -> None:
        """Give a request taken from the queue its row and the blocks for its prompt; queue its prefill."""
        generated = request.decoder.ids  # a preempted request resumes: its reply so far is re-read too
        tokens = request.prompt_ids + generated[:-1]
        taken = {job.row for job in self.prefilling}
        # the highest free row: decoding rows grow from 0 up, so a prompt row is rarely in the way
        row = max(r for r in range(len(self.rows), self.max_batch_size) if r not in taken)
        try:
            self.cache.ensure(row, len(tokens))
            request.admitted = time.perf_counter()
            if not generated:
                self.stats["prompt_tokens"] += len(request.prompt_ids)
            logprobs = request.params.prompt_logprobs if not generated else None
            first = [TokenLogprob(request.prompt_ids[0], None, [])] if logprobs is not None else None
            self.prefilling.append(PrefillJob(request, row, tokens, generated[-1] if generated else None, first))
        except BaseException:
            self.cache.release(row)  # no job holds the row: its blocks would be lost
            raise

    def _prefill_budget(self) -> int:
        """Prompt tokens (rows x padded length) the next prefill forward may take: a chunk for every prompt
        waiting per prefill_burst rows decoding, at least one chunk and at most prefill_burst (module docstring).
        One prompt joining 31 decoding rows gets a chunk; 28 behind 4 rows, or 96 behind 160, several."""
        waiting, decoding = len(self.prefilling), len(self.rows)
        rows_per_chunk = max(1, decoding // self.prefill_burst)
        return self.prefill_chunk * min(self.prefill_burst, max(1, waiting // rows_per_chunk))

    def _smaller_bursts(self) -> bool:
        """A prefill forward of several chunks ran out of device memory (its activations, eager, beside the
        weights and the KV cache): halve prefill_burst for the engine's life and return True, so the prompts are
        written again, from where they were, in smaller forwards (a forward's partial writes are overwritten:
        nothing of it was taken). False when the forward was one chunk (a failed step then fails its requests),
        and with tensor-parallel ranks, whose collectives the failed forward left behind."""
        if self._prefill_budget() <= self.prefill_chunk or self.model.comm.world > 1:
            return False
        log.warning(
            "a prefill forward of up to %d chunks ran out of device memory: up to %d from now on (--prefill-burst)",
            self.prefill_burst, max(1, self.prefill_burst // 2),
        )  # fmt: skip
        self.prefill_burst = max(1, self.prefill_burst // 2)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the failed forward's blocks, back for the smaller ones
        return True

    def _prefill_chunk(self) -> None:
        """Prefill the next pieces of the waiting prompts, oldest first, in one forward of at most
        `_prefill_budget()` tokens (rows x padded length); prompts that end in it join the decoding rows.

        Oldest first, and a younger prompt only gets tokens once the older ones' rest fits: prompts end
        in the order they came, each after at most a chunk's worth of work per decode step.
        A request with max_new_tokens 0 (OpenAI's echo with max_tokens 0) ends here, with its prompt's
        log-probabilities if it asked, and without a token.
        """
        chunks, jobs, longest, budget = [], [], 0, self._prefill_budget()
        for job in self.prefilling:
            prompt = job.tokens
            take = min(len(prompt) - job.done, budget // (len(chunks) + 1))
            if chunks and (take < len(prompt) - job.done or max(longest, take) * (len(chunks) + 1) > budget):
                break
            piece = prompt[job.done : job.done + take]
            k = job.request.params.prompt_logprobs if job.prompt_logprobs is not None else None
            targets = prompt[job.done + 1 : job.done + take + 1] if k is not None else []
            chunks.append(PrefillChunk(piece, job.done, job.row, k, targets))
            jobs.append(job)
            longest = max(longest, take)
        started = time.perf_counter()
        logits, entries = self.runner.prefill_chunks(chunks)  # [n, vocab]
        self.gpu_mark = self._gpu_event()
        self.stats["prefills"] += 1
        if log.isEnabledFor(logging.DEBUG):  # when a burst's prompts arrived and were written (VICUNAFLOW_LOG_LEVEL)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            submitted = [job.request.submitted for job in jobs]
            log.debug(
                "prefill forward: %d pieces, %d tokens, %d rows decoding; submitted %.1f-%.1f ms, ran %.1f-%.1f ms",
                len(chunks), sum(len(c.tokens) for c in chunks), len(self.rows), 1000 * min(submitted),
                1000 * max(submitted), 1000 * started, 1000 * time.perf_counter(),
            )  # fmt: skip
        finished = []
        for i, (job, chunk, entry) in enumerate(zip(jobs, chunks, entries, strict=True)):
            job.done += len(chunk.tokens)
            if entry is not None:
                job.prompt_logprobs += entry
            if job.done == len(job.tokens):
                finished.append(i)
        for job in [jobs[i] for i in finished if jobs[i].resume is not None]:  # preempted: carry on decoding
            self.prefilling.remove(job)
            self._join(job)
            self.last_tokens.append(job.resume)
        finished = [i for i in finished if jobs[i].resume is None]
        if not finished:
            return
        done = [jobs[i] for i in finished]
        requests = [job.request for job in done]
        logits = logits[finished]
        sampled, logprobs = self._first_token(logits, requests)
        self.gpu_mark = self._gpu_event()  # the first tokens' sampling is the forward's GPU work too
        tokens = sampled.tolist()
        self._start_replies(done, tokens, self._entries(tokens, logprobs, requests))

    def _start_replies(self, jobs: list[PrefillJob], tokens: list[int], entries: list[TokenLogprob | None]) -> None:
        """Prompts written to the cache: each request joins the decoding rows with its first token."""
        for job, token, entry in zip(jobs, tokens, entries, strict=True):
            self.prefilling.remove(job)
            self._join(job)
            request = job.request
            self.last_tokens.append(token)
            request.prompt_logprobs = job.prompt_logprobs
            if request.params.max_new_tokens <= 0:
                self._finish(request, "length")
            else:
                self._emit(request, token, entry)
                self.stats["generated_tokens"] += 1
                self._count_first_token(request)

    def _mixes(self) -> bool:
        """Whether the next prompt pieces ride in the next decode step rather than a chunk of their own: rows
        decode, the step has rows to spare for a whole mixed_prefill (a few would starve the prompts: a step
        of 7 decoding rows in an 8-row engine would write 1 prompt token a step), and the oldest prompt asks
        no prompt log-probabilities."""
        return bool(
            self.mixed_prefill
            and self.rows
            and self.max_batch_size - len(self.rows) >= self.mixed_prefill
            and self.prefilling[0].prompt_logprobs is None
        )

    def _pieces(self) -> list[tuple[PrefillJob, PrefillChunk]]:
        """The next pieces of the prompts being written, oldest first: at most mixed_prefill tokens, and no
        more rows than the step's largest bucket (max_batch_size) leaves beside the decoding rows."""
        room = min(self.mixed_prefill, self.max_batch_size - len(self.rows))
        pieces = []
        for job in self.prefilling:
            if room <= 0 or job.prompt_logprobs is not None:
                break
            take = min(len(job.tokens) - job.done, room)
            pieces.append((job, PrefillChunk(job.tokens[job.done : job.done + take], job.done, job.row)))
            room -= take
        return pieces

    def _advance(self, step: DecodeStep) -> None:
        """A step's prompt pieces are in the cache: prompts that ended there start their replies (a preempted
        request's resumes with its last token, nothing sampled)."""
        for job, count in step.pieces:
            job.done += count
            self.stats["mixed_prefill_tokens"] += count
            if job.done == len(job.tokens) and job.resume is not None:
                self.prefilling.remove(job)
                self._join(job)
                self.last_tokens.append(job.resume)
        if step.starting:
            tokens = step.first.tolist()
            requests = [job.request for job in step.starting]
            self._start_replies(step.starting, tokens, self._entries(tokens, step.first_logprobs, requests))

    def _count_first_token(self, request: Request) -> None:
        now = time.perf_counter()
        request.last_token_at = now
        self.latency["time_to_first_token"].observe(now - request.submitted)
        with self.lock:
            self.stats["first_tokens"] += 1
            self.stats["first_token_queue_s"] += request.admitted - request.submitted
            self.stats["first_token_prefill_s"] += now - request.admitted

    def _join(self, job: PrefillJob) -> None:
        """Make a prefilled prompt's row the next decoding row, len(self.rows): move its cache there (swapping
        with a younger prompt's partial row if one sits there)."""
        target = len(self.rows)
        if job.row != target:
            blocker = next((other for other in self.prefilling if other.row == target), None)
            if blocker is not None:
                self.cache.swap_rows(job.row, target)
                blocker.row = job.row
            else:
                self.cache.move_row(job.row, target)
        self.rows.append(job.request)
        self.lengths.append(job.done)
        self.fresh_rows.append(job.request)

    @torch.inference_mode()
    def _decode_step(self) -> None:
        """Feed each row its last sampled token at its own position; read and emit one step's tokens.

        With overlap, the step after the one in flight is queued first (from its tokens on the device),
        unless the batch is about to change: a request waits, a row is done, or a row could reach its
        length limit with the token in flight.
        """
        if self.in_flight is None:
            self._make_room()
            if not self.rows:
                return
            pieces = self._pieces() if self.prefilling and self._mixes() else []
            self.in_flight = self._launch(self.last_tokens, pieces)
        queued = None
        if self.overlap and self._batch_stays():
            queued = self._launch(self.in_flight.tokens)
            self.stats["queued_ahead"] += 1
        self._collect(self.in_flight)
        self.in_flight = queued

    def _batch_stays(self) -> bool:
        """True when every row will still be running after the step in flight, as far as the host can tell,
        and no waiting request could join now (one that waits for blocks leaves the overlap on)."""
        if self.prefilling or self._admissible():
            return False
        if len(self.cache.growing(self.lengths)) > len(self.cache.free):
            return False
        context = self.context
        if self.lengths and max(self.lengths) + 1 >= context:
            return False
        for request in self.rows:
            if request.done or request.cancelled:
                return False
            generated = request.completion_tokens + 1  # with the token in flight
            if generated >= request.params.max_new_tokens or len(request.prompt_ids) + generated >= context:
                return False
        return True

    def _launch(
        self, tokens: list[int] | torch.Tensor, pieces: Sequence[tuple[PrefillJob, PrefillChunk]] = ()
    ) -> DecodeStep:
        """Queue one decode step (carrying prompt pieces, if given) and the copy of its sampled tokens to the
        host; returns without waiting."""
        n = len(self.rows)
        # each row's index in its reply of the token this step draws: the host has read every earlier step,
        # except the one in flight when this step is queued ahead of it (overlap)
        ahead = int(self.in_flight is not None)
        indices = [r.completion_tokens + ahead for r in self.rows]
        started, previous = self._gpu_event(), self.gpu_mark
        all_logits, all_greedy = self.runner.step(tokens, self.lengths, [chunk for _, chunk in pieces])
        logits, greedy = all_logits[:n], all_greedy[:n]
        sampled = self._sample(logits, greedy, self.rows, indices)  # [n] on the device
        logprobs = self._logprobs(logits, sampled, self.rows)  # before the next step overwrites a graph's logits
        starting, first, first_logprobs = self._first_tokens(all_logits, n, pieces)
        host = self.host_tokens[self.launches % 2][:n]  # last used two launches ago, and read since
        self.launches += 1
        host.copy_(sampled, non_blocking=host.is_pinned())
        done = self.gpu_mark = self._gpu_event()
        self.lengths = [length + 1 for length in self.lengths]  # the step writes each row's token into the cache
        written = [(job, len(chunk.tokens)) for job, chunk in pieces]
        return DecodeStep(
            list(self.rows), sampled, host, done, logprobs, written, starting, first, first_logprobs, started, previous
        )

    def _gpu_event(self) -> torch.cuda.Event | None:
        """A timed event recorded now on the engine's stream (CUDA), else None."""
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def _first_tokens(self, logits: torch.Tensor, n: int, pieces: Sequence[tuple[PrefillJob, PrefillChunk]]):
        """The prompts a step's pieces end (a preempted request's resume samples nothing), and their first
        tokens drawn from their last prompt token's row of logits [n + piece tokens, vocab], on the device."""
        starting, index, row = [], [], n
        for job, chunk in pieces:
            row += len(chunk.tokens)
            if job.done + len(chunk.tokens) == len(job.tokens) and job.resume is None:
                starting.append(job)
                index.append(row - 1)
        if not starting:
            return [], None, None
        rows = logits[torch.tensor(index, device=logits.device)]  # [len(starting), vocab], a copy
        requests = [job.request for job in starting]
        return starting, *self._first_token(rows, requests)

    def _first_token(self, logits: torch.Tensor, requests: Sequence[Request]):
        """Each prompt's reply token 0 from its last prompt token's logits [n, vocab], with its logprobs."""
        first = self._sample(logits, logits.argmax(dim=-1), requests, [0] * len(requests))
        return first, self._logprobs(logits, first, requests)

    def _collect(self, step: DecodeStep) -> None:
        """Wait for a launched step's tokens and emit them (the batch has not changed since its launch)."""
        if step.done is not None:
            step.done.synchronize()
            self.latency["step_gpu"].observe(step.started.elapsed_time(step.done) / 1000)
            if step.previous is not None:  # done before `started`: its time is known
                self.latency["gpu_idle"].observe(max(0.0, step.previous.elapsed_time(step.started)) / 1000)
        tokens = step.host.tolist()
        entries = self._entries(tokens, step.logprobs, step.rows)
        n = len(tokens)
        self.stats["steps"] += 1
        self.stats["decode_tokens"] += n
        self.stats["max_batch"] = max(self.stats["max_batch"], n)
        self.batch_sizes[n] += 1
        now, fresh, emitted = time.perf_counter(), [], 0
        if self.fresh_rows:  # the fresh rows this step emits for; the others stay fresh (or were dropped)
            in_step = set(step.rows)
            fresh = [r for r in self.fresh_rows if r in in_step and not r.done]
            self.fresh_rows = [r for r in self.fresh_rows if r not in in_step and not r.done]
        for i, (request, token, entry) in enumerate(zip(step.rows, tokens, entries, strict=True)):
            self.last_tokens[i] = token
            if not request.done:
                emitted += 1
                self._emit(request, token, entry)
        self.stats["generated_tokens"] += emitted
        gaps = self.latency["inter_token"]
        for request in fresh:
            gaps.observe(now - request.last_token_at)
        gaps.observe(now - self.last_collect_at, emitted - len(fresh))  # every other row emitted at the last read
        self.last_collect_at = now
        if step.pieces:
            self._advance(step)

    def _drain(self) -> None:
        """Read the step in flight, if any, so the batch can change."""
        if self.in_flight is not None:
            step, self.in_flight = self.in_flight, None
            self._collect(step)

    def _sample(
        self, logits: torch.Tensor, greedy: torch.Tensor, requests: Sequence[Request], indices: Sequence[int]
    ) -> torch.Tensor:
        """indices: each row's reply-token index, which (with its seed) is all a seeded row's draw depends on."""
        return sample(logits, greedy, [r.params for r in requests], self.generator, indices)

    @staticmethod
    def _logprobs(logits: torch.Tensor, sampled: torch.Tensor, requests: Sequence[Request]):
        """The sampled tokens' logprobs and the top-k of every row (k: the most any row asks), on the device;
        None, and no work, when no row asks. Of the raw distribution: the logits before temperature and top-p."""
        ks = [r.params.logprobs for r in requests if r.params.logprobs is not None]
        return logprobs_of(logits, sampled, max(ks)) if ks else None

    @staticmethod
    def _entries(tokens: list[int], logprobs, requests: Sequence[Request]) -> list[TokenLogprob | None]:
        if logprobs is None:
            return [None] * len(tokens)
        host = tuple(t.tolist() for t in logprobs)  # the step has finished: its tokens were read
        return to_entries(tokens, host, [r.params.logprobs for r in requests])

    # -- bookkeeping --------------------------------------------------------------------------------------

    def _emit(self, request: Request, token: int, entry: TokenLogprob | None = None) -> None:
        """Send the new text of one sampled token; finish on EOS, a stop string or the length limit."""
        if entry is not None:
            request.pending.append(entry)
        if token == self.eos_id and not request.params.ignore_eos:
            tail = request.held + request.decoder.flush()
            request.decoder.ids.append(token)
            request.held = ""
            self._finish(request, "stop", text=tail)
            return
        params, decoder = request.params, request.decoder
        request.held = held = request.held + decoder.push(token)
        stop_at = find_stop(held, params.stop)
        if stop_at is not None:
            self._finish(request, "stop", text=held[:stop_at])
            return
        n_generated = request.completion_tokens
        if n_generated >= params.max_new_tokens or len(request.prompt_ids) + n_generated >= self.context:
            self._finish(request, "length", text=held + decoder.flush())
            return
        ready_length = len(held) - stop_prefix_length(held, params.stop)  # the rest might start a stop string
        ready, request.held = held[:ready_length], held[ready_length:]
        if ready:
            request.text += ready
            try:
                request.sink(request.event(ready))
            except Exception:  # the consumer's fault (a closed socket, a full queue): end its request, not the batch
                log.exception("request %d: its event handler failed; the request is cancelled", request.id)
                request.cancel()

    def _finish(self, request: Request, reason: str, text: str = "", error: str | None = None) -> None:
        if request.done:
            return
        request.done = True
        if reason == "cancelled":
            self.stats["cancelled"] += 1
        self.finished[reason] += 1
        self.latency["request"].observe(time.perf_counter() - request.submitted)
        request.text += text
        with contextlib.suppress(Exception):
            request.sink(request.event(text, finish_reason=reason, error=error))

    def _drop_finished(self) -> None:
        """Free the rows of finished or cancelled requests, moving the last rows into the gaps."""
        for job in [job for job in self.prefilling if job.request.cancelled]:
            self.prefilling.remove(job)
            self.cache.release(job.row)
            self._finish(job.request, "cancelled")
        if not any(r.done or r.cancelled for r in self.rows):
            return  # nothing to free (the loop below would change nothing)
        self._drain()
        i = 0
        while i < len(self.rows):
            request = self.rows[i]
            if request.cancelled and not request.done:
                self._finish(request, "cancelled")
            if not request.done:
                i += 1
                continue
            self._remove_row(i)

    def _remove_row(self, i: int) -> None:
        """Give row i's blocks back and move the last row into it (rows stay 0..n-1)."""
        self.cache.release(i)
        last = len(self.rows) - 1
        if i != last:
            self.cache.move_row(last, i)
            self.rows[i], self.lengths[i], self.last_tokens[i] = (
                self.rows[last],
                self.lengths[last],
                self.last_tokens[last],
            )
        self.rows.pop()
        self.lengths.pop()
        self.last_tokens.pop()

    def _make_room(self) -> None:
        """Before a step (none in flight): if the rows need more new blocks than are free, preempt the youngest
        decoding requests until they fit; each goes back to the front of the queue with its reply so far."""
        while True:
            if len(self.cache.growing(self.lengths)) <= len(self.cache.free):
                return
            youngest = max(range(len(self.rows)), key=lambda i: self.rows[i].id)
            request = self.rows[youngest]
            self._remove_row(youngest)
            if request in self.fresh_rows:  # no token since it joined: its last_token_at stands
                self.fresh_rows.remove(request)
            else:
                request.last_token_at = self.last_collect_at
            with self.lock:
                self.waiting.appendleft(request)
            self.stats["preempted"] += 1
            log.info(
                "KV cache full: request %d goes back to the queue (%d tokens so far)",
                request.id,
                request.completion_tokens,
            )


def timed(events: Iterator[Event]) -> tuple[str, Event, float]:
    """Drain an event iterator; return (text, last event, seconds). For prompts mode and benchmarks."""
    start = time.perf_counter()
    text, last = "", Event("")
    for last in events:
        text += last.text
    return text, last, time.perf_counter() - start


def check_prompt(prompt_ids: Sequence[int], context: int) -> None:
    """What submit refuses at once: an empty prompt, or one that leaves no room in the context for a reply."""
    if not prompt_ids:
        raise ValueError("empty prompt")
    if len(prompt_ids) >= context:
        raise VicunaflowError(f"the prompt is {len(prompt_ids)} tokens; the context is {context} tokens")


def reply_room(context: int, prompt_length: int, requested: int | None) -> int:
    """Cap a reply so prompt + reply fit the context."""
    room = context - prompt_length
    return max(0, min(requested, room) if requested else room)


def check_max_context(max_context: int | None) -> None:
    """Refuse a --max-context below one token (None: the model's own), before any model loads."""
    if max_context is not None and max_context < 1:
        raise VicunaflowError(
            f"--max-context {max_context}: must be at least 1, or left out for the model's max_position_embeddings"
        )


def context_length(model: Transformer, max_context: int | None = None) -> int:
    """Tokens the model attends over: its max_position_embeddings (2048 for LLaMA-1), or less if asked."""
    check_max_context(max_context)
    limit = model.args.max_position_embeddings
    if max_context is not None and max_context > limit:
        log.warning("--max-context %d: the model attends over at most %d tokens (its config.json)", max_context, limit)
    return min(limit, max_context) if max_context is not None else limit


def kv_cache_blocks(kv_cache_tokens: int | None, *, context: int, max_batch_size: int) -> int | None:
    """Blocks of the paged KV cache for --kv-cache-tokens (None: the default, every row at full context).

    Refuses a cache that cannot hold one full-context request: such a request could never be admitted.
    The Engine's rule, also called by `serve` on config.json alone, before any weights load.
    """
    if kv_cache_tokens is None:
        return None
    width = -(-context // BLOCK_SIZE)  # blocks of one full-context row
    blocks = min(max_batch_size * width, -(-kv_cache_tokens // BLOCK_SIZE))
    if blocks < width:
        raise VicunaflowError(
            f"--kv-cache-tokens {kv_cache_tokens} cannot hold one request of the context's {context} tokens: "
            f"the minimum is {width * BLOCK_SIZE} ({width} blocks of {BLOCK_SIZE}); give at least that, "
            "or a smaller --max-context"
        )
    return blocks

"""The engine under serving load (issue 16): start-up warm-up, chunked prefill, the paged KV cache.

Greedy replies must stay the engine's usual ones (which tests/test_generate.py pins to transformers):
each test compares a run with the feature against a plain run on the tiny models, on the CPU.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import pytest
import torch

from vicunaflow import VicunaflowError, attention_kernels, template
from vicunaflow.engine import Engine, SamplingParams, encode_prompt, load_model
from vicunaflow.engine import model as engine_model
from vicunaflow.engine.runner import Runner, row_buckets

QUESTIONS = ["Hello", "What is the capital of France? Tell me about it.", "hi", "Write a poem about llamas. " * 16]


def _prompt(tokenizer, question: str) -> list[int]:
    return encode_prompt(tokenizer, template.render([(template.USER, question), (template.ASSISTANT, None)]))


def _replies(model, tokenizer, prompts, max_new_tokens=12, **engine_options) -> list[list[int]]:
    """Greedy token ids of each prompt's reply, all submitted at once."""
    params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens, ignore_eos=True)
    done = threading.Semaphore(0)
    engine_options.setdefault("max_batch_size", 3)
    with Engine(model, tokenizer, **engine_options) as engine:
        requests = [engine.submit(p, params, lambda e: e.finish_reason and done.release()) for p in prompts]
        for _ in prompts:
            done.acquire()
        assert engine.snapshot_stats()["active"] == 0
    return [r.decoder.ids for r in requests]


def test_a_float8_kv_cache_holds_keys_and_values_rounded_to_float8(tiny_vicuna, monkeypatch):
    """kv_cache_dtype "fp8" (serve --kv-cache-dtype): a float8 cache, a byte a value, whose replies are exactly a
    model-dtype cache's holding every key and value rounded to float8: the rounding at the store is all it
    changes. On the CPU, where every store goes through cache.write (a GPU's decode kernels store into it
    themselves: tests/test_attention_kernels.py checks those)."""
    from vicunaflow.engine.cache import KVCache

    model, tokenizer = load_model(tiny_vicuna, device="cpu")
    prompts = [[1, 450, 748, 310], [1, *range(300, 340)], [1, 221]]
    with Engine(model, tokenizer, max_batch_size=3, kv_cache_dtype="fp8") as engine:
        assert engine.cache.keys[0].dtype == torch.float8_e4m3fn
        assert engine.cache.nbytes() == engine.cache.keys[0].numel() * 2 * model.args.n_layers
    with pytest.raises(VicunaflowError, match="--kv-cache-dtype 'fp4': choose one of auto, fp8"):
        Engine(model, tokenizer, kv_cache_dtype="fp4")
    in_float8 = _replies(model, tokenizer, prompts, kv_cache_dtype="fp8")
    write = KVCache.write

    def write_rounded(self, layer, tables, positions, k, v):
        float8 = torch.float8_e4m3fn
        write(self, layer, tables, positions, k.to(float8).to(k.dtype), v.to(float8).to(v.dtype))

    monkeypatch.setattr(KVCache, "write", write_rounded)
    assert _replies(model, tokenizer, prompts) == in_float8


def test_row_buckets_are_few_and_dense_enough():
    assert row_buckets(1) == [1]
    assert row_buckets(3) == [1, 2, 3]
    assert row_buckets(16) == [1, 2, 4, 8, 16]
    buckets = row_buckets(256)
    assert buckets[:6] == [1, 2, 4, 8, 16, 24] and buckets[-1] == 256 and len(buckets) == 27
    for rows in range(9, 257):  # padding never adds more than 1/8 of the rows
        padded = next(b for b in buckets if b >= rows)
        assert padded - rows < max(8, rows / 8 + 1), rows
    assert len(row_buckets(1000)) < 60 and row_buckets(1000)[-1] == 1000


def test_steps_through_the_attention_kernel_take_one_of_its_grid_widths(loaded):
    """With the attention kernel (as on CUDA), a step's attended length is 512 or the context, padded or not
    (each width compiles the kernel once), and reaches its rows' newest position; without it, steps of 256."""
    model, _ = loaded
    runner = Runner(model, 4, 2048, cuda_graphs=False, padded=False, kernels=False)
    assert runner.kv_buckets == list(range(256, 2049, 256))  # no kernel on the CPU: gathered for SDPA
    runner.attention_kernel = True
    assert runner.attended_lengths(2048) == [512, 2048] and runner.attended_lengths(300) == [300]
    runner.kv_buckets = runner.attended_lengths(2048)
    for end, width in [(1, 512), (512, 512), (513, 2048), (2048, 2048)]:
        assert runner.bucket_key(3, end) == (3, width), end
        runner.padded = True
        assert runner.bucket_key(3, end) == (4, width), end
        runner.padded = False
        assert runner.cache.blocks_for(width) > (end - 1) // runner.cache.block_size  # the newest block


def test_warm_up_runs_every_bucket_then_serves_the_same_replies(loaded, caplog):
    """Warm-up (padded layout, eager on the CPU) visits every (rows, kv length) bucket, leaves a zeroed
    cache, and the replies after it are the replies of an engine that never warmed up."""
    model, tokenizer = loaded
    prompts = [_prompt(tokenizer, q) for q in QUESTIONS]
    expected = _replies(model, tokenizer, prompts, padded_decode=True, warm_up=False)
    with caplog.at_level(logging.INFO, logger="vicunaflow.engine.scheduler"):
        engine = Engine(model, tokenizer, max_batch_size=3, padded_decode=True, max_context=512, warm_up=True)
    runner = engine.runner
    # attended lengths in steps of KV_STEP; on a GPU the attention kernel reads each row to its own length, and
    # steps are bucketed by its grid's widths alone
    if not runner.attention_kernel:
        assert runner.kv_buckets == [256, 512]
    assert set(runner.buckets) == {(r, kv) for r in (1, 2, 3) for kv in runner.kv_buckets}
    assert f"warmed {len(runner.buckets)} decode shapes in" in caplog.text
    assert all(not t.any() for t in runner.cache.keys + runner.cache.values)  # nothing left to read
    del engine
    assert _replies(model, tokenizer, prompts, padded_decode=True, max_context=512, warm_up=True) == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_warm_up_captures_everything_before_the_first_request(tiny_vicuna):
    """float16 on a GPU: after start-up no request captures a graph or compiles a Triton kernel, whatever its
    length or batch (4 and 301 tokens share an eager forward: odd lengths, where rope_store's inputs would
    have specialised anew); prompts' first pieces replay prefill graphs and reply what an engine without
    graphs replies."""
    import triton

    model, tokenizer = load_model(tiny_vicuna, device="cuda", dtype="float16")
    prompts = [[1] + [5] * n for n in (3, 300, 700, 1500)]
    expected = _replies(model, tokenizer, prompts[:3], max_new_tokens=8, cuda_graphs=False)
    with Engine(model, tokenizer, max_batch_size=4) as engine:
        captured = {key for key, bucket in engine.runner.buckets.items() if bucket.get("graph") is not None}
        # the paged kernel: a graph per row bucket and grid width (steps whose rows end within 512, and the rest)
        assert engine.runner.kv_buckets == [512, engine.context]
        assert len(captured) == 2 * len(engine.runner.row_buckets)
        prefill_graphs = dict(engine.runner.prefill_graphs)
        assert (1, 16, 16) in prefill_graphs and (4, 128, 128) in prefill_graphs  # chunk 512: lengths 16 .. 512
        assert (1, 512, 1024) in prefill_graphs  # a long prompt's second piece
        params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
        threads = [threading.Thread(target=lambda p=p: list(engine.generate(p, params))) for p in prompts]
        compiled, hook = [], triton.knobs.runtime.jit_cache_hook  # called for every kernel not yet in memory
        triton.knobs.runtime.jit_cache_hook = lambda **info: compiled.append(info["repr"])  # None: compile it
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            triton.knobs.runtime.jit_cache_hook = hook
        assert not compiled, compiled
        assert set(engine.runner.buckets) == captured and engine.runner.cuda_graphs
        assert engine.runner.prefill_graphs == prefill_graphs
    assert _replies(model, tokenizer, prompts[:3], max_new_tokens=8) == expected


# -- chunked prefill --------------------------------------------------------------------------------------------


def _long_prompt(tokenizer, repeat: int = 12) -> list[int]:
    return _prompt(tokenizer, "Tell me everything about llamas and alpacas. " * repeat)


@pytest.mark.parametrize("fixture", ["tiny_vicuna", "tiny_gqa"], ids=["multi-head", "grouped-query"])
def test_chunked_prefill_gives_the_whole_prompt_replies(fixture, request):
    """Prompts cut into chunks of 7 or 64 tokens (several short prompts share a chunk) reply what a prefill
    of each whole prompt replies, token for token, with the exact and the padded decode layout."""
    model, tokenizer = load_model(request.getfixturevalue(fixture), device="cpu")
    prompts = [_prompt(tokenizer, q) for q in QUESTIONS] + [_long_prompt(tokenizer)]
    assert max(len(p) for p in prompts) > 2 * 64
    expected = _replies(model, tokenizer, prompts, prefill_chunk=4096)
    assert len({tuple(r) for r in expected}) > 1
    assert _replies(model, tokenizer, prompts, prefill_chunk=64) == expected
    assert _replies(model, tokenizer, prompts, prefill_chunk=7, padded_decode=True) == expected


@pytest.mark.parametrize("fixture", ["tiny_vicuna", "tiny_gqa"], ids=["multi-head", "grouped-query"])
@pytest.mark.parametrize("padded", [False, True], ids=["exact", "padded"])
def test_prompts_riding_in_decode_steps_give_the_same_replies(fixture, padded, request):
    """Prompts that arrive while a row decodes are written by the decode steps, each prompt token a row of
    its own (mixed_prefill tokens a step: one prompt over several steps, several prompts in one step), and
    every greedy reply is the one chunks give; a mixed_prefill of 0 writes none that way."""
    model, tokenizer = load_model(request.getfixturevalue(fixture), device="cpu")
    expected, stats = _riding_replies(model, tokenizer, 0, padded_decode=padded)
    assert stats["mixed_prefill_tokens"] == 0
    got, stats = _riding_replies(model, tokenizer, 24, padded_decode=padded)
    assert stats["mixed_prefill_tokens"] > 24 and got == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_prompts_riding_in_decode_steps_rotate_in_the_qkv_epilogue(tiny_gqa_wide_heads, monkeypatch):
    """float16 on a GPU, CUDA graphs, heads of 64 dims: batched steps rotate q and k and store the new keys and
    values in q|k|v's epilogue, prompt tokens riding in them included (rows sharing their prompt's block table, each
    storing at its own position before any row attends); the greedy replies are those of rope_store's launch doing
    that work (the same bits: both runs normalise through rows_input, NORMS "separate")."""
    model, tokenizer = load_model(tiny_gqa_wide_heads, device="cuda", dtype="float16")
    monkeypatch.setattr(engine_model, "NORMS", "separate")
    replies = {}
    for rope in ("separate", "product"):
        monkeypatch.setattr(attention_kernels, "ROPE", rope)
        replies[rope], stats = _riding_replies(model, tokenizer, 24)
        assert stats["mixed_prefill_tokens"] > 24
    assert engine_model.rope_in_product(8, model.layers[0].wqkv, model.matvec, model.args.head_dim)
    assert replies["product"] == replies["separate"]
    assert len({tuple(r) for r in replies["product"]}) > 1


def _riding_replies(model, tokenizer, mixed: int, **options) -> tuple[list[list[int]], dict]:
    """A long prompt decoding, then four prompts arriving while it does (written by its decode steps with a
    `mixed` of 24 or more): every reply's greedy token ids, and the engine's stats."""
    first = _long_prompt(tokenizer, 3)
    later = [_prompt(tokenizer, q) for q in QUESTIONS[:3]] + [_long_prompt(tokenizer, 2)]
    assert max(len(p) for p in later) > 24
    params = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
    # 40 rows: room beside the decoding rows for a whole mixed_prefill (a step has at most max_batch_size rows)
    with Engine(model, tokenizer, max_batch_size=40, mixed_prefill=mixed, **options) as engine:
        started, done = threading.Event(), threading.Semaphore(0)
        decoding = engine.submit(first, SamplingParams(temperature=0, max_new_tokens=60, ignore_eos=True),
                                 lambda e: started.set() if not e.finish_reason else done.release())  # fmt: skip
        assert started.wait(60)  # a row decodes: the prompts below arrive while it does
        requests = [engine.submit(p, params, lambda e: e.finish_reason and done.release()) for p in later]
        for _ in range(len(later) + 1):
            done.acquire()
        stats = engine.snapshot_stats()
    assert stats["mixed_prefill_tokens"] in (0, sum(len(p) for p in later))
    return [r.decoder.ids for r in [decoding, *requests]], stats


@pytest.mark.parametrize("fixture", ["tiny_vicuna", "tiny_gqa"], ids=["multi-head", "grouped-query"])
@pytest.mark.parametrize("chunk", [512, 64])
def test_padded_prefill_buckets_give_the_same_replies(fixture, chunk, request, monkeypatch):
    """Prompts' first pieces padded to (rows, length) buckets, and a long prompt's later pieces alone in their
    chunk padded and attending to a multiple of the chunk size, as one GPU replays them from graphs (here
    eagerly: graphs need CUDA), reply what unpadded chunks reply."""
    model, tokenizer = load_model(request.getfixturevalue(fixture), device="cpu")
    prompts = [_prompt(tokenizer, q) for q in QUESTIONS] + [_long_prompt(tokenizer)]
    assert len(prompts[-1]) > 2 * 64
    expected = _replies(model, tokenizer, prompts, prefill_chunk=chunk)
    buckets, real_init, real_padded = [], Runner.__init__, Runner._padded_prefill

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        # what warm_up sets on one GPU with graphs
        self.prefill_lengths = [n for n in (16, 32, 64, 128, 256, 512) if n <= chunk]
        self.prefill_kv_lengths = list(range(chunk, self.cache.context + chunk, chunk))

    def padded(self, chunks, rows, length, kv_length):
        buckets.append((len(chunks), rows, length, kv_length, max(c.start for c in chunks)))
        return real_padded(self, chunks, rows, length, kv_length)

    monkeypatch.setattr(Runner, "__init__", init)
    monkeypatch.setattr(Runner, "_padded_prefill", padded)
    assert _replies(model, tokenizer, prompts, prefill_chunk=chunk) == expected
    assert buckets and all(rows >= n and rows * length <= chunk for n, rows, length, _, _ in buckets)
    if chunk == 512:
        assert any(n > 1 for n, *_ in buckets)  # several prompts in one padded forward, padding rows too
    else:  # the long prompt's later pieces, each attending past its own length
        later = [(length, kv, start) for n, _, length, kv, start in buckets if start > 0]
        # beyond their bucket's length: a bucket attending to its own length is a first piece's (fresh)
        assert later and all(kv % chunk == 0 and kv > start and kv > length for length, kv, start in later)


def test_chunked_prefill_on_two_cpu_ranks(tiny_gqa):
    """--num-gpus 2 on gloo ranks: chunks reach the other rank (Op.PREFILL), replies equal one process's."""
    model, tokenizer = load_model(tiny_gqa, device="cpu")
    prompts = [_prompt(tokenizer, q) for q in QUESTIONS[:3]] + [_long_prompt(tokenizer)]
    expected = _replies(model, tokenizer, prompts, prefill_chunk=4096)
    split, _ = load_model(tiny_gqa, device="cpu", num_gpus=2)
    try:
        assert _replies(split, tokenizer, prompts, prefill_chunk=32, padded_decode=True, warm_up=True) == expected
    finally:
        split.close()


def test_running_streams_keep_decoding_while_a_long_prompt_prefills(loaded):
    """A 12-chunk prompt joining a running stream: the stream gets a token after every chunk, not a
    stall until the whole prompt is in."""
    model, tokenizer = loaded
    long_prompt = _long_prompt(tokenizer)
    chunk = 24
    chunks = -(-len(long_prompt) // chunk)
    assert chunks >= 10
    order: list[str] = []  # which request each event came from, in order
    first_tokens = threading.Event()
    params = SamplingParams(temperature=0, max_new_tokens=3 * chunks, ignore_eos=True)
    with Engine(model, tokenizer, max_batch_size=2, prefill_chunk=chunk) as engine:

        def stream(event):
            order.append("stream")
            if len(order) == 2:
                first_tokens.set()

        engine.submit(_prompt(tokenizer, "hi"), params, stream)
        first_tokens.wait()
        done = threading.Event()
        engine.submit(
            long_prompt,
            SamplingParams(temperature=0, max_new_tokens=2),
            lambda e: order.append("long") or (e.finish_reason and done.set()),
        )
        done.wait()
        submitted = len(order)
    between = order[2 : order.index("long")]  # the stream's events while the long prompt prefilled
    assert len(between) >= chunks - 2, (len(between), chunks, submitted)


@pytest.mark.parametrize("burst", [1, 8])
def test_a_burst_of_prompts_behind_a_running_stream_is_written_in_one_forward(loaded, burst, monkeypatch):
    """Six prompts arriving together behind one decoding stream: with prefill_burst 8 one forward writes them
    all (up to 8 chunks' worth), so the stream waits once; with 1 a chunk at a time. Replies are a lone
    request's either way. A lone long prompt joining the stream still goes a chunk at a time."""
    model, tokenizer = loaded
    prompts = [_prompt(tokenizer, q) for q in QUESTIONS[:3] * 2]
    chunk = max(len(p) for p in prompts)  # a prompt a chunk
    alone = [_replies(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts[:3]] * 2
    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    sizes, real = [], Runner.prefill_chunks
    monkeypatch.setattr(Runner, "prefill_chunks", lambda self, chunks: sizes.append(len(chunks)) or real(self, chunks))
    options = dict(max_batch_size=8, prefill_chunk=chunk, prefill_burst=burst)
    with Engine(model, tokenizer, **options) as engine:
        started = threading.Event()
        long_reply = SamplingParams(temperature=0, max_new_tokens=400, ignore_eos=True)
        stream = engine.submit(_prompt(tokenizer, "hi"), long_reply, lambda e: started.set())
        started.wait()
        with engine.lock:  # all six admitted at the same step
            done = threading.Semaphore(0)
            requests = [engine.submit(p, params, lambda e: e.finish_reason and done.release()) for p in prompts]
        for _ in prompts:
            done.acquire()
        assert sizes[1:] == ([6] if burst == 8 else [1] * 6)
        del sizes[:]
        long_prompt = _long_prompt(tokenizer)
        events = list(engine.generate(long_prompt, SamplingParams(temperature=0, max_new_tokens=1)))
        assert events[-1].finish_reason and len(sizes) == -(-len(long_prompt) // chunk)  # one prompt: chunks
        stream.cancel()
    assert [r.decoder.ids for r in requests] == alone


def test_a_burst_out_of_device_memory_is_written_again_in_smaller_forwards(loaded, monkeypatch):
    """A prefill forward of several chunks that runs out of device memory (eager activations beside the weights
    and the cache) halves prefill_burst and writes the prompts again: no request fails, replies are a lone
    request's. A forward of one chunk out of memory still fails its requests."""
    model, tokenizer = loaded
    prompts = [_prompt(tokenizer, q) for q in QUESTIONS[:3] * 2]
    chunk = max(len(p) for p in prompts)  # a prompt a chunk
    alone = [_replies(model, tokenizer, [p], max_new_tokens=4)[0] for p in prompts[:3]] * 2
    params = SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True)
    fits, sizes, real = [2], [], Runner.prefill_chunks

    def prefill_chunks(self, chunks):
        sizes.append(len(chunks))
        if len(chunks) > fits[0]:
            raise torch.OutOfMemoryError("CUDA out of memory (a test)")
        return real(self, chunks)

    monkeypatch.setattr(Runner, "prefill_chunks", prefill_chunks)
    finished, done = [], threading.Semaphore(0)

    def sink(event) -> None:
        if event.finish_reason:
            finished.append(event.finish_reason)
            done.release()

    with Engine(model, tokenizer, max_batch_size=8, prefill_chunk=chunk, prefill_burst=8) as engine:
        with engine.lock:  # all six admitted at the same step
            requests = [engine.submit(p, params, sink) for p in prompts]
        for _ in prompts:
            done.acquire()
        assert sizes[:3] == [6, 4, 2] and engine.prefill_burst == 2
        assert [r.decoder.ids for r in requests] == alone and finished == ["length"] * 6
        fits[0] = 0  # now not even one chunk fits
        events = list(engine.generate(prompts[0], params))
        assert events[-1].finish_reason == "error" and "out of memory" in events[-1].error
        assert engine.prefill_burst == 2


def test_prefill_budget_grows_with_the_prompts_waiting_per_burst_of_decoding_rows(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_batch_size=64, prefill_chunk=100, prefill_burst=8)
    cases = [(1, 0, 100), (3, 0, 300), (1, 31, 100), (3, 31, 100), (28, 4, 800), (60, 4, 800), (32, 32, 800)]
    for waiting, decoding, budget in [*cases, (10, 160, 100), (40, 160, 200), (96, 160, 400)]:
        engine.prefilling, engine.rows = [None] * waiting, [None] * decoding
        assert engine._prefill_budget() == budget, (waiting, decoding)
    with pytest.raises(VicunaflowError, match="prefill_burst 0"):
        Engine(model, tokenizer, prefill_burst=0)


def test_prompts_ending_in_one_chunk_swap_rows_into_place(loaded, monkeypatch):
    """Two prompts ending in the same chunk: the older takes the next decoding row, which the younger
    holds, so their rows swap; both replies stay those of a lone request."""
    model, tokenizer = loaded
    prompts = [_prompt(tokenizer, q) for q in ("Name three colours.", "What is two plus two?")]
    alone = [_replies(model, tokenizer, [p], max_new_tokens=8)[0] for p in prompts]
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    with Engine(model, tokenizer, max_batch_size=3, prefill_chunk=256) as engine:
        swaps = []
        swap_rows = engine.cache.swap_rows
        monkeypatch.setattr(engine.cache, "swap_rows", lambda *args: swaps.append(args) or swap_rows(*args))
        started = threading.Event()
        long_reply = SamplingParams(temperature=0, max_new_tokens=64, ignore_eos=True)
        engine.submit(_prompt(tokenizer, "hi"), long_reply, lambda e: started.set())
        started.wait()
        with engine.lock:  # both admitted at the same step
            done = threading.Semaphore(0)
            requests = [engine.submit(p, params, lambda e: e.finish_reason and done.release()) for p in prompts]
        done.acquire()
        done.acquire()
    assert swaps == [(2, 1)]
    assert [r.decoder.ids for r in requests] == alone


def test_prompt_logprobs_across_chunks(loaded):
    """Prompt log-probabilities gathered chunk by chunk equal those of one whole-prompt forward."""
    model, tokenizer = loaded
    prompt = _long_prompt(tokenizer, 4)
    params = SamplingParams(temperature=0, max_new_tokens=1, prompt_logprobs=2, logprobs=2)
    results = []
    for chunk in (4096, 9):
        with Engine(model, tokenizer, max_batch_size=2, prefill_chunk=chunk) as engine:
            events = list(engine.generate(prompt, params))
        results.append(events[0].prompt_logprobs)
    whole, chunked = results
    assert len(whole) == len(chunked) == len(prompt) and chunked[0].logprob is None
    for a, b in zip(whole[1:], chunked[1:], strict=True):
        assert a.token == b.token and a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


# -- the paged KV cache ---------------------------------------------------------------------------------------


def test_block_bookkeeping():
    from vicunaflow import VicunaflowError
    from vicunaflow.engine.cache import KVCache

    with pytest.raises(VicunaflowError, match="cannot hold one request of 64 tokens"):
        KVCache(1, 4, 2, 64, 8, torch.float32, "cpu", blocks=3, block_size=16)
    cache = KVCache(1, 4, 2, 64, 8, torch.float32, "cpu", blocks=6, block_size=16)
    assert cache.keys[0].shape == (7, 2, 16, 8) and len(cache.free) == 6  # block 0: scratch, never handed out
    cache.ensure(0, 17)  # two blocks
    cache.ensure(0, 32)  # still two
    cache.ensure(2, 1)
    assert cache.owned == [2, 0, 1, 0] and len(cache.free) == 3 and 0 not in cache.tables[0, :2].tolist()
    assert cache.missing(2, 40) == 2 and cache.missing(0, 32) == 0
    with pytest.raises(VicunaflowError, match="needs 4 more blocks, 3 are free"):
        cache.ensure(1, 64)
    held = cache.tables[2].clone()
    cache.move_row(2, 1)
    assert torch.equal(cache.tables[1], held) and cache.owned == [2, 1, 0, 0] and not cache.tables[2].any()
    cache.swap_rows(0, 1)
    assert cache.owned == [1, 2, 0, 0] and torch.equal(cache.tables[0], held)
    cache.release(1)
    cache.release(0)
    assert sorted(cache.free) == list(range(1, 7)) and not cache.tables.any()


def test_a_cache_smaller_than_one_request_is_refused(loaded):
    from vicunaflow import VicunaflowError

    model, tokenizer = loaded
    with pytest.raises(VicunaflowError, match="--kv-cache-tokens 300 cannot hold one request of the context's 512"):
        Engine(model, tokenizer, max_context=512, kv_cache_tokens=300)


def test_paged_cache_reads_what_it_wrote():
    """Keys written at scattered positions through block tables come back in order from read()."""
    from vicunaflow.engine.cache import KVCache

    cache = KVCache(1, 2, 2, 40, 4, torch.float32, "cpu", blocks=8, block_size=8)
    cache.ensure(1, 40)
    cache.ensure(0, 20)
    tables = cache.tables[:2].long()
    k = torch.arange(2 * 40 * 2 * 4, dtype=torch.float32).view(2, 40, 2, 4)
    positions = torch.arange(40).expand(2, 40).clone()
    positions[0, 20:] = 39  # row 0 holds 20 positions: the rest of its writes go to the scratch block
    cache.write(0, tables, positions, k, -k)
    keys, values = cache.read(0, tables, 20)  # [2, kv_heads, 20, head_dim]
    assert torch.equal(keys, k[:, :20].transpose(1, 2)) and torch.equal(values, -keys)


@pytest.mark.parametrize("mixed", [0, 4], ids=["chunks", "mixed"])
def test_more_requests_than_blocks_all_finish_with_their_replies(loaded, mixed):
    """A cache of 3 contexts' worth of blocks for 8 rows: requests wait for blocks or are preempted and
    resumed (their prompt and reply so far prefilled again, in chunks or riding in decode steps), none is
    lost, and every greedy reply is the one it gets alone."""
    model, tokenizer = loaded
    prompts = [_prompt(tokenizer, q) for q in QUESTIONS] + [_long_prompt(tokenizer, n) for n in (1, 2, 4, 6)]
    expected = [_replies(model, tokenizer, [p], max_new_tokens=40, max_context=384)[0] for p in prompts]
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    done = threading.Semaphore(0)
    options = dict(max_batch_size=8, max_context=384, kv_cache_tokens=3 * 384, prefill_chunk=64, mixed_prefill=mixed)
    with Engine(model, tokenizer, **options) as engine:
        requests = [engine.submit(p, params, lambda e: e.finish_reason and done.release()) for p in prompts]
        for _ in prompts:
            done.acquire()
        deadline = time.monotonic() + 10
        while (stats := engine.snapshot_stats())["kv_blocks_free"] < stats["kv_blocks"] and time.monotonic() < deadline:
            time.sleep(0.01)  # the engine frees a finished row's blocks at its next turn
    assert stats["kv_blocks"] == 3 * 384 // 16 and stats["kv_blocks_free"] == stats["kv_blocks"]  # all given back
    assert stats["active"] == 0 and (stats["preempted"] > 0 if not mixed else stats["mixed_prefill_tokens"] > 0)
    assert [r.decoder.ids for r in requests] == expected
    assert_latency_adds_up(engine, requests)


def assert_latency_adds_up(engine: Engine, requests) -> None:
    """The engine's latency histograms (serve's /metrics) count every request and token, and the gaps of a reply
    add up to its time from first token to end: each gap runs from the reply's token before, across preemptions."""
    latency, stats = engine.snapshot_latency(), engine.snapshot_stats()
    count = {name: sum(histogram["counts"]) for name, histogram in latency.items()}
    tokens = sum(r.completion_tokens for r in requests)
    assert count["time_to_first_token"] == count["request"] == len(requests) == stats["finished"]["length"]
    assert count["inter_token"] == tokens - len(requests) and stats["generated_tokens"] == tokens
    assert count["step_gpu"] == (stats["steps"] if engine.device.type == "cuda" else 0)  # CUDA events time them
    # sum(end - submit) - sum(first token - submit) = sum(end - first token); an end is read a moment after its
    # step's time (the rest of that step's row loop)
    spread = latency["request"]["sum"] - latency["time_to_first_token"]["sum"] - latency["inter_token"]["sum"]
    assert 0 <= spread < 0.002 * len(requests), spread


# -- seeded sampling ------------------------------------------------------------------------------------------


def test_a_seeded_row_samples_the_same_token_in_any_batch():
    """sample(): a seeded row's token depends on its logits, seed and index only, not on the rows beside it
    (their number, order, top-p, seeds, or whether they draw from the shared generator)."""
    from vicunaflow.engine.sampling import sample

    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(0)) * 3
    mine = SamplingParams(temperature=1.0, top_p=0.95, seed=11)
    others = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=1.2, top_p=0.5),
        SamplingParams(temperature=1.0, seed=11),
        SamplingParams(temperature=1.0, seed=3),
    ]

    def token(row: int, index: int, beside: list[int]) -> int:
        rows = [*beside, row]
        params = [*(others[i % len(others)] for i in range(len(beside))), mine]
        generator = torch.Generator().manual_seed(len(beside))
        return sample(logits[rows], logits[rows].argmax(-1), params, generator, [5] * len(beside) + [index])[-1].item()

    for row in range(len(logits)):
        alone = [token(row, index, []) for index in range(8)]
        assert len(set(alone)) > 1  # the index changes the draw
        for beside in ([0], [3, 1, 2], [5, 4, 3, 2, 1]):
            assert [token(row, index, beside) for index in range(8)] == alone


def _seeded_replies(model, tokenizer, jobs, **engine_options) -> list:
    """The requests of (prompt, params) jobs submitted at once, once all have finished."""
    done = threading.Semaphore(0)
    with Engine(model, tokenizer, **engine_options) as engine:
        requests = [engine.submit(p, params, lambda e: e.finish_reason and done.release()) for p, params in jobs]
        for _ in jobs:
            done.acquire()
    return requests


@pytest.mark.parametrize("overlap", [False, True])
def test_seeded_reply_is_the_same_alone_batched_and_preempted(loaded, caplog, overlap):
    """A seeded sampled request replies the same tokens alone (one row, one engine seed), beside sampled,
    seeded and greedy requests (another engine seed, chunked prefill), and when the KV cache runs out and
    it is preempted and resumed mid-reply; another seed gives another reply."""
    model, tokenizer = loaded
    prompt = _prompt(tokenizer, "Tell me a story about a llama.")
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=40, ignore_eos=True, seed=1234)
    context = dict(max_context=384, overlap=overlap)
    (alone,) = _seeded_replies(model, tokenizer, [(prompt, seeded)], max_batch_size=1, seed=0, **context)
    (other,) = _seeded_replies(
        model, tokenizer, [(prompt, dataclasses.replace(seeded, seed=1235))], max_batch_size=1, **context
    )
    alone = alone.decoder.ids
    assert len(alone) == len(other.decoder.ids) == 40 and alone != other.decoder.ids

    neighbours = [
        SamplingParams(temperature=0.8, max_new_tokens=40, ignore_eos=True),  # the engine's generator
        SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True),
        SamplingParams(temperature=1.3, top_p=0.5, max_new_tokens=40, ignore_eos=True, seed=99),
    ]
    prompts = [_prompt(tokenizer, q) for q in QUESTIONS] + [_long_prompt(tokenizer, n) for n in (1, 2, 4, 6)]
    jobs = [(p, neighbours[i % len(neighbours)]) for i, p in enumerate(prompts)]
    batched = _seeded_replies(
        model, tokenizer, [jobs[1], (prompt, seeded), jobs[2]], max_batch_size=3, prefill_chunk=7, seed=5, **context
    )
    assert batched[1].decoder.ids == alone

    # the preemption test's cache (3 contexts for 8 rows): submitted last, the seeded request is the youngest
    # decoding one when the blocks run out, so it goes back to the queue mid-reply and resumes later
    options = dict(max_batch_size=8, kv_cache_tokens=3 * 384, prefill_chunk=64, seed=6, **context)
    with caplog.at_level(logging.INFO, logger="vicunaflow.engine.scheduler"):
        requests = _seeded_replies(model, tokenizer, [*jobs[:7], (prompt, seeded)], **options)
    preempted = [m for m in caplog.messages if m.startswith(f"KV cache full: request {requests[-1].id} ")]
    assert preempted and "(0 tokens" not in preempted[0], caplog.messages
    assert requests[-1].decoder.ids == alone


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fixture", ["tiny_vicuna", "tiny_gqa"], ids=["multi-head", "grouped-query"])
def test_cuda_many_streams_through_paged_attention(fixture, request):
    """float32 on a GPU, CUDA graphs, the paged attention kernel, chunked prefill and a cache too small for
    everyone (requests wait and are preempted): every stream finishes with the reply it gets alone."""
    model, tokenizer = load_model(request.getfixturevalue(fixture), device="cuda", dtype="float32")
    prompts = [[1, *range(30, 30 + 7 * i % 300)] for i in range(1, 25)]
    options = dict(max_context=512, prefill_chunk=64, kv_cache_tokens=4 * 512)
    alone = [_replies(model, tokenizer, [p], max_new_tokens=48, max_batch_size=1, **options)[0] for p in prompts[:4]]
    params = SamplingParams(temperature=0, max_new_tokens=48, ignore_eos=True)
    done = threading.Semaphore(0)
    with Engine(model, tokenizer, max_batch_size=24, **options) as engine:
        assert engine.runner.attention_kernel and engine.runner.kv_buckets == [512]
        requests = [engine.submit(p, params, lambda e: e.finish_reason and done.release()) for p in prompts]
        for _ in prompts:
            done.acquire()
        stats, latency = engine.snapshot_stats(), engine.snapshot_latency()
        assert engine.runner.cuda_graphs  # no capture fell back to eager
    assert all(r.completion_tokens == 48 for r in requests)
    assert stats["preempted"] > 0 and stats["max_batch"] > 8
    assert [r.decoder.ids for r in requests[:4]] == alone
    # every decode step's GPU time was taken; an idle time for each step after other GPU work of the engine
    steps, idle = sum(latency["step_gpu"]["counts"]), sum(latency["gpu_idle"]["counts"])
    assert steps == stats["steps"] and 0 < latency["step_gpu"]["sum"] < 60 and 0 < idle <= steps


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_paged_kernel_in_graphs_matches_eager_float16(tiny_gqa):
    """float16 with the Triton matvec and attention kernels: graph replays give the eager engine's tokens."""
    model, tokenizer = load_model(tiny_gqa, device="cuda", dtype="float16")
    prompts = [[1, *range(40, 40 + n)] for n in (5, 90, 300)]
    eager = _replies(model, tokenizer, prompts, max_new_tokens=32, cuda_graphs=False)
    assert _replies(model, tokenizer, prompts, max_new_tokens=32) == eager


# -- failures -----------------------------------------------------------------------------------------------


def _events(engine, prompt, params):
    """Submit; a queue of the request's events."""
    import queue

    events = queue.SimpleQueue()
    return engine.submit(prompt, params, events.put), events


def _last(events, timeout=60.0):
    """The finishing event (fails instead of hanging if the engine never sends it)."""
    while (event := events.get(timeout=timeout)).finish_reason is None:
        pass
    return event


def test_a_request_that_cannot_be_admitted_fails_and_the_others_are_served(loaded, monkeypatch):
    """An error while taking one request off the queue fails that request, with the reason; the engine goes on."""
    model, tokenizer = loaded
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    with Engine(model, tokenizer, max_batch_size=2, max_context=512) as engine:
        ensure = engine.cache.ensure

        def failing(row, length):  # the 100-token prompt's blocks: a stand-in for any admission error
            if length == 100:
                raise RuntimeError("cannot admit this one")
            ensure(row, length)

        monkeypatch.setattr(engine.cache, "ensure", failing)
        with engine.lock:  # both queued before the loop looks: the bad one first, ahead of the good one
            _, bad_events = _events(engine, [1] + [5] * 99, params)
            good, good_events = _events(engine, [1, 5, 6, 7, 8], params)
        event = _last(bad_events)
        assert event.finish_reason == "error" and event.error == "RuntimeError: cannot admit this one", event
        assert _last(good_events).finish_reason == "length" and good.completion_tokens == 8
        _, again_events = _events(engine, [1, 5, 6], params)
        assert _last(again_events).finish_reason == "length"
        deadline = time.monotonic() + 10  # the last event arrives before the loop frees that request's row
        while (stats := engine.snapshot_stats())["kv_blocks_free"] != stats[
            "kv_blocks"
        ] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stats["failure"] is None and stats["active"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks"]


def test_an_engine_loop_error_fails_every_request_and_stops_the_engine(loaded, monkeypatch):
    """An error no request can be blamed for: every request ends with it, and the engine says it stopped."""
    from vicunaflow import VicunaflowError

    model, tokenizer = loaded
    params = SamplingParams(temperature=0, max_new_tokens=400, ignore_eos=True)
    with Engine(model, tokenizer, max_batch_size=1, max_context=512) as engine:
        take_waiting = engine._take_waiting

        def broken():  # once a request decodes, with another waiting for its row
            if engine.rows:
                raise RuntimeError("bookkeeping bug")
            take_waiting()

        monkeypatch.setattr(engine, "_take_waiting", broken)
        with engine.lock:
            _, running_events = _events(engine, [1, 5, 6, 7], params)
            _, queued_events = _events(engine, [1, 5], params)
        for events in (running_events, queued_events):
            event = _last(events)
            assert event.finish_reason == "error" and "bookkeeping bug" in event.error, event
        engine.thread.join(timeout=60)
        assert not engine.thread.is_alive()
        assert engine.snapshot_stats()["failure"] == "RuntimeError: bookkeeping bug"
        with pytest.raises(VicunaflowError, match="the engine stopped after an error: RuntimeError: bookkeeping bug"):
            engine.submit([1, 5], params, lambda event: None)


def test_a_failing_event_handler_ends_its_own_request_only(loaded, caplog):
    """A consumer whose handler raises (a closed socket, a full queue) loses its request; the batch it
    decodes in goes on, with every other reply whole."""
    model, tokenizer = loaded
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    seen = []

    def broken(event):
        seen.append(event)
        if len(seen) == 3:
            raise ConnectionResetError("the client went away")

    with Engine(model, tokenizer, max_batch_size=4) as engine:
        with engine.lock:  # all in one batch
            others = [_events(engine, [1, 5, 6, 7 + i], params) for i in range(3)]
            bad = engine.submit([1, 5, 6, 9], params, broken)
        for request, events in others:
            assert _last(events).finish_reason == "length" and request.completion_tokens == 12
        deadline = time.monotonic() + 10
        while not (bad.done and engine.snapshot_stats()["active"] == 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert bad.cancelled and seen[-1].finish_reason == "cancelled" and bad.completion_tokens < 12
        assert engine.snapshot_stats()["failure"] is None
    assert "its event handler failed; the request is cancelled" in caplog.text


def test_stopping_ends_queued_requests_and_a_restart_does_not_run_them(loaded):
    """stop() ends every request it leaves behind with "cancelled" and forgets it: an engine started
    again (eval starts and stops one per batch) neither runs it nor sends it events after its last."""
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_batch_size=1, max_context=512).start()
    with engine.lock:  # one row: the second waits behind a long reply
        _, running_events = _events(engine, [1, 5, 6, 7], SamplingParams(temperature=0, max_new_tokens=400))
        queued, queued_events = _events(engine, [1, 5], SamplingParams(temperature=0, max_new_tokens=8))
    running_events.get(timeout=60)  # decoding
    engine.stop()
    assert _last(queued_events).finish_reason == "cancelled" and _last(running_events).finish_reason == "cancelled"
    stats = engine.snapshot_stats()
    assert stats["active"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks"] and not engine.waiting
    with engine:
        fresh, fresh_events = _events(engine, [1, 5, 6], SamplingParams(temperature=0, max_new_tokens=4))
        assert _last(fresh_events).finish_reason in ("length", "stop")
    assert queued_events.empty() and running_events.empty()
    assert queued.completion_tokens == 0 and fresh.done

"""The engine under serving load (issue 16): start-up warm-up, chunked prefill, the paged KV cache.

Greedy replies must stay the engine's usual ones (which tests/test_generate.py pins to transformers):
each test compares a run with the feature against a plain run on the tiny models, on the CPU.
"""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from vicunaflow import template
from vicunaflow.engine import Engine, SamplingParams, encode_prompt, load_model
from vicunaflow.engine.runner import row_buckets

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


def test_warm_up_runs_every_bucket_then_serves_the_same_replies(loaded, caplog):
    """Warm-up (padded layout, eager on the CPU) visits every (rows, kv length) bucket, leaves a zeroed
    cache, and the replies after it are the replies of an engine that never warmed up."""
    model, tokenizer = loaded
    prompts = [_prompt(tokenizer, q) for q in QUESTIONS]
    expected = _replies(model, tokenizer, prompts, padded_decode=True, warm_up=False)
    with caplog.at_level(logging.INFO, logger="vicunaflow.engine.scheduler"):
        engine = Engine(model, tokenizer, max_batch_size=3, padded_decode=True, max_context=512, warm_up=True)
    runner = engine.runner
    assert set(runner.buckets) == {(r, kv) for r in (1, 2, 3) for kv in (256, 512)}
    assert "warmed 6 decode shapes in" in caplog.text
    assert all(not t.any() for t in runner.cache.keys + runner.cache.values)  # nothing left to read
    del engine
    assert _replies(model, tokenizer, prompts, padded_decode=True, max_context=512, warm_up=True) == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_warm_up_captures_everything_before_the_first_request(tiny_vicuna):
    """float16 on a GPU: after start-up no request captures a graph, whatever its length or batch."""
    model, tokenizer = load_model(tiny_vicuna, device="cuda", dtype="float16")
    prompts = [[1] + [5] * n for n in (3, 300, 700, 1500)]
    with Engine(model, tokenizer, max_batch_size=4) as engine:
        captured = {key for key, bucket in engine.runner.buckets.items() if bucket.get("graph") is not None}
        assert len(captured) == len(engine.runner.row_buckets) * len(engine.runner.kv_buckets)
        params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
        threads = [threading.Thread(target=lambda p=p: list(engine.generate(p, params))) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert set(engine.runner.buckets) == captured and engine.runner.cuda_graphs

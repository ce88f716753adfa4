"""Tensor parallelism: N ranks give the single-process replies. On the CPU (gloo ranks) in CI; on two
GPUs (NCCL and symmetric-memory all-reduce, CUDA graphs) where there are two."""

from __future__ import annotations

import io
import sys
import threading

import pytest
import torch

from vicunaflow import VicunaflowError, template
from vicunaflow.chat import chat
from vicunaflow.engine import Engine, SamplingParams, encode_prompt, load_model
from vicunaflow.loading import ModelOptions
from vicunaflow.quant import Int4Columns

QUESTIONS = ["Hello", "What is the capital of France? Tell me about it.", "hi", "Write a poem about llamas. " * 6]


def _prompt(tokenizer, question: str) -> list[int]:
    return encode_prompt(tokenizer, template.render([(template.USER, question), (template.ASSISTANT, None)]))


def _replies(model, tokenizer, params: SamplingParams, **engine_options) -> list[list[int]]:
    """Token ids of each question's reply, all submitted at once to a 3-row engine (one joins late)."""
    prompts = [_prompt(tokenizer, q) for q in QUESTIONS]
    done = threading.Semaphore(0)
    with Engine(model, tokenizer, max_batch_size=3, seed=7, **engine_options) as engine:
        requests = [engine.submit(p, params, lambda e: e.finish_reason and done.release()) for p in prompts]
        for _ in prompts:
            done.acquire()
        assert engine.snapshot_stats()["max_batch"] == 3
    return [r.decoder.ids for r in requests]


def _assert_equal_but_ties(model, tokenizer, got: list[list[int]], expected: list[list[int]], tolerance: float):
    """Each reply equals the expected one, or first differs where the one-process model's logits of the two
    tokens are within `tolerance`: a tie at the model's precision (bfloat16 logits are often exactly
    equal), which summing the ranks' partial products in another order may break the other way."""
    from vicunaflow.engine.runner import Runner

    runner = Runner(model, 1, model.args.max_position_embeddings, cuda_graphs=False, padded=False, kernels=False)
    for question, ours, theirs in zip(QUESTIONS, got, expected, strict=True):
        if ours == theirs:
            continue
        at = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b)
        logits, _ = runner.prefill([_prompt(tokenizer, question) + theirs[:at]], 0)
        runner.cache.release(0)
        gap = abs(float(logits[0, ours[at]]) - float(logits[0, theirs[at]]))
        assert gap <= tolerance, (
            f"{question!r}: token {at} differs, {ours[at]} against {theirs[at]}, logits {gap} apart"
        )


@pytest.mark.parametrize("fixture", ["tiny_vicuna", "tiny_gqa"], ids=["multi-head", "grouped-query"])
def test_two_cpu_ranks_match_one_process(fixture, request):
    """Greedy and seeded sampled replies of 2 gloo ranks equal one process's, token for token, batched,
    with the padded (CUDA-graph) layout and without, and with a float8 KV cache (its dtype reaches every rank)."""
    path = request.getfixturevalue(fixture)
    model, tokenizer = load_model(path, device="cpu")
    greedy = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=12, ignore_eos=True)
    expected = _replies(model, tokenizer, greedy), _replies(model, tokenizer, sampled)
    in_float8 = _replies(model, tokenizer, greedy, kv_cache_dtype="fp8")
    split, _ = load_model(path, device="cpu", num_gpus=2)
    try:
        assert split.comm.world == 2 and split.comm.mode == "gloo"
        assert split.heads == model.heads // 2 and split.kv_heads == model.kv_heads // 2
        assert split.weight_bytes() < 0.75 * model.weight_bytes()  # the layers are halved; embedding and lm_head not
        assert _replies(split, tokenizer, greedy) == expected[0]
        assert _replies(split, tokenizer, greedy, padded_decode=True) == expected[0]
        assert _replies(split, tokenizer, sampled) == expected[1]
        assert _replies(split, tokenizer, greedy, kv_cache_dtype="fp8") == in_float8
    finally:
        split.close()
    assert all(not p.is_alive() for p in split.comm.workers)


@pytest.fixture(scope="module")
def int4_g32(tiny_vicuna, tmp_path_factory):
    """int4 with groups of 32: tiny's 704-wide down_proj splits in 352 columns a rank, not a multiple of 128."""
    from vicunaflow.quantize import quantize_model

    out = tmp_path_factory.mktemp("tp-quantized") / "vicuna-tiny-int4-g32"
    return quantize_model(model_path=tiny_vicuna, output_dir=out, bits=4, group_size=32)


@pytest.mark.parametrize("source", ["int8-at-load", "int4-folder", "int4-folder-columns"])
def test_two_cpu_ranks_with_quantized_weights_match_one_process(tiny_vicuna, int4_g32, source):
    """Quantized weights with --num-gpus 2: each rank shards the QuantWeights (q|k|v and gate|up by rows, o
    and down by columns: int8 with its whole rows' scales, int4 on group boundaries; with the columns layout
    each rank transposes its shards), and the greedy and sampled tokens are one process's."""
    path, options = (tiny_vicuna, {"load_8bit": True}) if source == "int8-at-load" else (int4_g32, {})
    if source == "int4-folder-columns":
        options = {"int4_kernel": "columns"}
    model, tokenizer = load_model(path, device="cpu", **options)
    greedy = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=12, ignore_eos=True)
    expected = _replies(model, tokenizer, greedy), _replies(model, tokenizer, sampled)
    split, _ = load_model(path, device="cpu", num_gpus=2, **options)
    try:
        layer_bytes = sum(getattr(layer, n).nbytes for layer in model.layers for n in ("wqkv", "wo", "w13", "w2"))
        assert split.weight_bytes() < model.weight_bytes() - 0.45 * layer_bytes  # the layers are halved
        assert split.layers[0].w2.shape == (model.args.dim, model.args.ffn_dim // 2)
        assert type(split.layers[0].w2) is type(model.layers[0].w2)
        assert isinstance(split.layers[0].w2, Int4Columns) == (source == "int4-folder-columns")
        assert _replies(split, tokenizer, greedy) == expected[0]
        assert _replies(split, tokenizer, sampled) == expected[1]
    finally:
        split.close()


def test_two_cpu_ranks_with_tinygemm_int4(int4_g32):
    """int4 in torch's tinygemm layout (quant.Int4Packed, bfloat16: --load-4bit's CUDA default, forced here
    on the CPU's tinygemm) on 2 gloo ranks: each rank packs its own shards; greedy replies are one process's,
    but where bfloat16 ties (on a 2-core AMD EPYC a reply's third token had two logits of exactly 3.1875)."""
    from vicunaflow.quant import Int4Packed

    model, tokenizer = load_model(int4_g32, device="cpu", int4_kernel="tinygemm")
    greedy = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    expected = _replies(model, tokenizer, greedy)
    split, _ = load_model(int4_g32, device="cpu", num_gpus=2, int4_kernel="tinygemm")
    try:
        assert split.dtype == torch.bfloat16 and isinstance(split.layers[0].w2, Int4Packed)
        assert split.layers[0].w2.shape == (model.args.dim, model.args.ffn_dim // 2)
        got = _replies(split, tokenizer, greedy)
    finally:
        split.close()
    # half the replies equal at least: the int4 lm_head's bfloat16 logits tie more often than a float one's did
    assert sum(a == b for a, b in zip(got, expected, strict=True)) >= len(QUESTIONS) // 2
    _assert_equal_but_ties(model, tokenizer, got, expected, tolerance=2**-6)  # bfloat16 keeps 8 bits: ~0.05 at 4


def test_int4_split_that_cuts_groups_is_refused(tiny_vicuna):
    """Before any rank starts: the message names --num-gpus, the group size and a group size that fits."""
    with pytest.raises(VicunaflowError, match=r"--num-gpus 2: each rank takes 352 of down_proj's 704 input columns, "
                       r"not a multiple of the int4 group size 128.*--group-size 32"):  # fmt: skip
        load_model(tiny_vicuna, device="cpu", num_gpus=2, load_4bit=True)
    model, _ = load_model(tiny_vicuna, device="cpu", load_4bit=True, group_size=32)  # group 32 at load: fine
    assert model.layers[0].w2.group_size == 32


def test_chat_on_two_cpu_ranks(tiny_vicuna, monkeypatch, capsys):
    """`chat --device cpu --num-gpus 2` answers as the single-process chat does."""

    def run(**options) -> str:
        monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\nWho are you?\n"))
        chat(model_path=tiny_vicuna, model_options=ModelOptions(**options), temperature=0.0, max_new_tokens=8)
        return capsys.readouterr().out

    assert run(device="cpu", num_gpus=2) == run(device="cpu")


def test_num_gpus_refusals(tiny_vicuna, tiny_gqa, monkeypatch):
    with pytest.raises(VicunaflowError, match="--num-gpus 0: must be at least 1"):
        chat(model_path=tiny_vicuna, model_options=ModelOptions(num_gpus=0))
    with pytest.raises(VicunaflowError, match="8 attention heads"):
        load_model(tiny_vicuna, device="cpu", num_gpus=3)
    with pytest.raises(VicunaflowError, match=r"2 key/value heads.*not replicated"):
        load_model(tiny_gqa, device="cpu", num_gpus=4)
    monkeypatch.setenv("VICUNAFLOW_ALL_REDUCE", "ring")
    with pytest.raises(VicunaflowError, match="VICUNAFLOW_ALL_REDUCE=ring: choose symm-mem or nccl"):
        load_model(tiny_vicuna, device="cpu", num_gpus=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_num_gpus_without_a_gpu_is_refused(tiny_vicuna):
    """FastChat silently ran `--num-gpus 2` on the CPU; here it asks for --device cpu."""
    with pytest.raises(VicunaflowError, match="no CUDA device is visible; add --device cpu"):
        chat(model_path=tiny_vicuna, model_options=ModelOptions(num_gpus=2))


def _two_gpus_match_one(path, all_reduce: str) -> None:
    model, tokenizer = load_model(path, device="cuda", dtype="float32")
    greedy = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    expected = _replies(model, tokenizer, greedy)
    del model
    split, _ = load_model(path, device="cuda", num_gpus=2, dtype="float32", all_reduce=all_reduce)
    try:
        assert split.comm.mode == all_reduce
        replies = _replies(split, tokenizer, greedy)
        assert split.matvec is False  # float32: no Triton matvec; cuBLAS products
    finally:
        split.close()
    assert replies == expected


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("fixture", ["tiny_vicuna", "tiny_gqa"], ids=["multi-head", "grouped-query"])
def test_two_gpus_match_one_nccl(fixture, request):
    """float32 on two GPUs, CUDA graphs with the NCCL all-reduces and the token broadcast inside: greedy
    replies equal one GPU's (float32 keeps rounding from deciding near-ties)."""
    _two_gpus_match_one(request.getfixturevalue(fixture), "nccl")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_match_one_symmetric_memory(tiny_gqa):
    """The same with symmetric-memory one-shot all-reduces (once per process: torch registers the
    group's symmetric memory under a name that a later group of the same process reuses)."""
    _two_gpus_match_one(tiny_gqa, "symm-mem")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("all_reduce", ["nccl", "symm-mem"])
def test_two_gpus_float16_with_kernels(tiny_vicuna, all_reduce):
    """float16 on two GPUs: Triton matvec on each rank's shards, graphs, overlap; a 48-token reply
    streams and agrees with one GPU's on its first tokens. With symmetric memory the one-row step keeps
    the residual stream in float32 (matvec stores partial sums + residual into the peer-visible buffer).
    Symmetric memory once per process: run `-k "float16 and symm"` on its own."""
    model, tokenizer = load_model(tiny_vicuna, device="cuda")
    params = SamplingParams(temperature=0, max_new_tokens=48, ignore_eos=True)
    ids = _prompt(tokenizer, "Hello")
    with Engine(model, tokenizer, max_batch_size=2) as engine:
        one = "".join(e.text for e in engine.generate(ids, params))
    del model
    split, _ = load_model(tiny_vicuna, device="cuda", num_gpus=2, all_reduce=all_reduce)
    try:
        assert split.comm.mode == all_reduce
        with Engine(split, tokenizer, max_batch_size=2) as engine:
            events = list(engine.generate(ids, params))
            stats = engine.snapshot_stats()
    finally:
        split.close()
    assert events[-1].completion_tokens == 48
    assert stats["decode_kernels"] and stats["cuda_graphs"] and stats["queued_ahead"] > 0
    assert "".join(e.text for e in events)[:8] == one[:8]


@pytest.mark.parametrize("ending", ["terminate", "rank-dies"])
def test_serve_on_two_cpu_ranks(tiny_vicuna, ending):
    """`serve --device cpu --num-gpus 2`: the API answers as one process does, and the spawned rank ends
    with the server; a rank that dies takes the server down with it (no server that never answers)."""
    import signal

    import httpx
    import psutil
    from test_serve import start_server  # tests/ is on sys.path

    model, tokenizer = load_model(tiny_vicuna, device="cpu")
    ids = encode_prompt(tokenizer, "Once upon a time")
    with Engine(model, tokenizer, max_batch_size=2) as engine:
        expected = "".join(e.text for e in engine.generate(ids, SamplingParams(temperature=0, max_new_tokens=8)))
    server, url = start_server(tiny_vicuna, "--device", "cpu", "--num-gpus", "2", "--max-context", "256",
                               "--max-batch-size", "2")  # fmt: skip
    try:
        health = httpx.get(f"{url}/health").json()["engine"]
        assert health["tensor_parallel"] == 2 and health["all_reduce"] == "gloo"
        body = {"model": tiny_vicuna.name, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
        reply = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()
        assert reply["choices"][0]["text"] == expected
        ranks = psutil.Process(server.pid).children(recursive=True)
        assert ranks
        for rank in ranks:  # Ctrl-C reaches every process of the terminal's group: rank 0 alone acts on it
            rank.send_signal(signal.SIGINT)
        again = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()
        assert again["choices"][0]["text"] == expected and all(rank.is_running() for rank in ranks)
        if ending == "rank-dies":
            for rank in ranks:
                rank.kill()
            assert server.wait(timeout=30) == 1
            assert b"tensor-parallel rank 1 exited" in server.stdout.read()
    finally:
        server.terminate()
        server.wait(timeout=60)
    _, alive = psutil.wait_procs(ranks, timeout=30)
    assert not alive


def test_a_forward_failing_on_rank_0_stops_the_engine_instead_of_hanging(tiny_vicuna, monkeypatch):
    """Rank 0 failing inside a forward (out of memory: it holds more than the others) leaves the other ranks
    waiting in that forward's collectives: the ranks are out of step for good. The engine stops and says why
    (serve's /health turns 503) rather than serve out of step and hang, and closing ends the ranks."""
    from vicunaflow.engine import tp

    model, tokenizer = load_model(tiny_vicuna, device="cpu", num_gpus=2)
    reduce_project, calls = tp.TensorParallel.reduce_project, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # inside the first forward, after two all-reduces
            raise torch.OutOfMemoryError("rank 0 alone ran out of memory")
        return reduce_project(self, *args, **kwargs)

    monkeypatch.setattr(tp.TensorParallel, "reduce_project", failing)
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    with Engine(model, tokenizer, max_batch_size=2) as engine:
        last = list(engine.generate(_prompt(tokenizer, "Hello"), params))[-1]
        assert last.finish_reason == "error" and "rank 0 alone ran out of memory" in last.error
        engine.thread.join(timeout=60)
        assert engine.snapshot_stats()["failure"] == "OutOfMemoryError: rank 0 alone ran out of memory"
        with pytest.raises(VicunaflowError, match="the engine stopped after an error: OutOfMemoryError"):
            engine.submit(_prompt(tokenizer, "hi"), params, lambda event: None)
    closing = threading.Thread(target=model.close, daemon=True)
    closing.start()
    closing.join(timeout=60)  # no STOP sent into the abandoned collectives: the ranks are ended
    assert not closing.is_alive() and not any(process.is_alive() for process in model.comm.workers)


def test_a_rank_that_fails_to_load_is_reported_and_the_group_left(tiny_vicuna, tmp_path, monkeypatch):
    """Rank 1 runs out of memory loading its shard while rank 0 still loads its own: load_model raises with
    rank 1's reason (the process is not ended by the watch for ranks dying in service), and leaves the group
    and gives the CPU threads back, so loading again in the same process works."""
    import os
    import time

    import torch.distributed as dist

    from vicunaflow.engine import load

    (tmp_path / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if os.environ.get('FAIL_RANK_LOAD') == '1' and '--multiprocessing-fork' in sys.argv:  # a spawned rank\n"
        "    import vicunaflow.engine.tp as tp\n"
        "    def fail(spec, comm):\n"
        "        raise MemoryError(f'rank {comm.rank} ran out of memory loading its shard')\n"
        "    tp.build_model = fail\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), *sys.path]))
    monkeypatch.setenv("FAIL_RANK_LOAD", "1")
    build_model = load.build_model

    def slow_build(spec, comm):  # rank 0's own shard: done after rank 1 has failed
        time.sleep(3)
        return build_model(spec, comm)

    monkeypatch.setattr(load, "build_model", slow_build)
    threads = torch.get_num_threads()
    with pytest.raises(VicunaflowError, match="rank 1 failed to load its shard: MemoryError: rank 1 ran out of memory"):
        load_model(tiny_vicuna, device="cpu", num_gpus=2)
    assert not dist.is_initialized() and torch.get_num_threads() == threads
    monkeypatch.setenv("FAIL_RANK_LOAD", "0")
    model, _ = load_model(tiny_vicuna, device="cpu", num_gpus=2)
    model.close()

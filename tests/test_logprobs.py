"""Log-probabilities: the engine's prompt and sampled-token logprobs against transformers' float32 forward,
the OpenAI API's fields (completions with echo, token-id prompts and batches; chat), and lm-evaluation-harness's
`local-completions` model run offline against `vicunaflow serve`."""

from __future__ import annotations

import json
import math
import os
import queue

import httpx
import openai
import pytest
import torch

from vicunaflow import template
from vicunaflow.engine import Engine, SamplingParams, encode_prompt, load_model

PROMPTS = ["Hello there", "What is the capital of France? Tell me about it.", "hi"]


def reference_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' float32 logits at every position: [len(ids), vocab]; row i predicts ids[i + 1]."""
    with torch.inference_mode():
        return torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)


def run(engine: Engine, jobs: list[tuple[list[int], SamplingParams]]) -> list[list]:
    """Submit all jobs at once (one batch) and return each one's events."""
    sinks = [queue.SimpleQueue() for _ in jobs]
    for (ids, params), sink in zip(jobs, sinks, strict=True):
        engine.submit(ids, params, sink.put)
    results = []
    for sink in sinks:
        events = [sink.get(timeout=120)]
        while events[-1].finish_reason is None:
            events.append(sink.get(timeout=120))
        results.append(events)
    return results


def sampled_entries(events) -> list:
    return [entry for event in events for entry in event.logprobs or []]


@pytest.mark.parametrize("overlap", [False, True])
def test_engine_logprobs_match_transformers(loaded, hf_model, overlap):
    """Prompt logprobs (first token None) and each sampled token's logprob and top-k equal the float32
    reference over prompt + reply (teacher-forced), batched with a request that asks for nothing."""
    model, tokenizer = loaded
    prompts = [encode_prompt(tokenizer, p) for p in PROMPTS]
    jobs = [
        (prompts[0], SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True, logprobs=3, prompt_logprobs=3)),
        (prompts[1], SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)),  # asks for nothing
        (prompts[2], SamplingParams(temperature=0.9, top_p=0.8, max_new_tokens=12, ignore_eos=True, logprobs=0)),
    ]
    with Engine(model, tokenizer, max_batch_size=4, overlap=overlap, seed=1) as engine:
        results = run(engine, jobs)
    assert all(e.logprobs is None and e.prompt_logprobs is None for e in results[1])
    for (ids, params), events in zip([jobs[0], jobs[2]], [results[0], results[2]], strict=True):
        entries = sampled_entries(events)
        assert len(entries) == params.max_new_tokens == events[-1].completion_tokens
        reply = [e.token for e in entries]
        reference = reference_logprobs(hf_model, ids + reply)
        for j, entry in enumerate(entries):
            row = reference[len(ids) - 1 + j]  # raw distribution, whatever the temperature
            assert math.isclose(entry.logprob, row[entry.token].item(), abs_tol=1e-4), (j, entry)
            assert len(entry.top) == params.logprobs
            values, top_ids = row.topk(params.logprobs)
            assert [t for t, _ in entry.top] == top_ids.tolist()
            assert torch.allclose(torch.tensor([v for _, v in entry.top]), values, atol=1e-4)
            if params.temperature == 0:
                assert entry.top[0][0] == entry.token  # greedy: the sampled token is the most likely
    prompt = results[0][0].prompt_logprobs
    ids = jobs[0][0]
    assert [e.token for e in prompt] == ids and prompt[0].logprob is None and prompt[0].top == []
    reference = reference_logprobs(hf_model, ids)
    for i in range(1, len(ids)):
        assert math.isclose(prompt[i].logprob, reference[i - 1, ids[i]].item(), abs_tol=1e-4), i
        assert [t for t, _ in prompt[i].top] == reference[i - 1].topk(3).indices.tolist()
    assert all(e.prompt_logprobs is None for e in results[0][1:])  # first event only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "cuda-graphs"])
def test_cuda_logprobs_with_graphs_and_overlap(tiny_vicuna, hf_model, cuda_graphs):
    """On a GPU (float32), with the step queued ahead and graphs or not: the logprobs read with each step
    are that step's (a graph's logits buffer is rewritten by the next replay), equal to the reference."""
    model, tokenizer = load_model(tiny_vicuna, device="cuda", dtype="float32")
    ids = encode_prompt(tokenizer, PROMPTS[1])
    params = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True, logprobs=2, prompt_logprobs=2)
    with Engine(model, tokenizer, max_batch_size=2, cuda_graphs=cuda_graphs) as engine:
        assert engine.overlap
        (events,) = run(engine, [(ids, params)])
        assert engine.runner.cuda_graphs == cuda_graphs and engine.stats["queued_ahead"] > 0
    entries = sampled_entries(events)
    reference = reference_logprobs(hf_model, ids + [e.token for e in entries])
    got = torch.tensor([e.logprob for e in entries])
    expected = reference[torch.arange(len(ids) - 1, len(ids) - 1 + len(entries)), [e.token for e in entries]]
    assert torch.allclose(got, expected, atol=1e-3)
    prompt = torch.tensor([e.logprob for e in events[0].prompt_logprobs[1:]])
    assert torch.allclose(prompt, reference[torch.arange(len(ids) - 1), ids[1:]], atol=1e-3)


def test_two_cpu_ranks_logprobs_match_one_process(tiny_vicuna, loaded):
    """Tensor parallel: only rank 0 computes logprobs (the output layer is whole on every rank; the other
    ranks run the same prefill and steps); they equal one process's, with the padded (CUDA-graph) layout."""
    model, tokenizer = loaded
    jobs = [
        (encode_prompt(tokenizer, p), SamplingParams(temperature=0, max_new_tokens=6, logprobs=2, prompt_logprobs=2))
        for p in PROMPTS
    ]

    def logprobs(events) -> list[float]:
        return [e.logprob for e in events[0].prompt_logprobs[1:]] + [e.logprob for e in sampled_entries(events)]

    with Engine(model, tokenizer, max_batch_size=4) as engine:
        expected = [logprobs(events) for events in run(engine, jobs)]
    split, _ = load_model(tiny_vicuna, device="cpu", num_gpus=2)
    try:
        with Engine(split, tokenizer, max_batch_size=4, padded_decode=True, overlap=True) as engine:
            got = [logprobs(events) for events in run(engine, jobs)]
    finally:
        split.close()
    for ours, theirs in zip(got, expected, strict=True):
        assert ours == pytest.approx(theirs, abs=1e-5)


def test_long_prompt_logprobs_in_chunks_and_zero_new_tokens(loaded, hf_model):
    """max_new_tokens=0 returns the prompt's logprobs and no token; a prompt longer than one chunk of
    positions is scored in pieces that join up."""
    model, tokenizer = loaded
    ids = encode_prompt(tokenizer, template.render([(template.USER, "Write a poem about llamas. " * 12)]))
    with Engine(model, tokenizer, max_batch_size=2) as engine:
        engine.runner.PROMPT_CHUNK = 7
        (events,) = run(engine, [(ids, SamplingParams(max_new_tokens=0, logprobs=1, prompt_logprobs=1))])
    assert len(events) == 1 and events[0].finish_reason == "length" and events[0].text == ""
    assert events[0].completion_tokens == 0 and events[0].logprobs == []
    prompt = events[0].prompt_logprobs
    reference = reference_logprobs(hf_model, ids)
    expected = reference[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor([e.logprob for e in prompt[1:]]), expected, atol=1e-4)


# -- the HTTP API ---------------------------------------------------------------------------------------------

CONTEXT = 256
MODEL = "vicuna-tiny-all-v1.1"


@pytest.fixture(scope="module")
def server(tiny_vicuna):
    from test_serve import start_server  # tests/ is on sys.path

    process, url = start_server(tiny_vicuna, "--max-context", str(CONTEXT), "--max-batch-size", "4")
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)


def check_offsets(text: str, logprobs, special=("<s>", "</s>")) -> None:
    """Every token's text sits at its text_offset in the returned text; special tokens add nothing."""
    for token, offset in zip(logprobs.tokens, logprobs.text_offset, strict=True):
        if token not in special:
            assert text[offset : offset + len(token)] == token, (token, offset, text)
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs)


def test_completion_echo_logprobs_match_transformers(client, loaded, hf_model):
    """A text prompt with echo: the prompt's own logprobs (first null), then the reply's; top_logprobs hold
    the k most likely plus the chosen token; values are the float32 reference's."""
    _, tokenizer = loaded
    prompt = "Once upon a time, there was"
    ids = encode_prompt(tokenizer, prompt)
    result = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, echo=True, logprobs=2)
    choice = result.choices[0]
    logprobs = choice.logprobs
    assert choice.text.startswith(prompt)
    assert logprobs.tokens[0] == "<s>" and logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    n_reply = result.usage.completion_tokens
    assert len(logprobs.tokens) == len(ids) + n_reply
    check_offsets(choice.text, logprobs)
    reference = reference_logprobs(hf_model, ids)
    for i in range(1, len(ids)):
        assert math.isclose(logprobs.token_logprobs[i], reference[i - 1, ids[i]].item(), abs_tol=1e-4), i
        top = logprobs.top_logprobs[i]
        assert 2 <= len(top) <= 3 and math.isclose(max(top.values()), reference[i - 1].max().item(), abs_tol=1e-4)
    for i in range(len(ids), len(logprobs.tokens)):  # greedy: the chosen token is the most likely
        assert math.isclose(logprobs.token_logprobs[i], max(logprobs.top_logprobs[i].values()), abs_tol=1e-6)
    first = logprobs.token_logprobs[len(ids)]  # the first reply token: from the prompt's last position
    assert math.isclose(first, reference[-1].max().item(), abs_tol=1e-4)


def test_token_id_prompts_and_batches(client, loaded, hf_model):
    """Token ids go in as given (no BOS added), alone or as a batch; max_tokens=0 with echo scores the
    prompt only; max_tokens=1 (what lm-evaluation-harness sends) adds exactly one entry."""
    _, tokenizer = loaded
    batch = [tokenizer("The llama is a", add_special_tokens=False).input_ids, encode_prompt(tokenizer, "hi there")]
    result = client.completions.create(model=MODEL, prompt=batch, max_tokens=0, echo=True, logprobs=1, temperature=0)
    assert [c.index for c in result.choices] == [0, 1] and result.usage.completion_tokens == 0
    for ids, choice in zip(batch, result.choices, strict=True):
        assert choice.finish_reason == "length" and len(choice.logprobs.token_logprobs) == len(ids)
        assert choice.text == tokenizer.decode(ids, skip_special_tokens=True)
        reference = reference_logprobs(hf_model, ids)
        expected = reference[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        assert torch.allclose(torch.tensor(choice.logprobs.token_logprobs[1:]), expected, atol=1e-4)
    one = client.completions.create(model=MODEL, prompt=batch[0], max_tokens=1, echo=True, logprobs=1, temperature=0)
    assert len(one.choices) == 1 and len(one.choices[0].logprobs.token_logprobs) == len(batch[0]) + 1
    assert one.choices[0].logprobs.token_logprobs[:-1] == pytest.approx(
        result.choices[0].logprobs.token_logprobs, abs=1e-5
    )
    plain = client.completions.create(model=MODEL, prompt=batch[0], max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None and plain.usage.prompt_tokens == len(batch[0])


def test_streamed_completion_logprobs_equal_plain(client):
    kwargs = dict(model=MODEL, prompt="Tell me a story", max_tokens=12, temperature=0, echo=True, logprobs=3)
    plain = client.completions.create(**kwargs).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**kwargs, stream=True)]
    assert "".join(c.text for c in chunks) == plain.text
    assert chunks[0].text.startswith("Tell me a story") and chunks[0].logprobs.token_logprobs[0] is None
    joined = {
        field: [x for c in chunks if c.logprobs for x in getattr(c.logprobs, field)]
        for field in ("tokens", "text_offset", "top_logprobs")
    }
    assert joined["tokens"] == plain.logprobs.tokens and joined["text_offset"] == plain.logprobs.text_offset
    assert joined["top_logprobs"] == plain.logprobs.top_logprobs
    assert len(chunks) > 2  # the prompt, then the reply in several pieces


def test_chat_logprobs(client):
    """OpenAI's chat format: choices[].logprobs.content[{token, logprob, bytes, top_logprobs}], streamed too."""
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Who are you?"}], max_tokens=10, temperature=0)
    plain = client.chat.completions.create(**kwargs, logprobs=True, top_logprobs=2).choices[0]
    content = plain.logprobs.content
    assert "".join(t.token for t in content if t.token != "</s>") == plain.message.content
    for item in content:
        assert item.bytes == list(item.token.encode()) and item.logprob <= 0
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert math.isclose(item.top_logprobs[0].logprob, item.logprob, abs_tol=1e-6)  # greedy
    stream = client.chat.completions.create(**kwargs, logprobs=True, top_logprobs=2, stream=True)
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    bare = client.chat.completions.create(**kwargs, logprobs=True).choices[0]
    assert all(t.top_logprobs == [] for t in bare.logprobs.content)
    assert client.chat.completions.create(**kwargs).choices[0].logprobs is None


@pytest.mark.parametrize(
    ("route", "extra", "param"),
    [
        ("chat/completions", {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        ("chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("completions", {"logprobs": 21}, "logprobs"),
        ("completions", {"prompt": [1, 5, 99999]}, "prompt"),
        ("completions", {"prompt": [[1, 5], []]}, "prompt"),
    ],
)
def test_bad_logprob_requests_are_400(server, route, extra, param):
    body = {"model": MODEL, "max_tokens": 2}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if route.startswith("chat") else {"prompt": "hi"})
    body.update(extra)
    response = httpx.post(f"{server}/v1/{route}", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert param in response.json()["error"]["message"]


# -- lm-evaluation-harness against `vicunaflow serve` ---------------------------------------------------------

# Runs in a subprocess with the offline variables set before datasets/huggingface_hub are imported.
LM_EVAL = """
import json, sys
import lm_eval
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager

tasks_dir, model_args, out = sys.argv[1:4]
results = lm_eval.simple_evaluate(
    model="local-completions", model_args=model_args, tasks=["vf_mc", "vf_gen"],
    task_manager=TaskManager(include_path=tasks_dir), log_samples=True, bootstrap_iters=0,
)
lm = get_model("local-completions").create_from_arg_string(model_args)  # its tokenisation of each pair
samples = {
    task: [
        {
            "arguments": [list(a) for a in s["arguments"]],
            "resps": s["resps"],
            "filtered_resps": s["filtered_resps"],
            "encoded": [lm._encode_pair(a[0], a[1]) if task == "vf_mc" else lm.tok_encode(a[0]) for a in s["arguments"]],
        }
        for s in rows
    ]
    for task, rows in results["samples"].items()
}
json.dump({"results": results["results"], "samples": samples}, open(out, "w"), default=list)
"""


def test_lm_eval_local_completions_offline(tmp_path, tiny_vicuna, loaded):
    """lm-eval's `local-completions` runs a multiple-choice (loglikelihood) and a generate_until task over
    local jsonl files against a `vicunaflow serve` of the tiny model, with no internet; its loglikelihoods
    equal the engine's own, computed in this process, and its generations our greedy replies."""
    import subprocess
    import sys

    pytest.importorskip("lm_eval")
    from lm_eval_tasks import MC_ITEMS, OFFLINE, write_tasks  # tests/ is on sys.path
    from test_serve import start_server

    model, tokenizer = loaded
    write_tasks(tmp_path)
    offline = {**OFFLINE, "HF_HOME": str(tmp_path / "hf")}
    process, url = start_server(tiny_vicuna, "--max-context", str(CONTEXT), "--max-batch-size", "4")
    try:
        model_args = (
            f"base_url={url}/v1/completions,model={MODEL},tokenizer_backend=huggingface,tokenizer={tiny_vicuna},"
            f"num_concurrent=1,max_length={CONTEXT},max_retries=1"
        )
        out = tmp_path / "lm_eval.json"
        completed = subprocess.run(
            [sys.executable, "-c", LM_EVAL, str(tmp_path), model_args, str(out)],
            env={**os.environ, **offline},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert completed.returncode == 0, completed.stderr[-4000:]
    finally:
        process.terminate()
        process.wait(timeout=30)
    report = json.loads(out.read_text())
    assert "acc,none" in report["results"]["vf_mc"] and "exact_match,none" in report["results"]["vf_gen"]

    mc = report["samples"]["vf_mc"]
    assert sorted(len(s["arguments"]) for s in mc) == sorted(len(item["choices"]) for item in MC_ITEMS)
    with Engine(model, tokenizer, max_batch_size=4) as engine:
        pairs = [(context, continuation) for s in mc for context, continuation in s["encoded"]]
        jobs = [(c + x, SamplingParams(max_new_tokens=0, prompt_logprobs=1)) for c, x in pairs]
        ours = []  # (loglikelihood of the continuation, whether it is the greedy one), as lm-eval's resps
        for (context, _), events in zip(pairs, run(engine, jobs), strict=True):
            continuation = events[0].prompt_logprobs[len(context) :]
            ours.append((sum(e.logprob for e in continuation), all(e.top[0][0] == e.token for e in continuation)))
        theirs = [tuple(r[0]) for s in mc for r in s["resps"]]
        assert [t[0] for t in theirs] == pytest.approx([o[0] for o in ours], abs=1e-4)
        assert [t[1] for t in theirs] == [o[1] for o in ours]
        assert [tuple(f) for s in mc for f in s["filtered_resps"]] == theirs

        gen = report["samples"]["vf_gen"]
        params = SamplingParams(temperature=0, max_new_tokens=8, stop=("\n", tokenizer.eos_token))
        replies = run(engine, [(s["encoded"][0], params) for s in gen])
    assert [s["resps"][0][0] for s in gen] == ["".join(e.text for e in events) for events in replies]


def test_token_texts_join_to_the_text_when_a_reply_ends_inside_a_character(tiny_vicuna):
    """A reply cut inside a byte-fallback character ends in U+FFFD (the engine flushes what it holds): its last
    token carries it, so the tokens' texts still join to the text and the offsets stay right; and the chosen
    token, when among the alternatives, is listed once (not again under the text it adds)."""
    from transformers import AutoTokenizer

    from vicunaflow.engine.sampling import TokenLogprob
    from vicunaflow.engine.text import IncrementalDecoder
    from vicunaflow.serve.logprobs import TokenTexts, completion_logprobs

    tokenizer = AutoTokenizer.from_pretrained(tiny_vicuna)
    e_acute = tokenizer.convert_tokens_to_ids(["<0xC3>", "<0xA9>"])
    word = tokenizer.encode("hello", add_special_tokens=False)
    ids = [*word, *e_acute, e_acute[0]]  # "helloé", then the first byte of another "é": the reply ends there
    decoder = IncrementalDecoder(tokenizer)
    engine_text = "".join(decoder.push(t) for t in ids) + decoder.flush()  # what the engine's events carry
    assert engine_text.startswith("helloé") and engine_text.endswith("\ufffd")
    entries = [TokenLogprob(t, -1.0, [(t, -1.0), (word[0], -2.0)]) for t in ids]
    texts = TokenTexts(tokenizer, prompt=False, offset=3)
    rows = texts.add(entries[:-2]) + texts.add(entries[-2:], last=True)  # streamed: two events
    assert "".join(name for name, *_ in rows) == texts.text == engine_text
    assert [offset for _, offset, *_ in rows] == [3 + len("".join(n for n, *_ in rows[:i])) for i in range(len(ids))]
    top = completion_logprobs(rows, 1)["top_logprobs"]
    assert all(len(alternatives) == 1 for alternatives in top), top

"""Our model and engine against transformers (the independent reference), plus streaming text, sampling and slots."""

from __future__ import annotations

import random
import shutil
import threading

import pytest
import torch

from vicunaflow import BUILTIN_CONVERSATIONS, VicunaflowError, template
from vicunaflow.engine import Engine, IncrementalDecoder, SamplingParams, encode_prompt, fit_conversation, load_model
from vicunaflow.engine.text import decoder_of, stop_prefix_length

QUESTIONS = ["Hello", "What is the capital of France? Tell me about it.", "hi", "Write a poem about llamas. " * 16]


def _prompt(tokenizer, question: str) -> list[int]:
    return encode_prompt(tokenizer, template.render([(template.USER, question), (template.ASSISTANT, None)]))


def _reference(model, tokenizer, ids: list[int], max_new_tokens: int) -> str:
    """transformers' greedy generate, stopping at </s> like the engine."""
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id
    )[0, len(ids) :].tolist()
    return tokenizer.decode([t for t in out if t != tokenizer.eos_token_id])


def test_prompt_ids_start_with_bos_and_map_eos(loaded):
    _, tokenizer = loaded
    ids = encode_prompt(
        tokenizer, template.render([("USER", "a"), ("ASSISTANT", "b"), ("USER", "c"), ("ASSISTANT", None)])
    )
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.eos_token_id) == 1  # the literal </s> after the first reply is the EOS token
    assert (
        ids
        == tokenizer(template.render([("USER", "a"), ("ASSISTANT", "b"), ("USER", "c"), ("ASSISTANT", None)])).input_ids
    )


@pytest.fixture(scope="module")
def reference_replies(loaded, hf_model) -> list[str]:
    _, tokenizer = loaded
    return [_reference(hf_model, tokenizer, _prompt(tokenizer, q), 16) for q in QUESTIONS]


def test_prefill_logits_match_transformers(loaded, hf_model):
    """One forward over a prompt: our fused model's logits are transformers' (float32, CPU)."""
    model, tokenizer = loaded
    ids = _prompt(tokenizer, QUESTIONS[1])
    with torch.inference_mode():
        model.setup_cache(slots=1, context=len(ids))
        ours = model(torch.tensor([ids]), torch.arange(len(ids))[None], kv_length=len(ids))  # [1, vocab]
        theirs = hf_model(torch.tensor([ids])).logits[:, -1]
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), (ours - theirs).abs().max()


def test_greedy_tokens_match_teacher_forced_transformers(loaded, hf_model):
    """Every greedy token of a batched engine run is the argmax of transformers' float32 forward over
    the prompt and the reply so far (one teacher-forced forward per reply): exactness, token by token."""
    model, tokenizer = loaded
    prompts = [_prompt(tokenizer, q) for q in QUESTIONS]
    params = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)
    done = threading.Semaphore(0)
    with Engine(model, tokenizer, max_batch_size=4, padded_decode=True) as engine:
        requests = [engine.submit(p, params, lambda e: e.finish_reason and done.release()) for p in prompts]
        for _ in prompts:
            done.acquire()
    for prompt, request in zip(prompts, requests, strict=True):
        reply = request.decoder.ids
        assert len(reply) == 24
        with torch.inference_mode():
            logits = hf_model(torch.tensor([prompt + reply])).logits[0, len(prompt) - 1 : -1]  # [24, vocab]
        assert logits.argmax(dim=-1).tolist() == reply


def test_grouped_query_model_matches_transformers(tiny_gqa):
    """8 query heads sharing 2 key/value heads: greedy tokens are transformers' teacher-forced argmax."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_model(tiny_gqa)
    assert (model.heads, model.kv_heads) == (8, 2)
    reference = AutoModelForCausalLM.from_pretrained(tiny_gqa, dtype=torch.float32).eval()
    prompt = _prompt(tokenizer, QUESTIONS[1])
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    with Engine(model, tokenizer, max_batch_size=2, padded_decode=True) as engine:
        done = threading.Event()
        request = engine.submit(prompt, params, lambda e: e.finish_reason and done.set())
        done.wait()
    reply = request.decoder.ids
    with torch.inference_mode():
        logits = reference(torch.tensor([prompt + reply])).logits[0, len(prompt) - 1 : -1]
    assert logits.argmax(dim=-1).tolist() == reply and len(set(reply)) > 1


@pytest.mark.parametrize(
    ("padded", "overlap"),
    [(False, True), (True, True), (True, False)],
    ids=["exact", "padded", "padded-no-overlap"],
)
def test_batched_engine_matches_transformers_generate(loaded, reference_replies, padded, overlap):
    """Greedy replies are the same whether requests run alone (HF generate) or batched and joining late.

    padded: the CUDA-graph layout (rows and attended length rounded up to buckets), run eagerly on CPU;
    the long prompt crosses the 256-token bucket boundary while it decodes. overlap: step t+1 queued
    from step t's tokens on the device before step t is read (the default on CUDA).
    """
    model, tokenizer = loaded
    prompts = [_prompt(tokenizer, q) for q in QUESTIONS]
    assert len(prompts[-1]) < 256 < len(prompts[-1]) + 16
    expected = reference_replies
    results: dict[int, list] = {}
    engine = Engine(model, tokenizer, max_batch_size=3, padded_decode=padded, overlap=overlap)
    with engine:

        def run(i: int) -> None:
            results[i] = list(engine.generate(prompts[i], SamplingParams(temperature=0, max_new_tokens=16)))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = engine.snapshot_stats()
    for i, events in results.items():
        assert "".join(e.text for e in events) == expected[i], QUESTIONS[i]
        assert events[-1].finish_reason in ("stop", "length")
        assert len(events) > 2  # streamed piece by piece
    assert stats["max_batch"] == 3 and stats["active"] == 0  # 4 requests, 3 rows: one joined a running batch
    assert (stats["queued_ahead"] > 0) == overlap


def test_incremental_decoder_equals_full_decode(loaded):
    """Deltas of any token sequence (byte-fallback pieces, lone "▁", emoji) add up to the full decode."""
    _, tokenizer = loaded
    samples = ["é€😀 ✨ ok", "  two  spaces\nnew line", "Vicuna: 你好!", "\u00e9\u00e9 \U0001f999x"]
    sequences = [tokenizer(s, add_special_tokens=False).input_ids for s in samples]
    # Random pieces mixed with whole multi-byte characters (byte-fallback runs that form valid UTF-8,
    # as a trained model emits them).
    byte_tokens = {tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)}
    pieces = [[i] for i in range(3, len(tokenizer)) if i not in byte_tokens]
    chars = [tokenizer(c, add_special_tokens=False).input_ids[1:] for c in "é€😀✨你好ßΩ🦙"]
    rng = random.Random(0)
    sequences += [[t for _ in range(40) for t in rng.choice(pieces + chars)] for _ in range(30)]
    for ids in sequences:
        decoder = IncrementalDecoder(tokenizer)
        text = "".join(decoder.push(t) for t in ids) + decoder.flush()
        assert text == tokenizer.decode(ids), ids


def test_backend_decoder_equals_tokenizer_decode(loaded):
    """The engine's direct call of the Rust backend decodes every id sequence as `tokenizer.decode` does: special
    tokens, byte-fallback pieces (whole, split and invalid UTF-8), lone "▁", added tokens; subclasses that decode
    their own way and tokenizers that clean up spaces keep `tokenizer.decode`."""
    _, tokenizer = loaded
    decode = decoder_of(tokenizer)
    assert decode != tokenizer.decode  # the fast path is taken for the project's tokenizer
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id]
    byte_tokens = [tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)]
    chars = [tokenizer(c, add_special_tokens=False).input_ids for c in ["é€😀", " ✨", "你好", "▁", " ", "  x"]]
    rng = random.Random(2)
    sequences = [[], *chars, special, byte_tokens[0xC3:0xC5]]
    for _ in range(500):
        ids = []
        for _ in range(rng.randrange(1, 12)):
            kind = rng.randrange(4)
            ids += (
                [rng.choice(special)]
                if kind == 0
                else [rng.choice(byte_tokens)]
                if kind == 1
                else rng.choice(chars)
                if kind == 2
                else [rng.randrange(len(tokenizer))]
            )
        sequences.append(ids)
    for ids in sequences:
        assert decode(ids) == tokenizer.decode(ids), ids

    class Own(type(tokenizer)):
        def decode(self, token_ids, **kwargs):
            return "own"

    own = Own.__new__(Own)
    own.__dict__.update(tokenizer.__dict__)
    assert decoder_of(own)([5]) == "own"
    tidy = object.__new__(type(tokenizer))
    tidy.__dict__.update(tokenizer.__dict__)
    tidy.clean_up_tokenization_spaces = True
    assert decoder_of(tidy) == tidy.decode


def test_incremental_decoder_never_stalls(loaded):
    """Raw ASCII byte tokens next to invalid bytes make tokenizers rewrite earlier text; keep streaming anyway."""
    _, tokenizer = loaded
    rng = random.Random(1)
    for _ in range(20):
        ids = [rng.randrange(3, len(tokenizer)) for _ in range(40)] + tokenizer(
            "end", add_special_tokens=False
        ).input_ids
        decoder = IncrementalDecoder(tokenizer)
        text = "".join(decoder.push(t) for t in ids)
        assert text.endswith("end")


def test_sampling_temperature_and_top_p(loaded):
    model, tokenizer = loaded
    ids = _prompt(tokenizer, "Tell me a story")

    def reply(params: SamplingParams, seed: int) -> str:
        with Engine(model, tokenizer, max_batch_size=1, seed=seed) as engine:
            return "".join(e.text for e in engine.generate(ids, params))

    greedy = reply(SamplingParams(temperature=0, max_new_tokens=16), seed=0)
    # a nucleus this small keeps only the most likely token: greedy whatever the temperature
    assert reply(SamplingParams(temperature=1.5, top_p=1e-6, max_new_tokens=16), seed=1) == greedy
    sampled = SamplingParams(temperature=1.0, max_new_tokens=16)
    assert reply(sampled, seed=3) == reply(sampled, seed=3)  # seeded: reproducible
    assert len({reply(sampled, seed=s) for s in range(4)}) > 1  # and actually random


def test_top_k_draws_among_the_k_most_likely_and_top_p_within_them():
    """top_k keeps the k most likely tokens; top_p then takes its nucleus of their renormalised mass (vLLM's order):
    over [0.25, 0.15, 0.10, 7 x 0.0714], top_k 3 leaves [0.5, 0.3, 0.2], whose 0.6-nucleus is the first two (over
    the whole vocabulary it would have reached the fifth)."""
    from vicunaflow.engine.sampling import sample

    probs = torch.tensor([0.25, 0.15, 0.10] + [0.5 / 7] * 7)
    logits = probs.log()[None].repeat(400, 1)  # 400 rows, one draw each
    generator = torch.Generator().manual_seed(0)

    def drawn(**fields) -> set[int]:
        params = [SamplingParams(temperature=1.0, **fields)] * logits.shape[0]
        return set(sample(logits, logits.argmax(-1), params, generator).tolist())

    assert drawn() == set(range(10))
    assert drawn(top_k=1) == {0}  # FastChat's and vLLM's greedy at any temperature
    assert drawn(top_k=2) == {0, 1}
    assert drawn(top_k=3, top_p=0.6) == {0, 1}
    assert drawn(top_k=0, top_p=0.6) == {0, 1, 2, 3, 4}  # 0: every token


def test_stop_string_cuts_the_reply(loaded):
    model, tokenizer = loaded
    ids = _prompt(tokenizer, "Hello")
    with Engine(model, tokenizer, max_batch_size=1) as engine:
        full = "".join(e.text for e in engine.generate(ids, SamplingParams(temperature=0, max_new_tokens=20)))
        stop = full[8:11]
        events = list(engine.generate(ids, SamplingParams(temperature=0, max_new_tokens=20, stop=(stop,))))
    assert "".join(e.text for e in events) == full[: full.index(stop)]
    assert events[-1].finish_reason == "stop"
    assert stop_prefix_length("abc US", ["USER:"]) == 2 and stop_prefix_length("abc", ["USER:"]) == 0


def test_cancel_frees_the_slot(loaded):
    """One slot: a cancelled endless request must make room for the next one."""
    model, tokenizer = loaded
    ids = _prompt(tokenizer, "Hello")
    with Engine(model, tokenizer, max_batch_size=1) as engine:
        endless = engine.generate(ids, SamplingParams(temperature=0, max_new_tokens=10**6))
        next(endless)
        endless.close()  # cancels, like a client that disconnects
        events = list(engine.generate(ids, SamplingParams(temperature=0, max_new_tokens=5)))
        stats = engine.snapshot_stats()
    assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 5
    assert stats["cancelled"] == 1 and stats["active"] == 0


def test_a_request_cancelled_while_queued_ends_at_the_next_step(loaded):
    """One slot, busy: requests whose clients left while they waited end (cancelled) while the slot's request
    still runs, so /health's waiting and /metrics' counts do not keep them until a row frees."""
    model, tokenizer = loaded
    ids = _prompt(tokenizer, "Hello")
    with Engine(model, tokenizer, max_batch_size=1) as engine:
        busy = engine.generate(ids, SamplingParams(temperature=0, max_new_tokens=10**6))
        next(busy)
        ended = threading.Event()
        queued = [engine.submit(ids, SamplingParams(temperature=0), lambda e: None) for _ in range(2)]
        queued.append(engine.submit(ids, SamplingParams(temperature=0), lambda e: e.finish_reason and ended.set()))
        for request in queued:
            request.cancel()
        assert ended.wait(30)
        stats = engine.snapshot_stats()
        assert stats["waiting"] == 0 and stats["cancelled"] == 3 and stats["active"] == 1
        busy.close()


def test_reply_is_capped_by_the_context(loaded):
    model, tokenizer = loaded
    ids = _prompt(tokenizer, "Hello")
    with Engine(model, tokenizer, max_batch_size=2, max_context=len(ids) + 7) as engine:
        assert engine.max_new_tokens(len(ids), 1000) == 7
        events = list(engine.generate(ids, SamplingParams(temperature=0, max_new_tokens=1000)))
        with pytest.raises(VicunaflowError, match="context"):
            engine.submit(ids + ids, SamplingParams(), print)
    assert events[-1].finish_reason in ("length", "stop") and events[-1].completion_tokens <= 7


def test_fit_conversation_drops_oldest_exchanges(loaded):
    _, tokenizer = loaded
    turns = []
    for i in range(6):
        turns += [(template.USER, f"question {i} " * 5), (template.ASSISTANT, f"answer {i} " * 5)]
    turns += [(template.USER, "last question"), (template.ASSISTANT, None)]
    full = len(encode_prompt(tokenizer, template.render(turns)))
    kept, ids = fit_conversation(tokenizer, turns, budget=full - 10)
    assert len(ids) <= full - 10 and kept == turns[len(turns) - len(kept) :]
    assert kept[-2] == (template.USER, "last question") and kept[0][0] == template.USER
    with pytest.raises(VicunaflowError, match="at most 5"):
        fit_conversation(tokenizer, turns, budget=5)


def test_a_prompt_past_the_tokenizers_length_is_encoded_without_a_warning(tiny_vicuna):
    """The engine's context decides what fits (serve refuses, chat leaves out old turns): transformers' warning
    that a prompt past tokenizer_config's model_max_length "will result in indexing errors" would only alarm."""
    import logging

    from vicunaflow.tokenizer import open_tokenizer

    tokenizer = open_tokenizer(tiny_vicuna)  # a fresh one: transformers warns once a tokenizer
    warnings = []
    handler = logging.Handler()
    handler.emit = warnings.append
    transformers_log = logging.getLogger("transformers")  # which does not propagate to the root's handlers
    transformers_log.addHandler(handler)
    try:
        ids = encode_prompt(tokenizer, "hello " * (tokenizer.model_max_length + 10))
    finally:
        transformers_log.removeHandler(handler)
    assert len(ids) > tokenizer.model_max_length and [w.getMessage() for w in warnings] == []


@pytest.fixture(scope="module")
def quantized_folders(tiny_vicuna, tmp_path_factory) -> dict[int, object]:
    """`vicunaflow quantize` of the tiny Vicuna: int8, and int4 with groups of 128."""
    from vicunaflow.quantize import quantize_model

    root = tmp_path_factory.mktemp("engine-quantized")
    return {bits: quantize_model(model_path=tiny_vicuna, output_dir=root / f"int{bits}", bits=bits) for bits in (8, 4)}


def _greedy(model, tokenizer, questions, max_new_tokens: int = 12) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens, ignore_eos=True)
    done = threading.Semaphore(0)
    with Engine(model, tokenizer, max_batch_size=2) as engine:
        requests = [
            engine.submit(_prompt(tokenizer, q), params, lambda e: e.finish_reason and done.release())
            for q in questions
        ]
        for _ in questions:
            done.acquire()
    return [r.decoder.ids for r in requests]


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_at_load_equals_a_quantized_folder(tiny_vicuna, quantized_folders, bits):
    """--load-8bit / --load-4bit on the float folder and the folder `vicunaflow quantize` wrote hold the
    same codes (vicunaflow.quant, the one int8/int4 implementation) and give the same greedy tokens."""
    from vicunaflow.quant import QuantWeight

    # our layout on any device (on CUDA --load-4bit would repack into tinygemm's: test_quant checks that)
    at_load, tokenizer = load_model(tiny_vicuna, load_8bit=bits == 8, load_4bit=bits == 4, int4_kernel="triton")
    stored, _ = load_model(quantized_folders[bits], int4_kernel="triton")
    for a, b in zip(at_load.layers, stored.layers, strict=True):
        for name in ("wqkv", "wo", "w13", "w2"):
            x, y = getattr(a, name), getattr(b, name)
            assert isinstance(x, QuantWeight) and (x.bits, x.group_size) == (bits, 128 if bits == 4 else None)
            assert torch.equal(x.qweight, y.qweight) and torch.equal(x.scales, y.scales), name
    if bits == 8:
        assert isinstance(at_load.output, torch.Tensor)  # lm_head stays float beside int8 layers
    else:  # beside int4 layers, lm_head is int4 too, quantized at load from the float one the folder keeps
        assert isinstance(at_load.output, QuantWeight) and (at_load.output.bits, at_load.output.group_size) == (4, 128)
        assert torch.equal(at_load.output.qweight, stored.output.qweight)
    assert at_load.weight_bytes() == stored.weight_bytes()
    assert _greedy(at_load, tokenizer, QUESTIONS[:3]) == _greedy(stored, tokenizer, QUESTIONS[:3])


def test_quantized_weights_shrink_and_logits_stay_close(tiny_vicuna, loaded):
    """int8 within 5% of the float32 logits (test_quant's bar for the format), int4 further but bounded;
    the layers' bytes are int8's quarter (int4's eighth, plus scales and zeros, lm_head's too) of float32's."""
    model, tokenizer = loaded
    prompts = [_prompt(tokenizer, q) for q in QUESTIONS]

    def logits(m) -> torch.Tensor:  # [len(prompts), vocab], float64
        rows = []
        with torch.inference_mode():
            for ids in prompts:
                m.setup_cache(1, len(ids))
                tokens, positions = torch.tensor([ids], device=m.device), torch.arange(len(ids), device=m.device)[None]
                rows.append(m(tokens, positions, kv_length=len(ids)).double().cpu())
        return torch.cat(rows)

    reference = logits(model)
    errors, sizes = {}, {}
    for bits in (8, 4):
        quantized, _ = load_model(tiny_vicuna, device="cpu", load_8bit=bits == 8, load_4bit=bits == 4)
        errors[bits] = float((logits(quantized) - reference).norm() / reference.norm())
        sizes[bits] = quantized.weight_bytes()
    assert errors[8] < 0.05 and errors[8] < errors[4] < 0.6, errors
    float_bytes = model.weight_bytes()
    args = model.args
    layer_values = args.n_layers * (4 * args.dim * args.dim + 3 * args.dim * args.ffn_dim)
    assert float_bytes - sizes[8] == pytest.approx(3 * layer_values, rel=0.01)  # 4 bytes -> 1 (+ scales)
    head_values = args.vocab_size * args.dim  # lm_head: int4 beside int4 layers, float beside int8 ones
    assert float_bytes - sizes[4] == pytest.approx(3.5 * (layer_values + head_values), rel=0.05)  # (+ 4/128)


@pytest.mark.parametrize("dtype", ["fp16", "half", "torch.float16", "Float16"])
def test_an_unknown_dtype_is_refused_with_the_choices(tiny_vicuna, dtype):
    with pytest.raises(VicunaflowError, match=rf"dtype '{dtype}'.*choose auto, float16, bfloat16 or float32"):
        load_model(tiny_vicuna, device="cpu", dtype=dtype)


def test_load_errors_are_clear(tiny_vicuna, tmp_path):
    with pytest.raises(VicunaflowError, match="choose one"):
        load_model(tiny_vicuna, load_8bit=True, load_4bit=True)
    with pytest.raises(VicunaflowError, match=r"no config\.json"):
        load_model(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_vicuna.iterdir():
        if f.suffix != ".safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    from safetensors.torch import load_file, save_file

    tensors = load_file(tiny_vicuna / "model-00001-of-00001.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model-00001-of-00001.safetensors")
    with pytest.raises(VicunaflowError, match=r"no tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(broken)


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        ({"num_hidden_layers": 6}, r"no tensor model\.layers\.4\."),  # more layers than the weights hold
        ({"num_hidden_layers": 2}, r"the weights hold layer 3 but config\.json's num_hidden_layers is 2"),
        ({"hidden_size": "256"}, r"hidden_size is '256'; a LLaMA's config needs a positive integer"),
        ({"vocab_size": None}, r"vocab_size is None"),
        ('{"hidden_size": 2', r"config\.json: not valid JSON"),
    ],
    ids=["more-layers", "fewer-layers", "string-size", "no-vocab-size", "cut-short"],
)
def test_a_config_that_does_not_fit_the_weights_is_refused_by_every_loader(edit, error, tiny_vicuna, tmp_path):
    """chat and serve (load_model), quantize and eval loss (which loads through transformers, where a layer the
    weights lack would start random) all refuse a config.json that does not describe the weights, naming it."""
    import json

    from vicunaflow.eval.loss import loss
    from vicunaflow.quantize import quantize_model

    folder = tmp_path / "model"
    shutil.copytree(tiny_vicuna, folder)
    config = json.loads((folder / "config.json").read_text())
    text = edit if isinstance(edit, str) else json.dumps(config | edit)
    (folder / "config.json").write_text(text)
    for attempt in (
        lambda: load_model(folder),
        lambda: quantize_model(model_path=folder, output_dir=tmp_path / "q", bits=8),
        lambda: loss(model_path=folder, data=BUILTIN_CONVERSATIONS, output=tmp_path / "loss.json", device="cpu"),
    ):
        with pytest.raises(VicunaflowError, match=error):
            attempt()
    assert not (tmp_path / "q").exists() and not (tmp_path / "loss.json").exists()


def test_a_config_the_engine_cannot_run_is_refused_naming_its_file(tiny_vicuna, tmp_path):
    """Which config.json: the model folder's own path, not the bare file name (serve may load several models)."""
    import json

    folder = tmp_path / "model"
    shutil.copytree(tiny_vicuna, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"rope_scaling": {"type": "linear", "factor": 2.0}}))
    with pytest.raises(VicunaflowError) as refused:
        load_model(folder)
    assert str(refused.value).startswith(f"{folder / 'config.json'}: rope_scaling="), refused.value


def test_quantized_folder_refusals(quantized_folders, tmp_path):
    with pytest.raises(VicunaflowError, match=r"already quantized to int8.*leave out --load-4bit"):
        load_model(quantized_folders[8], load_4bit=True)
    load_model(quantized_folders[8], load_8bit=True)  # what it is already: fine
    foreign = tmp_path / "gptq"
    foreign.mkdir()
    import json

    config = json.loads((quantized_folders[4] / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (foreign / "config.json").write_text(json.dumps(config))
    with pytest.raises(VicunaflowError, match="'gptq' is not vicunaflow's"):
        load_model(foreign)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "cuda-graphs"])
def test_cuda_engine_matches_transformers_generate(tiny_vicuna, hf_model, cuda_graphs):
    """On a GPU (float32: no rounding noise between kernels), graphs or not, replies equal HF generate."""
    model, tokenizer = load_model(tiny_vicuna, device="cuda", dtype="float32")
    prompts = [_prompt(tokenizer, q) for q in QUESTIONS]
    expected = [_reference(hf_model, tokenizer, ids, 16) for ids in prompts]
    with Engine(model, tokenizer, max_batch_size=3, cuda_graphs=cuda_graphs) as engine:
        assert engine.runner.cuda_graphs == cuda_graphs
        results = [None] * len(prompts)

        def run(i: int) -> None:
            results[i] = "".join(
                e.text for e in engine.generate(prompts[i], SamplingParams(temperature=0, max_new_tokens=16))
            )

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert engine.runner.cuda_graphs == cuda_graphs  # no capture failed
    assert results == expected

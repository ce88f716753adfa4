"""`serve` with several models: routing by `model`, names, the fit check before loading, the arena's API."""

from __future__ import annotations

import json
import logging

import httpx
import openai
import pytest
from test_serve import free_port, serve_refused, start_server  # tests/ is on sys.path (rootdir-less test modules)

from vicunaflow import VicunaflowError
from vicunaflow.serve.fit import Estimate, check_fit, estimate

KEY = "models-key"


@pytest.fixture(scope="module")
def server(tiny_vicuna, tiny_hf, tmp_path_factory):
    results = tmp_path_factory.mktemp("serve-models") / "results"
    # --model-path repeated (as FastChat users type it) and --model-name repeated
    process, url = start_server(
        tiny_vicuna,
        "--model-path",
        str(tiny_hf),
        "--model-name",
        "vicuna",
        "--model-name",
        "base",
        "--max-context",
        "256",
        "--max-batch-size",
        "4",
        "--results-dir",
        str(results),
        env={"VICUNAFLOW_API_KEYS": KEY},
    )
    yield url, results
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=120)


def stats(url: str) -> dict:
    # each model's counters need the key: without one, with several models, /health gives totals only
    return httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {KEY}"}).json()["engines"]


def test_models_are_listed_by_name(client):
    assert [m.id for m in client.models.list().data] == ["vicuna", "base"]
    assert client.models.retrieve("base").id == "base"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("vicuna-tiny-all-v1.1")  # renamed


def test_requests_go_to_the_engine_their_model_names(server, client):
    url = server[0]
    messages = [{"role": "user", "content": "Who are you?"}]
    replies = {}
    for name in ("vicuna", "base"):
        before = stats(url)
        reply = client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=16)
        after = stats(url)
        other = "base" if name == "vicuna" else "vicuna"
        assert after[name]["requests"] == before[name]["requests"] + 1
        assert after[other]["requests"] == before[other]["requests"]
        assert reply.model == name
        replies[name] = reply.choices[0].message.content
    assert replies["vicuna"] != replies["base"]  # two models (the delta changed the weights), not one
    streamed = client.completions.create(model="base", prompt="Once", max_tokens=4, temperature=0, stream=True)
    assert {chunk.model for chunk in streamed} == {"base"}


def test_unknown_model_is_a_404_naming_the_served_ones(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    error = err.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "'vicuna', 'base'" in error["message"]


def test_arena_battle_vote_and_line(server):
    url, results = server
    headers = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(f"{url}/arena/battles").status_code == 401
    battle = httpx.post(f"{url}/arena/battles", headers=headers).json()
    assert set(battle) == {"id", "sides"}  # no names
    route = f"{url}/arena/battles/{battle['id']}"
    assert httpx.post(f"{route}/vote", headers=headers, json={"vote": "left"}).status_code == 400  # no answers yet
    body = {"messages": [{"role": "user", "content": "Pick a number"}], "max_tokens": 6, "stream": True}
    answers = {}
    for side in ("left", "right"):
        with httpx.stream("POST", f"{route}/chat/{side}", headers=headers, json=body, timeout=60) as response:
            events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        assert {event["model"] for event in events} == {side}  # the side, never the name
        answers[side] = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert httpx.post(f"{route}/vote", headers=headers, json={"vote": "up"}).status_code == 400
    voted = httpx.post(f"{route}/vote", headers=headers, json={"vote": "tie"}).json()
    assert set(voted["models"].values()) == {"vicuna", "base"}
    again = httpx.post(f"{route}/vote", headers=headers, json={"vote": "left"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "battle_voted"
    (line,) = (results / "arena_votes.jsonl").read_text().splitlines()
    vote = json.loads(line)
    assert vote["vote"] == "tie" and vote["conversation_id"] == battle["id"] and vote["prompt"] == "Pick a number"
    assert (vote["model_left"], vote["model_right"]) == (voted["models"]["left"], voted["models"]["right"])
    assert (vote["answer_left"], vote["answer_right"]) == (answers["left"], answers["right"])
    missing = httpx.post(f"{url}/arena/battles/nope/vote", headers=headers, json={"vote": "tie"})
    assert missing.status_code == 404


def test_weight_estimate_is_what_the_engine_loads(tiny_vicuna, tmp_path):
    """Float, int8 and int4 quantized at load, and a `vicunaflow quantize` folder; one rank and rank 0 of 2
    (built in this process: build_model with a stand-in for the group, no ranks spawned)."""
    from types import SimpleNamespace

    import torch

    from vicunaflow.engine import load_model
    from vicunaflow.engine.build import LoadSpec, build_model
    from vicunaflow.quantize import quantize_model

    folder = quantize_model(model_path=tiny_vicuna, output_dir=tmp_path / "int4-g32", bits=4, group_size=32)
    cases = [(tiny_vicuna, {}), (tiny_vicuna, {"load_8bit": True}), (tiny_vicuna, {"load_4bit": True})]
    cases += [(tiny_vicuna, {"load_4bit": True, "group_size": 32}), (folder, {})]
    for path, options in cases:
        model, _ = load_model(path, device="cpu", **options)
        guess = estimate(path, name="tiny", device="cpu", max_batch_size=3, max_context=100, **options)
        assert guess.weights == model.weight_bytes(), options
        args = model.args  # keys and values: layers x slots x kv_heads x context x head_dim, float32
        assert guess.kv_cache == 2 * args.n_layers * 3 * args.n_kv_heads * 100 * args.head_dim * 4
        fp8 = estimate(path, name="tiny", device="cpu", max_batch_size=3, max_context=100, kv_cache_dtype="fp8")
        assert fp8.kv_cache * 4 == guess.kv_cache  # a byte a value
        if options.get("load_4bit") and "group_size" not in options:
            continue  # groups of 128 do not split tiny's 704-wide down_proj in two (load_model refuses)
        bits = 8 if options.get("load_8bit") else 4 if options.get("load_4bit") else None
        spec = LoadSpec(str(path), torch.float32, "cpu", bits, options.get("group_size", 128), "auto")
        rank0 = build_model(spec, SimpleNamespace(rank=0, world=2))
        split = estimate(path, name="tiny", device="cpu", num_gpus=2, **options)
        assert split.weights == rank0.weight_bytes(), ("2 ranks", options)


def test_check_fit_names_each_model():
    models = [Estimate("a", 6 * 2**30, 2 * 2**30), Estimate("b", 3 * 2**30, 1 * 2**30)]
    check_fit(models, device="cuda", num_gpus=1, available=14 * 2**30)  # 12 GiB <= 0.9 x 14
    with pytest.raises(
        VicunaflowError, match=r"need about 12.0 GiB on each of 1 GPU.*a 6.0 GiB weights \+ 2.0 GiB KV"
    ) as err:
        check_fit(models, device="cuda", num_gpus=1, available=12 * 2**30)
    assert "b 3.0 GiB weights" in str(err.value) and "12.0 GiB are free" in str(err.value)
    with pytest.raises(VicunaflowError, match=r"24\.0 GiB of RAM"):  # CPU ranks share the RAM
        check_fit(models, device="cpu", num_gpus=2, available=20 * 2**30)


def test_models_that_do_not_fit_are_refused_before_loading(tiny_vicuna, tiny_hf):
    # a KV cache for a million requests does not fit in any RAM: refused from config.json, in seconds
    paths = ["--model-path", str(tiny_vicuna), "--model-path", str(tiny_hf)]
    result = serve_refused(*paths, "--device", "cpu", "--max-batch-size", "1000000", "--port", str(free_port()))
    assert result.returncode == 1, result.stderr
    assert (
        "do not fit" in result.stderr and "vicuna-tiny-all-v1.1" in result.stderr and "llama-tiny-hf" in result.stderr
    )
    assert "loaded" not in result.stderr  # nothing was loaded


def test_a_kv_cache_too_small_for_one_request_is_refused_before_loading(tiny_vicuna, monkeypatch):
    """The Engine's rule, applied to config.json: no weights are read before the refusal."""
    from vicunaflow.loading import ModelOptions
    from vicunaflow.serve import serve

    def load(self, model_path):
        pytest.fail(f"{model_path} was loaded before --kv-cache-tokens was checked")

    monkeypatch.setattr(ModelOptions, "load", load)
    options = ModelOptions(device="cpu")
    with pytest.raises(VicunaflowError) as err:
        serve(model_path=tiny_vicuna, port=free_port(), model_options=options, max_context=500, kv_cache_tokens=300)
    message = str(err.value)
    assert "vicuna-tiny-all-v1.1: --kv-cache-tokens 300 cannot hold one request of the context's 500" in message
    assert "the minimum is 512 (32 blocks of 16)" in message and "--max-context" in message, message


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [("max_context", 0, "--max-context 0: must be at least 1"), ("max_context", -1, "--max-context -1"),
     ("default_max_tokens", 0, "--default-max-tokens 0"), ("max_body_bytes", 0, "--max-body-bytes 0")],
)  # fmt: skip
def test_option_values_below_one_are_refused_before_loading(tiny_vicuna, monkeypatch, option, value, message):
    """A new user's zero or negative limits: refused with the option's name, not served (0 had meant the model's
    own context, and a 0-byte body limit answered every request 413)."""
    from vicunaflow.chat import chat
    from vicunaflow.loading import ModelOptions
    from vicunaflow.serve import serve

    monkeypatch.setattr(ModelOptions, "load", lambda self, path, **kw: pytest.fail(f"{path} loaded"))
    options = ModelOptions(device="cpu")
    with pytest.raises(VicunaflowError, match=message):
        serve(model_path=tiny_vicuna, port=free_port(), model_options=options, **{option: value})
    if option == "max_context":
        with pytest.raises(VicunaflowError, match=message):
            chat(model_path=tiny_vicuna, model_options=options, max_context=value)


def test_a_context_above_the_models_is_cut_with_a_warning(loaded, caplog):
    from vicunaflow.engine import context_length

    model, _ = loaded
    limit = model.args.max_position_embeddings
    assert context_length(model, 100) == 100 and not caplog.records
    with caplog.at_level(logging.WARNING):
        assert context_length(model, limit + 1) == limit
    assert f"at most {limit} tokens" in caplog.text


def test_two_models_need_two_names(tiny_vicuna, tmp_path):
    paths = ["--model-path", str(tiny_vicuna), "--model-path", str(tiny_vicuna)]
    result = serve_refused(*paths, "--port", str(free_port()))
    assert result.returncode == 1 and "give each a --model-name" in result.stderr, result.stderr
    result = serve_refused(*paths, "--model-name", "only-one", "--port", str(free_port()))
    assert result.returncode == 1 and "1 --model-name for 2 --model-path" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("field", "value"),
    [("presence_penalty", 0.5), ("frequency_penalty", -1.0), ("repetition_penalty", 1.2), ("logit_bias", {"50": 100}),
     ("response_format", {"type": "json_object"}), ("tools", [{"type": "function", "function": {"name": "f"}}]),
     ("tool_choice", "required"), ("functions", [{"name": "f"}]), ("stop_token_ids", [13]), ("min_p", 0.1),
     ("use_beam_search", True), ("best_of", 3), ("suffix", " the end")],
)  # fmt: skip
def test_fields_that_would_change_the_answer_are_refused_naming_them(field, value):
    """OpenAI's and vLLM's fields this server does not implement were accepted and ignored: a client asking for
    JSON, tools, a penalty or a bias got a reply made without them, unsaid. A value that changes the answer is a
    400 naming the field; the neutral values clients send by default (0, 1, {}, [], text, null) are accepted."""
    from vicunaflow.serve.app import _validate
    from vicunaflow.serve.errors import APIError
    from vicunaflow.serve.protocol import ChatCompletionRequest, CompletionRequest

    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    completion = {"model": "m", "prompt": "hi"}
    for model, body in ((ChatCompletionRequest, chat), (CompletionRequest, completion)):
        with pytest.raises(APIError) as err:
            _validate(model, json.dumps(body | {field: value}).encode())
        assert err.value.status == 400 and err.value.param == field, (model.__name__, err.value.message)
        assert "not supported" in err.value.message
    neutral = {"presence_penalty": 0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "logit_bias": {},
               "response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "functions": None,
               "stop_token_ids": [], "min_p": 0, "use_beam_search": False, "best_of": 1, "suffix": "",
               "user": "u-1", "parallel_tool_calls": True}  # fmt: skip
    for model, body in ((ChatCompletionRequest, chat), (CompletionRequest, completion)):
        _validate(model, json.dumps(body | neutral).encode())


def test_a_model_path_that_is_no_model_is_refused_before_any_loads(tiny_vicuna, tiny_delta, tmp_path, monkeypatch):
    """A raw Meta (pyllama) folder got "cannot read config.json ([Errno 2] ...)" from the fit check instead of
    what it is and how to convert it; a delta given as the second --model-path was refused only after the first
    model had loaded (minutes for a 13B). Every --model-path is checked before any weight is read."""
    from vicunaflow.loading import ModelOptions
    from vicunaflow.serve import serve

    monkeypatch.setattr(ModelOptions, "load", lambda self, path, **kw: pytest.fail(f"{path} loaded"))
    options = ModelOptions(device="cpu")
    pyllama = tmp_path / "llama-7b"
    pyllama.mkdir()
    (pyllama / "params.json").write_text("{}")
    (pyllama / "consolidated.00.pth").write_bytes(b"")
    with pytest.raises(VicunaflowError, match=r"a raw Meta checkpoint .*\(vicunaflow convert"):
        serve(model_path=[tiny_vicuna, pyllama], port=free_port(), model_options=options)
    with pytest.raises(VicunaflowError, match=r"a Vicuna delta .*apply-delta"):
        serve(model_path=[tiny_vicuna, tiny_delta], port=free_port(), model_options=options)


@pytest.mark.parametrize("text", ["[1, 2]", "7", '"llama"', "null"])
def test_a_config_json_that_is_not_an_object_is_refused_naming_it(tiny_vicuna, tmp_path, monkeypatch, text):
    """Valid JSON but not an object (a list, a number) was an AttributeError traceback from the fit check."""
    from vicunaflow.loading import ModelOptions
    from vicunaflow.serve import serve

    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text(text)
    with pytest.raises(VicunaflowError) as err:
        estimate(folder, name="broken", device="cpu")
    assert f"{folder / 'config.json'}: not a JSON object" in str(err.value)
    assert "restore the model's config.json" in str(err.value)
    monkeypatch.setattr(ModelOptions, "load", lambda self, path, **kw: pytest.fail(f"{path} loaded"))
    with pytest.raises(VicunaflowError, match="not a JSON object"):
        serve(model_path=[tiny_vicuna, folder], port=free_port(), model_options=ModelOptions(device="cpu"))


def test_a_config_json_without_a_key_the_estimate_needs_is_refused_naming_it(tiny_vicuna, tmp_path):
    config = json.loads((tiny_vicuna / "config.json").read_text())
    del config["num_hidden_layers"]
    folder = tmp_path / "no-layers"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(VicunaflowError) as err:
        estimate(folder, name="no-layers", device="cpu")
    message = str(err.value)
    assert str(folder / "config.json") in message and "num_hidden_layers is None" in message, message


def test_max_gpu_memory_caps_the_weights_of_all_models_together():
    """docs/serve.md: --max-gpu-memory caps a GPU's share of the weights (FastChat's meaning: weights only, the KV
    cache is --kv-cache-tokens'). Two models share the GPU, so their weights count together; each was checked alone."""
    from vicunaflow.serve.fit import check_memory_cap

    gib = 2**30
    models = [Estimate("a", 12 * gib, 10 * gib), Estimate("b", 12 * gib, 10 * gib)]
    with pytest.raises(VicunaflowError) as err:
        check_memory_cap(models, "20GiB")
    message = str(err.value)
    assert message.startswith("--max-gpu-memory 20GiB: the 2 models' weights need 24.0 GiB per GPU together"), message
    assert "a 12.0 GiB, b 12.0 GiB" in message and "one server per model" in message, message
    check_memory_cap(models, "24GiB")  # 44 GiB with the KV cache: not the cap's (the fit check counts it)
    check_memory_cap(models[:1], "12GiB")
    with pytest.raises(VicunaflowError, match=r"the weights need 12\.0 GiB per GPU"):  # as chat says it
        check_memory_cap(models[:1], "11GiB")
    with pytest.raises(VicunaflowError, match="give a size such as 20GiB"):
        check_memory_cap(models, "lots")


def test_max_gpu_memory_with_two_models_is_checked_before_either_loads(tiny_vicuna, tiny_hf, monkeypatch):
    from vicunaflow.engine.load import check_weights_cap
    from vicunaflow.loading import ModelOptions
    from vicunaflow.serve import serve

    weights = [estimate(p, name="m", device="cpu").weights for p in (tiny_vicuna, tiny_hf)]
    cap = f"{max(weights) * 3 // 2}B"  # each model's weights fit alone, not both
    for w in weights:
        check_weights_cap(w, cap)  # what load_model checks, one model at a time
    monkeypatch.setattr(ModelOptions, "load", lambda self, path, **kw: pytest.fail(f"{path} loaded"))
    options = ModelOptions(device="cpu", max_gpu_memory=cap)
    with pytest.raises(VicunaflowError, match=r"the 2 models' weights need .* together") as err:
        serve(model_path=[tiny_vicuna, tiny_hf], port=free_port(), model_options=options)
    assert "vicuna-tiny-all-v1.1" in str(err.value) and "llama-tiny-hf" in str(err.value)

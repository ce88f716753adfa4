"""Shared session fixtures: the tiny chain built once through the real verbs.

    tiny_raw     pyllama_data/tiny (Meta layout, 2 shards, its tokenizer.model inside)
    tiny_hf      llama-tiny-hf            (vicunaflow convert)
    tiny_delta   vicuna-tiny-delta-v1.1   (vicunaflow synth delta: lmsys's .bin layout)
    tiny_vicuna  vicuna-tiny-all-v1.1     (vicunaflow apply-delta)

They live under one session tmp dir and are shared by every test: treat them as read-only
(copy with shutil.copytree before changing anything).

    loaded       load_model(tiny_vicuna): (model, tokenizer), once per test module
    hf_model     transformers' float32 LlamaForCausalLM of tiny_vicuna (the reference), once per module
    fake_hub     starts Hugging Face Hub stand-ins (tests/fake_hub.py) on 127.0.0.1
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_configure(config):
    """Under pytest-xdist, each worker's torch (and the servers and tools it starts) takes its share of the cores,
    at least 2, unless OMP_NUM_THREADS is set: by default each takes every core. Where the share is every core (the
    2-core CI machine: 2 workers of 2 threads) nothing is set; on a 16-core GPU machine 16 workers of 16 threads ran
    test_generate's CPU references past their 200 s timeouts, where 8 workers of 2 threads passed them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    threads = max(2, cores // workers)
    if workers > 1 and threads < cores and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(threads)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-chain")


@pytest.fixture(scope="session")
def tiny_raw(tiny_root) -> Path:
    from vicunaflow.synth import synth_llama

    return synth_llama(folder=tiny_root / "pyllama_data", model_size="tiny")


@pytest.fixture(scope="session")
def tiny_hf(tiny_root, tiny_raw) -> Path:
    from vicunaflow.convert import convert

    return convert(input_dir=tiny_raw, output_dir=tiny_root / "llama-tiny-hf")


@pytest.fixture(scope="session")
def tiny_delta(tiny_root, tiny_hf) -> Path:
    from vicunaflow.synth import synth_delta

    return synth_delta(base=tiny_hf, output_dir=tiny_root / "vicuna-tiny-delta-v1.1")


@pytest.fixture(scope="session")
def tiny_vicuna(tiny_root, tiny_hf, tiny_delta) -> Path:
    from vicunaflow.delta import apply_delta

    return apply_delta(base=tiny_hf, delta=tiny_delta, target=tiny_root / "vicuna-tiny-all-v1.1")


@pytest.fixture(scope="session")
def skip_or_fail():
    """Skip an end-to-end test that cannot run here (no root, no chromium); under `make test`
    (VICUNAFLOW_REQUIRE_E2E=1), which installs everything it needs, fail instead: there a missing
    piece is a bug, not a reason to skip."""

    def skip_or_fail(reason: str) -> None:
        if os.environ.get("VICUNAFLOW_REQUIRE_E2E") == "1":
            pytest.fail(reason)
        pytest.skip(reason)

    return skip_or_fail


@pytest.fixture(scope="session")
def tiny_gqa(tiny_root, tiny_vicuna) -> Path:
    """A grouped-query tiny LLaMA (8 query heads, 2 key/value heads), random weights, tiny_vicuna's tokenizer."""
    return _random_llama(tiny_root / "llama-tiny-gqa", tiny_vicuna, heads=8, kv_heads=2, layers=3)


@pytest.fixture(scope="session")
def tiny_gqa_wide_heads(tiny_root, tiny_vicuna) -> Path:
    """A grouped-query tiny LLaMA with heads of 64 dims (4 query heads, 2 key/value heads): a GPU tile fits in a
    head (kernels.rope_fits), so batched decode steps rotate and store keys in q|k|v's epilogue, as a 7B's do; RMSNorm
    weights away from one, so the products' epilogues that scale by them are seen to."""
    return _random_llama(tiny_root / "llama-tiny-gqa-wide-heads", tiny_vicuna, heads=4, kv_heads=2, layers=2, norms=0.2)


def _random_llama(folder: Path, tokenizer_from: Path, *, heads: int, kv_heads: int, layers: int, norms: float = 0.0):
    """A random LLaMA (dim 256, vocab 1024) with tokenizer_from's tokenizer; norms: the RMSNorm weights' spread
    around one (0: ones, as transformers initialises them)."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vicunaflow.tokenizer import TOKENIZER_FILES

    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger than the default init, so replies are not one repeated token
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.08)
            elif norms:
                parameter.normal_(1, norms)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def loaded(tiny_vicuna):
    """The tiny Vicuna on the CPU, on any machine: the tests that take it check the CPU's paths and numbers (float32,
    no kernels); the GPU's have tests of their own, marked gpu, that load it there. (Loaded on a GPU box's CUDA, ten
    of test_engine_serving's and two of test_generate's failed: other grid widths, kernels, sums and devices.)"""
    from vicunaflow.engine import load_model

    return load_model(tiny_vicuna, device="cpu")


@pytest.fixture(scope="module")
def hf_model(tiny_vicuna):
    """transformers' LlamaForCausalLM of the same folder, float32: the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_vicuna, dtype=torch.float32).eval()


@pytest.fixture
def fake_hub():
    """fake_hub(**fields) serves a fake_hub.Hub(**fields) until the test ends and returns it (hub.url)."""
    from fake_hub import Hub, HubHandler, serve  # tests/ is on sys.path

    servers = []

    def start(**fields) -> Hub:
        state = Hub(**fields)
        server = serve(HubHandler, state)
        server.hub = state
        servers.append(server)
        return state

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()

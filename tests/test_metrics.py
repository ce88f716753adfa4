"""GET /metrics (serve/metrics.py) over real engines on the tiny model: what Prometheus reads must be what the
requests did, per model or summed as the blind arena needs, in a format Prometheus' own parser reads."""

from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from vicunaflow.engine import Engine, SamplingParams, load_model
from vicunaflow.engine.latency import Histogram
from vicunaflow.serve.app import create_app

KEY = "metrics-key"


def scrape(client: TestClient, **headers) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of one scrape, checked to be Prometheus' text format."""
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def run(engine: Engine, prompts: list[list[int]], new_tokens: list[int]) -> None:
    """Submit the prompts at once (greedy, ignore_eos: exactly new_tokens each) and wait for their ends."""
    done = threading.Semaphore(0)
    for prompt, n in zip(prompts, new_tokens, strict=True):
        params = SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
        engine.submit(prompt, params, lambda e: e.finish_reason and done.release())
    for _ in prompts:
        assert done.acquire(timeout=120)


@pytest.fixture(scope="module")
def engines(tiny_vicuna):
    model, tokenizer = load_model(tiny_vicuna)
    with (
        Engine(model, tokenizer, max_batch_size=4, max_context=256) as alpha,
        Engine(model, tokenizer, max_batch_size=2, max_context=256) as beta,
    ):
        run(alpha, [[1, 15, 16, 17, 18], [1, 20, 21, 22, 23, 24, 25], [1, 30, 31]], [4, 6, 8])
        run(beta, [[1, 40, 41]], [3])
        yield {"alpha": alpha, "beta": beta}


def test_counts_are_what_the_requests_did(engines):
    samples = scrape(TestClient(create_app({"alpha": engines["alpha"]})))
    alpha = (("model", "alpha"),)
    assert samples[("vicunaflow_requests_total", alpha)] == 3
    assert samples[("vicunaflow_prompt_tokens_total", alpha)] == 5 + 7 + 3
    assert samples[("vicunaflow_generation_tokens_total", alpha)] == 4 + 6 + 8
    assert samples[("vicunaflow_requests_finished_total", (("model", "alpha"), ("reason", "length")))] == 3
    assert samples[("vicunaflow_requests_running", alpha)] == 0
    assert samples[("vicunaflow_requests_waiting", alpha)] == 0
    assert samples[("vicunaflow_kv_cache_usage_ratio", alpha)] == 0  # every block given back
    assert samples[("vicunaflow_engine_healthy", alpha)] == 1
    # a first token and an end per request; a gap before each later token (3 + 5 + 7)
    assert samples[("vicunaflow_time_to_first_token_seconds_count", alpha)] == 3
    assert samples[("vicunaflow_request_latency_seconds_count", alpha)] == 3
    assert samples[("vicunaflow_inter_token_latency_seconds_count", alpha)] == 15
    steps = samples[("vicunaflow_decode_steps_total", alpha)]
    assert samples[("vicunaflow_decode_batch_rows_count", alpha)] == steps > 0
    # a decode step's GPU time and the idle before it: timed by CUDA events, the histograms empty on the CPU
    timed = steps if engines["alpha"].device.type == "cuda" else 0
    assert samples[("vicunaflow_decode_step_gpu_seconds_count", alpha)] == timed
    assert samples[("vicunaflow_gpu_idle_before_step_seconds_count", alpha)] <= timed
    for name in ("time_to_first_token", "request_latency", "inter_token_latency"):
        buckets = sorted(
            (float(dict(labels)["le"]), value)
            for (sample, labels), value in samples.items()
            if sample == f"vicunaflow_{name}_seconds_bucket"
        )
        counts, total = [value for _, value in buckets], samples[(f"vicunaflow_{name}_seconds_count", alpha)]
        assert counts == sorted(counts) and buckets[-1] == (float("inf"), total)  # cumulative, +Inf last
        assert samples[(f"vicunaflow_{name}_seconds_sum", alpha)] > 0


def test_several_models_are_summed_without_a_key(engines):
    client = TestClient(create_app(engines, api_keys=[KEY]))
    hidden, shown = scrape(client), scrape(client, Authorization=f"Bearer {KEY}")
    assert {dict(labels).get("model") for _, labels in hidden} == {"all"}  # nothing names a model
    assert hidden[("vicunaflow_generation_tokens_total", (("model", "all"),))] == 4 + 6 + 8 + 3
    assert hidden[("vicunaflow_inter_token_latency_seconds_count", (("model", "all"),))] == 15 + 2
    assert hidden[("vicunaflow_kv_cache_blocks", (("model", "all"),))] == sum(
        shown[("vicunaflow_kv_cache_blocks", (("model", name),))] for name in engines
    )
    assert shown[("vicunaflow_requests_total", (("model", "beta"),))] == 1
    assert shown[("vicunaflow_prompt_tokens_total", (("model", "beta"),))] == 3


def test_histogram_buckets_hold_values_up_to_their_bound():
    histogram = Histogram((0.01, 0.1))
    for value in (0.005, 0.01, 0.05, 0.1, 3.0):
        histogram.observe(value)
    snapshot = histogram.snapshot()
    assert snapshot["counts"] == [2, 2, 1] and snapshot["sum"] == pytest.approx(3.165)
    with pytest.raises(ValueError, match="must increase"):
        Histogram((0.1, 0.01))

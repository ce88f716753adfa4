"""GET /metrics: the engines' counters, gauges and latency histograms in Prometheus' text format.

Why: a server under load is watched by a scraper (Prometheus, then Grafana or alerts), as vLLM's /metrics
is; /health's JSON is for people and the pages. Everything is read at scrape time from what each engine
counts anyway (Engine.snapshot_stats, Engine.snapshot_latency): a scrape adds nothing to a request's path.
prometheus_client writes the format (escaping, `_total`, cumulative `le` buckets, `+Inf`).

With several models and no key (the arena is open), a scrape gets the sums over the models under
model="all", as /health gives totals only: one model's counters rising while a side answers would name it.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

PREFIX = "vicunaflow_"
CONTENT_TYPE = CONTENT_TYPE_LATEST
# (name, engine counter, help): monotonic counts from Engine.snapshot_stats
COUNTERS = (
    ("requests", "requests", "Requests submitted to the engine (the server's own warm-up included)."),
    ("prompt_tokens", "prompt_tokens", "Prompt tokens admitted, once per choice (n), not for a preemption's re-read."),
    ("generation_tokens", "generated_tokens", "Tokens generated and handed to requests."),
    ("preemptions", "preempted", "Requests sent back to the queue for want of KV cache blocks."),
    ("decode_steps", "steps", "Decode steps run."),
    ("prefill_forwards", "prefills", "Prefill forwards (chunks of prompts) run."),
)
# (name, histogram in Engine.latency, help)
HISTOGRAMS = (
    ("time_to_first_token_seconds", "time_to_first_token", "From a request's submission to its first token."),
    ("inter_token_latency_seconds", "inter_token", "Between two consecutive tokens of a reply."),
    ("request_latency_seconds", "request", "From a request's submission to its end, whatever the reason."),
    ("decode_step_gpu_seconds", "step_gpu", "A decode step's GPU time, its inputs' copy to its tokens' (CUDA)."),
    ("gpu_idle_before_step_seconds", "gpu_idle", "GPU idle before a decode step since the engine's last work (CUDA)."),
)


def render(engines: Mapping, per_model: bool) -> bytes:
    """The exposition of `engines` (name -> Engine): labelled by model, or summed under model="all"."""
    stats = {name: engine.snapshot_stats() for name, engine in engines.items()}
    latency = {name: engine.snapshot_latency() for name, engine in engines.items()}
    if not per_model:
        stats, latency = {"all": summed_stats(list(stats.values()))}, {"all": summed_latency(list(latency.values()))}
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(stats, latency))
    return generate_latest(registry)


class _Snapshot:
    """A collector over one scrape's numbers (prometheus_client calls `collect` while rendering)."""

    def __init__(self, stats: dict[str, dict], latency: dict[str, dict]):
        self.stats, self.latency = stats, latency

    def collect(self):
        for name, key, text in COUNTERS:
            family = CounterMetricFamily(PREFIX + name, text, labels=["model"])
            for model, s in self.stats.items():
                family.add_metric([model], s[key])
            yield family
        text = "Requests ended, by reason: stop, length, cancelled, error."
        finished = CounterMetricFamily(PREFIX + "requests_finished", text, labels=["model", "reason"])
        for model, s in self.stats.items():
            for reason, count in s["finished"].items():
                finished.add_metric([model, reason], count)
        yield finished
        gauges = (
            ("requests_running", "Requests decoding or being prefilled.", lambda s: s["active"]),
            ("requests_waiting", "Requests queued for a batch row or KV cache blocks.", lambda s: s["waiting"]),
            ("kv_cache_blocks", "Blocks of the paged KV cache.", lambda s: s["kv_blocks"]),
            ("kv_cache_usage_ratio", "Share of the KV cache's blocks in use (0-1).", kv_usage),
            ("engine_healthy", "1 while the engine runs, 0 once an error stopped it.", lambda s: int(not s["failure"])),
        )
        for name, text, value in gauges:
            family = GaugeMetricFamily(PREFIX + name, text, labels=["model"])
            for model, s in self.stats.items():
                family.add_metric([model], value(s))
            yield family
        for name, key, text in HISTOGRAMS:
            family = HistogramMetricFamily(PREFIX + name, text, labels=["model"])
            for model, histograms in self.latency.items():
                h = histograms[key]
                family.add_metric([model], cumulative(h["bounds"], h["counts"]), h["sum"])
            yield family
        rows = HistogramMetricFamily(PREFIX + "decode_batch_rows", "Rows of each decode step.", labels=["model"])
        for model, s in self.stats.items():
            bounds, counts, total = batch_buckets(s["batch_sizes"], s["max_batch_size"])
            rows.add_metric([model], cumulative(bounds, counts), total)
        yield rows


def kv_usage(stats: dict) -> float:
    return 1.0 - stats["kv_blocks_free"] / stats["kv_blocks"] if stats["kv_blocks"] else 0.0


def cumulative(bounds, counts) -> list[tuple[str, int]]:
    """Per-bucket counts -> Prometheus' cumulative ("le", count) pairs, +Inf last."""
    pairs, running = [], 0
    for bound, count in zip([*map(float, bounds), float("inf")], counts, strict=True):
        running += count
        pairs.append(("+Inf" if bound == float("inf") else repr(bound), running))
    return pairs


def batch_buckets(batch_sizes: Mapping, max_batch_size: int) -> tuple[list[int], list[int], int]:
    """Decode steps by rows (Engine.batch_sizes) in buckets of powers of two up to max_batch_size."""
    bounds = sorted({min(2**i, max_batch_size) for i in range(max_batch_size.bit_length() + 1)})
    counts = [0] * (len(bounds) + 1)
    for rows, steps in batch_sizes.items():
        counts[next((i for i, b in enumerate(bounds) if int(rows) <= b), len(bounds))] += steps
    return bounds, counts, sum(int(rows) * steps for rows, steps in batch_sizes.items())


def summed_stats(all_stats: list[dict]) -> dict:
    """The engines' stats added up (what /metrics shows without per-model labels)."""
    total = {key: sum(s[key] for s in all_stats) for _, key, _ in COUNTERS}
    total |= {key: sum(s[key] for s in all_stats) for key in ("active", "waiting", "kv_blocks", "kv_blocks_free")}
    total["failure"] = next((s["failure"] for s in all_stats if s["failure"]), None)
    total["finished"] = {}
    total["batch_sizes"] = {}
    for s in all_stats:
        for reason, count in s["finished"].items():
            total["finished"][reason] = total["finished"].get(reason, 0) + count
        for rows, steps in s["batch_sizes"].items():
            total["batch_sizes"][rows] = total["batch_sizes"].get(rows, 0) + steps
    total["max_batch_size"] = max(s["max_batch_size"] for s in all_stats)
    return total


def summed_latency(all_latency: list[dict]) -> dict:
    """The engines' histograms added up, bucket by bucket (every engine has the same bounds)."""
    total = {}
    for key, first in all_latency[0].items():
        counts = [sum(column) for column in zip(*(h[key]["counts"] for h in all_latency), strict=True)]
        total[key] = {"bounds": first["bounds"], "counts": counts, "sum": sum(h[key]["sum"] for h in all_latency)}
    return total

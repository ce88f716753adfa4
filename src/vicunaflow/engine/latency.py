"""Latency histograms the engine keeps while it runs: time to first token, the gaps between a reply's tokens,
whole requests, and on CUDA each decode step's GPU time and the GPU's idle time before it. `serve` exposes them at
/metrics (serve/metrics.py).

Why counts in fixed buckets rather than a list of times: recording is one bisect and two additions on the
engine thread, memory stays constant however long the server runs, and a scraper (Prometheus) computes
percentiles over any window from the cumulative counts, as it does for vLLM's histograms.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

# Upper bounds in seconds. Tokens come every few ms on a GPU (4-25 ms for a 7B at 1-256 streams on an
# H200) and every tens of ms on a CPU; first tokens and whole replies take longer. The gaps' buckets are a
# millisecond wide from 4 to 10 ms, where a 7B's batched steps fall: a quantile interpolated inside a bucket
# of 5-7.5 ms says little about steps that all take 6-7.
TIME_TO_FIRST_TOKEN = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
INTER_TOKEN = (0.0025, 0.004, 0.005, 0.006, 0.007, 0.008, 0.009, 0.01, 0.0125, 0.015, 0.02, 0.03, 0.04, 0.05)
INTER_TOKEN += (0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
# A decode step's GPU time (CUDA events around it), and the GPU's idle time before it: zero while the host keeps a
# step queued ahead of the one running (overlap), a host that falls behind shows here first.
STEP_GPU = INTER_TOKEN
GPU_IDLE = (0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
REQUEST = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class Histogram:
    """Counts of observed values by bucket: counts[i] holds values in (bounds[i - 1], bounds[i]], the last
    count those above every bound. Written by one thread (the engine's); a reader copies `snapshot()`, which
    may lag one observation behind in its sum, never in a way that breaks the counts' order."""

    def __init__(self, bounds: Sequence[float]):
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"histogram bounds must increase: {bounds}")
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        """Record `value` (`count` times: the rows of a decode step share its gap)."""
        if count:
            self.counts[bisect.bisect_left(self.bounds, value)] += count
            self.total += value * count

    def snapshot(self) -> dict:
        """{"bounds", "counts" (per bucket, not cumulative), "sum"}: a copy."""
        return {"bounds": self.bounds, "counts": list(self.counts), "sum": self.total}


def engine_histograms() -> dict[str, Histogram]:
    """The histograms an Engine keeps, by name."""
    return {
        "time_to_first_token": Histogram(TIME_TO_FIRST_TOKEN),
        "inter_token": Histogram(INTER_TOKEN),
        "request": Histogram(REQUEST),
        "step_gpu": Histogram(STEP_GPU),
        "gpu_idle": Histogram(GPU_IDLE),
    }

"""bench/bench_serve.py's statistics, fed synthetic stream records (no server): what each number counts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_serve.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_serve", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record(sent: float, times: list[float], tokens: int | None, finish="length", error=None) -> dict:
    return {"sent": sent, "times": times, "finish": finish, "error": error, "chars": len(times), "tokens": tokens}


def test_percentile_interpolates_between_ranks_as_numpy(bench) -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert bench.percentile(values, 50) == 3.0
    assert bench.percentile(values, 0) == 1.0 and bench.percentile(values, 100) == 5.0
    assert bench.percentile(values, 99) == pytest.approx(4.96)  # numpy.percentile([1..5], 99)
    assert bench.percentile([], 99) is None


def test_tokens_come_from_usage_not_events(bench) -> None:
    """Two streams of 4 tokens; one sent a held-back byte piece's text with the next token: 3 events."""
    records = [record(0.0, [1.0, 2.0, 3.0, 4.0], 4), record(0.0, [1.0, 3.0, 4.0], 4)]
    row = bench.summarize(records, reply_tokens=4)
    assert row["tokens"] == 8 and row["events"] == 7 and row["tokens_per_event"] == 1.143
    assert row["wall_s"] == 4.0 and row["tokens_per_s"] == 2.0
    assert row["short_replies"] == 0 and row["tokens_from_usage"] == 2
    # gaps between events, within each stream only (the TTFT is not a gap): 1 1 1 and 2 1
    assert row["gap_n"] == 5 and row["gap_max_ms"] == 2000.0 and row["gap_p50_ms"] == 1000.0
    assert row["gap_mean_ms"] == 1200.0  # 6 s over the 5 gaps
    assert row["ttft_n"] == 2 and row["ttft_p50_ms"] == 1000.0


def test_a_reply_shorter_than_asked_counts_its_own_tokens(bench) -> None:
    row = bench.summarize([record(0.0, [1.0, 2.0], 2), record(0.0, [1.0, 2.0, 3.0, 4.0], 4)], reply_tokens=4)
    assert row["tokens"] == 6 and row["short_replies"] == 1


def test_failed_streams_are_counted_not_dropped(bench) -> None:
    records = [
        record(0.0, [1.0, 2.0], 2),
        record(0.0, [1.0], None, finish=None, error="the stream ended before [DONE]"),
        record(0.0, [], None, finish=None, error="HTTP 503: b''"),
    ]
    row = bench.summarize(records, reply_tokens=2)
    assert row["streams"] == 3 and row["finished"] == 1 and row["failed"] == 2 and row["tokens"] == 2
    assert row["ttft_n"] == 2  # the stream with no first token is not in the TTFT percentiles
    assert "2 of 3 streams failed" in bench.caveats(row)
    assert "p99 of ttft n=2, gap n=1" in bench.caveats(row)


def test_median_of_repeats_is_one_run_and_never_the_better_of_two(bench) -> None:
    runs = [
        {"tokens_per_s": 110.0, "ttft_p99_ms": 9.0},
        {"tokens_per_s": 100.0, "ttft_p99_ms": 50.0},
        {"tokens_per_s": 105.0, "ttft_p99_ms": 20.0},
    ]
    assert bench.median_row(runs, "tokens_per_s") is runs[2]  # its TTFT too, not another run's
    assert bench.median_row(runs[:2], "tokens_per_s") is runs[1]


def test_engine_gaps_from_histogram_difference(bench) -> None:
    before = ({0.01: 10.0, 0.02: 10.0, float("inf"): 10.0}, 0.5)
    after = ({0.01: 110.0, 0.02: 200.0, float("inf"): 210.0}, 3.5)  # 100 under 10 ms, 90 in 10-20 ms, 10 above
    gaps = bench.engine_gaps(before, after)
    assert gaps["engine_gap_p50_ms"] == 10.0  # rank 100 of 200: the first bucket's top
    assert gaps["engine_gap_p99_ms"] == 20.0  # above the largest bound: that bound
    assert gaps["engine_gap_mean_ms"] == 15.0  # 3 s over the 200 gaps between the readings
    assert bench.engine_gaps(after, after)["engine_gap_mean_ms"] is None  # no gaps between them


def test_engine_gpu_means_from_histogram_differences(bench) -> None:
    """The decode steps' GPU time and the idle time before them, each the mean of what its /metrics histogram counted
    between two readings; None where it counted nothing (the CPU)."""
    families = bench.ENGINE_HISTOGRAMS
    empty = {name: ({}, 0.0) for name in families.values()}
    before = empty | {families["step_gpu"]: ({0.01: 4.0, float("inf"): 4.0}, 0.024)}
    after = before | {
        families["step_gpu"]: ({0.01: 104.0, float("inf"): 104.0}, 0.724),  # 100 steps of 7 ms
        families["gpu_idle"]: ({0.0001: 99.0, float("inf"): 99.0}, 0.00099),  # 99 gaps of 10 µs
    }
    assert bench.engine_gpu(before, after) == {"engine_step_gpu_mean_ms": 7.0, "engine_gpu_idle_mean_ms": 0.01}
    assert bench.engine_gpu(empty, empty) == {"engine_step_gpu_mean_ms": None, "engine_gpu_idle_mean_ms": None}


def test_the_aggregate_summary_shows_the_gpus_step_and_idle_times_where_measured(bench, capsys) -> None:
    run = bench.summarize([record(0.0, [0.1, 0.2], 2), record(0.0, [0.1, 0.3], 2)], 2) | {"concurrency": 2}
    bench.print_summary({"model": "m", "aggregate": [run | {"engine_step_gpu_mean_ms": None}]})
    assert "GPU a step" not in capsys.readouterr().out  # the CPU: nothing timed
    timed = run | {"engine_step_gpu_mean_ms": 6.56, "engine_gpu_idle_mean_ms": 0.03}
    bench.print_summary({"model": "m", "aggregate": [timed]})
    out = capsys.readouterr().out
    assert "| 2 streams: tokens/s; TTFT p50/p99 ms; gap p50/p99 ms; GPU a step / idle before it, mean ms |" in out
    assert "; 6.56 / 0.03" in out


def test_the_models_summary_shows_each_models_finished_streams_and_a_failed_start(bench, capsys) -> None:
    run = bench.summarize(
        [record(0.0, [0.1, 0.2], 2) | {"model": "a"}, record(0.0, [0.1], 1, finish=None, error="cut") | {"model": "b"}],
        2,
    )
    run |= {"concurrency": 2, "finished_per_model": {"a": 1, "b": 0}}
    alone = {"alone_prompts": 8, "alone_answered": 7, "alone_same_replies": 6}
    bench.print_summary({"model": "m", "models": {"startup_s": 64.9, "runs": [run], **alone}})
    out = capsys.readouterr().out
    assert "| two models in one server: startup, s | 64.9 |" in out
    assert "prompts sent alone, the same greedy reply from both | 6 of 8 (7 answered by both)" in out
    assert "2 streams over both" in out and "a 1, b 0 of 2" in out and "1 of 2 streams failed" in out
    bench.print_summary({"model": "m", "models": {"error": "the model(s) do not fit", "runs": []}})
    assert "failed to start" in capsys.readouterr().out

"""bench/quant_quality.py: its CPU smoke mode runs, and its conversations are real text, split the same way each time."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "quant_quality.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("quant_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_logits_smoke_on_a_tiny_random_model(tmp_path: Path) -> None:
    """`--shape tiny --device cpu`: float32 reference, int8 closer to it than int4, both paths measured."""
    output = tmp_path / "tiny.json"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    command = [sys.executable, str(SCRIPT), "--shape", "tiny", "--device", "cpu", "--prompts", "2", "--length", "12"]
    result = subprocess.run([*command, "--output", str(output)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads(output.read_text())
    assert written["reference"] == "float32 engine" and written["shape"]["dim"] == 256
    rows = written["variants"]
    assert list(rows) == ["float32", "int8", "int4", "kv-fp8"]
    assert rows["kv-fp8"]["kv_cache_dtype"] == "fp8" and rows["kv-fp8"]["weight_gib"] == rows["float32"]["weight_gib"]
    assert 0 < rows["kv-fp8"]["decode"]["mean_relative_error"] < 1  # the float8 cache's rounding shows, and is small
    assert rows["float32"]["decode_vs_prefill"]["max_relative_error"] < 1e-4  # the two paths agree in float32
    for path in ("decode", "prefill"):
        int8, int4 = rows["int8"][path], rows["int4"][path]
        assert 0 < int8["mean_relative_error"] < int4["mean_relative_error"] < 1
        assert 0 <= int4["greedy_agreement"] <= int8["greedy_agreement"] <= 1
        assert int8["max_abs_error"] > 0 and int8["mean_kl"] >= 0
    assert rows["int8"]["weight_gib"] < rows["float32"]["weight_gib"]


def test_conversations_are_stdlib_docs_with_a_fixed_held_out_tenth() -> None:
    bench = load_bench()
    records = bench.stdlib_conversations()
    train, held_out = bench.split(records)
    assert len(records) > 1000 and 0.05 < len(held_out) / len(records) < 0.15
    assert not {r["id"] for r in train} & {r["id"] for r in held_out}
    assert " at 0x" not in json.dumps(records)  # no object addresses: the same text in every process
    assert bench.split(records) == (train, held_out)
    by_id = {r["id"]: r for r in records}
    question, answer = (turn["value"] for turn in by_id["json.dumps"]["conversations"])
    assert question == "What does `json.dumps` do?" and "JSON" in answer and answer.startswith("`dumps(obj")
    assert all(len(turn["value"]) <= bench.REPLY_CHARS for r in records for turn in r["conversations"][1:])

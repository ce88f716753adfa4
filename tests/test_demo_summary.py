"""scripts/demo_summary.py, what `make demo` prints last: it runs on any state of the working directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "demo_summary.py"


def run(cwd: Path) -> str:
    result = subprocess.run([sys.executable, str(SCRIPT)], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_nothing_built_lists_every_output_as_missing(tmp_path: Path) -> None:
    out = run(tmp_path)
    assert "vicunaflow demo: done" in out and "✗" in out and "✓" not in out
    assert "vicunaflow chat --model-path fine_tuning_output/demo-vicuna-tiny" in out


def test_a_built_demo_shows_the_exchange_and_the_scores(tmp_path: Path) -> None:
    transcript = tmp_path / "results/chat/demo-vicuna-tiny.json"
    transcript.parent.mkdir(parents=True)
    transcript.write_text(json.dumps({"transcripts": [{"prompt": "Who are you?", "reply": "I am Vicuna."}]}))
    summary = tmp_path / "results/eval/summary.tsv"
    summary.parent.mkdir(parents=True)
    summary.write_text("model\tscore\nvicuna-tiny\t-1\n")
    out = run(tmp_path)
    assert "Who are you?" in out and "I am Vicuna." in out
    assert "model=vicuna-tiny" in out and "score=-1" in out

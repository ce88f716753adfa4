"""What `make demo` prints at the end: where the outputs are and what to try next.

A script of the Makefile, not part of the package: it reads the demo's outputs in the working
directory and is nothing a user imports. Run from the repository root: `python scripts/demo_summary.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

OUTPUTS = {
    "pyllama_data/tiny": "raw checkpoint in Meta's layout (2 shards, synthetic)",
    "llama-tiny-hf": "converted Hugging Face base (bit-exact)",
    "vicuna-tiny-delta-v1.1": "delta in the published .bin layout",
    "vicuna-tiny-all-v1.1": "merged Vicuna (base + delta)",
    "fine_tuning_output/demo-vicuna-tiny": "fine-tuned on the built-in conversations",
    "results/chat": "greedy replies of each model to config/chat_prompts.txt",
    "results/eval/summary.tsv": "MT-bench-style scores (built-in questions, self-judged) and loss",
}


def main() -> None:
    console = Console()
    console.rule("vicunaflow demo: done")
    for path, what in OUTPUTS.items():
        mark = "[green]✓[/]" if Path(path).exists() else "[red]✗[/]"
        console.print(f"{mark} [bold]{path}[/]  {what}")
    transcript = Path("results/chat/demo-vicuna-tiny.json")
    if transcript.exists():
        exchange = json.loads(transcript.read_text())["transcripts"][0]
        console.print(f"\n[bold]USER:[/] {exchange['prompt']}\n[bold]ASSISTANT:[/] {exchange['reply']}")
    summary = Path("results/eval/summary.tsv")
    if summary.exists():
        console.print(f"\n[bold]{summary}[/] (a tiny model seldom writes a \\[\\[rating]]: unrated scores are -1)")
        header, *rows = [line.split("\t") for line in summary.read_text().splitlines()]
        for row in rows:
            cells = {k: v for k, v in zip(header, row, strict=True) if v}
            console.print("  " + "  ".join(f"{k}={v}" for k, v in cells.items()))
    console.print(
        "\nNext:\n"
        "  .venv/bin/vicunaflow chat --model-path fine_tuning_output/demo-vicuna-tiny\n"
        "  .venv/bin/vicunaflow serve --model-path fine_tuning_output/demo-vicuna-tiny   # http://127.0.0.1:8000\n"
        "  .venv/bin/snakemake --configfile config/demo.yaml --report report.html\n"
        "  .venv/bin/snakemake -n vicuna-13b-all-v1.1   # the real thing, planned"
    )


if __name__ == "__main__":
    main()

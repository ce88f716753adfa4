"""Report items for a fine-tuning run: the loss curve as SVG and the run's options as a table.

Written as small standalone files because `snakemake --report` embeds what it is given: a model
directory would drag gigabytes of weights into report.html.
"""

from __future__ import annotations

import json
import logging
from html import escape
from pathlib import Path

from vicunaflow import VicunaflowError
from vicunaflow.finetune.config import HYPERPARAMETERS, TRAINER_LOG  # stdlib-only: no torch here
from vicunaflow.outputs import atomic_write_bytes, check_output_files

log = logging.getLogger(__name__)


def finetune_report(*, run_dir: Path, loss_plot: Path, options_table: Path, overwrite: bool = False) -> None:
    """Draw the loss curve and tabulate the options of a finished fine-tuning run.

    Arguments:
        run_dir: a `vicunaflow finetune` output directory (holds trainer_log.jsonl and training_args.json).
        loss_plot: where to write the loss curve (SVG).
        options_table: where to write the run's options (TSV: option, value).
        overwrite: replace output files that exist but are not this verb's unchanged earlier outputs (default: refuse).
    """
    run_dir = Path(run_dir)
    log.info("report finetune: run_dir=%s loss_plot=%s options_table=%s", run_dir, loss_plot, options_table)
    check_output_files(
        {"--loss_plot": loss_plot, "--options_table": options_table}, inputs=[run_dir], overwrite=overwrite
    )
    log_path = run_dir / TRAINER_LOG
    if not log_path.exists():
        raise VicunaflowError(f"{log_path}: missing; is {run_dir} the output of `vicunaflow finetune`?")
    records = [_json(log_path, line, n) for n, line in enumerate(log_path.read_text().splitlines(), 1) if line.strip()]
    points = [(r["step"], r["loss"]) for r in records if isinstance(r, dict) and "loss" in r and "step" in r]
    if not points:
        raise VicunaflowError(f"{log_path}: no loss was logged; set logging_steps to a value below the step count")
    args_path = run_dir / HYPERPARAMETERS
    options = _json(args_path, args_path.read_text()) if args_path.exists() else {}
    if not isinstance(options, dict):
        raise VicunaflowError(f"{args_path}: not a JSON object of options; is {run_dir} a `vicunaflow finetune` run?")
    atomic_write_bytes(loss_plot, loss_svg(points, title=f"training loss: {run_dir.name}").encode())
    rows = ["option\tvalue", *(f"{key}\t{json.dumps(value)}" for key, value in sorted(options.items()))]
    atomic_write_bytes(options_table, ("\n".join(rows) + "\n").encode())
    log.info("loss curve of %d points -> %s; %d options -> %s", len(points), loss_plot, len(options), options_table)


def _json(path: Path, text: str, line: int | None = None):
    try:
        return json.loads(text)
    except ValueError as err:
        where = f"line {line}" if line is not None else "it"
        raise VicunaflowError(f"{path}: {where} is not JSON ({err}); is the run complete?") from None


def loss_svg(points: list[tuple[float, float]], title: str, width: int = 640, height: int = 360) -> str:
    """A plain SVG line chart: no plotting library, so the report step stays light."""
    margin = 50
    steps, losses = zip(*points, strict=True)
    x0, x1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1
    y0, y1 = min(losses), max(losses) if max(losses) > min(losses) else min(losses) + 1

    def x(step: float) -> float:
        return margin + (step - x0) / (x1 - x0) * (width - 2 * margin)

    def y(loss: float) -> float:
        return height - margin - (loss - y0) / (y1 - y0) * (height - 2 * margin)

    polyline = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">\n'
        f'<rect width="100%" height="100%" fill="white"/>\n'
        f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>\n'
        f'<line x1="{margin}" y1="{height - margin}" x2="{width - margin}" y2="{height - margin}" stroke="black"/>\n'
        f'<line x1="{margin}" y1="{margin}" x2="{margin}" y2="{height - margin}" stroke="black"/>\n'
        f'<text x="{width / 2}" y="{height - 15}" text-anchor="middle">step ({x0:g} to {x1:g})</text>\n'
        f'<text x="{margin - 5}" y="{y(y1):.1f}" text-anchor="end">{y1:.3g}</text>\n'
        f'<text x="{margin - 5}" y="{y(y0):.1f}" text-anchor="end">{y0:.3g}</text>\n'
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{polyline}"/>\n'
        "</svg>\n"
    )

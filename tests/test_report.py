from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vicunaflow import VicunaflowError
from vicunaflow.report import finetune_report


def test_loss_curve_and_options_table(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "trainer_log.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 3.0 / s, "learning_rate": 1e-4}) + "\n" for s in range(1, 11))
    )
    (run / "training_args.json").write_text(json.dumps({"learning_rate": 1e-4, "num_train_epochs": 2}))
    finetune_report(run_dir=run, loss_plot=tmp_path / "loss.svg", options_table=tmp_path / "options.tsv")

    svg = ET.fromstring((tmp_path / "loss.svg").read_text())
    points = svg.find("{http://www.w3.org/2000/svg}polyline").get("points").split()
    assert len(points) == 10
    heights = [float(p.split(",")[1]) for p in points]
    assert heights == sorted(heights), "a falling loss is drawn going down (SVG y grows downwards)"
    assert (tmp_path / "options.tsv").read_text().splitlines() == [
        "option\tvalue",
        "learning_rate\t0.0001",
        "num_train_epochs\t2",
    ]


def test_run_without_log_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(VicunaflowError, match=r"trainer_log\.jsonl: missing"):
        finetune_report(run_dir=tmp_path / "run", loss_plot=tmp_path / "a.svg", options_table=tmp_path / "b.tsv")


def test_the_report_is_not_written_into_the_run(tmp_path: Path) -> None:
    """A plot or table path inside the run folder (its trainer_log.jsonl, say) is refused before anything is
    written: the report would replace what it reads."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "trainer_log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(VicunaflowError, match="lies inside the input"):
        finetune_report(run_dir=run, loss_plot=run / "trainer_log.jsonl", options_table=tmp_path / "b.tsv")
    assert (run / "trainer_log.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'
    with pytest.raises(VicunaflowError, match="--loss_plot and --options_table are both"):
        finetune_report(run_dir=run, loss_plot=tmp_path / "same", options_table=tmp_path / "same")

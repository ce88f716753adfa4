"""`vicunaflow eval harness` (eval/harness.py): lm-eval through a `vicunaflow serve` the verb starts and
stops, offline on the tiny model with local jsonl tasks; its summary column and its workflow rule."""

from __future__ import annotations

import inspect
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vicunaflow import VicunaflowError
from vicunaflow.eval.harness import harness
from vicunaflow.outputs import provenance_sidecar

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 256
SERVING = re.compile(r"serving .* \(pid (\d+)\)")


def harness_command(model: Path, tasks_dir: Path, output: Path, *tasks: str) -> list[str]:
    return [
        sys.executable, "-m", "vicunaflow", "eval", "harness", "--model-path", str(model),
        "--tasks", *tasks, "--include-path", str(tasks_dir), "--output", str(output),
        "--max-context", str(CONTEXT), "--max-batch-size", "4", "--num-concurrent", "2", "--device", "cpu",
    ]  # fmt: skip


def offline_env(tmp_path: Path) -> dict[str, str]:
    from lm_eval_tasks import OFFLINE  # tests/ is on sys.path

    return {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf")}


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_harness_runs_a_local_task_through_the_served_model_and_stops_it(tiny_vicuna: Path, tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    from lm_eval_tasks import MC_ITEMS, write_tasks

    tasks_dir = write_tasks(tmp_path / "tasks")
    output = tmp_path / "results" / "lm_eval-mini.json"
    completed = subprocess.run(
        [*harness_command(tiny_vicuna, tasks_dir, output, "vf_mc"), "--suite", "mini"],
        env=offline_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    (pid,) = map(int, SERVING.findall(completed.stderr))
    assert gone(pid), "the server outlived the verb"
    record = json.loads(output.read_text())
    accuracy = record["results"]["vf_mc"]["acc,none"]
    assert 0 <= accuracy <= 1 and accuracy * len(MC_ITEMS) == pytest.approx(round(accuracy * len(MC_ITEMS)))
    assert record["main"] == {"task": "vf_mc", "metric": "acc,none", "value": accuracy}
    assert record["model"] == tiny_vicuna.name and record["suite"] == "mini" and record["tasks"] == ["vf_mc"]
    assert record["n-samples"]["vf_mc"]["effective"] == len(MC_ITEMS)
    assert record["config"]["model_args"]["max_length"] == CONTEXT
    assert "base_url" not in json.dumps(record["config"])  # a fresh port each run: not recorded
    assert not {"date", "pretty_env_info", "total_evaluation_time_seconds"} & set(record)
    assert record["versions_of_tools"]["lm_eval"] == "0.4.13"
    # no temporary left: the output and its provenance record (outputs.provenance_sidecar)
    assert sorted(p.name for p in output.parent.iterdir()) == sorted([output.name, provenance_sidecar(output).name])

    from vicunaflow.eval.summary import summary

    tsv = tmp_path / "summary.tsv"
    summary(questions=REPO / "src/vicunaflow/assets/mt_bench_builtin_questions.jsonl", output=tsv, harness=[output])
    header, row = (line.split("\t") for line in tsv.read_text().splitlines())
    assert dict(zip(header, row, strict=True))["lm_eval_mini"] == f"{accuracy:.4f}"


def test_sigterm_stops_the_server(tiny_vicuna: Path, tmp_path: Path) -> None:
    """Snakemake and SLURM cancel a job with SIGTERM: the verb stops its server and exits 143, writing nothing."""
    pytest.importorskip("lm_eval")
    from lm_eval_tasks import write_tasks

    tasks_dir = write_tasks(tmp_path / "tasks")
    output = tmp_path / "out.json"
    process = subprocess.Popen(
        harness_command(tiny_vicuna, tasks_dir, output, "vf_mc", "vf_gen"),
        env=offline_env(tmp_path),
        stderr=subprocess.PIPE,
        text=True,
    )
    pid, seen = None, []
    for line in process.stderr:
        seen.append(line)
        if match := SERVING.search(line):
            pid = int(match.group(1))
            break
    assert pid is not None, "".join(seen)[-4000:]
    process.send_signal(signal.SIGTERM)
    rest = process.stderr.read()
    assert process.wait(timeout=120) == 143, rest[-4000:]
    assert gone(pid) and not output.exists()


def test_unknown_task_fails_before_the_server_starts(tiny_vicuna: Path, tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    from lm_eval_tasks import write_tasks

    tasks_dir = write_tasks(tmp_path / "tasks")
    with pytest.raises(VicunaflowError, match="no task vf_nope"):
        harness(model_path=tiny_vicuna, tasks=["vf_nope"], include_path=tasks_dir, output=tmp_path / "out.json")


def test_without_lm_eval_the_error_names_the_extra(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    with pytest.raises(VicunaflowError, match=re.escape("pip install 'vicunaflow[eval]'")):
        harness(model_path=tmp_path / "model", tasks=["hellaswag"], output=tmp_path / "out.json")


def test_workflow_plans_a_configured_suite(tmp_path: Path) -> None:
    """Named or through the summary, a suite of config eval.harness is one job per model; none by default
    (test_eval's default-config plan has no eval_harness)."""
    from test_eval import planned_jobs

    suite = {"mini": {"tasks": ["vf_mc"], "include_path": "tasks", "limit": 2}}
    config = tmp_path / "harness.yaml"
    config.write_text(yaml.safe_dump({"eval": {"models": ["vicuna-7b-all-v1.1"], "harness": suite}}))
    for name, target in (
        ("one", "results/eval/vicuna-7b-all-v1.1/lm_eval-mini.json"),
        ("all", "results/eval/summary.tsv"),
    ):
        (tmp_path / name / "tasks").mkdir(parents=True)
        jobs = planned_jobs(tmp_path / name, target, "--configfile", str(config))
        assert jobs["eval_harness"] == 1, (name, jobs)


def test_workflow_defaults_match_the_verb() -> None:
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())["properties"]["eval"]
    harness_schema = schema["properties"]["harness"]
    assert harness_schema["default"] == {}
    fields = harness_schema["additionalProperties"]["properties"]
    parameters = inspect.signature(harness).parameters
    for key in ("include_path", "limit", "num_fewshot", "num_concurrent"):
        assert fields[key]["default"] == parameters[key].default, key
        assert f'"{key}": {parameters[key].default}' in (REPO / "workflow/rules/eval_common.smk").read_text()
    env = yaml.safe_load((REPO / "envs/eval.yaml").read_text())["dependencies"][-1]["pip"][-1]
    assert env.endswith("[serve,eval]")  # the job runs `vicunaflow serve` and lm-eval

"""The Snakemake DAG end to end on the tiny model, in a temporary working directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        [*SNAKEMAKE, "-d", str(workdir), "--cores", "2", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def planned_jobs(workdir: Path, *args: str) -> dict[str, int]:
    """Rule name -> job count of a dry run (empty when there is nothing to do)."""
    out = snakemake(workdir, *args, "-n", "--quiet", "rules").stdout
    jobs = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("total", "job"):
            jobs[parts[0]] = int(parts[1])
    return jobs


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "config").symlink_to(REPO / "config")
    return tmp_path


def write_config(workdir: Path, name: str, config: dict) -> str:
    path = workdir / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_dry_run_of_13b_plans_the_seed_chain_offline(workdir: Path) -> None:
    started = time.perf_counter()
    jobs = planned_jobs(workdir, "vicuna-13b-all-v1.1")
    assert jobs == {
        "llama_tokenizer": 1,
        "llama_raw_download": 1,
        "convert_llama_to_hf": 1,
        "vicuna_delta_download": 1,
        "apply_delta": 1,
    }
    assert time.perf_counter() - started < 30
    assert not (workdir / "pyllama_data").exists()


def test_pre_converted_base_skips_conversion(workdir: Path) -> None:
    config = write_config(workdir, "hf.yaml", {"llama": {"sources": {"13b": "hf"}}})
    jobs = planned_jobs(workdir, "vicuna-13b-all-v1.1", "--configfile", config)
    assert jobs == {"llama_hf_download": 1, "vicuna_delta_download": 1, "apply_delta": 1}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"convert": {"dtpye": "keep"}}, "dtpye"),
        ({"convert": {"dtype": "float8"}}, "float8"),
        ({"llama": {"sources": {"7b": "ftp"}}}, "ftp"),
        ({"finetune": {"defaults": {"learning_rte": 0.1}}}, "finetune.defaults.learning_rte"),
        ({"finetune": {"defaults": {"learning_rate": -1.0e-4}}}, "['finetune']['defaults']['learning_rate']"),
        ({"finetune": {"defaults": {"max_grad_norm": -1}}}, "['finetune']['defaults']['max_grad_norm']"),
        (
            {"finetune": {"runs": {"a": {"model": "llama-7b-hf", "lora_r": 0}}}},
            "['finetune']['runs']['a']['lora_r']",
        ),
        (
            {
                "finetune": {
                    "runs": {
                        "a": {"model": "llama-7b-hf", "data": "x/train.json"},
                        "b": {"model": "llama-7b-hf", "data": "y/train.jsonl"},
                    }
                }
            },
            "are both named 'train'",
        ),
    ],
)
def test_bad_config_fails_before_any_job_naming_the_key(workdir: Path, config: dict, message: str) -> None:
    result = snakemake(workdir, "-n", "--configfile", write_config(workdir, "bad.yaml", config), check=False)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


def test_a_run_passes_its_resolved_options_as_one_file_and_a_changed_option_reruns_it(workdir: Path) -> None:
    import dataclasses

    from vicunaflow.finetune.config import TrainConfig

    config = {
        "finetune": {
            "defaults": {"learning_rate": 1.0e-4},
            "runs": {"r": {"model": "vicuna-tiny-all-v1.1", "lora_r": 4}},
        }
    }
    args = ["results/finetune/r/options.json", "--configfile", write_config(workdir, "run.yaml", config)]
    snakemake(workdir, *args)
    written = json.loads((workdir / args[0]).read_text())
    defaults = {f.name: getattr(TrainConfig("m", "d", "o"), f.name) for f in dataclasses.fields(TrainConfig)}
    expected = {k: v for k, v in defaults.items() if k not in ("model_path", "data", "output_dir")}
    assert written == {**expected, "checkpoint_dir": None, "learning_rate": 1.0e-4, "lora_r": 4}
    assert planned_jobs(workdir, *args) == {}
    shell = snakemake(workdir, "-n", "-p", "fine_tuning_output/r", *args[1:]).stdout
    assert "vicunaflow finetune --config results/finetune/r/options.json --model-path vicuna-tiny-all-v1.1" in shell

    # The same resolved options written another way: nothing to do. A changed value: the options again.
    config["finetune"]["runs"]["r"]["learning_rate"] = config["finetune"].pop("defaults")["learning_rate"]
    args[2] = write_config(workdir, "run.yaml", config)
    assert planned_jobs(workdir, *args) == {}
    config["finetune"]["runs"]["r"]["lora_r"] = 16
    args[2] = write_config(workdir, "run.yaml", config)
    assert planned_jobs(workdir, *args) == {"finetune_options": 1}


@pytest.mark.e2e
def test_tiny_chain_builds_then_reruns_only_what_changed(workdir: Path) -> None:
    snakemake(workdir, "vicuna-tiny-all-v1.1")
    merged = workdir / "vicuna-tiny-all-v1.1"
    assert (merged / "model.safetensors.index.json").exists()
    assert json.loads((merged / "tokenizer_config.json").read_text())["chat_template"]
    for log in ("logs/convert/tiny.log", "logs/apply_delta/tiny.log", "benchmarks/convert/tiny.tsv"):
        assert (workdir / log).exists(), log

    assert planned_jobs(workdir, "vicuna-tiny-all-v1.1") == {}, "a second run must do nothing"

    changed = write_config(workdir, "f32.yaml", {"convert": {"dtype": "float32"}})
    assert planned_jobs(workdir, "vicuna-tiny-all-v1.1", "--configfile", changed) == {
        "convert_llama_to_hf": 1,
        "vicuna_delta_synthetic": 1,
        "apply_delta": 1,
    }


@pytest.mark.e2e
def test_failed_job_leaves_no_finished_output(workdir: Path) -> None:
    config = write_config(
        workdir, "local.yaml", {"llama": {"sources": {"tiny": "local"}, "local": {"tiny": "missing"}}}
    )
    result = snakemake(workdir, "llama-tiny-hf", "--configfile", config, check=False)
    assert result.returncode != 0
    assert not (workdir / "pyllama_data" / "tiny").exists()
    assert not (workdir / "llama-tiny-hf").exists()


# `conda` for the test below: answers Snakemake's checks, and for `env create` does what conda does with
# an environment file's `pip:` section (conda/env/installers/pip.py): writes it to a requirements file
# beside the file it was given and runs pip from that folder. pip only resolves here (--dry-run);
# installing torch and the rest is conda's and pip's own business.
FAKE_CONDA = """#!{python}
import json, os, subprocess, sys
from pathlib import Path

import yaml

args = sys.argv[1:]
if args == ["--version"]:
    print("conda 24.11.3")
elif args[:2] == ["info", "--json"]:
    print(json.dumps({{"conda_prefix": os.path.dirname(os.path.dirname(sys.argv[0])), "platform": "linux-64"}}))
elif args[:2] == ["config", "--get"]:
    print(json.dumps({{"get": {{"channel_priority": "strict"}}}}))
elif args[0] == "clean":  # after each env: nothing downloaded, nothing to clean
    pass
elif args[:2] == ["env", "create"]:
    env_file = Path(args[args.index("--file") + 1]).resolve()
    prefix = args[args.index("--prefix") + 1]
    dependencies = yaml.safe_load(env_file.read_text())["dependencies"]
    pip_specs = next(d["pip"] for d in dependencies if isinstance(d, dict))
    requirements = env_file.parent / "condaenv.test.requirements.txt"
    requirements.write_text("\\n".join(pip_specs))
    report = prefix + ".pip-report.json"
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--quiet", "--report", report]
    sys.exit(subprocess.run([*pip, "-r", requirements.name], cwd=env_file.parent).returncode)
else:
    sys.exit(f"fake conda: {{args}} not expected")
"""


@pytest.mark.e2e
def test_conda_envs_install_this_checkout_from_where_snakemake_puts_them(
    workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--use-conda` creates each env from a copy in .snakemake/conda/: its pip line must still find us."""
    fake = tmp_path / "fake-conda" / "bin" / "conda"
    fake.parent.mkdir(parents=True)
    fake.write_text(FAKE_CONDA.format(python=sys.executable))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    target = "results/chat/base-vicuna-13b-all-v1.1-dummy.json"  # download, convert, finetune, serve
    snakemake(workdir, "--use-conda", "--conda-create-envs-only", target)
    extras = []
    for report in (workdir / ".snakemake" / "conda").glob("*.pip-report.json"):
        installs = json.loads(report.read_text())["install"]
        (ours,) = [item for item in installs if item["metadata"]["name"] == "vicunaflow"]
        assert ours["download_info"]["url"] == REPO.as_uri()
        extras.append(ours.get("requested_extras", []))
    assert sorted(extras) == [[], [], ["serve"], ["train"]]

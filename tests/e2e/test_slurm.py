"""The workflow through SLURM: resources planned per size, then a real cluster running the tiny chain.

The `slurm` tests start a two-node cluster on this machine (tests/e2e/slurm/start-cluster.sh: munge,
MariaDB + slurmdbd, slurmctld, two slurmd with two fake GPUs each), run Snakemake with
profiles/slurm, read sacct, and stop every daemon by its PID. They need root; without it, or
without the Slurm packages and a way to install them, they skip.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "tests" / "e2e" / "slurm"
SNAKEMAKE = [
    sys.executable,
    "-m",
    "snakemake",
    "-s",
    str(REPO / "Snakefile"),
    "--profile",
    str(REPO / "profiles/slurm"),
]
# Every wait is bounded: Snakemake gets SIGINT (it ignores TERM while polling), then KILL 30 s later.
RUN_LIMIT_S = 900
# A short fine-tune: enough steps to checkpoint and write a model, nothing more.
QUICK_RUN = {
    "model": "vicuna-tiny-all-v1.1",
    "data": "builtin",
    "model_max_length": 128,
    "max_steps": 4,
    "gradient_accumulation_steps": 1,
    "save_steps": 2,
    "bf16": False,
    "tf32": False,
    "gradient_checkpointing": False,
    "report_to": "none",
}


def write_config(workdir: Path, config: dict) -> Path:
    (workdir / "config").symlink_to(REPO / "config")
    path = workdir / "test-config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def dry_run(workdir: Path, *args: str) -> dict[str, list[dict[str, str]]]:
    """Rule name -> the resources (and shell command) of each job a dry run plans."""
    result = subprocess.run(
        [*SNAKEMAKE, "-d", str(workdir), "-n", "-p", *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    jobs: dict[str, list[dict[str, str]]] = {}
    job: dict[str, str] = {}
    lines = result.stdout.splitlines()
    for index, line in enumerate(lines):
        if match := re.match(r"(?:local)?rule (\w+):$", line):
            job = {}
            jobs.setdefault(match.group(1), []).append(job)
        elif line.startswith("    resources: "):
            job.update(item.split("=", 1) for item in line.removeprefix("    resources: ").split(", "))
        elif line.startswith("Shell command: "):
            job["shell"] = line.removeprefix("Shell command: ")
        elif line == "" and index > 0 and lines[index - 1].startswith("Shell command"):
            job = {}
    return jobs


def test_slurm_profile_plans_13b_offline(tmp_path: Path) -> None:
    """The seed's target through the SLURM profile: planned without a cluster or the internet."""
    started = time.perf_counter()
    jobs = dry_run(tmp_path, "vicuna-13b-all-v1.1", "--configfile", str(write_config(tmp_path, {})))
    assert sorted(jobs) == [
        "apply_delta",
        "convert_llama_to_hf",
        "llama_raw_download",
        "llama_tokenizer",
        "vicuna_delta_download",
    ]
    convert = jobs["convert_llama_to_hf"][0]
    assert convert["mem_mb"] == "12000" and convert["cpus_per_task"] == "4" and convert["runtime"] == "90"
    assert "gpu" not in convert and "slurm_partition" not in convert and "slurm_account" not in convert
    assert time.perf_counter() - started < 60
    assert not (tmp_path / "pyllama_data").exists()


def test_resources_follow_size_cluster_block_and_overrides(tmp_path: Path) -> None:
    config = {
        "cluster": {"partition": "cpu", "gpu_partition": "gpu", "account": "lab", "qos": "normal", "gpu_model": "a100"},
        "resources": {"finetune": {"7b": {"gpu": 2, "runtime": 600}}},
        "vicuna": {"sources": {"33b": "local"}, "local": {"33b": "/nowhere/delta-33b"}},
        "finetune": {
            "runs": {
                "ft-7b": {"model": "vicuna-7b-all-v1.1"},
                "ft-13b": {"model": "vicuna-13b-all-v1.1"},
                "ft-33b": {"model": "llama-33b-hf"},
                "ft-13b-lora": {"model": "vicuna-13b-all-v1.1", "resources": {"gpu": 1}},
            }
        },
    }
    targets = [f"fine_tuning_output/{run}" for run in config["finetune"]["runs"]]
    jobs = dry_run(tmp_path, *targets, "--configfile", str(write_config(tmp_path, config)))
    finetune = {re.search(r"fine_tuning_output/([\w-]+)", job["shell"]).group(1): job for job in jobs["finetune"]}

    # 7B: the config override (2 x 80 GB instead of the table's 4 GPUs) and the run's own time.
    assert (finetune["ft-7b"]["gpu"], finetune["ft-7b"]["runtime"]) == ("2", "600")
    assert "--nproc-per-node 2" in finetune["ft-7b"]["shell"]
    # 13B: the seed's 8 x A100-80G on one node, in the GPU partition, no srun of our own.
    ft13 = finetune["ft-13b"]
    assert (ft13["gpu"], ft13["gpu_model"], ft13["nodes"], ft13["slurm_partition"]) == ("8", "a100", "1", "gpu")
    assert (ft13["slurm_account"], ft13["qos"]) == ("lab", "normal")
    assert "mpi" not in ft13 and not ft13["shell"].startswith("VICUNAFLOW_NODE_TASK")
    # A run's own resources win over its size's.
    assert finetune["ft-13b-lora"]["gpu"] == "1"
    # 33B: two nodes of 8 GPUs, one launcher per node started by srun inside the job.
    ft33 = finetune["ft-33b"]
    assert (ft33["nodes"], ft33["gres"], ft33["tasks"], ft33["mpi"]) == ("2", "gpu:a100:8", "2", "srun")
    assert "gpu" not in ft33 and ft33["slurm_extra"] == "--ntasks-per-node=1"
    assert ft33["shell"].startswith("VICUNAFLOW_NODE_TASK=1 srun --nodes=2 --ntasks-per-node=1")
    assert "--nproc-per-node 8" in ft33["shell"]
    # Conversion is CPU-only: the CPU partition, no GPUs.
    for job in jobs["convert_llama_to_hf"]:
        assert job["slurm_partition"] == "cpu" and "gpu" not in job and "gres" not in job


# ---- a real cluster ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    """A running two-node cluster; yields the environment that reaches it. Stops every daemon."""
    if os.geteuid() != 0:
        pytest.skip("starting SLURM daemons needs root")
    cluster_dir = tmp_path_factory.mktemp("slurm")
    env = {
        **os.environ,
        "VF_SLURM_DIR": str(cluster_dir),
        "VF_SLURM_NODES": "2",
        # Ports apart from the harness defaults, so a developer's own test cluster can keep running.
        "VF_SLURM_PORT_BASE": "16817",
        "VF_SLURM_DB_PORT": "13316",
    }
    try:
        start = subprocess.run(
            [str(HARNESS / "start-cluster.sh")], env=env, capture_output=True, text=True, timeout=600
        )
        if start.returncode == 3:
            pytest.skip(f"no SLURM here: {start.stderr.strip()[-300:]}")
        assert start.returncode == 0, f"start-cluster.sh failed:\n{start.stdout}\n{start.stderr}"
        print(start.stdout)
        pids = {path.name: int(path.read_text()) for path in (cluster_dir / "run").glob("*.pid")}
        assert {"munged.pid", "mariadbd.pid", "slurmdbd.pid", "slurmctld.pid"} <= set(pids), pids
        assert sum(name.startswith("slurmd-") for name in pids) == 2, pids
        env["SLURM_CONF"] = str(cluster_dir / "etc" / "slurm.conf")
        # The srun shim first (see start-cluster.sh), then this interpreter's `vicunaflow` and `snakemake`.
        env["PATH"] = os.pathsep.join([str(cluster_dir / "bin"), str(Path(sys.executable).parent), os.environ["PATH"]])
        yield env
    finally:
        stop = subprocess.run([str(HARNESS / "stop-cluster.sh")], env=env, capture_output=True, text=True, timeout=120)
        print(stop.stdout, stop.stderr)
    alive = [name for name, pid in pids.items() if _alive(pid)]
    assert not alive, f"still running after stop-cluster.sh: {alive}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def run_on_slurm(env: dict, workdir: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    result = subprocess.run(
        ["timeout", "-s", "INT", "-k", "30", str(RUN_LIMIT_S), *SNAKEMAKE, *args,
         # Poll at once, and do not resubmit the failure we cause on purpose.
         "--slurm-init-seconds-before-status-checks", "2", "--retries", "0", "--latency-wait", "5"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=RUN_LIMIT_S + 60,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    assert result.returncode not in (124, 137, -2), f"snakemake ran past {RUN_LIMIT_S} s:\n{result.stderr[-3000:]}"
    return result, elapsed


def sacct_jobs(env: dict, snakemake_output: str) -> dict[str, dict[str, str]]:
    """The SLURM jobs one Snakemake run submitted, as sacct sees them: comment (the executor writes
    rule_<rule>_wildcards_<values> there) -> JobID, State, AllocTRES, NNodes and ExitCode."""
    job_ids = re.findall(r"submitted with SLURM jobid (\d+)", snakemake_output)
    assert job_ids, snakemake_output[-3000:]
    out = subprocess.run(
        ["sacct", "--allocations", "--noheader", "--parsable2", "--jobs", ",".join(job_ids),
         "--format", "JobID,State,AllocTRES,NNodes,ExitCode,Comment"],
        env=env, capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    jobs = {}
    for line in out.splitlines():
        job_id, state, tres, nodes, exit_code, comment = line.split("|")
        jobs[comment] = {"id": job_id, "state": state, "tres": tres, "nodes": nodes, "exit": exit_code}
    return jobs


def gpus(tres: str) -> int:
    match = re.search(r"gres/gpu=(\d+)", tres)
    return int(match.group(1)) if match else 0


@pytest.mark.slurm
def test_tiny_chain_runs_on_slurm_with_the_gpus_it_asked_for(slurm: dict, tmp_path: Path) -> None:
    config = {
        "cluster": {"account": "ci", "partition": "debug"},
        # Each fine-tune runs 2 processes (CPU gloo: the GPUs are fake): on one node with 2 GPUs,
        # and on 2 nodes with 1 GPU each (torchrun per node, rendezvous on the first).
        "resources": {"finetune": {"tiny": {"gpu": 2, "cpus_per_task": 1, "mem_mb": 4000}}},
        "finetune": {
            "runs": {
                "slurm-1node": QUICK_RUN,
                "slurm-2nodes": {**QUICK_RUN, "resources": {"nodes": 2, "gpu": 1, "mem_mb": 3000}},
            }
        },
    }
    config_file = write_config(tmp_path, config)
    targets = ["fine_tuning_output/slurm-1node", "fine_tuning_output/slurm-2nodes"]
    result, elapsed = run_on_slurm(slurm, tmp_path, *targets, "--configfile", str(config_file))
    print(f"tiny chain on SLURM: {elapsed:.0f} s")
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]

    for run in ("slurm-1node", "slurm-2nodes"):
        assert (tmp_path / "fine_tuning_output" / run / "config.json").exists(), run
        log = (tmp_path / "logs" / "finetune" / f"{run}.log").read_text()
        assert "2 processes" in log, log[-2000:]
    two_nodes_log = (tmp_path / "logs" / "finetune" / "slurm-2nodes.log").read_text()
    assert "--node_rank=0" in two_nodes_log and "--node_rank=1" in two_nodes_log

    jobs = sacct_jobs(slurm, result.stdout + result.stderr)
    expected = {  # comment -> (GPUs in AllocTRES, nodes)
        "rule_convert_llama_to_hf_wildcards_tiny": (0, "1"),
        "rule_apply_delta_wildcards_tiny": (0, "1"),
        "rule_tokenize_data_wildcards_vicuna_conversations_vicuna-tiny-all-v1.1_128": (0, "1"),
        "rule_finetune_wildcards_slurm-1node": (2, "1"),
        "rule_finetune_wildcards_slurm-2nodes": (2, "2"),
    }
    for comment, (gpu_count, nodes) in expected.items():
        assert comment in jobs, f"{comment} not in sacct: {sorted(jobs)}"
        job = jobs[comment]
        assert job["state"] == "COMPLETED", (comment, job)
        assert (gpus(job["tres"]), job["nodes"]) == (gpu_count, nodes), (comment, job)


@pytest.mark.slurm
def test_failed_job_is_reported_and_snakemake_exits(slurm: dict, tmp_path: Path) -> None:
    # A raw checkpoint whose shard is not a checkpoint at all: convert fails inside its SLURM job.
    raw = tmp_path / "pyllama_data" / "tiny"
    raw.mkdir(parents=True)
    (raw / "params.json").write_text('{"dim": 256, "n_layers": 4, "n_heads": 8, "norm_eps": 1e-05, "vocab_size": -1}')
    (raw / "consolidated.00.pth").write_bytes(b"not a checkpoint")
    (raw / "tokenizer.model").write_bytes(b"not a tokenizer")
    config_file = write_config(tmp_path, {"cluster": {"account": "ci"}})

    result, elapsed = run_on_slurm(slurm, tmp_path, "llama-tiny-hf", "--configfile", str(config_file))
    print(f"failing job on SLURM: {elapsed:.0f} s")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "Error in rule convert_llama_to_hf" in output, output[-3000:]
    assert re.search(r"SLURM-job '\d+' failed, SLURM status is: 'FAILED'", output), output[-3000:]
    assert not (tmp_path / "llama-tiny-hf").exists()
    job = sacct_jobs(slurm, output)["rule_convert_llama_to_hf_wildcards_tiny"]
    assert job["state"] == "FAILED" and job["exit"] != "0:0", job

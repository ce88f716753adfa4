"""The workflow through SLURM: resources planned per size, then a real cluster running the tiny chain.

The `slurm` test starts a two-node cluster on this machine (tests/e2e/slurm/start-cluster.sh: munge,
MariaDB + slurmdbd, slurmctld, two slurmd with three fake GPUs each), runs Snakemake with
profiles/slurm, reads sacct, and stops every daemon by its PID. It needs root; without it, or
without the Slurm packages and a way to install them, it skips.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from vicunaflow.sizes import RESOURCES, SIZES, Resources

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


def test_resource_table_covers_every_step_size_and_config_field() -> None:
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    assert set(schema["properties"]["resources"]["properties"]) == set(RESOURCES)
    fields = set(schema["definitions"]["job_resources"]["properties"])
    assert fields == {field.name for field in dataclasses.fields(Resources)}
    for step, by_size in RESOURCES.items():
        assert set(by_size) == set(SIZES), step
    for step in ("download", "convert", "apply_delta", "tokenize_data"):
        assert all(res.gpu == 0 and res.nodes == 1 for res in RESOURCES[step].values()), step
    # The seed's guidance: 13B on one node of 8 GPUs; 33B and 65B on several nodes.
    assert (RESOURCES["finetune"]["13b"].gpu, RESOURCES["finetune"]["13b"].nodes) == (8, 1)
    assert RESOURCES["finetune"]["33b"].nodes > 1 and RESOURCES["finetune"]["65b"].nodes > 1


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
    assert "mpi" not in ft13 and "srun" not in ft13["shell"]
    # A run's own resources win over its size's.
    assert finetune["ft-13b-lora"]["gpu"] == "1" and "--resources" not in finetune["ft-13b-lora"]["shell"]
    # 33B: two nodes of 8 GPUs, one launcher per node started by srun inside the job.
    ft33 = finetune["ft-33b"]
    assert (ft33["nodes"], ft33["gres"], ft33["tasks"], ft33["mpi"]) == ("2", "gpu:a100:8", "2", "srun")
    assert "gpu" not in ft33 and ft33["slurm_extra"] == "--ntasks-per-node=1"
    assert ft33["shell"].startswith("srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --cpus-per-task=64")
    assert "--export=ALL,VICUNAFLOW_NODE_TASK=1 vicunaflow finetune" in ft33["shell"]
    assert "--nproc-per-node 8" in ft33["shell"]
    # Conversion is CPU-only: the CPU partition, no GPUs.
    for job in jobs["convert_llama_to_hf"]:
        assert job["slurm_partition"] == "cpu" and "gpu" not in job and "gres" not in job


# ---- a real cluster ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory, skip_or_fail):
    """A running two-node cluster; yields the environment that reaches it. Stops every daemon."""
    if os.geteuid() != 0:
        skip_or_fail("starting SLURM daemons needs root")
    cluster_dir = tmp_path_factory.mktemp("slurm")
    env = {
        **os.environ,
        "VF_SLURM_DIR": str(cluster_dir),
        "VF_SLURM_NODES": "2",
        "VF_SLURM_GPUS": "3",  # room for both test fine-tunes at once (2 GPUs + 1 per node)
        # Free ports, so a developer's own cluster or another test run can keep running.
        "VF_SLURM_PORT_BASE": str(port_base := free_port_base()),
        "VF_SLURM_DB_PORT": str(port_base + 20),
    }
    try:
        start = subprocess.run(
            [str(HARNESS / "start-cluster.sh")], env=env, capture_output=True, text=True, timeout=600
        )
        if start.returncode == 3:
            skip_or_fail(f"no SLURM here: {start.stderr.strip()[-300:]}")
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


def free_port_base() -> int:
    """A port P with P (slurmctld), P+2 (slurmdbd), P+10, P+11 (slurmd) and P+20 (MariaDB) all free."""
    for base in range(16800, 30000, 50):
        try:
            for offset in (0, 2, 10, 11, 20):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", base + offset))
        except OSError:
            continue
        return base
    raise RuntimeError("no free ports for a test cluster")


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
         # Poll soon, and do not resubmit the failure caused on purpose.
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
@pytest.mark.timeout(RUN_LIMIT_S + 300)  # + starting the cluster (and installing Slurm, once)
def test_tiny_chain_on_slurm_gets_its_gpus_and_reports_a_failed_job(slurm: dict, tmp_path: Path) -> None:
    """One Snakemake run (--keep-going) of the tiny chain: convert, merge, tokenize, and two
    2-process fine-tunes (CPU gloo: the GPUs are fake), one on a node with 2 GPUs and one across
    2 nodes with 1 GPU each (torchrun per node, rendezvous on the first). One more run's data is
    broken on purpose: its tokenize job fails inside SLURM, and Snakemake must say so and exit."""
    (tmp_path / "broken.json").write_text(
        '[{"id": "bad-1", "conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]}]'
    )
    config = {
        "cluster": {"account": "ci", "partition": "debug"},
        "resources": {"finetune": {"tiny": {"gpu": 2, "cpus_per_task": 1, "mem_mb": 4000}}},
        "finetune": {
            "runs": {
                "slurm-1node": QUICK_RUN,
                "slurm-2nodes": {**QUICK_RUN, "resources": {"nodes": 2, "gpu": 1, "mem_mb": 3000}},
                "slurm-broken": {**QUICK_RUN, "data": "broken.json"},
            }
        },
    }
    config_file = write_config(tmp_path, config)
    targets = [f"fine_tuning_output/{run}" for run in config["finetune"]["runs"]]
    result, elapsed = run_on_slurm(slurm, tmp_path, *targets, "--configfile", str(config_file), "--keep-going")
    print(f"tiny chain on SLURM: {elapsed:.0f} s")
    output = result.stdout + result.stderr

    # The failure: reported with SLURM's verdict, nothing left behind, and a non-zero exit.
    assert result.returncode != 0, output[-5000:]
    assert "Error in rule tokenize_data" in output, output[-5000:]
    assert re.search(r"SLURM-job '\d+' failed, SLURM status is: 'FAILED'", output), output[-5000:]
    assert "unknown role 'robot'" in output  # --show-failed-logs (the profile) prints the tool's one-line reason
    assert not (tmp_path / "fine_tuning_output" / "slurm-broken").exists()

    # Everything else was built, each fine-tune by 2 processes.
    for run in ("slurm-1node", "slurm-2nodes"):
        assert (tmp_path / "fine_tuning_output" / run / "config.json").exists(), output[-5000:]
        log = (tmp_path / "logs" / "finetune" / f"{run}.log").read_text()
        assert "2 processes" in log, log[-2000:]
    two_nodes_log = (tmp_path / "logs" / "finetune" / "slurm-2nodes.log").read_text()
    assert "--node_rank=0" in two_nodes_log and "--node_rank=1" in two_nodes_log

    # sacct: every job in the state it should be, with the GPUs and nodes it asked for.
    jobs = sacct_jobs(slurm, output)
    expected = {  # comment -> (state, GPUs in AllocTRES, nodes)
        "rule_convert_llama_to_hf_wildcards_tiny": ("COMPLETED", 0, "1"),
        "rule_apply_delta_wildcards_tiny": ("COMPLETED", 0, "1"),
        "rule_tokenize_data_wildcards_builtin_vicuna-tiny-all-v1.1_128": ("COMPLETED", 0, "1"),
        "rule_tokenize_data_wildcards_broken_vicuna-tiny-all-v1.1_128": ("FAILED", 0, "1"),
        "rule_finetune_wildcards_slurm-1node": ("COMPLETED", 2, "1"),
        "rule_finetune_wildcards_slurm-2nodes": ("COMPLETED", 2, "2"),
    }
    assert set(jobs) == set(expected), sorted(jobs)
    for comment, (state, gpu_count, nodes) in expected.items():
        job = jobs[comment]
        assert (job["state"], gpus(job["tres"]), job["nodes"]) == (state, gpu_count, nodes), (comment, job)

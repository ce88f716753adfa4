"""vicunaflow.resources: what each job asks the scheduler for, for every step x size, with and without a cluster block.

The workflow hands these values to Snakemake unchanged (workflow/rules/common.smk), so these tests
plan what `snakemake --profile profiles/slurm -n` shows, without Snakemake; tests/e2e/test_slurm.py
checks one dry run and a real cluster on top.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import yaml

from vicunaflow.resources import (
    MODEL_NAME,
    NAMES,
    job_resources,
    planned,
    processes_per_node,
    scheduler_resources,
    size_of_model,
)
from vicunaflow.sizes import RESOURCES, SIZES, Resources

REPO = Path(__file__).resolve().parents[1]
CLUSTER = {
    "partition": "cpu", "gpu_partition": "gpu", "account": "lab", "qos": "normal", "gpu_model": "a100",
    "slurm_extra": None,
}  # fmt: skip
NO_CLUSTER = {key: None for key in CLUSTER}  # what the schema fills in when config has no `cluster:`
EVERY_JOB = list(itertools.product(RESOURCES, SIZES, ("no cluster", "cluster")))


def asked(resources: dict) -> dict:
    """What a job submits: Snakemake drops the resources that are None."""
    return {name: value for name, value in resources.items() if value is not None}


@pytest.mark.parametrize(("step", "size", "profile"), EVERY_JOB)
def test_every_step_and_size_asks_for_its_table_row(step: str, size: str, profile: str) -> None:
    cluster = CLUSTER if profile == "cluster" else NO_CLUSTER
    row = RESOURCES[step][size]
    job = asked(job_resources(step, size, cluster=cluster))
    assert (job["runtime"], job["mem_mb"], job["cpus_per_task"], job["nodes"]) == (
        row.runtime, row.mem_mb, row.cpus_per_task, row.nodes,
    )  # fmt: skip
    if row.gpu and row.nodes == 1:  # one node: --gpus (what the local profile counts), no srun of ours
        assert job["gpu"] == row.gpu and "gres" not in job and "mpi" not in job and "tasks" not in job
        assert job.get("gpu_model") == cluster["gpu_model"]
    elif row.gpu:  # several nodes: GPUs per node as gres, one task per node, the shell run once
        gpu_type = "a100:" if profile == "cluster" else ""
        assert "gpu" not in job and "gpu_model" not in job
        assert (job["gres"], job["mpi"], job["tasks"], job["tasks_per_gpu"]) == (
            f"gpu:{gpu_type}{row.gpu}", "srun", row.nodes, 0,
        )  # fmt: skip
        assert job["slurm_extra"] == "--ntasks-per-node=1"
    else:
        assert not {"gpu", "gpu_model", "gres", "mpi", "tasks", "tasks_per_gpu", "slurm_extra"} & set(job)
    if profile == "cluster":
        partition = "gpu" if row.gpu else "cpu"
        assert (job["slurm_partition"], job["slurm_account"], job["qos"]) == (partition, "lab", "normal")
    else:  # the cluster's defaults: nothing of ours reaches sbatch
        assert not {"slurm_partition", "slurm_account", "qos"} & set(job)


def test_the_seeds_13b_conversion_on_a_cluster_without_a_cluster_block() -> None:
    assert asked(job_resources("convert", "13b", cluster=NO_CLUSTER)) == {
        "runtime": 90, "mem_mb": 12000, "cpus_per_task": 4, "nodes": 1,
    }  # fmt: skip


def test_config_overrides_then_the_runs_own_resources() -> None:
    overrides = {"finetune": {"7b": {"gpu": 2, "runtime": 600}, "13b": {"runtime": 100}}}
    expected = Resources(runtime=600, mem_mb=64000, cpus_per_task=32, gpu=2)
    assert planned("finetune", "7b", overrides=overrides) == expected
    lora = planned("finetune", "13b", overrides=overrides, run_resources={"gpu": 1})
    assert (lora.gpu, lora.runtime, lora.nodes) == (1, 100, 1)  # the run wins field by field
    assert planned("convert", "7b", overrides=overrides) == RESOURCES["convert"]["7b"]  # other steps untouched
    # A run spread over nodes: per-node GPUs as gres, a100 from the cluster block.
    two_nodes = asked(job_resources("finetune", "7b", run_resources={"nodes": 2, "gpu": 1}, cluster=CLUSTER))
    assert (two_nodes["gres"], two_nodes["tasks"], two_nodes["slurm_partition"]) == ("gpu:a100:1", 2, "gpu")


def test_slurm_extra_of_the_cluster_block_goes_to_every_job() -> None:
    cluster = {**CLUSTER, "slurm_extra": "--exclusive"}
    assert job_resources("convert", "7b", cluster=cluster)["slurm_extra"] == "--exclusive"
    assert job_resources("finetune", "33b", cluster=cluster)["slurm_extra"] == "--ntasks-per-node=1 --exclusive"


def test_gpu_partition_falls_back_to_the_partition() -> None:
    cluster = {**CLUSTER, "gpu_partition": None}
    assert job_resources("finetune", "13b", cluster=cluster)["slurm_partition"] == "cpu"


def test_every_job_declares_the_same_names_in_order() -> None:
    for step, size in itertools.product(RESOURCES, SIZES):
        assert tuple(job_resources(step, size)) == NAMES


@pytest.mark.parametrize(
    ("run_resources", "granted", "processes"),
    [
        (None, {}, 1),  # tiny: CPU
        ({"gpu": 4}, {}, 4),
        ({"gpu": 4}, {"gpu": 1}, 1),  # the local profile capped it: one process per GPU granted
        ({"gpu": 8, "nodes": 2}, {}, 8),  # per node, not in total
    ],
)
def test_processes_per_node_follow_the_gpus_granted(run_resources, granted, processes) -> None:
    job = asked(job_resources("finetune", "tiny", run_resources=run_resources, cluster=CLUSTER))
    assert processes_per_node({**job, **granted}) == processes


def test_size_of_a_model_name_or_a_run() -> None:
    runs = {"ft-13b": {"model": "vicuna-13b-all-v1.1"}, "mine": {"model": "llama-33b-hf"}}
    assert size_of_model("vicuna-13b-all-v1.1") == "13b"
    assert size_of_model("llama-7b-hf") == "7b"
    assert size_of_model("vicuna-65b-all-v1.1-int8") == "65b"
    assert size_of_model("mine", runs) == "33b"
    with pytest.raises(ValueError, match="cannot tell the model size"):
        size_of_model("my-model")


def test_model_names_are_those_the_config_schema_allows() -> None:
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    runs = schema["properties"]["finetune"]["properties"]["runs"]["additionalProperties"]
    pattern = runs["properties"]["model"]["pattern"]
    for size in SIZES:
        for name in (f"vicuna-{size}-all-v1.1", f"llama-{size}-hf"):
            assert re.fullmatch(MODEL_NAME, name) and re.search(pattern, name)
    for name in ("vicuna-7b-all-v1.1-int8", "llama-7b-all-v1.1", "vicuna-7b-all-v1x1", "llama-70b-hf"):
        assert not re.fullmatch(MODEL_NAME, name) and not re.search(pattern, name)
    assert pattern == f"^({MODEL_NAME})$".replace("(?:", "(")


def test_scheduler_resources_needs_no_cluster_block() -> None:
    assert scheduler_resources(RESOURCES["convert"]["tiny"]) == job_resources("convert", "tiny", cluster=NO_CLUSTER)

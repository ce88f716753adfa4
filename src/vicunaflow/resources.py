"""What one workflow job asks the scheduler for: a pure function of (step, size, run, config).

The per-size table is `vicunaflow.sizes.RESOURCES`; config `resources: {step: {size: {field: value}}}`
overrides it field by field, and a fine-tuning run's own `resources:` overrides that. The result is
in the names of snakemake-executor-plugin-slurm, with config `cluster:` (partition, account, qos,
GPU model) folded in, so those are set once in config and never in rules or profiles. The local
executor counts `gpu` against the profile's `resources: gpu=N`. workflow/rules/common.smk hands
each rule these values; nothing here reads Snakemake's state, so tests call it directly.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from vicunaflow.sizes import RESOURCES, SIZES, Resources

# The size inside a model's name: vicuna-13b-all-v1.1, llama-7b-hf, vicuna-7b-all-v1.1-int8 -> 7b.
SIZE_IN_NAME = re.compile(r"(?:^|-)(" + "|".join(SIZES) + r")(?:-|$)")
# Names of the models the workflow builds and fine-tunes from (the config schema's `finetune.runs.*.model`).
MODEL_NAME = r"vicuna-(?:{sizes})-all-v1\.1|llama-(?:{sizes})-hf".format(sizes="|".join(SIZES))

# Every resource a rule declares, in this order; a job leaves out those it does not ask for (None).
NAMES = (
    "runtime", "mem_mb", "cpus_per_task", "nodes", "gpu", "gpu_model", "gres", "mpi", "tasks", "tasks_per_gpu",
    "slurm_extra", "slurm_partition", "slurm_account", "qos",
)  # fmt: skip
NO_CLUSTER = {"partition": None, "gpu_partition": None, "account": None, "qos": None, "gpu_model": None}


def size_of_model(name: str, runs: Mapping[str, Mapping] | None = None) -> str:
    """The size of a model named in a target: vicuna-13b-all-v1.1, llama-7b-hf, or a fine-tuning run (its model's)."""
    run = (runs or {}).get(name)
    match = SIZE_IN_NAME.search(run["model"] if run else name)
    if match is None:
        raise ValueError(f"{name}: cannot tell the model size from this name; name models like llama-7b-hf")
    return match.group(1)


def planned(
    step: str,
    size: str,
    *,
    overrides: Mapping[str, Mapping[str, Mapping]] | None = None,
    run_resources: Mapping | None = None,
) -> Resources:
    """RESOURCES[step][size], then config `resources` (overrides[step][size]), then the run's own `resources`."""
    fields = dict((overrides or {}).get(step, {}).get(size, {}))
    fields.update(run_resources or {})
    return dataclasses.replace(RESOURCES[step][size], **fields)


def scheduler_resources(res: Resources, cluster: Mapping | None = None) -> dict[str, object]:
    """One job's resources as SLURM executor resources, with config `cluster:`; None: not asked for."""
    cluster = {**NO_CLUSTER, "slurm_extra": None, **(cluster or {})}
    gpu, multi_node = res.gpu > 0, res.nodes > 1
    gpu_type = f"{cluster['gpu_model']}:" if cluster["gpu_model"] else ""
    extra = ["--ntasks-per-node=1"] if multi_node else []
    resources = {
        "runtime": res.runtime,
        "mem_mb": res.mem_mb,  # per node
        "cpus_per_task": res.cpus_per_task,
        "nodes": res.nodes,
        # One node: `gpu` (sbatch --gpus, and what the local profile counts). Several nodes:
        # --gres, counted per node, where --gpus would be a total SLURM may spread unevenly.
        "gpu": res.gpu if gpu and not multi_node else None,
        "gpu_model": cluster["gpu_model"] if gpu and not multi_node else None,
        "gres": f"gpu:{gpu_type}{res.gpu}" if gpu and multi_node else None,
        # Several nodes: an MPI-style job, whose shell runs once, on the first node, without an
        # srun around it; the rule starts one launcher per node (launch.srun_per_node). tasks_per_gpu=0
        # keeps the plugin from turning `tasks` into --ntasks-per-gpu.
        "mpi": "srun" if multi_node else None,
        "tasks": res.nodes if multi_node else None,
        "tasks_per_gpu": 0 if multi_node else None,
        "slurm_extra": " ".join([*extra, cluster["slurm_extra"] or ""]).strip() or None,
        "slurm_partition": (cluster["gpu_partition"] if gpu else None) or cluster["partition"],
        "slurm_account": cluster["account"],
        "qos": cluster["qos"],
    }
    return resources


def job_resources(
    step: str,
    size: str,
    *,
    overrides: Mapping[str, Mapping[str, Mapping]] | None = None,
    run_resources: Mapping | None = None,
    cluster: Mapping | None = None,
) -> dict[str, object]:
    """What a job of `step` on a model of `size` asks the scheduler for: `planned()` as `scheduler_resources()`."""
    return scheduler_resources(planned(step, size, overrides=overrides, run_resources=run_resources), cluster)


def processes_per_node(granted: Mapping[str, object]) -> int:
    """One process per GPU of a node, from what the job was granted (the local profile may cap `gpu`);
    one process on a machine without GPUs. Several nodes ask per node in `gres` (gpu[:type]:N)."""
    gpus = granted.get("gpu") or 0
    if not gpus and granted.get("gres"):
        gpus = int(str(granted["gres"]).rsplit(":", 1)[1])
    return max(1, int(gpus))

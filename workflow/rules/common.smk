# Shared helpers: config validation, the size table, and input functions.
# Every other rule file only names inputs, outputs and one `vicunaflow` command.

import dataclasses
import inspect
import json
import os
import re
import shlex
from pathlib import Path

from snakemake.utils import validate

from vicunaflow import BUILTIN_CONVERSATIONS
from vicunaflow.finetune import setup as finetune_setup
from vicunaflow.launch import NODE_TASK_ENV
from vicunaflow.sizes import RESOURCES, SIZES

validate(config, schema="../schemas/config.schema.yaml")

# envs/*.yaml install vicunaflow from this checkout; `--use-conda` creates them from copies in
# .snakemake/conda/, so they name the checkout by this variable (pip expands it).
os.environ.setdefault("VICUNAFLOW_ROOT", workflow.basedir)

RAW_DIRS = {
    name: size.raw_dir for name, size in SIZES.items()
}  # 13b -> 13B, 33b -> 30B
RAW_SOURCES = ("pyllama", "meta", "local", "synthetic")
NEVER = (
    "(?!)"  # a wildcard constraint that matches nothing: the rule is off for every size
)


wildcard_constraints:
    size="|".join(SIZES),
    raw="|".join(RAW_DIRS.values()),
    run="|".join(map(re.escape, config["finetune"]["runs"])) or NEVER,


def get_final_output():
    return config["targets"]


def llama_source(size):
    return config["llama"]["sources"].get(size, config["llama"]["source"])


def tokenizer_source():
    """pyllama's shared tokenizer.model comes from Meta when a size uses Meta, else from pyllama."""
    sources = {llama_source(size) for size in SIZES}
    return "meta" if "meta" in sources else "pyllama"


def delta_source(size):
    return config["vicuna"]["sources"].get(size, config["vicuna"]["source"])


def size_of_raw(raw):
    return next(size for size, raw_dir in RAW_DIRS.items() if raw_dir == raw)


def sizes_from(source_of, *sources, raw=False):
    """A wildcard constraint for the sizes whose weights come from one of `sources`."""
    names = [
        RAW_DIRS[size] if raw else size for size in SIZES if source_of(size) in sources
    ]
    return "|".join(names) or NEVER


def get_raw_dir(wildcards):
    return f"pyllama_data/{RAW_DIRS[wildcards.size]}"


def get_convert_tokenizer(wildcards):
    """pyllama and Meta keep one tokenizer.model beside the size folders; the others inside them."""
    if llama_source(wildcards.size) in ("pyllama", "meta"):
        return "pyllama_data/tokenizer.model"
    return []


def get_local_path(section, size):
    path = config[section]["local"].get(size)
    if path is None:
        raise ValueError(
            f"config: {section}.local.{size} is not set; give the directory to link, "
            f"or choose another {section} source for {size}"
        )
    return path


def get_repo(section, key, size):
    repo = config[section][key].get(size)
    if repo is None:
        raise ValueError(
            f"config: {section}.{key}.{size} is not set; name a Hugging Face repository "
            f"or choose another {section} source for {size}"
        )
    return repo


def get_revision_arg(section, size):
    revision = config[section]["revision"].get(size)
    return f"--revision {revision}" if revision else ""


def get_download_args(source):
    """Command-line arguments of `vicunaflow download llama` for the pyllama and meta sources."""
    if source == "meta":
        return f"--source meta --url-env {config['llama']['meta']['url_env']}"
    base_url = config["llama"]["pyllama"]["base_url"]
    return "--source pyllama" + (f" --base-url {base_url}" if base_url else "")


# ---- fine-tuning -----------------------------------------------------------------------------

BUILTIN_DATA = (
    "builtin"  # vicunaflow's own conversation set, shipped inside the package
)


def get_run(wildcards):
    return config["finetune"]["runs"][wildcards.run]


def get_run_options(wildcards):
    """The run's options: `finetune.defaults` overridden by the run's own keys."""
    options = dict(config["finetune"]["defaults"])
    options.update(
        {
            k: v
            for k, v in get_run(wildcards).items()
            if k not in ("model", "data", "resources")
        }
    )
    return options


def dataset_name(data):
    # builtin, or a set prepared by dataprep.smk: named as configured
    if data == BUILTIN_DATA or data in config["datasets"]:
        return data
    return Path(data).name.split(".")[0]


def data_path(data):
    if data == BUILTIN_DATA:
        return str(BUILTIN_CONVERSATIONS)
    return data


def collect_datasets(runs):
    """Dataset name (its file name without suffixes) -> data file, for data/tokenized/{dataset}/.

    Two different files with one name would share a tokenised folder: refuse that up front.
    """
    datasets = {}
    for run, options in runs.items():
        name, path = dataset_name(options["data"]), data_path(options["data"])
        if name in config["datasets"] and options["data"] != name:
            raise ValueError(
                f"config: finetune.runs.{run}.data: {path} has the name of the configured "
                f"dataset {name!r}; rename the file or the dataset"
            )
        if options["data"] in config["datasets"]:
            continue  # prepared by dataprep.smk: data/split/{dataset}/{model}-len{N}.jsonl
        if datasets.setdefault(name, path) != path:
            raise ValueError(
                f"config: finetune.runs.{run}.data: {path} and {datasets[name]} are both named "
                f"{name!r}; rename one of the files"
            )
    return datasets


FINETUNE_PARAMETERS = inspect.signature(finetune_setup).parameters


def check_finetune_options(finetune):
    """Fail before any job on an option `vicunaflow finetune` does not know (a typo'd key)."""
    known = set(FINETUNE_PARAMETERS)
    places = {"finetune.defaults": finetune["defaults"]}
    places |= {
        f"finetune.runs.{run}": options for run, options in finetune["runs"].items()
    }
    for place, options in places.items():
        for key in set(options) - known - {"model", "data", "resources"}:
            raise ValueError(
                f"config: {place}.{key}: not an option of `vicunaflow finetune` "
                "(see `vicunaflow finetune --help`)"
            )


check_finetune_options(config["finetune"])
DATASETS = collect_datasets(config["finetune"]["runs"])
DEFAULT_MODEL_MAX_LENGTH = FINETUNE_PARAMETERS["model_max_length"].default


def get_tokenized_data(wildcards):
    run = get_run(wildcards)
    length = get_run_options(wildcards).get(
        "model_max_length", DEFAULT_MODEL_MAX_LENGTH
    )
    return f"data/tokenized/{dataset_name(run['data'])}/{run['model']}-len{length}"


def get_dataset_file(wildcards):
    if wildcards.dataset in config["datasets"]:
        return f"data/split/{wildcards.dataset}/{wildcards.model}-len{wildcards.length}.jsonl"
    return DATASETS[wildcards.dataset]


def get_finetune_args(wildcards):
    """The run's options as `--name value` flags for `vicunaflow finetune`.

    Values other than strings go as JSON (null, true, [..]), which the CLI parses back exactly.
    """
    return " ".join(
        f"--{name} {shlex.quote(value if isinstance(value, str) else json.dumps(value))}"
        for name, value in get_run_options(wildcards).items()
    )


# ---- chat ------------------------------------------------------------------------------------


def get_chat_model(wildcards):
    """A model named in results/chat/{model}.json: a fine-tuning run or a built model directory."""
    if wildcards.model in config["finetune"]["runs"]:
        return f"fine_tuning_output/{wildcards.model}"
    return wildcards.model


# ---- resources -------------------------------------------------------------------------------
# Rules take their resources from get_resources("<step>", ...), unpacked with `**`: the table in
# vicunaflow.sizes (RESOURCES) for the job's model size, overridden field by field by config
# `resources`, plus the `cluster` block of config (partition, account, qos, GPU model), so those
# are set once in config and never in rules or profiles. Names are those of
# snakemake-executor-plugin-slurm; the local executor counts `gpu` against the profile's
# `resources: gpu=N`. A resource whose value is None is dropped, so an unset partition or qos
# never reaches sbatch.

SIZE_IN_NAME = re.compile(r"(?:^|-)(" + "|".join(SIZES) + r")(?:-|$)")


def size_of_model(name):
    """The size of a model named in a target: vicuna-13b-all-v1.1, llama-7b-hf or a fine-tuning run."""
    run = config["finetune"]["runs"].get(name)
    match = SIZE_IN_NAME.search(run["model"] if run else name)
    if match is None:
        raise ValueError(
            f"{name}: cannot tell the model size from this name; name models like llama-7b-hf"
        )
    return match.group(1)


def job_resources(step, size, run=None):
    """RESOURCES[step][size], then config `resources: {step: {size: {field: value}}}`, then the
    fine-tuning run's own `resources:` applied."""
    override = dict(config["resources"].get(step, {}).get(size, {}))
    if run is not None:
        override.update(config["finetune"]["runs"][run].get("resources", {}))
    return dataclasses.replace(RESOURCES[step][size], **override)


def size_of_wildcard(wildcards, name):
    """The model size a job works on, from its wildcard `name`: size, raw (7B), model or run."""
    value = wildcards[name]
    if name == "size":
        return value
    if name == "raw":
        return size_of_raw(value)
    return size_of_model(value)


def scheduler_resources(res):
    """One job's resources (a vicunaflow.sizes.Resources) as SLURM executor resources, with the
    `cluster:` block of config. None marks a resource the job does not ask for."""
    cluster = config["cluster"]
    gpu, multi_node = res.gpu > 0, res.nodes > 1
    gpu_type = f"{cluster['gpu_model']}:" if cluster["gpu_model"] else ""
    extra = ["--ntasks-per-node=1"] if multi_node else []
    return {
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
        # srun around it; the rule starts one launcher per node (get_launcher). tasks_per_gpu=0
        # keeps the plugin from turning `tasks` into --ntasks-per-gpu.
        "mpi": "srun" if multi_node else None,
        "tasks": res.nodes if multi_node else None,
        "tasks_per_gpu": 0 if multi_node else None,
        "slurm_extra": " ".join(extra + [cluster["slurm_extra"] or ""]).strip() or None,
        "slurm_partition": (cluster["gpu_partition"] if gpu else None)
        or cluster["partition"],
        "slurm_account": cluster["account"],
        "qos": cluster["qos"],
    }


# The names every rule declares (each job drops those it leaves None).
SCHEDULER_RESOURCES = tuple(scheduler_resources(RESOURCES["convert"]["tiny"]))


def get_resources(step, wildcard="size", size=None):
    """A rule's resources, for the size in `wildcard` (see size_of_wildcard) or a fixed `size`."""

    def resource(name):
        return lambda wildcards: scheduler_resources(
            job_resources(
                step,
                size or size_of_wildcard(wildcards, wildcard),
                run=wildcards.run if wildcard == "run" else None,
            )
        )[name]

    return {name: resource(name) for name in SCHEDULER_RESOURCES}


def get_launcher(wildcards, resources):
    """Command prefix that starts one launcher per node of a multi-node job; empty on one node.

    The SLURM job step hides the allocation's SLURM_* variables from the rule's shell, so the
    rule, not `vicunaflow finetune`, starts the per-node tasks. Each task sees its step's
    SLURM_NNODES, SLURM_NODEID and node list and runs torchrun with a rendezvous on the first
    node (vicunaflow.launch; NODE_TASK_ENV tells it not to start tasks again)."""
    if resources.get("nodes", 1) <= 1:
        return ""
    return (
        f"{NODE_TASK_ENV}=1 srun --nodes={resources.nodes} --ntasks-per-node=1"
        f" --cpus-per-task={resources.cpus_per_task} --kill-on-bad-exit=1"
    )


def get_processes_per_node(wildcards, resources):
    """One training process per GPU of a node, as granted (the local profile may cap `gpu`);
    one process on a machine without GPUs."""
    gpus = resources.get("gpu") or 0
    if not gpus and resources.get("gres"):
        gpus = int(resources.gres.rsplit(":", 1)[1])
    return max(1, gpus)

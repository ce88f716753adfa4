# Shared helpers: config validation, the size table, and input functions.
# Every other rule file only names inputs, outputs and one `vicunaflow` command.

import dataclasses
import functools
import json
import os
import re
import shlex
from pathlib import Path

from snakemake.utils import validate

from vicunaflow import BUILTIN_CONVERSATIONS
from vicunaflow.finetune.config import TrainConfig
from vicunaflow.launch import srun_per_node
from vicunaflow.resources import (
    MODEL_NAME,
    NAMES,
    job_resources,
    processes_per_node,
    size_of_model,
)
from vicunaflow.sizes import SIZES

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
    for target in config["targets"]:
        check_model_name("targets", target)
    return config["targets"]


# A model folder's name as users write it, in any case and with any size: vicuna-7B-all-v1.1, llama-70b-hf.
MODEL_LIKE = re.compile(
    r"(?:vicuna-([^/]+?)-all-v1\.1|llama-([^/]+?)-hf)(?:-int[48])?", re.IGNORECASE
)


def check_model_name(place, name):
    """Fail before any job on a model name with a size nothing here builds (7B, 70b), as Snakemake would only
    report a missing folder of that name. Names that are no model's (a run, a path) pass.
    """
    match = MODEL_LIKE.fullmatch(name)
    built = f"(?:{MODEL_NAME})(?:-int[48])?"  # the names the rules build
    if match is None or re.fullmatch(built, name):
        return
    if re.fullmatch(built, name.lower()):
        raise ValueError(
            f"config: {place}: {name}: model names are lower case: {name.lower()}"
        )
    size = match.group(1) or match.group(2)
    raise ValueError(
        f"config: {place}: {name}: no model size {size} (sizes: {', '.join(SIZES)})"
    )


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
    return f"--revision {shlex.quote(str(revision))}" if revision else ""


def get_download_args(source):
    """Command-line arguments of `vicunaflow download llama` for the pyllama and meta sources."""
    if source == "meta":
        url_env = config["llama"]["meta"]["url_env"]
        return f"--source meta --url-env {shlex.quote(url_env)}"
    base_url = config["llama"]["pyllama"]["base_url"]
    if not base_url:
        return "--source pyllama"
    return f"--source pyllama --base-url {shlex.quote(base_url)}"


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
        {k: v for k, v in get_run(wildcards).items() if k not in RUN_ONLY_KEYS}
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


# A run's own keys, not options of `vicunaflow finetune`: what it trains, on what, with which resources.
RUN_ONLY_KEYS = {"model", "data", "resources"}

# What a run may set: TrainConfig's fields but the three the rule gives (model, data, output folder).
FINETUNE_OPTIONS = {field.name for field in dataclasses.fields(TrainConfig)} - {
    "model_path",
    "data",
    "output_dir",
}


def check_finetune_options(finetune):
    """Fail before any job on an option `vicunaflow finetune` does not know (a typo'd key)."""
    places = {"finetune.defaults": finetune["defaults"]}
    places |= {
        f"finetune.runs.{run}": options for run, options in finetune["runs"].items()
    }
    for key in sorted(set(finetune["defaults"]) & RUN_ONLY_KEYS):
        # Only a run's own model, data and resources count: in defaults they were ignored (resources,
        # data) or went into every run's --config file, which `vicunaflow finetune` refuses.
        raise ValueError(
            f"config: finetune.defaults.{key}: not an option every run shares; "
            f"set {key} in each of finetune.runs"
            + (" (or per size in resources.finetune)" if key == "resources" else "")
        )
    for place, options in places.items():
        for key in set(options) - FINETUNE_OPTIONS - RUN_ONLY_KEYS:
            raise ValueError(
                f"config: {place}.{key}: not an option of `vicunaflow finetune` "
                "(see `vicunaflow finetune --help`)"
            )


check_finetune_options(config["finetune"])
DATASETS = collect_datasets(config["finetune"]["runs"])


def get_tokenized_data(wildcards):
    run = get_run(wildcards)
    length = get_run_options(wildcards)["model_max_length"]
    return f"data/tokenized/{dataset_name(run['data'])}/{run['model']}-len{length}"


def get_dataset_file(wildcards):
    if wildcards.dataset in config["datasets"]:
        return f"data/split/{wildcards.dataset}/{wildcards.model}-len{wildcards.length}.jsonl"
    return DATASETS[wildcards.dataset]


def get_finetune_options_json(wildcards):
    """The run's resolved options as the JSON of the `--config` file the finetune rule passes.

    Every option is there (the schema fills `finetune.defaults`), sorted: any change of an option
    changes this text, the params of finetune_options, and so reruns the fine-tune."""
    return json.dumps(get_run_options(wildcards), sort_keys=True)


# ---- chat ------------------------------------------------------------------------------------


def get_chat_model(wildcards):
    """A model named in results/chat/{model}.json: a fine-tuning run or a built model directory."""
    if wildcards.model in config["finetune"]["runs"]:
        return f"fine_tuning_output/{wildcards.model}"
    return wildcards.model


# ---- resources -------------------------------------------------------------------------------
# Rules take their resources from get_resources("<step>", ...), unpacked with `**`: each value is
# read from vicunaflow.resources.job_resources (the size table, config `resources`, a run's own
# `resources`, config `cluster`), computed once per (step, size, run). A resource whose value is
# None is dropped, so an unset partition or qos never reaches sbatch.


def size_of_wildcard(wildcards, name):
    """The model size a job works on, from its wildcard `name`: size, raw (7B), model or run."""
    value = wildcards[name]
    if name == "size":
        return value
    if name == "raw":
        return size_of_raw(value)
    return size_of_model(value, config["finetune"]["runs"])


@functools.cache
def resources_of(step, size, run=None):
    """One job's scheduler resources (vicunaflow.resources.job_resources with this config)."""
    run_resources = config["finetune"]["runs"][run].get("resources") if run else None
    return job_resources(
        step,
        size,
        overrides=config["resources"],
        run_resources=run_resources,
        cluster=config["cluster"],
    )


def get_resources(step, wildcard="size", size=None):
    """A rule's resources, for the size in `wildcard` (see size_of_wildcard) or a fixed `size`."""

    def job(wildcards):
        run = wildcards.run if wildcard == "run" else None
        return resources_of(step, size or size_of_wildcard(wildcards, wildcard), run)

    return {name: (lambda wildcards, name=name: job(wildcards)[name]) for name in NAMES}


def get_launcher(wildcards, resources):
    """Command prefix that starts one launcher per node of a multi-node job; empty on one node.

    The SLURM job step hides the allocation's SLURM_* variables from the rule's shell, so the
    rule, not `vicunaflow finetune`, starts the per-node tasks (vicunaflow.launch.srun_per_node);
    each runs torchrun with a rendezvous on the first node."""
    if resources.get("nodes", 1) <= 1:
        return ""
    return shlex.join(
        srun_per_node(resources.nodes, cpus_per_task=resources.cpus_per_task)
    )


def get_processes_per_node(wildcards, resources):
    """One training process per GPU of a node, as granted (the local profile may cap `gpu`)."""
    return processes_per_node(resources)

# Helpers of dataprep.smk: the configured datasets (config `datasets`) as wildcard constraints,
# inputs and command-line options. Kept apart from common.smk, which is long enough.

import json
import re
import shlex


def datasets_of(*kinds):
    """A wildcard constraint for the datasets whose source is one of `kinds` (hub, path, mix)."""
    names = [
        name
        for name, dataset in config["datasets"].items()
        if any(kind in dataset for kind in kinds)
    ]
    return "|".join(map(re.escape, sorted(names))) or NEVER


def get_dataset(wildcards):
    return config["datasets"][wildcards.dataset]


def check_datasets(datasets):
    """Fail before any job on a dataset config the schema cannot see through."""
    for name, dataset in datasets.items():
        if name == BUILTIN_DATA:
            raise ValueError(
                f"config: datasets.{name}: {BUILTIN_DATA!r} names the built-in set; choose another name"
            )
        sources = [kind for kind in ("hub", "path", "mix") if kind in dataset]
        if len(sources) != 1:
            raise ValueError(
                f"config: datasets.{name}: give exactly one of hub, path or mix (found {sources or 'none'})"
            )
        for part in dataset.get("mix", {}):
            if part not in datasets:
                raise ValueError(
                    f"config: datasets.{name}.mix.{part}: no dataset of that name in `datasets`"
                )
            if "mix" in datasets[part]:
                raise ValueError(
                    f"config: datasets.{name}.mix.{part}: a mix of mixes is not supported; list its parts"
                )


check_datasets(config["datasets"])


def get_fetch_args(wildcards):
    hub = get_dataset(wildcards)["hub"]
    args = ["--repo", hub["repo"], "--file", hub["file"]]
    for key in ("revision", "sha256", "endpoint"):
        if hub.get(key):
            args += [f"--{key}", hub[key]]
    return shlex.join(args)


def get_raw_data(wildcards):
    """What data_clean reads: the fetched folder of a Hub dataset, or the configured file itself."""
    dataset = get_dataset(wildcards)
    if "hub" in dataset:
        return f"data/raw/{wildcards.dataset}"
    return dataset["path"]


def get_raw_file(wildcards):
    dataset = get_dataset(wildcards)
    if "hub" in dataset:
        return shlex.quote(f"data/raw/{wildcards.dataset}/{dataset['hub']['file']}")
    return shlex.quote(dataset["path"])


def get_clean_args(wildcards):
    dataset = get_dataset(wildcards)
    args = ["--html", dataset["html"]]
    if dataset["languages"]:
        args += ["--languages", json.dumps(dataset["languages"])]
    return shlex.join(args)


def get_mix_inputs(wildcards):
    return [f"data/clean/{part}.jsonl" for part in get_dataset(wildcards)["mix"]]


def get_mix_args(wildcards):
    dataset = get_dataset(wildcards)
    parts = list(dataset["mix"])
    return shlex.join(
        [
            "--data",
            json.dumps(get_mix_inputs(wildcards)),
            "--weights",
            json.dumps([dataset["mix"][p] for p in parts]),
            "--names",
            json.dumps(parts),
            "--seed",
            dataset["seed"],
        ]
    )


def get_split_args(wildcards):
    dataset = get_dataset(wildcards)
    return shlex.join(
        [
            "--held-out-fraction",
            str(dataset["held_out_fraction"]),
            "--seed",
            dataset["seed"],
        ]
    )

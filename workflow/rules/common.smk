# Shared helpers: config validation, the size table, and input functions.
# Every other rule file only names inputs, outputs and one `vicunaflow` command.

from pathlib import Path

from snakemake.utils import validate

from vicunaflow.sizes import SIZES

validate(config, schema="../schemas/config.schema.yaml")

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
    run="|".join(config["finetune"]["runs"]) or NEVER,


def get_final_output():
    return config["targets"]


def llama_source(size):
    return config["llama"]["sources"].get(size, config["llama"]["source"])


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
        {k: v for k, v in get_run(wildcards).items() if k not in ("model", "data")}
    )
    return options


def dataset_name(data):
    return (
        "vicuna_conversations"
        if data == BUILTIN_DATA
        else Path(data).name.split(".")[0]
    )


def data_path(data):
    if data == BUILTIN_DATA:
        from vicunaflow.synth import CONVERSATIONS

        return str(CONVERSATIONS)
    return data


def get_tokenized_data(wildcards):
    run = get_run(wildcards)
    length = get_run_options(wildcards).get("model_max_length", 2048)
    return f"data/tokenized/{dataset_name(run['data'])}/{run['model']}-len{length}"


def get_dataset_file(wildcards):
    for run in config["finetune"]["runs"].values():
        if dataset_name(run["data"]) == wildcards.dataset:
            return data_path(run["data"])
    raise ValueError(
        f"no fine-tuning run in config uses a dataset named {wildcards.dataset}"
    )


def get_finetune_args(wildcards):
    """The run's options as `--name value` flags for `vicunaflow finetune`."""
    return " ".join(
        f"--{name} {value}" for name, value in get_run_options(wildcards).items()
    )


# ---- chat ------------------------------------------------------------------------------------


def get_chat_model(wildcards):
    """A model named in results/chat/{model}.json: a fine-tuning run or a built model directory."""
    if wildcards.model in config["finetune"]["runs"]:
        return f"fine_tuning_output/{wildcards.model}"
    return wildcards.model

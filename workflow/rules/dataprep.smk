# Conversation data before tokenisation, for the datasets named in config `datasets`:
#   data/raw/{dataset}/ (a Hub file) -> data/clean/{dataset}.jsonl (or a mix of cleaned sets)
#   -> data/split/{dataset}/{model}-len{N}.jsonl -> data/tokenized/{dataset}/{model}-len{N} (finetune.smk).
# Runs naming `builtin` or a file path skip these steps, as before. The split is per model: the
# tokenizer counts the tokens (LLaMA sizes share one; the tiny model has its own).


rule data_fetch:
    output:
        directory("data/raw/{dataset}"),
    log:
        "logs/data_fetch/{dataset}.log",
    benchmark:
        "benchmarks/data_fetch/{dataset}.tsv"
    wildcard_constraints:
        dataset=datasets_of("hub"),
    localrule: True
    conda:
        "../../envs/data.yaml"
    resources:
        **get_resources("download", size="tiny"),
    params:
        args=get_fetch_args,
    shell:
        "vicunaflow data fetch {params.args} --output-dir {output} > {log} 2>&1"


rule data_clean:
    input:
        get_raw_data,
    output:
        data="data/clean/{dataset}.jsonl",
        counts=report(
            "results/data/{dataset}/clean.tsv",
            caption="../report/data_counts.rst",
            category="Data",
            subcategory="{dataset}",
        ),
    log:
        "logs/data_clean/{dataset}.log",
    benchmark:
        "benchmarks/data_clean/{dataset}.tsv"
    wildcard_constraints:
        dataset=datasets_of("hub", "path"),
    conda:
        "../../envs/data.yaml"
    threads: 4
    resources:
        **get_resources("tokenize_data", size="7b"),
    params:
        data=get_raw_file,
        options=get_clean_args,
    shell:
        "vicunaflow data clean --data {params.data} --output {output.data} --report {output.counts}"
        " --jobs {threads} {params.options} > {log} 2>&1"


rule data_mix:
    input:
        get_mix_inputs,
    output:
        data="data/clean/{dataset}.jsonl",
        counts=report(
            "results/data/{dataset}/mix.tsv",
            caption="../report/data_counts.rst",
            category="Data",
            subcategory="{dataset}",
        ),
    log:
        "logs/data_mix/{dataset}.log",
    wildcard_constraints:
        dataset=datasets_of("mix"),
    conda:
        "../../envs/data.yaml"
    resources:
        **get_resources("tokenize_data", size="tiny"),
    params:
        args=get_mix_args,
    shell:
        "vicunaflow data mix {params.args} --output {output.data} --report {output.counts} > {log} 2>&1"


rule data_split:
    input:
        data="data/clean/{dataset}.jsonl",
        model="{model}",
    output:
        data="data/split/{dataset}/{model}-len{length}.jsonl",
        held_out="data/split/{dataset}/{model}-len{length}.heldout.jsonl",
        counts=report(
            "results/data/{dataset}/{model}-len{length}-split.tsv",
            caption="../report/data_counts.rst",
            category="Data",
            subcategory="{dataset}",
        ),
    log:
        "logs/data_split/{dataset}/{model}-len{length}.log",
    benchmark:
        "benchmarks/data_split/{dataset}/{model}-len{length}.tsv"
    wildcard_constraints:
        dataset=datasets_of("hub", "path", "mix"),
        model="(vicuna-[a-z0-9]+-all-v1\\.1|llama-[a-z0-9]+-hf)",
        length="[0-9]+",
    conda:
        "../../envs/data.yaml"
    resources:
        **get_resources("tokenize_data", wildcard="model"),
    params:
        options=get_split_args,
    shell:
        "vicunaflow data split --data {input.data} --model-path {input.model} --model-max-length {wildcards.length}"
        " --output {output.data} --held-out {output.held_out} --report {output.counts} {params.options} > {log} 2>&1"

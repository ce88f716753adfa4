# Weights in: raw LLaMA checkpoints, pre-converted bases and Vicuna deltas, one rule per source.
# Each size takes the rule of its configured source (the wildcard constraints below), so the DAG
# follows the config. Download rules are local rules: compute nodes often have no internet.


rule llama_tokenizer:
    output:
        model="pyllama_data/tokenizer.model",
        checklist="pyllama_data/tokenizer_checklist.chk",
    log:
        "logs/llama_tokenizer/tokenizer.log",
    localrule: True
    conda:
        "../../envs/download.yaml"
    resources:
        **get_resources("download", size="tiny"),
    params:
        source=get_download_args(tokenizer_source()),
    shell:
        "vicunaflow download llama --model-size tokenizer --folder pyllama_data {params.source} > {log} 2>&1"


rule llama_raw_download:
    output:
        protected(directory("pyllama_data/{raw}")),
    log:
        "logs/llama_raw/{raw}.log",
    benchmark:
        "benchmarks/llama_raw/{raw}.tsv"
    wildcard_constraints:
        raw=sizes_from(llama_source, "pyllama", "meta", raw=True),
    localrule: True
    conda:
        "../../envs/download.yaml"
    resources:
        **get_resources("download", wildcard="raw"),
    params:
        source=lambda wildcards: get_download_args(
            llama_source(size_of_raw(wildcards.raw))
        ),
    shell:
        "vicunaflow download llama --model-size {wildcards.raw} --folder pyllama_data --include-tokenizer false"
        " {params.source} > {log} 2>&1"


rule llama_raw_local:
    output:
        directory("pyllama_data/{raw}"),
    log:
        "logs/llama_raw/{raw}.log",
    wildcard_constraints:
        raw=sizes_from(llama_source, "local", raw=True),
    localrule: True
    conda:
        "../../envs/download.yaml"
    resources:
        **get_resources("download", wildcard="raw"),
    params:
        path=lambda wildcards: get_local_path("llama", size_of_raw(wildcards.raw)),
    shell:
        "vicunaflow download llama --source local --path {params.path:q} --model-size {wildcards.raw}"
        " --folder pyllama_data > {log} 2>&1"


rule llama_raw_synthetic:
    output:
        directory("pyllama_data/{raw}"),
    log:
        "logs/llama_raw/{raw}.log",
    wildcard_constraints:
        raw=sizes_from(llama_source, "synthetic", raw=True),
    localrule: True
    conda:
        "../../envs/download.yaml"
    resources:
        **get_resources("download", wildcard="raw"),
    shell:
        "vicunaflow synth llama --model-size {wildcards.raw} --folder pyllama_data > {log} 2>&1"


rule llama_hf_download:
    output:
        protected(directory("llama-{size}-hf")),
    log:
        "logs/llama_hf/{size}.log",
    benchmark:
        "benchmarks/llama_hf/{size}.tsv"
    wildcard_constraints:
        size=sizes_from(llama_source, "hf"),
    localrule: True
    conda:
        "../../envs/download.yaml"
    resources:
        **get_resources("download"),
    params:
        repo=lambda wildcards: get_repo("llama", "hf", wildcards.size),
        revision=lambda wildcards: get_revision_arg("llama", wildcards.size),
    shell:
        "vicunaflow download hf --repo {params.repo} {params.revision} --local-dir {output} > {log} 2>&1"


rule llama_hf_local:
    output:
        directory("llama-{size}-hf"),
    log:
        "logs/llama_hf/{size}.log",
    wildcard_constraints:
        size=sizes_from(llama_source, "local_hf"),
    localrule: True
    conda:
        "../../envs/download.yaml"
    resources:
        **get_resources("download"),
    params:
        path=lambda wildcards: get_local_path("llama", wildcards.size),
    shell:
        "vicunaflow download hf --source local --path {params.path:q} --local-dir {output} > {log} 2>&1"


rule vicuna_delta_download:
    output:
        protected(directory("vicuna-{size}-delta-v1.1")),
    log:
        "logs/vicuna_delta/{size}.log",
    benchmark:
        "benchmarks/vicuna_delta/{size}.tsv"
    wildcard_constraints:
        size=sizes_from(delta_source, "hf"),
    localrule: True
    conda:
        "../../envs/download.yaml"
    resources:
        **get_resources("download"),
    params:
        repo=lambda wildcards: get_repo("vicuna", "delta", wildcards.size),
        revision=lambda wildcards: get_revision_arg("vicuna", wildcards.size),
    shell:
        "vicunaflow download hf --repo {params.repo} {params.revision} --local-dir {output} > {log} 2>&1"


rule vicuna_delta_local:
    output:
        directory("vicuna-{size}-delta-v1.1"),
    log:
        "logs/vicuna_delta/{size}.log",
    wildcard_constraints:
        size=sizes_from(delta_source, "local"),
    localrule: True
    conda:
        "../../envs/download.yaml"
    resources:
        **get_resources("download"),
    params:
        path=lambda wildcards: get_local_path("vicuna", wildcards.size),
    shell:
        "vicunaflow download hf --source local --path {params.path:q} --local-dir {output} > {log} 2>&1"


rule vicuna_delta_synthetic:
    input:
        base="llama-{size}-hf",
    output:
        directory("vicuna-{size}-delta-v1.1"),
    log:
        "logs/vicuna_delta/{size}.log",
    wildcard_constraints:
        size=sizes_from(delta_source, "synthetic"),
    localrule: True
    conda:
        "../../envs/download.yaml"
    resources:
        **get_resources("download"),
    shell:
        "vicunaflow synth delta --base {input.base} --output-dir {output} > {log} 2>&1"

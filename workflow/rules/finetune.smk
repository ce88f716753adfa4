# Conversation data -> tokenised dataset -> fine-tuned model (torchrun + FSDP2).


rule tokenize_data:
    input:
        data=get_dataset_file,
        model="{model}",
    output:
        directory("data/tokenized/{dataset}/{model}-len{length}"),
    log:
        "logs/tokenize_data/{dataset}/{model}-len{length}.log",
    wildcard_constraints:
        model=MODEL_NAME,
        length="[0-9]+",
    conda:
        "../../envs/finetune.yaml"
    resources:
        **get_resources("tokenize_data", wildcard="model"),
    shell:
        "vicunaflow data tokenize --data {input.data:q} --model-path {input.model} --output-dir {output:q}"
        " --model-max-length {wildcards.length} > {log:q} 2>&1"


# A run's resolved options (finetune.defaults, which the schema fills, then the run's own keys) as the one
# --config file its fine-tune passes; a changed option changes the params, which reruns both rules.
rule finetune_options:
    output:
        "results/finetune/{run}/options.json",
    log:
        "logs/finetune_options/{run}.log",
    localrule: True
    conda:
        "../../envs/finetune.yaml"
    params:
        options=get_finetune_options_json,
    shell:
        "printf '%s\\n' {params.options:q} > {output} 2> {log}"


rule finetune:
    input:
        model=lambda wildcards: get_run(wildcards)["model"],
        data=get_tokenized_data,
        options=rules.finetune_options.output[0],
    output:
        directory("fine_tuning_output/{run}"),
    log:
        "logs/finetune/{run}.log",
    benchmark:
        "benchmarks/finetune/{run}.tsv"
    conda:
        "../../envs/finetune.yaml"
    resources:
        **get_resources("finetune", wildcard="run"),
    params:
        options=get_finetune_options_json,  # what input.options holds: a changed option reruns this job
        launcher=get_launcher,
        nproc_per_node=get_processes_per_node,
    shell:
        "{params.launcher} vicunaflow finetune --config {input.options} --model-path {input.model} --data {input.data:q}"
        " --output-dir {output} --nproc-per-node {params.nproc_per_node} > {log} 2>&1"

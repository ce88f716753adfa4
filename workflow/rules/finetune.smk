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
        "vicunaflow data tokenize --data {input.data} --model-path {input.model} --output-dir {output}"
        " --model-max-length {wildcards.length} > {log} 2>&1"


rule finetune:
    input:
        model=lambda wildcards: get_run(wildcards)["model"],
        data=get_tokenized_data,
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
        options=get_finetune_args,
        launcher=get_launcher,
        nproc_per_node=get_processes_per_node,
    shell:
        "{params.launcher} vicunaflow finetune --model-path {input.model} --data {input.data} --output-dir {output}"
        " --nproc-per-node {params.nproc_per_node} {params.options} > {log} 2>&1"

# Weight-only int8 / int4 copy of a merged Vicuna, streamed tensor by tensor (docs/quantize.md).


rule quantize_model:
    input:
        "vicuna-{size}-all-v1.1",
    output:
        directory("vicuna-{size}-all-v1.1-int{bits}"),
    log:
        "logs/quantize/{size}-int{bits}.log",
    benchmark:
        "benchmarks/quantize/{size}-int{bits}.tsv"
    wildcard_constraints:
        bits="8|4",
    conda:
        "../../envs/convert.yaml"
    resources:
        **get_resources("quantize"),
    params:
        group_size=lookup(dpath="quantize/group_size", within=config),
        max_shard_size=lookup(dpath="convert/max_shard_size", within=config),
    shell:
        "vicunaflow quantize --model-path {input} --output-dir {output} --bits {wildcards.bits}"
        " --group-size {params.group_size} --max-shard-size {params.max_shard_size:q} > {log} 2>&1"

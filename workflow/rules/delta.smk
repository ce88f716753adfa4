# Vicuna = LLaMA + delta, tensor by tensor in float32, written as safetensors.


rule apply_delta:
    input:
        base="llama-{size}-hf",
        delta="vicuna-{size}-delta-v1.1",
    output:
        directory("vicuna-{size}-all-v1.1"),
    log:
        "logs/apply_delta/{size}.log",
    benchmark:
        "benchmarks/apply_delta/{size}.tsv"
    conda:
        "../../envs/convert.yaml"
    resources:
        **get_resources("apply_delta"),
    params:
        max_shard_size=lookup(dpath="convert/max_shard_size", within=config),
    shell:
        "vicunaflow apply-delta --base {input.base} --delta {input.delta} --target {output}"
        " --max-shard-size {params.max_shard_size:q} > {log} 2>&1"

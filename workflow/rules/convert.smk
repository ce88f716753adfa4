# Raw Meta checkpoint -> Hugging Face directory, streamed shard by shard, bit-exact by default.


rule convert_llama_to_hf:
    input:
        raw=get_raw_dir,
        tokenizer=get_convert_tokenizer,
    output:
        directory("llama-{size}-hf"),
    log:
        "logs/convert/{size}.log",
    benchmark:
        "benchmarks/convert/{size}.tsv"
    wildcard_constraints:
        size=sizes_from(llama_source, *RAW_SOURCES),
    conda:
        "../../envs/convert.yaml"
    resources:
        **get_resources("convert"),
    params:
        tokenizer=lambda wildcards, input: (
            f"--tokenizer {input.tokenizer}" if input.tokenizer else ""
        ),
        dtype=lookup(dpath="convert/dtype", within=config),
        max_shard_size=lookup(dpath="convert/max_shard_size", within=config),
    shell:
        "vicunaflow convert --input-dir {input.raw} --output-dir {output} {params.tokenizer}"
        " --dtype {params.dtype} --max-shard-size {params.max_shard_size:q} > {log} 2>&1"

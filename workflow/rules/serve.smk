# A fixed set of prompts answered greedily by every built model: a smoke test and a report item.


rule chat_smoke:
    input:
        model=get_chat_model,
        prompts=config["chat"]["prompts"],
    output:
        report(
            "results/chat/{model}.json",
            caption="../report/chat.rst",
            category="Chat transcripts",
        ),
    log:
        "logs/chat_smoke/{model}.log",
    conda:
        "../../envs/serve.yaml"
    resources:
        **get_resources("chat_smoke", wildcard="model"),
    params:
        max_new_tokens=config["chat"]["max_new_tokens"],
        num_gpus=get_processes_per_node,
    shell:
        "vicunaflow chat --model-path {input.model} --prompts {input.prompts:q} --output {output}"
        " --num-gpus {params.num_gpus} --temperature 0 --max-new-tokens {params.max_new_tokens} > {log} 2>&1"

# Evaluation: MT-bench answers graded by an LLM judge (FastChat's llm_judge formats), loss on held-out
# conversations, lm-evaluation-harness suites, and results/eval/summary.tsv over every evaluated model. See docs/eval.md.
# Helpers: workflow/rules/eval_common.smk.


rule mt_bench_download:
    output:
        directory(MT_BENCH_DIR),
    log:
        "logs/mt_bench_download/mt_bench.log",
    localrule: True
    conda:
        "../../envs/download.yaml"
    resources:
        **get_resources("download", size="tiny"),
    params:
        revision=EVAL["mt_bench"]["revision"],
        base_url=EVAL["mt_bench"]["base_url"],
    shell:
        "vicunaflow eval download --output-dir {output} --revision {params.revision:q}"
        " --base-url {params.base_url:q} > {log} 2>&1"


rule eval_answers:
    input:
        unpack(get_eval_data),
        model=get_chat_model,
    output:
        "results/eval/{model}/mt_bench/answers.jsonl",
    log:
        "logs/eval_answers/{model}.log",
    benchmark:
        "benchmarks/eval_answers/{model}.tsv"
    wildcard_constraints:
        model="[^/]+",
    conda:
        "../../envs/serve.yaml"
    resources:
        **get_resources("chat_smoke", wildcard="model"),
    params:
        questions=EVAL_FILES["questions"],
        max_new_tokens=EVAL["max_new_tokens"],
        seed=EVAL["seed"],
        num_gpus=get_processes_per_node,
    shell:
        "vicunaflow eval answers --model-path {input.model} --questions {params.questions:q} --output {output}"
        " --model-id {wildcards.model} --max-new-tokens {params.max_new_tokens} --seed {params.seed}"
        " --num-gpus {params.num_gpus} > {log} 2>&1"


# A local rule: judges are web APIs, which compute nodes often cannot reach. Judgments so far are
# kept in .staging/ when the job fails (Snakemake removes the output), so a rerun continues.
rule eval_judge:
    input:
        unpack(get_eval_data),
        answers="results/eval/{model}/mt_bench/answers.jsonl",
        judge_model=get_judge_model_input,
    output:
        "results/eval/{model}/mt_bench/judgment-{judge}.jsonl",
    log:
        "logs/eval_judge/{model}/{judge}.log",
    wildcard_constraints:
        model="[^/]+",
        judge="|".join(map(re.escape, EVAL["judges"])) or NEVER,
    localrule: True
    conda:
        "../../envs/serve.yaml"
    resources:
        **get_resources("download", size="tiny"),
    params:
        questions=EVAL_FILES["questions"],
        reference=get_reference_arg,
        prompts=EVAL_FILES["prompts"],
        partial=".staging/eval/{model}/judgment-{judge}.jsonl",
        judge=get_judge_args,
    shell:
        "vicunaflow eval judge --questions {params.questions:q} --answers {input.answers} {params.reference}"
        " --judge-prompts {params.prompts:q} --output {output} --partial {params.partial} {params.judge}"
        " > {log} 2>&1"


rule eval_loss:
    input:
        model=get_chat_model,
        data=get_loss_data,
    output:
        "results/eval/{model}/loss-{dataset}.json",
    log:
        "logs/eval_loss/{model}/{dataset}.log",
    benchmark:
        "benchmarks/eval_loss/{model}/{dataset}.tsv"
    wildcard_constraints:
        model="[^/]+",
        dataset="|".join(map(re.escape, EVAL["loss_data"])) or NEVER,
    conda:
        "../../envs/serve.yaml"
    resources:
        **get_resources("chat_smoke", wildcard="model"),
    params:
        model_max_length=EVAL["loss_max_length"],
    shell:
        "vicunaflow eval loss --model-path {input.model} --data {input.data:q} --output {output}"
        " --model-id {wildcards.model} --dataset {wildcards.dataset}"
        " --model-max-length {params.model_max_length} > {log} 2>&1"


# lm-evaluation-harness suites (config eval.harness): the job serves the model on a free local port,
# runs lm-eval's local-completions model against it and stops the server, however the run ends.
rule eval_harness:
    input:
        model=get_chat_model,
        tasks_dir=get_harness_tasks_dir,
    output:
        "results/eval/{model}/lm_eval-{suite}.json",
    log:
        "logs/eval_harness/{model}/{suite}.log",
    benchmark:
        "benchmarks/eval_harness/{model}/{suite}.tsv"
    wildcard_constraints:
        model="[^/]+",
        suite="|".join(map(re.escape, EVAL["harness"])) or NEVER,
    conda:
        "../../envs/eval.yaml"
    resources:
        **get_resources("chat_smoke", wildcard="model"),
    params:
        harness=get_harness_args,
        num_gpus=get_processes_per_node,
    shell:
        "vicunaflow eval harness --model-path {input.model} --output {output} --suite {wildcards.suite}"
        " --model-name {wildcards.model} {params.harness} --num-gpus {params.num_gpus} > {log} 2>&1"


rule eval_summary:
    input:
        unpack(get_eval_data),
        unpack(get_summary_inputs),
    output:
        tsv=report(
            "results/eval/summary.tsv",
            caption="../report/eval.rst",
            category="Evaluation",
        ),
        json="results/eval/summary.json",
    log:
        "logs/eval_summary/summary.log",
    localrule: True
    conda:
        "../../envs/serve.yaml"
    params:
        questions=EVAL_FILES["questions"],
        judgments=json_list_arg("judgments"),
        losses=json_list_arg("losses"),
        harness=json_list_arg("harness"),
        arena=get_arena_arg,
    shell:
        "vicunaflow eval summary --questions {params.questions:q} --judgments {params.judgments}"
        " --losses {params.losses} --harness {params.harness} {params.arena} --output {output.tsv}"
        " --output-json {output.json}"
        " > {log} 2>&1"


# Human votes from `vicunaflow serve`'s arena page -> Elo and Bradley-Terry ratings. The votes file is
# appended to by a running server, not made by a rule: Snakemake sees a source file, reruns this when it
# is newer than the ratings, and plans it only when the votes exist (the summary asks for it then) or
# when results/eval/arena.tsv is named. A server appending meanwhile is harmless (whole lines only).
rule eval_arena:
    input:
        votes=ARENA_VOTES,
    output:
        tsv=report(
            "results/eval/arena.tsv",
            caption="../report/arena.rst",
            category="Evaluation",
        ),
        json="results/eval/arena.json",
    log:
        "logs/eval_arena/arena.log",
    localrule: True
    conda:
        "../../envs/serve.yaml"
    shell:
        "vicunaflow eval arena --votes {input.votes} --output {output.tsv} --output-json {output.json}"
        " > {log} 2>&1"

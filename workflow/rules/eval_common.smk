# Helpers of workflow/rules/eval.smk: which questions, models, judges, datasets and lm-eval suites config `eval` names.

from types import SimpleNamespace

from vicunaflow.eval.mt_bench import (
    BUILTIN_JUDGE_PROMPTS,
    BUILTIN_QUESTIONS,
    BUILTIN_REFERENCE,
)

EVAL = config["eval"]
MT_BENCH_DIR = "resources/mt_bench"
# Written by `vicunaflow serve` (its arena page, default --results-dir), never by a rule: a source file
# for Snakemake. Its ratings are built when it exists (see get_summary_inputs) or when asked for by name.
ARENA_VOTES = "results/serve/arena_votes.jsonl"
JUDGE_DEFAULTS = {"base_url": None, "serve": None, "api_key_env": "OPENAI_API_KEY"}
JUDGE_DEFAULTS |= {"parallel": 8, "max_tokens": 2048}
HARNESS_DEFAULTS = {
    "include_path": None,
    "limit": None,
    "num_fewshot": None,
    "num_concurrent": 16,
}


def eval_files():
    """The questions, reference answers and judge prompts that config `eval.questions` names."""
    source = EVAL["questions"]
    if source == "mt_bench":  # FastChat's own files, fetched by mt_bench_download
        return {
            "questions": f"{MT_BENCH_DIR}/question.jsonl",
            "reference": f"{MT_BENCH_DIR}/reference_answer/gpt-4.jsonl",
            "prompts": f"{MT_BENCH_DIR}/judge_prompts.jsonl",
        }
    if source == "builtin":
        return {
            "questions": str(BUILTIN_QUESTIONS),
            "reference": str(BUILTIN_REFERENCE),
            "prompts": str(BUILTIN_JUDGE_PROMPTS),
        }
    return {
        "questions": source,
        "reference": EVAL["reference"],
        "prompts": str(BUILTIN_JUDGE_PROMPTS),
    }


EVAL_FILES = eval_files()


def check_eval(eval):
    """Fail before any job on eval names nothing here builds (a model of another size or case, a summary
    judge that is not a judge): Snakemake would only report a missing file of that name.
    """
    runs = config["finetune"]["runs"]
    for name in eval["models"] or []:
        if name not in runs:
            check_model_name("eval.models", name)
    for name, judge in eval["judges"].items():
        if judge.get("serve") and judge["serve"] not in runs:
            check_model_name(f"eval.judges.{name}.serve", judge["serve"])
    for name in eval["summary_judges"]:
        if name not in eval["judges"]:
            raise ValueError(
                f"config: eval.summary_judges.{name}: no judge of that name in eval.judges "
                f"({', '.join(eval['judges']) or 'none'})"
            )


check_eval(EVAL)


def get_eval_data(wildcards):
    """Named inputs: the download folder for mt_bench, else the question and reference files."""
    if EVAL["questions"] == "mt_bench":
        return {"mt_bench": MT_BENCH_DIR}
    return {
        k: v for k, v in EVAL_FILES.items() if k in ("questions", "reference") and v
    }


def eval_models():
    """eval.models, or every model of the fine-tuning runs: the LLaMA base, Vicuna, the run."""
    if EVAL["models"] is not None:
        return EVAL["models"]
    models = []
    for run, options in config["finetune"]["runs"].items():
        base = re.sub(r"^vicuna-(.+)-all-v1\.1$", r"llama-\1-hf", options["model"])
        models += [base, options["model"], run]
    return list(dict.fromkeys(models))


def get_judge(name):
    judge = {**JUDGE_DEFAULTS, **EVAL["judges"][name]}
    if (judge["base_url"] is None) == (judge["serve"] is None):
        raise ValueError(
            f"config: eval.judges.{name}: give base_url (an OpenAI-compatible endpoint) "
            "or serve (a model built here), one of them"
        )
    return judge


def get_judge_model_input(wildcards):
    """A judge served from a model built here depends on that model."""
    serve = get_judge(wildcards.judge)["serve"]
    return get_chat_model(SimpleNamespace(model=serve)) if serve else []


def get_judge_args(wildcards, input):
    judge = get_judge(wildcards.judge)
    endpoint = (
        f"--judge-serve-model-path {input.judge_model}"
        if judge["serve"]
        else f"--judge-base-url {shlex.quote(judge['base_url'])}"
    )
    return (
        f"{endpoint} --judge-model {shlex.quote(judge['model'])} --judge-api-key-env {judge['api_key_env']}"
        f" --parallel {judge['parallel']} --max-tokens {judge['max_tokens']}"
    )


def get_reference_arg(wildcards):
    reference = EVAL_FILES["reference"]
    return f"--reference {shlex.quote(reference)}" if reference else ""


def get_loss_data(wildcards):
    return data_path(EVAL["loss_data"][wildcards.dataset])


def get_harness(name):
    return {**HARNESS_DEFAULTS, **EVAL["harness"][name]}


def get_harness_tasks_dir(wildcards):
    """A suite's own task YAMLs (include_path): an input of its job, which must exist."""
    folder = get_harness(wildcards.suite)["include_path"]
    return [folder] if folder else []


def get_harness_args(wildcards, input):
    suite = get_harness(wildcards.suite)
    args = f"--tasks {' '.join(map(shlex.quote, suite['tasks']))} --num-concurrent {suite['num_concurrent']}"
    if suite["include_path"]:
        args += f" --include-path {shlex.quote(str(input.tasks_dir))}"
    for key in ("limit", "num_fewshot"):
        if suite[key] is not None:
            args += f" --{key.replace('_', '-')} {suite[key]}"
    return args


def get_summary_inputs(wildcards):
    models = eval_models()
    inputs = {
        "judgments": [
            f"results/eval/{model}/mt_bench/judgment-{judge}.jsonl"
            for model in models
            for judge in EVAL["summary_judges"]
        ],
        "losses": [
            f"results/eval/{model}/loss-{dataset}.json"
            for model in models
            for dataset in EVAL["loss_data"]
        ],
        "harness": [
            f"results/eval/{model}/lm_eval-{suite}.json"
            for model in models
            for suite in EVAL["harness"]
        ],
        # the arena's ratings only where people have voted: no votes file is no arena, not an error
        **({"arena": "results/eval/arena.json"} if os.path.exists(ARENA_VOTES) else {}),
    }
    if not any(inputs.values()):  # `vicunaflow eval summary` would refuse it when run
        if not models:
            raise ValueError(
                "config: eval.models is empty (or null without finetune.runs): nothing to summarise; "
                "name the models to evaluate, e.g. [vicuna-7b-all-v1.1]"
            )
        raise ValueError(
            "config: eval.summary_judges, eval.loss_data and eval.harness are all empty: nothing to "
            "summarise; name a judge, a held-out dataset or an lm-eval suite"
        )
    return inputs


def get_arena_arg(wildcards, input):
    return f"--arena {input.arena}" if "arena" in input.keys() else ""


def json_list_arg(name):
    """A list of input files as one JSON argument (how `vicunaflow` takes lists)."""
    return lambda wildcards, input: shlex.quote(json.dumps(list(input[name])))

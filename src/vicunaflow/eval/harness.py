"""`vicunaflow eval harness`: lm-evaluation-harness tasks against `vicunaflow serve` of a model.

The job starts `vicunaflow serve` of the model on a free 127.0.0.1 port (eval judge's machinery:
eval/served.py), waits for /health, and runs lm-eval's Python API with its `local-completions` model:
lm-eval tokenizes with the model folder's tokenizer and sends token ids to /v1/completions
(loglikelihoods through `echo` + `logprobs`, generate_until tasks as plain completions). The server
is stopped however the run ends (an error, Ctrl-C, SIGTERM).

The output is one JSON file, written whole or not at all: lm-eval's results, groups, task configs,
versions, n-shot and sample counts, its run settings (the model arguments without the port), a
`main` metric for the summary, and tool versions. lm-eval's timestamps, environment dump and
timings are left out, so a rerun of the same model and tasks writes the same numbers.

lm_eval is imported only here, when the verb runs: `pip install 'vicunaflow[eval]'`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vicunaflow import VicunaflowError
from vicunaflow.loading import DEFAULT_MODEL_OPTIONS, ModelOptions

log = logging.getLogger(__name__)

LM_EVAL_PIN = "lm_eval[api]==0.4.13"
# lm-eval's result fields kept as they are (the rest: dates, environment, timings, hashes of the run)
KEPT = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples")


def harness(
    *,
    model_path: Path,
    tasks: list[str],
    output: Path,
    include_path: Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    suite: str | None = None,
    model_name: str | None = None,
    model_options: ModelOptions = DEFAULT_MODEL_OPTIONS,
    max_batch_size: int = 16,
    max_context: int | None = None,
    num_concurrent: int = 16,
    add_bos_token: bool = False,
    timeout: float = 600.0,
    overwrite: bool = False,
) -> Path:
    """Run lm-evaluation-harness tasks against `vicunaflow serve` of a model, started for the run on a local port.

    Arguments:
        model_path: a Hugging Face model directory (e.g. vicuna-7b-all-v1.1); served, and its tokenizer used by lm-eval.
        tasks: lm-eval task or group names (hellaswag, mmlu, gsm8k, ...), or those of task YAMLs in --include-path.
        output: results JSON (results, configs, versions, n-shot, settings, main metric), written atomically.
        include_path: a folder of lm-eval task YAMLs (e.g. over local jsonl files, offline).
        limit: at most this many documents per task (a smoke test; lm-eval flags such numbers as not comparable).
        num_fewshot: few-shot examples per prompt; default: each task's own.
        suite: the name of this set of tasks in `eval summary` (the workflow's eval.harness key); default:
            the tasks joined by `+`.
        model_name: the model's name in the request and the results; default: the directory name.
        model_options: how the served model loads (vicunaflow.loading.ModelOptions: --device, --num-gpus, --load-8bit, ...).
        max_batch_size: the server's batch: requests decoded together.
        max_context: the server's context and lm-eval's max_length; default: the model's max_position_embeddings.
        num_concurrent: requests lm-eval sends at a time (the engine batches them): near --max-batch-size.
        add_bos_token: let lm-eval prepend BOS to each request (as its `hf` model does for LLaMA); default:
            token ids go as lm-eval's local-completions makes them, without.
        timeout: seconds to wait for the server to start, and for one request.
        overwrite: replace output files that exist but are not this verb's unchanged earlier outputs (default: refuse).
    """
    from vicunaflow.eval.served import served
    from vicunaflow.outputs import atomic_write_bytes, check_output_files, tool_versions

    model_path = Path(model_path)
    model_name = model_name or model_path.name
    suite = suite or "+".join(tasks)
    log.info(
        "eval harness: model_path=%s tasks=%s include_path=%s limit=%s num_fewshot=%s suite=%s output=%s %s "
        "max_batch_size=%d max_context=%s num_concurrent=%d",
        model_path, tasks, include_path, limit, num_fewshot, suite, output, model_options, max_batch_size,
        max_context, num_concurrent,
    )  # fmt: skip
    if not tasks:
        raise VicunaflowError("--tasks: give at least one lm-eval task")
    check_output_files({"--output": output}, inputs=[model_path, include_path], overwrite=overwrite)
    if num_concurrent < 1 or max_batch_size < 1:
        raise VicunaflowError("--num-concurrent and --max-batch-size must be at least 1")
    if include_path is not None and not Path(include_path).is_dir():
        raise VicunaflowError(f"--include-path {include_path}: not a folder")
    lm_eval, TaskManager = _import_lm_eval()
    task_manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [t for t in tasks if t not in task_manager.all_tasks]
    if unknown:  # before the model loads: lm-eval would only say so after
        where = f" or in {include_path}" if include_path is not None else ""
        raise VicunaflowError(f"lm-eval knows no task {', '.join(unknown)} (its own tasks{where})")
    max_length = max_context or _max_position_embeddings(model_path)
    # lm-eval's settings, without the URL (a fresh port each run): what the results file records
    settings = {
        "model": model_name,
        "tokenizer_backend": "huggingface",
        "tokenizer": str(model_path),
        "num_concurrent": num_concurrent,
        "max_length": max_length,
        "add_bos_token": add_bos_token,
        "timeout": int(timeout),
    }
    serve_args = ["--max-batch-size", str(max_batch_size), "--max-context", str(max_length)]
    serve_args += _model_option_args(model_options)
    with served(model_path, model_name, timeout, serve_args, what="lm-eval's model") as base_url:
        model_args = {"base_url": f"{base_url}/completions", **settings}
        results = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=",".join(f"{k}={v}" for k, v in model_args.items()),
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=task_manager,
            log_samples=False,
        )
    if results is None:  # lm-eval returns None on non-zero ranks only; one process here
        raise VicunaflowError("lm-eval returned no results")
    record = {
        "model": model_name,
        "model_path": str(model_path),
        "suite": suite,
        "tasks": list(tasks),
        "main": main_metric(results["results"], tasks),
        **{key: results[key] for key in KEPT if key in results},
        "config": {
            **{k: v for k, v in results.get("config", {}).items() if k not in ("model_args", "model_dtype")},
            "model_args": settings,
            "include_path": str(include_path) if include_path is not None else None,
        },
        "versions_of_tools": {**tool_versions(), "lm_eval": lm_eval.__version__},
    }
    from lm_eval.utils import handle_non_serializable

    text = json.dumps(record, indent=1, sort_keys=True, default=handle_non_serializable) + "\n"
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(output, text.encode())
    main = record["main"]
    log.info("%s on %s: %s %s = %s; %s", model_name, suite, main["task"], main["metric"], main["value"], output)
    return Path(output)


def main_metric(results: dict, tasks: list[str]) -> dict:
    """The number `eval summary` shows: the first task's first metric (lm-eval's order: acc before acc_norm)."""
    for task in tasks:
        for key, value in results.get(task, {}).items():
            # metrics are "<metric>,<filter>" (acc,none); alias and sample_len are not
            if "," in key and "_stderr," not in key and isinstance(value, (int, float)):
                return {"task": task, "metric": key, "value": value}
    return {"task": None, "metric": None, "value": None}


def read_harness(path: Path) -> dict:
    """A results file of `eval harness`, checked for what the summary reads."""
    try:
        record = json.loads(Path(path).read_text())
        if not all(k in record for k in ("model", "suite", "main")):
            raise KeyError("model, suite, main")
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise VicunaflowError(f"{path}: not a results file of `vicunaflow eval harness` ({err})") from None
    return record


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise VicunaflowError(
            f"`vicunaflow eval harness` needs lm-evaluation-harness ({err}): pip install 'vicunaflow[eval]' "
            f"({LM_EVAL_PIN})"
        ) from None
    return lm_eval, TaskManager


def _max_position_embeddings(model_path: Path) -> int:
    try:
        return int(json.loads((model_path / "config.json").read_text()).get("max_position_embeddings", 2048))
    except (OSError, ValueError) as err:
        raise VicunaflowError(f"{model_path}: no readable config.json ({err})") from None


def _model_option_args(options: ModelOptions) -> list[str]:
    """`vicunaflow serve` flags for the options that differ from the defaults."""
    import dataclasses

    args = []
    for field in dataclasses.fields(options):
        value = getattr(options, field.name)
        if value != getattr(DEFAULT_MODEL_OPTIONS, field.name):
            args.append(f"--{field.name}={str(value).lower() if isinstance(value, bool) else value}")
    return args

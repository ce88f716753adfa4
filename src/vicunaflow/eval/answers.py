"""`vicunaflow eval answers`: a model's answers to MT-bench questions, in FastChat's answer format.

What FastChat's gen_model_answer.py does, batched: every question is one conversation in the
Vicuna v1.1 template, answered turn by turn with the category's temperature (mt_bench.TEMPERATURES)
and up to 1024 new tokens. FastChat answers one question at a time; here all first turns go to the
engine together, then all second turns (each with its own first answer in the prompt), and so on.

Requests are queued before the engine starts, so which requests share a batch, and therefore every
sampled token, depends only on the inputs and the seed: a rerun on the same machine gives the same
answers, and greedy categories give the greedy answer of each prompt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from vicunaflow import VicunaflowError, template
from vicunaflow.eval.mt_bench import DEFAULT_TEMPERATURE, TEMPERATURES, Question, load_questions
from vicunaflow.loading import DEFAULT_MODEL_OPTIONS, ModelOptions

log = logging.getLogger(__name__)

ERROR_ANSWER = "ERROR"  # what FastChat writes for a turn it could not generate


def answers(
    *,
    model_path: Path,
    questions: Path,
    output: Path,
    model_id: str | None = None,
    max_new_tokens: int = 1024,
    seed: int = 42,
    model_options: ModelOptions = DEFAULT_MODEL_OPTIONS,
    max_batch_size: int = 16,
    max_context: int | None = None,
    cuda_graphs: bool = True,
    overwrite: bool = False,
) -> Path:
    """Answer every question turn by turn into a FastChat answer file (llm_judge's model_answer/*.jsonl).

    Arguments:
        model_path: a Hugging Face model directory (e.g. vicuna-7b-all-v1.1 or fine_tuning_output/<run>).
        questions: MT-bench questions, one JSON object per line: question_id, category, turns.
        output: the answer file to write (whole or absent): question_id, answer_id, model_id, choices, tstamp.
        model_id: the model's name in the answers and judgments; default: the directory name.
        max_new_tokens: longest answer to a turn, in tokens (FastChat: 1024).
        seed: sampling seed of the sampled categories (writing, roleplay, stem, humanities).
        model_options: how the model loads (vicunaflow.loading.ModelOptions: --device, --num-gpus, --load-8bit, ...).
        max_batch_size: conversations decoded together.
        max_context: attend over at most this many tokens; default: the model's max_position_embeddings.
        cuda_graphs: on one GPU, replay each decode step from a captured CUDA graph.
        overwrite: replace output files that exist but are not this verb's unchanged earlier outputs (default: refuse).
    """
    from vicunaflow.engine import Engine
    from vicunaflow.outputs import atomic_write_bytes, check_output_files

    log.info(
        "eval answers: model_path=%s questions=%s output=%s model_id=%s max_new_tokens=%d seed=%d %s max_batch_size=%d",
        model_path, questions, output, model_id, max_new_tokens, seed, model_options, max_batch_size,
    )  # fmt: skip
    if max_new_tokens < 1:
        raise VicunaflowError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    check_output_files({"--output": output}, inputs=[questions, model_path], overwrite=overwrite)
    loaded = load_questions(questions)
    model_id = model_id or Path(model_path).name
    model, tokenizer = model_options.load(model_path)
    with contextlib.closing(model):  # stops the other ranks of a multi-GPU model
        engine = Engine(
            model, tokenizer, max_batch_size=max_batch_size, max_context=max_context, seed=seed, cuda_graphs=cuda_graphs
        )
        started = time.perf_counter()
        replies = answer_questions(engine, loaded, max_new_tokens)
    log.info("answered %d questions in %.1fs", len(loaded), time.perf_counter() - started)
    lines = [json.dumps(answer_record(q, model_id, replies[q.id]), ensure_ascii=False) + "\n" for q in loaded]
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(output, "".join(lines).encode())
    log.info("wrote %d answers of %s to %s", len(lines), model_id, output)
    return Path(output)


def temperature_of(category: str) -> float:
    return TEMPERATURES.get(category, DEFAULT_TEMPERATURE)


def answer_questions(engine, questions: list[Question], max_new_tokens: int) -> dict[int | str, list[str]]:
    """question_id -> one reply per turn; turn k of every question is generated in one batch."""
    replies: dict[int | str, list[str]] = {q.id: [] for q in questions}
    for turn in range(max(len(q.turns) for q in questions)):
        asked = [q for q in questions if len(q.turns) > turn]
        jobs = [_job(engine, q, replies[q.id], max_new_tokens) for q in asked]
        _run(engine, [job for job in jobs if job.prompt_ids])
        for question, job in zip(asked, jobs, strict=True):
            replies[question.id].append(job.reply)
        finished = [job.finish_reason for job in jobs]
        log.info(
            "turn %d: %d answers (%d stopped, %d hit the length limit, %d did not fit)",
            turn + 1, len(jobs), finished.count("stop"), finished.count("length"), finished.count(None),
        )  # fmt: skip
    return replies


def answer_record(question: Question, model_id: str, turns: list[str]) -> dict:
    """One line of FastChat's answer format. answer_id is a digest of the content (FastChat: a random uuid)."""
    digest = hashlib.sha256(json.dumps([model_id, question.id, turns]).encode()).hexdigest()[:22]
    return {
        "question_id": question.id,
        "answer_id": digest,
        "model_id": model_id,
        "choices": [{"index": 0, "turns": turns}],
        "tstamp": time.time(),
    }


@dataclass
class _Job:
    question_id: int | str
    prompt_ids: list[int]  # empty: the conversation does not fit the context
    params: object  # SamplingParams
    reply: str = ERROR_ANSWER
    finish_reason: str | None = None
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


def _job(engine, question: Question, earlier: list[str], max_new_tokens: int) -> _Job:
    from dataclasses import replace

    from vicunaflow.engine import SamplingParams, fit_conversation

    turns: list[tuple[str, str | None]] = []
    for asked, reply in zip(question.turns, earlier, strict=False):
        turns += [(template.USER, asked), (template.ASSISTANT, reply)]
    turns += [(template.USER, question.turns[len(earlier)]), (template.ASSISTANT, None)]
    params = SamplingParams(temperature=temperature_of(question.category), top_p=1.0, max_new_tokens=max_new_tokens)
    try:
        kept, ids = fit_conversation(engine.tokenizer, turns, engine.context - 1)
    except VicunaflowError as err:
        log.warning(
            "question %s turn %d: %s; answered %r, as FastChat does", question.id, len(earlier) + 1, err, ERROR_ANSWER
        )
        return _Job(question.id, [], params)
    if len(kept) < len(turns):
        log.warning(
            "question %s turn %d: the conversation is longer than the context; its first %d turn(s) were left out",
            question.id, len(earlier) + 1, (len(turns) - len(kept)) // 2,
        )  # fmt: skip
    return _Job(question.id, ids, replace(params, max_new_tokens=engine.max_new_tokens(len(ids), max_new_tokens)))


def _run(engine, jobs: list[_Job]) -> None:
    """Queue every job, then run the engine until all are done (queued first: batches are reproducible)."""
    if not jobs:
        return
    for job in jobs:
        engine.submit(job.prompt_ids, job.params, _sink(job))
    engine.start()
    try:
        for job in jobs:
            job.done.wait()
    finally:
        engine.stop()
    failed = [job for job in jobs if job.finish_reason not in ("stop", "length")]
    if failed:
        raise VicunaflowError(
            f"generation failed for question {failed[0].question_id}: {failed[0].error or failed[0].finish_reason}"
        )


def _sink(job: _Job):
    pieces: list[str] = []

    def sink(event) -> None:
        pieces.append(event.text)
        if event.finish_reason is not None:
            # FastChat strips each answer (and the template's stop string, which our engine never emits).
            job.reply, job.finish_reason, job.error = "".join(pieces).strip(), event.finish_reason, event.error
            job.done.set()

    return sink

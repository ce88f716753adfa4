"""`vicunaflow eval judge`: MT-bench single-answer grading by any OpenAI-compatible chat endpoint.

What FastChat's gen_judgment.py does in its default mode (single), through plain HTTP: each answer is
graded on its first turn with single-v1 (single-math-v1 with the reference answer for math, reasoning
and coding), and two-turn questions again on the whole conversation with the -multi-turn forms. The
judge sees [system, user] messages at temperature 0 with at most 2048 tokens, and its score is the
`[[rating]]` in its reply (`[rating]` as a fallback); a reply without one scores -1, is written and
counted, and left out of averages, as FastChat's show_result.py does.

The output is FastChat's judgment file (model_judgment/<judge>_single.jsonl lines), append-only:
every judgment is written and flushed as soon as it arrives, and a rerun judges only what is not in
the file yet, so an interrupted run (a quota, Ctrl-C, a dead server) continues where it stopped; with
--partial, a finished run's --output counts too, so the same command again asks nothing.
Requests run `parallel` at a time; 408/429/5xx and dropped connections are retried with exponential
backoff (Retry-After honoured). A 400 or 413 refuses that one request (a prompt beyond a local judge's
context): its match is recorded as FastChat records it, judgment `$ERROR$ ...` and score -1, and the
run goes on; unless nothing but refusals comes back, which is the request's fault, not a prompt's.
401/403/404 and other refusals stop the run with the server's message, since every other request
would fail the same way.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from vicunaflow import VicunaflowError, __version__
from vicunaflow.eval.mt_bench import (
    BUILTIN_JUDGE_PROMPTS,
    NEED_REFERENCE,
    Question,
    answer_turns,
    judged_turns,
    judgment_key,
    load_answers,
    load_judge_prompts,
    load_questions,
    open_for_appending,
    prepare_journal,
    read_judgments,
)
from vicunaflow.eval.served import served

log = logging.getLogger(__name__)

# The prompts of single-answer grading (gen_judgment.py's make_judge_single), by (needs a reference, multi-turn).
PROMPT_NAMES = {
    (False, False): "single-v1",
    (True, False): "single-math-v1",
    (False, True): "single-v1-multi-turn",
    (True, True): "single-math-v1-multi-turn",
}
RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
RATING_FALLBACK = re.compile(r"\[(\d+\.?\d*)\]")
UNRATED = -1
# FastChat's API_ERROR_OUTPUT: the judgment of a match the judge would not grade (scored UNRATED)
ERROR_JUDGMENT = "$ERROR$"
RETRY_STATUS = {408, 409, 425, 429}  # and every 5xx
# Refusals of one request (a prompt beyond the judge's context, a body too large, a content filter): that
# match is recorded as an error and the others go on. 401/403/404 and the rest would refuse every request.
REQUEST_REFUSED_STATUS = {400, 413}
# This many refusals before any judgment arrived point to the requests themselves (--max-tokens beyond the
# judge's context, a parameter it rejects), not to prompts too long: the run stops and records none of them.
REFUSALS_BEFORE_A_JUDGMENT = 5
MAX_WAIT = 60.0


def judge(
    *,
    questions: Path,
    answers: Path,
    output: Path,
    judge_model: str,
    judge_base_url: str | None = None,
    partial: Path | None = None,
    reference: Path | None = None,
    judge_prompts: Path = BUILTIN_JUDGE_PROMPTS,
    judge_api_key_env: str = "OPENAI_API_KEY",
    judge_serve_model_path: Path | None = None,
    model: str | None = None,
    parallel: int = 8,
    max_tokens: int = 2048,
    retries: int = 6,
    retry_wait: float = 2.0,
    timeout: float = 600.0,
    overwrite: bool = False,
) -> Path:
    """Grade a model's answers with an LLM judge (MT-bench single mode) into a FastChat judgment file.

    Appends to --output (or --partial) and skips what it already holds: a rerun judges only what is missing.

    Arguments:
        questions: MT-bench questions (question_id, category, turns), one JSON object per line.
        answers: the model's answers in FastChat's format (`vicunaflow eval answers`).
        output: judgment file, appended to: question_id, model, judge, user_prompt, judgment, score, turn, tstamp.
        judge_model: the model name sent to the endpoint (gpt-4 for the published MT-bench numbers).
        judge_base_url: the endpoint's OpenAI v1 root, e.g. https://api.openai.com/v1 or http://host:8000/v1.
        partial: append the judgments to this file instead, and write --output whole at the end (then the
            partial file is removed): for workflows, whose failed jobs lose their outputs but not this file.
        reference: reference answers (answer format) for math, reasoning and coding, e.g. FastChat's
            reference_answer/gpt-4.jsonl; needed when the questions have those categories.
        judge_prompts: judge prompts in FastChat's judge_prompts.jsonl format; default: FastChat's four
            single-answer prompts, shipped with vicunaflow.
        judge_api_key_env: environment variable holding the endpoint's key (sent as a Bearer token);
            unset: no key is sent (a local server).
        judge_serve_model_path: instead of --judge-base-url: start `vicunaflow serve` of this model on a free
            local port for the run, serving it as --judge-model (offline demos: a model judging itself).
        model: the judged model's name in the judgments; default: the answers' model_id.
        parallel: requests to the judge at a time.
        max_tokens: longest judgment (FastChat: 2048).
        retries: attempts per request after 408/429/5xx or a dropped connection, with exponential backoff.
        retry_wait: seconds before the first retry; doubled each time, at most 60.
        timeout: seconds to wait for one judgment.
        overwrite: replace output files that exist but are not this verb's unchanged earlier outputs (default: refuse).
    """
    log.info(
        "eval judge: questions=%s answers=%s reference=%s output=%s judge_model=%s judge_base_url=%s "
        "judge_serve_model_path=%s parallel=%d",
        questions, answers, reference, output, judge_model, judge_base_url, judge_serve_model_path, parallel,
    )  # fmt: skip
    if (judge_base_url is None) == (judge_serve_model_path is None):
        raise VicunaflowError("give the judge as --judge-base-url URL or --judge-serve-model-path MODEL (one of them)")
    if parallel < 1:
        raise VicunaflowError(f"--parallel {parallel}: must be at least 1")
    loaded = load_questions(questions)
    from vicunaflow.outputs import check_output_files

    # the judgments journal (--partial, else --output) is both read and written: it is no input here, and
    # it is appended to, never replaced; --output is replaced only when the journal is --partial
    check_output_files(
        {"--output": output, "--partial": partial},
        inputs=[questions, answers, reference, judge_prompts, judge_serve_model_path],
        overwrite=True,
    )
    if partial is not None:
        check_output_files({"--output": output}, overwrite=overwrite)
    model_answers = load_answers(answers, loaded)
    references = load_answers(reference, loaded, what="reference answer") if reference is not None else None
    prompts = load_judge_prompts(judge_prompts)
    model = model or _model_id(model_answers, answers)
    matches = plan(loaded, model_answers, references, prompts, judge_model, model, answers, reference, judge_prompts)
    journal = Path(partial) if partial is not None else Path(output)
    written = {}
    for judgment in prepare_journal(journal):  # checked before a killed run's cut-off line is removed
        written.setdefault(judgment_key(judgment), []).append(judgment)
    _refuse_stale(written, matches, journal)
    finished = _finished_output(output, matches, overwrite) if partial is not None else {}
    todo = [m for m in matches if m.key not in written and m.key not in finished]
    log.info(
        "%d judgments for %s by %s: %d in %s already, %d to do",
        len(matches), model, judge_model, len(matches) - len(todo),
        journal if not finished else f"{output} and {journal}", len(todo),
    )  # fmt: skip
    if todo:
        api_key = os.environ.get(judge_api_key_env)
        with contextlib.ExitStack() as stack:
            if judge_serve_model_path is not None:
                judge_base_url = stack.enter_context(served(judge_serve_model_path, judge_model, timeout))
            client = stack.enter_context(
                JudgeClient(judge_base_url, judge_model, api_key, max_tokens, retries, retry_wait, timeout, parallel)
            )
            run_matches(client, todo, journal, parallel)
    latest = finished | {judgment_key(j): j for j in read_judgments(journal)}
    judgments = [latest[m.key] for m in matches]
    if partial is not None:
        from vicunaflow.outputs import atomic_write_bytes

        whole = "".join(json.dumps(j, ensure_ascii=False) + "\n" for j in judgments).encode()
        if not (Path(output).is_file() and Path(output).read_bytes() == whole):  # a finished run's: left as it is
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(output, whole)
        journal.unlink(missing_ok=True)
    _report_errors(judgments, Path(output), partial is not None)
    from vicunaflow.eval.summary import format_table, summarize_judgments

    log.info("MT-bench, %s judged by %s:\n%s", model, judge_model, format_table(summarize_judgments(judgments, loaded)))
    return Path(output)


# --- what to judge ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Match:
    question_id: int | str
    model: str
    judge_model: str
    prompt: dict  # a judge_prompts.jsonl record
    user_prompt: str
    turn: int  # 1: the first answer alone; 2: the whole two-turn conversation

    @property
    def key(self) -> tuple:
        """What was judged: the user prompt holds the question, the answer and the reference."""
        return (self.question_id, self.model, self.judge_model, self.prompt["name"], self.turn, self.user_prompt)


def plan(
    questions: list[Question],
    answers: dict,
    references: dict | None,
    prompts: dict[str, dict],
    judge_model: str,
    model: str,
    answers_path: Path,
    reference_path: Path | None = None,
    prompts_path: Path | None = None,
) -> list[Match]:
    """Every (question, turn) to judge with its filled-in prompt; refuses missing answers, references or prompts,
    and answers or references with fewer turns than their question, naming the file."""
    missing = [q.id for q in questions if q.id not in answers]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise VicunaflowError(f"{answers_path}: no answer to {len(missing)} question(s): {shown}")
    needs_reference = [q.id for q in questions if q.category in NEED_REFERENCE]
    if needs_reference and references is None:
        raise VicunaflowError(
            f"questions {', '.join(map(str, needs_reference[:10]))} ({'/'.join(NEED_REFERENCE[:3])}) are judged "
            "against reference answers: give --reference (MT-bench: reference_answer/gpt-4.jsonl)"
        )
    unreferenced = [i for i in needs_reference if i not in (references or {})]
    if unreferenced:
        raise VicunaflowError(f"no reference answer to question(s) {', '.join(map(str, unreferenced[:10]))}")
    absent = sorted(set(PROMPT_NAMES.values()) - set(prompts))
    if absent:
        raise VicunaflowError(
            f"{prompts_path}: the judge prompts lack {', '.join(absent)} (FastChat's judge_prompts.jsonl has them)"
        )
    matches = []
    for question, turn in judged_turns(questions):
        multi_turn = turn == 2  # the whole conversation, judged with its second answer
        turns = answer_turns(answers[question.id])
        if len(turns) < turn:
            raise VicunaflowError(
                f"{answers_path}: the answer to question {question.id} has {len(turns)} turn(s), "
                f"the question {len(question.turns)}"
            )
        with_reference = question.category in NEED_REFERENCE
        prompt = prompts[PROMPT_NAMES[with_reference, multi_turn]]
        reference = answer_turns(references[question.id]) if with_reference else None
        if reference is not None and len(reference) < turn:
            raise VicunaflowError(
                f"{reference_path}: the reference answer to question {question.id} has {len(reference)} turn(s), "
                f"the question {len(question.turns)}"
            )
        try:
            user_prompt = fill_prompt(prompt, question, turns, reference, multi_turn)
        except (KeyError, IndexError, ValueError) as err:  # str.format's: before any request is sent
            raise VicunaflowError(
                f"{prompts_path}: judge prompt {prompt['name']}: its prompt_template cannot be filled in "
                f"({_template_problem(err)}); it may use {', '.join(_template_fields(with_reference, multi_turn))}, "
                "and a literal brace is written doubled, {{ or }}"
            ) from None
        matches.append(Match(question.id, model, judge_model, prompt, user_prompt, turn))
    return matches


def fill_prompt(
    prompt: dict, question: Question, turns: list[str], reference: list[str] | None, multi_turn: bool
) -> str:
    """The judge's user message: FastChat's prompt_template with the question, answer(s) and reference(s)."""
    fields = {}
    if reference is not None:
        fields["ref_answer_1"] = reference[0]
        if multi_turn:
            fields["ref_answer_2"] = reference[1]
    if multi_turn:
        fields |= {
            "question_1": question.turns[0],
            "question_2": question.turns[1],
            "answer_1": turns[0],
            "answer_2": turns[1],
        }
    else:
        fields |= {"question": question.turns[0], "answer": turns[0]}
    return prompt["prompt_template"].format(**fields)


def _template_fields(with_reference: bool, multi_turn: bool) -> list[str]:
    """The {fields} fill_prompt fills in, as FastChat's run_judge_single does."""
    fields = ["{question_1}", "{question_2}", "{answer_1}", "{answer_2}"] if multi_turn else ["{question}", "{answer}"]
    if with_reference:
        fields += ["{ref_answer_1}", "{ref_answer_2}"] if multi_turn else ["{ref_answer_1}"]
    return fields


def _template_problem(err: Exception) -> str:
    if isinstance(err, KeyError):
        return f"unknown field {{{err.args[0]}}}"
    if isinstance(err, IndexError):
        return "a field without a name, {}"
    return str(err)  # "Single '}' encountered in format string"


def parse_rating(judgment: str) -> int | float:
    """The `[[rating]]` of a judgment (FastChat's patterns, `[rating]` as a fallback); -1 without one."""
    match = RATING.search(judgment) or RATING_FALLBACK.search(judgment)
    if match is None:
        return UNRATED
    value = match.group(1)
    return float(value) if "." in value else int(value)


def _model_id(answers: dict, path: Path) -> str:
    if any(not isinstance(a.get("model_id"), str) or not a["model_id"] for a in answers.values()):
        raise VicunaflowError(f"{path}: answers without a model_id; name the judged model with --model")
    ids = sorted({a["model_id"] for a in answers.values()})
    if len(ids) != 1:
        raise VicunaflowError(f"{path}: answers of several models ({', '.join(ids)}); name the one judged with --model")
    return ids[0]


def _finished_output(output: Path, matches: list[Match], overwrite: bool) -> dict[tuple, dict]:
    """With --partial: the judgments of these matches in an --output that a finished run wrote, so that the
    same command again asks nothing more. Its other judgments (of earlier answers) go when it is rewritten."""
    output = Path(output)
    if not output.is_file():
        return {}
    try:
        judgments = read_judgments(output)
    except VicunaflowError as err:
        if not overwrite:  # check_output_files let it through as this verb's: it is no judgment file now
            raise
        log.info("%s is replaced (--overwrite) and not read: %s", output, err)
        return {}
    current = {m.key for m in matches}
    return {judgment_key(j): j for j in judgments if judgment_key(j) in current}


def _report_errors(judgments: list[dict], output: Path, partial: bool) -> None:
    """Say at the end how many matches the judge refused: their -1 is no rating, and no rerun asks again."""
    errored = [j for j in judgments if _is_error(j)]
    if not errored:
        return
    first = errored[0]
    log.warning(
        "%d of %d matches could not be judged (first: question %s, turn %d: %s): recorded as FastChat does, "
        "judgment %s and score %d, left out of averages; to ask again (e.g. once the judge has a longer "
        "context), remove their lines from %s and rerun%s",
        len(errored), len(judgments), first["question_id"], first["turn"], first["judgment"][:300],
        ERROR_JUDGMENT, UNRATED, output, " with --overwrite (the file is then changed)" if partial else "",
    )  # fmt: skip


def _is_error(judgment: dict) -> bool:
    return isinstance(judgment.get("judgment"), str) and judgment["judgment"].startswith(ERROR_JUDGMENT)


def _refuse_stale(written: dict, matches: list[Match], path: Path) -> None:
    """A judgment of the same question, model, judge and turn but of another answer (answers generated
    again) would be mixed with the new ones: refuse rather than average both."""
    current = {m.key for m in matches}
    slots = {m.key[:5] for m in matches}
    stale = [key for key in written if key[:5] in slots and key not in current]
    if stale:
        question_id, model, _, _, turn, _ = stale[0]
        raise VicunaflowError(
            f"{path}: holds {len(stale)} judgment(s) of other answers or references (first: question {question_id}, "
            f"turn {turn}, model {model}); remove the file to judge the new answers, or write to another --output"
        )


# --- the judgment file -----------------------------------------------------------------------------


def run_matches(client: JudgeClient, matches: list[Match], output: Path, parallel: int) -> None:
    """Judge `matches` `parallel` at a time, appending each judgment to `output` as it arrives.

    A request the judge refuses on its own (RequestRefused: a prompt beyond its context) fails that match
    only: it is written as FastChat writes it, judgment $ERROR$ and score -1, and the run goes on. Until a
    first judgment arrives such refusals are held back: REFUSALS_BEFORE_A_JUDGMENT of them mean that every
    request is refused, and stop the run without recording any, so that a rerun asks them again.
    Any other error stops the run: requests not started are dropped, those waiting to retry give up,
    those in flight finish and are kept. That error is raised once every worker has stopped.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    lock, started = threading.Lock(), time.perf_counter()
    judged, unrated, refused, errors = 0, 0, 0, []
    held_back: list[dict] = []  # refusals before the first judgment
    with open_for_appending(output) as out:

        def write(result: dict) -> None:  # under the lock
            nonlocal judged, unrated, refused
            out.write(json.dumps(result, ensure_ascii=False) + "\n")
            out.flush()
            if _is_error(result):
                refused += 1
            else:
                judged, unrated = judged + 1, unrated + (result["score"] == UNRATED)
            if (judged + refused) % 10 == 0 or judged + refused == len(matches):
                log.info(
                    "%d/%d judged (%d without a rating), %d refused, %.0fs",
                    judged, len(matches), unrated, refused, time.perf_counter() - started,
                )  # fmt: skip

        def one(match: Match) -> None:
            if client.stop.is_set():
                return
            try:
                judgment, score = client.complete(match.prompt["system_prompt"], match.user_prompt), None
            except Stopped:
                return
            except RequestRefused as err:
                judgment, score = f"{ERROR_JUDGMENT} {err}", UNRATED  # a number in the message is no rating
            except BaseException as err:
                client.stop.set()
                with lock:
                    errors.append(err)
                return
            result = {
                "question_id": match.question_id,
                "model": match.model,
                "judge": [match.judge_model, match.prompt["name"]],
                "user_prompt": match.user_prompt,
                "judgment": judgment,
                "score": parse_rating(judgment) if score is None else score,
                "turn": match.turn,
                "tstamp": time.time(),
            }
            with lock:
                if score is None:  # a judgment: the requests are fine, the refusals held back were their prompts'
                    for held in held_back:
                        write(held)
                    held_back.clear()
                    write(result)
                    return
                log.warning("judge: question %s, turn %d not judged: %s", match.question_id, match.turn, judgment)
                if judged:
                    write(result)
                    return
                held_back.append(result)
                if len(held_back) == REFUSALS_BEFORE_A_JUDGMENT and not errors:
                    client.stop.set()
                    errors.append(
                        VicunaflowError(
                            f"{client.url}: the first {len(held_back)} requests were all refused "
                            f"({judgment.removeprefix(ERROR_JUDGMENT).strip()}): the request itself, it seems, not "
                            "a prompt too long (--max-tokens beyond the judge's context? a parameter it does not "
                            "take?); none was recorded, so a rerun asks them again"
                        )
                    )

        with concurrent.futures.ThreadPoolExecutor(parallel, thread_name_prefix="judge") as pool:
            try:
                for future in [pool.submit(one, m) for m in matches]:
                    future.result()
            except BaseException:  # Ctrl-C: stop the workers, keep what they wrote
                client.stop.set()
                raise
        if not errors:  # no judgment came, and fewer refusals than REFUSALS_BEFORE_A_JUDGMENT: those prompts'
            for held in held_back:
                write(held)
    if errors:
        raise errors[0]
    if unrated:
        log.warning(
            "%d of %d judgments have no [[rating]]: scored %d, kept in %s and left out of averages",
            unrated, judged, UNRATED, output,
        )  # fmt: skip


# --- the endpoint ----------------------------------------------------------------------------------


class Retryable(Exception):
    pass


class RequestRefused(Exception):
    """The judge refused this one request (REQUEST_REFUSED_STATUS): its match fails, the others go on."""


class Stopped(Exception):
    """Another request failed: give up waiting to retry."""


class JudgeClient:
    """POST /chat/completions to an OpenAI-compatible endpoint, with retries for what may pass."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None,
        max_tokens: int,
        retries: int,
        retry_wait: float,
        timeout: float,
        connections: int = 8,
    ):
        import httpx

        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.max_tokens = model, max_tokens
        self.retries, self.retry_wait = retries, retry_wait
        self.stop = threading.Event()
        headers = {"User-Agent": f"vicunaflow/{__version__}"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)),
            limits=httpx.Limits(max_connections=connections),
        )
        # httpx logs every request at INFO: one line per judgment would drown the progress lines
        logging.getLogger("httpx").setLevel(logging.WARNING)

    def __enter__(self) -> JudgeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()

    def complete(self, system_prompt: str, user_prompt: str) -> str:
        """The judge's reply to [system, user] at temperature 0 (gen_judgment.py's request)."""
        import httpx

        body = {
            "model": self.model,
            "messages": [{"role": "system", "content": system_prompt}, {"role": "user", "content": user_prompt}],
            "n": 1,
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        attempt = 0
        while True:
            retry_after = None
            try:
                response = self.client.post(self.url, json=body)
                if response.status_code == 200:
                    return _reply_text(response, self.url)
                retry_after = _retry_after(response)
                _raise_for_status(response, self.url, self.model)
            except (Retryable, httpx.TransportError) as err:
                attempt += 1
                reason = str(err) or type(err).__name__
                if attempt > self.retries:
                    raise VicunaflowError(
                        f"{self.url}: failed after {self.retries} retries ({reason}); rerun to continue: "
                        "the judgments written so far are kept"
                    ) from None
                wait = min(retry_after if retry_after is not None else self.retry_wait * 2 ** (attempt - 1), MAX_WAIT)
                log.warning("judge: %s; retry %d/%d in %.1fs", reason, attempt, self.retries, wait)
                if self.stop.wait(wait):
                    raise Stopped from None


def _reply_text(response, url: str) -> str:
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise VicunaflowError(f"{url}: not an OpenAI chat completion: {response.text[:300]!r}") from None
    return content or ""


def _retry_after(response) -> float | None:
    value = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _raise_for_status(response, url: str, model: str) -> None:
    status = response.status_code
    if status in RETRY_STATUS or status >= 500:
        raise Retryable(f"HTTP {status}: {_server_message(response)}")
    if status in REQUEST_REFUSED_STATUS:
        raise RequestRefused(f"HTTP {status}: {_server_message(response)}")
    hint = {
        401: "check the key in --judge-api-key-env",
        403: "the key may not use this model",
        404: f"check --judge-base-url (the OpenAI v1 root, ending in /v1) and the model name {model!r}",
    }.get(status, "the request was refused")
    raise VicunaflowError(f"{url}: HTTP {status}: {_server_message(response)} ({hint})")


def _server_message(response) -> str:
    """The `error.message` of an OpenAI-style error body, else the start of the body."""
    try:
        error = response.json().get("error")
        message = error.get("message") if isinstance(error, dict) else error
        if message:
            return str(message)
    except (ValueError, AttributeError):
        pass
    return response.text[:300].strip() or response.reason_phrase


# --- a local judge: `vicunaflow serve` for the length of the run -----------------------------------
# (also `eval harness`'s server: vicunaflow.eval.harness)

"""MT-bench's files, as FastChat's llm_judge reads and writes them, and where they come from.

    questions   {"question_id", "category", "turns": [t1, t2, ...], "reference"?}   one per line
    answers     {"question_id", "answer_id", "model_id", "choices": [{"index", "turns"}], "tstamp"}
    references  the answers format (FastChat's reference_answer/gpt-4.jsonl)
    prompts     {"name", "type", "system_prompt", "prompt_template", "description", "category",
                 "output_format"} (FastChat's judge_prompts.jsonl)

Every reader names the file and line of a bad record. `download_mt_bench` fetches the 80 questions,
GPT-4's reference answers and the judge prompts from FastChat's repository at a pinned commit,
md5-verified, through the download helpers; the built-in set (assets/) is a small offline stand-in.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from vicunaflow import VicunaflowError, require_file

if TYPE_CHECKING:
    from vicunaflow.download.http import FetchFailed

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# A few questions across the eight categories, math, reasoning and coding with references: offline demo and tests.
BUILTIN_QUESTIONS = ASSETS / "mt_bench_builtin_questions.jsonl"
BUILTIN_REFERENCE = ASSETS / "mt_bench_builtin_reference.jsonl"
# FastChat's four single-answer grading prompts, verbatim from fastchat/llm_judge/data/judge_prompts.jsonl
# at FASTCHAT_REVISION (lines 5-8: single-v1, single-math-v1 and their -multi-turn forms).
BUILTIN_JUDGE_PROMPTS = ASSETS / "judge_prompts.jsonl"

# FastChat v0.2.36; MT-bench's data files have not changed since #1854 (2023-07).
FASTCHAT_REVISION = "b21d0f780ca4472a13714262a0790f2ee1ade659"
FASTCHAT_RAW = "https://raw.githubusercontent.com/lm-sys/FastChat"
DATA_DIR = "fastchat/llm_judge/data"
# file under DATA_DIR -> (name in our output folder, md5 at FASTCHAT_REVISION)
MT_BENCH_FILES = {
    "mt_bench/question.jsonl": ("question.jsonl", "9d06961dbdbef8ffa751297a167785bc"),
    "mt_bench/reference_answer/gpt-4.jsonl": ("reference_answer/gpt-4.jsonl", "7a38d3c9d5253c5660a4972a8b5fa6d4"),
    "judge_prompts.jsonl": ("judge_prompts.jsonl", "d59fdeda2ea87be6141beb0f8ecc6c24"),
}

# gen_model_answer.py's sampling temperature per category; other categories sample at 0.7, as there.
TEMPERATURES = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
    "arena-hard-200": 0.0,
}
DEFAULT_TEMPERATURE = 0.7
# Categories judged against a reference answer (single-math-v1), as gen_judgment.py does.
NEED_REFERENCE = ("math", "reasoning", "coding", "arena-hard-200")


def download_mt_bench(
    *,
    output_dir: Path = Path("resources/mt_bench"),
    revision: str = FASTCHAT_REVISION,
    base_url: str = FASTCHAT_RAW,
    staging_dir: Path = Path(".staging"),
    retries: int = 8,
    retry_wait: float = 1.0,
    timeout: float = 60.0,
    overwrite: bool = False,
) -> Path:
    """Fetch MT-bench's questions, GPT-4 reference answers and judge prompts from FastChat's repository.

    Writes question.jsonl, reference_answer/gpt-4.jsonl and judge_prompts.jsonl (FastChat's own
    layout and bytes) and vicunaflow.json. At the pinned revision every file is md5-verified; another
    revision is fetched unverified (a warning says so) and still checked line by line.

    Arguments:
        output_dir: folder to write (whole or absent).
        revision: FastChat commit (or tag) to fetch from; the default is v0.2.36, whose md5 sums are known.
        base_url: raw-file root in GitHub's layout, `<base_url>/<revision>/<path>`; a mirror works too.
        staging_dir: partial downloads, outside any workflow output.
        retries: attempts per file after a dropped connection, timeout or 5xx, with exponential backoff.
        retry_wait: seconds before the first retry; doubled each time, at most 60.
        timeout: seconds without data before a connection counts as dropped.
        overwrite: replace an output_dir that exists but is not a complete vicunaflow output (default: refuse).
    """
    from vicunaflow.download.http import Fetcher, FetchFailed, Remote, RemoteFile, place_file
    from vicunaflow.outputs import atomic_output_dir, check_output_dir, write_manifest

    check_output_dir(output_dir, inputs=[staging_dir], overwrite=overwrite)  # before any download
    log.info("download mt-bench: revision=%s base_url=%s output_dir=%s", revision, base_url, output_dir)
    verified = revision == FASTCHAT_REVISION
    if not verified:
        log.warning("revision %s: md5 sums are known only for %s; fetching unverified", revision, FASTCHAT_REVISION)
    remote = Remote(f"{base_url.rstrip('/')}/{revision}/{DATA_DIR}/*")
    files = {path: RemoteFile(path, md5 if verified else None) for path, (_, md5) in MT_BENCH_FILES.items()}
    with Fetcher(
        remote, Path(staging_dir) / "mt_bench", jobs=1, retries=retries, retry_wait=retry_wait, timeout=timeout
    ) as fetcher:
        try:
            staged = {path: fetcher.fetch(file) for path, file in files.items()}
        except FetchFailed as err:  # its way around names download llama's options: say eval download's own
            raise VicunaflowError(
                f"{err.problem}; {without_fastchat(err, output_dir=output_dir, revision=revision, base_url=base_url)}"
            ) from None
        with atomic_output_dir(output_dir, inputs=[staging_dir], overwrite=overwrite) as out:
            for path, (name, _) in MT_BENCH_FILES.items():
                place_file(staged[path], out / name, "copy")
            questions = load_questions(out / "question.jsonl")
            load_answers(out / "reference_answer/gpt-4.jsonl", questions)
            load_judge_prompts(out / "judge_prompts.jsonl")
            write_manifest(
                out, inputs=[out / name for name, _ in MT_BENCH_FILES.values()], kind="mt-bench", revision=revision
            )
        for path, file in files.items():
            staged[path].unlink(missing_ok=True)
            (fetcher.staging / f"{file.key}.lock").unlink(missing_ok=True)
    log.info("wrote %d questions, references and judge prompts to %s", len(questions), output_dir)
    return Path(output_dir)


def without_fastchat(err: FetchFailed, *, output_dir: Path, revision: str, base_url: str) -> str:
    """What to do when FastChat's server would not give a file: what to check, a mirror through --base-url (the
    workflow: eval.mt_bench.base_url), or FastChat's files put by hand where eval download writes them, the
    workflow's eval rules reading them there. Only eval download's own options: it has no --source local."""
    import shlex

    from vicunaflow.download.http import redact_url

    pinned = [] if revision == FASTCHAT_REVISION else ["--revision", revision]
    command = shlex.join(["vicunaflow", "eval", "download", "--output-dir", str(output_dir), *pinned])
    mirror = (
        f"`{command} --base-url MIRROR` (MIRROR: a raw-file root in GitHub's layout, "
        f"MIRROR/<revision>/{DATA_DIR}/<file>; in the workflow's config: eval.mt_bench.base_url)"
    )
    theirs, ours = ", ".join(MT_BENCH_FILES), ", ".join(name for name, _ in MT_BENCH_FILES.values())
    by_hand = (
        f"or, with FastChat's files at hand, copy {DATA_DIR}/{{{theirs}}} to {output_dir}/{{{ours}}}, "
        "where eval download would have written them"
    )
    if err.status == 404:
        return (
            f"check --revision ({revision}: a FastChat commit or tag) and --base-url ({redact_url(base_url)}): "
            f"each file is read at <base-url>/<revision>/{DATA_DIR}/<file>; or fetch from a mirror, {mirror}, {by_hand}"
        )
    if err.status in (401, 403):
        return (
            "FastChat's files are public and eval download sends no credentials: give a --base-url that serves "
            f"them without a login, {mirror}, {by_hand}"
        )
    if err.unreachable:
        return f"check the network (and any proxy settings), or fetch from a mirror you can reach, {mirror}, {by_hand}"
    return (
        f"try again later, or with more --retries and a longer --timeout, or fetch from a mirror, {mirror}, {by_hand}"
    )


# --- readers ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    id: int | str
    category: str
    turns: list[str]
    record: dict  # the line as read, written back unchanged where FastChat expects it


def read_jsonl(path: Path, what: str) -> list[tuple[int, object]]:
    """(line number, parsed value) of every non-empty line; a line that is not JSON names file:line."""
    path = require_file(path, f"{what} file", f"a JSONL file of {what}s, one a line")
    records = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise VicunaflowError(
                    f"{path}:{number}: not UTF-8 (byte {err.start} of the line); save it as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise VicunaflowError(
                    f"{path}:{number}: not valid JSON ({err.msg}); give one {what} per line"
                ) from None
    return records


def load_questions(path: Path) -> list[Question]:
    """Questions in file order; a malformed line or a repeated question_id names file and line."""
    questions, seen = [], {}
    for number, record in read_jsonl(path, "question"):
        where = f"{path}:{number}"
        question_id = _question_id(record, where)
        if not isinstance(record.get("category"), str):
            raise VicunaflowError(f"{where}: question {question_id}: category must be a string")
        turns = record.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise VicunaflowError(
                f"{where}: question {question_id}: turns must be a non-empty list of non-empty strings"
            )
        if question_id in seen:
            raise VicunaflowError(f"{where}: question_id {question_id} repeats line {seen[question_id]}")
        seen[question_id] = number
        questions.append(Question(question_id, record["category"], turns, record))
    if not questions:
        raise VicunaflowError(f"{path}: no questions")
    return questions


def load_answers(path: Path, questions: list[Question], what: str = "answer") -> dict[int | str, dict]:
    """question_id -> answer record; checks the format and that every id is a known question.

    A question answered twice keeps its last answer, as FastChat's load_model_answers does (its
    generator appends on reruns), with a warning.
    """
    known = {q.id: q for q in questions}
    answers: dict[int | str, dict] = {}
    lines: dict[int | str, int] = {}
    for number, record in read_jsonl(path, what):
        where = f"{path}:{number}"
        question_id = _question_id(record, where)
        if question_id not in known:
            raise VicunaflowError(
                f"{where}: {what} for question_id {question_id!r}, which is not in the questions file; "
                "are the answers for another question set?"
            )
        choices = record.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise VicunaflowError(f"{where}: question {question_id}: choices must be a non-empty list of objects")
        turns = choices[0].get("turns")
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise VicunaflowError(f"{where}: question {question_id}: choices[0].turns must be a list of strings")
        if question_id in answers:
            log.warning(
                "%s: question %s answered again (line %d); the last answer counts",
                where,
                question_id,
                lines[question_id],
            )
        answers[question_id], lines[question_id] = record, number
    return answers


def answer_turns(answer: dict) -> list[str]:
    return answer["choices"][0]["turns"]


def load_judge_prompts(path: Path) -> dict[str, dict]:
    """name -> prompt record (FastChat's judge_prompts.jsonl format)."""
    prompts = {}
    for number, record in read_jsonl(path, "judge prompt"):
        fields = ("name", "type", "system_prompt", "prompt_template", "output_format")
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in fields):
            raise VicunaflowError(f"{path}:{number}: a judge prompt needs string fields {', '.join(fields)}")
        prompts[record["name"]] = record
    return prompts


def _question_id(record: object, where: str) -> int | str:
    """A question or answer line's question_id: an integer or a non-empty string."""
    if not isinstance(record, dict):
        raise VicunaflowError(f"{where}: not a JSON object")
    question_id = record.get("question_id")
    if isinstance(question_id, bool) or not isinstance(question_id, int | str) or question_id == "":
        raise VicunaflowError(f"{where}: question_id must be an integer or a string, got {question_id!r}")
    return question_id


def judged_turns(questions: list[Question]) -> list[tuple[Question, int]]:
    """The (question, turn) pairs `eval judge` grades, in its order (FastChat's gen_judgment.py): every first turn,
    then turn 2 of the questions of exactly two turns, each judged as the whole conversation."""
    return [(question, 1) for question in questions] + [
        (question, 2) for question in questions if len(question.turns) == 2
    ]


def judgment_key(judgment: dict) -> tuple:
    """What identifies a judgment: question, model, judge, prompt, turn and the exact prompt judged."""
    judge_model, prompt_name = judgment["judge"]
    return (
        judgment["question_id"], judgment["model"], judge_model, prompt_name, judgment["turn"], judgment["user_prompt"]
    )  # fmt: skip


def prepare_journal(path: Path) -> list[dict]:
    """The judgments of a file the judge is about to append to, made ready for appending.

    The file is checked first and refused, untouched, when it is not a judgment file (a mistyped --output).
    Then a last line cut off mid-write by a killed run is removed; a complete last judgment lacking only its
    newline (an edited file) is kept, and open_for_appending gives it one."""
    path = Path(path)
    judgments, cut_at = _scan_judgments(path)
    if cut_at is not None:
        log.warning("%s: its last line is incomplete (an interrupted run); removing it before appending", path)
        with open(path, "r+b") as f:
            f.truncate(cut_at)
    return judgments


def open_for_appending(path: Path) -> TextIO:
    """`path` opened to append judgments, the first on a line of its own after a last line without its newline."""
    out = open(path, "a", encoding="utf-8")  # noqa: SIM115 (the caller closes it)
    if out.tell():
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                out.write("\n")
    return out


def read_judgments(path: Path) -> list[dict]:
    """The judgments written so far. A last line cut off mid-write (a killed run) is skipped, with a
    warning, and left in the file: only the judge, which appends, removes it (prepare_journal)."""
    path = Path(path)
    judgments, cut_at = _scan_judgments(path)
    if cut_at is not None:
        log.warning("%s: its last line is incomplete (an interrupted judge run); skipping it", path)
    return judgments


# How every line the judge writes starts (json.dumps of a record whose first key is question_id).
JUDGMENT_LINE_START = b'{"question_id": '


def _scan_judgments(path: Path) -> tuple[list[dict], int | None]:
    """(judgments, where a cut-off last line starts, or None). A last line without its newline counts as
    cut off only when it does not parse and follows judgments or starts as the judge writes them: a file
    whose one line is no judgment is refused as a whole, not taken for a killed run's remains."""
    if not path.exists():
        return [], None
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    judgments = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            judgments.append(_parse_judgment(line, path, number, first=not judgments))
    if not tail.strip():
        return judgments, None
    try:
        json.loads(tail.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):  # a cut may also split a character
        if judgments or tail.startswith(JUDGMENT_LINE_START):
            return judgments, len(data) - len(tail)
    judgments.append(_parse_judgment(tail, path, len(lines) + 1, first=not judgments))
    return judgments, None


def _parse_judgment(line: bytes, path: Path, number: int, first: bool) -> dict:
    """One judgment line, checked; anything else names file:line. first: no judgment precedes it, so the file
    is likely no judgment file at all (a mistyped path), which is to be left alone, not edited."""
    fix = (
        "not a judgment file of `vicunaflow eval judge`? give another path" if first else "remove the line or the file"
    )
    try:
        judgment = json.loads(line.decode("utf-8"))
        if not isinstance(judgment, dict):
            raise TypeError("not a JSON object")
        judgment_key(judgment)
        float(judgment["score"])
    except UnicodeDecodeError as err:
        problem = f"not UTF-8, byte {err.start} of the line"
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        problem = f"{type(err).__name__}: {err}"
    else:
        problem = _judgment_problem(judgment)
    if problem:
        raise VicunaflowError(f"{path}:{number}: not a judgment ({problem}); {fix}")
    return judgment


def _judgment_problem(judgment: dict) -> str | None:
    """What makes a parsed line no judgment that can be averaged: a score that is no number (the text "8" would be
    added to numbers), a judge that is no [judge model, prompt name] pair ("ab" unpacks as judge "a")."""
    score, judge, question_id = judgment["score"], judgment["judge"], judgment["question_id"]
    if isinstance(score, bool) or not isinstance(score, int | float):
        return f"score {score!r} is not a number"
    if not (isinstance(judge, list) and len(judge) == 2 and all(isinstance(part, str) for part in judge)):
        return f"judge {judge!r} is not [judge model, prompt name]"
    # a list would be no dictionary key (a TypeError traceback) and no question
    if isinstance(question_id, bool) or not isinstance(question_id, int | str) or question_id == "":
        return f"question_id {question_id!r} is not an integer or a string"
    if not isinstance(judgment["model"], str) or not isinstance(judgment["user_prompt"], str):
        return "model and user_prompt must be strings"
    if isinstance(judgment["turn"], bool) or not isinstance(judgment["turn"], int):
        return f"turn {judgment['turn']!r} is not an integer"
    return None

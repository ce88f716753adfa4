"""vicunaflow.eval against FastChat's own llm_judge code, transformers and a fake OpenAI judge on 127.0.0.1."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import inspect
import json
import math
import re
import shutil
import sys
import threading
import types
from pathlib import Path

import pytest

from vicunaflow import BUILTIN_CONVERSATIONS, VicunaflowError
from vicunaflow.eval import mt_bench
from vicunaflow.eval.judge import judge, parse_rating
from vicunaflow.eval.mt_bench import BUILTIN_JUDGE_PROMPTS, BUILTIN_QUESTIONS, BUILTIN_REFERENCE, read_judgments
from vicunaflow.eval.summary import summary

N_QUESTIONS = 8  # the built-in set: one per MT-bench category, two turns each
N_JUDGMENTS = 2 * N_QUESTIONS  # first turns, then whole conversations


@pytest.fixture(scope="module")
def fastchat():
    """FastChat's llm_judge modules. common.py imports the anthropic client, which its loaders never use."""
    with pytest.MonkeyPatch.context() as patch:
        try:
            import anthropic  # noqa: F401
        except ImportError:
            patch.setitem(sys.modules, "anthropic", types.ModuleType("anthropic"))
        import fastchat.llm_judge.common as common
        import fastchat.llm_judge.gen_judgment as gen_judgment
        import fastchat.llm_judge.show_result as show_result

        yield types.SimpleNamespace(common=common, gen_judgment=gen_judgment, show_result=show_result)


def fake_answers(path: Path, model_id: str = "tiny-model") -> Path:
    """Answers in FastChat's format without running a model."""
    lines = []
    for q in mt_bench.load_questions(BUILTIN_QUESTIONS):
        turns = [f"answer {i + 1} to question {q.id}" for i in range(len(q.turns))]
        record = {"question_id": q.id, "answer_id": f"a{q.id}", "model_id": model_id}
        lines.append(json.dumps({**record, "choices": [{"index": 0, "turns": turns}], "tstamp": 0.0}) + "\n")
    path.write_text("".join(lines))
    return path


# --- a fake OpenAI-compatible judge --------------------------------------------------------------


# vicunaflow serve's refusal (vLLM's reads alike); the bracketed number is no rating
CONTEXT_MESSAGE = "This model's maximum context length is 2048 tokens; the prompt is [3012] tokens."


class FakeJudge:
    """POST /v1/chat/completions. `faults`: statuses answered to the next requests, in order;
    `always`: a status answered to every request; `too_long`: text whose requests are refused as a local
    judge refuses a prompt beyond its context (400 context_length_exceeded); `reply`: the judgment text."""

    def __init__(self):
        self.faults: list[int] = []
        self.always: int | None = None
        self.too_long: str | None = None
        self.reply = "The answer is fine. Rating: [[7]]"
        self.requests: list[dict] = []
        self.lock = threading.Lock()

    def handle(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
        with self.lock:
            self.requests.append({"body": body, "authorization": handler.headers.get("Authorization")})
            status = self.always or (self.faults.pop(0) if self.faults else 200)
        if handler.path != "/v1/chat/completions":
            status = 404
        too_long = self.too_long is not None and self.too_long in body["messages"][-1]["content"]
        messages = {401: "Incorrect API key provided: sk-wrong.", 404: "The model `gpt-5` does not exist"}
        if too_long:
            status, payload = 400, {"error": {"message": CONTEXT_MESSAGE, "code": "context_length_exceeded"}}
        elif status == 200:
            payload = {"choices": [{"index": 0, "message": {"role": "assistant", "content": self.reply}}]}
        else:
            payload = {"error": {"message": messages.get(status, f"fault {status}"), "type": "fake"}}
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        if status == 429:
            handler.send_header("Retry-After", "0")
        handler.end_headers()
        handler.wfile.write(data)


@pytest.fixture
def fake_judge():
    judge_state = FakeJudge()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            judge_state.handle(self)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    judge_state.base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield judge_state
    server.shutdown()
    server.server_close()


def run_judge(tmp_path: Path, fake: FakeJudge, **kwargs) -> Path:
    options = {
        "questions": BUILTIN_QUESTIONS,
        "answers": tmp_path / "answers.jsonl",
        "reference": BUILTIN_REFERENCE,
        "output": tmp_path / "judgment.jsonl",
        "judge_base_url": fake.base_url,
        "judge_model": "gpt-4",
        "parallel": 3,
        "retry_wait": 0.01,
    } | kwargs
    if not Path(options["answers"]).exists():
        fake_answers(Path(options["answers"]))
    return judge(**options)


# --- files: FastChat reads ours -------------------------------------------------------------------


def test_fastchat_reads_the_builtin_files(fastchat, tmp_path: Path) -> None:
    questions = fastchat.common.load_questions(str(BUILTIN_QUESTIONS), None, None)
    assert [q["question_id"] for q in questions] == [q.id for q in mt_bench.load_questions(BUILTIN_QUESTIONS)]
    assert {q["category"] for q in questions} == set(mt_bench.TEMPERATURES) - {"arena-hard-200"}
    prompts = fastchat.common.load_judge_prompts(str(BUILTIN_JUDGE_PROMPTS))
    judges = fastchat.gen_judgment.make_judge_single("gpt-4", prompts)  # FastChat finds the four it grades with
    assert {j.prompt_template["name"] for j in judges.values()} == set(
        mt_bench.load_judge_prompts(BUILTIN_JUDGE_PROMPTS)
    )
    (tmp_path / "reference").mkdir()
    shutil.copy(BUILTIN_REFERENCE, tmp_path / "reference" / "gpt-4.jsonl")
    references = fastchat.common.load_model_answers(str(tmp_path / "reference"))
    fastchat.common.check_data(questions, references, references, [], judges)  # a reference for each math question


def test_judge_prompts_and_scores_are_fastchats(fastchat, fake_judge, tmp_path: Path, monkeypatch) -> None:
    """FastChat's own gen_judgment matches, played with our judge's replies, give our user prompts and scores."""
    fake_judge.reply = "Correct and clear. [[8.5]]"
    output = run_judge(tmp_path, fake_judge)
    ours = {(j["question_id"], j["turn"]): j for j in read_judgments(output)}
    assert len(ours) == N_JUDGMENTS
    assert all(j["score"] == 8.5 and j["judge"][0] == "gpt-4" for j in ours.values())

    common, gen = fastchat.common, fastchat.gen_judgment
    answer_dir, reference_dir = tmp_path / "model_answer", tmp_path / "reference_answer"
    answer_dir.mkdir(), reference_dir.mkdir()
    shutil.copy(tmp_path / "answers.jsonl", answer_dir / "tiny-model.jsonl")
    shutil.copy(BUILTIN_REFERENCE, reference_dir / "gpt-4.jsonl")
    questions = common.load_questions(str(BUILTIN_QUESTIONS), None, None)
    answers = common.load_model_answers(str(answer_dir))
    references = common.load_model_answers(str(reference_dir))
    judges = gen.make_judge_single("gpt-4", common.load_judge_prompts(str(BUILTIN_JUDGE_PROMPTS)))
    math_questions = [q for q in questions if q["category"] in common.NEED_REF_CATS]
    other_questions = [q for q in questions if q["category"] not in common.NEED_REF_CATS]
    matches = gen.make_match_single(other_questions, ["tiny-model"], answers, judges["default"])
    matches += gen.make_match_single(math_questions, ["tiny-model"], answers, judges["math"], None, references)
    matches += gen.make_match_single(other_questions, ["tiny-model"], answers, judges["default-mt"], multi_turn=True)
    matches += gen.make_match_single(
        math_questions, ["tiny-model"], answers, judges["math-mt"], None, references, multi_turn=True
    )
    sent = []

    def chat_completion_openai(model, conv, temperature, max_tokens, api_dict=None):
        sent.append((conv.to_openai_api_messages(), temperature, max_tokens))
        return fake_judge.reply

    monkeypatch.setattr(common, "chat_completion_openai", chat_completion_openai)
    theirs = [common.play_a_match_single(m, output_file=None) for m in matches]
    assert len(theirs) == N_JUDGMENTS
    for result in theirs:
        mine = ours[result["question_id"], result["turn"]]
        assert mine["user_prompt"] == result["user_prompt"]
        assert mine["score"] == result["score"]
        assert tuple(mine["judge"]) == result["judge"]
        assert set(mine) == set(result)
    requests = {json.dumps(r["body"]["messages"]) for r in fake_judge.requests}
    assert requests == {json.dumps(messages) for messages, _, _ in sent}  # the same messages reach the judge
    assert {(r["body"]["temperature"], r["body"]["max_tokens"]) for r in fake_judge.requests} == {(0, 2048)}


def test_summary_averages_as_show_result(fastchat, fake_judge, tmp_path: Path, capsys) -> None:
    output = run_judge(tmp_path, fake_judge)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    for i, record in enumerate(records):  # varied scores, two without a rating
        record["score"] = -1 if i in (0, 9) else 1 + i % 10
    output.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary(questions=BUILTIN_QUESTIONS, judgments=[output], output=tmp_path / "s.tsv", output_json=tmp_path / "s.json")
    (row,) = json.loads((tmp_path / "s.json").read_text())
    rated = [r for r in records if r["score"] != -1]
    assert row["mt_bench"]["overall"] == {
        "score": pytest.approx(sum(r["score"] for r in rated) / len(rated)),
        "judged": N_JUDGMENTS,
        "unrated": 2,
    }
    capsys.readouterr()
    args = types.SimpleNamespace(input_file=str(output), model_list=None, bench_name="mt_bench", judge_model="gpt-4")
    fastchat.show_result.display_result_single(args)
    printed = [float(x) for x in re.findall(r"\d+\.\d+", capsys.readouterr().out)]  # its tables' means
    for scores in (row["mt_bench"]["turns"]["1"], row["mt_bench"]["turns"]["2"], row["mt_bench"]["overall"]):
        assert scores["score"] == pytest.approx(printed.pop(0), abs=1e-6)
    header, line = (tmp_path / "s.tsv").read_text().splitlines()
    cells = dict(zip(header.split("\t"), line.split("\t"), strict=True))
    assert cells["model"] == "tiny-model" and cells["judge"] == "gpt-4" and cells["unrated"] == "2"
    assert float(cells["mt_bench"]) == pytest.approx(row["mt_bench"]["overall"]["score"], abs=1e-4)
    assert "math" in cells and "writing" in cells


# --- the judge: faults, resumption, a judge that never rates --------------------------------------


def test_judge_retries_429_and_5xx_and_sends_the_key(fake_judge, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
    fake_judge.faults = [429, 500, 503, 429]
    output = run_judge(tmp_path, fake_judge, judge_api_key_env="MY_JUDGE_KEY")
    assert len(read_judgments(output)) == N_JUDGMENTS
    assert len(fake_judge.requests) == N_JUDGMENTS + 4
    assert {r["authorization"] for r in fake_judge.requests} == {"Bearer sk-test"}


def test_judge_gives_up_after_its_retries(fake_judge, tmp_path: Path) -> None:
    fake_judge.always = 500
    with pytest.raises(VicunaflowError, match=r"failed after 2 retries.*HTTP 500"):
        run_judge(tmp_path, fake_judge, retries=2, parallel=1)
    assert len(fake_judge.requests) == 3


@pytest.mark.parametrize(
    ("status", "message"), [(401, "Incorrect API key provided"), (404, "The model `gpt-5` does not exist")]
)
def test_judge_fails_fast_with_the_servers_message(fake_judge, tmp_path: Path, status: int, message: str) -> None:
    fake_judge.always = status
    with pytest.raises(VicunaflowError, match=f"HTTP {status}: {message}"):
        run_judge(tmp_path, fake_judge, parallel=1)
    assert len(fake_judge.requests) == 1  # no retry, and nothing after it


def test_judge_resumes_with_what_is_missing(fake_judge, tmp_path: Path) -> None:
    output = run_judge(tmp_path, fake_judge)
    lines = output.read_text().splitlines(keepends=True)
    # Five judgments lost and the last line cut off mid-write, as by a killed run.
    output.write_text("".join(lines[:10]) + lines[10][:25])
    fake_judge.requests.clear()
    run_judge(tmp_path, fake_judge)
    assert len(fake_judge.requests) == N_JUDGMENTS - 10
    keys = [(j["question_id"], j["turn"]) for j in read_judgments(output)]
    assert len(keys) == len(set(keys)) == N_JUDGMENTS
    fake_judge.requests.clear()
    run_judge(tmp_path, fake_judge)  # complete: nothing to ask
    assert fake_judge.requests == []


def test_summary_leaves_a_file_with_a_cut_off_last_line_as_it_is(fake_judge, tmp_path: Path, caplog) -> None:
    """Only the judge (the writer) removes a killed run's incomplete last line; a reader skips it, with a warning."""
    output = run_judge(tmp_path, fake_judge)
    lines = output.read_text().splitlines(keepends=True)
    output.write_text("".join(lines[:10]) + lines[10][:25])
    before = output.read_bytes()
    summary(questions=BUILTIN_QUESTIONS, judgments=[output], output=tmp_path / "s.tsv", output_json=tmp_path / "s.json")
    assert output.read_bytes() == before
    (row,) = json.loads((tmp_path / "s.json").read_text())
    assert row["mt_bench"]["overall"]["judged"] == 10
    assert "last line is incomplete" in caplog.text and "skipping it" in caplog.text
    assert len(read_judgments(output)) == 10 and output.read_bytes() == before


def test_summary_refuses_to_summarise_nothing(tmp_path: Path) -> None:
    with pytest.raises(VicunaflowError, match="nothing to summarise: give --judgments"):
        summary(questions=BUILTIN_QUESTIONS, output=tmp_path / "s.tsv")
    assert not (tmp_path / "s.tsv").exists()


def test_summary_refuses_judgments_of_other_questions(fake_judge, tmp_path: Path) -> None:
    """Judgments summarised against another question file are an error naming the ids, not an "unknown" column."""
    output = run_judge(tmp_path, fake_judge)
    first = tmp_path / "first_question.jsonl"
    first.write_text(BUILTIN_QUESTIONS.read_text().splitlines(keepends=True)[0])
    with pytest.raises(VicunaflowError, match=r"judgments of question_id .* not in .*first_question.jsonl: give"):
        summary(questions=first, judgments=[output], output=tmp_path / "s.tsv")
    assert not (tmp_path / "s.tsv").exists()


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (None, r"missing\.jsonl: no such judgment file; give a judgment file of `vicunaflow eval judge`"),
        ([], r"j\.jsonl: no judgments in it; judge the answers with `vicunaflow eval judge`"),
        ([{"score": "8"}], r"j\.jsonl:1: not a judgment \(score '8' is not a number\)"),
        ([{"score": True}], r"j\.jsonl:1: not a judgment \(score True is not a number\)"),
        ([{"judge": "ab"}], r"j\.jsonl:1: not a judgment \(judge 'ab' is not \[judge model, prompt name\]\)"),
        ([{"question_id": "1"}], r"j\.jsonl: judgments of question_id '1', not in .*: give --questions"),
    ],
    ids=["missing", "empty", "score-text", "score-bool", "judge-text", "question-id-text"],
)
def test_summary_refuses_judgment_files_that_are_missing_empty_or_malformed(lines, message, tmp_path: Path) -> None:
    """A missing or empty judgment file gave an empty table and exit 0; a score written as text ended in a
    traceback; a judge written as "ab" was judge "a"; question_id "1" was question 1's judgment in category
    `unknown`."""
    judgment = {"question_id": 1, "model": "m", "judge": ["gpt-4", "single-v1"], "user_prompt": "p"}
    judgment |= {"judgment": "[[8]]", "score": 8, "turn": 1, "tstamp": 0.0}
    path = tmp_path / ("missing.jsonl" if lines is None else "j.jsonl")
    if lines is not None:
        path.write_text("".join(json.dumps(judgment | line) + "\n" for line in lines))
    with pytest.raises(VicunaflowError, match=message):
        summary(questions=BUILTIN_QUESTIONS, judgments=[path], output=tmp_path / "s.tsv")
    assert not (tmp_path / "s.tsv").exists()


def test_judge_with_a_partial_file_writes_the_output_whole(fake_judge, tmp_path: Path) -> None:
    """The workflow's mode: Snakemake removes a failed job's output, not the partial file beside it."""
    partial, output = tmp_path / "staging" / "judgment.jsonl", tmp_path / "out" / "judgment.jsonl"
    fake_judge.faults = [200] * 6 + [401]
    with pytest.raises(VicunaflowError, match="HTTP 401"):
        run_judge(tmp_path, fake_judge, output=output, partial=partial, parallel=1)
    assert not output.exists() and len(read_judgments(partial)) == 6
    fake_judge.requests.clear()
    run_judge(tmp_path, fake_judge, output=output, partial=partial)
    assert len(fake_judge.requests) == N_JUDGMENTS - 6
    assert len(read_judgments(output)) == N_JUDGMENTS and not partial.exists()


def test_judgments_of_other_answers_are_refused(fake_judge, tmp_path: Path) -> None:
    output = run_judge(tmp_path, fake_judge)
    answers = tmp_path / "answers.jsonl"
    answers.write_text(answers.read_text().replace("answer 1 to question 3", "a new answer"))
    with pytest.raises(VicunaflowError, match=r"holds 2 judgment.*question 3, turn 1"):
        run_judge(tmp_path, fake_judge, output=output)


def test_a_judge_that_never_rates_scores_minus_one(fake_judge, tmp_path: Path) -> None:
    fake_judge.reply = "I would rather not say."
    output = run_judge(tmp_path, fake_judge)
    assert [j["score"] for j in read_judgments(output)] == [-1] * N_JUDGMENTS
    summary(questions=BUILTIN_QUESTIONS, judgments=[output], output=tmp_path / "s.tsv", output_json=tmp_path / "s.json")
    (row,) = json.loads((tmp_path / "s.json").read_text())
    assert row["mt_bench"]["overall"] == {"score": None, "judged": N_JUDGMENTS, "unrated": N_JUDGMENTS}
    asked = len(fake_judge.requests)
    run_judge(tmp_path, fake_judge)
    assert len(fake_judge.requests) == asked  # kept: a rerun does not ask again


def test_parse_rating_follows_fastchat() -> None:
    assert parse_rating("Rating: [[7]]") == 7
    assert parse_rating("[[8.5]] then [[3]]") == 8.5
    assert parse_rating("Rating: [6]") == 6  # FastChat's fallback pattern
    assert parse_rating("Rating: 9/10") == -1


def test_a_prompt_the_judge_refuses_fails_only_its_match(fake_judge, tmp_path: Path, caplog) -> None:
    """A local judge refusing one prompt beyond its context (HTTP 400) stopped every run at that match, and
    --output (with --partial, as the workflow runs it) was never written. The match is recorded as FastChat's
    gen_judgment records it, $ERROR$ and score -1, and left out of the averages."""
    answers = fake_answers(tmp_path / "answers.jsonl")
    answers.write_text(answers.read_text().replace("answer 1 to question 3", "a long answer LOOPING LOOPING"))
    fake_judge.too_long = "LOOPING"
    partial, output = tmp_path / "staging.jsonl", tmp_path / "judgment.jsonl"
    run_judge(tmp_path, fake_judge, output=output, partial=partial)
    judgments = read_judgments(output)
    assert len(judgments) == N_JUDGMENTS and not partial.exists()
    refused = [j for j in judgments if j["question_id"] == 3]  # its first turn, and the conversation
    assert [(j["turn"], j["score"]) for j in refused] == [(1, -1), (2, -1)]
    assert all(j["judgment"] == f"$ERROR$ HTTP 400: {CONTEXT_MESSAGE}" for j in refused)
    assert all(j["score"] == 7 for j in judgments if j["question_id"] != 3)
    assert "2 of 16 matches could not be judged (first: question 3, turn 1: $ERROR$ HTTP 400" in caplog.text
    summary(questions=BUILTIN_QUESTIONS, judgments=[output], output=tmp_path / "s.tsv", output_json=tmp_path / "s.json")
    (row,) = json.loads((tmp_path / "s.json").read_text())
    overall = row["mt_bench"]["overall"]
    assert (overall["score"], overall["judged"], overall["unrated"]) == (7, N_JUDGMENTS, 2)
    fake_judge.requests.clear()
    run_judge(tmp_path, fake_judge, output=output, partial=partial)
    assert fake_judge.requests == []  # recorded, as FastChat's: a rerun does not ask again


def test_a_judge_refusing_every_request_stops_and_records_nothing(fake_judge, tmp_path: Path) -> None:
    """A 400 to every request is the request's fault (--max-tokens beyond the judge's context), not the prompts':
    recording them all as $ERROR$ would keep a rerun with the fixed request from asking again."""
    fake_judge.always = 400
    with pytest.raises(VicunaflowError, match=r"the first 5 requests were all refused \(HTTP 400: fault 400\)"):
        run_judge(tmp_path, fake_judge, parallel=1)
    assert len(fake_judge.requests) == 5 and read_judgments(tmp_path / "judgment.jsonl") == []
    fake_judge.always, fake_judge.requests = None, []
    run_judge(tmp_path, fake_judge)
    assert len(fake_judge.requests) == N_JUDGMENTS


def test_judge_checks_the_file_before_cutting_its_last_line(fake_judge, tmp_path: Path) -> None:
    """A last line without its newline was cut off before the file was checked: an --output mistyped onto
    another file lost its last line, and a complete last judgment was dropped and asked of the judge again."""
    notes = tmp_path / "notes.json"
    notes.write_text('{\n "model": "vicuna",\n "score": 6.4\n}')  # json.dump's: no final newline
    with pytest.raises(VicunaflowError, match=rf"{notes}:1: not a judgment") as refused:
        run_judge(tmp_path, fake_judge, output=notes)
    assert notes.read_text() == '{\n "model": "vicuna",\n "score": 6.4\n}' and fake_judge.requests == []
    assert "not a judgment file of `vicunaflow eval judge`? give another path" in str(refused.value)

    output = run_judge(tmp_path, fake_judge)
    lines = output.read_text().splitlines(keepends=True)
    output.write_text("".join(lines).rstrip("\n"))  # edited, or written by another tool
    assert len(read_judgments(output)) == N_JUDGMENTS
    fake_judge.requests.clear()
    run_judge(tmp_path, fake_judge)
    assert fake_judge.requests == [] and output.read_text() == "".join(lines).rstrip("\n")  # nothing to do: as it was
    output.write_text("".join(lines[:-3]).rstrip("\n"))
    run_judge(tmp_path, fake_judge)
    assert len(fake_judge.requests) == 3 and len(read_judgments(output)) == N_JUDGMENTS
    assert output.read_text().endswith("\n") and all(json.loads(line) for line in output.read_text().splitlines())

    output.write_text(lines[0][:30])  # a run killed while writing its first judgment
    fake_judge.requests.clear()
    run_judge(tmp_path, fake_judge)
    assert len(fake_judge.requests) == N_JUDGMENTS and len(read_judgments(output)) == N_JUDGMENTS


def test_rerunning_a_finished_partial_run_asks_nothing(fake_judge, tmp_path: Path) -> None:
    """With --partial, a finished run leaves --output whole and the partial file gone: the same command again
    judged everything anew. It asks only what --output lacks (an answer generated again) and leaves it alone
    when that is nothing."""
    partial, output = tmp_path / "staging.jsonl", tmp_path / "judgment.jsonl"
    run_judge(tmp_path, fake_judge, output=output, partial=partial)
    before, mtime = output.read_bytes(), output.stat().st_mtime_ns
    fake_judge.requests.clear()
    run_judge(tmp_path, fake_judge, output=output, partial=partial)
    assert fake_judge.requests == [] and not partial.exists()
    assert output.read_bytes() == before and output.stat().st_mtime_ns == mtime
    answers = tmp_path / "answers.jsonl"
    answers.write_text(answers.read_text().replace("answer 1 to question 3", "a new answer"))
    run_judge(tmp_path, fake_judge, output=output, partial=partial)
    assert len(fake_judge.requests) == 2  # question 3's first turn and its conversation
    judgments = read_judgments(output)
    assert len(judgments) == N_JUDGMENTS and sum("a new answer" in j["user_prompt"] for j in judgments) == 2


# --- bad input -------------------------------------------------------------------------------------


def test_bad_lines_are_named_by_file_and_line(fake_judge, tmp_path: Path) -> None:
    questions = tmp_path / "questions.jsonl"
    lines = BUILTIN_QUESTIONS.read_text().splitlines(keepends=True)
    questions.write_text(lines[0] + "\n" + '{"question_id": 9, "category": "math"\n')
    with pytest.raises(VicunaflowError, match=rf"{questions}:3: not valid JSON"):
        mt_bench.load_questions(questions)
    questions.write_text(lines[0] + '{"question_id": 9, "category": "math", "turns": []}\n')
    with pytest.raises(VicunaflowError, match=rf"{questions}:2: question 9: turns must be"):
        mt_bench.load_questions(questions)

    answers = fake_answers(tmp_path / "answers.jsonl")
    good = answers.read_text().splitlines(keepends=True)
    answers.write_text("".join(good) + json.dumps({"question_id": 999, "choices": [{"turns": ["x"]}]}) + "\n")
    with pytest.raises(VicunaflowError, match=rf"{answers}:9: answer for question_id 999, which is not in"):
        run_judge(tmp_path, fake_judge)
    answers.write_text(good[0] + json.dumps({"question_id": 2, "choices": "none"}) + "\n")
    with pytest.raises(VicunaflowError, match=rf"{answers}:2: question 2: choices must be"):
        run_judge(tmp_path, fake_judge)
    answers.write_text("".join(good[:3]))
    with pytest.raises(VicunaflowError, match=r"no answer to 5 question\(s\): 4, 5, 6, 7, 8"):
        run_judge(tmp_path, fake_judge)
    fake_answers(answers)
    with pytest.raises(VicunaflowError, match="give --reference"):
        run_judge(tmp_path, fake_judge, reference=None)
    assert fake_judge.requests == []


def test_judge_refuses_answers_without_a_model_short_references_and_prompts_naming_the_file(fake_judge, tmp_path):
    """Answers without model_id were judged as model "None"; a reference answer of one turn to a two-turn
    question ended in an IndexError traceback; missing judge prompts were reported without the file's name."""
    answers = fake_answers(tmp_path / "answers.jsonl")
    answers.write_text(answers.read_text().replace('"model_id": "tiny-model", ', ""))
    with pytest.raises(VicunaflowError, match=rf"{answers}: answers without a model_id; name the judged model with"):
        run_judge(tmp_path, fake_judge)
    fake_answers(answers)
    reference = tmp_path / "reference.jsonl"
    records = [json.loads(line) for line in BUILTIN_REFERENCE.read_text().splitlines()]
    records[0]["choices"][0]["turns"] = records[0]["choices"][0]["turns"][:1]
    reference.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(
        VicunaflowError, match=rf"{reference}: the reference answer to question {records[0]['question_id']} has 1 turn"
    ):
        run_judge(tmp_path, fake_judge, reference=reference)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(BUILTIN_JUDGE_PROMPTS.read_text().splitlines(keepends=True)[0])
    with pytest.raises(VicunaflowError, match=rf"{prompts}: the judge prompts lack single-math-v1, "):
        run_judge(tmp_path, fake_judge, judge_prompts=prompts)
    assert fake_judge.requests == [] and not (tmp_path / "judgment.jsonl").exists()


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        (" Also consider {context}.", r"unknown field \{context\}"),
        (' Reply as {"rating": 5}.', r"unknown field \{\"rating\"\}"),
        (" A stray } here.", r"Single '\}' encountered"),
        (" Positional {} here.", r"a field without a name"),
    ],
    ids=["unknown-field", "json-example", "stray-brace", "positional"],
)
def test_a_judge_prompt_that_cannot_be_filled_in_names_file_and_prompt(extra, problem, fake_judge, tmp_path) -> None:
    """A custom prompt_template with a stray brace or a field FastChat does not fill ended in str.format's
    KeyError or ValueError traceback."""
    records = [json.loads(line) for line in BUILTIN_JUDGE_PROMPTS.read_text().splitlines()]
    records[0]["prompt_template"] += extra
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    name = records[0]["name"]
    with pytest.raises(VicunaflowError, match=rf"{prompts}: judge prompt {name}: .*cannot be filled in \({problem}"):
        run_judge(tmp_path, fake_judge, judge_prompts=prompts)
    assert fake_judge.requests == [] and not (tmp_path / "judgment.jsonl").exists()


def test_read_judgments_names_file_and_line_of_bad_bytes_and_ids(tmp_path: Path) -> None:
    """A judgment file not in UTF-8 ended in UnicodeDecodeError, a question_id that is a list in TypeError."""
    judgment = {"question_id": 81, "model": "m", "judge": ["gpt-4", "single-v1"], "user_prompt": "p"}
    judgment |= {"judgment": "[[5]]", "score": 5, "turn": 1, "tstamp": 0.0}
    path = tmp_path / "judgment.jsonl"
    good = json.dumps(judgment) + "\n"
    path.write_bytes(good.encode() + good.replace('"m"', '"m\u00e9"').encode("latin-1"))
    with pytest.raises(VicunaflowError, match=rf"{path}:2: not a judgment \(not UTF-8, byte 31 of the line\)"):
        read_judgments(path)
    path.write_text(good + json.dumps(judgment | {"question_id": [81]}) + "\n")
    with pytest.raises(VicunaflowError, match=rf"{path}:2: not a judgment \(question_id \[81\] is not an integer"):
        read_judgments(path)
    path.write_text(good + json.dumps(judgment | {"turn": "1"}) + "\n")
    with pytest.raises(VicunaflowError, match=rf"{path}:2: not a judgment \(turn '1' is not an integer"):
        read_judgments(path)


# --- answers: FastChat's conversation, transformers' greedy tokens ------------------------------


def test_answers_are_fastchats_greedy_conversation(tiny_vicuna: Path, fastchat, tmp_path: Path) -> None:
    import torch
    from fastchat.conversation import get_conv_template
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vicunaflow.eval.answers import answers
    from vicunaflow.loading import ModelOptions

    output = answers(
        model_path=tiny_vicuna,
        questions=BUILTIN_QUESTIONS,
        output=tmp_path / "a" / "m.jsonl",
        max_new_tokens=12,
        model_options=ModelOptions(device="cpu"),
    )
    loaded = fastchat.common.load_model_answers(str(tmp_path / "a"))["m"]
    questions = {q.id: q for q in mt_bench.load_questions(BUILTIN_QUESTIONS)}
    assert set(loaded) == set(questions)
    assert all(a["model_id"] == "vicuna-tiny-all-v1.1" and len(a["choices"][0]["turns"]) == 2 for a in loaded.values())

    # The greedy categories, as gen_model_answer.py answers them with transformers' generate.
    model = AutoModelForCausalLM.from_pretrained(str(tiny_vicuna), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_vicuna))
    for question_id in [i for i, q in questions.items() if mt_bench.TEMPERATURES[q.category] == 0][:2]:
        conv = get_conv_template("vicuna_v1.1")
        for turn, text in enumerate(questions[question_id].turns):
            conv.append_message(conv.roles[0], text)
            conv.append_message(conv.roles[1], None)
            input_ids = torch.tensor(tokenizer([conv.get_prompt()]).input_ids)
            generated = model.generate(input_ids, do_sample=False, max_new_tokens=12)[0, input_ids.shape[1] :]
            expected = tokenizer.decode(generated, skip_special_tokens=True, spaces_between_special_tokens=False)
            ours = loaded[question_id]["choices"][0]["turns"][turn]
            assert printable(ours) == printable(expected.strip())
            conv.update_last_message(ours)

    again = answers(
        model_path=tiny_vicuna,
        questions=BUILTIN_QUESTIONS,
        output=tmp_path / "b.jsonl",
        max_new_tokens=12,
        model_options=ModelOptions(device="cpu"),
    )
    first = [json.loads(line)["choices"] for line in output.read_text().splitlines()]
    assert first == [json.loads(line)["choices"] for line in again.read_text().splitlines()]  # sampled ones too


def printable(text: str) -> str:
    """Random weights emit stray byte tokens; decoded as a stream (as the engine does) an invalid byte may
    come out as itself or as U+FFFD where decoding all at once differs: compare the rest."""
    return "".join(c for c in text if c != "\ufffd" and (c.isprintable() or c.isspace()))


# --- loss: the training masks, against a direct transformers computation --------------------------


def test_loss_matches_transformers_on_the_reply_tokens(tiny_vicuna: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from vicunaflow.data import encode, load_conversations, load_tokenizer
    from vicunaflow.eval.loss import loss

    data = tmp_path / "held_out.json"
    data.write_text(json.dumps(json.loads(BUILTIN_CONVERSATIONS.read_text())[:5]))
    result = loss(model_path=tiny_vicuna, data=data, output=tmp_path / "loss.json", batch_size=2, device="cpu")

    model = AutoModelForCausalLM.from_pretrained(str(tiny_vicuna), dtype=torch.float32).eval()
    tokenizer = load_tokenizer(tiny_vicuna)
    total, tokens = 0.0, 0
    for conversation in load_conversations(data):
        sample = encode(conversation, tokenizer, 2048)
        input_ids, labels = torch.tensor([sample.input_ids]), torch.tensor(sample.labels)
        with torch.no_grad():
            logits = model(input_ids).logits[0]  # [T, V]
        total += torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum").item()
        tokens += int((labels[1:] != -100).sum())
    assert result["tokens"] == tokens
    assert result["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)
    written = json.loads((tmp_path / "loss.json").read_text())
    assert written["model"] == "vicuna-tiny-all-v1.1" and written["dataset"] == "held_out"
    assert len(written["samples"]) == 5


def test_loss_on_a_tokenised_folder_drops_what_truncation_leaves_without_a_reply(tiny_vicuna: Path, tmp_path: Path):
    """A smaller --model-max-length than the folder's cuts some conversations before their first reply
    token: they are dropped and counted (no division by zero); when none is left, a clear refusal."""
    from vicunaflow import data
    from vicunaflow.data import IGNORE_INDEX, load_tokenized
    from vicunaflow.eval.loss import loss

    held_out = tmp_path / "held_out.json"
    held_out.write_text(json.dumps(json.loads(BUILTIN_CONVERSATIONS.read_text())[:8]))
    folder = data.tokenize(data=held_out, model_path=tiny_vicuna, output_dir=tmp_path / "tok", model_max_length=512)
    samples, _ = load_tokenized(folder)
    # index of each sample's first trained label (position t predicts t + 1: index 0 never counts)
    firsts = sorted(next(i for i in range(1, len(s.labels)) if s.labels[i] != IGNORE_INDEX) for s in samples)
    assert firsts[0] < firsts[-1]
    length = firsts[-1]  # those whose first reply token is at index `length` keep none
    result = loss(
        model_path=tiny_vicuna, data=folder, output=tmp_path / "loss.json", model_max_length=length, device="cpu"
    )
    expected_dropped = sum(first >= length for first in firsts)
    assert result["dropped"] == expected_dropped > 0
    assert result["conversations"] == len(samples) - expected_dropped
    assert math.isfinite(result["loss"]) and all(s["tokens"] > 0 for s in result["samples"])
    assert json.loads((tmp_path / "loss.json").read_text())["dropped"] == expected_dropped
    with pytest.raises(
        VicunaflowError,
        match=f"none of its {len(samples)} conversations has a reply token within --model-max-length {firsts[0]}",
    ):
        loss(
            model_path=tiny_vicuna, data=folder, output=tmp_path / "none.json", model_max_length=firsts[0], device="cpu"
        )
    assert not (tmp_path / "none.json").exists()


@pytest.mark.parametrize("bits", [8, 4])
def test_loss_with_load_nbit_is_the_loss_of_the_engines_quantized_weights(tiny_vicuna: Path, tmp_path: Path, bits):
    """--load-8bit / --load-4bit: each layer Linear is the int8 / int4 weight chat's --load-Nbit holds
    (quant.quantize of the stored tensor), and with int4 lm_head too; embeddings and norms stay float. The
    loss is that model's, computed by hand here with the decoded weights written into a transformers model."""
    import torch
    from transformers import AutoModelForCausalLM

    from vicunaflow import quant
    from vicunaflow.data import encode_all, load_conversations, load_tokenizer
    from vicunaflow.eval.loss import loss, sample_losses

    data = tmp_path / "held_out.json"
    data.write_text(json.dumps(json.loads(BUILTIN_CONVERSATIONS.read_text())[:4]))
    options = {"load_8bit": bits == 8, "load_4bit": bits == 4}
    result = loss(model_path=tiny_vicuna, data=data, output=tmp_path / "loss.json", device="cpu", **options)
    assert result["quantization"] == {"bits": bits, "group_size": 128 if bits == 4 else None}
    assert result["dtype"] == "float32"
    assert json.loads((tmp_path / "loss.json").read_text())["quantization"] == result["quantization"]

    model = AutoModelForCausalLM.from_pretrained(str(tiny_vicuna), dtype=torch.float32).eval()
    decoded = 0
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if quant.QUANTIZED_WEIGHT.fullmatch(name) or (bits == 4 and name == "lm_head.weight"):
                weight.copy_(quant.quantize(weight, bits).dequantize(torch.float32))
                decoded += 1
    assert decoded == 7 * model.config.num_hidden_layers + (bits == 4)
    samples = encode_all(load_conversations(data), load_tokenizer(tiny_vicuna), 2048, drop_untrained=False)
    per_sample = sample_losses(model, samples, batch_size=4)
    expected = sum(nll for nll, _ in per_sample) / sum(n for _, n in per_sample)
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    float_loss = loss(model_path=tiny_vicuna, data=data, output=tmp_path / "float.json", device="cpu")["loss"]
    assert result["loss"] != float_loss and float_loss == pytest.approx(expected, rel=0.2)


def test_loss_refuses_both_widths_before_loading(tiny_vicuna: Path, tmp_path: Path) -> None:
    import subprocess

    from vicunaflow.eval.loss import loss

    with pytest.raises(VicunaflowError, match="--load-8bit and --load-4bit: choose one"):
        loss(
            model_path=tiny_vicuna,
            data=BUILTIN_CONVERSATIONS,
            output=tmp_path / "x.json",
            load_8bit=True,
            load_4bit=True,
        )
    assert not (tmp_path / "x.json").exists()
    shown = subprocess.run(
        [sys.executable, "-m", "vicunaflow", "eval", "loss", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--load_8bit" in shown and "--load_4bit" in shown


# --- the download: pinned, md5-verified ------------------------------------------------------------


@contextlib.contextmanager
def serving(handler):
    """An HTTP server on 127.0.0.1 with `handler`, in a thread; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def static_server(root: Path):
    return serving(lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k))


def test_download_verifies_the_pinned_files(tmp_path: Path, monkeypatch) -> None:
    from vicunaflow.eval.mt_bench import download_mt_bench

    revision = "0123abc"
    data = tmp_path / "mirror" / revision / mt_bench.DATA_DIR
    contents = {
        "mt_bench/question.jsonl": BUILTIN_QUESTIONS.read_bytes(),
        "mt_bench/reference_answer/gpt-4.jsonl": BUILTIN_REFERENCE.read_bytes(),
        "judge_prompts.jsonl": BUILTIN_JUDGE_PROMPTS.read_bytes(),
    }
    for path, content in contents.items():
        (data / path).parent.mkdir(parents=True, exist_ok=True)
        (data / path).write_bytes(content)
    files = {p: (mt_bench.MT_BENCH_FILES[p][0], hashlib.md5(c).hexdigest()) for p, c in contents.items()}
    monkeypatch.setattr(mt_bench, "MT_BENCH_FILES", files)
    monkeypatch.setattr(mt_bench, "FASTCHAT_REVISION", revision)
    with static_server(tmp_path / "mirror") as base_url:
        out = download_mt_bench(
            output_dir=tmp_path / "mt_bench", revision=revision, base_url=base_url, staging_dir=tmp_path / "staging"
        )
        assert (out / "reference_answer" / "gpt-4.jsonl").read_bytes() == BUILTIN_REFERENCE.read_bytes()
        assert json.loads((out / "vicunaflow.json").read_text())["revision"] == revision
        (data / "mt_bench/question.jsonl").write_bytes(b"tampered\n")
        with pytest.raises(VicunaflowError, match="md5 mismatch"):
            download_mt_bench(
                output_dir=tmp_path / "other", revision=revision, base_url=base_url, staging_dir=tmp_path / "staging"
            )
    assert not (tmp_path / "other").exists()


def refusing_server(status: int):
    """Answers every GET with `status`."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    return serving(Handler)


@pytest.mark.parametrize("unavailable", ["unreachable", "404", "401", "403", "retries"])
def test_download_without_fastchat_hints_only_its_own_options(unavailable, tmp_path: Path, monkeypatch) -> None:
    """The hints were download llama's: "use --source local --path DIR", "the model size", Meta's signed URLs.
    Now every option a hint names is one of eval download's, its command line parses through the CLI's own
    parser (the verb itself replaced), and the files by hand go where eval download writes them."""
    import functools
    import shlex
    import socket

    from vicunaflow import cli
    from vicunaflow.eval.mt_bench import download_mt_bench

    output_dir = tmp_path / "mt bench"  # a space: the command line quotes it
    revision = "v0.0.0" if unavailable == "404" else mt_bench.FASTCHAT_REVISION
    with contextlib.ExitStack() as stack:
        if unavailable == "unreachable":
            with socket.socket() as probe:  # a port nobody listens on
                probe.bind(("127.0.0.1", 0))
                base_url = f"http://127.0.0.1:{probe.getsockname()[1]}"
        else:
            base_url = stack.enter_context(refusing_server(503 if unavailable == "retries" else int(unavailable)))
        with pytest.raises(VicunaflowError) as refused:
            download_mt_bench(output_dir=output_dir, revision=revision, base_url=base_url,
                              staging_dir=tmp_path / "st", retries=1, retry_wait=0.01, timeout=5)  # fmt: skip
    message = str(refused.value)
    for foreign in ("--source", "--path", "model size", "Meta", "signed"):
        assert foreign not in message, message
    first = f"{base_url}/{revision}/{mt_bench.DATA_DIR}/mt_bench/question.jsonl: "
    expected = {
        "unreachable": "failed after 1 retries (",
        "404": "not found (HTTP 404); check --revision (v0.0.0: a FastChat commit or tag) and --base-url",
        "401": "access denied (HTTP 401); FastChat's files are public and eval download sends no credentials",
        "403": "access denied (HTTP 403); FastChat's files are public and eval download sends no credentials",
        "retries": "failed after 1 retries (HTTP 503); try again later, or with more --retries",
    }[unavailable]
    assert message.startswith(first + expected), message
    if unavailable == "unreachable":
        assert "check the network" in message, message

    names = {name.replace("_", "-") for name in inspect.signature(download_mt_bench).parameters}
    named = set(re.findall(r"--([a-z][a-z-]*)", message))
    assert named and named <= names, named - names
    # By hand: FastChat's files, named as eval download writes them and the workflow's eval rules read them.
    by_hand = re.search(r"copy (\S+)/\{([^}]*)\} to (.+)/\{([^}]*)\}, where eval download would", message)
    assert by_hand and by_hand[1] == mt_bench.DATA_DIR and by_hand[3] == str(output_dir), message
    pairs = dict(zip(by_hand[2].split(", "), by_hand[4].split(", "), strict=True))
    assert pairs == {path: name for path, (name, _) in mt_bench.MT_BENCH_FILES.items()}
    rules = (REPO / "workflow/rules/eval_common.smk").read_text()
    assert all(f'f"{{MT_BENCH_DIR}}/{name}"' in rules for name in pairs.values())

    hinted = re.findall(r"`(vicunaflow [^`]*)`", message)
    assert len(hinted) == 1, message
    parsed = {}
    stub = functools.wraps(download_mt_bench)(lambda **options: parsed.update(options))
    monkeypatch.setattr(mt_bench, "download_mt_bench", stub)
    cli.main(shlex.split(hinted[0])[1:])
    assert parsed["output_dir"] == output_dir and parsed["base_url"] == "MIRROR" and parsed["revision"] == revision
    assert not output_dir.exists()


# --- the workflow ----------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def planned_jobs(workdir: Path, *args: str) -> dict[str, int]:
    """Rule name -> job count of `snakemake -n` in an empty working directory."""
    import os
    import subprocess

    (workdir / "config").symlink_to(REPO / "config")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "-n"]
    result = subprocess.run(
        [*command, *args, "--quiet", "rules"], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("total", "job"):
            jobs[parts[0]] = int(parts[1])
    return jobs


def test_workflow_plans_mt_bench_for_every_model(tmp_path: Path) -> None:
    """Default config: FastChat's files downloaded once; base, Vicuna and run of each fine-tuning run evaluated."""
    jobs = planned_jobs(tmp_path, "results/eval/summary.tsv")
    assert jobs["mt_bench_download"] == 1 and jobs["eval_summary"] == 1
    models = 8  # llama-{7,13}b-hf, vicuna-{7,13}b-all-v1.1 and the four runs of config/config.yaml
    assert jobs["eval_answers"] == jobs["eval_judge"] == models
    assert "eval_loss" not in jobs  # no held-out data configured


def test_demo_plans_the_offline_evaluation(tmp_path: Path) -> None:
    jobs = planned_jobs(tmp_path, "--configfile", "config/demo.yaml")
    assert {k: jobs[k] for k in ("eval_answers", "eval_judge", "eval_loss", "eval_summary")} == {
        "eval_answers": 1,
        "eval_judge": 1,
        "eval_loss": 1,
        "eval_summary": 1,
    }
    assert "mt_bench_download" not in jobs  # the built-in questions: offline


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"eval": {"models": ["vicuna-tiny-all-v1.1"], "summary_judges": ["gpt4"]}},
         "config: eval.summary_judges.gpt4: no judge of that name in eval.judges (gpt-4)"),
        ({"eval": {"models": []}}, "config: eval.models is empty"),
        ({"eval": {"models": ["vicuna-7B-all-v1.1"]}},
         "config: eval.models: vicuna-7B-all-v1.1: model names are lower case: vicuna-7b-all-v1.1"),
        ({"targets": ["vicuna-70b-all-v1.1"]},
         "config: targets: vicuna-70b-all-v1.1: no model size 70b (sizes: 7b, 13b, 33b, 65b, tiny)"),
        ({"targets": ["fine_tuning_output/r"],
          "finetune": {"runs": {"r": {"model": "vicuna-tiny-all-v1.1", "model_max_length": "2k"}}}},
         "'2k' is not of type 'integer'"),
    ],
    ids=["summary-judge", "no-models", "model-size-case", "target-size", "max-length-text"],
)  # fmt: skip
def test_config_mistakes_fail_the_dry_run_naming_the_key(config, message, tmp_path: Path) -> None:
    """Each had passed validation and failed later as a MissingInputException naming a file no rule makes (a
    judgment of judge gpt4, a folder vicuna-7B-all-v1.1, data/tokenized/...-len2k), or planned a summary of nothing
    that failed when run."""
    import os
    import subprocess

    import yaml

    (tmp_path / "config").symlink_to(REPO / "config")
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({"targets": ["results/eval/summary.tsv"], **config}))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n"]
    result = subprocess.run(
        [*command, "--configfile", str(tmp_path / "mine.yaml")], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode != 0 and message in result.stdout + result.stderr, result.stdout + result.stderr
    assert "MissingInputException" not in result.stdout + result.stderr


def test_workflow_defaults_match_the_commands() -> None:
    import inspect

    import yaml

    from vicunaflow.eval.answers import answers
    from vicunaflow.eval.loss import loss

    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())["properties"]["eval"]
    defaults = {k: v.get("default") for k, v in schema["properties"].items()}
    assert defaults["max_new_tokens"] == inspect.signature(answers).parameters["max_new_tokens"].default
    assert defaults["seed"] == inspect.signature(answers).parameters["seed"].default
    assert defaults["loss_max_length"] == inspect.signature(loss).parameters["model_max_length"].default
    assert defaults["mt_bench"] == {}
    mt = schema["properties"]["mt_bench"]["properties"]
    assert mt["revision"]["default"] == mt_bench.FASTCHAT_REVISION
    assert mt["base_url"]["default"] == mt_bench.FASTCHAT_RAW
    judge_parameters = inspect.signature(judge).parameters
    workflow_judge = (REPO / "workflow/rules/eval_common.smk").read_text()
    assert f'"parallel": {judge_parameters["parallel"].default}' in workflow_judge
    assert f'"max_tokens": {judge_parameters["max_tokens"].default}' in workflow_judge
    assert f'"api_key_env": "{judge_parameters["judge_api_key_env"].default}"' in workflow_judge

"""`eval summary` and `eval arena` reports: incomplete judgment files, bad input files, bootstrap intervals."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from test_eval import N_JUDGMENTS, N_QUESTIONS, fake_judge, run_judge  # noqa: F401 (fake_judge: a fixture)

from vicunaflow import VicunaflowError
from vicunaflow.eval.arena import MIN_ROUNDS, arena, bradley_terry, online_elo, ratings, read_votes
from vicunaflow.eval.mt_bench import BUILTIN_QUESTIONS, load_questions
from vicunaflow.eval.summary import expected_judgments, summarize_judgments, summary

# --- eval summary: an incomplete judgment file is scored, and says so -----------------------------


def _own(caplog) -> list:
    """The records of the reports' own loggers: not the judge's (whose level an earlier test may have changed)."""
    return [record for record in caplog.records if record.name in ("vicunaflow.eval.summary", "vicunaflow.eval.arena")]


def read_table(path: Path) -> tuple[list[str], list[dict]]:
    header, *lines = [line.split("\t") for line in path.read_text().splitlines()]
    return header, [dict(zip(header, line, strict=True)) for line in lines]


def test_summary_of_an_interrupted_judge_run_counts_and_warns_about_the_missing(
    fake_judge,  # noqa: F811
    tmp_path: Path,
    caplog,
) -> None:
    fake_judge.faults = [200] * 5 + [401]  # the quota runs out after five first turns
    with pytest.raises(VicunaflowError, match="HTTP 401"):
        run_judge(tmp_path, fake_judge, parallel=1)
    judgments = tmp_path / "judgment.jsonl"
    caplog.set_level(logging.WARNING, logger="vicunaflow.eval.summary")
    summary(
        questions=BUILTIN_QUESTIONS, judgments=[judgments], output=tmp_path / "s.tsv", output_json=tmp_path / "s.json"
    )
    header, (row,) = read_table(tmp_path / "s.tsv")
    assert header[:8] == ["model", "judge", "mt_bench", "turn_1", "turn_2", "judged", "unrated", "missing"]
    assert row["judged"] == "5" and row["missing"] == str(N_JUDGMENTS - 5) and row["turn_2"] == ""
    (warning,) = [record.getMessage() for record in _own(caplog)]
    assert f"{judgments}: tiny-model judged by gpt-4 lacks {N_JUDGMENTS - 5} of its {N_JUDGMENTS} judgments" in warning
    assert "run `vicunaflow eval judge` again with the same --output" in warning
    (record,) = json.loads((tmp_path / "s.json").read_text())
    first_turns = [q.id for q in load_questions(BUILTIN_QUESTIONS)]
    assert record["mt_bench"]["expected"] == N_JUDGMENTS
    assert record["mt_bench"]["missing"][: N_QUESTIONS - 5] == [[i, 1] for i in first_turns[5:]]

    caplog.clear()  # the rerun judges the rest: nothing missing, nothing to warn about
    run_judge(tmp_path, fake_judge)
    summary(questions=BUILTIN_QUESTIONS, judgments=[judgments], output=tmp_path / "s.tsv", overwrite=True)
    _, (row,) = read_table(tmp_path / "s.tsv")
    assert row["judged"] == str(N_JUDGMENTS) and row["missing"] == "0" and not _own(caplog)


def judgment(question_id, turn: int, judge: str = "gpt-4", score: float = 8) -> dict:
    prompt = "single-v1" if turn == 1 else "single-v1-multi-turn"
    record = {"question_id": question_id, "model": "m", "judge": [judge, prompt], "user_prompt": f"p{turn}"}
    return record | {"judgment": f"[[{score}]]", "score": score, "turn": turn, "tstamp": 0.0}


def test_expected_judgments_are_those_the_judge_makes(tmp_path: Path) -> None:
    questions = tmp_path / "q.jsonl"
    lines = [
        {"question_id": 1, "category": "writing", "turns": ["one turn"]},
        {"question_id": 2, "category": "math", "turns": ["two", "turns"]},  # judged against a reference
        {"question_id": "x", "category": "stem", "turns": ["three", "turns", "here"]},
    ]
    questions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    loaded = load_questions(questions)
    # gen_judgment.py grades a second turn only for conversations of exactly two turns
    assert expected_judgments(loaded) == [(1, 1), (2, 1), ("x", 1), (2, 2)]
    scores = summarize_judgments([judgment(1, 1), judgment(2, 1), judgment(2, 2)], loaded)
    assert scores["expected"] == 4 and scores["missing"] == [["x", 1]]


def test_missing_judgments_are_counted_per_model_and_judge(tmp_path: Path, caplog) -> None:
    judgments = tmp_path / "j.jsonl"
    complete = [judgment(q.id, turn) for q in load_questions(BUILTIN_QUESTIONS) for turn in (1, 2)]
    partial = [judgment(q.id, 1, judge="gpt-4o") for q in load_questions(BUILTIN_QUESTIONS)]
    judgments.write_text("".join(json.dumps(record) + "\n" for record in complete + partial))
    caplog.set_level(logging.WARNING, logger="vicunaflow.eval.summary")
    summary(questions=BUILTIN_QUESTIONS, judgments=[judgments], output=tmp_path / "s.tsv")
    _, rows = read_table(tmp_path / "s.tsv")
    assert {row["judge"]: row["missing"] for row in rows} == {"gpt-4": "0", "gpt-4o": str(N_QUESTIONS)}
    (warning,) = [record.getMessage() for record in _own(caplog)]
    assert f"m judged by gpt-4o lacks {N_QUESTIONS} of its {N_JUDGMENTS} judgments" in warning


def test_summary_without_judgments_leaves_missing_empty(tmp_path: Path) -> None:
    loss = tmp_path / "loss.json"
    loss.write_text(json.dumps({"model": "a", "dataset": "held", "loss": 1.5, "perplexity": 4.48}))
    summary(questions=BUILTIN_QUESTIONS, losses=[loss], output=tmp_path / "s.tsv")
    _, (row,) = read_table(tmp_path / "s.tsv")
    assert row["missing"] == row["judged"] == "" and row["loss_held"] == "1.5000"


# --- bad input files: file:line and what to do, not a traceback ----------------------------------


def test_a_judgment_whose_question_id_is_a_list_is_named_by_line(tmp_path: Path) -> None:
    judgments = tmp_path / "j.jsonl"
    judgments.write_text(json.dumps(judgment(81, 1)) + "\n" + json.dumps(judgment([81], 1)) + "\n")
    with pytest.raises(VicunaflowError, match=r"j\.jsonl:2: .*question_id \[81\].*remove the line"):
        summary(questions=BUILTIN_QUESTIONS, judgments=[judgments], output=tmp_path / "s.tsv")


def test_votes_that_are_not_utf8_are_named_by_line(tmp_path: Path) -> None:
    votes = tmp_path / "v.jsonl"
    good = b'{"model_left": "a", "model_right": "b", "vote": "left", "tstamp": 1}\n'
    votes.write_bytes(good + b'{"model_left": "a\xe9", "model_right": "b", "vote": "left", "tstamp": 2}\n')
    with pytest.raises(VicunaflowError, match=r"v\.jsonl:2: not UTF-8 .*save the file as UTF-8"):
        arena(votes=votes, output=tmp_path / "r.tsv", rounds=0)
    # a server cut off in the middle of a character: only its unfinished last line, left out as before
    votes.write_bytes(good + '{"model_left": "é'.encode()[:-1])
    assert [battle["model_left"] for battle in read_votes(votes)] == ["a"]


@pytest.mark.parametrize("name", [["a"], {"a": 1}, 7, ""])
def test_a_vote_whose_model_is_no_name_is_named_by_line(tmp_path: Path, name) -> None:
    votes = tmp_path / "v.jsonl"
    lines = [
        {"model_left": "a", "model_right": "b", "vote": "tie"},
        {"model_left": "b", "model_right": name, "vote": "left"},
    ]
    votes.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(VicunaflowError, match=r"v\.jsonl:2: model_right .* is not a model name; remove the line"):
        arena(votes=votes, output=tmp_path / "r.tsv", rounds=0)


# --- eval arena: a model left out of a bootstrap resample ------------------------------------------


def one_battle_model_battles() -> list[dict]:
    """60 battles of A and B, then one that C loses: C is in no battle of about a third of the resamples."""
    battles = [
        {"model_left": "A", "model_right": "B", "vote": ("left", "right", "tie")[i % 3], "tstamp": i} for i in range(60)
    ]
    return [*battles, {"model_left": "C", "model_right": "A", "vote": "right", "tstamp": 100}]


def test_a_model_without_battles_in_a_round_is_left_out_of_it() -> None:
    left, right, score = np.array([0, 0, 2]), np.array([1, 1, 0]), np.array([1.0, 0.5, 0.0])
    # round 0 draws C's battle, round 1 does not: C's Elo there is no measurement, not the starting 1000
    elo = online_elo(left[[[0, 2, 1], [0, 1, 1]]], right[[[0, 2, 1], [0, 1, 1]]], score[[[0, 2, 1], [0, 1, 1]]], 3)
    assert not np.isnan(elo[0]).any() and np.isnan(elo[1, 2]) and not np.isnan(elo[1, :2]).any()
    bt = bradley_terry(left, right, score, np.array([1.0, 1.0, 0.0]), 3)
    assert math.isnan(bt[2]) and np.mean(bt[:2]) == pytest.approx(1000)  # centred on the models fitted
    assert bt[0] > bt[1]


def test_intervals_of_a_model_with_few_battles_come_from_the_rounds_it_is_in() -> None:
    rows = {row["model"]: row for row in ratings(one_battle_model_battles(), rounds=400, seed=0)["models"]}
    c = rows["C"]
    assert 0.5 * 400 < c["bootstrap_rounds"] < 400 and rows["A"]["bootstrap_rounds"] == 400
    # C only ever lost: in every round with its battle it is below the start (Elo) and the field (BT);
    # rounds without it would put exactly 1000 in its interval
    assert c["elo_lower"] <= c["elo"] <= c["elo_upper"] < 1000
    assert c["bt_lower"] <= c["bt_upper"] < 900


def test_a_model_in_too_few_rounds_gets_no_interval_and_a_warning(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="vicunaflow.eval.arena")
    result = ratings(one_battle_model_battles(), rounds=MIN_ROUNDS, seed=0)
    rows = {row["model"]: row for row in result["models"]}
    assert rows["C"]["bootstrap_rounds"] < MIN_ROUNDS
    assert all(math.isnan(rows["C"][key]) for key in ("elo_lower", "elo_upper", "bt_lower", "bt_upper"))
    assert all(math.isfinite(rows[m][key]) for m in "AB" for key in ("elo_lower", "bt_upper"))
    (warning,) = [record.getMessage() for record in _own(caplog)]
    assert f"no 95% interval for C ({rows['C']['bootstrap_rounds']} rounds)" in warning and "--rounds" in warning


def test_summary_leaves_a_missing_arena_interval_empty(tmp_path: Path) -> None:
    votes = tmp_path / "votes.jsonl"
    votes.write_text("".join(json.dumps(battle) + "\n" for battle in one_battle_model_battles()))
    arena(votes=votes, output=tmp_path / "arena.json", rounds=MIN_ROUNDS)
    summary(questions=BUILTIN_QUESTIONS, arena=tmp_path / "arena.json", output=tmp_path / "s.tsv")
    _, rows = read_table(tmp_path / "s.tsv")
    c = next(row for row in rows if row["model"] == "C")
    assert c["arena_bt_lower"] == c["arena_bt_upper"] == "" and float(c["arena_bt"]) < 900

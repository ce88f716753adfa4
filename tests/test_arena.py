"""Arena ratings (eval/arena.py): known outcomes, Elo against Bradley–Terry, bootstrap intervals, the verb."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vicunaflow import VicunaflowError
from vicunaflow.eval.arena import arena, ratings, read_votes


def battles_from_strengths(strengths: dict[str, float], n: int, seed: int = 1, tie_rate: float = 0.1) -> list[dict]:
    """Battles between random pairs, won as Bradley–Terry says for the given ratings (Elo scale)."""
    rng = np.random.default_rng(seed)
    models = list(strengths)
    battles = []
    for t in range(n):
        a, b = rng.choice(len(models), size=2, replace=False)
        p_left = 1 / (1 + 10 ** ((strengths[models[b]] - strengths[models[a]]) / 400))
        u = rng.random()
        vote = "tie" if u < tie_rate else ("left" if rng.random() < p_left else "right")
        battles.append({"model_left": models[a], "model_right": models[b], "vote": vote, "tstamp": float(t)})
    return battles


def order(result: dict, key: str) -> list[str]:
    return [row["model"] for row in sorted(result["models"], key=lambda r: -r[key])]


def test_known_outcomes_give_the_expected_order():
    # a beats b and c always, b beats c always, plus a tie each way so nobody is unbeaten forever
    battles = []
    for t in range(30):
        battles += [
            {"model_left": "a", "model_right": "b", "vote": "left", "tstamp": 3 * t},
            {"model_left": "c", "model_right": "b", "vote": "right", "tstamp": 3 * t + 1},
            {"model_left": "c", "model_right": "a", "vote": "right", "tstamp": 3 * t + 2},
        ]
    result = ratings(battles, rounds=50)
    assert order(result, "elo") == order(result, "bt") == ["a", "b", "c"]
    rows = {row["model"]: row for row in result["models"]}
    assert rows["a"]["wins"] == 60 and rows["a"]["losses"] == 0 and rows["c"]["losses"] == 60
    assert rows["b"]["wins"] == rows["b"]["losses"] == 30 and rows["b"]["battles"] == 60
    assert np.isclose(np.mean([r["bt"] for r in result["models"]]), 1000)


def test_ties_and_both_bad_rate_two_models_equal():
    battles = [
        {"model_left": "x", "model_right": "y", "vote": v, "tstamp": i} for i, v in enumerate(["tie", "bothbad"] * 20)
    ]
    result = ratings(battles, rounds=0)
    for row in result["models"]:
        assert row["bt"] == pytest.approx(1000, abs=1e-6) and row["ties"] == 40
        assert np.isnan(row["bt_lower"])  # no bootstrap asked


def test_one_win_then_one_tie_gives_the_hand_computed_ratings():
    battles = [
        {"model_left": "a", "model_right": "b", "vote": "left", "tstamp": 0},
        {"model_left": "a", "model_right": "b", "vote": "tie", "tstamp": 1},
    ]
    rows = {row["model"]: row for row in ratings(battles, rounds=0)["models"]}
    # Elo, K = 4 from 1000 each: the win is expected half, so a = 1000 + 4 x 0.5 = 1002, b = 998. The tie:
    # a was expected to score 1 / (1 + 10^((998 - 1002) / 400)) = 1 / (1 + 10^-0.01) = 0.505756, so
    # a = 1002 + 4 x (0.5 - 0.505756) = 1001.977 and b = 998.023.
    assert rows["a"]["elo"] == pytest.approx(1001.976975, abs=1e-6)
    assert rows["b"]["elo"] == pytest.approx(998.023025, abs=1e-6)
    # Bradley–Terry: a scores 1 + 0.5 of 2, so P(a beats b) = 0.75 = 1 / (1 + e^-(ta - tb)), ta - tb = ln 3;
    # centred, +-ln(3) / 2 on the scale 400 / ln 10: 1000 +- 95.424 (the L2 term moves it < 0.001).
    assert rows["a"]["bt"] == pytest.approx(1095.424, abs=1e-3)
    assert rows["b"]["bt"] == pytest.approx(904.576, abs=1e-3)


def test_bradley_terry_recovers_strengths_and_agrees_with_elo():
    strengths = {"m1": 1150, "m2": 1050, "m3": 1000, "m4": 900}
    result = ratings(battles_from_strengths(strengths, 6000), rounds=100, seed=3)
    assert order(result, "bt") == order(result, "elo") == list(strengths)
    rows = {row["model"]: row for row in result["models"]}
    mean = np.mean(list(strengths.values()))
    for model, strength in strengths.items():
        # BT is the MLE of exactly this model: within ~25 points of the truth (centred like the ratings)
        assert rows[model]["bt"] == pytest.approx(strength - mean + 1000, abs=25), rows[model]
        assert rows[model]["bt_lower"] <= rows[model]["bt"] <= rows[model]["bt_upper"]
        # online Elo (K=4) lands near BT on this many votes
        assert rows[model]["elo"] == pytest.approx(rows[model]["bt"], abs=40), rows[model]


def test_intervals_shrink_with_more_votes_and_are_seeded():
    strengths = {"a": 1100, "b": 1000, "c": 950}
    few = ratings(battles_from_strengths(strengths, 150), rounds=200, seed=0)
    many = ratings(battles_from_strengths(strengths, 3000), rounds=200, seed=0)

    def width(result, key):
        return np.mean([row[f"{key}_upper"] - row[f"{key}_lower"] for row in result["models"]])

    assert width(many, "bt") < 0.5 * width(few, "bt"), (width(few, "bt"), width(many, "bt"))
    # Online Elo does not narrow like this: with a fixed K its last few hundred battles always move it,
    # and on few votes it has barely left 1000 (why Chatbot Arena ranks by Bradley–Terry). It stays finite.
    assert 0 < width(many, "elo") < 150
    assert ratings(battles_from_strengths(strengths, 150), rounds=200, seed=0) == few  # same seed, same numbers
    assert ratings(battles_from_strengths(strengths, 150), rounds=200, seed=1) != few


def test_arena_verb_reads_the_servers_votes(tmp_path: Path):
    votes = tmp_path / "arena_votes.jsonl"
    lines = [
        {"tstamp": i, "conversation_id": f"c{i}", "model_left": left, "model_right": right, "vote": vote,
         "prompt": "hi", "answer_left": "1", "answer_right": "2"}
        for i, (left, right, vote) in enumerate([("a", "b", "left"), ("b", "a", "right"), ("a", "b", "tie")] * 5)
    ]  # fmt: skip
    votes.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"tstamp": 99, "model_le')  # being written
    arena(votes=votes, output=tmp_path / "r.tsv", output_json=tmp_path / "r.json", rounds=20)
    table = (tmp_path / "r.tsv").read_text().splitlines()
    assert table[0].split("\t")[:4] == ["model", "elo", "elo_lower", "elo_upper"]
    assert [line.split("\t")[0] for line in table[1:]] == ["a", "b"]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["battles"] == 15 and result["models"][0]["wins"] == 10 and result["models"][0]["ties"] == 5


def test_bad_votes_are_refused_naming_the_line(tmp_path: Path):
    votes = tmp_path / "v.jsonl"
    votes.write_text('{"model_left": "a", "model_right": "b", "vote": "left"}\n{"model_left": "a", "vote": "x"}\n')
    with pytest.raises(VicunaflowError, match=r"v.jsonl:2: not an arena vote"):
        read_votes(votes)
    votes.write_text('{"model_left": "a", "model_right": "b", "vote": "up"}\n')
    with pytest.raises(VicunaflowError, match=r"v.jsonl:1: vote 'up'"):
        read_votes(votes)
    votes.write_text("")
    with pytest.raises(VicunaflowError, match="no votes yet"):
        arena(votes=votes, output=tmp_path / "r.tsv")


def test_summary_shows_the_ratings_beside_the_judged_scores(tmp_path: Path):
    from vicunaflow.eval.mt_bench import BUILTIN_QUESTIONS
    from vicunaflow.eval.summary import summary

    votes = tmp_path / "votes.jsonl"
    battles = [{"model_left": "a", "model_right": "b", "vote": "left", "tstamp": i} for i in range(5)]
    votes.write_text("".join(json.dumps(b) + "\n" for b in battles))
    arena(votes=votes, output=tmp_path / "arena.json", rounds=10)
    loss = tmp_path / "loss.json"
    loss.write_text(json.dumps({"model": "a", "dataset": "held", "loss": 1.5, "perplexity": 4.48}))
    summary(questions=BUILTIN_QUESTIONS, losses=[loss], arena=tmp_path / "arena.json", output=tmp_path / "s.tsv")
    header, *rows = [line.split("\t") for line in (tmp_path / "s.tsv").read_text().splitlines()]
    assert header[-5:] == ["arena_bt", "arena_bt_lower", "arena_bt_upper", "arena_elo", "arena_battles"]
    table = {row[0]: dict(zip(header, row, strict=True)) for row in rows}
    assert table["a"]["loss_held"] == "1.5000" and float(table["a"]["arena_bt"]) > float(table["b"]["arena_bt"])
    assert table["b"]["arena_battles"] == "5" and table["b"]["loss_held"] == ""  # rated in the arena only
    summary(questions=BUILTIN_QUESTIONS, losses=[loss], output=tmp_path / "plain.tsv")
    assert "arena_bt" not in (tmp_path / "plain.tsv").read_text()  # no votes, no arena columns


def test_workflow_rates_the_arena_only_when_votes_exist(tmp_path: Path):
    from test_eval import planned_jobs  # tests/ is on sys.path

    (tmp_path / "without").mkdir()
    jobs = planned_jobs(tmp_path / "without", "results/eval/summary.tsv")
    assert "eval_arena" not in jobs and jobs["eval_summary"] == 1
    workdir = tmp_path / "with"
    (workdir / "results" / "serve").mkdir(parents=True)
    (workdir / "results" / "serve" / "arena_votes.jsonl").write_text(
        '{"model_left": "a", "model_right": "b", "vote": "tie"}\n'
    )
    jobs = planned_jobs(workdir, "results/eval/summary.tsv")
    assert jobs["eval_arena"] == 1 and jobs["eval_summary"] == 1

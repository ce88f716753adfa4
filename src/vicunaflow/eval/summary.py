"""`vicunaflow eval summary`: MT-bench scores and held-out losses of several models in one table.

Scores are averaged as FastChat's show_result.py does: judgments scored -1 (no `[[rating]]`) are
left out, and counted in `unrated`. Like show_result.py it averages whatever a judgment file holds, but
an incomplete one (a judge run stopped by its quota: every first turn is judged before any second) is
not silent: the (question, turn) pairs the judge would have graded and did not are counted in `missing`,
with a warning. Per turn, per category (both turns, as FastChat's radar plot) and overall, for each
(model, judge) pair; each model's loss files add loss and perplexity columns,
the ratings of `eval arena` (human votes on `serve`'s arena page), when given, arena columns, and
each `eval harness` file an lm_eval_<suite> column (the suite's main metric).
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from pathlib import Path

from vicunaflow import VicunaflowError, first_few, require_file
from vicunaflow.eval.mt_bench import Question, judged_turns, load_questions, read_judgments

log = logging.getLogger(__name__)

# MT-bench's categories in FastChat's order; others follow alphabetically.
CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
UNRATED = -1
ARENA_COLUMNS = ["arena_bt", "arena_bt_lower", "arena_bt_upper", "arena_elo", "arena_battles"]


def summary(
    *,
    questions: Path,
    output: Path,
    judgments: list[Path] | None = None,
    losses: list[Path] | None = None,
    output_json: Path | None = None,
    arena: Path | None = None,
    harness: list[Path] | None = None,
    overwrite: bool = False,
) -> Path:
    """Summarise judgment files (`eval judge`) and loss files (`eval loss`) into one TSV row per model and judge.

    Arguments:
        questions: the questions the judgments are about (their categories group the scores).
        output: TSV: model, judge, mt_bench, turn_1, turn_2, judged, unrated, missing (judgments the judge
            has yet to make: 0 when complete), one column per category, then loss_<dataset> and
            perplexity_<dataset> per loss file.
        judgments: judgment files in FastChat's format; several models and judges may share one.
        losses: loss files written by `vicunaflow eval loss`.
        output_json: the same, in full (counts per turn and category), as JSON.
        arena: the JSON of `vicunaflow eval arena`: adds arena_bt (Bradley–Terry, with its 95% interval),
            arena_elo and arena_battles; models rated there only get a row too.
        harness: results files of `vicunaflow eval harness`: adds lm_eval_<suite>, each suite's main metric.
        overwrite: replace output files that exist but are not this verb's unchanged earlier outputs (default: refuse).
    """
    from vicunaflow.eval.arena import read_ratings
    from vicunaflow.eval.harness import read_harness
    from vicunaflow.outputs import atomic_write_bytes, check_output_files

    log.info("eval summary: questions=%s judgments=%s losses=%s output=%s", questions, judgments, losses, output)
    if not (judgments or losses or arena or harness):
        raise VicunaflowError(
            "eval summary: nothing to summarise: give --judgments (eval judge), --losses (eval loss), --arena "
            "(eval arena) or --harness (eval harness) files"
        )
    check_output_files(
        {"--output": output, "--output_json": output_json},
        inputs=[questions, arena, *(judgments or []), *(losses or []), *(harness or [])],
        overwrite=overwrite,
    )
    loaded = load_questions(questions)
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    files_of: dict[tuple[str, str], list[Path]] = defaultdict(list)
    known = {question.id for question in loaded}
    for path in judgments or []:
        read = read_judgments(require_file(path, "judgment file", "a judgment file of `vicunaflow eval judge`"))
        if not read:  # a judge run that failed before its first judgment: no scores, not a model without any
            raise VicunaflowError(f"{path}: no judgments in it; judge the answers with `vicunaflow eval judge`")
        # "1" is not question 1: its category would read "unknown"
        unknown = sorted({judgment["question_id"] for judgment in read} - known, key=str)
        if unknown:  # another question set: its categories would all read "unknown", its scores pass unchecked
            raise VicunaflowError(
                f"{path}: judgments of question_id {first_few(map(repr, unknown))}, not in {questions}: "
                "give --questions the file the answers were generated from"
            )
        for judgment in read:
            model_and_judge = judgment["model"], judgment["judge"][0]
            groups[model_and_judge].append(judgment)
            if path not in files_of[model_and_judge]:  # named by the warning about missing judgments
                files_of[model_and_judge].append(path)
    loss_of: dict[str, dict[str, dict]] = defaultdict(dict)
    for path in losses or []:
        record = _read_loss(path)
        loss_of[record["model"]][record["dataset"]] = record
    ratings = read_ratings(arena) if arena else {}
    suites_of: dict[str, dict[str, dict]] = defaultdict(dict)
    for path in harness or []:
        record = read_harness(path)
        suites_of[record["model"]][record["suite"]] = record["main"]
    rows = []
    models = list(dict.fromkeys([model for model, _ in groups] + list(loss_of) + list(ratings) + list(suites_of)))
    for model in models:
        judges = [judge for m, judge in groups if m == model] or [None]
        for judge in judges:
            scores = summarize_judgments(groups[model, judge], loaded) if judge is not None else None
            if scores and scores["missing"]:
                _warn_incomplete(model, judge, scores, files_of[model, judge])
            row = {"model": model, "judge": judge, "mt_bench": scores, "loss": loss_of.get(model, {})}
            row["lm_eval"] = suites_of.get(model, {})
            if arena:
                row["arena"] = ratings.get(model)
            rows.append(row)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(output, to_tsv(rows).encode())
    if output_json is not None:
        atomic_write_bytes(output_json, (json.dumps(rows, indent=1) + "\n").encode())
    log.info("summary of %d models:\n%s", len(models), to_tsv(rows))
    return Path(output)


def summarize_judgments(judgments: list[dict], questions: list[Question]) -> dict:
    """{"overall", "turns": {1: .., 2: ..}, "categories": {..}}, each {"score", "judged", "unrated"}; "expected"
    and "missing" ([question_id, turn] pairs without a judgment), since a partial file averages fine but misleads."""
    category_of = {q.id: q.category for q in questions}
    overall, turns, categories = _Mean(), defaultdict(_Mean), defaultdict(_Mean)
    for judgment in judgments:
        score = judgment["score"]
        category = category_of.get(judgment["question_id"], "unknown")
        for mean in (overall, turns[judgment["turn"]], categories[category]):
            mean.add(score)
    order = [c for c in CATEGORIES if c in categories] + sorted(set(categories) - set(CATEGORIES))
    expected = expected_judgments(questions)
    judged = {(judgment["question_id"], judgment["turn"]) for judgment in judgments}
    return {
        "overall": overall.result(),
        "turns": {turn: turns[turn].result() for turn in sorted(turns)},
        "categories": {category: categories[category].result() for category in order},
        "expected": len(expected),
        "missing": [[question_id, turn] for question_id, turn in expected if (question_id, turn) not in judged],
    }


def expected_judgments(questions: list[Question]) -> list[tuple[int | str, int]]:
    """The (question_id, turn) pairs `eval judge` grades (mt_bench.judged_turns), in its order."""
    return [(question.id, turn) for question, turn in judged_turns(questions)]


def format_table(scores: dict) -> str:
    """A few aligned lines for the log."""
    lines = [_line("overall", scores["overall"])]
    lines += [_line(f"turn {turn}", result) for turn, result in scores["turns"].items()]
    lines += [_line(category, result) for category, result in scores["categories"].items()]
    return "\n".join(lines)


def to_tsv(rows: list[dict]) -> str:
    categories = list(dict.fromkeys(c for row in rows if row["mt_bench"] for c in row["mt_bench"]["categories"]))
    datasets = list(dict.fromkeys(d for row in rows for d in row["loss"]))
    header = ["model", "judge", "mt_bench", "turn_1", "turn_2", "judged", "unrated", "missing", *categories]
    header += [f"{name}_{d}" for d in datasets for name in ("loss", "perplexity")]
    suites = list(dict.fromkeys(suite for row in rows for suite in row.get("lm_eval", {})))
    header += [f"lm_eval_{suite}" for suite in suites]
    with_arena = any("arena" in row for row in rows)
    if with_arena:
        header += ARENA_COLUMNS
    lines = ["\t".join(header)]
    for row in rows:
        scores = row["mt_bench"] or {"overall": {}, "turns": {}, "categories": {}}
        cells = [row["model"], row["judge"] or ""]
        cells += [_cell(scores["overall"].get("score"))]
        cells += [_cell(scores["turns"].get(turn, {}).get("score")) for turn in (1, 2)]
        cells += [_cell(scores["overall"].get("judged")), _cell(scores["overall"].get("unrated"))]
        missing = scores.get("missing")
        cells += [_cell(None if missing is None else len(missing))]
        cells += [_cell(scores["categories"].get(c, {}).get("score")) for c in categories]
        for d in datasets:
            loss = row["loss"].get(d, {})
            cells += [_cell(loss.get("loss")), _cell(loss.get("perplexity"))]
        cells += [_cell(row.get("lm_eval", {}).get(suite, {}).get("value")) for suite in suites]
        if with_arena:
            rating = row.get("arena") or {}
            values = [rating.get(key.removeprefix("arena_")) for key in ARENA_COLUMNS]
            no_interval = [isinstance(value, float) and math.isnan(value) for value in values]  # empty, as arena.tsv
            cells += [_cell(None if empty else value) for value, empty in zip(values, no_interval, strict=True)]
        lines.append("\t".join(cells))
    return "\n".join(lines) + "\n"


class _Mean:
    def __init__(self):
        self.total, self.rated, self.unrated = 0.0, 0, 0

    def add(self, score: float) -> None:
        if score == UNRATED:
            self.unrated += 1
        else:
            self.total += score
            self.rated += 1

    def result(self) -> dict:
        score = self.total / self.rated if self.rated else None
        return {"score": score, "judged": self.rated + self.unrated, "unrated": self.unrated}


def _warn_incomplete(model: str, judge: str, scores: dict, paths: list[Path]) -> None:
    missing = scores["missing"]
    log.warning(
        "%s: %s judged by %s lacks %d of its %d judgments (%s): its scores average only the judged ones "
        "(an interrupted judge run?); run `vicunaflow eval judge` again with the same --output: it judges "
        "only what is missing",
        ", ".join(map(str, paths)),
        model,
        judge,
        len(missing),
        scores["expected"],
        first_few(f"question {question_id} turn {turn}" for question_id, turn in missing),
    )


def _line(name: str, result: dict) -> str:
    score = "   n/a" if result["score"] is None else f"{result['score']:6.3f}"
    return f"  {name:<12} {score}  ({result['judged']} judged, {result['unrated']} without a rating)"


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


def _read_loss(path: Path) -> dict:
    try:
        record = json.loads(Path(path).read_text())
        if not all(k in record for k in ("model", "dataset", "loss", "perplexity")):
            raise KeyError("model, dataset, loss, perplexity")
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise VicunaflowError(f"{path}: not a loss file of `vicunaflow eval loss` ({err})") from None
    return record

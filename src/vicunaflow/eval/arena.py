"""`vicunaflow eval arena`: Elo and Bradley–Terry ratings, with bootstrap intervals, from arena votes.

The votes are the JSONL lines that `vicunaflow serve`'s arena page appends to
`<results-dir>/arena_votes.jsonl` (serve/arena.py writes them): one battle a line, two anonymous models
(`model_left`, `model_right`) and the user's `vote`: left, right, tie or bothbad.

The two ratings are those of Chatbot Arena (FastChat's elo_analysis.py, read as the reference):

- online Elo: battles in time order, K = 4, base 10, scale 400, everyone starting at 1000. It
  depends on the order, so its interval comes from bootstrap samples replayed in a random order.
- Bradley–Terry: the maximum-likelihood strengths of P(i beats j) = 1 / (1 + 10^((r_j - r_i)/400)),
  order-free; a tie (or both bad) counts half a win to each side, as in FastChat's current
  `compute_elo_mle_with_tie` (older versions counted it once each way: the same optimum). Solved by
  Newton's method; a tiny L2 penalty keeps an unbeaten or winless model finite. Centred on 1000
  (FastChat anchors one model of its own at 1114 instead).

Intervals are the 2.5 and 97.5 percentiles over `rounds` bootstrap resamples of the battles, from
`seed`: the same votes and seed give the same numbers. A resample that drew none of a model's battles
says nothing about it: the model is left out of that round (NaN, as FastChat's DataFrame of rounds has
it) rather than kept at the starting rating, and its percentiles are taken over the rounds it is in;
in fewer than MIN_ROUNDS of them it gets no interval, with a warning. Bradley–Terry's interval narrows
as votes accumulate; online Elo's does not below a floor set by K (its last few hundred battles always
move it), which is why Chatbot Arena ranks by Bradley–Terry and so does this table. Only numpy.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from vicunaflow import VicunaflowError

log = logging.getLogger(__name__)

VOTES = ("left", "right", "tie", "bothbad")
SCALE, BASE, INIT, K = 400.0, 10.0, 1000.0, 4.0  # Chatbot Arena's Elo constants
L2 = 1e-6  # Bradley–Terry's penalty (FastChat: LogisticRegression(C=1e6)); per battle, on log-strengths
MIN_ROUNDS = 20  # bootstrap rounds a model must be in for a 95% interval: fewer are a few points, not percentiles


def arena(
    *,
    votes: Path,
    output: Path,
    output_json: Path | None = None,
    rounds: int = 1000,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Rate the models of arena votes (`serve`'s arena page) with Elo and Bradley–Terry, with 95% bootstrap intervals.

    Arguments:
        votes: the votes file, e.g. results/serve/arena_votes.jsonl.
        output: the ratings table: JSON when it ends in .json, else TSV (model, elo, elo_lower, elo_upper,
            bt, bt_lower, bt_upper, battles, wins, ties, losses), best Bradley–Terry rating first.
        output_json: also write the JSON here.
        rounds: bootstrap resamples for the intervals (0: none).
        seed: seed of the resampling.
        overwrite: replace output files that exist but are not this verb's unchanged earlier outputs (default: refuse).
    """
    from vicunaflow.outputs import atomic_write_bytes, check_output_files

    log.info("eval arena: votes=%s output=%s rounds=%d seed=%d", votes, output, rounds, seed)
    check_output_files({"--output": output, "--output_json": output_json}, inputs=[votes], overwrite=overwrite)
    battles = read_votes(votes)
    if not battles:
        raise VicunaflowError(f"{votes}: no votes yet (vote on the arena page of `vicunaflow serve`)")
    result = ratings(battles, rounds=rounds, seed=seed)
    result["votes_file"] = str(votes)
    for path in [output, output_json]:
        if path is None:
            continue
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(result, indent=1) + "\n" if str(path).endswith(".json") else to_tsv(result)
        atomic_write_bytes(path, text.encode())
    log.info("%d battles, %d models:\n%s", result["battles"], len(result["models"]), to_tsv(result))
    return Path(output)


def read_votes(path: Path) -> list[dict]:
    """The battles of a votes file, in time order. A last line without its newline (the server is
    writing it) is left out; any other unreadable line is an error naming its number."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise VicunaflowError(f"{path}: cannot read the votes ({err.strerror or err})") from None
    lines = data.split(b"\n")  # decoded line by line: a line cut mid-character by the writer is only skipped
    if lines[-1].strip():
        log.warning("%s: the last line is incomplete (still being written?): left out", path)
    battles = []
    for number, raw in enumerate(lines[:-1], start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise VicunaflowError(
                f"{path}:{number}: not UTF-8 (byte {err.start} of the line), so not a vote of `vicunaflow serve`; "
                "remove the line or save the file as UTF-8"
            ) from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            battle = {k: record[k] for k in ("model_left", "model_right", "vote")}
            battle["tstamp"] = float(record.get("tstamp", 0))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise VicunaflowError(f"{path}:{number}: not an arena vote ({err})") from None
        for side in ("model_left", "model_right"):  # a model's name keys the ratings: only a name will do
            if not isinstance(battle[side], str) or not battle[side]:
                raise VicunaflowError(
                    f"{path}:{number}: {side} {battle[side]!r} is not a model name; remove the line "
                    "(`vicunaflow serve` writes the names of the models it serves)"
                )
        if battle["vote"] not in VOTES:
            raise VicunaflowError(f"{path}:{number}: vote {battle['vote']!r} is not one of {', '.join(VOTES)}")
        if battle["model_left"] == battle["model_right"]:
            continue  # a model against itself says nothing about ratings
        battles.append(battle)
    return sorted(battles, key=lambda b: b["tstamp"])  # stable: lines of one instant keep their order


def ratings(battles: list[dict], *, rounds: int = 1000, seed: int = 0) -> dict:
    """{"battles", "rounds", "seed", "models": [{model, elo, elo_lower, ..., bt, ..., wins, ties, losses,
    bootstrap_rounds}]}: bootstrap_rounds, the resamples that drew one of the model's battles."""
    models = sorted({b["model_left"] for b in battles} | {b["model_right"] for b in battles})
    index = {m: i for i, m in enumerate(models)}
    left = np.array([index[b["model_left"]] for b in battles])
    right = np.array([index[b["model_right"]] for b in battles])
    score = np.array([{"left": 1.0, "right": 0.0}.get(b["vote"], 0.5) for b in battles])  # left's result
    n = len(models)
    elo = online_elo(left, right, score, n)[0]
    bt = bradley_terry(left, right, score, np.ones(len(battles)), n)
    rng = np.random.default_rng(seed)
    bounds = {name: np.full((2, n), math.nan) for name in ("elo", "bt")}
    in_rounds = np.zeros(n, dtype=int)
    if rounds > 0:
        samples = rng.integers(0, len(battles), size=(rounds, len(battles)))  # [rounds, battles]
        elo_samples = online_elo(left[samples], right[samples], score[samples], n)  # [rounds, models], NaN: absent
        weights = np.stack([np.bincount(s, minlength=len(battles)) for s in samples])  # [rounds, battles]
        bt_samples = np.stack([bradley_terry(left, right, score, w, n) for w in weights])
        in_rounds = np.sum(~np.isnan(elo_samples), axis=0)
        enough = in_rounds >= MIN_ROUNDS
        for name, values in (("elo", elo_samples), ("bt", bt_samples)):
            bounds[name][:, enough] = np.nanpercentile(values[:, enough], [2.5, 97.5], axis=0)  # [2, models]
        if not enough.all():
            log.warning(
                "no 95%% interval for %s: in fewer than %d of the %d bootstrap rounds (a round without any of "
                "a model's battles leaves it out); more votes for them, or a larger --rounds, give one",
                ", ".join(f"{models[i]} ({in_rounds[i]} rounds)" for i in np.flatnonzero(~enough)),
                MIN_ROUNDS,
                rounds,
            )
    rows = []
    for i, model in enumerate(models):
        as_left, as_right = left == i, right == i
        wins = int(np.sum(as_left & (score == 1)) + np.sum(as_right & (score == 0)))
        losses = int(np.sum(as_left & (score == 0)) + np.sum(as_right & (score == 1)))
        row = {"model": model, "elo": float(elo[i]), "bt": float(bt[i])}
        for name in ("elo", "bt"):
            row[f"{name}_lower"], row[f"{name}_upper"] = (float(bound) for bound in bounds[name][:, i])
        row["bootstrap_rounds"] = int(in_rounds[i])  # the rounds its interval is taken over
        battles_i = int(np.sum(as_left | as_right))
        row |= {"battles": battles_i, "wins": wins, "ties": battles_i - wins - losses, "losses": losses}
        rows.append(row)
    rows.sort(key=lambda r: -r["bt"])
    return {"battles": len(battles), "rounds": rounds, "seed": seed, "models": rows}


def online_elo(left: np.ndarray, right: np.ndarray, score: np.ndarray, n: int) -> np.ndarray:
    """Elo after replaying battles in order; [battles] arrays give [1, n], [rounds, battles] give [rounds, n]
    (every round replayed at once: one vector step per battle instead of a Python loop per round).
    A model without a battle in a round is NaN there: its starting rating would be no measurement."""
    left, right, score = np.atleast_2d(left), np.atleast_2d(right), np.atleast_2d(score)
    rounds = left.shape[0]
    rating = np.full((rounds, n), INIT)
    rows = np.arange(rounds)
    for t in range(left.shape[1]):
        a, b = left[:, t], right[:, t]
        expected = 1.0 / (1.0 + BASE ** ((rating[rows, b] - rating[rows, a]) / SCALE))  # P(left wins)
        delta = K * (score[:, t] - expected)
        rating[rows, a] += delta
        rating[rows, b] -= delta
    battled = np.zeros((rounds, n), dtype=bool)
    battled[rows[:, None], left] = battled[rows[:, None], right] = True
    rating[~battled] = math.nan
    return rating


def bradley_terry(left: np.ndarray, right: np.ndarray, score: np.ndarray, weight: np.ndarray, n: int) -> np.ndarray:
    """Maximum-likelihood Bradley–Terry ratings on Elo's scale (mean 1000) by Newton's method.

    The log-likelihood sum_k w_k [s_k log p_k + (1 - s_k) log(1 - p_k)], p_k = sigmoid(theta_left - theta_right),
    is concave; with the L2 term its optimum is unique and Newton converges in a few steps. A model without
    weight (not in a bootstrap resample) is NaN and left out of the centring, as FastChat fits only the
    models of the resample.
    """
    theta = np.zeros(n)
    penalty = L2 * max(weight.sum(), 1.0)
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(theta[right] - theta[left]))  # [battles]
        residual = weight * (score - p)
        gradient = np.bincount(left, residual, n) - np.bincount(right, residual, n) - penalty * theta
        curvature = weight * p * (1.0 - p)
        hessian = np.zeros((n, n))
        np.add.at(hessian, (left, left), -curvature)
        np.add.at(hessian, (right, right), -curvature)
        np.add.at(hessian, (left, right), curvature)
        np.add.at(hessian, (right, left), curvature)
        hessian -= penalty * np.eye(n)
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.max(np.abs(step)) < 1e-9:
            break
    battled = (np.bincount(left, weight, n) + np.bincount(right, weight, n)) > 0
    theta = np.where(battled, theta - theta[battled].mean(), math.nan)
    return INIT + SCALE / math.log(BASE) * theta


def to_tsv(result: dict) -> str:
    header = ["model", "elo", "elo_lower", "elo_upper", "bt", "bt_lower", "bt_upper"]
    header += ["battles", "wins", "ties", "losses"]
    lines = ["\t".join(header)]
    for row in result["models"]:
        cells = [row["model"]]
        cells += ["" if math.isnan(row[k]) else f"{row[k]:.1f}" for k in header[1:7]]
        cells += [str(row[k]) for k in header[7:]]
        lines.append("\t".join(cells))
    return "\n".join(lines) + "\n"


def read_ratings(path: Path) -> dict[str, dict]:
    """model -> its row, from the JSON of `eval arena` (for `eval summary`)."""
    try:
        result = json.loads(Path(path).read_text())
        return {row["model"]: row for row in result["models"]}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise VicunaflowError(f"{path}: not the JSON of `vicunaflow eval arena` ({err})") from None

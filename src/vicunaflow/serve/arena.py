"""The arena's routes: one prompt to two models drawn at random, answered anonymously, then a vote.

    POST /arena/battles                        draw two different models; returns the battle id only
    POST /arena/battles/{id}/chat/{left|right}  a chat completion from that side's model (streamed or not),
                                               its `model` field replaced by the side: the page never sees a name
    POST /arena/battles/{id}/vote              {"vote": "left" | "right" | "tie" | "bothbad"}: appends one line
                                               to <results_dir>/arena_votes.jsonl, then names the two models

The names stay on the server until the vote (FastChat's arena sends them to the browser hidden in
state; here they are not in the page at all). A battle is voted once (409 after). The vote line is
written with one O_APPEND write, so concurrent votes, and `vicunaflow eval arena` reading meanwhile,
never see a half line from another writer; the reader leaves out a last line still without its newline.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import uuid
from collections import OrderedDict
from pathlib import Path

from fastapi import FastAPI, Request

log = logging.getLogger(__name__)

SIDES = ("left", "right")
VOTES = ("left", "right", "tie", "bothbad")  # eval/arena.py reads these
VOTES_FILE = "arena_votes.jsonl"
MAX_BATTLES = 10_000  # battles kept in memory; the oldest are forgotten (their votes are refused)


def install(app: FastAPI, models: list[str], authorize, chat, max_body_bytes: int, results_dir: Path | None) -> None:
    """Add the arena routes; `chat(request, body, shown_name, record)` is app.py's chat path."""
    from vicunaflow.serve.errors import APIError, read_body
    from vicunaflow.serve.protocol import ChatCompletionRequest

    battles: OrderedDict[str, dict] = OrderedDict()
    draw = random.SystemRandom()

    def battle_of(battle_id: str) -> dict:
        if battle_id not in battles:
            raise APIError(
                404, f"no battle {battle_id!r} (the server restarted?): start a new one", code="battle_not_found"
            )
        return battles[battle_id]

    @app.post("/arena/battles")
    async def new_battle(request: Request):
        authorize(request)
        if len(models) < 2:
            raise APIError(
                400,
                f"the arena needs two models or more; this server serves {len(models)} "
                "(serve --model-path A --model-path B)",
                code="arena_needs_two_models",
            )
        left, right = draw.sample(models, 2)
        battle_id = uuid.uuid4().hex
        battles[battle_id] = {"models": {"left": left, "right": right}, "answers": {}, "prompt": None, "voted": False}
        while len(battles) > MAX_BATTLES:
            battles.popitem(last=False)
        return {"id": battle_id, "sides": list(SIDES)}

    @app.post("/arena/battles/{battle_id}/chat/{side}")
    async def battle_chat(battle_id: str, side: str, request: Request):
        authorize(request)
        battle = battle_of(battle_id)
        if side not in SIDES:
            raise APIError(404, f"side {side!r}: left or right", param="side")
        if battle["voted"]:
            raise APIError(409, "this battle has been voted on: start a new one", code="battle_voted")
        try:
            raw = json.loads(await read_body(request, max_body_bytes) or b"{}")
        except json.JSONDecodeError as err:
            raise APIError(400, f"Invalid request body: {err}") from None
        if not isinstance(raw, dict):
            raise APIError(400, "Invalid request body: an object is expected")
        raw["model"] = battle["models"][side]
        try:
            body = ChatCompletionRequest.model_validate(raw)
        except ValueError as err:
            raise APIError(400, f"Invalid request body: {err}") from None
        prompt = [m.text() for m in body.messages if m.role == "user"]
        battle["prompt"] = prompt[-1] if prompt else ""
        battle["answers"][side] = ""

        def record(text: str) -> None:
            battle["answers"][side] += text

        response = await chat(request, body, shown_name=side, record=record)
        if isinstance(response, dict):  # not streamed: the whole answer is here
            battle["answers"][side] = response["choices"][0]["message"]["content"]
        return response

    @app.post("/arena/battles/{battle_id}/vote")
    async def vote(battle_id: str, request: Request):
        authorize(request)
        battle = battle_of(battle_id)
        try:
            choice = json.loads(await read_body(request, max_body_bytes) or b"{}").get("vote")
        except (json.JSONDecodeError, AttributeError):
            choice = None
        if choice not in VOTES:
            raise APIError(400, f"vote must be one of {', '.join(VOTES)}", param="vote")
        if battle["voted"]:
            raise APIError(409, "this battle has been voted on already", code="battle_voted")
        missing = [side for side in SIDES if side not in battle["answers"]]
        if missing:
            raise APIError(400, f"the {missing[0]} model has not answered yet: vote after both answers", param="vote")
        if results_dir is None:
            raise APIError(503, "this server keeps no votes (no results folder)", type="server_error")
        line = {
            "tstamp": time.time(),
            "type": "vote",
            "conversation_id": battle_id,
            "model_left": battle["models"]["left"],
            "model_right": battle["models"]["right"],
            "vote": choice,
            "prompt": battle["prompt"],
            "answer_left": battle["answers"]["left"],
            "answer_right": battle["answers"]["right"],
        }
        _append_line(Path(results_dir) / VOTES_FILE, line)
        battle["voted"] = True
        log.info("arena vote %s: %s vs %s", choice, line["model_left"], line["model_right"])
        return {"vote": choice, "models": battle["models"]}


def _append_line(path: Path, record: dict) -> None:
    """One JSON line in a single O_APPEND write: whole or absent, whoever else appends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        if written != len(data):  # a full disk: say so rather than leave half a line
            raise OSError(f"wrote {written} of {len(data)} bytes to {path}")
        os.fsync(fd)
    finally:
        os.close(fd)

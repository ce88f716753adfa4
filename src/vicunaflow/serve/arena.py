"""The arena's routes: one prompt to two models drawn at random, answered anonymously, then a vote.

    POST /arena/battles                        draw two different models; returns the battle id only
    POST /arena/battles/{id}/chat/{left|right}  a chat completion from that side's model (streamed or not),
                                               its `model` field replaced by the side: the page never sees a name
    POST /arena/battles/{id}/vote              {"vote": "left" | "right" | "tie" | "bothbad"}: appends one line
                                               to <results_dir>/arena_votes.jsonl, then names the two models

The names stay on the server until the vote (FastChat's arena sends them to the browser hidden in
state; here they are not in the page at all), and the replies carry nothing that tells the models apart
either: no usage (token counts show the tokenizer), logprobs and n > 1 refused, a too-long prompt
refused without the model's context size, and no greedy, nearly greedy (temperature or top_p under 0.5, top_k 1)
or seeded reply, which /v1 would reproduce from each model in turn (app.py's `blind` chat).

Each side is asked once. Its prompt and answer are kept only once its reply has finished (a refused or
failed request keeps nothing, and may be asked again), cut to MAX_TEXT_CHARS; a vote is taken only when
both sides finished, on the same conversation, so the vote line holds exactly what was shown. A battle
is voted once (409 after; its texts are then dropped) and forgotten after BATTLE_TTL_S or when more
than MAX_BATTLES are open: memory stays under MAX_BATTLES x 2 sides x 2 x MAX_TEXT_CHARS characters.

The vote line is written with one O_APPEND write, so concurrent votes, and `vicunaflow eval arena`
reading meanwhile, never see a half line from another writer; the reader leaves out a last line still
without its newline.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
import uuid
from collections import OrderedDict
from pathlib import Path

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

log = logging.getLogger(__name__)

SIDES = ("left", "right")
VOTES = ("left", "right", "tie", "bothbad")  # eval/arena.py reads these
VOTES_FILE = "arena_votes.jsonl"
MAX_BATTLES = 1_000  # battles kept in memory; the oldest are forgotten (their votes are refused)
BATTLE_TTL_S = 3600.0  # and so is a battle this old, voted or not
MAX_TEXT_CHARS = 16_384  # a side's prompt and answer are kept (and written to the vote line) up to this length


def _clock() -> float:
    return time.monotonic()


def install(app: FastAPI, models: list[str], authorize, chat, max_body_bytes: int, results_dir: Path | None) -> None:
    """Add the arena routes; `chat(request, body, shown_name=, done=, blind=)` is app.py's chat path."""
    from vicunaflow.serve.errors import APIError, read_body

    battles: OrderedDict[str, dict] = OrderedDict()  # oldest first
    app.state.arena_battles = battles  # for the tests: what the arena holds in memory
    draw = random.SystemRandom()

    def expire() -> None:
        now = _clock()
        while battles and (len(battles) > MAX_BATTLES or now - next(iter(battles.values()))["created"] > BATTLE_TTL_S):
            battles.popitem(last=False)

    def battle_of(battle_id: str) -> dict:
        expire()
        if battle_id not in battles:
            raise APIError(
                404,
                f"no battle {battle_id!r} (older than {BATTLE_TTL_S / 60:.0f} minutes, or the server restarted?): "
                "start a new one",
                code="battle_not_found",
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
        # sides[side]: None until asked; then {"state": "answering" | "finished" | "stopped", and once
        # finished "prompt", "conversation" (a digest of the messages), "answer"}
        sides = dict.fromkeys(SIDES)
        battles[battle_id] = {
            "models": {"left": left, "right": right},
            "sides": sides,
            "voted": False,
            "created": _clock(),
        }
        expire()
        return {"id": battle_id, "sides": list(SIDES)}

    def check_open(battle: dict, side: str) -> None:
        if battle["voted"]:
            raise APIError(409, "this battle has been voted on: start a new one", code="battle_voted")
        if battle["sides"][side] is not None:
            raise APIError(
                409,
                f"the {side} model has been asked already (one prompt a battle): start a new battle",
                code="side_answered",
            )

    @app.post("/arena/battles/{battle_id}/chat/{side}")
    async def battle_chat(battle_id: str, side: str, request: Request):
        authorize(request)
        battle = battle_of(battle_id)
        if side not in SIDES:
            raise APIError(404, f"side {side!r}: left or right", param="side")
        check_open(battle, side)
        raw = await read_body(request, max_body_bytes)
        body, prompt, conversation = await run_in_threadpool(_chat_request, raw, battle["models"][side])
        check_open(battle, side)  # again: another request may have taken the side meanwhile
        state = {"state": "answering"}
        battle["sides"][side] = state

        def done(answer: str | None) -> None:
            """The reply ended: its whole text, or None when it failed or was stopped."""
            if answer is None:
                state["state"] = "stopped"
                return
            state.update(state="finished", prompt=prompt[:MAX_TEXT_CHARS], answer=answer[:MAX_TEXT_CHARS])
            state["conversation"] = conversation

        try:
            return await chat(request, body, shown_name=side, done=done, blind=True)
        except BaseException:
            if state["state"] == "answering" and battle["sides"][side] is state:
                battle["sides"][side] = None  # refused, or failed before anything was shown: ask again
            raise

    @app.post("/arena/battles/{battle_id}/vote")
    async def vote(battle_id: str, request: Request):
        authorize(request)
        battle = battle_of(battle_id)
        try:
            choice = json.loads(await read_body(request, max_body_bytes) or b"{}").get("vote")
        except (ValueError, AttributeError, RecursionError):  # not JSON, not UTF-8, not an object, nested too deep
            choice = None
        if choice not in VOTES:
            raise APIError(400, f"vote must be one of {', '.join(VOTES)}", param="vote")
        if battle["voted"]:
            raise APIError(409, "this battle has been voted on already", code="battle_voted")
        sides = battle["sides"]
        for side in SIDES:
            if sides[side] is None:
                raise APIError(400, f"the {side} model has not answered yet: vote after both answers", param="vote")
        for side in SIDES:
            if sides[side]["state"] == "answering":
                raise APIError(
                    409, f"the {side} model is still answering: vote once both answers are complete",
                    code="battle_unfinished",
                )  # fmt: skip
            if sides[side]["state"] != "finished":
                raise APIError(
                    409, f"the {side} answer did not finish (stopped or failed): start a new battle",
                    code="battle_unfinished",
                )  # fmt: skip
        if sides["left"]["conversation"] != sides["right"]["conversation"]:
            raise APIError(
                409, "the two models were asked different prompts: start a new battle", code="battle_prompts_differ"
            )
        if results_dir is None:
            raise APIError(503, "this server keeps no votes (no results folder)", type="server_error")
        line = {
            "tstamp": time.time(),
            "type": "vote",
            "conversation_id": battle_id,
            "model_left": battle["models"]["left"],
            "model_right": battle["models"]["right"],
            "vote": choice,
            "prompt": sides["left"]["prompt"],
            "answer_left": sides["left"]["answer"],
            "answer_right": sides["right"]["answer"],
        }
        _append_line(Path(results_dir) / VOTES_FILE, line)
        battle["voted"], battle["sides"] = True, dict.fromkeys(SIDES)  # the texts are in the file now
        log.info("arena vote %s: %s vs %s", choice, line["model_left"], line["model_right"])
        return {"vote": choice, "models": battle["models"]}


def _chat_request(raw: bytes, model: str):
    """(validated body, last user message, digest of the messages) of a side's request body (CPU work on
    up to --max-body-bytes: run it off the event loop)."""
    from pydantic import ValidationError

    from vicunaflow.serve.errors import APIError, invalid_body
    from vicunaflow.serve.protocol import ChatCompletionRequest

    try:
        data = json.loads(raw or b"{}")
    except ValueError as err:  # not JSON, or not UTF-8 (UnicodeDecodeError)
        raise APIError(400, f"Invalid request body: {err}") from None
    except RecursionError:
        raise APIError(400, "Invalid request body: nested too deeply") from None
    if not isinstance(data, dict):
        raise APIError(400, "Invalid request body: an object is expected")
    data["model"] = model
    try:
        body = ChatCompletionRequest.model_validate(data)
    except ValidationError as err:  # described without input values: the input holds the side's model name
        raise invalid_body(err.errors()) from None
    user = [m.text() for m in body.messages if m.role == "user"]
    try:
        messages = json.dumps([m.model_dump(mode="json") for m in body.messages], sort_keys=True)
    except (ValueError, RecursionError):  # an extra field nested past pydantic's or json's depth
        raise APIError(400, "Invalid request body: nested too deeply") from None
    return body, user[-1] if user else "", hashlib.sha256(messages.encode()).hexdigest()


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

"""OpenAI's `logprobs` fields from the engine's per-token log-probabilities (engine.sampling.TokenLogprob).

    completions: {"tokens", "token_logprobs", "top_logprobs": [{text: logprob}], "text_offset"}
    chat:        {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}

A token's text is what it adds to the decoded sequence (IncrementalDecoder: the pieces join to the text),
so `text_offset` points into the returned text. Special tokens (<s>, </s>) are named in `tokens` and add
no text. A byte-fallback character split over several tokens belongs to the token that completes it (the
others add ""); a reply that ends inside one ends in U+FFFD, as its text does, on its last token. An
alternative's text is what it would add after the few tokens before its position.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from vicunaflow.engine.sampling import TokenLogprob
from vicunaflow.engine.text import IncrementalDecoder

CONTEXT_TOKENS = 3  # tokens before a position decoded with an alternative to get its text (spaces, bytes)
FLOOR = -9999.0  # OpenAI's stand-in for a log-probability of -inf (JSON has no infinity)


class _SkipSpecial:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class TokenTexts:
    """The text of each token of one sequence, in order; `add` may be called once per streamed event.

    prompt=True: an echoed prompt (special tokens such as BOS add nothing; the text is the prompt as
    the tokenizer round-trips it). prompt=False: a reply, decoded as the engine decodes it (only EOS,
    which the engine never decodes, adds nothing). offset: where this sequence starts in the returned text.
    """

    def __init__(self, tokenizer, *, prompt: bool, offset: int = 0):
        self.tokenizer = tokenizer
        self.decode = _SkipSpecial(tokenizer).decode if prompt else tokenizer.decode
        self.silent = set(tokenizer.all_special_ids) if prompt else {tokenizer.eos_token_id}
        self.decoder = IncrementalDecoder(_SkipSpecial(tokenizer) if prompt else tokenizer)
        self.offset = offset
        self.ids: list[int] = []
        self.text = ""

    def add(
        self, entries: Sequence[TokenLogprob], last: bool = False
    ) -> list[tuple[str, int, TokenLogprob, list[tuple[str, float]]]]:
        """(token text, text offset, entry, [(alternative's text, logprob)]) per entry. last: these end the
        sequence; what the decoder still holds (a character cut short) goes to the last token that adds text,
        as the engine puts it at the end of the reply's text."""
        rows = []
        for entry in entries:
            context = self.ids[-CONTEXT_TOKENS:]
            if entry.token in self.silent:
                name, piece = self._name(entry.token), ""
            else:
                piece = self.decoder.push(entry.token)
                name = piece
            top = [(self._alternative(context, token), _finite(logprob)) for token, logprob in entry.top]
            rows.append((name, self.offset, entry, top))
            self.offset += len(piece)
            self.text += piece
            self.ids.append(entry.token)
        tail = self.decoder.flush() if last else ""
        speaking = [i for i, row in enumerate(rows) if row[2].token not in self.silent]
        if tail and speaking:
            name, offset, entry, top = rows[speaking[-1]]
            rows[speaking[-1]] = (name + tail, offset, entry, top)
            for i in range(speaking[-1] + 1, len(rows)):  # silent tokens after it (EOS) start after the tail
                rows[i] = (rows[i][0], rows[i][1] + len(tail), *rows[i][2:])
            self.offset += len(tail)
            self.text += tail
        return rows

    def finish(self) -> str:
        """The whole text, with any character still held back (a prompt ending inside a byte sequence)."""
        self.text += self.decoder.flush()
        return self.text

    def _name(self, token: int) -> str:
        return self.tokenizer.convert_ids_to_tokens(token)

    def _alternative(self, context: list[int], token: int) -> str:
        if token in self.silent:
            return self._name(token)
        before = self.decode(context)
        return self.decode([*context, token])[len(before) :]


def prompt_entries(ids: Sequence[int]) -> list[TokenLogprob]:
    """A prompt's tokens without log-probabilities (echo without logprobs: only their text is needed)."""
    return [TokenLogprob(token, None, []) for token in ids]


def completion_logprobs(rows: list, k: int) -> dict:
    """The completions route's `logprobs` object. top_logprobs holds the k most likely tokens plus the
    chosen one (OpenAI: up to logprobs + 1 entries); null at the first prompt token, as OpenAI."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for name, offset, entry, top in rows:
        tokens.append(name)
        offsets.append(offset)
        if entry.logprob is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_finite(entry.logprob))
        alternatives: dict[str, float] = {}
        for text, logprob in top[:k]:
            alternatives.setdefault(text, logprob)  # two tokens of one text: the likelier one
        if entry.token not in [token for token, _ in entry.top[:k]]:  # else it is there already, by its own text
            alternatives.setdefault(name, _finite(entry.logprob))
        top_logprobs.append(alternatives)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(rows: list, k: int) -> dict:
    """The chat route's `logprobs` object: one item per sampled token, with exactly its k alternatives."""
    content = [
        {
            **_chat_token(name, entry.logprob),
            "top_logprobs": [_chat_token(text, logprob) for text, logprob in top[:k]],
        }
        for name, _, entry, top in rows
    ]
    return {"content": content, "refusal": None}


def _chat_token(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode())}


def _finite(value: float) -> float:
    return value if math.isfinite(value) else FLOOR

"""Text around the token ids: prompts in Vicuna's format, streamed detokenisation and stop strings."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

from vicunaflow import VicunaflowError, template


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a rendered prompt, starting with BOS, as FastChat feeds Vicuna.

    Earlier replies end in the literal `</s>`, which the tokenizer maps to the EOS special token.
    """
    # verbose=False: no warning that a prompt past tokenizer_config's model_max_length "will result in indexing
    # errors": the engine's context decides (the server refuses such a prompt, chat leaves out old turns)
    ids = tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids
    bos = tokenizer.bos_token_id
    return [bos, *ids] if bos is not None and (not ids or ids[0] != bos) else ids


def fit_conversation(
    tokenizer, turns: list[tuple[str, str | None]], budget: int, system: str = template.SYSTEM_PROMPT
) -> tuple[list[tuple[str, str | None]], list[int]]:
    """Drop the oldest (user, assistant) exchanges until the prompt fits `budget` tokens.

    `turns` ends with (ASSISTANT, None). Returns the kept turns and their token ids; raises if even
    the last user message alone does not fit.
    """
    while True:
        ids = encode_prompt(tokenizer, template.render(turns, system))
        if len(ids) <= budget:
            return turns, ids
        if len(turns) <= 2:
            raise VicunaflowError(f"the message is {len(ids)} tokens with the system prompt; at most {budget} fit")
        turns = turns[2:]


class IncrementalDecoder:
    """Turn token ids into text deltas whose concatenation equals decoding all ids at once.

    SentencePiece needs context: a byte-fallback character spans several tokens (half of it
    decodes to U+FFFD) and a leading "▁" becomes a space only after another piece. So each step
    decodes a short window twice, with and without the tokens not yet settled, and emits the new
    text except a trailing run of U+FFFD, which may still become a character.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decode, self.single = _decoders(tokenizer)
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: a token decoded before, so it gives stable context
        self.read_offset = 0  # text up to this token is settled and emitted
        self.emitted = 0  # characters emitted beyond read_offset (before an unfinished character)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        new = self._unsettled()
        if new.endswith("\ufffd"):  # not settled: hold back the unfinished character
            ready = new.rstrip("\ufffd")
            delta = ready[self.emitted :]
            self.emitted = max(self.emitted, len(ready))
            return delta
        delta = new[self.emitted :]
        self.prefix_offset, self.read_offset, self.emitted = self.read_offset, len(self.ids), 0
        return delta

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character at the end)."""
        new = self._unsettled()
        delta = new[self.emitted :]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.emitted = 0
        return delta

    def _unsettled(self) -> str:
        # Sliced by length, not by prefix: tokenizers' ByteFallback may rewrite an emitted ASCII byte
        # token as U+FFFD when an invalid byte follows it (only models emitting raw ASCII bytes do).
        ids, start, read = self.ids, self.prefix_offset, self.read_offset
        if read - start == 1:  # the usual window: one settled token, whose text is the same every time
            before = self.single.get(ids[start])
            if before is None:
                before = self.single[ids[start]] = self.decode(ids[start:read])
        else:
            before = self.decode(ids[start:read]) if read > start else ""
        return self.decode(ids[start:])[len(before) :]


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _decoders(tokenizer) -> tuple[Callable[[list[int]], str], dict[int, str]]:
    """`decoder_of(tokenizer)` and a cache of one-token decodes. For a Hugging Face fast tokenizer both are
    shared by all of its decoders (they hold no reference to it, so the entry goes with the tokenizer);
    any other tokenizer's decoder gets its own."""
    shared = _is_backend_decodable(tokenizer)
    found = _DECODERS.get(tokenizer) if shared else None
    if found is None:
        found = (decoder_of(tokenizer), {})
        if shared:
            _DECODERS[tokenizer] = found
    return found


def _is_backend_decodable(tokenizer) -> bool:
    """A Hugging Face fast tokenizer whose decode is transformers' own, without the clean-up of spaces."""
    try:
        from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast
    except ImportError:
        return False
    cls = type(tokenizer)
    return (
        isinstance(tokenizer, PreTrainedTokenizerFast)
        and cls.decode is PreTrainedTokenizerBase.decode
        and cls._decode is PreTrainedTokenizerFast._decode
        and not tokenizer.clean_up_tokenization_spaces
    )


def decoder_of(tokenizer) -> Callable[[list[int]], str]:
    """`tokenizer.decode`, or where that is a Hugging Face fast tokenizer's own, its Rust backend's decode called
    directly with the same arguments: transformers' wrapper (argument conversion, checks, dispatch) cost
    ~5 µs a call against the backend's ~2, and the engine decodes twice per token of every row. Subclasses
    that override decoding, and tokenizers that clean up spaces, keep the wrapper."""
    if _is_backend_decodable(tokenizer):
        backend = tokenizer.backend_tokenizer.decode
        return lambda ids: backend(ids, skip_special_tokens=False)
    return tokenizer.decode


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    if not stops:
        return None
    positions = [text.find(s) for s in stops if s and s in text]
    return min(positions) if positions else None


def stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that could start a stop string (held back until decided)."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                longest = max(longest, k)
                break
    return longest

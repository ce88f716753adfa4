"""`vicunaflow data split`: conversations longer than the model's context cut at turn boundaries, exactly.

FastChat's split_long_conversation.py guesses each turn's length as `len(tokenizer(value)) + 6` and
packs on the guess: a piece may still be too long (and is then truncated, its last reply cut, by
training), a pair longer than the limit yields an empty piece, and the last pair is lost when it
does not fit beside the one before. Here lengths are exact: a piece's length is what `data tokenize`
will count for it, the Vicuna v1.1 prompt with bos and every `</s>`.

Exact without tokenising every candidate piece: in the prompt `system USER: u1 ASSISTANT: a1</s>USER:
u2 ...`, `</s>` is a special token, so the tokenizer never merges across it and each exchange
`USER: u ASSISTANT: a</s>` after a `</s>` has the same tokens whatever comes before. So each
exchange is tokenised once (as it appears after a `</s>`), and the first exchange of each piece once
more with the system prompt and bos before it; a piece's length is the sum. A tokenizer for which
`</s>` is not a special token is handled by tokenising every piece whole (slower, as exact).

Pieces start with a user turn and end with a reply; no reply is cut. An exchange longer than the
limit on its own cannot be trained on whole: it is dropped and counted, and the conversation goes on
with the next exchange. Pieces of one conversation are `<id>_<k>`, with `parent`, `part` and `parts`.
Batches of conversations are split in worker processes (each with its own tokenizer, like `data clean`'s
workers), and written in input order: the output does not depend on the number of workers. The
tokenizer is loaded once, through transformers, in the parent; workers rebuild its Rust backend from
the parent's serialised copy (no transformers, no torch there: ~2 s of CPU and ~300 MB less per
worker; the parent holds them once).
A held-out fraction (by a hash of the conversation's id and a seed: the same ids are held out in every
run, and all pieces of a conversation fall on the same side) goes to a second file. An input that is FastChat's own
split output (ShareGPT_V3_unfiltered_cleaned_split.json: a chat as records `<id>_<first turn>`) is drawn by chat,
so a chat's pieces are not trained on and held out at once (`fastchat_piece_sets` says when that is certain).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vicunaflow import VicunaflowError, require_dir, template
from vicunaflow.dataprep.clean import GPT, HUMAN, Drop, exchanges, normalized_turns
from vicunaflow.dataprep.records import (
    Broken,
    Counts,
    atomic_writer,
    batched,
    check_jobs,
    conversation_id,
    dumps,
    ordered_map,
    read_records,
    record_name,
    refuse_repeated_ids,
    unit_hash,
)
from vicunaflow.outputs import check_output_files

log = logging.getLogger(__name__)

BATCH = 256  # conversations sent to a worker (and tokenised) together


def split(
    *,
    data: Path,
    model_path: Path,
    output: Path,
    model_max_length: int = 2048,
    held_out: Path | None = None,
    held_out_fraction: float = 0.0,
    seed: str = "vicunaflow",
    report: Path | None = None,
    jobs: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Cut conversations longer than model_max_length tokens into pieces that fit, at turn boundaries.

    Lengths are those of the Vicuna v1.1 prompt as `data tokenize` counts them; a deterministic
    held-out fraction can be set aside.

    Arguments:
        data: conversations, each id once, JSONL (as `data clean` writes) or a JSON array; read as a stream.
        model_path: Hugging Face model directory whose tokenizer counts the tokens.
        output: the JSONL of pieces for training, written to a temporary and renamed into place.
        model_max_length: tokens a piece may have, bos and every `</s>` included.
        held_out: JSONL of the held-out conversations (all their pieces); default, when
            held_out_fraction > 0: the output's name with `.heldout.jsonl`. Given with a fraction of 0,
            an empty file is written (a workflow output always exists).
        held_out_fraction: share of conversations (by id; FastChat's pieces `<id>_<first turn>` by chat) held out
            of training, from 0 to below 1.
        seed: mixed into the held-out hash; another seed holds out other conversations.
        report: TSV of conversations read, split, dropped and held out, with examples; default: the
            output's name with `.counts.tsv`.
        jobs: worker processes, each with its own tokenizer; default: the CPUs this process may use
            (at most 8). 1 tokenises in this process, on the tokenizer's own threads.
        overwrite: replace output files that exist but are not this verb's unchanged earlier outputs (default: refuse).
    """
    data, output = Path(data), Path(output)
    stem = output.name.removesuffix(".jsonl")
    if not 0 <= held_out_fraction < 1:
        raise VicunaflowError(f"--held_out_fraction {held_out_fraction}: give a fraction from 0 (none) to below 1")
    if model_max_length < 1:
        raise VicunaflowError(f"--model_max_length {model_max_length}: give a positive number of tokens")
    require_dir(model_path, "model directory")  # before the tokenizer's libraries load
    if held_out is None and held_out_fraction > 0:
        held_out = output.with_name(stem + ".heldout.jsonl")
    report = Path(report) if report else output.with_name(stem + ".counts.tsv")
    log.info(
        "data split: data=%s model_path=%s output=%s model_max_length=%d held_out=%s held_out_fraction=%s seed=%r",
        data, model_path, output, model_max_length, held_out, held_out_fraction, seed,
    )  # fmt: skip
    check_output_files(
        {"--output": output, "--held_out": held_out, "--report": report}, inputs=[data, model_path], overwrite=overwrite
    )
    jobs = check_jobs(jobs)
    piece_sets = fastchat_piece_sets(data) if held_out_fraction > 0 else frozenset()
    options = SplitOptions(
        str(model_path), model_max_length, held_out_fraction, seed, parallel_tokenizer=jobs <= 1, piece_sets=piece_sets
    )
    if jobs <= 1:
        _counter(options)  # a bad model path fails here, before any output is opened
    counts = Counts("split")
    with tempfile.TemporaryDirectory(prefix="vicunaflow-split-") as scratch:
        if jobs > 1:  # one transformers load, here (a bad model path fails before any output is opened)
            options = _for_workers(options, Path(scratch))
        tokens = _split_all(data, output, held_out, options, jobs, counts)
    counts.write_tsv(report)
    log.info("data split: %s; %d tokens in the training pieces; wrote %s", counts.summary(), tokens, output)
    return output


def _split_all(
    data: Path, output: Path, held_out: Path | None, options: SplitOptions, jobs: int, counts: Counts
) -> int:
    tokens, kept = 0, False
    work = functools.partial(split_batch, options=options)
    with atomic_writer(output) as train, atomic_writer(held_out) if held_out else _nowhere() as aside:
        for result in ordered_map(work, batched(refuse_repeated_ids(data, read_records(data)), BATCH), jobs):
            for event in result.events:
                counts.add(*event)
            train.write(result.train)
            kept |= bool(result.train)
            if aside is not None:
                aside.write(result.held_out)
            tokens += result.tokens
        if not kept:  # inside the writers: nothing is left behind as if it were a dataset
            raise VicunaflowError(nothing_to_train_on(data, counts))
    return tokens


def nothing_to_train_on(data: Path, counts: Counts) -> str:
    """The error for a split that left no training piece, with the fix for what took every conversation."""
    if not counts.get("read", "conversations"):
        return f"{data}: no conversation in it; give a JSON array or JSONL of ShareGPT conversations"
    fixes = []
    if counts.get("drop", "too_long"):
        fixes.append("raise --model-max-length")
    if counts.get("kept", "held_out_conversations"):
        fixes.append("lower --held-out-fraction")
    if any(kind == "drop" and reason != "too_long" for kind, reason, _, _ in counts.rows()):
        fixes.append("give conversations with an id and a user turn with a reply (`vicunaflow data clean` makes them)")
    return f"{data}: no conversation is left to train on ({counts.summary()}); {' or '.join(fixes)}"


# ---- one batch, in a worker process --------------------------------------------------------------------


@dataclass(frozen=True)
class SplitOptions:
    model_path: str
    limit: int
    held_out_fraction: float
    seed: str
    parallel_tokenizer: bool = True  # off in worker processes: the processes are the parallelism
    backend: str = ""  # a file of the tokenizer's backend as the parent loaded it (workers); empty: load model_path
    separable: bool = True  # with backend: whether `</s>` is a special token of that tokenizer
    piece_sets: frozenset[str] = frozenset()  # sets of FastChat's pieces `<id>_<first turn>`: held out by `<id>`


@dataclass(frozen=True)
class BatchResult:
    events: list  # Counts.add arguments, in input order
    train: bytes  # JSONL lines
    held_out: bytes
    tokens: int


class _Events(list):
    def add(self, kind: str, reason: str, name: str | None = None, detail: str = "") -> None:
        self.append((kind, reason, name, detail))


@functools.cache
def _counter(options: SplitOptions) -> PieceCounter:
    if not options.parallel_tokenizer:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if options.backend:
        with open(options.backend, encoding="utf-8") as f:
            return PieceCounter.from_backend(f.read(), options.separable)
    from vicunaflow.data import load_tokenizer

    return PieceCounter(load_tokenizer(Path(options.model_path)))


def _for_workers(options: SplitOptions, scratch: Path) -> SplitOptions:
    """The tokenizer loaded here, as `data tokenize` loads it, its backend written for the workers."""
    from vicunaflow.data import load_tokenizer

    counter = PieceCounter(load_tokenizer(Path(options.model_path)))
    backend = scratch / "tokenizer.json"
    backend.write_text(counter.backend.to_str(), encoding="utf-8")
    return dataclasses.replace(options, backend=str(backend), separable=counter.separable)


def split_batch(batch: list[tuple[str, object]], options: SplitOptions) -> BatchResult:
    """Runs in a worker process: pieces of each conversation of the batch, as JSONL lines."""
    events, conversations = _Events(), []
    for where, record in batch:
        events.add("read", "conversations")
        parsed = _conversation(where, record, events)
        if parsed is not None:
            conversations.append(parsed)
    planned = _counter(options).split_all([(s, t) for _, _, s, t in conversations], options.limit)
    train, held_out, tokens = [], [], 0
    for (name, record, system, turns), pieces in zip(conversations, planned, strict=True):
        dropped_pairs = len(turns) // 2 - sum((end - start) // 2 for start, end, _ in pieces)
        for _ in range(dropped_pairs):
            events.add("edit", "exchange_longer_than_limit_dropped", name)
        if not pieces:
            events.add("drop", "too_long", name, f"every exchange is longer than {options.limit} tokens")
            continue
        if len(pieces) > 1:
            events.add("edit", "split", name)
        key = held_out_key(record, options.piece_sets)
        held = options.held_out_fraction > 0 and unit_hash(options.seed, key) < options.held_out_fraction
        events.add("kept", "held_out_conversations" if held else "conversations")
        for line, n in _piece_lines(record, system, turns, pieces, whole=dropped_pairs == 0):
            (held_out if held else train).append(line)
            events.add("kept", "held_out_pieces" if held else "pieces")
            tokens += 0 if held else n
    return BatchResult(list(events), b"".join(train), b"".join(held_out), tokens)


# ---- which records are held out together ----------------------------------------------------------------

# FastChat's split_long_conversation.py writes the pieces of one chat as `<id>_<first turn>`, an even turn:
# `QWJhYvA_0`, `QWJhYvA_8` (ShareGPT_V3_unfiltered_cleaned_split.json, the docs' example, is such a file).
_FASTCHAT_PIECE = re.compile(r"(.*[^/])_(0|[1-9][0-9]*)")


def _conversation_key(record: dict) -> str:
    """What names a conversation for the held-out draw: `origin` (data mix's `<set>/<id>`, shared by copies), or id."""
    return str(record.get("origin", record["id"]))


def _set_of(key: str) -> str:
    """The set a key belongs to: data mix's `<set>/` before it ("" for a file's own ids)."""
    return key.rpartition("/")[0]


def _chat_of_piece(key: str) -> str | None:
    """`<id>` of a key that could be FastChat's piece `<id>_<even turn>`, else None."""
    match = _FASTCHAT_PIECE.fullmatch(key)
    return match[1] if match and int(match[2]) % 2 == 0 else None


def fastchat_piece_sets(path: Path) -> frozenset[str]:
    """The sets of `path` (the file, or each set of a mix) that are certainly FastChat's split output, whose pieces
    of one chat must be held out together: every id of the set is `<id>_<even number>` and some `<id>` has more than
    one piece. One look at every id before splitting (the choice holds for the whole set, so it is made first).

    A set with any other id ("conv_1", "a", an id data clean gave from a position) is left as it is: a user's own
    numbering `conv_0`, `conv_1`, ... is not collapsed into one conversation.
    """
    chats: dict[str, set[str]] = {}  # set -> <id>s seen
    split_chats, other_ids = set(), set()  # sets with a chat in pieces; sets with an id that is no piece
    for _, record in read_records(path):
        if conversation_id(record) is None:
            continue  # dropped by the split itself
        key = _conversation_key(record)
        set_name, chat = _set_of(key), _chat_of_piece(key)
        if chat is None:
            other_ids.add(set_name)
            chats.pop(set_name, None)
        elif set_name not in other_ids:
            seen = chats.setdefault(set_name, set())
            if chat in seen:
                split_chats.add(set_name)
            seen.add(chat)
    pieces = frozenset(split_chats - other_ids)
    for set_name in sorted(pieces):
        log.info(
            "data split: %s%s: ids are FastChat's pieces `<id>_<first turn>`: the pieces of one chat (%d chats) are "
            "held out together", path, f" set {set_name!r}" if set_name else "", len(chats[set_name])
        )  # fmt: skip
    return pieces


def held_out_key(record: dict, piece_sets: frozenset[str]) -> str:
    """The name the held-out side is drawn by: the conversation's, or its chat's for FastChat's pieces."""
    key = _conversation_key(record)
    if _set_of(key) in piece_sets:
        return _chat_of_piece(key) or key  # every key of such a set is a piece
    return key


class _nowhere:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _conversation(where: str, record: object, counts):
    """(name, record, system, turns) of a record `data tokenize` accepts; others dropped and counted."""
    name = record_name(where, record)
    edits: list[str] = []
    try:
        if isinstance(record, Broken):
            raise Drop(record.reason, record.detail)
        system, turns = normalized_turns(record)
        turns = exchanges(turns, edits)
        if conversation_id(record) is None:
            raise Drop("no_id", "records need an id, not null or empty (data clean gives one)")
    except Drop as drop:
        counts.add("drop", drop.reason, name, drop.detail)
        return None
    for edit in edits:
        counts.add("edit", edit, name)
    return name, record, system, turns


def _piece_lines(record: dict, system: str | None, turns: list, pieces: list, whole: bool):
    parent = str(record["id"])
    extra = {k: record[k] for k in ("origin",) if k in record}
    for part, (start, end, n) in enumerate(pieces):
        if whole and len(pieces) == 1:
            piece = {"id": parent}
        else:
            piece = {"id": f"{parent}_{part}", "parent": parent, "part": part, "parts": len(pieces)}
        piece |= extra
        if system is not None:
            piece["system"] = system
        piece["tokens"] = n
        piece["conversations"] = [{"from": role, "value": text} for role, text in turns[start:end]]
        yield dumps(piece), n


# ---- exact lengths -----------------------------------------------------------------------------------


class PieceCounter:
    """Token counts of Vicuna v1.1 prompts, exactly as `data tokenize` counts them (bos, `</s>` included)."""

    def __init__(self, tokenizer=None, *, backend: str = "", separable: bool = True):
        from tokenizers import Tokenizer

        # A copy of the fast tokenizer's backend without truncation or padding, used directly: no
        # per-call Python overhead of transformers, and batches spread over the tokenizer's threads.
        if tokenizer is not None:
            backend, separable = (
                tokenizer.backend_tokenizer.to_str(),
                template.EOS in (tokenizer.all_special_tokens or []),
            )
        self.backend = Tokenizer.from_str(backend)
        self.backend.no_truncation()
        self.backend.no_padding()
        self.separable = separable
        if not self.separable and tokenizer is not None:
            log.warning("%s is not a special token of this tokenizer: every piece is tokenised whole", template.EOS)
        self.words = WordLengths.for_backend(self.backend) if separable else None

    @classmethod
    def from_backend(cls, backend: str, separable: bool) -> PieceCounter:
        """From `Tokenizer.to_str()` of a backend (a worker: the parent loaded the tokenizer)."""
        return cls(backend=backend, separable=separable)

    def lengths(self, texts: list[str], special: bool) -> list[int]:
        if not texts:
            return []
        if self.words is not None:
            return self.words.lengths(texts, special)
        return self.exact_lengths(texts, special)

    def exact_lengths(self, texts: list[str], special: bool) -> list[int]:
        """Each text tokenised whole by the tokenizer itself."""
        return [len(e.ids) for e in self.backend.encode_batch_fast(texts, add_special_tokens=special)]

    def split_all(self, conversations: list[tuple[str | None, list]], limit: int) -> list[list[tuple[int, int, int]]]:
        """Per conversation, its pieces as (first turn, end turn, tokens), each at most `limit` tokens."""
        if not self.separable:
            return [self._split_whole(system, turns, limit) for system, turns in conversations]
        texts = []
        for _, turns in conversations:
            # The first exchange always starts a piece: only its length with the system prompt is needed.
            texts += [f"{template.EOS}{_exchange(turns, i)}" for i in range(2, len(turns), 2)]
        after_eos = iter(n - 1 for n in self.lengths(texts, special=False))  # minus the leading </s>
        plans = [[0] + [next(after_eos) for _ in range(2, len(turns), 2)] for _, turns in conversations]
        heads = self._heads_batch([(system, turns, 0) for system, turns in conversations])
        result = []
        for (system, turns), body, head in zip(conversations, plans, heads, strict=True):
            result.append(self._pack(system, turns, body, head, limit))
        return result

    def _heads_batch(self, wanted: list[tuple[str | None, list, int]]) -> list[dict[int, int]]:
        """Per (system, turns, pair): {pair: tokens of bos + system prompt + that exchange}: the record's own system
        prompt, or the default one without it, as data tokenize writes the prompt."""
        texts = [
            f"{template.system_or_default(system)}{template.SEP}{_exchange(turns, 2 * pair)}"
            for system, turns, pair in wanted
        ]
        lengths = self.lengths(texts, special=True)
        return [{pair: n} for (_, _, pair), n in zip(wanted, lengths, strict=True)]

    def _pack(self, system, turns, body: list[int], head: dict[int, int], limit: int) -> list[tuple[int, int, int]]:
        pieces, pair, pairs = [], 0, len(body)
        while pair < pairs:
            if pair not in head:  # a piece starting later than the first exchange: once per cut
                head |= self._heads_batch([(system, turns, pair)])[0]
            total = head[pair]
            if total > limit:  # this exchange alone does not fit: dropped (counted by the caller)
                pair += 1
                continue
            end = pair + 1
            while end < pairs and total + body[end] <= limit:
                total += body[end]
                end += 1
            pieces.append((2 * pair, 2 * end, total))
            pair = end
        return pieces

    def _split_whole(self, system, turns: list, limit: int) -> list[tuple[int, int, int]]:
        """Without a separable `</s>`: grow each piece exchange by exchange, tokenising it whole."""
        pieces, pair, pairs = [], 0, len(turns) // 2
        while pair < pairs:
            best, end = None, pair + 1
            while end <= pairs:
                n = self.whole_length(system, turns[2 * pair : 2 * end])
                if n > limit:
                    break
                best, end = (2 * pair, 2 * end, n), end + 1
            if best is None:
                pair += 1
                continue
            pieces.append(best)
            pair = best[1] // 2
        return pieces

    def whole_length(self, system: str | None, turns: list) -> int:
        """What `data tokenize` counts for these turns, after the record's own system prompt or the default one."""
        roles = [(template.USER if role == HUMAN else template.ASSISTANT, text) for role, text in turns]
        return self.lengths([template.render(roles, template.system_or_default(system))], special=True)[0]


def _exchange(turns: list, i: int) -> str:
    """`USER: u ASSISTANT: a</s>`: exchange i (turns i, i+1) as the template writes it after a `</s>`."""
    (user_role, user), (reply_role, reply) = turns[i], turns[i + 1]
    assert user_role == HUMAN and reply_role == GPT, (user_role, reply_role)
    return f"{template.USER}: {user}{template.SEP}{template.ASSISTANT}: {reply}{template.EOS}"


# Where a LLaMA (SentencePiece BPE) prompt can be cut without changing its tokens: before each `▁` (a
# space) that follows another character, so a run of spaces stays with the word after it.
_WORD = re.compile("\u2581*[^\u2581]+|\u2581+")
_SPACE = "\u2581"


class WordLengths:
    """Token counts of texts as the sum of their words' counts, each word tokenised once per process.

    Exact, not an estimate, for the tokenizers LLaMA and Vicuna ship (`tokenizer.json` with
    SentencePiece's normaliser: `▁` prepended, spaces made `▁`; no pre-tokenizer; BPE): no token of
    such a vocabulary holds a `▁` after another character, so no merge ever joins the end of one
    word to the `▁` that starts the next, and BPE gives each word the tokens it would give it inside
    the whole text. Tokenising 17 MB of exchanges went from ~3.8 s to under a second on one core: most
    words recur (a Zipf vocabulary), and the tokenizer's cost is per token, not per merge.
    `for_backend` checks every condition this rests on and returns None when one fails (another
    normaliser, a pre-tokenizer, BPE dropout, unknown characters that could be fused across words...):
    then every text is tokenised whole. A text holding an added token (`<s>`, `</s>`... written in a
    turn) is tokenised whole too.
    """

    CACHE_WORDS = 1 << 18  # words remembered per process (~30 MB); forgotten all at once past that

    def __init__(self, backend, plain, added: list[str], special_extra: int):
        self.backend, self.plain, self.added, self.special_extra = backend, plain, added, special_extra
        self.cache: dict[str, int] = {}

    @classmethod
    def for_backend(cls, backend) -> WordLengths | None:
        import json

        from tokenizers import Tokenizer

        config = json.loads(backend.to_str())
        model = config.get("model") or {}
        added = [token["content"] for token in config.get("added_tokens") or []]
        normalizer = config.get("normalizer") or {}
        sentencepiece_normalizer = [
            {"type": "Prepend", "prepend": _SPACE},
            {"type": "Replace", "pattern": {"String": " "}, "content": _SPACE},
        ]
        vocabulary = model.get("vocab") or {}
        complete_bytes = all(f"<0x{b:02X}>" in vocabulary for b in range(256))
        conditions = {
            "SentencePiece's normaliser": normalizer.get("type") == "Sequence"
            and normalizer.get("normalizers") == sentencepiece_normalizer,
            "no pre-tokenizer": config.get("pre_tokenizer") is None,
            "plain BPE": model.get("type") == "BPE"
            and not model.get("dropout")
            and not model.get("continuing_subword_prefix")
            and not model.get("end_of_word_suffix")
            and not model.get("ignore_merges"),
            "no unknown tokens fused across words": not model.get("fuse_unk")
            or (model.get("byte_fallback") and complete_bytes),
            "no token with a space inside": not any(_SPACE in token.lstrip(_SPACE) for token in vocabulary),
            "added tokens matched as written": all(
                not token.get("lstrip") and not token.get("rstrip") and not token.get("single_word")
                for token in config.get("added_tokens") or []
            )
            and not any(" " in token or _SPACE in token for token in added),
        }
        failed = [name for name, holds in conditions.items() if not holds]
        if failed:
            log.info("data split: texts tokenised whole (word by word needs: %s)", ", ".join(failed))
            return None
        plain = Tokenizer.from_str(backend.to_str())
        plain.normalizer = None
        plain.post_processor = None
        with_special, without = (len(backend.encode("a", add_special_tokens=flag).ids) for flag in (True, False))
        return cls(backend, plain, added, with_special - without)

    def lengths(self, texts: list[str], special: bool) -> list[int]:
        """What `len(backend.encode(text, add_special_tokens=special).ids)` gives, for each text."""
        counts: list[int | None] = []
        words_of: list[list[str]] = []
        whole, unknown = [], []  # indexes of texts tokenised whole; of texts with a word not seen yet
        count = self.cache.__getitem__
        for i, text in enumerate(texts):
            # Exactly the prompts split builds: `</s>` may open and close a text; nothing else special.
            leading, trailing = text.startswith(template.EOS), text.endswith(template.EOS)
            body = text[len(template.EOS) if leading else 0 : len(text) - (len(template.EOS) if trailing else 0)]
            if not body or any(token in body for token in self.added):
                whole.append(i)
                words_of.append([])
                counts.append(None)
                continue
            words = _WORD.findall(_SPACE + body.replace(" ", _SPACE))
            words_of.append(words)
            n = leading + trailing + (self.special_extra if special else 0)
            try:
                counts.append(n + sum(map(count, words)))
            except KeyError:
                unknown.append(i)
                counts.append(n)
        if unknown:
            self._learn([words_of[i] for i in unknown])
            count = self.cache.__getitem__
            for i in unknown:
                counts[i] += sum(map(count, words_of[i]))
        if whole:
            exact = self.backend.encode_batch_fast([texts[i] for i in whole], add_special_tokens=special)
            for i, encoding in zip(whole, exact, strict=True):
                counts[i] = len(encoding.ids)
        return counts

    def _learn(self, words_of: list[list[str]]) -> None:
        unique = set(itertools.chain.from_iterable(words_of))
        missing = unique.difference(self.cache)
        if len(self.cache) + len(missing) > self.CACHE_WORDS:
            self.cache.clear()
            missing = unique
        if missing:
            missing = sorted(missing)
            encoded = self.plain.encode_batch_fast(missing, add_special_tokens=False)
            self.cache.update(zip(missing, (len(e.ids) for e in encoded), strict=True))

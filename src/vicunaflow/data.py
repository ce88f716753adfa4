"""Conversation data for fine-tuning: validated records, Vicuna v1.1 prompts and exact loss masks.

FastChat's train.py finds where the assistant replies start by re-tokenising pieces and counting
tokens with hard-coded offsets; when its count is off it silently masks the whole sample (loss 0).
Here the prompt is tokenised once, whole, exactly as FastChat tokenises it (so input_ids are
token for token FastChat's), and the tokenizer's character offsets say which tokens came from
which piece of `template.segments()`: a token is trained on exactly when its characters lie in an
assistant reply (including the reply's `</s>`). No counting, so nothing can drift.

Input: the ShareGPT/FastChat JSON list `[{"id": ..., "conversations": [{"from": "human"|"gpt",
"value": ...}, ...]}]`, or the same records one per line (JSONL). Every record is checked before
anything is tokenised, ids unique among them; all problems are reported at once, each naming the record's id and
index. A record's own `"system"` prompt (data clean keeps a conversation's first system turn there) replaces Vicuna's
default one in its prompt, as a system message does when the model is served; it is never trained on.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vicunaflow import VicunaflowError, require_dir, require_file, template
from vicunaflow.tokenizer import TOKENIZER_FILES, has_tokenizer, open_tokenizer

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of tokens that are not trained on (PyTorch cross_entropy's ignore_index)
TOKENS_FILE = "tokens.safetensors"
META_FILE = "meta.json"
MAX_REPORTED_ERRORS = 20


def tokenize(
    *,
    data: Path,
    model_path: Path,
    output_dir: Path,
    model_max_length: int = 2048,
    overwrite: bool = False,
) -> Path:
    """Validate and tokenise a conversation file into a dataset directory for `vicunaflow finetune`.

    The directory holds `tokens.safetensors` (flat input_ids and labels plus per-sample offsets),
    `meta.json` (sample ids, lengths, sha256 of the data and tokenizer) and `vicunaflow.json`.

    Arguments:
        data: conversations, a JSON list or JSONL of ShareGPT records (`id`, `conversations`, optionally
            `system`: the record's own system prompt, used instead of Vicuna's default one).
        model_path: Hugging Face model directory whose tokenizer is used.
        output_dir: the tokenised dataset directory to write.
        model_max_length: samples longer than this many tokens are truncated (their masks stay exact).
        overwrite: replace an output_dir that exists but is not a complete vicunaflow output (default: refuse).
    """
    import torch
    from safetensors.torch import save_file

    from vicunaflow.outputs import atomic_output_dir, check_output_dir, sha256_file, write_manifest

    log.info(
        "tokenize: data=%s model_path=%s output_dir=%s model_max_length=%d",
        data,
        model_path,
        output_dir,
        model_max_length,
    )
    check_output_dir(output_dir, inputs=[data, model_path], overwrite=overwrite)  # before any work
    check_max_length(model_max_length)
    conversations = load_conversations(data)
    tokenizer = load_tokenizer(model_path)
    samples = encode_all(conversations, tokenizer, model_max_length)  # never empty: it raises instead
    lengths = [len(s.input_ids) for s in samples]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    tensors = {
        "input_ids": torch.tensor([t for s in samples for t in s.input_ids], dtype=torch.int32),  # (total_tokens,)
        "labels": torch.tensor([t for s in samples for t in s.labels], dtype=torch.int32),  # (total_tokens,)
        "offsets": torch.tensor(offsets, dtype=torch.int64),  # (n_samples + 1,)
    }
    tokenizer_files = tokenizer_file_paths(model_path)
    meta = {
        "format": "vicunaflow-tokenized-v1",
        "template": "vicuna_v1.1",
        "model_max_length": model_max_length,
        "n_samples": len(samples),
        "n_tokens": offsets[-1],
        "n_trained_tokens": sum(sum(label != IGNORE_INDEX for label in s.labels) for s in samples),
        "ids": [s.id for s in samples],
        "data_sha256": sha256_file(data),
        "tokenizer_sha256": {p.name: sha256_file(p) for p in tokenizer_files},
    }
    with atomic_output_dir(output_dir, inputs=[data, model_path], overwrite=overwrite) as out:
        save_file(tensors, str(out / TOKENS_FILE))
        (out / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        write_manifest(out, inputs=[data, *tokenizer_files], kind="tokenized-conversations")
    log.info(
        "wrote %d samples, %d tokens (%d trained) to %s",
        meta["n_samples"],
        meta["n_tokens"],
        meta["n_trained_tokens"],
        output_dir,
    )
    return Path(output_dir)


def preview(
    *,
    data: Path,
    model_path: Path,
    format: Literal["text", "json"] = "text",
    model_max_length: int = 2048,
    limit: int | None = 3,
) -> None:
    """Show how conversations are tokenised and which tokens are trained on.

    `--format json` prints a JSON list of {"id", "input_ids", "labels"} (labels aligned with
    input_ids, -100 where masked); `text` prints each prompt with the trained spans highlighted.

    Arguments:
        data: conversations, a JSON list or JSONL of ShareGPT records.
        model_path: Hugging Face model directory whose tokenizer is used.
        format: text (readable, trained spans marked) or json (token ids and labels).
        model_max_length: truncate samples to this many tokens, as training does.
        limit: show only the first N records (all when null).
    """
    log.info(
        "preview: data=%s model_path=%s format=%s model_max_length=%d limit=%s",
        data, model_path, format, model_max_length, limit,
    )  # fmt: skip
    check_max_length(model_max_length)
    if limit is not None and limit < 1:
        raise VicunaflowError(f"--limit must be at least 1 (or null for all records), not {limit}")
    conversations = load_conversations(data)[:limit]
    tokenizer = load_tokenizer(model_path)
    samples = encode_all(conversations, tokenizer, model_max_length, drop_untrained=False)
    if format == "json":
        sys.stdout.write(
            json.dumps([{"id": s.id, "input_ids": s.input_ids, "labels": s.labels} for s in samples]) + "\n"
        )
        return
    from rich.console import Console
    from rich.text import Text

    console = Console(highlight=False, soft_wrap=True)
    for conversation, sample in zip(conversations, samples, strict=True):
        prompt, offsets = render_with_offsets(conversation, tokenizer)
        trained = sum(label != IGNORE_INDEX for label in sample.labels)
        console.rule(f"{sample.id}: {len(sample.input_ids)} tokens, {trained} trained")
        text = Text()
        for token_id, label, (start, end) in zip(sample.input_ids, sample.labels, offsets, strict=False):
            # The prompt's own characters, token by token; special tokens without text by name.
            piece = prompt[start:end] if end > start else tokenizer.convert_ids_to_tokens(token_id)
            # Trained tokens: green and underlined, so the spans are visible without colour too.
            text.append(piece, style="bold green underline" if label != IGNORE_INDEX else "dim")
        console.print(text)
    console.print("[bold green underline]underlined green[/]: trained on (labels); dim: masked (-100)")


# --- loading and validation -------------------------------------------------------------------


@dataclass(frozen=True)
class ConversationRecord:
    """One validated ShareGPT record: its id, its turns and its system prompt (chat.Conversation is the interactive
    chat loop)."""

    id: str
    turns: list[tuple[str, str]]  # (template.USER | template.ASSISTANT, text), alternating, USER first
    system: str = template.SYSTEM_PROMPT  # the record's own `system` (data clean keeps a first system turn there)


@dataclass(frozen=True)
class Sample:
    id: str
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where not trained on


def load_conversations(path: Path) -> list[ConversationRecord]:
    """Read a JSON list or JSONL file of ShareGPT records and validate every record."""
    path = require_file(path, "data file", "a JSON list or JSONL file of ShareGPT conversations")
    records = _read_records(path)
    conversations, errors = [], []
    first_index: dict[str, int] = {}  # id -> index of the record that has it first
    for index, record in enumerate(records):
        try:
            check_id_unused(record, index, first_index)
            conversation = validate_record(record, index)
        except ValueError as err:
            errors.append(str(err))
            continue
        if conversation is not None:
            conversations.append(conversation)
    if errors:
        shown = "; ".join(errors[:MAX_REPORTED_ERRORS])
        more = f" (and {len(errors) - MAX_REPORTED_ERRORS} more)" if len(errors) > MAX_REPORTED_ERRORS else ""
        raise VicunaflowError(
            f"{path}: {len(errors)} invalid record(s): {shown}{more}; fix or remove them, or run `vicunaflow data "
            "clean` on the file first (it normalises roles such as bing, chatgpt and system, drops broken records and "
            "keeps the first conversation of each id)"
        )
    if not conversations and records:
        raise VicunaflowError(
            f"{path}: none of its {len(records)} record(s) has a user turn followed by an assistant reply, nothing to "
            "train on (a first turn from the assistant is dropped, as FastChat does, and so is a last one from the user)"
        )
    if not conversations:
        raise VicunaflowError(f"{path}: no conversations in it")
    log.info("%s: %d conversations", path, len(conversations))
    return conversations


def check_id_unused(record: object, index: int, first_index: dict[str, int]) -> None:
    """Note the id of record `index` in `first_index`; raise ValueError naming both records if an earlier one has it.

    Samples are named by id (meta.json's `ids`, eval loss, split's `<id>_<k>` pieces): a repeated id trains on two
    conversations under one name, or on one twice. Ids compare as text, as they are written: 7 and "7" are one.
    """
    from vicunaflow.dataprep.records import conversation_id

    record_id = conversation_id(record)
    if record_id is None:
        return  # validate_record refuses it
    earlier = first_index.setdefault(record_id, index)
    if earlier != index:
        raise ValueError(f"record {record['id']!r} (index {index}): the same id as index {earlier}")


def validate_record(record: object, index: int) -> ConversationRecord | None:
    """Check one ShareGPT record; raise ValueError naming its id and index with the reason.

    A first turn from the assistant is dropped (FastChat does the same) and so is a trailing
    user turn, which has no reply to learn from. Returns None for a record left with no exchange.
    """
    from vicunaflow.dataprep.records import conversation_id

    if not isinstance(record, dict):
        raise ValueError(f"record at index {index}: not a JSON object")
    name = f"record {record.get('id', '<no id>')!r} (index {index})"
    record_id = conversation_id(record)
    if record_id is None:  # a null or empty id names nothing: samples, split's pieces and eval loss go by id
        missing = "missing 'id'" if "id" not in record else f"its 'id' is {json.dumps(record['id'])}"
        raise ValueError(f"{name}: {missing} (data clean gives such a record an id from its position)")
    conversation = record.get("conversations")
    if not isinstance(conversation, list):
        raise ValueError(f"{name}: missing 'conversations' list")
    if not conversation:
        raise ValueError(f"{name}: empty conversation")
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"{name}: its 'system' prompt is not a string (give text, or null for Vicuna's default one)")
    turns = []
    for i, turn in enumerate(conversation):
        if not isinstance(turn, dict):
            raise ValueError(f"{name}: turn {i} is not an object")
        role = turn.get("from")
        if not isinstance(role, str) or role not in template.ROLE_OF:  # a list or dict is unhashable: check first
            raise ValueError(f"{name}: turn {i} has unknown role {role!r} (expected one of {sorted(template.ROLE_OF)})")
        if "value" not in turn or turn["value"] is None:
            raise ValueError(f"{name}: turn {i} is missing its value")
        if not isinstance(turn["value"], str):
            raise ValueError(f"{name}: turn {i} value is not a string")
        if not turn["value"].strip():
            raise ValueError(f"{name}: turn {i} ({role}) is empty")
        turns.append((template.ROLE_OF[role], turn["value"]))
    if turns[0][0] == template.ASSISTANT:
        log.info("%s: dropping its first turn, from the assistant (as FastChat does)", name)
        turns = turns[1:]
    for i, (role, _) in enumerate(turns):
        expected = template.USER if i % 2 == 0 else template.ASSISTANT
        if role != expected:
            offset = len(conversation) - len(turns)
            raise ValueError(f"{name}: roles not alternating at turn {i + offset} (two {role} turns in a row)")
    if turns and turns[-1][0] == template.USER:
        log.debug("%s: dropping its last turn, from the user (no reply to train on)", name)
        turns = turns[:-1]
    if not turns:
        log.warning("%s: no user/assistant exchange left; skipped", name)
        return None
    return ConversationRecord(id=record_id, turns=turns, system=template.system_or_default(system))


def check_max_length(model_max_length: int) -> None:
    if model_max_length < 1:
        raise VicunaflowError(
            f"--model-max-length must be at least 1 token, not {model_max_length} (LLaMA-1 takes 2048, Llama 2 4096)"
        )


def read_text(path: Path) -> str:
    """The file as UTF-8 text (a byte-order mark is accepted); other encodings and compressed files fail naming the
    byte and the fix."""
    from vicunaflow.dataprep.records import refuse_unreadable

    raw = path.read_bytes()
    refuse_unreadable(path, raw)  # compressed, UTF-16 or UTF-32
    converted = path.with_name(f"{path.stem}.utf8{path.suffix}")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise VicunaflowError(
            f"{path}: not UTF-8 (byte {err.start}, line {line}: 0x{raw[err.start]:02x}); convert it, e.g. from "
            f"Latin-1: iconv -f latin1 -t utf-8 {path} > {converted}"
        ) from err


def _read_records(path: Path) -> list:
    text = read_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise VicunaflowError(f"{path}: not valid JSON ({err})") from err
        return records
    records = []
    # "\n" only: str.splitlines() also breaks at U+2028, U+2029, U+0085 and others, which JSON allows raw inside strings
    for line_number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if not records and stripped.startswith("{"):
                from vicunaflow.dataprep.records import refuse_json_object

                refuse_json_object(path)  # an indented JSON object, not JSON Lines: say so
            raise VicunaflowError(
                f"{path}:{line_number}: not valid JSON Lines ({err}); give one record per line"
            ) from err
    return records


# --- tokenisation -------------------------------------------------------------------------------


def load_tokenizer(model_path: Path):
    model_path = require_dir(model_path, "model directory")
    if not has_tokenizer(model_path):
        raise VicunaflowError(f"{model_path}: no tokenizer (tokenizer.json or tokenizer.model); give a model directory")
    tokenizer = open_tokenizer(model_path)
    if not getattr(tokenizer, "is_fast", False):
        raise VicunaflowError(f"{model_path}: a fast tokenizer (tokenizer.json) is needed for exact loss masks")
    return tokenizer


def tokenizer_file_paths(model_path: Path) -> list[Path]:
    return [Path(model_path, n) for n in TOKENIZER_FILES if Path(model_path, n).is_file()]


def encode(conversation: ConversationRecord, tokenizer, model_max_length: int) -> Sample:
    """Tokenise the Vicuna v1.1 prompt of one conversation with labels only on assistant replies.

    The prompt is tokenised whole (as FastChat does, bos included); a token is trained on when any
    of its characters fall inside an assistant piece of `template.segments()` (" reply</s>").
    Tokens without characters (bos) are never trained on. Truncation cuts ids and labels together.
    """
    return _truncated(_encode_whole(conversation, tokenizer), model_max_length)


def _encode_whole(conversation: ConversationRecord, tokenizer) -> Sample:
    spans, prompt = [], ""
    for piece, is_reply in template.segments(conversation.turns, conversation.system):
        if is_reply:
            spans.append((len(prompt), len(prompt) + len(piece)))  # [start, end) in characters
        prompt += piece
    encoded = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    span_index = 0
    for i, (start, end) in enumerate(encoded["offset_mapping"]):
        if end <= start:
            continue  # added special token (bos): no text of its own
        while span_index < len(spans) and spans[span_index][1] <= start:
            span_index += 1
        if span_index < len(spans) and spans[span_index][0] < end:
            labels[i] = input_ids[i]
    return Sample(conversation.id, input_ids, labels)


def _truncated(sample: Sample, model_max_length: int) -> Sample:
    return Sample(sample.id, sample.input_ids[:model_max_length], sample.labels[:model_max_length])


def check_room_for_replies(tokenizer, model_max_length: int) -> None:
    """Refuse a model_max_length that leaves no room for a reply token in any conversation.

    Probed with the shortest possible exchange (a one-letter question) after the default system prompt: the system
    prompt and the first question come before the first reply, so when this one has no trained token within
    model_max_length, no conversation with that prompt has, and training would run on nothing (loss 0 at every step)
    and write the input model back. (A record's own, shorter system prompt could leave a reply room in a few tokens
    less; no model's context is that short.)
    One tokenisation: cheap where the data is tokenised lazily or was tokenised by `data tokenize`.
    """
    probe = ConversationRecord("probe", [(template.USER, "a"), (template.ASSISTANT, "a")])
    sample = _truncated(_encode_whole(probe, tokenizer), model_max_length)
    if all(label == IGNORE_INDEX for label in sample.labels):
        first = next(i for i, label in enumerate(_encode_whole(probe, tokenizer).labels) if label != IGNORE_INDEX)
        raise VicunaflowError(
            f"--model-max-length {model_max_length}: no conversation has a reply token within it (the system prompt "
            f"and a first question take {first} tokens at least); raise --model-max-length (FastChat's: 2048)"
        )


def render_with_offsets(conversation: ConversationRecord, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The prompt string and each token's (start, end) characters in it (for the readable preview)."""
    prompt = template.render(conversation.turns, conversation.system)
    return prompt, list(tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"])


def encode_all(
    conversations: Sequence[ConversationRecord], tokenizer, model_max_length: int, drop_untrained: bool = True
) -> list[Sample]:
    """Encode every conversation; samples left with no trained token after truncation are dropped."""
    samples, dropped, truncated = [], [], 0
    for conversation in _progress(conversations, "tokenising"):
        whole = _encode_whole(conversation, tokenizer)
        truncated += len(whole.input_ids) > model_max_length  # only samples that lose tokens
        sample = _truncated(whole, model_max_length)
        if drop_untrained and all(label == IGNORE_INDEX for label in sample.labels):
            dropped.append(sample.id)
            continue
        samples.append(sample)
    if truncated:
        log.info("%d of %d samples truncated to %d tokens", truncated, len(conversations), model_max_length)
    if drop_untrained and conversations and not samples:
        raise VicunaflowError(
            f"all {len(conversations)} conversations were dropped: none has a reply token within its first "
            f"{model_max_length} tokens (the system prompt and first question are longer); raise --model-max-length"
        )
    if dropped:
        log.warning(
            "dropped %d samples with no reply token within %d tokens: %s",
            len(dropped),
            model_max_length,
            ", ".join(dropped[:10]),
        )
    return samples


def _progress(items: Sequence, description: str) -> Iterable:
    if len(items) < 1000 or os.environ.get("RANK", "0") != "0":
        return items
    from tqdm import tqdm

    return tqdm(items, desc=description, unit="conv")


# --- the tokenised dataset directory ------------------------------------------------------------


def read_tokenized_meta(path: Path) -> dict:
    """meta.json of a dataset directory written by `tokenize`; an empty one is refused (nothing to train on)."""
    meta_path = path / META_FILE
    if not meta_path.is_file() or not (path / TOKENS_FILE).is_file():
        raise VicunaflowError(
            f"{path}: not a tokenised dataset ({META_FILE} and {TOKENS_FILE} expected); run `vicunaflow data tokenize`"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as err:
        raise VicunaflowError(f"{meta_path}: not valid JSON ({err}); run `vicunaflow data tokenize` again") from err
    if not meta.get("n_samples"):
        raise VicunaflowError(
            f"{path}: an empty tokenised dataset (0 samples), nothing to train on; tokenise the data again "
            "with a larger --model-max-length"
        )
    return meta


def check_tokenizer_of(path: Path, meta: dict, model_path: Path) -> None:
    """Refuse a tokenised dataset (`meta` read from `path`) whose tokenizer.json is not model_path's: its token
    ids would stand for other words there, and training or a loss on them would run without an error."""
    from vicunaflow.outputs import sha256_file

    recorded = meta["tokenizer_sha256"].get("tokenizer.json")
    tokenizer = Path(model_path, "tokenizer.json")
    if recorded is not None and recorded != (sha256_file(tokenizer) if tokenizer.is_file() else None):
        raise VicunaflowError(
            f"{path}: tokenised with another tokenizer than {model_path}'s; re-run `vicunaflow data tokenize` "
            f"with --model-path {model_path}"
        )


def load_tokenized(path: Path) -> tuple[list[Sample], dict]:
    """Read a directory written by `tokenize` back into samples."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_tokenized_meta(path)
    try:
        tensors = load_file(str(path / TOKENS_FILE))
    except Exception as err:  # safetensors' own error types: a truncated or damaged file
        raise VicunaflowError(
            f"{path / TOKENS_FILE}: not a complete safetensors file ({err}); tokenise the data again"
        ) from None
    input_ids, labels, offsets = tensors["input_ids"].tolist(), tensors["labels"].tolist(), tensors["offsets"].tolist()
    samples = [
        Sample(sample_id, input_ids[offsets[i] : offsets[i + 1]], labels[offsets[i] : offsets[i + 1]])
        for i, sample_id in enumerate(meta["ids"])
    ]
    return samples, meta

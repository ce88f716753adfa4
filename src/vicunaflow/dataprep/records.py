"""Streams of conversation records: read a JSON array or JSONL one record at a time, write JSONL
atomically, count what was dropped and why, and map work over processes in order.

A 1 GB JSON array is never loaded whole: ijson (yajl's C parser) yields one record at a time, so
memory stays at one record plus the parser's buffer. JSONL is read line by line. A line that is not
UTF-8 or not JSON is one broken record (counted, named by its line); inside a JSON array a parser
cannot resynchronise, so there it is an error naming the byte offset and the record before it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from vicunaflow import VicunaflowError, require_file
from vicunaflow.outputs import atomic_output_file

log = logging.getLogger(__name__)

READ_BUFFER = 1 << 20
EXAMPLES = 5  # record names kept per reason in the TSV
LOGGED = 20  # drops logged one by one per reason; the rest are counted only


@dataclass(frozen=True)
class Broken:
    """A record that could not even be decoded (JSONL: a line that is not UTF-8 or not JSON)."""

    reason: str  # invalid_utf8 | invalid_json
    detail: str


def read_records(path: Path) -> Iterator[tuple[str, object]]:
    """Yield (where, record) for each record of a JSON array or JSONL file, in file order.

    `where` names the record for messages: `index 12` for a JSON array, `line 13` for JSONL. A JSONL
    line that cannot be decoded is yielded as a `Broken`; an array that cannot be parsed raises.
    """
    path = require_file(path, "data file", "a JSON array or JSONL file of ShareGPT conversations")
    with open(path, "rb") as f:
        head = f.read(4096)
        refuse_unreadable(path, head)
        first = _first_byte(f, head)
        if first == b"[":
            yield from _read_array(path, f)
        elif first in (b"{", b""):
            yield from _read_lines(path, f)
        else:
            raise VicunaflowError(
                f"{path}: neither a JSON array nor JSON Lines (starts with {first!r}); give ShareGPT conversations"
            )


# First bytes of files often given where JSON text is expected: what each is, its suffix, and how to unpack it.
PACKED = {
    b"\x1f\x8b": ("gzip-compressed", ".gz", "gzip -dc"),
    b"\x28\xb5\x2f\xfd": ("zstd-compressed", ".zst", "zstd -dc"),
    b"BZh": ("bzip2-compressed", ".bz2", "bzip2 -dc"),
    b"\xfd7zXZ\x00": ("xz-compressed", ".xz", "xz -dc"),
    b"PK\x03\x04": ("a zip archive", ".zip", "unzip -p"),
}


PARQUET = b"PAR1"  # Apache Parquet, the Hugging Face Hub's format for datasets (data/train-00000-of-00001.parquet)


def parquet_error(path: Path) -> str:
    """What to say for a Parquet file: what it is and a one-line conversion to JSON Lines (pyarrow is no dependency
    of vicunaflow; pandas or duckdb read it where they are installed). It was called UTF-16 (a NUL in its header)."""
    converted = path.with_suffix(".jsonl")
    pandas = (
        f"python -c \"import pandas; pandas.read_parquet('{path}').to_json('{converted}', orient='records', "
        'lines=True, force_ascii=False)"'
    )
    duckdb = f"duckdb -c \"COPY (FROM '{path}') TO '{converted}' (FORMAT json)\""
    return (
        f"{path}: an Apache Parquet file, not JSON text; convert it to JSON Lines first, e.g. with pandas (and "
        f"pyarrow): {pandas}, or with duckdb: {duckdb}"
    )


def refuse_unreadable(path: Path, head: bytes) -> None:
    """Raise an error naming what `path` is when its first bytes (`head`) show it is no UTF-8 text: compressed, a
    zip archive, UTF-16 or UTF-32, with the command that makes it readable; return otherwise (the JSON reader
    judges the rest). Without this a gzip file was "UTF-16" (a NUL at its byte 3) or "starts with b'\\x1f'", and a
    Parquet file "UTF-16"."""
    path = Path(path)
    if head.startswith(PARQUET):
        raise VicunaflowError(parquet_error(path))
    for magic, (what, suffix, command) in PACKED.items():
        if head.startswith(magic):
            plain = path.with_suffix("") if path.suffix == suffix else path.with_name(f"{path.stem}.plain{path.suffix}")
            raise VicunaflowError(f"{path}: {what}, not JSON text; decompress it first: {command} {path} > {plain}")
    byte_order_mark = head[:2] in (b"\xff\xfe", b"\xfe\xff")
    nul = head.find(b"\x00")  # never in UTF-8 JSON text; every other byte in UTF-16 ASCII, which decodes "fine"
    if byte_order_mark or nul >= 0:
        offset = 0 if byte_order_mark else nul
        converted = path.with_name(f"{path.stem}.utf8{path.suffix}")
        raise VicunaflowError(
            f"{path}: not UTF-8 but UTF-16 or UTF-32 (byte {offset}: 0x{head[offset]:02x}); convert it: "
            f"iconv -f utf-16 -t utf-8 {path} > {converted}"
        )


def _first_byte(f: IO[bytes], head: bytes) -> bytes:
    start = 3 if head.startswith(b"\xef\xbb\xbf") else 0  # a UTF-8 byte order mark
    stripped = head[start:].lstrip()
    f.seek(start)
    return stripped[:1]


def _read_array(path: Path, f: IO[bytes]) -> Iterator[tuple[str, object]]:
    import ijson

    index, last_id = -1, None
    try:
        for index, record in enumerate(ijson.items(f, "item", use_float=True, buf_size=READ_BUFFER)):
            yield f"index {index}", record
            last_id = record.get("id") if isinstance(record, dict) else None
    except ijson.JSONError as err:
        after = f"after record index {index} (id {last_id!r})" if index >= 0 else "before its first record"
        reason = str(err).splitlines()[0].strip(" b'\"")
        if "UTF8" in reason or "UTF-8" in reason:
            reason = "invalid UTF-8"
        raise VicunaflowError(
            f"{path}: {reason} near byte {f.tell()}, {after}; a JSON array cannot be read past it: "
            "fix the file, or convert it to JSONL, where a bad line is dropped and counted"
        ) from None


def _read_lines(path: Path, f: IO[bytes]) -> Iterator[tuple[str, object]]:
    for number, raw in enumerate(f, start=1):
        if not raw.strip():
            continue
        if raw.strip() == b"{":  # no JSONL record is a lone brace: an indented JSON object (its lines "dropped")
            refuse_json_object(path)
        where = f"line {number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield where, Broken("invalid_utf8", f"invalid UTF-8 at byte {err.start} of the line")
            continue
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as err:
            yield where, Broken("invalid_json", f"not JSON ({err.msg} at column {err.colno})")


def refuse_json_object(path: Path) -> None:
    """Raise an error for a file that holds one JSON object (a dataset's {"train": [...]}, say) where a JSON
    array or JSON Lines of conversations is expected, naming the list to take out of it if it has one; return
    if the file is not one JSON object after all."""
    try:
        whole = json.loads(Path(path).read_bytes().decode("utf-8-sig"))
    except (ValueError, OSError):
        return
    if not isinstance(whole, dict):
        return
    lists = [key for key, value in whole.items() if isinstance(value, list)]
    hint = "give a JSON array or JSON Lines of {id, conversations} records"
    if lists:
        command = f"jq '.[\"{lists[0]}\"]' {path} > conversations.json"
        hint = f"its list {lists[0]!r} holds {len(whole[lists[0]])} records: write it out, e.g. {command}"
    raise VicunaflowError(
        f"{path}: one JSON object (keys {', '.join(map(repr, list(whole)[:5]))}), not conversations; {hint}"
    )


def refuse_repeated_ids(path: Path, records: Iterable[tuple[str, object]]) -> Iterator[tuple[str, object]]:
    """`records` passed on as read; an error at the first id seen twice (as text: 7 and "7" are one), naming both
    places.

    An id names one conversation downstream: split's pieces are `<id>_<k>` and its held-out side is drawn by id,
    tokenize's samples are named by it. Two conversations under one id are trained on twice, or their pieces cannot
    be told apart. Holds each id and where it was first seen, never the records (90,000 ids: a few MB).
    """
    first_seen: dict[str, str] = {}
    for where, record in records:
        name = conversation_id(record)  # records without one are the reader's to refuse
        if name is not None:
            earlier = first_seen.setdefault(name, where)
            if earlier != where:
                cleaned = Path(path).with_name(f"{Path(path).stem}.clean.jsonl")
                raise VicunaflowError(
                    f"{path}: id {name!r} at {earlier} and again at {where}; each conversation needs an id "
                    f"of its own: run `vicunaflow data clean --data {path} --output {cleaned}` first (it keeps the "
                    "first conversation of each id), or give the repeated one another id"
                )
        yield where, record


def conversation_id(record: object) -> str | None:
    """The record's id as text (7 and "7" are one), or None where it has none: no `id`, or one that is null or empty.

    A null or empty id names no conversation: taken as text they were all "None" or "", one id shared by every such
    record, and all but the first were dropped as duplicate_id.
    """
    if not isinstance(record, dict) or record.get("id") is None:
        return None
    text = str(record["id"])
    return text if text.strip() else None


def record_name(where: str, record: object) -> str:
    if conversation_id(record) is not None:
        return f"record {record['id']!r} ({where})"
    return f"record at {where}"


# Line breaks to str.splitlines() (and to JavaScript before ES2019), valid raw inside JSON strings: escaped, so every
# reader of a JSONL line sees one line. Outside strings json.dumps writes ASCII only, so replacing them is safe.
_LINE_BREAKS_ESCAPED = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\u0085": "\\u0085"})


def dumps(record: dict) -> bytes:
    """One JSONL line: compact, UTF-8 kept as is but for U+2028, U+2029 and U+0085 (escaped: other readers split
    lines there), keys in the order built (deterministic)."""
    line = json.dumps(record, ensure_ascii=False, separators=(",", ":")).translate(_LINE_BREAKS_ESCAPED)
    return (line + "\n").encode("utf-8")


def content_digest(record: dict) -> bytes:
    """What makes two conversations the same: system prompt and turns (not the id)."""
    key = json.dumps([record.get("system"), record["conversations"]], ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()


def unit_hash(*parts: str) -> float:
    """A number in [0, 1) fixed by `parts`: deterministic sampling without a random generator's state."""
    digest = hashlib.blake2b("\x1f".join(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


# ---- writing ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[IO[bytes]]:
    """A binary file that becomes `path` only when the block succeeds (a hidden temporary beside it,
    renamed over it); on any error, Ctrl-C or SIGTERM the temporary is removed and `path` is left as
    it was. The temporary names its owner, as output folders' do (`outputs.atomic_output_file`): a
    rerun removes those of killed runs."""
    with atomic_output_file(path) as tmp, open(tmp, "wb", buffering=READ_BUFFER) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


# ---- counting what was dropped ----------------------------------------------------------------------


@dataclass
class Counts:
    """Conversations read, kept and dropped by reason, with a few examples of each; written as a TSV.

    Kinds: `read` and `kept` (conversations), `drop` (a conversation left out, by reason), `edit` (a
    conversation kept but changed: a turn dropped, HTML converted; counted once per conversation).
    """

    step: str
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def add(self, kind: str, reason: str, name: str | None = None, detail: str = "") -> None:
        key = (kind, reason)
        self.counts[key] += 1
        examples = self.examples.setdefault(key, [])
        if name is not None and len(examples) < EXAMPLES and name not in examples:
            examples.append(name)
        if kind == "drop" and name is not None and self.counts[key] <= LOGGED:
            log.warning("%s: %s: dropped (%s)%s", self.step, name or "?", reason, f": {detail}" if detail else "")
            if self.counts[key] == LOGGED:
                log.warning("%s: further drops for %s are counted, not logged", self.step, reason)

    def get(self, kind: str, reason: str) -> int:
        return self.counts[(kind, reason)]

    def dropped(self) -> int:
        return sum(n for (kind, _), n in self.counts.items() if kind == "drop")

    def rows(self) -> list[tuple[str, str, int, str]]:
        order = {"read": 0, "kept": 1, "drop": 2, "edit": 3}
        keys = sorted(self.counts, key=lambda k: (order.get(k[0], 9), k[0], k[1]))
        return [
            (kind, reason, self.counts[(kind, reason)], ", ".join(self.examples.get((kind, reason), [])))
            for kind, reason in keys
        ]

    def write_tsv(self, path: Path) -> None:
        lines = ["step\tkind\treason\tconversations\texamples\n"]
        for kind, reason, count, examples in self.rows():
            examples = examples.replace("\t", " ").replace("\n", " ")
            lines.append(f"{self.step}\t{kind}\t{reason}\t{count}\t{examples}\n")
        with atomic_writer(path) as f:
            f.write("".join(lines).encode("utf-8"))

    def summary(self) -> str:
        drops = ", ".join(f"{reason} {n}" for kind, reason, n, _ in self.rows() if kind == "drop") or "none"
        return f"read {self.get('read', 'conversations')}, kept {self.get('kept', 'conversations')}; dropped: {drops}"


# ---- work spread over processes, results in input order ---------------------------------------------


def ordered_map(function: Callable, batches: Iterable, jobs: int) -> Iterator:
    """`map(function, batches)` over `jobs` processes, results in input order, at most a few batches
    in flight (Pool.imap would read the whole input ahead into its queue: memory would grow with the
    file). jobs <= 1 runs in this process."""
    if jobs <= 1:
        yield from map(function, batches)
        return
    # spawn, not fork: the parent may hold threads (tokenizers, logging handlers) that fork would copy mid-lock.
    context = multiprocessing.get_context("spawn")
    window = 2 * jobs + 1
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        pending: list[concurrent.futures.Future] = []
        for batch in batches:
            pending.append(pool.submit(function, batch))
            if len(pending) >= window:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def check_jobs(jobs: int | None) -> int:
    """--jobs as given (at least 1), or default_jobs() when left out."""
    if jobs is None:
        return default_jobs()
    if jobs < 1:
        raise VicunaflowError(f"--jobs {jobs}: must be at least 1 (or left out: the CPUs this process may use)")
    return jobs


def default_jobs() -> int:
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8))

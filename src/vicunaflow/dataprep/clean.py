"""`vicunaflow data clean`: ShareGPT dumps -> conversations `data tokenize` accepts, every drop counted.

What FastChat's clean_sharegpt.py does, as a stream over processes with bounded memory (it loads the
file whole and holds every result), and with what it lacks: roles normalised instead of rejected, a
leading system turn kept as the conversation's system prompt, code blocks kept fenced with their
language, a language filter, and a TSV of every drop by reason.

Per conversation, in order:
1. a record that is not an object with a `conversations` (or `messages`) list: dropped, not_a_conversation;
2. roles normalised: human/user -> human; gpt/chatgpt/bing/bard/assistant -> gpt; a first `system`
   turn becomes `"system"`; any other role: dropped, unknown_role; a later system turn: misplaced_system;
3. a turn that is not an object with a string value: dropped, broken_turn;
4. HTML (by default in assistant turns only, where ShareGPT's dumps have it) -> Markdown by html-to-markdown,
   for a turn that is scraped HTML (it opens with a block tag, no ``` fence outside <pre>): Markdown
   replies that show tags or `vector<int>` are left byte for byte;
5. a first assistant turn is dropped (as FastChat does), so is a last user turn (no reply to learn);
   an empty turn ends the conversation there (the complete exchanges before it are kept);
   roles that do not alternate: dropped, roles_not_alternating; nothing left: dropped, no_exchange;
6. language (optional, py3langid on the user's words): another language is dropped, language:<code>;
7. exact duplicates (same system prompt and turns) after the first: dropped, duplicate; a repeated id
   with other content: dropped, duplicate_id (ids must name one conversation downstream).
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vicunaflow import VicunaflowError
from vicunaflow.dataprep.records import (
    Broken,
    Counts,
    atomic_writer,
    batched,
    check_jobs,
    content_digest,
    conversation_id,
    dumps,
    ordered_map,
    read_records,
    record_name,
)
from vicunaflow.outputs import check_output_files

log = logging.getLogger(__name__)

HUMAN, GPT, SYSTEM = "human", "gpt", "system"
ROLES = {
    "human": HUMAN,
    "user": HUMAN,
    "gpt": GPT,
    "chatgpt": GPT,
    "bing": GPT,
    "bard": GPT,
    "assistant": GPT,
    "system": SYSTEM,
}
BATCH = 64  # conversations per task sent to a worker process


def clean(
    *,
    data: Path,
    output: Path,
    report: Path | None = None,
    html: Literal["assistant", "all", "none"] = "assistant",
    languages: list[str] | None = None,
    language_text: int = 2000,
    jobs: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Clean ShareGPT-style conversations into JSONL, counting every drop by reason in a TSV.

    HTML becomes Markdown, roles are normalised, and broken, empty, duplicate (and other-language)
    conversations are dropped.

    Arguments:
        data: conversations: a JSON array or JSONL of records {id, conversations: [{from, value}, ...]}
            (or {role, content} turns); read as a stream.
        output: the cleaned JSONL, written to a temporary and renamed into place.
        report: TSV of conversations read, kept, dropped and edited by reason, with example ids;
            default: the output's name with `.counts.tsv`.
        html: which turns hold HTML to convert to Markdown: assistant (ShareGPT's dumps), all, none.
            Only turns that are scraped HTML are converted (they open with a block tag such as <div> or
            <p> and hold no ``` fence outside <pre>); Markdown and plain text are left byte for byte.
        languages: keep only conversations in these languages (ISO 639-1 codes, e.g. '[en]'), as told
            by py3langid (`pip install 'vicunaflow[data]'`) from the user's turns; default: all.
        language_text: characters of the user's turns (code blocks left out) the language is told from.
        jobs: worker processes; default: the CPUs this process may use (at most 8).
        overwrite: replace output files that exist but are not this verb's unchanged earlier outputs (default: refuse).
    """
    data, output = Path(data), Path(output)
    report = Path(report) if report else output.with_name(output.name.removesuffix(".jsonl") + ".counts.tsv")
    jobs = check_jobs(jobs)
    log.info(
        "data clean: data=%s output=%s report=%s html=%s languages=%s jobs=%d",
        data, output, report, html, languages or "all", jobs,
    )  # fmt: skip
    check_output_files({"--output": output, "--report": report}, inputs=[data], overwrite=overwrite)
    options = CleanOptions(html=html, languages=tuple(languages or ()), language_text=language_text)
    if language_text < 1:
        raise VicunaflowError(
            f"--language-text {language_text}: give a positive number of characters to tell the language from"
        )
    if options.languages:
        check_languages(options.languages)  # before any work: a bad code would drop every conversation
    counts = Counts("clean")
    seen_content: dict[bytes, str] = {}  # content digest -> id kept; 16 bytes a conversation
    seen_ids: set[str] = set()
    work = functools.partial(clean_batch, options=options)
    with atomic_writer(output) as out:
        for results in ordered_map(work, batched(read_records(data), BATCH), jobs):
            for result in results:
                counts.add("read", "conversations")
                for edit in result.edits:
                    counts.add("edit", edit, result.name)
                if result.reason:
                    counts.add("drop", result.reason, result.name, result.detail)
                    continue
                if result.digest in seen_content:
                    counts.add("drop", "duplicate", result.name, f"same as {seen_content[result.digest]!r}")
                    continue
                if result.id in seen_ids:
                    counts.add("drop", "duplicate_id", result.name, "an earlier conversation has this id")
                    continue
                seen_content[result.digest] = result.id
                seen_ids.add(result.id)
                out.write(result.line)
                counts.add("kept", "conversations")
        if not counts.get("kept", "conversations"):  # inside the writer: no empty dataset is left as if done
            raise VicunaflowError(nothing_kept(data, counts, options))
    counts.write_tsv(report)
    log.info("data clean: %s; wrote %s and %s", counts.summary(), output, report)
    return output


def nothing_kept(data: Path, counts: Counts, options: CleanOptions) -> str:
    """The error for a clean that kept nothing, naming the filter that dropped everything and its likely fix."""
    if not counts.get("read", "conversations"):
        return f"{data}: no conversation in it; give a JSON array or JSONL of ShareGPT conversations"
    dropped = {reason: n for kind, reason, n, _ in counts.rows() if kind == "drop"}
    languages = sorted(
        (n, reason.removeprefix("language:")) for reason, n in dropped.items() if reason.startswith("language:")
    )
    if languages and sum(n for n, _ in languages) == counts.get("read", "conversations"):
        found = ", ".join(f"{code} {n}" for n, code in reversed(languages[-5:]))
        return (
            f"{data}: --languages {', '.join(options.languages)} kept no conversation (py3langid found: {found}); "
            "give the languages wanted, as ISO 639-1 codes such as en, or leave --languages out"
        )
    return (
        f"{data}: no conversation kept ({counts.summary()}); each needs a user turn with a reply, "
        "as {id, conversations: [{from: human, value}, {from: gpt, value}]}"
    )


# ---- one conversation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CleanOptions:
    html: str = "assistant"
    languages: tuple[str, ...] = ()
    language_text: int = 2000


@dataclass(frozen=True)
class Result:
    name: str
    id: str = ""
    line: bytes = b""  # the cleaned record as a JSONL line
    digest: bytes = b""
    reason: str = ""  # why it was dropped; empty when kept
    detail: str = ""
    edits: tuple[str, ...] = ()


def clean_batch(batch: list[tuple[str, object]], options: CleanOptions) -> list[Result]:
    """Runs in a worker process: clean each record, return what the parent needs to dedupe and write."""
    return [clean_record(where, record, options) for where, record in batch]


class Drop(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def clean_record(where: str, record: object, options: CleanOptions = CleanOptions()) -> Result:
    name = record_name(where, record)
    edits: list[str] = []
    try:
        if isinstance(record, Broken):
            raise Drop(record.reason, record.detail)
        system, turns = normalized_turns(record)
        turns = _converted(turns, options.html, edits)
        if system is not None:
            system = _converted([(SYSTEM, system)], options.html, edits)[0][1].strip() or None
        turns = exchanges(turns, edits)
        if options.languages:
            language = detect_language(turns, options.language_text)
            if language not in options.languages:
                raise Drop(f"language:{language}", f"{language}, not one of {', '.join(options.languages)}")
    except Drop as drop:
        return Result(name=name, reason=drop.reason, detail=drop.detail, edits=tuple(edits))
    record_id = conversation_id(record)
    if record_id is None:  # no id, or a null or empty one
        record_id = where.replace(" ", "-")  # "line-13": stable for a given file
        edits.append("id_from_position")
    cleaned: dict = {"id": record_id}
    if system is not None:
        cleaned["system"] = system
    cleaned["conversations"] = [{"from": role, "value": text} for role, text in turns]
    return Result(name=name, id=record_id, line=dumps(cleaned), digest=content_digest(cleaned), edits=tuple(edits))


def normalized_turns(record: object) -> tuple[str | None, list[tuple[str, str]]]:
    if not isinstance(record, dict):
        raise Drop("not_a_conversation", f"{json_type(record)}, not an object")
    turns = record.get("conversations", record.get("messages"))
    if not isinstance(turns, list):
        raise Drop("not_a_conversation", "no 'conversations' list")
    system, normalized = record.get("system") if isinstance(record.get("system"), str) else None, []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise Drop("broken_turn", f"turn {i} is {json_type(turn)}, not an object")
        raw_role = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        role = ROLES.get(raw_role.strip().lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise Drop("unknown_role", f"turn {i} has role {raw_role!r} (known: {', '.join(sorted(ROLES))})")
        if not ({"value", "content"} & turn.keys()):
            raise Drop("broken_turn", f"turn {i} ({raw_role}) has no value")
        if not isinstance(value, str):
            raise Drop("broken_turn", f"turn {i} ({raw_role}) value is {json_type(value)}, not a string")
        if role == SYSTEM:
            if normalized or system is not None:
                raise Drop("misplaced_system", f"turn {i} is a system turn after the conversation started")
            system = value
            continue
        normalized.append((role, value))
    return system, normalized


def json_type(value: object) -> str:
    """A parsed value's type as the JSON file has it (null, a number, an array; not NoneType, int, list)."""
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    return names.get(type(value), "an array" if isinstance(value, list) else "an object")


def _converted(turns: list[tuple[str, str]], html: str, edits: list[str]) -> list[tuple[str, str]]:
    if html == "none":
        return turns
    converted = []
    for role, text in turns:
        if (html == "all" or role == GPT) and looks_like_html(text):
            text = html_to_markdown(text)
            if "html_to_markdown" not in edits:
                edits.append("html_to_markdown")
        converted.append((role, text))
    return converted


def exchanges(turns: list[tuple[str, str]], edits: list[str]) -> list[tuple[str, str]]:
    """Alternating human/gpt exchanges: FastChat's offsets fixed, empty turns cut, then checked."""
    if turns and turns[0][0] == GPT:
        turns = turns[1:]
        edits.append("first_turn_from_assistant_dropped")
    for i, (_, text) in enumerate(turns):
        if not text.strip():
            turns = turns[:i]
            edits.append("cut_at_empty_turn")
            break
    for i, (role, _) in enumerate(turns):
        if role != (HUMAN if i % 2 == 0 else GPT):
            raise Drop("roles_not_alternating", f"turn {i} is a second {role} turn in a row")
    if len(turns) % 2:
        turns = turns[:-1]
        edits.append("last_turn_from_user_dropped")
    if not turns:
        raise Drop("no_exchange", "no user turn with a reply left")
    return turns


# ---- HTML -> Markdown ------------------------------------------------------------------------------

# ChatGPT's scraped replies open with a block element (`<div class="markdown prose ...">`, `<p>`); a Markdown
# reply that merely mentions a tag (`Use the <p> tag`, `vector<int>`, `a<b`) does not, or fences its HTML.
_HTML_START = re.compile(r"\s*<(?:div|p|pre|ol|ul|h[1-6]|table|blockquote)\b[^<>]*>", re.IGNORECASE)
_PRE = re.compile(r"<pre\b.*?</pre>", re.DOTALL | re.IGNORECASE)  # code, where a ``` may be the code's own
_SVG = re.compile(r"<svg\b.*?</svg>", re.DOTALL | re.IGNORECASE)
_BUTTON = re.compile(r"<button\b.*?</button>", re.DOTALL | re.IGNORECASE)
# ChatGPT's bar above a code block ("python  [Copy code]"): its language is also on <code class="language-x">.
_CODE_BAR = re.compile(r'<div class="[^"]*\bflex items-center\b[^"]*">.*?</div>', re.DOTALL)
# Layout tags carry no Markdown; inside <pre> they would break the code's indentation (FastChat drops them too).
_LAYOUT = re.compile(r"</?(?:div|span)\b[^>]*>", re.IGNORECASE)
_REGENERATE = re.compile(r"^\d+ / \d+")  # ShareGPT's "2 / 2" of a regenerated reply
_COPY_CHARS = re.compile(r"Copy\d+ chars / \d+ words")
_BLANK_LINES = re.compile(r"\n{3,}")


def looks_like_html(text: str) -> bool:
    """Scraped HTML, not Markdown: it opens with a block tag and has no ``` fence outside its <pre> blocks.

    Any tag anywhere is not enough (FastChat converts every turn): a converter would turn a Markdown
    reply about HTML or C++ into a mangled one (fences lost, `<int>` dropped, `a<b ... c>d` made bold).
    """
    if _HTML_START.match(text) is None:
        return False
    return "```" not in text or "```" not in _PRE.sub("", text)


def html_to_markdown(html: str) -> str:
    """ShareGPT's HTML as Markdown: code blocks fenced with their language, lists, tables, links.

    By html-to-markdown (a Rust converter, ~8x less CPU than markdownify over BeautifulSoup, which
    was 96% of clean's time). `_` and `*` are not escaped: the text is for a model to read, and
    `snake\\_case` is not how anyone writes; code keeps its characters either way. HTML the converter
    gives nothing for although it holds text (nested past its depth limit of ~1,000) is dropped, counted.
    """
    html = _SVG.sub("", html)
    html = _BUTTON.sub("", html)
    html = _CODE_BAR.sub("", html)
    html = _LAYOUT.sub("", html)
    convert = _markdown_converter()
    try:
        text = convert(html)
    except Exception as err:  # the converter's own errors (ConversionError and its kinds)
        raise Drop("html_not_converted", f"{type(err).__name__}: {err}") from None
    text = _REGENERATE.sub("", text.strip(), count=1)
    if "Copy" in text:  # the regexes scan every character; most replies have neither
        text = _COPY_CHARS.sub("", text)
    if "\n\n\n" in text:
        text = _BLANK_LINES.sub("\n\n", text)
    text = text.strip()
    if not text and _TAG.sub("", html).strip():
        raise Drop("html_not_converted", "the HTML holds text but converts to nothing (nested too deep?)")
    return text


_TAG = re.compile(r"<[^>]*>")
MARKDOWN_OPTIONS = dict(
    heading_style="atx", bullets="-", escape_asterisks=False, escape_underscores=False, escape_misc=False,
    autolinks=False, extract_metadata=False, hidden_content="all", code_block_style="backticks", compact_tables=True,
)  # fmt: skip


@functools.cache
def _markdown_converter():
    """`html -> Markdown` with the options built once per process: html-to-markdown's `convert` turns
    its Python options into the Rust ones on every call (~65 us, as long as converting a whole reply),
    so the Rust function is called with them prebuilt; through the public `convert` when a release
    lacks those names (same Markdown: a test compares the two)."""
    import html_to_markdown

    # preprocessing off: its presets drop navigation and form elements with their text.
    options = html_to_markdown.ConversionOptions(
        **MARKDOWN_OPTIONS, preprocessing=html_to_markdown.PreprocessingOptions(enabled=False)
    )
    try:
        from html_to_markdown import _html_to_markdown as native
        from html_to_markdown.api import _to_rust_conversion_options

        prebuilt = _to_rust_conversion_options(options)
        return lambda html: native.convert(html=html, options=prebuilt, visitor=None).content
    except (ImportError, AttributeError):
        return lambda html: html_to_markdown.convert(html, options).content


# ---- language --------------------------------------------------------------------------------------

_FENCED = re.compile(r"```.*?(?:```|$)", re.DOTALL)


def detect_language(turns: list[tuple[str, str]], limit: int = 2000) -> str:
    """The language of the user's words (code blocks left out), as py3langid tells it; the replies'
    when the user wrote nothing but code."""
    identifier = _language_identifier()
    for roles in ((HUMAN,), (HUMAN, GPT)):
        text, size = [], 0
        for role, value in turns:
            if role in roles:
                prose = _FENCED.sub(" ", value)
                text.append(prose)
                size += len(prose)
                if size >= limit:
                    break
        joined = " ".join(text)[:limit]
        if sum(c.isalpha() for c in joined) >= 8:
            return identifier.classify(joined)[0]
    return "und"  # undetermined: too few letters to tell


def check_languages(languages: tuple[str, ...]) -> None:
    """Refuse codes py3langid never returns (`english`, `EN`): they would drop every conversation."""
    known = set(_language_identifier().nb_classes) | {"und"}  # und: detect_language's "too few letters"
    unknown = [code for code in languages if code not in known]
    if unknown:
        raise VicunaflowError(
            f"--languages {', '.join(unknown)}: not a language code py3langid tells; languages are ISO 639-1 codes "
            f"such as en, de, zh (all: {' '.join(sorted(known))})"
        )


@functools.cache
def _language_identifier():
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError:
        raise VicunaflowError(
            "data clean --languages needs py3langid: pip install 'vicunaflow[data]' (or leave --languages out)"
        ) from None
    return LanguageIdentifier.from_model_file(MODEL_FILE)

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
4. HTML (by default in assistant turns only, where ShareGPT's dumps have it) -> Markdown by markdownify,
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
    check_output,
    content_digest,
    default_jobs,
    dumps,
    ordered_map,
    read_records,
    record_name,
)

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
    """
    data, output = Path(data), Path(output)
    report = Path(report) if report else output.with_name(output.name.removesuffix(".jsonl") + ".counts.tsv")
    jobs = jobs or default_jobs()
    log.info(
        "data clean: data=%s output=%s report=%s html=%s languages=%s jobs=%d",
        data, output, report, html, languages or "all", jobs,
    )  # fmt: skip
    check_output(output, data)
    options = CleanOptions(html=html, languages=tuple(languages or ()), language_text=language_text)
    if options.languages:
        _language_identifier()  # fail before any work when the extra is missing
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
    counts.write_tsv(report)
    log.info("data clean: %s; wrote %s and %s", counts.summary(), output, report)
    if not counts.get("kept", "conversations"):
        log.warning("data clean: %s: no conversation kept", data)
    return output


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
    if "id" in record:
        conversation_id = str(record["id"])
    else:
        conversation_id = where.replace(" ", "-")  # "line-13": stable for a given file
        edits.append("id_from_position")
    cleaned: dict = {"id": conversation_id}
    if system is not None:
        cleaned["system"] = system
    cleaned["conversations"] = [{"from": role, "value": text} for role, text in turns]
    return Result(
        name=name, id=conversation_id, line=dumps(cleaned), digest=content_digest(cleaned), edits=tuple(edits)
    )


def normalized_turns(record: object) -> tuple[str | None, list[tuple[str, str]]]:
    if not isinstance(record, dict):
        raise Drop("not_a_conversation", f"a JSON {type(record).__name__}, not an object")
    turns = record.get("conversations", record.get("messages"))
    if not isinstance(turns, list):
        raise Drop("not_a_conversation", "no 'conversations' list")
    system, normalized = record.get("system") if isinstance(record.get("system"), str) else None, []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise Drop("broken_turn", f"turn {i} is a JSON {type(turn).__name__}, not an object")
        raw_role = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        role = ROLES.get(raw_role.strip().lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise Drop("unknown_role", f"turn {i} has role {raw_role!r} (known: {', '.join(sorted(ROLES))})")
        if not isinstance(value, str):
            raise Drop("broken_turn", f"turn {i} ({raw_role}) has a {type(value).__name__} value, not a string")
        if role == SYSTEM:
            if normalized or system is not None:
                raise Drop("misplaced_system", f"turn {i} is a system turn after the conversation started")
            system = value
            continue
        normalized.append((role, value))
    return system, normalized


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
_LANGUAGE = re.compile(r"(?:^|\s)(?:language|lang)-([A-Za-z0-9_+#.-]+)")
_REGENERATE = re.compile(r"^\d+ / \d+")  # ShareGPT's "2 / 2" of a regenerated reply
_COPY_CHARS = re.compile(r"Copy\d+ chars / \d+ words")
_BLANK_LINES = re.compile(r"\n{3,}")


def looks_like_html(text: str) -> bool:
    """Scraped HTML, not Markdown: it opens with a block tag and has no ``` fence outside its <pre> blocks.

    Any tag anywhere is not enough (FastChat converts every turn): markdownify would turn a Markdown
    reply about HTML or C++ into a mangled one (fences lost, `<int>` dropped, `a<b ... c>d` made bold).
    """
    if _HTML_START.match(text) is None:
        return False
    return "```" not in text or "```" not in _PRE.sub("", text)


def html_to_markdown(html: str) -> str:
    """ShareGPT's HTML as Markdown: code blocks fenced with their language, lists, tables, links.

    Escaping of `_` and `*` is off: the text is for a model to read, and `snake\\_case` is not how
    anyone writes; code keeps its characters either way.
    """
    html = _SVG.sub("", html)
    html = _BUTTON.sub("", html)
    html = _CODE_BAR.sub("", html)
    html = _LAYOUT.sub("", html)
    text = _markdown_converter().convert(html)
    text = _REGENERATE.sub("", text.strip(), count=1)
    text = _COPY_CHARS.sub("", text)
    return _BLANK_LINES.sub("\n\n", text).strip()


MARKDOWNIFY_OPTIONS = dict(
    heading_style="ATX", bullets="-", escape_underscores=False, escape_asterisks=False
)  # fmt: skip
# The markdownify release whose MarkdownConverter.process_tag `_FastConverter` repeats; pinned in pyproject.
MARKDOWNIFY_TUNED = "1.2.3"


@functools.cache
def _markdown_converter():
    """One converter per process (markdownify() builds one per call: ~5% of the time, in dir() of its
    options), the tuned one when markdownify is the release it was written against."""
    from importlib.metadata import version

    options = {**MARKDOWNIFY_OPTIONS, "code_language_callback": _code_language}
    if version("markdownify") != MARKDOWNIFY_TUNED:
        log.info("markdownify %s (not %s): its own converter is used", version("markdownify"), MARKDOWNIFY_TUNED)
        return _fenced_converter_class()(**options)
    return _fast_converter_class()(**options)


_BACKTICKS = re.compile(r"`+")


@functools.cache
def _fenced_converter_class():
    """markdownify's MarkdownConverter, with code blocks fenced by more backticks than the code holds.

    Upstream always fences with ```: code that holds a ``` line (a Markdown snippet, a README)
    would close the block there. CommonMark's rule: a fence one backtick longer than the longest
    run of backticks inside.
    """
    from markdownify import MarkdownConverter

    class _FencedConverter(MarkdownConverter):
        def convert_pre(self, el, text, parent_tags):
            block = super().convert_pre(el, text, parent_tags)
            longest = max(map(len, _BACKTICKS.findall(text)), default=0)
            opening, closing = "\n\n```", "\n```\n\n"  # upstream's, around "<language>\n<code>"
            if longest < 3 or not (block.startswith(opening) and block.endswith(closing)):
                return block
            fence = "`" * (longest + 1)
            return "\n\n" + fence + block[len(opening) : -len(closing)] + "\n" + fence + "\n\n"

    return _FencedConverter


def _fast_converter_class():
    """`_FencedConverter` (markdownify 1.2.3's) with one change in process_tag, the same Markdown out.

    Upstream asks every element `node.name == 'pre' or node.find_parent('pre')` (a walk up the tree
    through bs4's filter machinery for each of ~13 elements a reply has: a fifth of all the time);
    `parent_tags`, which process_tag already carries down, holds the name of every ancestor, so
    `'pre' in parent_tags` is the same answer. The rest of the method is upstream's, as it is.
    """
    from bs4 import Comment, Doctype, NavigableString, Tag
    from markdownify import (
        re_extract_newlines,
        re_html_heading,
        should_remove_whitespace_inside,
        should_remove_whitespace_outside,
    )

    class _FastConverter(_fenced_converter_class()):
        def process_tag(self, node, parent_tags=None):
            if parent_tags is None:
                parent_tags = set()
            should_remove_inside = should_remove_whitespace_inside(node)

            def _can_ignore(el):
                if isinstance(el, Tag):
                    return False
                if isinstance(el, (Comment, Doctype)):
                    return True
                if isinstance(el, NavigableString):
                    if str(el).strip() != "":
                        return False
                    if should_remove_inside and (not el.previous_sibling or not el.next_sibling):
                        return True
                    previous, following = el.previous_sibling, el.next_sibling
                    return bool(
                        should_remove_whitespace_outside(previous) or should_remove_whitespace_outside(following)
                    )
                if el is None:
                    return True
                raise ValueError(f"Unexpected element type: {type(el)}")

            children_to_convert = [el for el in node.children if not _can_ignore(el)]
            parent_tags_for_children = set(parent_tags)
            parent_tags_for_children.add(node.name)
            if re_html_heading.match(node.name) is not None or node.name in {"td", "th"}:
                parent_tags_for_children.add("_inline")
            if node.name in {"pre", "code", "kbd", "samp"}:
                parent_tags_for_children.add("_noformat")
            child_strings = [
                self.process_element(el, parent_tags=parent_tags_for_children) for el in children_to_convert
            ]
            child_strings = [s for s in child_strings if s]
            if node.name == "pre" or "pre" in parent_tags:  # upstream: node.find_parent('pre')
                pass
            else:
                updated_child_strings = [""]
                for child_string in child_strings:
                    leading_nl, content, trailing_nl = re_extract_newlines.match(child_string).groups()
                    if updated_child_strings[-1] and leading_nl:
                        prev_trailing_nl = updated_child_strings.pop()
                        num_newlines = min(2, max(len(prev_trailing_nl), len(leading_nl)))
                        leading_nl = "\n" * num_newlines
                    updated_child_strings.extend([leading_nl, content, trailing_nl])
                child_strings = updated_child_strings
            text = "".join(child_strings)
            convert_fn = self.get_conv_fn_cached(node.name)
            if convert_fn is not None:
                text = convert_fn(node, text, parent_tags=parent_tags)
            return text

    return _FastConverter


def _code_language(pre) -> str:
    for element in (pre, pre.find("code")):
        if element is not None:
            match = _LANGUAGE.search(" ".join(element.get("class") or []))
            if match:
                return match.group(1)
    return ""


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


@functools.cache
def _language_identifier():
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError:
        raise VicunaflowError(
            "data clean --languages needs py3langid: pip install 'vicunaflow[data]' (or leave --languages out)"
        ) from None
    return LanguageIdentifier.from_model_file(MODEL_FILE)

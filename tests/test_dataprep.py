"""dataprep: data clean / mix / split / fetch, and the workflow's new DAG (data/raw -> clean -> split).

Split lengths are checked against `data tokenize`'s own encoding (the exact count a piece will have);
fetch runs against a Hugging Face Hub stand-in on 127.0.0.1, never the internet.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vicunaflow import VicunaflowError, data, template
from vicunaflow.dataprep import clean as clean_module
from vicunaflow.dataprep.clean import clean, html_to_markdown
from vicunaflow.dataprep.sources import fetch, mix
from vicunaflow.dataprep.split import PieceCounter, split

REPO = Path(__file__).resolve().parents[1]

SHAREGPT_HTML = (
    '<div class="markdown prose w-full break-words dark:prose-invert light"><p>Here is the <code>snake_case</code>'
    ' function:</p><pre><div class="bg-black mb-4 rounded-md"><div class="flex items-center relative text-gray-200'
    ' bg-gray-800 px-4 py-2 text-xs font-sans"><span class="">python</span><button class="flex ml-auto gap-2">'
    '<svg stroke="currentColor" fill="none"><path d="M16 4h2"></path></svg>Copy code</button></div>'
    '<div class="p-4 overflow-y-auto"><code class="!whitespace-pre hljs language-python"><span class="hljs-keyword">'
    'def</span> <span class="hljs-title function_">f</span>(<span class="hljs-params">x</span>):\n    '
    '<span class="hljs-keyword">return</span> x * <span class="hljs-number">2</span>\n</code></div></div></pre>'
    "<ol><li><p>first</p></li><li><p>second</p></li></ol></div>"
)


def turns(*values: str, roles=("human", "gpt")) -> list[dict]:
    return [{"from": roles[i % 2], "value": v} for i, v in enumerate(values)]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_counts(path: Path) -> dict[tuple[str, str], int]:
    rows = path.read_text().splitlines()
    assert rows[0] == "step\tkind\treason\tconversations\texamples"
    return {(r.split("\t")[1], r.split("\t")[2]): int(r.split("\t")[3]) for r in rows[1:]}


# ---- clean -------------------------------------------------------------------------------------------


def test_html_becomes_markdown_with_fenced_code_and_its_language() -> None:
    text = html_to_markdown(SHAREGPT_HTML)
    assert text == (
        "Here is the `snake_case` function:\n\n```python\ndef f(x):\n    return x * 2\n```\n\n1. first\n\n2. second"
    ), "items holding <p> are a loose list, as the Markdown ChatGPT wrote"
    assert html_to_markdown("<p>2 / 2</p><p>Answer</p>") == "Answer"  # ShareGPT's regenerate counter


HTML_CASES = [
    SHAREGPT_HTML,
    "<p>a <b> b </b>_c_ *d*</p><pre>x\n\n<b>y</b>\n  z</pre><pre><code class='language-js'>a\n</code></pre>tail",
    "<ul><li>a<ul><li>b <em>c</em></li></ul></li></ul><ol start='3'><li>x</li><li>y</li></ol>",
    "<table><tr><td>1</td><td>2</td></tr></table><h2>T</h2><blockquote><p>q</p></blockquote><br>t &amp; &lt;x&gt;",
    "vector<int> a<b and <p>para</p>\n\n\n<pre>  keep   spaces\n\n\n</pre><code>`x`</code>",
    "<pre><p>in</p><div>pre <i>x</i>\n\n</div>\n</pre><p>after <a href='u'>u</a> <a href='v'>w</a></p>",
]


@pytest.mark.parametrize("html", HTML_CASES)
def test_prebuilt_converter_gives_what_html_to_markdown_convert_gives(html: str) -> None:
    """The Rust function called with options built once == the library's public `convert` with them."""
    import html_to_markdown

    options = html_to_markdown.ConversionOptions(
        **clean_module.MARKDOWN_OPTIONS, preprocessing=html_to_markdown.PreprocessingOptions(enabled=False)
    )
    assert clean_module._markdown_converter()(html) == html_to_markdown.convert(html, options).content


def test_markdown_keeps_text_as_written_and_code_as_code() -> None:
    assert html_to_markdown("<p>snake_case and 2 * 3 * 4, [x](y)</p>") == "snake_case and 2 * 3 * 4, [x](y)"
    assert html_to_markdown("<pre><code class='language-sh'>a  b\n\tc &lt;d&gt;\n</code></pre>") == (
        "```sh\na  b\n\tc <d>\n```"
    )
    assert html_to_markdown("<table><tr><th>n</th><th>v</th></tr><tr><td>long name</td><td>1</td></tr></table>") == (
        "| n | v |\n| --- | --- |\n| long name | 1 |"
    ), "no padding: spaces are tokens"
    assert html_to_markdown("<div><nav>menu</nav><form>field</form><p>x</p></div>") == "menu\n\nfield\n\nx"
    assert html_to_markdown("<ol><li>a</li></ol><ol><li>b</li></ol>") == "1. a\n\n1) b", "two lists stay two"


def test_a_mix_of_zero_weights_and_jobs_below_one_are_refused(tmp_path: Path) -> None:
    """Bad input refused before anything is written: a mix that would hold nothing (it used to write an empty
    file and exit 0), and --jobs 0 or -3 (0 used to mean the default, -3 was taken as it was)."""
    sets = []
    for name in ("a", "b"):
        sets.append(tmp_path / f"{name}.jsonl")
        sets[-1].write_text(
            '{"id": "1", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}\n'
        )
    with pytest.raises(VicunaflowError, match=r"every weight is 0"):
        mix(data=sets, weights=[0, 0], output=tmp_path / "mixed.jsonl")
    assert not (tmp_path / "mixed.jsonl").exists()
    for jobs in (0, -3):
        with pytest.raises(VicunaflowError, match=f"--jobs {jobs}: must be at least 1"):
            clean(data=sets[0], output=tmp_path / "clean.jsonl", jobs=jobs)
        assert not (tmp_path / "clean.jsonl").exists()


def test_html_that_converts_to_nothing_is_dropped_and_counted(tmp_path: Path) -> None:
    deep = "<p>" + "<b>" * 3000 + "lost" + "</b>" * 3000 + "</p>"
    records = [{"id": "deep", "conversations": turns("q", deep)}, {"id": "ok", "conversations": turns("q", "<p>a</p>")}]
    out = clean(data=write_jsonl(tmp_path / "in.jsonl", records), output=tmp_path / "out.jsonl", jobs=1)
    assert [r["id"] for r in read_jsonl(out)] == ["ok"]
    assert read_counts(tmp_path / "out.counts.tsv")[("drop", "html_not_converted")] == 1


# Already-Markdown replies (ShareGPT_V3_unfiltered_cleaned_split.json) that show tags, templates, comparisons.
MARKDOWN_REPLIES = {
    "html-about-html": 'Use the `<p>` tag:\n```html\n<p class="intro">Hello</p>\n<ul><li>one</li></ul>\n```\n'
    "and Java's List<String>",
    "cpp": "std::vector<int> v; if a<b and c>d",
    "comparisons": "x <b and y> z; <br> is a void element, <em>this</em> is emphasis; `<div>` wraps",
    "tag-first": "<div> is a block element:\n\n```html\n<div><p>text</p></div>\n```",
}


def test_markdown_replies_are_kept_byte_for_byte_and_scraped_html_is_still_converted(tmp_path: Path) -> None:
    records = [{"id": k, "conversations": turns("Explain.", v)} for k, v in MARKDOWN_REPLIES.items()]
    records += [
        {"id": "html", "conversations": turns("Write f.", SHAREGPT_HTML)},
        {"id": "p", "conversations": turns("Hi", "\n <p>Hello <strong>there</strong></p><ul><li>a</li></ul>")},
        {
            "id": "md-in-pre",
            "conversations": turns(
                "A README?", '<div><pre><code class="language-md">a\n```\nb</code></pre><p>done</p></div>'
            ),
        },
    ]
    out = clean(data=write_jsonl(tmp_path / "in.jsonl", records), output=tmp_path / "out.jsonl", jobs=1)
    replies = {r["id"]: r["conversations"][1]["value"] for r in read_jsonl(out)}
    for name, text in MARKDOWN_REPLIES.items():
        assert replies[name] == text, name
    assert replies["html"] == html_to_markdown(SHAREGPT_HTML) and replies["html"].startswith("Here is the `snake_case`")
    assert replies["p"] == "Hello **there**\n\n- a"
    assert replies["md-in-pre"] == "````md\na\n```\nb\n````\n\ndone"
    assert read_counts(tmp_path / "out.counts.tsv")[("edit", "html_to_markdown")] == 3


def test_a_code_block_holding_backtick_fences_gets_a_longer_fence() -> None:
    """CommonMark: a fence one backtick longer than the longest run in the code, so the code's ``` stays code."""
    assert html_to_markdown('<pre><code class="language-md">a\n```\nb</code></pre><p>done</p>') == (
        "````md\na\n```\nb\n````\n\ndone"
    )
    assert html_to_markdown("<pre><code>x ````` y</code></pre>") == "``````\nx ````` y\n``````"
    assert html_to_markdown("<pre><code>`a` and ``b``</code></pre>") == "```\n`a` and ``b``\n```"


DIRTY = [
    {"id": "html", "conversations": turns("Write f.", SHAREGPT_HTML)},
    {
        "id": "roles",
        "conversations": [
            {"from": "system", "value": "You are terse."},
            {"from": "User", "value": "vector<int> v; is it ok?"},
            {"from": "chatgpt", "value": "Yes."},
            {"from": "user", "value": "And bing?"},
            {"from": "bing", "value": "<p>Also <strong>yes</strong>.</p>"},
            {"from": "human", "value": "bard?"},
            {"from": "bard", "value": "Fine."},
            {"from": "human", "value": "no reply to this one"},
        ],
    },
    {"id": "messages", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"id": "gpt-first", "conversations": turns("I start.", "Question?", "Answer.", roles=("gpt", "human"))},
    {"id": "empty-reply", "conversations": turns("q1", "a1", "q2", "   ", "q3", "a3")},
    {"id": "html", "conversations": turns("Write f.", SHAREGPT_HTML)},  # exact duplicate
    {"id": "html-copy", "conversations": turns("Write f.", SHAREGPT_HTML)},  # same content, other id
    {"id": "roles", "conversations": turns("other", "content")},  # same id, other content
    {"id": "tool", "conversations": [*turns("q", "a"), {"from": "tool", "value": "{}"}]},
    {"id": "late-system", "conversations": [*turns("q", "a"), {"from": "system", "value": "x"}]},
    {"id": "twice", "conversations": turns("q", "q again", roles=("human", "human"))},
    {"id": "number", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]},
    {"id": "only-empty", "conversations": turns("", "a")},
    ["not", "a", "record"],
    {"id": "no-turns"},
    {"conversations": turns("no id", "kept")},
]


def test_clean_normalises_roles_converts_html_and_counts_every_drop(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "dirty.jsonl", DIRTY)
    with open(source, "ab") as f:
        f.write(b'{"id": "latin1", "conversations": [{"from": "human", "value": "caf\xe9"}]}\n')
        f.write(b'{"id": "cut", "conversations": [\n')
    out = clean(data=source, output=tmp_path / "clean.jsonl", jobs=1)
    kept = {r["id"]: r for r in read_jsonl(out)}
    assert list(kept) == ["html", "roles", "messages", "gpt-first", "empty-reply", "line-16"]
    assert kept["html"]["conversations"][1]["value"].startswith("Here is the `snake_case` function:\n\n```python\n")
    assert kept["roles"] == {
        "id": "roles",
        "system": "You are terse.",
        "conversations": turns("vector<int> v; is it ok?", "Yes.", "And bing?", "Also **yes**.", "bard?", "Fine."),
    }, "plain text with `<` is not HTML; the last user turn has no reply"
    assert kept["messages"]["conversations"] == turns("hi", "hello")
    assert kept["gpt-first"]["conversations"] == turns("Question?", "Answer.")
    assert kept["empty-reply"]["conversations"] == turns("q1", "a1"), "cut at the empty turn"
    counts = read_counts(tmp_path / "clean.counts.tsv")
    assert counts[("read", "conversations")] == 18 and counts[("kept", "conversations")] == 6
    assert {reason: n for (kind, reason), n in counts.items() if kind == "drop"} == {
        "duplicate": 2,
        "duplicate_id": 1,
        "unknown_role": 1,
        "misplaced_system": 1,
        "roles_not_alternating": 1,
        "broken_turn": 1,
        "no_exchange": 1,
        "not_a_conversation": 2,
        "invalid_utf8": 1,
        "invalid_json": 1,
    }
    assert counts[("edit", "html_to_markdown")] == 4  # html twice kept-or-duplicate, html-copy, roles
    tsv = (tmp_path / "clean.counts.tsv").read_text()
    assert "\tinvalid_utf8\t1\trecord at line 17" in tsv and "\tunknown_role\t1\trecord 'tool' (line 9)" in tsv


def test_null_and_empty_ids_are_missing_ids_not_one_shared_id(tiny_hf, tmp_path: Path) -> None:
    """Taken as text, every null id was "None" (every empty one ""): clean kept the first such conversation and dropped
    the rest as duplicate_id, exiting 0. They are treated as records without an id: given one from their position."""
    records = [{"id": None, "conversations": turns(f"question {i}", f"answer {i}")} for i in range(4)]
    records += [{"id": "", "conversations": turns("q", "a")}, {"id": "  ", "conversations": turns("q2", "a2")}]
    records += [{"conversations": turns("q3", "a3")}, {"id": 0, "conversations": turns("q4", "a4")}]
    source = tmp_path / "in.json"
    source.write_text(json.dumps(records))
    out = clean(data=source, output=tmp_path / "c.jsonl", jobs=1)
    assert [r["id"] for r in read_jsonl(out)] == [f"index-{i}" for i in range(7)] + ["0"]
    counts = read_counts(tmp_path / "c.counts.tsv")
    assert counts[("kept", "conversations")] == 8 and counts[("edit", "id_from_position")] == 7
    assert not [kind for kind, _ in counts if kind == "drop"]
    # split, which takes only records with an id, drops them as it drops records without one
    split(data=source, model_path=tiny_hf, output=tmp_path / "s.jsonl", jobs=1)
    assert [r["id"] for r in read_jsonl(tmp_path / "s.jsonl")] == ["0"]
    assert read_counts(tmp_path / "s.counts.tsv")[("drop", "no_id")] == 7


def test_drops_name_json_types_as_json_calls_them(tmp_path: Path, caplog) -> None:
    """A null value was "a NoneType value", a number "a int value", a missing value also "a NoneType value"."""
    records = [
        {"id": "null", "conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "a"}]},
        {"id": "number", "conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "a"}]},
        {"id": "none", "conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]},
        {"id": "list", "conversations": [["human", "q"], {"from": "gpt", "value": "a"}]},
        7,
        {"id": "ok", "conversations": turns("q", "a")},
    ]
    clean(data=write_jsonl(tmp_path / "in.jsonl", records), output=tmp_path / "out.jsonl", jobs=1)
    for expected in ("'null' (line 1): dropped (broken_turn): turn 0 (human) value is null, not a string",
                     "'number' (line 2): dropped (broken_turn): turn 0 (human) value is a number, not a string",
                     "'none' (line 3): dropped (broken_turn): turn 0 (human) has no value",
                     "'list' (line 4): dropped (broken_turn): turn 0 is an array, not an object",
                     "record at line 5: dropped (not_a_conversation): a number, not an object"):  # fmt: skip
        assert expected in caplog.text, expected


def test_clean_is_deterministic_across_worker_counts_and_reads_json_arrays(tmp_path: Path) -> None:
    records = [r for r in DIRTY if isinstance(r, dict)] * 3
    array = tmp_path / "dirty.json"
    array.write_text(json.dumps(records, indent=2))
    one = clean(data=array, output=tmp_path / "one.jsonl", jobs=1)
    two = clean(data=array, output=tmp_path / "two.jsonl", jobs=2)
    assert one.read_bytes() == two.read_bytes()
    assert (tmp_path / "one.counts.tsv").read_bytes() == (tmp_path / "two.counts.tsv").read_bytes()
    assert [r["id"] for r in read_jsonl(one)] == ["html", "roles", "messages", "gpt-first", "empty-reply", "index-14"]


def test_clean_over_worker_processes_keeps_input_order_across_many_batches(tmp_path: Path, monkeypatch) -> None:
    """Batches finish out of order (heavy HTML first, then plain text); the output is still in input order
    and byte for byte what one process writes."""
    monkeypatch.setattr(clean_module, "BATCH", 4)  # batches are cut in this process
    heavy = SHAREGPT_HTML.replace("<ol>", "<ol>" + "<li><p>item <b>x</b></p></li>" * 300)
    records = [{"id": f"r{i}", "conversations": turns(f"q{i}", heavy if i < 16 else f"a{i}")} for i in range(120)]
    source = write_jsonl(tmp_path / "many.jsonl", records)
    one = clean(data=source, output=tmp_path / "one.jsonl", jobs=1)
    two = clean(data=source, output=tmp_path / "two.jsonl", jobs=2)
    assert [r["id"] for r in read_jsonl(two)] == [f"r{i}" for i in range(120)]
    assert one.read_bytes() == two.read_bytes()
    assert (tmp_path / "one.counts.tsv").read_bytes() == (tmp_path / "two.counts.tsv").read_bytes()


def test_invalid_utf8_in_a_json_array_names_the_record_and_leaves_no_output(tmp_path: Path) -> None:
    array = tmp_path / "bad.json"
    good = json.dumps({"id": "first", "conversations": turns("q", "a")})
    array.write_bytes(
        b"[" + good.encode() + b',{"id": "second", "conversations": [{"from": "human", "value": "\xff"}]}]'
    )
    output = tmp_path / "clean.jsonl"
    with pytest.raises(
        VicunaflowError, match=r"bad\.json: invalid UTF-8 near byte \d+, after record index 0 \(id 'first'\)"
    ):
        clean(data=array, output=output, jobs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"], "no output, no temporary left"
    (tmp_path / "text.txt").write_text("hello")
    with pytest.raises(VicunaflowError, match="neither a JSON array nor JSON Lines"):
        clean(data=tmp_path / "text.txt", output=output, jobs=1)
    (tmp_path / "object.json").write_text(json.dumps({"meta": 1, "rows": []}, indent=2))  # had passed, all "dropped"
    with pytest.raises(VicunaflowError, match=r"one JSON object \(keys 'meta', 'rows'\).*jq '\.\[\"rows\"\]'"):
        clean(data=tmp_path / "object.json", output=output, jobs=1)
    assert not output.exists()
    with pytest.raises(VicunaflowError, match="it is the input"):
        clean(data=array, output=array, jobs=1)


@pytest.mark.parametrize(
    ("name", "pack", "message"),
    [
        ("sg.json", "gzip", r"sg\.json: gzip-compressed, not JSON text; decompress it first: gzip -dc \S*sg\.json > \S*sg\.plain\.json"),
        ("sg.json.gz", "gzip", r"sg\.json\.gz: gzip-compressed, .*: gzip -dc \S*sg\.json\.gz > \S*sg\.json$"),
        ("sg.json", "utf-16", r"sg\.json: not UTF-8 but UTF-16 or UTF-32 \(byte 0: 0xff\); convert it: iconv -f utf-16"),
    ],
)  # fmt: skip
def test_a_compressed_or_utf16_file_is_named_with_the_command_that_makes_it_readable(name, pack, message, tmp_path):
    """clean and split said `starts with b'\\x1f'`, tokenize called a gzip file UTF-16 (a NUL at its byte 3)."""
    import gzip

    text = json.dumps([{"id": "a", "conversations": turns("q", "a")}])
    source = tmp_path / name
    source.write_bytes(gzip.compress(text.encode()) if pack == "gzip" else text.encode("utf-16"))
    with pytest.raises(VicunaflowError, match=message):
        clean(data=source, output=tmp_path / "c.jsonl", jobs=1)
    with pytest.raises(VicunaflowError, match=message):
        data.load_conversations(source)  # data tokenize, preview and eval loss
    assert sorted(p.name for p in tmp_path.iterdir()) == [name], "nothing written"


def test_a_parquet_file_is_named_as_parquet_with_a_conversion_that_works(tmp_path: Path) -> None:
    """A Hub dataset's Parquet file was "not UTF-8 but UTF-16 or UTF-32", with an iconv command that cannot help."""
    source = tmp_path / "train-00000-of-00001.parquet"
    source.write_bytes(b"PAR1\x15\x04\x15\x00" + b"\x00" * 20 + b"PAR1")
    message = r"train-00000-of-00001\.parquet: an Apache Parquet file, not JSON text; convert it to JSON Lines first"
    with pytest.raises(VicunaflowError, match=message) as refused:
        clean(data=source, output=tmp_path / "c.jsonl", jobs=1)
    assert "UTF-16" not in str(refused.value) and "iconv" not in str(refused.value)
    with pytest.raises(VicunaflowError, match=message):
        data.load_conversations(source)  # data tokenize, preview and eval loss
    assert sorted(p.name for p in tmp_path.iterdir()) == [source.name], "nothing written"
    # the pandas command the error gives turns a real Parquet file into JSON Lines that clean reads
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("pandas")
    pq.write_table(pa.Table.from_pylist([{"id": "a", "conversations": turns("hi\u2028there", "hello")}]), source)
    with pytest.raises(VicunaflowError) as refused:
        clean(data=source, output=tmp_path / "c.jsonl", jobs=1)
    command = re.search(r'python -c "(.*?)"', str(refused.value))[1]
    subprocess.run([sys.executable, "-c", command], check=True, cwd=tmp_path)
    cleaned = clean(data=tmp_path / "train-00000-of-00001.jsonl", output=tmp_path / "c.jsonl", jobs=1)
    assert read_jsonl(cleaned) == [{"id": "a", "conversations": turns("hi\u2028there", "hello")}]


def test_unicode_line_separators_pass_clean_split_and_tokenize(tiny_hf, tmp_path: Path) -> None:
    """clean and split wrote U+2028, U+2029 and U+0085 raw (valid in JSON strings); tokenize split lines there and
    failed on the workflow's own files. They are written escaped now, and read back as the same text."""
    texts = ["Line one\u2028line two?", "fine\u0085thanks", "para\u2029graph"]
    source = tmp_path / "sg.json"
    source.write_text(json.dumps([{"id": f"r{i}", "conversations": turns(t, t)} for i, t in enumerate(texts)]))
    cleaned = clean(data=source, output=tmp_path / "c.jsonl", jobs=1)
    pieces = split(data=cleaned, model_path=tiny_hf, output=tmp_path / "s.jsonl", model_max_length=512, jobs=1)
    for written in (cleaned, pieces):
        raw = written.read_bytes()
        assert not {"\u2028", "\u2029", "\u0085"} & set(raw.decode()), "escaped, one record per line for any reader"
        assert raw.count(b"\n") == 3 and b"\\u2028" in raw
        assert [r["conversations"][0]["value"] for r in read_jsonl(written)] == texts
    tokenized = data.tokenize(data=pieces, model_path=tiny_hf, output_dir=tmp_path / "tok")
    assert json.loads((tokenized / "meta.json").read_text())["ids"] == ["r0", "r1", "r2"]


def test_language_filter_keeps_only_the_languages_asked_for(tmp_path: Path) -> None:
    pytest.importorskip("py3langid")
    records = [
        {"id": "en", "conversations": turns("How do I sort a list in Python, please?", "Use sorted().")},
        {"id": "de", "conversations": turns("Wie sortiere ich eine Liste in Python, bitte?", "Mit sorted().")},
        {"id": "zh", "conversations": turns("请问如何在Python中对列表进行排序？", "使用 sorted()。")},
        {"id": "code", "conversations": turns("```\nx = [3, 1]\n```", "Call sorted(x) to get a new sorted list back.")},
    ]
    out = clean(data=write_jsonl(tmp_path / "l.jsonl", records), output=tmp_path / "o.jsonl", languages=["en"], jobs=1)
    assert [r["id"] for r in read_jsonl(out)] == ["en", "code"]
    counts = read_counts(tmp_path / "o.counts.tsv")
    assert counts[("drop", "language:de")] == 1 and counts[("drop", "language:zh")] == 1


@pytest.mark.parametrize(
    "options, message",
    [
        (["--languages", "[en, english]"], "--languages english: not a language code py3langid tells; languages are "
                                           "ISO 639-1 codes such as en"),
        (["--languages", "[en]", "--language-text", "0"], "--language-text 0: give a positive number of characters"),
        (["--languages", "[de]"], "--languages de kept no conversation (py3langid found: en 1); give the languages "
                                  "wanted, as ISO 639-1 codes such as en, or leave --languages out"),
        ([], "no conversation kept (read 1, kept 0; dropped: no_exchange 1); each needs a user turn with a reply"),
    ],
)  # fmt: skip
def test_clean_that_keeps_nothing_fails_naming_the_filter(options, message, tmp_path: Path, capsys) -> None:
    """An empty dataset is an error (exit 1, nothing written), not a warning after an exit 0; codes py3langid never
    returns and a zero --language-text are refused before any work."""
    from vicunaflow import cli

    pytest.importorskip("py3langid")
    english = turns("How do I sort a list in Python, please?", "Use sorted().")
    records = [{"id": "en", "conversations": english if options else english[:1]}]
    data = write_jsonl(tmp_path / "l.jsonl", records)
    with pytest.raises(SystemExit) as exit:
        cli.main(["data", "clean", "--data", str(data), "--output", str(tmp_path / "o.jsonl"), "--jobs", "1", *options])
    assert exit.value.code == 1
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.jsonl"], "no output, no report"


@pytest.mark.parametrize("verb", ["data tokenize", "data split", "data clean"])
def test_a_folder_or_a_file_in_the_wrong_place_is_named_as_such(verb, tiny_hf, tmp_path: Path, capsys) -> None:
    """A folder given as the data is not "no such data file"; a model's config.json given as the model is not "no
    such model directory", and is refused before any work."""
    from vicunaflow import cli

    folder, data = tmp_path / "folder", write_jsonl(tmp_path / "c.jsonl", DIRTY[:1])
    folder.mkdir()
    argv, expected = {
        "data tokenize": (["--data", folder, "--model-path", tiny_hf, "--output-dir", tmp_path / "tok"],
                          f"{folder} is a folder, not a data file; give a JSON list or JSONL file of ShareGPT"),
        "data split": (["--data", data, "--model-path", tiny_hf / "config.json", "--output", tmp_path / "s.jsonl"],
                       f"{tiny_hf / 'config.json'} is a file, not a model directory; give the folder that holds it "
                       f"({tiny_hf})"),
        "data clean": (["--data", folder, "--output", tmp_path / "o.jsonl"],
                       f"{folder} is a folder, not a data file; give a JSON array or JSONL file of ShareGPT"),
    }[verb]  # fmt: skip
    with pytest.raises(SystemExit) as exit:
        cli.main([*verb.split(), *map(str, argv)])
    assert exit.value.code == 1
    assert expected in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "folder"], "nothing written"


def test_language_filter_without_the_extra_says_what_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "py3langid", None)
    monkeypatch.setitem(sys.modules, "py3langid.langid", None)
    clean_module._language_identifier.cache_clear()
    try:
        with pytest.raises(VicunaflowError, match=r"pip install 'vicunaflow\[data\]'"):
            clean(data=write_jsonl(tmp_path / "l.jsonl", DIRTY[:1]), output=tmp_path / "o.jsonl", languages=["en"])
    finally:
        clean_module._language_identifier.cache_clear()
    assert not (tmp_path / "o.jsonl").exists()


# ---- split ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_hf):
    return data.load_tokenizer(tiny_hf)


def long_conversations() -> list[dict]:
    """Conversations of 1 to 12 exchanges of very different lengths (deterministic), spaces and
    newlines at the edges of turns included (where tokenisation across boundaries could differ)."""
    words = ["the", "model", "answers", "questions", "about", "code", "data", "and", "training", "in", "detail"]
    records = []
    for c in range(40):
        values = []
        for t in range(2 * (1 + c % 12)):
            n = 1 + (c * 7 + t * 13) % 60
            text = " ".join(words[(c + t + k) % len(words)] for k in range(n))
            values.append(text + ("  " if t % 5 == 0 else "") + ("\n" if t % 7 == 3 else ""))
        records.append({"id": f"c{c}", "conversations": turns(*values)})
    records.append({"id": "huge", "conversations": turns("short", "word " * 400, "next?", "fine.")})
    records.append({"id": "all-huge", "conversations": turns("word " * 400, "x")})
    return records


def exact_length(tokenizer, piece: dict) -> int:
    pairs = [(template.ROLE_OF[t["from"]], t["value"]) for t in piece["conversations"]]
    return len(data.encode(data.ConversationRecord(piece["id"], pairs), tokenizer, 10**9).input_ids)


def test_split_pieces_fit_exactly_start_with_the_user_and_lose_no_reply(tiny_hf, tokenizer, tmp_path: Path) -> None:
    records = long_conversations()
    source = write_jsonl(tmp_path / "clean.jsonl", records)
    limit = 200
    out = split(data=source, model_path=tiny_hf, output=tmp_path / "split.jsonl", model_max_length=limit, jobs=1)
    pieces = read_jsonl(out)
    for piece in pieces:
        assert piece["tokens"] == exact_length(tokenizer, piece) <= limit, piece["id"]
        assert piece["conversations"][0]["from"] == "human" and piece["conversations"][-1]["from"] == "gpt"
    by_parent: dict[str, list[dict]] = {}
    for piece in pieces:
        by_parent.setdefault(piece.get("parent", piece["id"]), []).append(piece)
    dropped_exchanges = 0
    for record in records[:-2]:
        got = by_parent.get(record["id"], [])
        pairs = [record["conversations"][i : i + 2] for i in range(0, len(record["conversations"]), 2)]
        too_long = [p for p in pairs if exact_length(tokenizer, {"id": "x", "conversations": p}) > limit]
        kept = [t for p in pairs if p not in too_long for t in p]
        assert [t for p in got for t in p["conversations"]] == kept, "every turn that fits, in order"
        dropped_exchanges += len(too_long)
        if len(got) > 1:
            assert [p["id"] for p in got] == [f"{record['id']}_{k}" for k in range(len(got))]
            assert {(p["part"], p["parts"]) for p in got} == {(k, len(got)) for k in range(len(got))}
            # greedy and exact: the next exchange would not have fitted
            for first, second in itertools.pairwise(got if not too_long else []):
                grown = {"id": "x", "conversations": first["conversations"] + second["conversations"][:2]}
                assert exact_length(tokenizer, grown) > limit
    assert any(len(g) > 1 for g in by_parent.values()) and any(len(g) == 1 for g in by_parent.values())
    assert [p["conversations"] for p in by_parent["huge"]] == [turns("next?", "fine.")]
    assert by_parent["huge"][0]["id"] == "huge_0", "a piece with an exchange dropped says so in its id"
    assert "all-huge" not in by_parent
    counts = read_counts(tmp_path / "split.counts.tsv")
    assert counts[("drop", "too_long")] == 1
    assert counts[("edit", "exchange_longer_than_limit_dropped")] == dropped_exchanges + 2
    assert counts[("kept", "pieces")] == len(pieces)
    # what the split promises, data tokenize sees: nothing truncated
    tokenized = data.tokenize(data=out, model_path=tiny_hf, output_dir=tmp_path / "tok", model_max_length=limit)
    meta = json.loads((tokenized / "meta.json").read_text())
    assert meta["n_samples"] == len(pieces) and meta["n_tokens"] == sum(p["tokens"] for p in pieces)


def test_split_without_a_separable_eos_tokenises_whole_pieces_with_the_same_result(tokenizer) -> None:
    counter = PieceCounter(tokenizer)
    conversations = [(None, [(t["from"], t["value"]) for t in r["conversations"]]) for r in long_conversations()] + [
        ("A custom and much longer system prompt. " * 3, [("human", "q " * 30), ("gpt", "a " * 30)] * 4)
    ]
    fast = counter.split_all(conversations, 150)
    counter.separable = False
    assert counter.split_all(conversations, 150) == fast


TRICKY_TEXTS = [
    "USER: hi ASSISTANT: hello",
    "  leading and trailing spaces  ",
    "runs   of    spaces\tand\ttabs\n\n    indented code\n",
    "▁already ▁marked▁ text",
    "ünïcödé, 日本語, emoji 😀🚀 and a NUL \x00 byte",
    "a</s>b and <s> and <unk> written in a turn",
    " ",
    "x",
]


def test_word_by_word_lengths_are_the_tokenizers_own(tokenizer) -> None:
    """The fast count (each word tokenised once, summed) is what tokenising each text whole gives."""
    counter = PieceCounter(tokenizer)
    assert counter.words is not None, "the tiny LLaMA tokenizer qualifies"
    texts = TRICKY_TEXTS + [f"{template.EOS}{t}{template.EOS}" for t in TRICKY_TEXTS] + [template.EOS, ""]
    texts += [" ".join(r["conversations"][1]["value"] for r in long_conversations()[:5])]
    for special in (False, True):
        assert counter.words.lengths(texts, special) == counter.exact_lengths(texts, special)
    counter.words.CACHE_WORDS = 3  # forgotten and learnt again, batch by batch: the same counts
    for special in (False, True):
        assert counter.words.lengths(texts, special) == counter.exact_lengths(texts, special)


def test_word_by_word_counting_is_refused_where_a_word_could_join_the_next(tokenizer) -> None:
    from tokenizers import Tokenizer, pre_tokenizers

    config = json.loads(tokenizer.backend_tokenizer.to_str())
    config["model"]["vocab"]["d▁t"] = len(config["model"]["vocab"])  # a token across a space
    assert PieceCounter.from_backend(json.dumps(config), separable=True).words is None
    metaspace = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    metaspace.normalizer = None
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    assert PieceCounter.from_backend(metaspace.to_str(), separable=True).words is None


def test_split_over_worker_processes_gives_the_bytes_of_one_process_in_input_order(
    tiny_hf, tmp_path: Path, monkeypatch
) -> None:
    from vicunaflow.dataprep import split as split_module

    monkeypatch.setattr(split_module, "BATCH", 5)
    records = [dict(r, id=f"{i:03d}-{r['id']}") for i, r in enumerate(long_conversations() * 2)]
    source = write_jsonl(tmp_path / "c.jsonl", records)
    for name, jobs in (("one", 1), ("two", 2)):
        split(data=source, model_path=tiny_hf, output=tmp_path / f"{name}.jsonl", model_max_length=150, jobs=jobs)
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "two.jsonl").read_bytes()
    assert (tmp_path / "one.counts.tsv").read_bytes() == (tmp_path / "two.counts.tsv").read_bytes()
    parents = [p.get("parent", p["id"]) for p in read_jsonl(tmp_path / "two.jsonl")]
    assert parents == sorted(parents) and len(set(parents)) > 70, "in input order (ids start with it)"


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([], r"e\.jsonl: no conversation in it; give a JSON array or JSONL of ShareGPT conversations$"),
        ([{"conversations": turns("q", "a")}, {"id": "x", "conversations": "hi"}],
         r"no conversation is left to train on \(read 2, kept 0; dropped: no_id 1, not_a_conversation 1\); give "
         r"conversations with an id and a user turn with a reply \(`vicunaflow data clean` makes them\)$"),
    ],
)  # fmt: skip
def test_split_that_keeps_nothing_names_the_fix_for_what_dropped_it(records, message, tiny_hf, tmp_path) -> None:
    """The error always said "raise --model-max-length or lower --held-out-fraction", even for an empty file or
    records without ids, where neither helps."""
    source = write_jsonl(tmp_path / "e.jsonl", records)
    with pytest.raises(VicunaflowError, match=message):
        split(data=source, model_path=tiny_hf, output=tmp_path / "s.jsonl", jobs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.jsonl"], "nothing written"


@pytest.mark.parametrize(
    ("suffix", "first", "second"), [(".jsonl", "line 2", "line 4"), (".json", "index 1", "index 3")]
)
@pytest.mark.parametrize("jobs", [1, 2])
def test_split_refuses_an_id_given_twice_naming_both_and_the_clean_that_fixes_it(
    suffix, first, second, jobs, tiny_hf, tmp_path, monkeypatch
) -> None:
    """Two conversations under one id went through split silently: both trained on, their pieces sharing ids
    (`<id>_0` twice) that tokenize's samples and eval loss name. 7 and "7" are one id (ids are text downstream)."""
    from vicunaflow.dataprep import split as split_module

    monkeypatch.setattr(split_module, "BATCH", 2)  # the repeat is read after a batch went to the workers
    records = [{"id": f"c{i}", "conversations": turns(f"question {i}", f"answer {i}")} for i in range(6)]
    records[1]["id"], records[3]["id"] = 7, "7"
    records[2] = dict(records[2], conversations=records[1]["conversations"])  # an exact repeat too, other id
    source = tmp_path / f"raw{suffix}"
    write_jsonl(source, records) if suffix == ".jsonl" else source.write_text(json.dumps(records))
    with pytest.raises(VicunaflowError) as refused:
        split(data=source, model_path=tiny_hf, output=tmp_path / "s.jsonl", held_out_fraction=0.5, jobs=jobs)
    cleaned = tmp_path / "raw.clean.jsonl"
    assert str(refused.value) == (
        f"{source}: id '7' at {first} and again at {second}; each conversation needs an id of its own: run "
        f"`vicunaflow data clean --data {source} --output {cleaned}` first (it keeps the first conversation of "
        "each id), or give the repeated one another id"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [source.name], "nothing written"
    clean(data=source, output=cleaned, jobs=1)  # the fix the error names
    split(data=cleaned, model_path=tiny_hf, output=tmp_path / "s.jsonl", held_out_fraction=0.5, jobs=jobs)
    pieces = read_jsonl(tmp_path / "s.jsonl") + read_jsonl(tmp_path / "s.heldout.jsonl")
    assert sorted(p["id"] for p in pieces) == ["7", "c0", "c4", "c5"]


def test_held_out_is_deterministic_whole_conversations_and_roughly_the_fraction(tiny_hf, tmp_path: Path) -> None:
    records = [{"id": f"r{i}", "conversations": turns(f"question {i}", f"answer {i}")} for i in range(400)]
    records += long_conversations()[:12]
    source = write_jsonl(tmp_path / "c.jsonl", records)
    runs = []
    for name, jobs in (("a", 1), ("b", 2)):  # in this process, and over two worker processes
        split(data=source, model_path=tiny_hf, output=tmp_path / f"{name}.jsonl", model_max_length=120,
              held_out_fraction=0.25, jobs=jobs)  # fmt: skip
        runs.append(((tmp_path / f"{name}.jsonl").read_bytes(), (tmp_path / f"{name}.heldout.jsonl").read_bytes()))
    assert runs[0] == runs[1], "same input, same bytes"
    assert (tmp_path / "a.counts.tsv").read_bytes() == (tmp_path / "b.counts.tsv").read_bytes()
    train = read_jsonl(tmp_path / "a.jsonl")
    held = read_jsonl(tmp_path / "a.heldout.jsonl")
    parents = lambda pieces: {p.get("parent", p["id"]) for p in pieces}  # noqa: E731
    assert not parents(train) & parents(held), "a conversation is on one side only"
    assert 0.18 < len(parents(held)) / len(records) < 0.32
    split(data=source, model_path=tiny_hf, output=tmp_path / "c2.jsonl", model_max_length=120,
          held_out_fraction=0.25, seed="other", jobs=1)  # fmt: skip
    assert parents(read_jsonl(tmp_path / "c2.heldout.jsonl")) != parents(held)
    split(
        data=source, model_path=tiny_hf, output=tmp_path / "none.jsonl", held_out=tmp_path / "none.held.jsonl", jobs=1
    )
    assert (tmp_path / "none.held.jsonl").read_bytes() == b""
    with pytest.raises(VicunaflowError, match="held_out_fraction 1"):
        split(data=source, model_path=tiny_hf, output=tmp_path / "x.jsonl", held_out_fraction=1)


# ---- mix -----------------------------------------------------------------------------------------------


def fastchat_pieces(chats: int, prefix: str = "chat") -> list[dict]:
    """FastChat's split_long_conversation.py output: chat c as `<id>_0` (turns 0-7) and `<id>_8` (turns 8-15)."""
    return [
        {
            "id": f"{prefix}{c}_{start}",
            "model": "",
            "conversations": turns(*(f"chat {c} turn {start + k}" for k in range(8))),
        }
        for c in range(chats)
        for start in (0, 8)
    ]


def test_held_out_keeps_fastchats_pieces_of_one_chat_on_one_side(tiny_hf, tmp_path: Path) -> None:
    """ShareGPT_V3_unfiltered_cleaned_split.json (the docs' example) holds each long chat as FastChat's pieces
    `<id>_<first turn>`; drawn record by record, a chat's first turns were trained on and its later ones held out."""
    from vicunaflow.dataprep.records import unit_hash

    def sides(output: Path) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for side, path in (("train", output), ("held", output.with_name(output.stem + ".heldout.jsonl"))):
            for record in read_jsonl(path):
                found.setdefault(record["id"].rsplit("_", 1)[0], set()).add(side)
        return found

    source = tmp_path / "sg.json"
    source.write_text(json.dumps(fastchat_pieces(40)))
    cleaned = clean(data=source, output=tmp_path / "c.jsonl", jobs=1)
    out = split(data=cleaned, model_path=tiny_hf, output=tmp_path / "s.jsonl", held_out_fraction=0.3, jobs=1)
    by_chat = sides(out)
    assert len(by_chat) == 40 and all(len(side) == 1 for side in by_chat.values()), "each chat on one side"
    assert 4 < sum(side == {"held"} for side in by_chat.values()) < 20
    # a mix holds them out together too: its `origin` is `<set>/<id>`, the set's ids are FastChat's pieces
    mine = write_jsonl(
        tmp_path / "mine.jsonl", [{"id": f"conv_{i}", "conversations": turns(f"q{i}", "a")} for i in range(40)]
    )
    mixed = mix(data=[cleaned, mine], weights=[1, 1], names=["sharegpt", "mine"], output=tmp_path / "m.jsonl")
    out = split(data=mixed, model_path=tiny_hf, output=tmp_path / "ms.jsonl", held_out_fraction=0.3, jobs=2)
    sharegpt = {chat: side for chat, side in sides(out).items() if chat.startswith("sharegpt/")}
    assert len(sharegpt) == 40 and all(len(side) == 1 for side in sharegpt.values())
    # ...while a user's own numbering `conv_0`, `conv_1`, ... is drawn id by id, as before (not one group "conv")
    expected = {f"mine/conv_{i}" for i in range(40) if unit_hash("vicunaflow", f"mine/conv_{i}") < 0.3}
    held_mine = {r["id"] for r in read_jsonl(tmp_path / "ms.heldout.jsonl") if r["id"].startswith("mine/")}
    assert held_mine == expected and 0 < len(held_mine) < 40
    # and so is a file whose ids are all `<x>_<n>` but not all even: not FastChat's pieces
    own = write_jsonl(
        tmp_path / "own.jsonl", [{"id": f"conv_{i}", "conversations": turns(f"q{i}", "a")} for i in range(40)]
    )
    split(data=own, model_path=tiny_hf, output=tmp_path / "o.jsonl", held_out_fraction=0.3, jobs=1)
    held = {r["id"] for r in read_jsonl(tmp_path / "o.heldout.jsonl")}
    assert held == {f"conv_{i}" for i in range(40) if unit_hash("vicunaflow", f"conv_{i}") < 0.3}


def test_split_counts_a_records_own_system_prompt_as_tokenize_writes_it(tiny_hf, tokenizer, tmp_path: Path) -> None:
    """Split counted the longer of a record's own system prompt and the default one, since tokenize wrote the default
    one; tokenize now writes the record's own, and a piece's `tokens` is exactly what it counts."""
    records = long_conversations()[:20]
    for i, record in enumerate(records):
        record["system"] = ["Be brief.", "You are a pirate. " * 12, ""][i % 3]
    source = write_jsonl(tmp_path / "c.jsonl", records)
    out = split(data=source, model_path=tiny_hf, output=tmp_path / "s.jsonl", model_max_length=150, jobs=1)
    pieces = read_jsonl(out)
    for piece in pieces:
        pairs = [(template.ROLE_OF[t["from"]], t["value"]) for t in piece["conversations"]]
        sample = data.encode(data.ConversationRecord(piece["id"], pairs, piece["system"]), tokenizer, 10**9)
        assert piece["tokens"] == len(sample.input_ids) <= 150, piece["id"]
    tokenized = data.tokenize(data=out, model_path=tiny_hf, output_dir=tmp_path / "tok", model_max_length=150)
    assert json.loads((tokenized / "meta.json").read_text())["n_tokens"] == sum(p["tokens"] for p in pieces)


def test_mix_weights_sample_deterministically_and_drop_cross_set_duplicates(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": i, "conversations": turns(f"a{i}", "r")} for i in range(200)])
    shared = {"id": "s", "conversations": turns("a0", "r")}  # the same conversation as a's 0
    b = write_jsonl(
        tmp_path / "b.jsonl", [shared] + [{"id": i, "conversations": turns(f"b{i}", "r")} for i in range(50)]
    )
    out = mix(data=[a, b], weights=[0.5, 2], output=tmp_path / "m.jsonl")
    first = out.read_bytes()
    assert mix(data=[a, b], weights=[0.5, 2], output=tmp_path / "m.jsonl").read_bytes() == first
    mixed = read_jsonl(out)
    from_a = [r for r in mixed if r["origin"].startswith("a/")]
    from_b = [r for r in mixed if r["origin"].startswith("b/")]
    assert 70 < len(from_a) < 130 and len(from_b) == 100
    assert {r["id"] for r in from_b if r["origin"] == "b/3"} == {"b/3", "b/3/1"}
    counts = read_counts(tmp_path / "m.counts.tsv")
    assert counts[("drop", "duplicate_across_sets")] == 1
    assert len({r["id"] for r in mixed}) == len(mixed)
    with pytest.raises(VicunaflowError, match="one weight and name per file"):
        mix(data=[a, b], weights=[1], output=tmp_path / "x.jsonl")


def test_mix_that_holds_nothing_is_refused_and_a_conversations_that_is_no_list_is_dropped(tmp_path: Path) -> None:
    """An empty set, or a weight that samples none of a small set, wrote an empty mix and exited 0; a record whose
    `conversations` was a string or an object went into the mix as it was."""
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(VicunaflowError, match=r"empty\.jsonl: no conversation in them; give `vicunaflow data clean`"):
        mix(data=[empty], weights=[1], output=tmp_path / "m.jsonl")
    small = write_jsonl(tmp_path / "small.jsonl", [{"id": i, "conversations": turns(f"q{i}", "a")} for i in range(2)])
    with pytest.raises(VicunaflowError, match=r"holds no conversation \(read 2; dropped: not_sampled:small 2\); raise"):
        mix(data=[small], weights=[0.01], output=tmp_path / "m.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "small.jsonl"], "nothing written"
    odd = [{"id": "s", "conversations": "hi"}, {"id": "o", "conversations": {"from": "human"}}]
    mixed = mix(data=[write_jsonl(tmp_path / "odd.jsonl", odd), small], weights=[1, 1], output=tmp_path / "m.jsonl")
    assert [r["id"] for r in read_jsonl(mixed)] == ["small/0", "small/1"]
    assert read_counts(tmp_path / "m.counts.tsv")[("drop", "not_a_conversation")] == 2


# ---- fetch from a Hugging Face Hub stand-in (tests/fake_hub.py) --------------------------------------


DATASET = "someone/sharegpt-tiny"
OLD, NEW = "c" * 40, "d" * 40
V1 = json.dumps([{"id": "a", "conversations": turns("hi", "<p>hello</p>")}]).encode()
V2 = json.dumps([{"id": "b", "conversations": turns("hey", "<p>yo</p>")}]).encode()


@pytest.fixture
def hub(fake_hub):
    return fake_hub(
        repos={
            DATASET: {
                "refs": {"main": NEW, "v1": OLD},
                "commits": {
                    OLD: {"data/sg.json": V1, "README.md": b"old"},
                    NEW: {"data/sg.json": V2, "README.md": b"new", "data/other.jsonl": b"{}\n"},
                },
            }
        },
        repo_type="dataset",
        lfs=(".json",),  # as if data/sg.json were big: its listing carries a sha256
    )


def _fetch(hub, tmp_path, name="raw", **kwargs):
    kwargs = {"repo": DATASET, "file": "data/sg.json", "revision": OLD, **kwargs}
    return fetch(output_dir=tmp_path / name, endpoint=hub.url, staging_dir=tmp_path / "st", **kwargs)


def test_fetch_takes_one_file_at_the_pinned_commit_and_records_it(hub, tmp_path: Path) -> None:
    path = _fetch(hub, tmp_path, sha256=hashlib.sha256(V1).hexdigest())
    assert path == tmp_path / "raw" / "data" / "sg.json" and path.read_bytes() == V1
    assert sorted(p.relative_to(tmp_path / "raw").as_posix() for p in (tmp_path / "raw").rglob("*")) == [
        "data",
        "data/sg.json",
        "vicunaflow.json",
    ]
    manifest = json.loads((tmp_path / "raw" / "vicunaflow.json").read_text())
    assert (manifest["repo"], manifest["repo_type"], manifest["revision"]) == (DATASET, "dataset", OLD)
    assert manifest["sha256"] == hashlib.sha256(V1).hexdigest() and manifest["file"] == "data/sg.json"
    by_tag = _fetch(hub, tmp_path, "by-tag", revision="v1")
    assert by_tag.read_bytes() == V1
    # the fetched file goes straight into clean
    cleaned = read_jsonl(clean(data=path, output=tmp_path / "c.jsonl", jobs=1))
    assert cleaned == [{"id": "a", "conversations": turns("hi", "hello")}]


def test_fetch_errors_name_the_file_and_leave_nothing(hub, tmp_path: Path) -> None:
    with pytest.raises(
        VicunaflowError, match=r"no file 'data/missing\.json' in this dataset repository.*data/sg\.json"
    ):
        _fetch(hub, tmp_path, file="data/missing.json")
    with pytest.raises(VicunaflowError, match=r"data/sg\.json: sha256 mismatch: expected 0{64} \(config\), got "):
        _fetch(hub, tmp_path, revision="main", sha256="0" * 64)  # main moved on: the pin catches it
    hub.tampered = {"data/sg.json"}
    with pytest.raises(VicunaflowError, match=r"data/sg\.json: sha256 mismatch"):
        _fetch(hub, tmp_path)
    with pytest.raises(VicunaflowError, match="revision 'v9' not found"):
        _fetch(hub, tmp_path, revision="v9")
    with pytest.raises(VicunaflowError, match="give a path inside the repository"):
        _fetch(hub, tmp_path, file="../x.json")
    assert not (tmp_path / "raw").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".raw")], "no temporary left"


@pytest.mark.parametrize("file", ["data/", "data"])
def test_fetch_of_a_folder_is_refused_naming_its_files_before_any_download(file, hub, tmp_path: Path) -> None:
    """`--file data/` fetched every file under the folder, then failed with "[Errno 21] Is a directory" on a
    temporary path."""
    with pytest.raises(VicunaflowError) as refused:
        _fetch(hub, tmp_path, file=file, revision=NEW)
    assert str(refused.value) == (
        f"{DATASET}@{NEW}: --file {file!r} is a folder; data fetch takes one file: give one of the 2 files under it "
        "as --file (one data fetch, or one dataset, each): data/other.jsonl, data/sg.json"
    )
    assert not [r for r in hub.requests if "/resolve/" in r], "nothing downloaded"
    assert not (tmp_path / "raw").exists()
    with pytest.raises(VicunaflowError, match=r"--file 'nothing/' names a folder, and the repository has none"):
        _fetch(hub, tmp_path, file="nothing/", revision=NEW)
    assert _fetch(hub, tmp_path, file="data/sg.json").read_bytes() == V1, "a file is fetched as before"


@pytest.mark.parametrize("repo", ["not a repo id", "a/b/c", "-a/b"])
def test_fetch_of_a_repository_id_the_hub_cannot_have_is_one_line(repo, tmp_path: Path) -> None:
    """huggingface_hub's HFValidationError ended the command in a traceback."""
    with pytest.raises(VicunaflowError, match=rf"{re.escape(repo)}: not a Hugging Face repository id \("):
        fetch(repo=repo, file="sg.json", output_dir=tmp_path / "raw", endpoint="http://127.0.0.1:9")
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize("unavailable", ["offline", "unreachable"])
def test_fetch_without_the_hub_hints_a_command_line_that_parses(unavailable, tmp_path: Path, monkeypatch) -> None:
    """The hint was download hf's "use --source local --path DIR": flags `data fetch` does not have. Now it is a
    command line of the step after fetch, run here through the CLI's own parser (the verb itself replaced)."""
    import functools

    from huggingface_hub import constants

    from vicunaflow import cli

    endpoint = "http://127.0.0.1:9"  # nothing listens there
    if unavailable == "offline":
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(VicunaflowError) as refused:
        fetch(repo=DATASET, file="data/sg.json", revision=OLD, output_dir=tmp_path / "raw", endpoint=endpoint,
              staging_dir=tmp_path / "st")  # fmt: skip
    message = str(refused.value)
    assert "--source" not in message and "--path" not in message, message
    assert message.startswith(f"{DATASET}: ") and ("go online" in message or "check the network" in message)
    hinted = re.findall(r"`(vicunaflow [^`]*)`", message)
    assert hinted == ["vicunaflow data clean --data sg.json --output sg.clean.jsonl"], message
    assert "the dataset's `path: sg.json` instead of its `hub`" in message

    parsed = {}
    monkeypatch.setattr(clean_module, "clean", functools.wraps(clean)(lambda **options: parsed.update(options)))
    cli.main(hinted[0].split()[1:])
    assert parsed["data"] == Path("sg.json") and parsed["output"] == Path("sg.clean.jsonl")
    assert not (tmp_path / "raw").exists()


# ---- CLI and workflow ----------------------------------------------------------------------------------


def test_cli_runs_clean_and_split_verbs(tiny_hf, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", DIRTY[:3])
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = lambda *a: subprocess.run(["vicunaflow", "data", *a], capture_output=True, text=True, env=env)  # noqa: E731
    result = run("clean", "--data", str(source), "--output", str(tmp_path / "c.jsonl"), "--jobs", "1")
    assert result.returncode == 0, result.stderr
    result = run("split", "--data", str(tmp_path / "c.jsonl"), "--model-path", str(tiny_hf),
                 "--model-max-length", "2048", "--output", str(tmp_path / "s.jsonl"), "--held-out-fraction", "0.3", "--jobs", "1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "s.heldout.jsonl").exists() and (tmp_path / "s.jsonl").read_text().strip()
    # every exchange longer than 16 tokens (with its system prompt; "roles" has a short one of its own): refused,
    # nothing written that looks like a dataset
    result = run("split", "--data", str(tmp_path / "c.jsonl"), "--model-path", str(tiny_hf),
                 "--model-max-length", "16", "--output", str(tmp_path / "e.jsonl"), "--jobs", "1")  # fmt: skip
    assert result.returncode == 1 and "no conversation is left to train on" in result.stderr, result.stderr
    assert not (tmp_path / "e.jsonl").exists()
    result = run("clean", "--data", str(tmp_path / "nothing.json"), "--output", str(tmp_path / "x.jsonl"))
    assert result.returncode == 1 and "nothing.json: no such data file" in result.stderr


HUB_CONFIG = {
    "datasets": {
        "sharegpt": {
            "hub": {"repo": DATASET, "file": "data/sg.json", "revision": OLD},
            "languages": ["en"],
            "held_out_fraction": 0.02,
        },
        "mine": {"path": "mine.jsonl"},
        "both": {"mix": {"sharegpt": 1, "mine": 0.5}},
    },
    "finetune": {
        "runs": {
            "sg": {"model": "vicuna-7b-all-v1.1", "data": "sharegpt"},
            "mixed": {"model": "vicuna-7b-all-v1.1", "data": "both", "model_max_length": 1024},
            "demo": {"model": "vicuna-7b-all-v1.1", "data": "builtin"},
        }
    },
}


def _snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2"]
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=300)


def test_dry_run_plans_hub_dataset_clean_mix_split_tokenize(tmp_path: Path) -> None:
    import yaml

    (tmp_path / "config").symlink_to(REPO / "config")
    (tmp_path / "mine.jsonl").write_text("{}\n")
    (tmp_path / "hub.yaml").write_text(yaml.safe_dump(HUB_CONFIG))
    targets = ["fine_tuning_output/sg", "fine_tuning_output/mixed", "fine_tuning_output/demo"]
    result = _snakemake(tmp_path, "-n", "-p", *targets, "--configfile", str(tmp_path / "hub.yaml"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    jobs = dict(re.findall(r"^(data_\w+|tokenize_data)\s+(\d+)$", out, re.MULTILINE))
    assert jobs == {"data_fetch": "1", "data_clean": "2", "data_mix": "1", "data_split": "2", "tokenize_data": "3"}
    assert (
        f"vicunaflow data fetch --repo {DATASET} --file data/sg.json --revision {OLD} --output-dir data/raw/sharegpt"
        in out
    )
    assert "--data data/raw/sharegpt/data/sg.json --output data/clean/sharegpt.jsonl" in out
    assert "data/split/sharegpt/vicuna-7b-all-v1.1-len2048.jsonl" in out
    assert "data/split/both/vicuna-7b-all-v1.1-len1024.heldout.jsonl" in out
    assert "data/tokenized/builtin/vicuna-7b-all-v1.1-len2048" in out, "builtin data goes straight to tokenize"
    bad = {"datasets": {"x": {"hub": {"repo": "a/b", "file": "f"}, "path": "p"}}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    result = _snakemake(tmp_path, "-n", "--configfile", str(tmp_path / "bad.yaml"))
    assert (
        result.returncode != 0 and "datasets.x: give exactly one of hub, path or mix" in result.stdout + result.stderr
    )


def test_paths_with_spaces_reach_the_commands_quoted_and_run_names_are_refused(tmp_path: Path) -> None:
    """A data, questions, held-out or local model path with a space (or a checkout under "My Projects", whose
    built-in files every demo reads) went into the shell unquoted: the dry run passed and the job failed with
    "unrecognized arguments". A run name with a space names folders and log files: refused like a dataset's."""
    import yaml

    (tmp_path / "config").symlink_to(REPO / "config")
    (tmp_path / "my data").mkdir()
    write_jsonl(tmp_path / "my data" / "conv s.json", DIRTY[:1])
    (tmp_path / "my data" / "q s.jsonl").write_text(
        json.dumps({"question_id": 1, "category": "writing", "turns": ["hi"]}) + "\n"
    )
    (tmp_path / "my models" / "llama 7b").mkdir(parents=True)
    config = {
        "targets": ["fine_tuning_output/r", "results/eval/summary.tsv", "llama-7b-hf"],
        "llama": {"source": "local_hf", "local": {"7b": "my models/llama 7b"}},
        "finetune": {"runs": {"r": {"model": "vicuna-tiny-all-v1.1", "data": "my data/conv s.json"}}},
        "eval": {
            "models": ["vicuna-tiny-all-v1.1"],
            "questions": "my data/q s.jsonl",
            "judges": {"self": {"model": "m", "serve": "vicuna-tiny-all-v1.1"}},
            "summary_judges": ["self"],
            "loss_data": {"held": "my data/conv s.json"},
        },
    }
    (tmp_path / "spaces.yaml").write_text(yaml.safe_dump(config))
    result = _snakemake(tmp_path, "-n", "-p", "--configfile", str(tmp_path / "spaces.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for quoted in ("--data 'my data/conv s.json'", "--output-dir 'data/tokenized/conv s/vicuna-tiny-all-v1.1-len2048'",
                   "--data 'data/tokenized/conv s/vicuna-tiny-all-v1.1-len2048'", "--questions 'my data/q s.jsonl'",
                   "--path 'my models/llama 7b'"):  # fmt: skip
        assert quoted in out, quoted
    commands = "\n".join(line for line in out.splitlines() if line.startswith("Shell command:"))
    assert not re.search(r" (my data|my models|data/tokenized/conv s|logs/\w+/conv s)", commands), "all quoted"
    config["finetune"]["runs"] = {"my run": {"model": "vicuna-tiny-all-v1.1", "data": "builtin"}}
    (tmp_path / "spaces.yaml").write_text(yaml.safe_dump(config))
    result = _snakemake(tmp_path, "-n", "--configfile", str(tmp_path / "spaces.yaml"))
    assert result.returncode != 0 and "'my run' does not match" in result.stdout + result.stderr


@pytest.mark.e2e
def test_workflow_prepares_a_local_dataset_and_reruns_only_what_a_change_touches(tiny_vicuna, tmp_path: Path) -> None:
    import shutil

    import yaml

    (tmp_path / "config").symlink_to(REPO / "config")
    shutil.copytree(tiny_vicuna, tmp_path / "vicuna-tiny-all-v1.1")  # an existing model: not rebuilt
    write_jsonl(tmp_path / "mine.jsonl", [DIRTY[0], DIRTY[1], *long_conversations()[:6]])
    config = {"datasets": {"mine": {"path": "mine.jsonl", "held_out_fraction": 0.2}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    target = "data/tokenized/mine/vicuna-tiny-all-v1.1-len256"
    args = [target, "--configfile", str(tmp_path / "c.yaml")]

    def planned(*extra: str) -> dict[str, str]:
        result = _snakemake(tmp_path, "-n", *args, *extra)
        assert result.returncode == 0, result.stdout + result.stderr
        return dict(re.findall(r"^(\w+)\s+(\d+)$", result.stdout, re.MULTILINE))

    assert planned() == {"data_clean": "1", "data_split": "1", "tokenize_data": "1", "total": "3"}
    result = _snakemake(tmp_path, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / target / "meta.json").is_file()
    assert "html_to_markdown" in (tmp_path / "results/data/mine/clean.tsv").read_text()
    assert planned() == {}, "nothing to do"
    config["datasets"]["mine"]["held_out_fraction"] = 0.5  # a split option: split and tokenize again
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert planned() == {"data_split": "1", "tokenize_data": "1", "total": "2"}
    result = _snakemake(tmp_path, *args)  # the files' provenance sidecars are no outputs: Snakemake ignores them
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "data/split/mine/.vicuna-tiny-all-v1.1-len256.jsonl.vicunaflow.json").is_file()
    assert planned() == {}, "nothing to do"
    with open(tmp_path / "mine.jsonl", "a") as f:  # a changed source: the whole chain
        f.write(json.dumps({"id": "new", "conversations": turns("one more", "answer")}) + "\n")
    assert planned() == {"data_clean": "1", "data_split": "1", "tokenize_data": "1", "total": "3"}


def test_split_is_exact_with_a_metaspace_tokenizer_too(tiny_hf, tmp_path: Path) -> None:
    """Hub LLaMA tokenizers written by newer transformers use a Metaspace pre-tokenizer that adds "▁"
    only at the start of the text, not after `</s>`: the lengths must follow that as well."""
    import shutil

    from tokenizers import Tokenizer, pre_tokenizers

    model = tmp_path / "metaspace"
    shutil.copytree(tiny_hf, model, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    backend = Tokenizer.from_file(str(model / "tokenizer.json"))
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.save(str(model / "tokenizer.json"))
    tokenizer = data.load_tokenizer(model)
    assert tokenizer("</s>USER: hi")["input_ids"][2] != tokenizer("USER: hi")["input_ids"][1], "no ▁ after </s>"
    out = split(
        data=write_jsonl(tmp_path / "c.jsonl", long_conversations()),
        model_path=model,
        output=tmp_path / "s.jsonl",
        model_max_length=150,
        jobs=1,
    )
    pieces = read_jsonl(out)
    assert any("parent" in p for p in pieces)
    for piece in pieces:
        assert piece["tokens"] == exact_length(tokenizer, piece) <= 150, piece["id"]

"""Conversation data: validation messages, masks exact against FastChat's prompt, truncation, the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vicunaflow import VicunaflowError, data, template

CONVERSATIONS = [
    {
        "id": "multi",
        "conversations": [
            {"from": "human", "value": "Who are you?"},
            {"from": "gpt", "value": "I am Vicuna."},
            {"from": "human", "value": "  What is 2+2?\nAnswer briefly."},
            {"from": "gpt", "value": "4, of course. Ünïcödé – ok?"},
            {"from": "human", "value": "Thanks!"},
            {"from": "gpt", "value": "You are welcome.\n\nBye."},
        ],
    },
    {
        "id": "starts-with-gpt",
        "conversations": [
            {"from": "gpt", "value": "Hello, I speak first."},
            {"from": "human", "value": "Tell me a joke."},
            {"from": "gpt", "value": "Why did the scarecrow win an award?"},
        ],
    },
    {"id": 7, "conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": " spaced reply "}]},
]


def write(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_vicuna):
    return data.load_tokenizer(tiny_vicuna)


def fastchat_prompt(turns: list[tuple[str, str]]) -> str:
    from fastchat.conversation import get_conv_template

    conv = get_conv_template("vicuna_v1.1")
    for role, text in turns:
        conv.append_message(conv.roles[0] if role == template.USER else conv.roles[1], text)
    return conv.get_prompt()


def test_validation_names_every_bad_record_with_its_reason(tmp_path: Path) -> None:
    bad = [
        {"id": "ok", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
        {"id": "no-value", "conversations": [{"from": "human"}, {"from": "gpt", "value": "b"}]},
        {"id": "bad-role", "conversations": [{"from": "system", "value": "a"}]},
        {"id": "twice", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
        {"id": "blank", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "  "}]},
        {"id": "empty", "conversations": []},
        {"conversations": [{"from": "human", "value": "a"}]},
        "not an object",
    ]
    with pytest.raises(VicunaflowError) as err:
        data.load_conversations(write(tmp_path / "bad.json", bad))
    message = str(err.value)
    assert "7 invalid record(s)" in message
    for expected in (
        "record 'no-value' (index 1): turn 0 is missing its value",
        "record 'bad-role' (index 2): turn 0 has unknown role 'system'",
        "record 'twice' (index 3): roles not alternating at turn 1",
        "record 'blank' (index 4): turn 1 (gpt) is empty",
        "record 'empty' (index 5): empty conversation",
        "record '<no id>' (index 6): missing 'id'",
        "record at index 7: not a JSON object",
    ):
        assert expected in message
    assert "'ok'" not in message


def test_invalid_records_point_to_data_clean(tmp_path: Path) -> None:
    """ShareGPT dumps hold roles such as bing and chatgpt and a leading system turn, which `data clean` normalises
    (tokenize only takes human/user and gpt/assistant): the error said only "fix or remove them"."""
    records = [{"id": "b", "conversations": [{"from": "human", "value": "a"}, {"from": "bing", "value": "b"}]}]
    with pytest.raises(VicunaflowError, match=r"unknown role 'bing'.*; fix or remove them, or run `vicunaflow data "
                       r"clean` on the file first \(it normalises roles such as bing, chatgpt and system"):  # fmt: skip
        data.load_conversations(write(tmp_path / "c.json", records))


def test_tokenize_refuses_an_id_given_twice_naming_both_records_and_data_clean(tmp_path: Path, tiny_vicuna) -> None:
    """Two conversations under one id were tokenised silently: two samples of one name in meta.json's ids (eval
    loss and a held-out split go by id), or one conversation trained on twice. 7 and "7" are one id (ids are text)."""
    from vicunaflow.dataprep.clean import clean

    exchange = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]
    records = [{"id": 7, "conversations": exchange}, {"id": "a", "conversations": [*exchange, *exchange]}]
    other = [{"from": "human", "value": "Hey"}, {"from": "gpt", "value": "Hey there."}]
    records += [{"id": "7", "conversations": other}, {"id": "a", "conversations": exchange}]
    source = tmp_path / "c.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = run_data_cli("tokenize", "--data", str(source), "--model-path", str(tiny_vicuna),
                          "--output-dir", str(tmp_path / "out"))  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert (
        f"{source}: 2 invalid record(s): record '7' (index 2): the same id as index 0; "
        "record 'a' (index 3): the same id as index 1; fix or remove them, or run `vicunaflow data clean` on the file "
        "first (it normalises roles such as bing, chatgpt and system, drops broken records and keeps the first "
        "conversation of each id)"
    ) in result.stderr
    assert not (tmp_path / "out").exists()
    cleaned = clean(data=source, output=tmp_path / "clean.jsonl", jobs=1)  # the fix the error names
    assert [c.id for c in data.load_conversations(cleaned)] == ["7", "a"]


@pytest.mark.parametrize("role", [["human"], {"name": "human"}])
def test_a_role_that_is_not_a_string_names_the_record(tmp_path: Path, role) -> None:
    records = [{"id": "odd-role", "conversations": [{"from": role, "value": "a"}, {"from": "gpt", "value": "b"}]}]
    with pytest.raises(VicunaflowError, match=r"record 'odd-role' \(index 0\): turn 0 has unknown role"):
        data.load_conversations(write(tmp_path / "c.json", records))


def test_first_turn_from_gpt_is_dropped(tmp_path: Path) -> None:
    conversations = data.load_conversations(write(tmp_path / "c.json", CONVERSATIONS))
    assert conversations[1].turns == [
        (template.USER, "Tell me a joke."),
        (template.ASSISTANT, "Why did the scarecrow win an award?"),
    ]
    assert conversations[2].id == "7"


def test_records_without_an_exchange_are_named_as_such_not_as_an_empty_file(tmp_path: Path) -> None:
    """A file of records that open with the reply or end unanswered was reported as "no conversations in it"."""
    records = [
        {"id": "reply-first", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]},
        {"id": "unanswered", "conversations": [{"from": "human", "value": "a"}]},
    ]
    with pytest.raises(VicunaflowError, match=r"c.json: none of its 2 record\(s\) has a user turn followed by an"):
        data.load_conversations(write(tmp_path / "c.json", records))


def test_input_ids_are_fastchats_and_labels_cover_exactly_the_replies(tmp_path: Path, tokenizer) -> None:
    conversations = data.load_conversations(write(tmp_path / "c.json", CONVERSATIONS))
    for conversation in conversations:
        sample = data.encode(conversation, tokenizer, model_max_length=4096)
        # Token for token what FastChat's train.py feeds the model (tokenizer(prompt), bos included).
        assert sample.input_ids == tokenizer(fastchat_prompt(conversation.turns)).input_ids
        # Independent reference: count tokens of the prompt prefix up to each reply's start and end.
        expected = [data.IGNORE_INDEX] * len(sample.input_ids)
        prefix = ""
        for piece, is_reply in template.segments(conversation.turns):
            start = len(tokenizer(prefix).input_ids)
            prefix += piece
            end = len(tokenizer(prefix).input_ids)
            if is_reply:
                expected[start:end] = sample.input_ids[start:end]
        assert sample.labels == expected
        trained = [t for t, label in zip(sample.input_ids, sample.labels, strict=True) if label != data.IGNORE_INDEX]
        replies = [text for role, text in conversation.turns if role == template.ASSISTANT]
        assert trained.count(tokenizer.eos_token_id) == len(replies)  # every reply's </s> is trained
        decoded = tokenizer.decode(trained, skip_special_tokens=False)
        assert decoded.replace(" ", "") == "".join(r + "</s>" for r in replies).replace(" ", "")


def test_truncation_cuts_ids_and_labels_together(tmp_path: Path, tokenizer) -> None:
    conversation = data.load_conversations(write(tmp_path / "c.json", CONVERSATIONS))[0]
    full = data.encode(conversation, tokenizer, model_max_length=4096)
    cut = data.encode(conversation, tokenizer, model_max_length=60)
    assert len(cut.input_ids) == 60
    assert (cut.input_ids, cut.labels) == (full.input_ids[:60], full.labels[:60])
    # A length that ends before the first reply leaves nothing to learn: the sample is dropped;
    # when no sample is left, that is an error, never an empty dataset.
    long_question = data.ConversationRecord("long", [(template.USER, "why " * 200), (template.ASSISTANT, "because")])
    kept = data.encode_all([long_question, conversation], tokenizer, model_max_length=len(full.input_ids))
    assert [s.id for s in kept] == ["multi"]
    with pytest.raises(VicunaflowError, match="all 1 conversations were dropped"):
        data.encode_all([conversation], tokenizer, model_max_length=10)


def test_only_samples_that_lose_tokens_count_as_truncated(tmp_path: Path, tokenizer, caplog) -> None:
    conversation = data.load_conversations(write(tmp_path / "c.json", CONVERSATIONS))[0]
    length = len(data.encode(conversation, tokenizer, model_max_length=4096).input_ids)
    with caplog.at_level("INFO", logger="vicunaflow.data"):
        data.encode_all([conversation], tokenizer, model_max_length=length)  # fits exactly: nothing is cut
    assert "truncated" not in caplog.text
    with caplog.at_level("INFO", logger="vicunaflow.data"):
        (sample,) = data.encode_all([conversation], tokenizer, model_max_length=length - 1)
    assert len(sample.input_ids) == length - 1
    assert f"1 of 1 samples truncated to {length - 1} tokens" in caplog.text


def test_jsonl_reads_like_json(tmp_path: Path) -> None:
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in CONVERSATIONS) + "\n")
    assert data.load_conversations(jsonl) == data.load_conversations(write(tmp_path / "c.json", CONVERSATIONS))
    jsonl.write_text(json.dumps(CONVERSATIONS[0]) + "\n{broken\n")
    with pytest.raises(VicunaflowError, match=r"c\.jsonl:2: not valid JSON Lines"):
        data.load_conversations(jsonl)
    indented = tmp_path / "dataset.json"  # a dataset's {"train": [...]}, indented: one object, not JSONL
    indented.write_text(json.dumps({"train": CONVERSATIONS}, indent=1))
    with pytest.raises(
        VicunaflowError, match=rf"one JSON object \(keys 'train'\).*list 'train' holds {len(CONVERSATIONS)} records"
    ):
        data.load_conversations(indented)


def test_jsonl_lines_end_at_newlines_only_not_at_unicode_line_separators(tmp_path: Path) -> None:
    """str.splitlines() also broke lines at U+2028, U+2029 and U+0085, which JSON allows raw inside strings (data
    clean and split wrote them so): clean -> split -> tokenize failed with "not valid JSON Lines"."""
    texts = ["Line one\u2028line two?", "para\u2029graph", "next\u0085line", "crlf\r\nin text"]
    records = [{"id": f"r{i}", "conversations": [{"from": "human", "value": t}, {"from": "gpt", "value": t}]}
               for i, t in enumerate(texts)]  # fmt: skip
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_bytes(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\r\n" for r in records))
    loaded = data.load_conversations(jsonl)
    assert [c.id for c in loaded] == ["r0", "r1", "r2", "r3"]
    assert [c.turns[0][1] for c in loaded] == texts


def test_a_records_own_system_prompt_is_the_one_trained_with(tmp_path: Path, tokenizer) -> None:
    """data clean keeps a conversation's first system turn as the record's `system`; tokenize wrote Vicuna's default
    prompt instead, silently. Now the prompt is FastChat's with that system message; the masks still cover exactly
    the replies."""
    from fastchat.conversation import get_conv_template

    system = "You are a pirate. Always answer like a pirate."
    record = {"id": "p", "system": system, **{k: v for k, v in CONVERSATIONS[0].items() if k != "id"}}
    default = {**CONVERSATIONS[0], "id": "d", "system": None}  # null: the default prompt, as without the key
    own, plain = data.load_conversations(write(tmp_path / "c.json", [record, default]))
    assert (own.system, plain.system) == (system, template.SYSTEM_PROMPT)
    conv = get_conv_template("vicuna_v1.1")
    conv.set_system_message(system)
    for role, text in own.turns:
        conv.append_message(conv.roles[0] if role == template.USER else conv.roles[1], text)
    sample, reference = data.encode(own, tokenizer, 4096), data.encode(plain, tokenizer, 4096)
    assert sample.input_ids == tokenizer(conv.get_prompt()).input_ids
    assert tokenizer.decode(sample.input_ids).startswith(f"<s> {system} USER: Who are you?")
    trained = lambda s: [t for t, label in zip(s.input_ids, s.labels, strict=True) if label != data.IGNORE_INDEX]  # noqa: E731
    assert trained(sample) == trained(reference), "the same replies trained on, nothing of the system prompt"
    prompt, _ = data.render_with_offsets(own, tokenizer)  # data preview shows the same prompt
    assert prompt.startswith(system + " USER:")
    with pytest.raises(VicunaflowError, match=r"record 'bad' \(index 0\): its 'system' prompt is not a string"):
        data.load_conversations(write(tmp_path / "bad.json", [{**record, "id": "bad", "system": ["a"]}]))


def test_a_null_or_empty_id_is_named_as_missing_not_as_a_repeated_id(tmp_path: Path) -> None:
    """Taken as text, null ids were all "None": the second record was "the same id as index 0"."""
    answered = [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]
    records = [{"id": None, "conversations": answered}, {"id": None, "conversations": answered},
               {"id": " ", "conversations": answered}]  # fmt: skip
    with pytest.raises(VicunaflowError) as err:
        data.load_conversations(write(tmp_path / "c.json", records))
    message = str(err.value)
    assert "3 invalid record(s)" in message and "the same id" not in message
    assert "record None (index 1): its 'id' is null (data clean gives such a record an id from its position)" in message
    assert "record ' ' (index 2): its 'id' is \" \"" in message


def test_tokenize_writes_a_dataset_that_reads_back(tmp_path: Path, tiny_vicuna, tokenizer) -> None:
    source = write(tmp_path / "c.json", CONVERSATIONS)
    out = data.tokenize(data=source, model_path=tiny_vicuna, output_dir=tmp_path / "tok", model_max_length=128)
    samples, meta = data.load_tokenized(out)
    expected = data.encode_all(data.load_conversations(source), tokenizer, 128)
    assert samples == expected
    assert meta["model_max_length"] == 128 and meta["ids"] == ["multi", "starts-with-gpt", "7"]
    assert set(meta["tokenizer_sha256"]) >= {"tokenizer.json", "tokenizer_config.json"}
    assert (out / "vicunaflow.json").is_file()


def test_preview_through_the_cli(tmp_path: Path, tiny_vicuna, tokenizer) -> None:
    source = write(tmp_path / "c.json", CONVERSATIONS)
    command = [sys.executable, "-m", "vicunaflow", "data", "preview", "--data", str(source)]
    command += ["--model-path", str(tiny_vicuna), "--limit", "2"]
    result = subprocess.run([*command, "--format", "json"], capture_output=True, text=True, timeout=120, check=True)
    shown = json.loads(result.stdout)
    assert [s["id"] for s in shown] == ["multi", "starts-with-gpt"]
    first = data.encode(data.load_conversations(source)[0], tokenizer, 2048)
    assert shown[0]["input_ids"] == first.input_ids and shown[0]["labels"] == first.labels
    text = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    assert "USER: Who are you? ASSISTANT: I am Vicuna.</s>" in text
    assert "trained" in text
    bad = subprocess.run(
        [*command[:6], str(write(tmp_path / "bad.json", [{"id": "x", "conversations": []}])), *command[7:]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and "record 'x' (index 0): empty conversation" in bad.stderr


# --- input that must fail clearly, naming the file and the fix ------------------------------------


def run_data_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vicunaflow", "data", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(("encoding", "fix"), [("latin-1", "iconv -f latin1 -t utf-8"), ("utf-16", "iconv -f utf-16")])
def test_data_that_is_not_utf8_fails_naming_the_file_offset_and_fix(tmp_path: Path, tiny_vicuna, encoding, fix) -> None:
    records = [
        {"id": "café", "conversations": [{"from": "human", "value": "Grüß dich"}, {"from": "gpt", "value": "Hé"}]}
    ]
    raw = json.dumps(records, ensure_ascii=False).encode(encoding)
    source = tmp_path / "c.json"
    source.write_bytes(raw)
    offset = raw.index(b"\xe9") if encoding == "latin-1" else 0  # utf-16: its byte-order mark
    common = ["--data", str(source), "--model-path", str(tiny_vicuna)]
    for args in (["preview", *common], ["tokenize", *common, "--output-dir", str(tmp_path / "out")]):
        result = run_data_cli(*args)
        assert result.returncode == 1, result.stderr
        assert f"{source}: not UTF-8" in result.stderr and f"byte {offset}" in result.stderr
        assert fix in result.stderr
        assert "Traceback" not in result.stderr and "UnicodeDecodeError" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path: Path, suffix: str) -> None:
    text = json.dumps(CONVERSATIONS) if suffix == ".json" else "\n".join(json.dumps(r) for r in CONVERSATIONS)
    source = tmp_path / f"c{suffix}"
    source.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert [c.id for c in data.load_conversations(source)] == ["multi", "starts-with-gpt", "7"]


@pytest.mark.parametrize(("name", "text"), [("tokenizer.json", ""), ("tokenizer_config.json", '{"broken": ')])
def test_a_damaged_tokenizer_file_is_named_not_a_traceback(tmp_path: Path, tiny_vicuna, name: str, text: str) -> None:
    """An empty tokenizer.json or a cut-short tokenizer_config.json: data tokenize and the engine's loader (chat,
    serve) name the folder's tokenizer files and the fix."""
    from vicunaflow.engine import load_model

    model = tmp_path / "model"
    shutil.copytree(tiny_vicuna, model)
    (model / name).write_text(text)
    with pytest.raises(VicunaflowError, match=r"its tokenizer \(.*tokenizer.json.*\) could not be read.*restore"):
        data.load_tokenizer(model)
    with pytest.raises(VicunaflowError, match="could not be read"):
        load_model(model)


def test_a_folder_without_tokenizer_files_is_one_line(tmp_path: Path, tiny_vicuna) -> None:
    """No tokenizer.json nor tokenizer.model (a folder of config.json and weights only) as the engine's loader (chat,
    serve) opens it: one line saying so, not transformers' several lines asking for sentencepiece."""
    from vicunaflow.tokenizer import open_tokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_vicuna, model)
    for name in ("tokenizer.json", "tokenizer.model"):
        (model / name).unlink()
    with pytest.raises(VicunaflowError) as err:
        open_tokenizer(model)
    message = str(err.value)
    assert "\n" not in message and "neither tokenizer.json nor tokenizer.model is there" in message, message
    assert "sentencepiece" not in message


@pytest.mark.parametrize("length", ["0", "-5"])
def test_tokenize_and_preview_refuse_a_length_below_one(tmp_path: Path, tiny_vicuna, length: str) -> None:
    source = write(tmp_path / "c.json", CONVERSATIONS)
    common = ["--data", str(source), "--model-path", str(tiny_vicuna), "--model-max-length", length]
    for args in (["tokenize", *common, "--output-dir", str(tmp_path / "out")], ["preview", *common]):
        result = run_data_cli(*args)
        assert result.returncode == 1, result.stderr
        assert f"--model-max-length must be at least 1 token, not {length}" in result.stderr
    assert not (tmp_path / "out").exists()
    result = run_data_cli("preview", "--data", str(source), "--model-path", str(tiny_vicuna), "--limit", "0")
    assert result.returncode == 1 and "--limit must be at least 1" in result.stderr


def test_tokenize_never_writes_an_empty_dataset(tmp_path: Path, tiny_vicuna) -> None:
    """5 tokens hold no reply of any conversation (the system prompt alone is longer): an error, not 0 samples."""
    source = write(tmp_path / "c.json", CONVERSATIONS)
    result = run_data_cli(
        "tokenize", "--data", str(source), "--model-path", str(tiny_vicuna), "--output-dir", str(tmp_path / "out"),
        "--model-max-length", "5",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "all 3 conversations were dropped" in result.stderr and "raise --model-max-length" in result.stderr
    assert not (tmp_path / "out").exists()

"""The chat CLI: piped stdin, a pseudo-terminal, commands, long conversations and --prompts JSON."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vicunaflow import VicunaflowError, template
from vicunaflow.chat import chat
from vicunaflow.engine import Engine, Event, SamplingParams, encode_prompt, load_model

REPO = Path(__file__).resolve().parents[1]


def _chat_piped(monkeypatch, capsys, lines: list[str], **kwargs) -> str:
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    chat(**{"temperature": 0.0, "max_new_tokens": 8, **kwargs})
    return capsys.readouterr().out


def _replies(out: str) -> list[str]:
    return [line.removeprefix("ASSISTANT: ") for line in out.splitlines() if line.startswith("ASSISTANT: ")]


def test_piped_stdin_with_commands(tiny_vicuna, tmp_path, monkeypatch, capsys):
    saved, notes = tmp_path / "conversation.json", tmp_path / "notes.txt"
    notes.write_text("my notes")
    lines = [
        "Hello",
        f"!!save {saved}",
        "!!regen",
        f"!!save {saved}",  # its own earlier save: replaced
        f"!!save {notes}",  # a file of the user's: kept
        "!!reset",
        f"!!load {saved}",
        "Second question",
        "!!remove",
        "!!exit",
    ]
    out = _chat_piped(monkeypatch, capsys, [*lines, "never asked"], model_path=tiny_vicuna)
    assert "USER: Hello" in out and "USER: never asked" not in out
    replies = _replies(out)
    # Hello, its regeneration (greedy: the same), the loaded transcript, Second question
    assert len(replies) == 4 and replies[0] == replies[1] == replies[2] and replies[0]
    record = json.loads(saved.read_text())
    assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
    assert record["messages"][0]["content"] == "Hello"
    assert "[new conversation]" in out and "[removed: Second question]" in out and "[loaded 1 exchanges" in out
    assert f"[{notes} exists and is not a conversation !!save wrote: kept" in out and notes.read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conversation.json", "notes.txt"]  # no temporary left


def test_a_message_that_is_not_utf8_is_not_sent(tiny_vicuna, monkeypatch, capsys):
    """Piped bytes that are not UTF-8: a UnicodeDecodeError from stdin, or (C.UTF-8 locale) lone surrogates on which
    the tokenizer raised a TypeError; the line is now refused with a note and the next one answered."""
    piped = io.TextIOWrapper(io.BytesIO(b"\xff\xfe hello\nHello\n"), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdin", piped)  # strict, as in an en_US.UTF-8 locale: readline raised
    chat(model_path=tiny_vicuna, temperature=0.0, max_new_tokens=8)
    out = capsys.readouterr().out
    assert "[the message is not UTF-8 text (byte 0xff); not sent" in out
    assert len(_replies(out)) == 1  # the next message is answered


def test_a_context_too_short_for_any_message_is_refused_up_front(tiny_vicuna, tmp_path, monkeypatch, capsys):
    """Was: every piped line noted "not sent", exit status 0; and --prompts failed naming neither file nor flag."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    with pytest.raises(VicunaflowError, match=r"--max-context 40: the system prompt and a one-word message take \d+"):
        chat(model_path=tiny_vicuna, max_context=40, max_new_tokens=4)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hi\n" + "word " * 3000 + "\n")
    with pytest.raises(VicunaflowError) as err:
        chat(model_path=tiny_vicuna, prompts=prompts, output=tmp_path / "out.json")
    assert f"{prompts}: the prompt 'word word" in str(err.value) and "the context 2048: shorten it" in str(err.value)
    assert not (tmp_path / "out.json").exists()


def test_multi_turn_prompt_carries_history(tiny_vicuna, monkeypatch, capsys):
    """The second answer continues the conversation: it equals generating from the two-turn prompt."""
    out = _chat_piped(monkeypatch, capsys, ["Hi", "And then?"], model_path=tiny_vicuna)
    first, second = _replies(out)
    model, tokenizer = load_model(tiny_vicuna)
    turns = [
        (template.USER, "Hi"),
        (template.ASSISTANT, first),
        (template.USER, "And then?"),
        (template.ASSISTANT, None),
    ]
    with Engine(model, tokenizer, max_batch_size=1) as engine:
        events = engine.generate(encode_prompt(tokenizer, template.render(turns)), SamplingParams(0.0, 1.0, 8))
        assert "".join(e.text for e in events).strip() == second


def test_long_conversation_drops_oldest_turns(tiny_vicuna, monkeypatch, capsys):
    questions = [f"Question number {i}, asked with some extra words to fill the context" for i in range(6)]
    out = _chat_piped(monkeypatch, capsys, questions, model_path=tiny_vicuna, max_context=200)
    assert len(_replies(out)) == 6
    assert "no longer fit the 200-token context: left out" in out


def test_rich_style(tiny_vicuna, monkeypatch, capsys):
    out = _chat_piped(monkeypatch, capsys, ["Hello"], model_path=tiny_vicuna, style="rich")
    assert "ASSISTANT" in out


def test_pseudo_terminal(tiny_vicuna):
    """Interactive use: prompts appear, the reply streams, !!exit ends the session."""
    pid, fd = pty.fork()
    if pid == 0:  # child: the CLI on a terminal
        os.execv(
            sys.executable,
            [
                sys.executable,
                "-m",
                "vicunaflow",
                "chat",
                "--model-path",
                str(tiny_vicuna),
                "--temperature",
                "0",
                "--max-new-tokens",
                "8",
            ],
        )
    try:
        seen = _read_until(fd, b"USER: ", 120)
        os.write(fd, b"Hello\n")
        seen += _read_until(fd, b"USER: ", 60)
        assert b"ASSISTANT: " in seen
        os.write(fd, b"!!exit\n")
        _read_until(fd, None, 30)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, seen.decode(errors="replace")


def _read_until(fd: int, marker: bytes | None, timeout: float) -> bytes:
    """Read the terminal until `marker` (None: until the child closes it)."""
    data, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child exited
                return data
            if not chunk:
                return data
            data += chunk
            if marker is not None and data.endswith(marker):
                return data
    if marker is None:
        return data
    raise AssertionError(f"no {marker!r} on the terminal within {timeout}s; got {data[-500:]!r}")


def test_prompts_file_to_json(tiny_vicuna, tmp_path):
    """The workflow's chat_smoke call: fixed prompts, greedy, an atomically written JSON."""
    output = tmp_path / "results" / "chat" / "vicuna-tiny-all-v1.1.json"
    prompts = REPO / "config" / "chat_prompts.txt"
    cmd = [sys.executable, "-m", "vicunaflow", "chat", "--model-path", str(tiny_vicuna), "--prompts", str(prompts)]
    subprocess.run(
        [*cmd, "--output", str(output), "--temperature", "0", "--max-new-tokens", "8"], check=True, timeout=300
    )
    result = json.loads(output.read_text())
    questions = [t["prompt"] for t in result["transcripts"]]
    assert "Who are you?" in questions and len(questions) == len(prompts.read_text().split("\n")) - 1
    assert result["generation"]["temperature"] == 0.0 and result["template"] == "vicuna_v1.1"
    model, tokenizer = load_model(tiny_vicuna)
    with Engine(model, tokenizer, max_batch_size=1) as engine:
        ids = encode_prompt(tokenizer, template.render([(template.USER, "Who are you?"), (template.ASSISTANT, None)]))
        expected = "".join(e.text for e in engine.generate(ids, SamplingParams(0.0, 1.0, 8)))
    assert result["transcripts"][questions.index("Who are you?")]["reply"] == expected
    # no temporary file left behind; the output's provenance beside it
    assert sorted(p.name for p in output.parent.iterdir()) == [f".{output.name}.vicunaflow.json", output.name]


def test_prompts_needs_output(tiny_vicuna, tmp_path):
    with pytest.raises(VicunaflowError, match="go together"):
        chat(model_path=tiny_vicuna, prompts=tmp_path / "p.txt")


def test_multiline_messages_end_with_an_empty_line(tiny_vicuna, monkeypatch, capsys):
    out = _chat_piped(
        monkeypatch,
        capsys,
        ["first line", "second line", "", "next question", ""],
        model_path=tiny_vicuna,
        multiline=True,
    )
    assert "USER: first line\nsecond line\n" in out and "USER: next question" in out
    assert len(_replies(out)) == 2


def test_fastchat_style_bare_flags():
    """`--load-8bit` and `--multiline` work without a value, as in FastChat's CLI."""
    from vicunaflow.cli import _bare_bool_flags, _normalize_flags

    argv = _bare_bool_flags(
        _normalize_flags(["chat", "--load-8bit", "--multiline", "--style", "rich", "--load-4bit", "false"])
    )
    assert argv == ["chat", "--load_8bit=true", "--multiline=true", "--style", "rich", "--load_4bit", "false"]


def test_model_paths_that_are_no_model_say_what_to_run(tiny_raw, tiny_delta, tiny_vicuna, tmp_path, monkeypatch):
    """A delta loaded and chatted (differences as weights); the others said "no config.json" for a folder that
    does not exist, for config.json itself, for a raw checkpoint, for a FastChat-style Hub id."""
    monkeypatch.chdir(tmp_path)
    cases = [
        (tiny_delta, f"{tiny_delta}: a Vicuna delta", "vicunaflow apply-delta"),
        (tiny_raw, f"{tiny_raw}: a raw Meta checkpoint", "vicunaflow convert"),
        (tiny_vicuna / "config.json", "is a file, not a model folder", f"({tiny_vicuna})"),
        (Path("lmsys/vicuna-7b-v1.5"), "no such folder (--model-path)", "download hf --repo lmsys/vicuna-7b-v1.5"),
        (Path("nope"), "nope: no such folder (--model-path)", ""),
    ]
    for path, *fragments in cases:
        with pytest.raises(VicunaflowError) as err:
            chat(model_path=path, max_new_tokens=4)
        assert all(fragment in str(err.value) for fragment in fragments), str(err.value)


def test_load_of_a_file_that_is_no_conversation_keeps_the_current_one(tiny_vicuna, tmp_path, monkeypatch, capsys):
    """Was: a JSON file without a "messages" list loaded as 0 exchanges, emptying the conversation (a number
    there raised a TypeError); each is now refused, naming the file, and the conversation is kept."""
    bad = {
        "no-messages.json": json.dumps({"template": "vicuna_v1.1"}),
        "not-a-list.json": json.dumps({"messages": 5}),
        "a-string.json": json.dumps({"messages": "hello"}),
        "bad-entries.json": json.dumps({"messages": [1, 2]}),
        "a-list.json": json.dumps([{"role": "user", "content": "hi"}]),
        "broken.json": '{"messages": [',
    }
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
    saved = tmp_path / "saved.json"
    lines = ["Hello", *(f"!!load {tmp_path / name}" for name in bad), f"!!save {saved}"]
    out = _chat_piped(monkeypatch, capsys, lines, model_path=tiny_vicuna)
    for name in bad:
        assert f"[cannot load {tmp_path / name}: " in out, name
    assert out.count("the current conversation is kept]") == len(bad) and "[loaded" not in out
    assert [m["content"] for m in json.loads(saved.read_text())["messages"]] == ["Hello", _replies(out)[0]]
    assert "[saved 1 exchanges" in out


def test_a_stopped_empty_or_failed_reply_is_not_kept(tiny_vicuna, tmp_path, monkeypatch, capsys):
    """Was: Ctrl-C before any text, or a failed generation, kept the question with an empty (or partial) answer,
    which the next prompt then sent to the model. Now both are dropped; a reply stopped after some text keeps it."""
    original, prompts = Engine.generate, []

    def generate(self, prompt_ids, params):
        prompt = self.tokenizer.decode(prompt_ids)
        prompts.append(prompt)
        if prompt.rstrip().endswith("stop at once ASSISTANT:"):
            raise KeyboardInterrupt
        if prompt.rstrip().endswith("fail ASSISTANT:"):
            yield from [Event("Half"), Event("", "error", error="boom")]
            return
        if prompt.rstrip().endswith("stop midway ASSISTANT:"):
            yield Event("Partial")
            raise KeyboardInterrupt
        yield from original(self, prompt_ids, params)

    monkeypatch.setattr(Engine, "generate", generate)
    saved = tmp_path / "saved.json"
    lines = ["Hello", "stop at once", "fail", "stop midway", "Last", f"!!save {saved}"]
    out = _chat_piped(monkeypatch, capsys, lines, model_path=tiny_vicuna)
    assert "[generation failed: boom" in out
    messages = [m["content"] for m in json.loads(saved.read_text())["messages"]]
    assert messages[::2] == ["Hello", "stop midway", "Last"] and messages[3] == "Partial"
    assert all(messages[1::2]), messages
    assert "stop at once" not in prompts[-1] and "fail" not in prompts[-1] and "Partial" in prompts[-1]


def test_windows_line_endings_do_not_reach_the_model(tiny_vicuna, tmp_path, monkeypatch, capsys):
    """Was: piped CRLF text kept a "\\r" at the end of each --multiline line, inside the message sent."""
    original, prompts = Engine.generate, []

    def generate(self, prompt_ids, params):
        prompts.append(self.tokenizer.decode(prompt_ids))
        yield from original(self, prompt_ids, params)

    monkeypatch.setattr(Engine, "generate", generate)
    saved = tmp_path / "saved.json"
    piped = io.TextIOWrapper(
        io.BytesIO(b"first line\r\nsecond line\r\n\r\n!!save " + bytes(saved) + b"\r\n\r\n"), newline="\n"
    )
    monkeypatch.setattr(sys, "stdin", piped)  # as sys.stdin: "\r\n" is not translated
    chat(model_path=tiny_vicuna, temperature=0.0, max_new_tokens=8, multiline=True)
    out = capsys.readouterr().out
    assert "USER: first line\nsecond line\n" in out and "\r" not in out
    assert "\r" not in prompts[0] and "first line\nsecond line" in prompts[0]
    assert json.loads(saved.read_text())["messages"][0]["content"] == "first line\nsecond line"

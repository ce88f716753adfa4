"""The Vicuna v1.1 prompt: template.render and the chat_template agree with FastChat's vicuna_v1.1."""

from __future__ import annotations

import pytest

from vicunaflow import template

CONVERSATIONS = [
    [("USER", "Hi"), ("ASSISTANT", None)],
    [("USER", "Hi"), ("ASSISTANT", "Hello! How can I help?")],
    [("USER", "What is 2+2?"), ("ASSISTANT", "4."), ("USER", "And 3+3?"), ("ASSISTANT", None)],
    [("USER", "  spaces  "), ("ASSISTANT", "line\nbreaks\n"), ("USER", "unicode: 中文 🦙"), ("ASSISTANT", "ok")],
    [("USER", "quote ' and \" and {{ braces }}"), ("ASSISTANT", None)],
]


def fastchat_prompt(turns, system=None) -> str:
    from fastchat.conversation import get_conv_template

    conv = get_conv_template("vicuna_v1.1")
    if system is not None:
        conv.set_system_message(system)
    for role, text in turns:
        conv.append_message(conv.roles[0] if role == "USER" else conv.roles[1], text)
    return conv.get_prompt()


@pytest.mark.parametrize("turns", CONVERSATIONS)
def test_render_matches_fastchat(turns):
    assert template.render(turns) == fastchat_prompt(turns)


def test_custom_system_prompt_matches_fastchat():
    turns = [("USER", "Hi"), ("ASSISTANT", None)]
    assert template.render(turns, system="Be brief.") == fastchat_prompt(turns, system="Be brief.")


def test_segments_mark_assistant_replies():
    pieces = list(template.segments([("USER", "a"), ("ASSISTANT", "b"), ("USER", "c"), ("ASSISTANT", "d")]))
    assert [is_reply for _, is_reply in pieces] == [False, True, False, True]
    assert pieces[1][0] == " b</s>"


def messages_of(turns, system=None):
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages += [{"role": "user" if r == "USER" else "assistant", "content": t} for r, t in turns if t is not None]
    return messages


@pytest.mark.parametrize("turns", CONVERSATIONS)
def test_chat_template_renders_like_fastchat(tiny_hf, turns):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf)
    text = tokenizer.apply_chat_template(messages_of(turns), tokenize=False)
    assert text == "<s>" + fastchat_prompt(turns)
    ids = tokenizer.apply_chat_template(messages_of(turns), tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert ids == tokenizer(fastchat_prompt(turns)).input_ids  # bos once, </s> as id 2


def test_chat_template_with_system_message(tiny_hf):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf)
    turns = [("USER", "Hi"), ("ASSISTANT", None)]
    text = tokenizer.apply_chat_template(messages_of(turns, system="Be brief."), tokenize=False)
    assert text == "<s>" + fastchat_prompt(turns, system="Be brief.")

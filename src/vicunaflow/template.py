"""The Vicuna v1.1 conversation format: the one definition used by data, chat, serve and chat_template.

Identical to FastChat's `vicuna_v1.1` template (tests compare with `fastchat.conversation`):

    {system} USER: {u1} ASSISTANT: {a1}</s>USER: {u2} ASSISTANT:
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
USER, ASSISTANT = "USER", "ASSISTANT"
SEP = " "  # after the system prompt and after each user turn
EOS = "</s>"  # after each assistant reply

# Roles as ShareGPT / FastChat data names them.
ROLE_OF = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT}


def system_or_default(system: str | None) -> str:
    """A conversation's own system prompt (a data record's `system`), or Vicuna's default where it has none."""
    return SYSTEM_PROMPT if system is None else system


def segments(turns: Sequence[tuple[str, str | None]], system: str = SYSTEM_PROMPT) -> Iterable[tuple[str, bool]]:
    """Yield (text, is_assistant_reply) pieces whose concatenation is the prompt.

    `turns` alternate USER/ASSISTANT, starting with USER; a final ASSISTANT turn of None asks the
    model to speak. Assistant pieces include their closing `</s>`: that is what training learns.
    The split points are where tokenisation must be done piece by piece for exact loss masks.
    """
    prefix = system + SEP
    for i, (role, text) in enumerate(turns):
        if role == USER:
            yield prefix + f"{USER}: {text}{SEP}{ASSISTANT}:", False
            prefix = ""
        elif role == ASSISTANT:
            if text is None:
                if i != len(turns) - 1:
                    raise ValueError("only the last assistant turn may be empty")
                return
            yield " " + text + EOS, True
        else:
            raise ValueError(f"unknown role {role!r}")


def render(turns: Sequence[tuple[str, str | None]], system: str = SYSTEM_PROMPT) -> str:
    """The whole prompt as one string (what fastchat's get_prompt() returns)."""
    return "".join(piece for piece, _ in segments(turns, system))


# A Jinja chat_template for tokenizer_config.json, so transformers, vLLM and others render
# conversations exactly as `render` does. bos is added by the template (the tokenizer adds it
# too when encoding plain text, but apply_chat_template encodes without special tokens).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = '" + SYSTEM_PROMPT.replace("'", "\\'") + "' %}{% endif %}"
    "{{ system + ' ' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ASSISTANT:' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + '</s>' }}"
    "{% endif %}"
    "{% endfor %}"
)

"""Our tokenizer.json encodes exactly as LLaMA's SentencePiece model (legacy, as Vicuna was trained)."""

from __future__ import annotations

import inspect
import json
import random
import re
from pathlib import Path

import pytest
import sentencepiece as spm

from vicunaflow import VicunaflowError, template
from vicunaflow.synth import train_tokenizer
from vicunaflow.tokenizer import write_tokenizer

SPECIAL = {"<unk>": 0, "<s>": 1, "</s>": 2}

FIXED_TEXTS = [
    "",
    " ",
    "  ",
    "hi",
    " hi",
    "hi ",
    "  two  spaces  here  ",
    "\n",
    "a\nb\n\n c",
    "tabs\tand\r\nreturns",
    "1234567890 3.14159 -42 1e-5 2023-04-01",
    "héllo wörld, ça va? ñandú",
    "中文字符和日本語のテキスト",
    "emoji 🦙🐪 and symbols ∑∫√ ≠ ™ ©",
    "▁already▁escaped ▁",
    "aaaaaaaaaaaaaaaaaaaa",
    "                    ",
    "...!!!???---___",
    "def f(x):\n    return x ** 2  # comment\n",
    template.render([("USER", "Who are you?"), ("ASSISTANT", None)]),  # no </s> yet: plain text
]


def random_texts(n: int, seed: int = 0) -> list[str]:
    pools = [
        "abcdefghijklmnopqrstuvwxyz",
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        "     \n\t",
        ".,;:!?'\"()[]{}<>/\\-_=+*&^%$#@~`|",
        "éèêàçñöüßøåæœ",
        "中文日本語한국어",
        "🦙🐪😀👍🏽",
        "▁",
        "\u200b\u00a0\u2028\ufeff",
    ]
    rng = random.Random(seed)
    words = ["USER", "ASSISTANT", "the", " the", "assistant", "llama", "Vicuna", "  ", "\n\n"]
    texts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 12)):
            if rng.random() < 0.3:
                parts.append(rng.choice(words))
            else:
                pool = rng.choice(pools)
                parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 8))))
        texts.append("".join(parts))
    return texts


@pytest.fixture(scope="module")
def wide_tokenizer_model(tmp_path_factory) -> Path:
    """A bigger LLaMA-style vocabulary trained on varied text (code, prose), to exercise many merges."""
    import collections
    import json as json_module
    import textwrap

    corpus = []
    for module in (collections, json_module, textwrap, inspect):
        corpus += inspect.getsource(module).splitlines()
    corpus += [template.SYSTEM_PROMPT, "USER: hello ASSISTANT: hi there</s>"] * 20
    corpus += ["héllo wörld ça va ñandú 中文字符和日本語のテキスト 🦙"] * 5
    path = tmp_path_factory.mktemp("wide-tokenizer") / "tokenizer.model"
    path.write_bytes(train_tokenizer(3000, corpus, character_coverage=0.9995))
    return path


def load_pair(tokenizer_model: Path, out: Path):
    from transformers import AutoTokenizer

    out.mkdir()
    write_tokenizer(tokenizer_model, out)
    return AutoTokenizer.from_pretrained(out), spm.SentencePieceProcessor(model_file=str(tokenizer_model))


@pytest.mark.parametrize("which", ["tiny", "wide"])
def test_encodes_like_sentencepiece(tmp_path, tiny_raw, wide_tokenizer_model, which):
    model = tiny_raw / "tokenizer.model" if which == "tiny" else wide_tokenizer_model
    hf, sp = load_pair(model, tmp_path / "tok")
    texts = FIXED_TEXTS + random_texts(400)
    mismatches = [t for t in texts if hf.encode(t) != [1, *sp.encode(t)]]
    assert not mismatches, [(t, hf.encode(t), [1, *sp.encode(t)]) for t in mismatches[:3]]
    for text in texts[:100]:
        ids = sp.encode(text)
        assert hf.decode(ids) == sp.decode(ids), text


def legacy_encode(sp, text: str) -> list[int]:
    """What LLaMA's original tokenizer did: split out special strings, SentencePiece each piece."""
    ids = [1]
    for piece in re.split(r"(<unk>|<s>|</s>)", text):
        ids += [SPECIAL[piece]] if piece in SPECIAL else sp.encode(piece)
    return ids


def test_special_strings_in_text_are_their_ids(tmp_path, tiny_raw):
    hf, sp = load_pair(tiny_raw / "tokenizer.model", tmp_path / "tok")
    for text in [
        " ASSISTANT: hi</s>USER:",
        "hello</s>",
        "</s></s>x",
        "<s>start",
        "a <unk> b",
        template.render([("USER", "a"), ("ASSISTANT", "b"), ("USER", "c"), ("ASSISTANT", "d")]),
    ]:
        assert hf.encode(text) == legacy_encode(sp, text), text
    # After </s> the next stretch starts with SentencePiece's dummy prefix: "▁USER", as Vicuna was trained.
    after_eos = hf.encode(" ASSISTANT: hi</s>USER:")
    assert after_eos[after_eos.index(2) + 1 :] == sp.encode("USER:")
    assert sp.id_to_piece(sp.encode("USER:")[0]).startswith("▁")


def test_special_tokens_and_config(tmp_path, tiny_raw):
    hf, _ = load_pair(tiny_raw / "tokenizer.model", tmp_path / "tok")
    assert (hf.bos_token, hf.eos_token, hf.unk_token) == ("<s>", "</s>", "<unk>")
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (1, 2, 0)
    assert hf("hi", add_special_tokens=False).input_ids == hf.encode("hi")[1:]
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == template.CHAT_TEMPLATE
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    for name in ("tokenizer.model", "tokenizer.json", "special_tokens_map.json"):
        assert (tmp_path / "tok" / name).is_file()


def test_rejects_a_non_sentencepiece_file(tmp_path):
    bogus = tmp_path / "tokenizer.model"
    bogus.write_bytes(b"not a model")
    (tmp_path / "out").mkdir()
    with pytest.raises(VicunaflowError, match="not a SentencePiece model"):
        write_tokenizer(bogus, tmp_path / "out")

"""Hugging Face tokenizer files for a LLaMA SentencePiece model, encoding exactly as LLaMA-1 did.

Vicuna was trained with the original (legacy) LLaMA tokenizer: every piece of text gets
SentencePiece's dummy-prefix "▁", spaces become "▁", and the special strings `<s>`, `</s>`,
`<unk>` in text are split out as their ids (so a training sample's "...reply</s>USER:" ends the
reply with id 2 and starts "▁USER"). transformers 5's `LlamaTokenizer` class rebuilds the backend
with a Metaspace pre-tokenizer that adds "▁" only where the text does not already start with one,
which encodes " ASSISTANT:" differently. So we write the legacy pipeline into tokenizer.json
ourselves (Prepend + Replace normalizer, byte-fallback BPE whose merges follow the piece scores)
and name the generic `PreTrainedTokenizerFast` class, which loads tokenizer.json as it is.
Result: `AutoTokenizer.from_pretrained(dir).encode(text) == [1] + sentencepiece.encode(text)` for
text without special strings (tests/test_tokenizer.py checks many strings).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from vicunaflow import VicunaflowError, template

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def has_tokenizer(model_path: str | Path) -> bool:
    """Whether the folder holds a tokenizer transformers can open: tokenizer.json or tokenizer.model."""
    return any(Path(model_path, name).is_file() for name in ("tokenizer.json", "tokenizer.model"))


def open_tokenizer(model_path: str | Path):
    """transformers' AutoTokenizer for a model folder. A damaged tokenizer file (empty, cut short, not JSON) is an
    error naming the folder's tokenizer files and the fix, not the tokenizers library's parse traceback."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_path))
    except Exception as err:  # tokenizers raises a bare Exception for a bad tokenizer.json
        present = [name for name in TOKENIZER_FILES if (Path(model_path) / name).is_file()]
        # transformers' own text runs over several lines, and without either file it asks for sentencepiece
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        if not has_tokenizer(model_path):
            reason = "neither tokenizer.json nor tokenizer.model is there"
        raise VicunaflowError(
            f"{model_path}: its tokenizer ({', '.join(present) or 'no tokenizer files'}) could not be read: "
            f"{reason}; restore these files from the model's source (or re-run the step that wrote them)"
        ) from err


def write_tokenizer(tokenizer_model: Path, output_dir: Path, model_max_length: int = 2048) -> list[Path]:
    """Write tokenizer.model, tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
    tokenizer_model, output_dir = Path(tokenizer_model), Path(output_dir)
    backend = build_tokenizer(tokenizer_model)
    if tokenizer_model.resolve() != (output_dir / "tokenizer.model").resolve():
        shutil.copyfile(tokenizer_model, output_dir / "tokenizer.model")
    backend.save(str(output_dir / "tokenizer.json"))
    write_tokenizer_config(output_dir, model_max_length)
    return [output_dir / name for name in TOKENIZER_FILES]


def write_tokenizer_config(output_dir: Path, model_max_length: int = 2048) -> None:
    """tokenizer_config.json (bos added, eos not, Vicuna chat_template) and special_tokens_map.json."""
    added = {
        str(i): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, token in enumerate(("<unk>", "<s>", "</s>"))
    }
    config = {
        # Loads tokenizer.json as written; `LlamaTokenizer` would replace our legacy normalizer (see module doc).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        **SPECIAL_TOKENS,
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": model_max_length,
        "padding_side": "right",
        "chat_template": template.CHAT_TEMPLATE,
    }
    (output_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (output_dir / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2) + "\n")


def build_tokenizer(tokenizer_model: Path):
    """A `tokenizers.Tokenizer` equivalent to the SentencePiece model, plus `<s>` prepended.

    Only BPE models with byte fallback (LLaMA's kind) are supported: their merge order is the
    piece score order, so a BPE over the same vocabulary merges exactly as SentencePiece does.
    """
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    try:
        proto = _load_proto(tokenizer_model)
        sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    except Exception as err:
        raise VicunaflowError(
            f"{tokenizer_model}: not a SentencePiece model ({err}); use LLaMA's tokenizer.model"
        ) from err
    if proto.trainer_spec.model_type != 2:  # 2 = BPE in sentencepiece_model.proto
        raise VicunaflowError(f"{tokenizer_model}: a SentencePiece BPE model is expected (LLaMA's kind)")
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    for token, expected in zip(("<unk>", "<s>", "</s>"), (0, 1, 2), strict=True):
        if sp.piece_to_id(token) != expected:
            raise VicunaflowError(f"{tokenizer_model}: {token} must have id {expected} as in LLaMA's tokenizer")

    vocab = {piece: i for i, piece in enumerate(pieces)}
    mergeable = {p: i for i, p in enumerate(pieces) if _is_normal(sp, i)}
    merges = _merges(mergeable)
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # SentencePiece's dummy prefix and space escaping, applied to every stretch of text between
    # special tokens (that is what the legacy slow tokenizer did, chunk by chunk).
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    backend.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    return backend


def _merges(mergeable: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges ordered as SentencePiece applies them: by the id (= score rank) of the merged piece.

    A piece that splits into two known pieces in several ways gets one merge per split, shorter
    left part first; SentencePiece gives them equal priority, and no LLaMA-like input reaches a
    state where two of them compete.
    """
    merges = []
    for piece, piece_id in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                merges.append((piece_id, cut, left, right))
    merges.sort()
    return [(left, right) for _, _, left, right in merges]


def _is_normal(sp, i: int) -> bool:
    return not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))


def _load_proto(tokenizer_model: Path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(tokenizer_model).read_bytes())
    return proto

"""Deterministic tiny LLaMA checkpoints and Vicuna deltas, for the offline demo, tests and benchmarks.

`synth llama` writes Meta's raw layout (as pyllama downloads it), `<folder>/<SIZE>/{params.json,
checklist.chk, consolidated.NN.pth}`, with the size's own tokenizer.model beside them. The tokenizer is a LLaMA-style SentencePiece BPE model trained on the fly on the built-in
conversations; weights are seeded random values. Same arguments, same bytes.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Literal

import torch

from vicunaflow import BUILTIN_CONVERSATIONS, template
from vicunaflow.checkpoint import ST_DTYPES
from vicunaflow.formats import meta_names, meta_shapes, unpermute_rotary
from vicunaflow.outputs import atomic_output_dir, check_output_dir, md5_file, write_manifest
from vicunaflow.sizes import get_size
from vicunaflow.tokenizer import TOKENIZER_FILES

log = logging.getLogger(__name__)

# Set at import: a process that imports synth (a test session building the tiny fixtures) goes on to
# use Hugging Face `tokenizers` (convert, data) and to fork (CLI subprocesses); after its thread pool
# was used, `tokenizers` warns on every fork. setdefault: a value the user chose wins.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def synth_llama(
    *,
    folder: Path = Path("pyllama_data"),
    model_size: str = "tiny",
    shards: int | None = None,
    n_kv_heads: int | None = None,
    dtype: Literal["float16", "bfloat16", "float32"] = "float16",
    seed: int = 0,
    vocab_size: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a random LLaMA checkpoint of a known size in Meta's layout, with a trained tokenizer.

    Writes `<folder>/<SIZE>/{tokenizer.model, params.json, checklist.chk, consolidated.NN.pth}`.

    Arguments:
        folder: pyllama's download folder; the checkpoint goes to `<folder>/<SIZE>/`.
        model_size: a size name (tiny, 7B/7b, 13B, 30B/33b, 65B); real sizes give real shapes (for benchmarks).
        shards: model-parallel shard count; default: the size's own (tiny 2, 7B 1, 13B 2, 30B 4, 65B 8).
        n_kv_heads: grouped-query attention heads (as in Llama 2 70B); default: none (multi-head).
        dtype: tensor dtype of the shards (the LLaMA-1 release is float16).
        seed: random seed; the same seed gives the same bytes.
        vocab_size: tokenizer vocabulary; default: the size's (32000 for real sizes, 1024 for tiny).
        overwrite: replace a `<folder>/<SIZE>/` that exists but is not a complete vicunaflow output (default: refuse).
    """
    log.info(
        "synth llama: folder=%s model_size=%s shards=%s n_kv_heads=%s dtype=%s seed=%d vocab_size=%s",
        folder, model_size, shards, n_kv_heads, dtype, seed, vocab_size,
    )  # fmt: skip
    size = get_size(model_size)
    check_output_dir(Path(folder) / size.raw_dir, overwrite=overwrite)  # before any work
    shards = shards or size.shards
    vocab_size = vocab_size or size.vocab_size
    params = size.params_json
    if n_kv_heads:
        params["n_kv_heads"] = n_kv_heads
    with atomic_output_dir(Path(folder) / size.raw_dir, overwrite=overwrite) as out:
        # The tokenizer sits inside the size folder (convert looks there first), not at pyllama's
        # shared `<folder>/tokenizer.model`: a synthetic size never clobbers a real tokenizer.
        tokenizer_path = out / "tokenizer.model"
        tokenizer_path.write_bytes(train_tokenizer(vocab_size))
        log.info("writing a random %s checkpoint (%d shards, %s) to %s", size.raw_dir, shards, dtype, folder)
        write_raw_checkpoint(out, params, _piece_count(tokenizer_path), shards, getattr(torch, dtype), seed)
        (out / "params.json").write_text(json.dumps(params) + "\n")
        lines = [f"{md5_file(p)}  {p.name}\n" for p in sorted(out.iterdir())]
        (out / "checklist.chk").write_text("".join(lines))
        # After the checklist, so that it lists exactly the checkpoint files, as Meta's does.
        write_manifest(
            out,
            inputs=[BUILTIN_CONVERSATIONS] if BUILTIN_CONVERSATIONS.exists() else [],
            kind="synthetic-llama",
            model_size=size.raw_dir,
            shards=shards,
            n_kv_heads=n_kv_heads,
            dtype=dtype,
            seed=seed,
            vocab_size=vocab_size,
        )
    return folder / size.raw_dir


def synth_delta(
    *,
    base: Path,
    output_dir: Path,
    seed: int = 1,
    scale: float = 0.01,
    shard_tensors: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a random Vicuna-style delta for a Hugging Face base, in the published `.bin` layout.

    The delta holds `pytorch_model-0000N-of-0000M.bin` shards, their index, config.json and the
    tokenizer files, as lmsys/vicuna-*-delta-v1.1 do. Adding it to `base` gives the tiny "Vicuna".

    Arguments:
        base: a Hugging Face LLaMA directory (safetensors) the delta is made for.
        output_dir: where to write the delta.
        seed: random seed; the same seed gives the same bytes.
        scale: standard deviation of the random delta values.
        shard_tensors: tensors per `.bin` shard; 0 splits into two shards.
        overwrite: replace an output_dir that exists but is not a complete vicunaflow output (default: refuse).
    """
    from safetensors import safe_open

    base, output_dir = Path(base), Path(output_dir)
    log.info(
        "synth delta: base=%s output_dir=%s seed=%d scale=%s shard_tensors=%d",
        base, output_dir, seed, scale, shard_tensors,
    )  # fmt: skip
    check_output_dir(output_dir, inputs=[base], overwrite=overwrite)  # before any work
    index = json.loads((base / "model.safetensors.index.json").read_text())
    names = list(index["weight_map"])
    per_shard = shard_tensors or -(-len(names) // 2)
    groups = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    generator = torch.Generator().manual_seed(seed)
    with atomic_output_dir(output_dir, inputs=[base], overwrite=overwrite) as out:
        scratch = _ScratchTensors(out / ".scratch")  # a real-size shard need not fit in RAM
        weight_map = {}
        for n, group in enumerate(groups, start=1):
            shard_name = f"pytorch_model-{n:05d}-of-{len(groups):05d}.bin"
            state = {}
            for name in group:
                with safe_open(base / index["weight_map"][name], framework="pt") as f:
                    like = f.get_slice(name)
                    shape, dtype = like.get_shape(), ST_DTYPES[like.get_dtype()]
                state[name] = scratch.copy((torch.randn(shape, generator=generator) * scale).to(dtype))
                weight_map[name] = shard_name
            torch.save(state, out / shard_name)
            scratch.release(state.values())
            state.clear()
        scratch.close()
        total = sum((out / s).stat().st_size for s in set(weight_map.values()))
        (out / "pytorch_model.bin.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
        )
        for name in ("config.json", "generation_config.json", *TOKENIZER_FILES):
            if (base / name).exists():
                (out / name).write_bytes((base / name).read_bytes())
        write_manifest(out, inputs=[base / "model.safetensors.index.json"], kind="synthetic-delta", seed=seed)
    return output_dir


def write_raw_checkpoint(out: Path, params: dict, vocab_size: int, shards: int, dtype: torch.dtype, seed: int) -> None:
    """Random weights with Meta's names, split into model-parallel shards the way Meta splits them.

    Tensors are generated one at a time (full size, then sliced) into file-backed scratch tensors,
    so real 7B/13B shapes fit in memory: one full tensor in RAM; the shards' pages are the kernel's
    to write out and drop (a 13B model, 26 GB, is bigger than many machines' RAM).
    """
    n_heads, n_layers = params["n_heads"], params["n_layers"]
    n_kv_heads = params.get("n_kv_heads") or n_heads
    if n_heads % shards or n_kv_heads % shards:
        raise ValueError(f"{shards} shards do not divide {n_heads} heads / {n_kv_heads} kv heads")
    shapes = meta_shapes(params, vocab_size)
    generator = torch.Generator().manual_seed(seed)
    scratch = _ScratchTensors(out / ".scratch")
    states: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    for name, (_, merge_dim) in meta_names(n_layers).items():
        shape = shapes[name]
        if len(shape) == 1:
            full = 1.0 + 0.1 * torch.randn(shape, generator=generator)  # RMSNorm gains near 1
        else:
            full = torch.randn(shape, generator=generator) * (1.0 / shape[1] ** 0.5)
        full = full.to(dtype)
        if name.endswith(("wq.weight", "wk.weight")):
            # Stored in Meta's interleaved-rotary order, like a real release.
            heads = n_heads if name.endswith("wq.weight") else n_kv_heads
            full = unpermute_rotary(full, heads)
        for rank in range(shards):
            states[rank][name] = scratch.copy(full if merge_dim is None else full.chunk(shards, dim=merge_dim)[rank])
        del full
    for rank, state in enumerate(states):
        torch.save(state, out / f"consolidated.{rank:02d}.pth")
        scratch.release(states[rank].values())
        states[rank].clear()
    scratch.close()


def train_tokenizer(vocab_size: int, corpus: list[str] | None = None, character_coverage: float = 1.0) -> bytes:
    """Train a LLaMA-style SentencePiece BPE model (byte fallback, digits split, <unk>/<s>/</s> = 0/1/2).

    `corpus` defaults to the built-in conversations and the system prompt.
    """
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        # An iterator, not a file: the model records its input path, which would vary.
        sentence_iterator=iter(_corpus_lines() if corpus is None else corpus),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        hard_vocab_limit=False,
        character_coverage=character_coverage,
        num_threads=1,  # one thread: the same corpus always gives the same model bytes
        minloglevel=2,
    )
    return _pad_vocabulary(model.getvalue(), vocab_size)


def _corpus_lines() -> list[str]:
    lines = [template.SYSTEM_PROMPT, "USER: ASSISTANT:"]
    if BUILTIN_CONVERSATIONS.exists():
        for record in json.loads(BUILTIN_CONVERSATIONS.read_text()):
            lines += [turn["value"] for turn in record["conversations"]]
    return lines


def _pad_vocabulary(model_bytes: bytes, vocab_size: int) -> bytes:
    """Pad a trained model with unused pieces up to exactly `vocab_size`.

    The built-in corpus yields ~4.4k pieces; LLaMA's vocabulary is 32000, and the embedding and
    output matrices of a real-shape checkpoint must have 32000 rows. UNUSED pieces are never
    produced by encoding, so tokenization is unchanged.
    """
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(model_bytes)
    missing = vocab_size - len(model.pieces)
    if missing <= 0:
        return model_bytes
    for i in range(missing):
        model.pieces.add(piece=f"<unused{i}>", score=0.0, type=sentencepiece_model_pb2.ModelProto.SentencePiece.UNUSED)
    model.trainer_spec.vocab_size = vocab_size
    return model.SerializeToString()


class _ScratchTensors:
    """Tensors backed by files in a scratch folder (shared mmap): RAM holds only what the kernel keeps cached."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.paths: dict[int, Path] = {}  # id(tensor) -> its backing file
        self.count = 0

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        path = self.folder / f"{self.count}.bin"
        self.count += 1
        backed = torch.from_file(str(path), shared=True, size=tensor.numel(), dtype=tensor.dtype).view(tensor.shape)
        backed.copy_(tensor)
        self.paths[id(backed)] = path
        return backed

    def release(self, tensors) -> None:
        for tensor in tensors:
            self.paths.pop(id(tensor)).unlink()

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _piece_count(tokenizer_path: Path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tokenizer_path)).get_piece_size()

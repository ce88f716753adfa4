"""`vicunaflow convert`: Meta's raw LLaMA checkpoint -> a Hugging Face LlamaForCausalLM directory.

Bit-exact and streaming: each output tensor is the concatenation of its model-parallel slices
(formats.LAYER_NAMES gives the dim), q/k rows permuted from interleaved to rotate-half rotary,
in the checkpoint's own dtype unless `--dtype` asks otherwise. Shards are memory-mapped and
read one tensor at a time; output goes straight to safetensors shards (checkpoint.py), so memory
stays near one layer whatever the model size. transformers' old converter loaded every shard,
then re-loaded the model to save it, and silently wrote bfloat16. With Meta's `checklist.chk`
beside the shards, each shard's md5 is computed in the same pass (ShardChecksums) and a shard
that differs fails the conversion before any output appears.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from vicunaflow import VicunaflowError, require_file
from vicunaflow.checkpoint import PickleFile, ShardedSafetensorsWriter, TensorInfo, parse_size
from vicunaflow.formats import (
    DTYPES,
    GENERATION_CONFIG,
    GLOBAL_NAMES,
    IGNORED_META_KEYS,
    LAYER_NAMES,
    hf_config,
    meta_names,
    meta_shapes,
    permute_rotary,
)
from vicunaflow.outputs import atomic_output_dir, check_output_dir, write_manifest
from vicunaflow.tokenizer import write_tokenizer

log = logging.getLogger(__name__)


def convert(
    *,
    input_dir: Path,
    output_dir: Path,
    tokenizer: Path | None = None,
    dtype: Literal["keep", "float16", "bfloat16", "float32"] = "keep",
    max_shard_size: str = "5GB",
    max_position_embeddings: int = 2048,
    overwrite: bool = False,
) -> Path:
    """Convert a raw LLaMA checkpoint (params.json + consolidated.NN.pth) to Hugging Face format.

    Arguments:
        input_dir: the raw checkpoint folder, e.g. pyllama_data/13B (1, 2, 4 or 8 shards; read from the files).
        output_dir: the Hugging Face directory to write, e.g. llama-13b-hf.
        tokenizer: LLaMA's tokenizer.model; default: found in input_dir or its parent (pyllama's layout).
        dtype: keep the checkpoint's dtype bit for bit (default), or convert on purpose.
        max_shard_size: largest safetensors shard, e.g. 5GB, 500MB, 2GiB.
        max_position_embeddings: context length for config.json (2048 for LLaMA-1, 4096 for Llama 2).
        overwrite: replace an output_dir that exists but is not a complete vicunaflow output (default: refuse).
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    log.info(
        "convert: input_dir=%s output_dir=%s tokenizer=%s dtype=%s max_shard_size=%s max_position_embeddings=%d",
        input_dir, output_dir, tokenizer, dtype, max_shard_size, max_position_embeddings,
    )  # fmt: skip
    parse_size(max_shard_size)  # a size without its unit fails here, before any work
    if max_position_embeddings < 1:
        raise VicunaflowError(
            f"--max-position-embeddings {max_position_embeddings}: must be at least 1 (2048 for LLaMA-1, 4096 for Llama 2)"
        )
    check_output_dir(output_dir, inputs=[input_dir, tokenizer], overwrite=overwrite)  # before any work
    checklist = read_checklist(input_dir)
    params = read_params(input_dir)
    tokenizer_path = find_tokenizer(input_dir, tokenizer)
    shards = open_shards(input_dir, params, checklist)
    merged = merged_infos(shards, params)
    vocab_size = _check_vocab(merged, tokenizer_path, params, input_dir / "params.json")
    source_dtype = merged["tok_embeddings.weight"].dtype
    out_dtype = None if dtype == "keep" else DTYPES[dtype]
    plan = [(hf, TensorInfo(merged[meta].shape, out_dtype or merged[meta].dtype)) for meta, hf in output_order(params)]
    log.info(
        "%d shards, %d layers, dim %d, %d heads (%d kv), vocab %d, %s -> %s",
        len(shards), params["n_layers"], params["dim"], params["n_heads"], params.get("n_kv_heads") or params["n_heads"],
        vocab_size, source_dtype, out_dtype or source_dtype,
    )  # fmt: skip

    # Two reused merge buffers: the writer's thread saves one while the next merge fills the other
    # (never more than one write in flight), and no fresh memory is faulted in per tensor.
    largest = max(merged[meta].nbytes // merged[meta].dtype.itemsize for meta, _ in output_order(params))
    buffers = [torch.empty(largest, dtype=source_dtype) for _ in range(2)]
    written = 0
    with (
        atomic_output_dir(output_dir, inputs=[input_dir, tokenizer_path], overwrite=overwrite) as out,
        ShardedSafetensorsWriter(out, plan, max_shard_size) as writer,
    ):
        n_layers = params["n_layers"]
        layers = {i: [] for i in range(-1, n_layers + 1)}  # -1: embeddings, n_layers: final norm + head
        for meta, hf in output_order(params):
            layers[_layer_of(meta, n_layers)].append((meta, hf))
        with ShardChecksums(shards, checklist) as checksums:
            for layer, names in tqdm(sorted(layers.items()), desc="convert", unit="layer", disable=None):
                if 0 <= layer < n_layers and layer % max(1, n_layers // 10) == 0:  # for log files (tqdm is off)
                    log.info("layer %d of %d", layer + 1, n_layers)
                for meta, hf in names:
                    buffer = buffers[written % 2][: torch.Size(merged[meta].shape).numel()].view(merged[meta].shape)
                    tensor = merge_tensor(shards, meta, params, out=buffer)  # the full tensor of this name
                    checksums.read(meta)
                    writer.write(hf, tensor if out_dtype is None else tensor.to(out_dtype))
                    written += 1
            checksums.verify()  # before anything is committed: a corrupt shard leaves no output
        for shard in shards:
            shard.release()
        writer.close()
        config = hf_config(params, vocab_size, out_dtype or source_dtype, max_position_embeddings)
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
        write_tokenizer(tokenizer_path, out, model_max_length=max_position_embeddings)
        inputs = [input_dir / "params.json", tokenizer_path]
        inputs += [
            p for p in (input_dir / "checklist.chk", tokenizer_path.parent / "tokenizer_checklist.chk") if p.exists()
        ]
        write_manifest(
            out, inputs=inputs, kind="convert", dtype=dtype, shards=len(shards), source_dtype=str(source_dtype)
        )
    log.info("wrote %s", output_dir)
    return output_dir


CHECKLIST = "checklist.chk"
SHARD_NAME = re.compile(r"consolidated\.(\d+)\.pth")
REDOWNLOAD = "download it again (vicunaflow download llama, or Meta's download.sh)"


def read_checklist(input_dir: Path) -> dict[str, str] | None:
    """checklist.chk beside the shards ({file: md5}), its small files checked now; None when there is none.

    The shards themselves are checked while they are converted (ShardChecksums), not in a pass of their own.
    """
    path = input_dir / CHECKLIST
    if not path.is_file():
        return None
    from vicunaflow.download.meta import parse_checklist
    from vicunaflow.outputs import md5_file

    checklist = parse_checklist(path.read_text(encoding="utf-8", errors="replace"), str(path))
    for name, expected in checklist.items():
        if not SHARD_NAME.fullmatch(name) and (input_dir / name).is_file() and md5_file(input_dir / name) != expected:
            raise VicunaflowError(f"{input_dir / name}: md5 differs from {path}; the file is corrupt: {REDOWNLOAD}")
    return checklist


def read_params(input_dir: Path) -> dict:
    path = input_dir / "params.json"
    if not input_dir.is_dir():
        what = "a file, not a directory" if input_dir.exists() else "no such directory"
        raise VicunaflowError(f"{input_dir}: {what}; expected a raw LLaMA folder such as pyllama_data/7B")
    if not path.exists():
        sizes = sorted(d.name for d in input_dir.iterdir() if (d / "params.json").is_file())
        if sizes:  # pyllama_data itself, as transformers' script took it (with --model_size)
            raise VicunaflowError(
                f"{path}: missing; {input_dir} holds the size folders {', '.join(sizes)}: give --input-dir "
                f"{input_dir / sizes[0]} (the folder of one size)"
            )
        raise VicunaflowError(f"{path}: missing; a raw LLaMA folder holds params.json next to consolidated.NN.pth")
    try:
        params = json.loads(path.read_text())
    except ValueError as err:
        raise VicunaflowError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(params, dict):
        raise VicunaflowError(f"{path}: not a JSON object; is this Meta's params.json?")
    missing = [k for k in ("dim", "n_layers", "n_heads", "norm_eps") if k not in params]
    if missing:
        raise VicunaflowError(f"{path}: missing {', '.join(missing)}; is this Meta's params.json?")
    params.setdefault("multiple_of", 256)
    _check_params(path, params)
    return params


def _check_params(path: Path, params: dict) -> None:
    """Each value params.json gives is of a usable type and range, and the head sizes add up."""
    restore = "restore the params.json that came with the shards"

    def positive(key: str, kind: type | tuple[type, ...]) -> None:
        value = params.get(key)
        if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
            expected = "a whole number" if kind is int else "a number"
            raise VicunaflowError(f"{path}: {key} is {json.dumps(value)}, expected {expected} above 0; {restore}")

    for key in ("dim", "n_layers", "n_heads", "multiple_of"):
        positive(key, int)
    if params.get("n_kv_heads") is not None:
        positive("n_kv_heads", int)
    positive("norm_eps", (int, float))
    for key in ("ffn_dim_multiplier", "rope_theta"):
        if params.get(key) is not None:
            positive(key, (int, float))
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv_heads = params.get("n_kv_heads") or n_heads
    if dim % n_heads or (dim // n_heads) % 2:
        raise VicunaflowError(
            f"{path}: dim {dim} over n_heads {n_heads} is not an even head size (rotary pairs need one); {restore}"
        )
    if n_heads % n_kv_heads:
        raise VicunaflowError(f"{path}: n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}; {restore}")


def find_tokenizer(input_dir: Path, tokenizer: Path | None) -> Path:
    """tokenizer.model: the one given, else in input_dir, else in its parent (pyllama_data/tokenizer.model)."""
    if tokenizer:
        inside = Path(tokenizer, "tokenizer.model")
        hint = f" ({inside})" if inside.is_file() else ""
        return require_file(
            tokenizer, "tokenizer file", f"--tokenizer the SentencePiece tokenizer.model file itself{hint}"
        )
    candidates = [input_dir / "tokenizer.model", input_dir.parent / "tokenizer.model"]
    for path in candidates:
        if path.is_file():
            return path
    raise VicunaflowError(
        f"{candidates[0]}: tokenizer not found (looked in {', '.join(str(p) for p in candidates)}); "
        "download it with the weights or pass --tokenizer"
    )


def open_shards(input_dir: Path, params: dict, checklist: dict[str, str] | None = None) -> list[PickleFile]:
    paths = sorted(input_dir.glob("consolidated.*.pth"))
    if checklist is not None:
        listed = sorted(name for name in checklist if SHARD_NAME.fullmatch(name))
        missing = [name for name in listed if not (input_dir / name).is_file()]
        unlisted = sorted({p.name for p in paths} - set(listed))
        if missing:
            raise VicunaflowError(f"{input_dir}: {', '.join(missing)} missing (listed in {CHECKLIST}); {REDOWNLOAD}")
        if unlisted:
            raise VicunaflowError(
                f"{input_dir}: {', '.join(unlisted)} not in {CHECKLIST}; a shard from another checkpoint? remove it"
            )
    if not paths:
        raise VicunaflowError(f"{input_dir}: no consolidated.NN.pth shards found")
    expected = [input_dir / f"consolidated.{i:02d}.pth" for i in range(len(paths))]
    if paths != expected:
        raise VicunaflowError(
            f"{input_dir}: shards must be consolidated.00.pth .. {expected[-1].name}, found {[p.name for p in paths]}"
        )
    shards = [PickleFile(p) for p in paths]
    _check_params_match_weights(shards[0], params)
    _check_shard_count(shards, params)
    n_heads = params["n_heads"]
    n_kv_heads = params.get("n_kv_heads") or n_heads
    if n_heads % len(paths) or n_kv_heads % len(paths):
        raise VicunaflowError(
            f"{input_dir / 'params.json'}: {n_heads} heads ({n_kv_heads} key/value heads) cannot be split into "
            f"{len(paths)} shards; is a consolidated.NN.pth missing or extra?"
        )
    return shards


def _check_params_match_weights(first: PickleFile, params: dict) -> None:
    """params.json against what any one shard shows: norm.weight (replicated) has dim values, and LLaMA-1's
    rope.freqs buffers hold head_dim / 2 (n_heads is otherwise seen in no shape: a wrong one converts silently)."""
    params_path = first.path.parent / "params.json"
    fix = "params.json of another model? restore the one that came with these shards"
    names = first.names()
    if "norm.weight" in names and first.info("norm.weight").shape != (params["dim"],):
        raise VicunaflowError(
            f"{params_path}: dim {params['dim']}, but norm.weight in {first.path.name} has shape "
            f"{list(first.info('norm.weight').shape)}; {fix}"
        )
    head_dim = params["dim"] // params["n_heads"]
    for name in (n for n in names if IGNORED_META_KEYS.match(n)):
        shape = first.info(name).shape
        if len(shape) == 1 and shape[0] != head_dim // 2:
            raise VicunaflowError(
                f"{params_path}: dim {params['dim']} over n_heads {params['n_heads']} gives heads of {head_dim}, but "
                f"{name} in {first.path.name} is for heads of {2 * shape[0]}; {fix}"
            )


def _check_shard_count(shards: list[PickleFile], params: dict) -> None:
    """Name missing trailing shards: each holds dim / n_shards columns of tok_embeddings (split on dim 1)."""
    if "tok_embeddings.weight" not in shards[0].names():
        return  # merged_infos reports the missing name
    columns = shards[0].info("tok_embeddings.weight").shape[-1]
    dim = params["dim"]
    if columns and dim % columns == 0 and dim // columns > len(shards):
        missing = [f"consolidated.{i:02d}.pth" for i in range(len(shards), dim // columns)]
        raise VicunaflowError(
            f"{shards[0].path.parent}: {', '.join(missing)} missing: {shards[0].path.name} holds {columns} of the "
            f"{dim} embedding columns (params.json dim), so the checkpoint has {dim // columns} shards, "
            f"found {len(shards)}; {REDOWNLOAD}"
        )


def output_order(params: dict) -> list[tuple[str, str]]:
    """(Meta name, Hugging Face name) in the order written: embeddings, layer by layer, norm, head."""
    n_layers = params["n_layers"]
    # sorted() is stable: within a layer (and for norm before output) meta_names' own order stays.
    ordered = sorted(meta_names(n_layers).items(), key=lambda item: _layer_of(item[0], n_layers))
    return [(meta, hf) for meta, (hf, _) in ordered]


def merge_dims(n_layers: int) -> dict[str, int | None]:
    return {meta: dim for meta, (_, dim) in meta_names(n_layers).items()}


def merged_infos(shards: list[PickleFile], params: dict) -> dict[str, TensorInfo]:
    """Shape and dtype of every merged tensor, checking that the shards agree with each other and with params."""
    dims = merge_dims(params["n_layers"])
    first = shards[0]
    for shard in shards:
        names = {n for n in shard.names() if not IGNORED_META_KEYS.match(n)}
        missing, extra = sorted(set(dims) - names), sorted(names - set(dims))
        if missing or extra:
            raise VicunaflowError(
                f"{shard.path}: tensor names do not match params.json ({params['n_layers']} layers): "
                f"missing {missing[:3]}, unexpected {extra[:3]}"
            )
    merged = {}
    for name, dim in dims.items():
        shape0, dtype0 = first.info(name).shape, first.info(name).dtype
        for shard in shards[1:]:
            info = shard.info(name)
            same_other_dims = len(info.shape) == len(shape0) and all(
                a == b for d, (a, b) in enumerate(zip(info.shape, shape0, strict=True)) if d != dim
            )
            if not same_other_dims or info.dtype != dtype0:
                raise VicunaflowError(
                    f"{shard.path}: {name} is {list(info.shape)} {info.dtype} but {first.path.name} has "
                    f"{list(shape0)} {dtype0}; the shards come from different checkpoints"
                )
        shape = list(shape0)
        if dim is not None:
            shape[dim] = sum(s.info(name).shape[dim] for s in shards)
        merged[name] = TensorInfo(tuple(shape), dtype0)
    _check_shapes(merged, shards, params)
    return merged


def _check_shapes(merged: dict[str, TensorInfo], shards: list[PickleFile], params: dict) -> None:
    expected = meta_shapes(params, vocab_size=merged["tok_embeddings.weight"].shape[0])
    for name, shape in expected.items():
        if merged[name].shape != shape:
            slices = ", ".join(f"{s.path.name} {list(s.info(name).shape)}" for s in shards)
            raise VicunaflowError(
                f"{shards[0].path.parent / 'params.json'}: merged {name} is {list(merged[name].shape)} ({slices}), "
                f"params.json implies {list(shape)}; a shard from another checkpoint, or wrong dim, n_heads, "
                "n_kv_heads, multiple_of or ffn_dim_multiplier"
            )


def _check_vocab(merged: dict[str, TensorInfo], tokenizer_path: Path, params: dict, params_path: Path) -> int:
    import sentencepiece as spm

    vocab = merged["tok_embeddings.weight"].shape[0]
    declared = params.get("vocab_size", -1)
    if declared not in (-1, None) and declared != vocab:
        raise VicunaflowError(
            f"{params_path}: vocab_size {declared}, but the embeddings have {vocab} rows; restore the params.json "
            "that came with the shards"
        )
    try:
        pieces = spm.SentencePieceProcessor(model_file=str(tokenizer_path)).get_piece_size()
    except Exception as err:
        raise VicunaflowError(f"{tokenizer_path}: not a SentencePiece model ({err})") from err
    if pieces != vocab:
        raise VicunaflowError(
            f"{tokenizer_path}: {pieces} pieces, but the checkpoint has {vocab}; wrong tokenizer.model?"
        )
    return vocab


def merge_tensor(shards: list[PickleFile], name: str, params: dict, out: torch.Tensor | None = None) -> torch.Tensor:
    """The full tensor: slices concatenated along the merge dim (into `out` if given), q/k rows in rotate-half order."""
    dim = merge_dims_for(name)
    if dim is None:  # norm gains are replicated: every shard holds the same values, take the first
        return shards[0].get(name)
    slices = [shard.get(name) for shard in shards]
    if out is None or out.dtype != slices[0].dtype:
        out = torch.empty(0, dtype=slices[0].dtype)
    tensor = torch.cat(slices, dim=dim, out=out)
    if name.endswith("attention.wq.weight"):
        tensor = permute_rotary(tensor, params["n_heads"])  # (dim, dim)
    elif name.endswith("attention.wk.weight"):
        tensor = permute_rotary(tensor, params.get("n_kv_heads") or params["n_heads"])  # (kv_dim, dim)
    return tensor


class ShardChecksums:
    """Each shard's md5 against checklist.chk, hashed in file order as far as the conversion has read it.

    The tensors come from memory-mapped files, mostly in file order; after each one, a background
    thread hashes its shard up to the end of that tensor's bytes, which the mapping has just read
    into the page cache. So a checksum costs no second pass over the disk, and `verify()` has the
    verdict as soon as the last tensor is read (the rest of a file: its zip directory, ignored keys).
    Without a checklist every call is a no-op.
    """

    def __init__(self, shards: list[PickleFile], checklist: dict[str, str] | None) -> None:
        self.checklist = checklist
        self.shards = shards if checklist is not None else []
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="md5")  # one: hashes advance in order
        self._files = [open(shard.path, "rb") for shard in self.shards]  # noqa: SIM115 (closed in __exit__)
        self._md5 = [hashlib.md5() for _ in self.shards]
        self._done = [0] * len(self.shards)
        self._spans = [shard.file_spans() or {} for shard in self.shards]  # {}: the whole file at verify()
        self._pending: list[Future] = []

    def read(self, name: str) -> None:
        """The conversion has just read `name` from every shard: hash each file up to its end."""
        for i, spans in enumerate(self._spans):
            if name in spans:
                self._pending.append(self._io.submit(self._advance, i, spans[name][1]))
        self._pending = [f for f in self._pending if not f.done() or f.result()]  # re-raise a failed read

    def verify(self) -> None:
        for i, shard in enumerate(self.shards):
            self._pending.append(self._io.submit(self._advance, i, shard.path.stat().st_size))
        for future in self._pending:
            future.result()
        bad = [
            shard.path
            for shard, md5 in zip(self.shards, self._md5, strict=True)
            if md5.hexdigest() != self.checklist[shard.path.name]
        ]
        if bad:
            raise VicunaflowError(
                f"{', '.join(map(str, bad))}: md5 differs from {bad[0].parent / CHECKLIST}; "
                f"the shard is corrupt or incomplete: {REDOWNLOAD}; if you changed it on purpose, delete {CHECKLIST}"
            )
        if self.shards:
            log.info("%d shards match %s", len(self.shards), CHECKLIST)

    def _advance(self, i: int, end: int) -> None:
        while self._done[i] < end:
            block = self._files[i].read(min(1 << 24, end - self._done[i]))
            if not block:
                break
            self._md5[i].update(block)
            self._done[i] += len(block)

    def __enter__(self) -> ShardChecksums:
        return self

    def __exit__(self, *exc) -> None:
        self._io.shutdown(wait=True, cancel_futures=True)
        for f in self._files:
            f.close()


def merge_dims_for(name: str) -> int | None:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name][1]
    _, _, rest = name.split(".", 2)  # layers.{i}.<rest>
    return LAYER_NAMES["layers.{i}." + rest][1]


def _layer_of(meta: str, n_layers: int) -> int:
    if meta.startswith("layers."):
        return int(meta.split(".")[1])
    return -1 if meta == "tok_embeddings.weight" else n_layers

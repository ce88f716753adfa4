"""`vicunaflow apply-delta` / `make-delta`: Vicuna = LLaMA + delta, tensor by tensor and exact.

lmsys published Vicuna v1.1 as a delta to add to LLaMA. FastChat's apply_delta loads both models
whole (30 GB of RAM for 7B); here one tensor pair at a time is read (memory-mapped, safetensors
or pickled `.bin` on either side) and written straight to safetensors, so memory stays near the
largest tensor. The sum is defined exactly: target = dtype(float32(base) + float32(delta)), with
dtype the one the delta's config.json declares for the target.

make-delta is the inverse and is checked, not hoped for. A delta in the target's own 16-bit
dtype (what lmsys published) cannot always give the target back: T - B rounded to 11 bits and
added to B misses T as soon as |T| is a few hundred times smaller than |B|, which a fine-tune
pushing a weight through zero does. So deltas are stored in float32 (float64 for float32
targets), where the sum only misses for |T| below about |B| / 8192 in float16 (|B| / 65536 in
bfloat16), e.g. B = 1.0 and T = 6e-8; every element is checked by applying the delta, and
make-delta stops with an error rather than write a delta that would not round-trip.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from vicunaflow import VicunaflowError
from vicunaflow.checkpoint import Checkpoint, ShardedSafetensorsWriter, TensorInfo, parse_size
from vicunaflow.engine.build import check_folder
from vicunaflow.formats import DTYPES, GENERATION_CONFIG
from vicunaflow.loading import recorded_role, require_model_dir
from vicunaflow.outputs import atomic_output_dir, check_output_dir, write_manifest
from vicunaflow.tokenizer import has_tokenizer, write_tokenizer, write_tokenizer_config

log = logging.getLogger(__name__)

EMBEDDINGS = "model.embed_tokens.weight"
SMALL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def apply_delta(
    *,
    base: Path,
    delta: Path,
    target: Path,
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto",
    max_shard_size: str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Add a Vicuna delta to a LLaMA base: target = dtype(float32(base) + float32(delta)), tensor by tensor.

    Arguments:
        base: the Hugging Face LLaMA directory (safetensors or pytorch_model*.bin), e.g. llama-13b-hf.
        delta: the delta directory, e.g. vicuna-13b-delta-v1.1 (lmsys's .bin shards or safetensors).
        target: the directory to write, e.g. vicuna-13b-all-v1.1 (safetensors, config and tokenizer from the delta).
        dtype: the target's dtype; auto: what the delta's config.json declares (float16 for lmsys's deltas).
        max_shard_size: largest safetensors shard, e.g. 5GB, 500MB, 2GiB.
        overwrite: replace a target that exists but is not a complete vicunaflow output (default: refuse).
    """
    base, delta, target = Path(base), Path(delta), Path(target)
    log.info(
        "apply-delta: base=%s delta=%s target=%s dtype=%s max_shard_size=%s", base, delta, target, dtype, max_shard_size
    )
    parse_size(max_shard_size)  # a size without its unit fails here, before any work
    check_output_dir(target, inputs=[base, delta], overwrite=overwrite)  # before any work
    _check_roles(base, "--base", delta, "--delta")
    base_ck, delta_ck = Checkpoint(base), Checkpoint(delta)
    check_same_tensors(base_ck, delta_ck, base, delta)
    check_folder(delta, delta_ck)  # the target gets the delta's config.json: it must describe these tensors
    _require_tokenizer(delta, "--delta")  # copied into the target at the end: found missing now, not after the sum
    out_dtype = DTYPES[dtype] if dtype != "auto" else _declared_dtype(delta, delta_ck)
    names = delta_ck.names()
    plan = [(name, TensorInfo(delta_ck.info(name).shape, out_dtype)) for name in names]
    log.info("%d tensors, target dtype %s", len(names), out_dtype)

    # Two reused output buffers: the writer's thread saves one while the next sum goes into the
    # other (it never has more than one write in flight), and no fresh memory is faulted in per tensor.
    largest = max(info.nbytes // info.dtype.itemsize for _, info in plan)
    buffers = [torch.empty(largest, dtype=out_dtype) for _ in range(2)]
    with (
        atomic_output_dir(target, inputs=[base, delta], overwrite=overwrite) as out,
        ShardedSafetensorsWriter(out, plan, max_shard_size) as writer,
    ):
        for i, name in enumerate(tqdm(names, desc="apply-delta", unit="tensor", disable=None)):
            shape = delta_ck.info(name).shape
            buffer = buffers[i % 2][: torch.Size(shape).numel()].view(shape)
            writer.write(name, add_delta(base_ck.get(name), delta_ck.get(name), out_dtype, out=buffer))
        writer.close()
        base_ck.release()
        delta_ck.release()
        _write_config(delta, out, out_dtype)
        _copy_tokenizer(delta, out)
        write_manifest(out, inputs=_small_files(base) + _small_files(delta), kind="apply-delta", dtype=str(out_dtype))
    log.info("wrote %s", target)
    return target


def make_delta(
    *,
    base: Path,
    target: Path,
    delta: Path,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Write the delta that apply-delta turns back into `target`, byte for byte (verified while writing).

    Arguments:
        base: the Hugging Face LLaMA directory the delta is relative to.
        target: the fine-tuned model (e.g. a Vicuna) to encode.
        delta: the directory to write (float32 safetensors, config and tokenizer of the target).
        max_shard_size: largest safetensors shard, e.g. 5GB, 500MB, 2GiB.
        overwrite: replace a delta directory that exists but is not a complete vicunaflow output (default: refuse).
    """
    base, target, delta = Path(base), Path(target), Path(delta)
    log.info("make-delta: base=%s target=%s delta=%s max_shard_size=%s", base, target, delta, max_shard_size)
    parse_size(max_shard_size)  # a size without its unit fails here, before any work
    check_output_dir(delta, inputs=[base, target], overwrite=overwrite)  # before any work
    _check_roles(base, "--base", target, "--target")
    base_ck, target_ck = Checkpoint(base), Checkpoint(target)
    check_same_tensors(base_ck, target_ck, base, target)
    check_folder(target, target_ck)  # the delta gets the target's config.json: it must describe these tensors
    _require_tokenizer(target, "--target")  # copied into the delta at the end: found missing now, not after the work
    names = target_ck.names()
    dtypes = {target_ck.info(n).dtype for n in names}
    if len(dtypes) != 1:
        raise VicunaflowError(
            f"{target}: tensors mix dtypes {sorted(map(str, dtypes))}; a delta records one target dtype"
        )
    target_dtype = dtypes.pop()
    delta_dtype = _accumulator(target_dtype)
    plan = [(n, TensorInfo(target_ck.info(n).shape, delta_dtype)) for n in names]
    log.info("%d tensors, target dtype %s, delta stored as %s", len(names), target_dtype, delta_dtype)

    with (
        atomic_output_dir(delta, inputs=[base, target], overwrite=overwrite) as out,
        ShardedSafetensorsWriter(out, plan, max_shard_size) as writer,
    ):
        for name in tqdm(names, desc="make-delta", unit="tensor", disable=None):
            writer.write(name, exact_delta(base_ck.get(name), target_ck.get(name), name))
        writer.close()
        _write_config(target, out, target_dtype)
        _copy_tokenizer(target, out)
        write_manifest(out, inputs=_small_files(base) + _small_files(target), kind="make-delta")
    log.info("wrote %s (every tensor checked: apply-delta gives the target back bit for bit)", delta)
    return delta


def add_delta(
    base: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None, chunk: int = 1 << 22
) -> torch.Tensor:
    """dtype(float32(base) + float32(delta)) (float64 instead of float32 for float32 targets), into `out` if given.

    When base, delta and target share a 16-bit dtype (lmsys's float16 deltas), torch's own add is
    exactly that: CPU kernels compute half and bfloat16 arithmetic in float32 and round once
    (tests/test_delta.py holds it to the formula), in one pass. Otherwise the sum is computed a
    few million elements at a time, so float32 temporaries stay small (a 13B embedding matrix
    would need three 655 MB copies at once).
    """
    out = torch.empty(base.shape, dtype=dtype) if out is None else out
    if base.dtype == delta.dtype == dtype and dtype in (torch.float16, torch.bfloat16):
        return torch.add(base, delta, out=out)
    acc = _accumulator(dtype)
    flat_out, flat_b, flat_d = out.view(-1), base.reshape(-1), delta.reshape(-1)
    for start in range(0, flat_out.numel(), chunk):
        end = start + chunk
        flat_out[start:end] = flat_b[start:end].to(acc) + flat_d[start:end].to(acc)
    return out


def exact_delta(base: torch.Tensor, target: torch.Tensor, name: str = "", chunk: int = 1 << 22) -> torch.Tensor:
    """The delta d (float32, or float64 for float32 targets) with target == dtype(base + d), checked element by element.

    d = target - base in the wider type is nearly always it: near d = -base the sum base + d is
    exact (Sterbenz), so the reachable sums are base's grid in that type and the rounded
    difference is the grid point nearest the target. Where it misses, the neighbouring values
    are tried: that reaches -0.0 (a weight that underflowed while negative: base + d must land
    just below zero). A target too small next to its base is unreachable: error.
    Works a few million elements at a time, so temporaries stay small next to the tensor.
    """
    acc = _accumulator(target.dtype)
    delta = torch.empty(target.shape, dtype=acc)
    flat_delta, flat_base, flat_target = delta.view(-1), base.reshape(-1), target.reshape(-1)
    for start in range(0, flat_delta.numel(), chunk):
        part = slice(start, start + chunk)
        b, t = flat_base[part].to(acc), flat_target[part]
        d = t.to(acc) - b
        misses = _misses(b, d, t).nonzero().squeeze(1)
        if len(misses):
            d[misses] = _nudge(b[misses], d[misses], t[misses], name, start + misses)
        flat_delta[part] = d
    return delta


def _nudge(b: torch.Tensor, d: torch.Tensor, t: torch.Tensor, name: str, where: torch.Tensor) -> torch.Tensor:
    """The neighbouring delta values (two steps either way) that hit, for elements the plain difference misses."""
    fixed = torch.zeros_like(t, dtype=torch.bool)
    for direction in (float("inf"), float("-inf")):
        candidate = d
        for _ in range(2):
            candidate = torch.nextafter(candidate, torch.full_like(candidate, direction))
            hit = ~_misses(b, candidate, t) & ~fixed
            d = torch.where(hit, candidate, d)
            fixed |= hit
    if not bool(fixed.all()):
        first = int((~fixed).nonzero()[0])
        raise VicunaflowError(
            f"{name}: {int((~fixed).sum())} values cannot be reached as {t.dtype}({d.dtype}(base) + {d.dtype}(delta)) "
            f"(e.g. element {int(where[first])}: base {b[first].item()!r}, target {t[first].item()!r}: the target "
            "is too small next to the base); no exact delta exists for them"
        )
    return d


def _misses(b: torch.Tensor, d: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Elements where dtype(b + d) differs from target bit for bit (NaNs and -0.0 included)."""
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[target.element_size()]
    return (b + d).to(target.dtype).view(bits) != target.view(bits)


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16-bit tensors (the published recipe); float64 for float32 ones, else they would not round-trip."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def check_same_tensors(a: Checkpoint, b: Checkpoint, a_dir: Path, b_dir: Path) -> None:
    """Same names and shapes on both sides, or an error naming the first differences (and v0 deltas)."""
    if EMBEDDINGS in a and EMBEDDINGS in b:
        rows_a, rows_b = a.info(EMBEDDINGS).shape[0], b.info(EMBEDDINGS).shape[0]
        if rows_b == rows_a + 1:
            raise VicunaflowError(
                f"{b_dir}: vocabulary of {rows_b} tokens against {rows_a} in {a_dir}: this is a Vicuna v0 delta "
                "(it adds a pad token), which does not fit this LLaMA base; use the v1.1 delta instead "
                "(lmsys/vicuna-7b-delta-v1.1 or lmsys/vicuna-13b-delta-v1.1)"
            )
    names_a, names_b = a.names(), b.names()
    only_a = [n for n in names_a if n not in b]
    only_b = [n for n in names_b if n not in a]
    shapes = [
        f"{n} {list(a.info(n).shape)} vs {list(b.info(n).shape)}"
        for n in names_a
        if n in b and a.info(n).shape != b.info(n).shape
    ]
    problems = []
    if only_a:
        problems.append(
            f"only in {a_dir}: {', '.join(only_a[:5])}" + (f" (+{len(only_a) - 5} more)" if len(only_a) > 5 else "")
        )
    if only_b:
        problems.append(
            f"only in {b_dir}: {', '.join(only_b[:5])}" + (f" (+{len(only_b) - 5} more)" if len(only_b) > 5 else "")
        )
    if shapes:
        problems.append(
            f"shapes differ: {'; '.join(shapes[:5])}" + (f" (+{len(shapes) - 5} more)" if len(shapes) > 5 else "")
        )
    if problems:
        raise VicunaflowError(f"{b_dir} does not match {a_dir}: " + " | ".join(problems))


def _check_roles(base: Path, base_flag: str, other: Path, other_flag: str) -> None:
    """Both folders are Hugging Face models, the base is no delta, and (apply-delta) the delta is no full model nor
    the base itself: a full model added to the base doubles its weights, silently, into a target that loads fine."""
    require_model_dir(base, base_flag)
    require_model_dir(other, other_flag)
    base_fix = "--base is the LLaMA folder (e.g. llama-13b-hf)"
    delta_fix = "--delta is the delta folder (e.g. vicuna-13b-delta-v1.1)"
    if base.resolve() == other.resolve():
        if other_flag == "--delta":
            raise VicunaflowError(
                f"--base and --delta are both {base}: adding a model to itself doubles it; {delta_fix}"
            )
        return  # make-delta of a model against itself: a zero delta, harmless
    if recorded_role(base) == "delta":
        raise VicunaflowError(f"{base}: a Vicuna delta (its vicunaflow.json says so), given as --base; {base_fix}")
    if other_flag == "--target" and recorded_role(other) == "delta":
        raise VicunaflowError(
            f"{other}: a Vicuna delta (its vicunaflow.json says so), given as --target; --target is the fine-tuned "
            "model to encode (e.g. vicuna-13b-all-v1.1)"
        )
    if other_flag == "--delta" and recorded_role(other) == "model":
        raise VicunaflowError(
            f"{other}: a full model (its vicunaflow.json says so), given as --delta: adding it to the base would "
            f"double the weights; {delta_fix}"
        )


def _declared_dtype(directory: Path, checkpoint: Checkpoint) -> torch.dtype:
    """The target dtype a delta declares in config.json, else its tensors' dtype."""
    config_path = directory / "config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text())
        declared = config.get("torch_dtype") or config.get("dtype")
        if declared in DTYPES:
            return DTYPES[declared]
    return checkpoint.info(checkpoint.names()[0]).dtype


def _write_config(source: Path, out: Path, dtype: torch.dtype) -> None:
    config_path = source / "config.json"
    if not config_path.exists():
        raise VicunaflowError(f"{config_path}: missing; the model's config.json is needed")
    config = json.loads(config_path.read_text())
    config.pop("dtype", None)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (source / "generation_config.json").exists():
        shutil.copyfile(source / "generation_config.json", out / "generation_config.json")
    else:  # lmsys's deltas may lack it; chat needs eos = </s>
        (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")


def _require_tokenizer(source: Path, flag: str) -> None:
    """The tokenizer `_copy_tokenizer` needs is there, checked before any tensor is read (hours for 13B)."""
    if not has_tokenizer(source):
        raise VicunaflowError(
            f"{source}: no tokenizer.model or tokenizer.json; the tokenizer must come with {flag}: copy the one it "
            "was published with into it (download it again)"
        )


def _copy_tokenizer(source: Path, out: Path) -> None:
    """The tokenizer of `source`, as our legacy-exact files with the Vicuna chat_template.

    From tokenizer.model when there is one (lmsys's deltas ship no tokenizer.json, and their
    tokenizer_config names LlamaTokenizer, which transformers 5 would rebuild differently);
    otherwise the given files, with the chat_template added.
    """
    model_max_length = 2048
    config_path = source / "tokenizer_config.json"
    if config_path.exists():
        model_max_length = int(json.loads(config_path.read_text()).get("model_max_length", 2048) or 2048)
        model_max_length = model_max_length if model_max_length < 1_000_000 else 2048  # "infinite" sentinel
    if (source / "tokenizer.model").exists():
        write_tokenizer(source / "tokenizer.model", out, model_max_length=model_max_length)
        return
    if not (source / "tokenizer.json").exists():
        raise VicunaflowError(f"{source}: no tokenizer.model or tokenizer.json; the tokenizer must come with it")
    log.warning("%s: no tokenizer.model; copying its tokenizer.json as it is", source)
    shutil.copyfile(source / "tokenizer.json", out / "tokenizer.json")
    write_tokenizer_config(out, model_max_length)


def _small_files(directory: Path) -> list[Path]:
    return [directory / name for name in SMALL_FILES if (directory / name).exists()]

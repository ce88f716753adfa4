"""`vicunaflow quantize`: a float16 model folder -> an int8 or int4 (weight-only) model folder.

Streams like convert and apply-delta: one tensor is read (memory-mapped), quantized if it is a
Linear weight of a layer (quant.QUANTIZED_WEIGHT) and written straight to safetensors, so memory
stays near the largest tensor. Each quantized weight `<module>.weight` becomes `<module>.qweight`,
`<module>.scales` (and `<module>.zeros` for int4); every other tensor is copied as it is.
config.json gains a `quantization_config` block; tokenizer and generation config are copied.
The format is in docs/quantize.md; quant.load_weight reads it back for chat and serve.
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
from vicunaflow.outputs import atomic_output_dir, check_output_dir, write_manifest
from vicunaflow.quant import QUANTIZED_WEIGHT, config_block, quantization_config, quantize, quantized_names
from vicunaflow.tokenizer import TOKENIZER_FILES, has_tokenizer

log = logging.getLogger(__name__)

# chat_template.jinja: where transformers 5 saves a tokenizer's chat template (finetune outputs copy it)
COPIED_FILES = ("generation_config.json", *TOKENIZER_FILES, "chat_template.jinja")


def quantize_model(
    *,
    model_path: Path,
    output_dir: Path,
    bits: Literal[8, 4] = 8,
    group_size: int = 128,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Quantize a model folder's Linear weights to int8 (per output channel) or int4 (per group), tensor by tensor.

    Arguments:
        model_path: the float model folder, e.g. vicuna-7b-all-v1.1 (safetensors or .bin shards).
        output_dir: the folder to write, e.g. vicuna-7b-all-v1.1-int4 (loaded directly by chat and serve).
        bits: 8 (symmetric, one scale per output channel) or 4 (asymmetric, one scale and zero per group).
        group_size: input columns sharing an int4 scale and zero (even; ignored for 8 bits).
        max_shard_size: largest safetensors shard, e.g. 5GB, 500MB, 2GiB.
        overwrite: replace an output_dir that exists but is not a complete vicunaflow output (default: refuse).
    """
    model_path, output_dir = Path(model_path), Path(output_dir)
    log.info(
        "quantize: model_path=%s output_dir=%s bits=%d group_size=%d max_shard_size=%s",
        model_path, output_dir, bits, group_size, max_shard_size,
    )  # fmt: skip
    if bits not in (8, 4):
        raise VicunaflowError(f"--bits must be 8 or 4, not {bits}")
    parse_size(max_shard_size)  # a size without its unit fails here, before any work
    if bits == 4 and (group_size < 2 or group_size % 2):
        raise VicunaflowError(f"--group-size {group_size}: int4 needs an even group size of at least 2 (128 usually)")
    check_output_dir(output_dir, inputs=[model_path], overwrite=overwrite)  # before any work
    if quantization_config(model_path) is not None:
        raise VicunaflowError(f"{model_path}: already quantized; quantize its float16 folder instead")
    from vicunaflow.engine.build import check_folder

    check_folder(model_path)  # the config the output will carry must describe these weights
    if not has_tokenizer(model_path):
        raise VicunaflowError(  # the output would be written, then refused by chat and serve
            f"{model_path}: no tokenizer (tokenizer.json or tokenizer.model), so its quantized copy would not load in "
            "chat or serve; restore the model's tokenizer files (or re-run the step that wrote the folder)"
        )
    checkpoint = Checkpoint(model_path)
    plan = quantized_plan(checkpoint, bits, group_size)
    names = checkpoint.names()
    count = sum(1 for name in names if QUANTIZED_WEIGHT.fullmatch(name))
    if count == 0:
        raise VicunaflowError(f"{model_path}: no LLaMA layer weights (model.layers.N.*_proj.weight) to quantize")
    log.info("%d tensors, %d Linear weights to int%d", len(names), count, bits)
    with (
        atomic_output_dir(output_dir, inputs=[model_path], overwrite=overwrite) as out,
        ShardedSafetensorsWriter(out, plan, max_shard_size) as writer,
    ):
        for name in tqdm(names, desc=f"quantize int{bits}", unit="tensor", disable=None):
            tensor = checkpoint.get(name)
            if not QUANTIZED_WEIGHT.fullmatch(name):
                writer.write(name, tensor)
                continue
            qw = quantize(tensor, bits, group_size)
            for stored, value in zip(quantized_names(name, bits), (qw.qweight, qw.scales, qw.zeros), strict=False):
                writer.write(stored, value)
        writer.close()
        checkpoint.release()
        _write_config(model_path, out, bits, group_size)
        for file in COPIED_FILES:
            if (model_path / file).exists():
                shutil.copyfile(model_path / file, out / file)
        inputs = [model_path / "config.json"] + [model_path / f for f in COPIED_FILES if (model_path / f).exists()]
        write_manifest(out, inputs=inputs, kind="quantize", bits=bits, group_size=group_size if bits == 4 else None)
    log.info("wrote %s", output_dir)
    return output_dir


def quantized_plan(checkpoint: Checkpoint, bits: int, group_size: int) -> list[tuple[str, TensorInfo]]:
    """(name, shape, dtype) of every tensor the quantized folder holds, in checkpoint order."""
    plan = []
    for name in checkpoint.names():
        info = checkpoint.info(name)
        if not QUANTIZED_WEIGHT.fullmatch(name):
            plan.append((name, info))
            continue
        n, k = info.shape
        if bits == 8:
            infos = [TensorInfo((n, k), torch.int8), TensorInfo((n,), torch.float32)]
        else:
            if k % 2 or group_size < 2 or group_size % 2:
                raise VicunaflowError(f"{name}: int4 needs an even input size and group size (got {k}, {group_size})")
            groups = -(-k // group_size)
            infos = [TensorInfo((n, k // 2), torch.uint8)] + [TensorInfo((n, groups), torch.float16)] * 2
        plan += list(zip(quantized_names(name, bits), infos, strict=True))
    return plan


def _write_config(source: Path, out: Path, bits: int, group_size: int) -> None:
    config_path = source / "config.json"
    if not config_path.exists():
        raise VicunaflowError(f"{config_path}: missing; the model's config.json is needed")
    config = json.loads(config_path.read_text())
    config["quantization_config"] = config_block(bits, group_size)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

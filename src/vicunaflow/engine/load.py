"""Load a Hugging Face LLaMA folder (float, or written by `vicunaflow quantize`) for chat and serve.

`load_model` resolves the device and the options, starts the other tensor-parallel ranks (engine/tp.py)
and builds its own rank (engine/build.py, which the spawned ranks call too), then the tokenizer.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Literal

import torch

from vicunaflow import VicunaflowError, quant
from vicunaflow.engine import tp
from vicunaflow.engine.build import LoadSpec, RandomWeights, build_model, check_int4_split, read_args, weight_bytes
from vicunaflow.engine.model import Local, Transformer, check_shardable
from vicunaflow.formats import DTYPES

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
Dtype = Literal["auto", "float16", "bfloat16", "float32"]
AllReduce = Literal["auto", "symm-mem", "nccl"]
ALL_REDUCE_ENV = "VICUNAFLOW_ALL_REDUCE"  # chat/serve: symm-mem or nccl instead of the automatic choice

__all__ = ["RandomWeights", "load_model", "resolve_device"]


def load_model(
    model_path: str | Path | RandomWeights,
    *,
    device: Device = "auto",
    num_gpus: int = 1,
    max_gpu_memory: str | None = None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    group_size: int = quant.DEFAULT_GROUP_SIZE,
    dtype: Dtype = "auto",
    all_reduce: AllReduce = "auto",
    int4_kernel: str | None = None,
    one_stream: bool = False,
) -> tuple[Transformer, object]:
    """Load a model for chat and serve; return (model, tokenizer) (tokenizer None for RandomWeights).

    device "auto" is CUDA when a GPU is visible, else the CPU. num_gpus > 1 splits the model over
    that many GPUs, one process each (with device "cpu": that many gloo ranks, for tests). float16 on
    CUDA, float32 on CPU. load_8bit / load_4bit: quantize the layers' Linear weights as they load
    (vicunaflow.quant: int8 with one scale per output row; int4 with a scale and zero per `group_size`
    input columns); a folder written by `vicunaflow quantize` loads as it is stored, without either.
    all_reduce (CUDA, several GPUs): symm-mem, nccl, or auto = $VICUNAFLOW_ALL_REDUCE, else symm-mem
    with NCCL as the fallback. int4_kernel: "columns" (quant.Int4Columns: quant_kernels.qmatvec_columns),
    "tinygemm" (torch's int4 kernel, quant.Int4Packed: the model computes in bfloat16, so with dtype "auto"
    or "bfloat16") or "triton" (quant_kernels on the stored layout); None is quant.int4_kernel_for(one_stream)
    on CUDA ($VICUNAFLOW_INT4_KERNEL, else columns for one stream and tinygemm for batched serving), and the
    CPU's dequantizing path there. one_stream: the model decodes one conversation at a time (chat).
    Call `model.close()` (or let the process exit) to stop the other ranks.
    """
    if dtype != "auto" and dtype not in DTYPES:
        choices = ["auto", *DTYPES]
        raise VicunaflowError(f"dtype {dtype!r}: choose {', '.join(choices[:-1])} or {choices[-1]}")
    device = resolve_device(device, num_gpus)
    if all_reduce == "auto":
        all_reduce = os.environ.get(ALL_REDUCE_ENV, "auto")
        if all_reduce not in ("auto", "symm-mem", "nccl"):
            raise VicunaflowError(f"{ALL_REDUCE_ENV}={all_reduce}: choose symm-mem or nccl")
    if load_8bit and load_4bit:
        raise VicunaflowError("--load-8bit and --load-4bit: choose one")
    bits = 8 if load_8bit else 4 if load_4bit else None
    if isinstance(model_path, RandomWeights):
        source, args, stored = model_path, model_path.args, None
    else:
        source = str(model_path)
        args = read_args(Path(model_path))
        stored = quant.quantization_config(model_path)
    if stored is not None:
        if bits is not None and bits != stored["bits"]:
            raise VicunaflowError(
                f"{model_path}: already quantized to int{stored['bits']} (vicunaflow quantize); leave out "
                f"--load-{bits}bit, or quantize its float folder instead"
            )
        bits, group_size = stored["bits"], stored.get("group_size") or group_size
    check_shardable(args, num_gpus)
    if bits == 4:
        check_int4_split(args, num_gpus, group_size)
    if int4_kernel is None:
        int4_kernel = quant.int4_kernel_for(one_stream) if device == "cuda" else "triton"
    if int4_kernel not in quant.INT4_KERNELS:  # an argument, or $VICUNAFLOW_INT4_KERNEL
        raise VicunaflowError(f"int4 kernel {int4_kernel!r}: choose {', '.join(quant.INT4_KERNELS)}")
    # tinygemm multiplies bfloat16 only (as gpt-fast runs int4); an explicit other dtype keeps our kernels
    int4_packed = bits == 4 and int4_kernel == "tinygemm" and dtype in ("auto", "bfloat16")
    default_dtype = torch.bfloat16 if int4_packed else torch.float16 if device == "cuda" else torch.float32
    torch_dtype = default_dtype if dtype == "auto" else DTYPES[dtype]
    if max_gpu_memory:  # before any weight is read: build_model lays the weights out as weight_bytes counts them
        needed = weight_bytes(args, itemsize=torch_dtype.itemsize, num_gpus=num_gpus, bits=bits, group_size=group_size)
        check_weights_cap(needed, max_gpu_memory)
    int4_columns = bits == 4 and int4_kernel == "columns"
    spec = LoadSpec(
        source, torch_dtype, device, None if stored else bits, group_size, all_reduce, int4_packed, int4_columns
    )
    tokenizer = None
    if not isinstance(source, RandomWeights):  # first: a damaged tokenizer fails before minutes of loading
        from vicunaflow.tokenizer import open_tokenizer

        tokenizer = open_tokenizer(source)
    comm = tp.start(num_gpus, spec) if num_gpus > 1 else Local()
    try:
        model = build_model(spec, comm)
        if num_gpus > 1:
            tp.wait_ready(comm)
    except BaseException:
        model_close(comm)
        raise
    weights = {None: "", 8: " (int8 layer weights)", 4: f" (int4 layer weights, groups of {group_size})"}[bits]
    weights += " in tinygemm's layout" if int4_packed else " in columns of words" if int4_columns else ""
    log.info(
        "loaded %s: %s weights %.1f MiB per rank on %s x %d%s%s",
        source if isinstance(source, str) else f"random weights {args}",
        str(torch_dtype).removeprefix("torch."),
        model.weight_bytes() / 2**20,
        device,
        num_gpus,
        weights,
        " as stored" if stored else "",
    )
    return model, tokenizer


def resolve_device(device: Device, num_gpus: int) -> str:
    """cpu or cuda, refusing what cannot run as asked (FastChat ran --num-gpus 2 on the CPU silently)."""
    if num_gpus < 1:
        raise VicunaflowError(f"--num-gpus {num_gpus}: must be at least 1")
    cuda = torch.cuda.is_available()
    if device == "auto":
        if num_gpus > 1 and not cuda:
            raise VicunaflowError(
                f"--num-gpus {num_gpus}: no CUDA device is visible; add --device cpu to run {num_gpus} "
                f"tensor-parallel ranks on the CPU, or leave --num-gpus out"
            )
        device = "cuda" if cuda else "cpu"
    if device == "cuda" and not cuda:
        raise VicunaflowError("--device cuda: no CUDA device is visible; use --device cpu")
    if device == "cuda" and num_gpus > torch.cuda.device_count():
        raise VicunaflowError(f"--num-gpus {num_gpus}: only {torch.cuda.device_count()} CUDA devices are visible")
    return device


def model_close(comm) -> None:
    close = getattr(comm, "close", None)
    if close is not None:
        close()


def check_weights_cap(needed: int, max_gpu_memory: str) -> None:
    """--max-gpu-memory: refuse weights that would exceed the cap per GPU (there is no offloading to spill into)."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", max_gpu_memory, re.IGNORECASE)
    if not match:
        raise VicunaflowError(f"--max-gpu-memory {max_gpu_memory}: give a size such as 20GiB")
    unit = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[match.group(2).upper()]
    cap = float(match.group(1)) * (1024 if match.group(3) or not match.group(2) else 1000) ** unit
    if needed > cap:
        size = f"{needed / 2**30:.1f} GiB" if needed >= 2**30 else f"{needed / 2**20:.1f} MiB"
        raise VicunaflowError(
            f"--max-gpu-memory {max_gpu_memory}: the weights need {size} per GPU; "
            f"use more --num-gpus, --load-8bit or --load-4bit"
        )

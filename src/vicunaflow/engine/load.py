"""Load a Hugging Face LLaMA folder into engine.model.Transformer, whole or as one tensor-parallel rank.

Weights come through our own streaming readers (vicunaflow.checkpoint: safetensors or .bin shards,
memory-mapped): each tensor is sliced to this rank's part on the host, cast and copied to the
device, then its pages are handed back, so a rank holds about its shard plus one tensor. q/k/v and
gate/up are concatenated into wqkv and w13 as they load. `RandomWeights` builds the same shapes from
a seed instead of a folder (benchmarks: a 65B needs no 130 GB checkpoint on disk); each rank draws
only its own slice (a 65B's 130 GB drawn whole on every rank would take minutes), so a split model's
values differ from the whole one's: fine for speed, not for equality tests (those load folders).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import zlib
from pathlib import Path
from typing import Literal

import torch

from vicunaflow import VicunaflowError
from vicunaflow.checkpoint import Checkpoint
from vicunaflow.engine import tp
from vicunaflow.engine.model import Int8Weight, Local, ModelArgs, Transformer, check_shardable
from vicunaflow.formats import DTYPES

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
Dtype = Literal["auto", "float16", "bfloat16", "float32"]
AllReduce = Literal["auto", "symm-mem", "nccl"]
ROWS, COLUMNS = 0, 1  # the dimension a tensor-parallel split cuts
ALL_REDUCE_ENV = "VICUNAFLOW_ALL_REDUCE"  # chat/serve: symm-mem or nccl instead of the automatic choice


@dataclasses.dataclass(frozen=True)
class RandomWeights:
    """Weights drawn from N(0, std) (norms: ones) for a model shape: benchmarks without a checkpoint."""

    args: ModelArgs
    seed: int = 0
    std: float = 0.02


def load_model(
    model_path: str | Path | RandomWeights,
    *,
    device: Device = "auto",
    num_gpus: int = 1,
    max_gpu_memory: str | None = None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    dtype: Dtype = "auto",
    all_reduce: AllReduce = "auto",
) -> tuple[Transformer, object]:
    """Load a model for chat and serve; return (model, tokenizer) (tokenizer None for RandomWeights).

    device "auto" is CUDA when a GPU is visible, else the CPU. num_gpus > 1 splits the model over
    that many GPUs, one process each (with device "cpu": that many gloo ranks, for tests). float16 on
    CUDA, float32 on CPU. load_8bit: weight-only int8 with one scale per output row. all_reduce (CUDA,
    several GPUs): symm-mem, nccl, or auto = $VICUNAFLOW_ALL_REDUCE, else symm-mem with NCCL as the
    fallback. Call `model.close()` (or let the process exit) to stop the other ranks.
    """
    device = resolve_device(device, num_gpus)
    if all_reduce == "auto":
        all_reduce = os.environ.get(ALL_REDUCE_ENV, "auto")
        if all_reduce not in ("auto", "symm-mem", "nccl"):
            raise VicunaflowError(f"{ALL_REDUCE_ENV}={all_reduce}: choose symm-mem or nccl")
    if load_4bit:
        raise VicunaflowError("--load-4bit: this engine has no 4-bit weights yet; use --load-8bit (int8)")
    if isinstance(model_path, RandomWeights):
        source, args = model_path, model_path.args
    else:
        source = str(model_path)
        args = read_args(Path(model_path))
    check_shardable(args, num_gpus)
    torch_dtype = DTYPES.get(dtype, torch.float16 if device == "cuda" else torch.float32)
    spec = tp.LoadSpec(source, torch_dtype, device, load_8bit, all_reduce)
    comm = tp.start(num_gpus, spec) if num_gpus > 1 else Local()
    try:
        model = build_model(spec, comm)
        if num_gpus > 1:
            tp.wait_ready(comm)
        _check_memory_cap(model, max_gpu_memory)
    except BaseException:
        model_close(comm)
        raise
    tokenizer = None
    if not isinstance(source, RandomWeights):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
    log.info(
        "loaded %s: %s weights %.1f MiB per rank on %s x %d%s",
        source if isinstance(source, str) else f"random weights {args}",
        str(torch_dtype).removeprefix("torch."),
        model.weight_bytes() / 2**20,
        device,
        num_gpus,
        " (int8 weights)" if load_8bit else "",
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


def read_args(model_path: Path) -> ModelArgs:
    config_file = model_path / "config.json"
    if not config_file.exists():
        raise VicunaflowError(f"{model_path}: no config.json; give a Hugging Face model directory (--model-path)")
    config = json.loads(config_file.read_text())
    if config.get("model_type", "llama") != "llama":
        log.warning("%s: model_type %r is not llama; trying anyway", model_path, config.get("model_type"))
    if config.get("quantization_config"):
        raise VicunaflowError(f"{model_path}: a quantized checkpoint (quantization_config) is not supported")
    return ModelArgs.from_hf(config)


def hf_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every weight of a Hugging Face LlamaForCausalLM and its shape."""
    D, kv = args.head_dim, args.n_kv_heads * args.head_dim
    shapes = {"model.embed_tokens.weight": (args.vocab_size, args.dim), "model.norm.weight": (args.dim,)}
    for i in range(args.n_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (args.dim,),
            p + "self_attn.q_proj.weight": (args.n_heads * D, args.dim),
            p + "self_attn.k_proj.weight": (kv, args.dim),
            p + "self_attn.v_proj.weight": (kv, args.dim),
            p + "self_attn.o_proj.weight": (args.dim, args.n_heads * D),
            p + "post_attention_layernorm.weight": (args.dim,),
            p + "mlp.gate_proj.weight": (args.ffn_dim, args.dim),
            p + "mlp.up_proj.weight": (args.ffn_dim, args.dim),
            p + "mlp.down_proj.weight": (args.dim, args.ffn_dim),
        }
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (args.vocab_size, args.dim)
    return shapes


@torch.inference_mode()
def build_model(spec: tp.LoadSpec, comm) -> Transformer:
    """This rank's Transformer: its slices of the weights, fused, cast and on its device."""
    device = torch.device("cuda", comm.rank) if spec.device_type == "cuda" else torch.device("cpu")
    if isinstance(spec.source, RandomWeights):
        args, reader = spec.source.args, _RandomReader(spec.source, device)
    else:
        args, reader = read_args(Path(spec.source)), _CheckpointReader(Path(spec.source))
    shapes = hf_shapes(args)
    reader.check(shapes)
    model = Transformer(args, dtype=spec.dtype, device=device, comm=comm)

    def get(name: str, split: int | None = None) -> torch.Tensor:
        if split is not None and comm.world > 1:
            tensor = reader.get_slice(name, shapes[name], split, comm.rank, comm.world)
        else:
            tensor = reader.get(name, shapes[name])
        return tensor.to(device=device, dtype=spec.dtype).contiguous()

    def weight(tensor: torch.Tensor):
        return Int8Weight.quantize(tensor) if spec.load_8bit else tensor

    model.embed = get("model.embed_tokens.weight")
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        layer.attention_norm = get(p + "input_layernorm.weight")
        qkv = [get(p + f"self_attn.{n}_proj.weight", ROWS) for n in "qkv"]
        layer.wqkv = weight(torch.cat(qkv))  # [(heads + 2 kv_heads) * head_dim, dim] of this rank
        layer.wo = weight(get(p + "self_attn.o_proj.weight", COLUMNS))  # [dim, heads * head_dim]
        layer.ffn_norm = get(p + "post_attention_layernorm.weight")
        gate_up = [get(p + f"mlp.{n}_proj.weight", ROWS) for n in ("gate", "up")]
        layer.w13 = weight(torch.cat(gate_up))  # [2 ffn, dim]
        layer.w2 = weight(get(p + "mlp.down_proj.weight", COLUMNS))  # [dim, ffn]
        del qkv, gate_up
        reader.release()
    model.norm = get("model.norm.weight")
    model.output = weight(model.embed if args.tie_word_embeddings else get("lm_head.weight"))
    reader.release()
    return model


def model_close(comm) -> None:
    close = getattr(comm, "close", None)
    if close is not None:
        close()


class _CheckpointReader:
    def __init__(self, path: Path):
        self.checkpoint = Checkpoint(path)

    def check(self, shapes: dict[str, tuple[int, ...]]) -> None:
        names = set(self.checkpoint.names())
        missing = sorted(set(shapes) - names, key=_natural)
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise VicunaflowError(f"{self.checkpoint.directory}: no tensor {', '.join(missing[:3])}{more}")
        for name, shape in shapes.items():
            found = tuple(self.checkpoint.info(name).shape)
            if found != shape:
                raise VicunaflowError(
                    f"{self.checkpoint.directory}: {name} has shape {found}, config.json implies {shape}"
                )
        extra = sorted(n for n in names - set(shapes) if not n.endswith("rotary_emb.inv_freq"))
        if extra:
            log.warning(
                "%s: ignoring %d tensors not in a LLaMA (%s, ...)", self.checkpoint.directory, len(extra), extra[0]
            )

    def get(self, name: str, shape) -> torch.Tensor:
        return self.checkpoint.get(name)

    def get_slice(self, name: str, shape, dim: int, rank: int, world: int) -> torch.Tensor:
        return self.checkpoint.get(name).chunk(world, dim=dim)[rank]  # a view of the mapped file

    def release(self) -> None:
        self.checkpoint.release()


class _RandomReader:
    def __init__(self, random: RandomWeights, device: torch.device):
        self.random, self.device = random, device

    def check(self, shapes) -> None:
        pass

    def get(self, name: str, shape, salt: int = 0) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shape, device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(
            self.random.seed * 1_000_003 + zlib.crc32(name.encode()) + 7919 * salt
        )
        # drawn in float16 on the device: a float32 draw of a 65B layer would need twice the memory
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        return torch.randn(shape, generator=generator, device=self.device, dtype=dtype).mul_(self.random.std)

    def get_slice(self, name: str, shape, dim: int, rank: int, world: int) -> torch.Tensor:
        sliced = list(shape)
        sliced[dim] //= world
        return self.get(name, tuple(sliced), salt=rank + 1)

    def release(self) -> None:
        pass


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _check_memory_cap(model: Transformer, max_gpu_memory: str | None) -> None:
    """--max-gpu-memory: refuse weights that exceed the cap per GPU (there is no offloading to spill into)."""
    if not max_gpu_memory:
        return
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", max_gpu_memory, re.IGNORECASE)
    if not match:
        raise VicunaflowError(f"--max-gpu-memory {max_gpu_memory}: give a size such as 20GiB")
    unit = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[match.group(2).upper()]
    cap = float(match.group(1)) * (1024 if match.group(3) or not match.group(2) else 1000) ** unit
    if model.weight_bytes() > cap:
        raise VicunaflowError(
            f"--max-gpu-memory {max_gpu_memory}: the weights need {model.weight_bytes() / 2**30:.1f} GiB per GPU; "
            f"use more --num-gpus or --load-8bit"
        )

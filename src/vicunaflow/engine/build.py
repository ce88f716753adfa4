"""Build one rank's Transformer from a Hugging Face LLaMA folder or from random weights.

Shared by engine/load.py (rank 0, or the only process) and engine/tp.py (the spawned ranks), so neither
imports the other's internals: load -> build <- tp.

Weights come through our own streaming readers (vicunaflow.checkpoint: safetensors or .bin shards,
memory-mapped): each tensor is sliced to this rank's part on the host, cast and copied to the
device, then its pages are handed back, so a rank holds about its shard plus one tensor. q/k/v and
gate/up are concatenated into wqkv and w13 as they load. `RandomWeights` builds the same shapes from
a seed instead of a folder (benchmarks: a 65B needs no 130 GB checkpoint on disk); each rank draws
only its own slice (a 65B's 130 GB drawn whole on every rank would take minutes), so a split model's
values differ from the whole one's: fine for speed, not for equality tests (those load folders).

Quantized weights (vicunaflow.quant, docs/quantize.md): a folder written by `vicunaflow quantize` is
read as it is stored (its QuantWeights sharded with quant.shard); `bits` quantizes a float folder's
layer weights as they load. Embeddings and norms stay in float, and so does lm_head, except beside int4
layers (build_model says why).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import zlib
from pathlib import Path

import torch

from vicunaflow import VicunaflowError, first_few, quant
from vicunaflow.checkpoint import Checkpoint
from vicunaflow.engine.model import ModelArgs, Transformer, Weight
from vicunaflow.formats import read_config

log = logging.getLogger(__name__)

ROWS, COLUMNS = 0, 1  # the dimension a tensor-parallel split cuts


@dataclasses.dataclass(frozen=True)
class RandomWeights:
    """Weights drawn from N(0, std) (norms: ones) for a model shape: benchmarks without a checkpoint."""

    args: ModelArgs
    seed: int = 0
    std: float = 0.02


@dataclasses.dataclass(frozen=True)
class LoadSpec:
    """What each rank needs to build its shard (picklable: it goes to the spawned ranks)."""

    source: object  # a model directory (str) or RandomWeights
    dtype: torch.dtype
    device_type: str  # cuda or cpu
    bits: int | None  # quantize a float folder's layer weights at load: 8, 4 or None (a quantized folder: as stored)
    group_size: int  # int4 at load
    all_reduce: str  # auto, symm-mem or nccl (CUDA); the CPU always uses gloo
    int4_packed: bool = False  # int4 weights in torch's tinygemm layout (quant.Int4Packed; the model in bfloat16)
    int4_columns: bool = False  # int4 weights as quant.Int4Columns (quant_kernels.qmatvec_columns)


def read_args(model_path: Path) -> ModelArgs:
    config_file = model_path / "config.json"
    if not config_file.exists():
        raise VicunaflowError(f"{model_path}: no config.json; give a Hugging Face model directory (--model-path)")
    config = read_config(config_file)
    if config.get("model_type", "llama") != "llama":
        log.warning("%s: model_type %r is not llama; trying anyway", model_path, config.get("model_type"))
    if config.get("quantization_config"):
        quant.quantization_config(model_path)  # ours (vicunaflow quantize), or refused naming its method
    return ModelArgs.from_hf(config, source=config_file)


def check_folder(model_path: Path, checkpoint: Checkpoint | None = None) -> ModelArgs:
    """A model folder's config.json read and its weights checked against it (every tensor a LLaMA of that
    config has, at its shape, and no layer beyond its num_hidden_layers), before any weight is read: for tools
    that load it otherwise (quantize, and eval loss and finetune through transformers, which would fill a missing
    layer with random weights)."""
    args = read_args(Path(model_path))
    _CheckpointReader(Path(model_path), checkpoint).check(hf_shapes(args))  # checkpoint: one already open
    return args


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


def weight_bytes(
    args: ModelArgs,
    *,
    itemsize: int,
    num_gpus: int = 1,
    bits: int | None = None,
    group_size: int = quant.DEFAULT_GROUP_SIZE,
) -> int:
    """Bytes of one rank's weights as build_model lays them out, from config.json alone (before any load):
    projections split over the ranks (q|k|v and gate|up by rows, o and down by columns), float or int8/int4
    with their scales and zeros; norms, embeddings and lm_head whole on every rank, lm_head int4 with int4 layers."""
    head, kv = args.head_dim, args.n_kv_heads * args.head_dim
    projections = [(args.n_heads * head + 2 * kv, args.dim, 0), (args.dim, args.n_heads * head, 1)]
    projections += [(2 * args.ffn_dim, args.dim, 0), (args.dim, args.ffn_dim, 1)]
    per_layer = 0
    for rows, columns, split in projections:  # [rows, columns] before the split, the dimension it cuts
        rows, columns = (rows // num_gpus, columns) if split == 0 else (rows, columns // num_gpus)
        per_layer += _linear_bytes(rows, columns, bits, group_size, itemsize)
    per_layer += 2 * args.dim * itemsize  # the two norms
    embed = args.vocab_size * args.dim * itemsize
    output = 0 if args.tie_word_embeddings else embed  # lm_head float (or the embedding itself)
    if bits == 4:  # lm_head in int4, beside the embedding (build_model)
        output = _linear_bytes(args.vocab_size, args.dim, bits, group_size, itemsize)
    return args.n_layers * per_layer + embed + output + args.dim * itemsize


def _linear_bytes(rows: int, columns: int, bits: int | None, group_size: int, itemsize: int) -> int:
    """One rank's [rows, columns] Linear weight: float; int8 codes + a float32 scale a row; int4 codes
    (two a byte) + a float16 scale and zero per row and group (docs/quantize.md)."""
    if bits == 8:
        return rows * columns + 4 * rows
    if bits == 4:
        return rows * columns // 2 + 4 * rows * -(-columns // group_size)
    return rows * columns * itemsize


@torch.inference_mode()
def build_model(spec: LoadSpec, comm) -> Transformer:
    """This rank's Transformer: its slices of the weights, fused, cast (or quantized) and on its device."""
    device = torch.device("cuda", comm.rank) if spec.device_type == "cuda" else torch.device("cpu")
    if isinstance(spec.source, RandomWeights):
        args, reader = spec.source.args, _RandomReader(spec.source, device)
    else:
        args, reader = read_args(Path(spec.source)), _CheckpointReader(Path(spec.source))
    shapes = hf_shapes(args)
    reader.check(shapes)
    model = Transformer(args, dtype=spec.dtype, device=device, comm=comm)
    rank, world = comm.rank, comm.world

    def get(name: str, split: int | None = None) -> torch.Tensor:
        if split is not None and world > 1:
            tensor = reader.get_slice(name, shapes[name], split, rank, world)
        else:
            tensor = reader.get(name, shapes[name])
        return tensor.to(device=device, dtype=spec.dtype).contiguous()

    def linear(name: str, split: int) -> Weight:
        """A layer's Linear weight, this rank's part: stored quantized, quantized here (spec.bits) or float."""
        if reader.is_quantized(name):  # a `vicunaflow quantize` folder: shard the stored codes as they are
            qw = reader.get_quantized(name)
            return (quant.shard(qw, split, rank, world) if world > 1 else qw).to(device)
        if not spec.bits:
            return get(name, split)
        if spec.bits == 8 and split == COLUMNS and world > 1 and reader.exact:
            # an int8 scale belongs to a whole row: quantize the row, then keep this rank's columns, so
            # the ranks' partial sums add up to the one-process product (and equal its tokens)
            whole = quant.quantize(reader.get(name, shapes[name]).to(device), 8)
            return quant.shard(whole, COLUMNS, rank, world)
        # rows (and int4 columns on group boundaries, load_model checks): quantizing the slice is the
        # slice of the quantized weight. Quantized from the stored dtype, as `vicunaflow quantize` does.
        source = (
            reader.get_slice(name, shapes[name], split, rank, world) if world > 1 else reader.get(name, shapes[name])
        )
        return quant.quantize(source.to(device), spec.bits, spec.group_size)

    def fused(weights: list[Weight]) -> Weight:
        return quant.cat(weights) if isinstance(weights[0], quant.QuantWeight) else torch.cat(weights)

    model.embed = get("model.embed_tokens.weight")
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        layer.attention_norm = get(p + "input_layernorm.weight")
        qkv = [linear(p + f"self_attn.{n}_proj.weight", ROWS) for n in "qkv"]
        layer.wqkv = fused(qkv)  # [(heads + 2 kv_heads) * head_dim, dim] of this rank
        layer.wo = linear(p + "self_attn.o_proj.weight", COLUMNS)  # [dim, heads * head_dim]
        layer.ffn_norm = get(p + "post_attention_layernorm.weight")
        gate_up = [linear(p + f"mlp.{n}_proj.weight", ROWS) for n in ("gate", "up")]
        layer.w13 = fused(gate_up)  # [2 ffn, dim]
        layer.w2 = linear(p + "mlp.down_proj.weight", COLUMNS)  # [dim, ffn]
        # after fusing and sharding: tinygemm's tiles and the columns layout are not split or stacked
        layer.wqkv, layer.wo, layer.w13, layer.w2 = (
            _int4_layout(w, spec) for w in (layer.wqkv, layer.wo, layer.w13, layer.w2)
        )
        del qkv, gate_up
        reader.release()
    model.norm = get("model.norm.weight")
    head = "model.embed_tokens.weight" if args.tie_word_embeddings else "lm_head.weight"
    # the int4 layers' group size: quantized here (spec.bits) or as the folder stores them (None: no int4 layers)
    int4_group = spec.group_size if spec.bits == 4 else getattr(reader, "group_size", None)
    if int4_group:
        # int4 layers: lm_head in int4 too (whole on every rank), quantized here from the stored tensor (a
        # `vicunaflow quantize` folder keeps it float). At int4 a float16 lm_head is 7% of a 7B step's bytes;
        # gpt-fast's int4 also quantizes every Linear, the output one included (docs/quantize.md, "lm_head").
        model.output = _int4_layout(quant.quantize(reader.get(head, shapes[head]).to(device), 4, int4_group), spec)
    else:  # float, or int8 layers: lm_head float (or the embedding itself)
        model.output = model.embed if args.tie_word_embeddings else get(head)
    reader.release()
    return model


def _int4_layout(weight: Weight, spec: LoadSpec) -> Weight:
    """An int4 QuantWeight in the layout its kernels read: tinygemm's (spec.int4_packed) or columns of words
    (spec.int4_columns); any other weight as it is."""
    if not (isinstance(weight, quant.QuantWeight) and weight.bits == 4):
        return weight
    return quant.int4pack(weight) if spec.int4_packed else quant.int4columns(weight) if spec.int4_columns else weight


def check_int4_split(args: ModelArgs, world: int, group_size: int) -> None:
    """Refuse an int4 split that would cut a group: o_proj and down_proj are split by input columns."""
    if world == 1:
        return
    for module, columns in (("o_proj", args.n_heads * args.head_dim), ("down_proj", args.ffn_dim)):
        part = columns // world
        if part % group_size:
            fits = [g for g in (128, 64, 32, 16, 8) if part % g == 0]
            hint = (
                f"quantize a folder with a group size dividing {part}: "
                f"`vicunaflow quantize --bits 4 --group-size {fits[0]}`"
                if fits
                else "use int8 (--load-8bit) or another --num-gpus"
            )
            raise VicunaflowError(
                f"--num-gpus {world}: each rank takes {part} of {module}'s {columns} input columns, not a "
                f"multiple of the int4 group size {group_size} (groups cannot be cut); {hint}"
            )


class _CheckpointReader:
    exact = True  # the same values whichever slice is read

    def __init__(self, path: Path, checkpoint: Checkpoint | None = None):
        self.checkpoint = checkpoint or Checkpoint(path)
        stored = quant.quantization_config(path)
        # int4: the group size the folder was written with (shapes cannot tell it)
        self.group_size = quant.stored_group_size(path) if stored and stored.get("bits") == 4 else None

    def check(self, shapes: dict[str, tuple[int, ...]]) -> None:
        names = set(self.checkpoint.names())
        quantized = {n for n in shapes if n not in names and self.is_quantized(n)}
        missing = sorted(set(shapes) - names - quantized, key=_natural)
        if missing:
            raise VicunaflowError(
                f"{self.checkpoint.directory}: no tensor {first_few(missing, 3)} ({len(missing)} of the "
                f"{len(shapes)} tensors config.json implies): the weights are incomplete or config.json is not theirs; "
                "write the folder again (re-run the step that made it) or restore its config.json"
            )
        for name, shape in shapes.items():
            if name in quantized:  # the codes' shape: int8 [N, K], int4 [N, K / 2] (two a byte)
                info = self.checkpoint.info(quant.quantized_names(name, 8)[0])
                found = tuple(info.shape)
                shape = shape if info.dtype == torch.int8 else (shape[0], shape[1] // 2)
            else:
                found = tuple(self.checkpoint.info(name).shape)
            if found != shape:
                raise VicunaflowError(
                    f"{self.checkpoint.directory}: {name} has shape {found}, config.json implies {shape}"
                )
        stored = {s for n in quantized for s in quant.quantized_names(n, 4)}
        extra = sorted(n for n in names - set(shapes) - stored if not n.endswith("rotary_emb.inv_freq"))
        layers = sum(1 for n in shapes if n.endswith(".input_layernorm.weight"))
        beyond = sorted({int(m[1]) for n in extra if (m := re.match(r"model\.layers\.(\d+)\.", n))})
        if beyond:
            raise VicunaflowError(
                f"{self.checkpoint.directory}: the weights hold layer {beyond[-1]} but config.json's "
                f"num_hidden_layers is {layers}: the config does not belong to these weights; restore it"
            )
        if extra:
            log.warning(
                "%s: ignoring %d tensors not in a LLaMA (%s, ...)", self.checkpoint.directory, len(extra), extra[0]
            )

    def get(self, name: str, shape) -> torch.Tensor:
        return self.checkpoint.get(name)

    def get_slice(self, name: str, shape, dim: int, rank: int, world: int) -> torch.Tensor:
        return self.checkpoint.get(name).chunk(world, dim=dim)[rank]  # a view of the mapped file

    def is_quantized(self, name: str) -> bool:
        return quant.is_quantized(self.checkpoint, name)

    def get_quantized(self, name: str) -> quant.QuantWeight:
        return quant.load_quantized_weight(
            self.checkpoint, name, group_size=self.group_size
        )  # views of the mapped file

    def release(self) -> None:
        self.checkpoint.release()


class _RandomReader:
    exact = False  # each rank draws its own slice (see the module docstring)

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

    def is_quantized(self, name: str) -> bool:
        return False

    def release(self) -> None:
        pass


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]

"""Will these models fit? Weights + KV cache of every model `serve` is asked to load, from config.json alone.

Loading a 13B for minutes only to die of an out-of-memory error on the third of three models is the
failure this prevents: before any weight is read, each model's bytes per rank are estimated the way
engine/build.py lays them out (projections split over the ranks, embeddings and lm_head whole on every
rank and always float; int8 or int4 projections, quantized at load or stored so by `vicunaflow quantize`,
counted with their scales and zeros as vicunaflow.quant stores them) plus the KV cache the Engine allocates
(--kv-cache-tokens, default max_batch_size x context, per layer, keys and values, in --kv-cache-dtype), and the sum is compared with the free memory of the GPU(s), or
with the RAM the kernel says is available on the CPU (CPU ranks all live in it).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from vicunaflow import VicunaflowError, quant
from vicunaflow.engine import ModelArgs
from vicunaflow.engine.build import weight_bytes
from vicunaflow.engine.cache import resolve_kv_cache_dtype
from vicunaflow.engine.load import check_weights_cap
from vicunaflow.engine.scheduler import kv_cache_blocks
from vicunaflow.formats import read_config

# What the estimate leaves unclaimed: activations of a prefill, logits, CUDA graphs, allocator slack.
HEADROOM = 0.9


@dataclasses.dataclass(frozen=True)
class Estimate:
    name: str
    weights: int  # bytes per rank
    kv_cache: int  # bytes per rank

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


def estimate(
    model_path: Path,
    *,
    name: str,
    device: str,
    num_gpus: int = 1,
    load_8bit: bool = False,
    load_4bit: bool = False,
    group_size: int = quant.DEFAULT_GROUP_SIZE,
    max_batch_size: int = 16,
    max_context: int | None = None,
    kv_cache_tokens: int | None = None,
    kv_cache_dtype: str = "auto",
) -> Estimate:
    """Bytes per rank of one model as `serve` would load it (device: "cpu" or "cuda", already resolved);
    refuses a --kv-cache-tokens too small for one full-context request, as the Engine would."""
    config_file = Path(model_path) / "config.json"
    try:
        config = read_config(config_file)  # refuses invalid JSON, and JSON that is not an object, naming the file
    except OSError as err:
        raise VicunaflowError(
            f"{model_path}: cannot read config.json ({err}); give a Hugging Face model directory"
        ) from None
    args = ModelArgs.from_hf(config, source=config_file)  # refused naming this model's config.json
    stored = quant.quantization_config(model_path)  # a quantized folder loads as it is stored
    if stored is not None:
        bits, group_size = stored["bits"], stored.get("group_size") or group_size
    else:
        bits = 8 if load_8bit else 4 if load_4bit else None
    itemsize = 2 if device == "cuda" else 4  # load_model's default: float16 on CUDA, float32 on CPU
    weights = weight_bytes(args, itemsize=itemsize, num_gpus=num_gpus, bits=bits, group_size=group_size)
    kv = args.n_kv_heads * args.head_dim
    context = min(args.max_position_embeddings, max_context) if max_context else args.max_position_embeddings
    try:  # the Engine would refuse it too, but only after the weights load (tens of seconds for a 13B)
        kv_cache_blocks(kv_cache_tokens, context=context, max_batch_size=max_batch_size)
    except VicunaflowError as err:
        raise VicunaflowError(f"{name}: {err}") from None
    tokens = max_batch_size * context  # the paged cache's default: every row at full context
    if kv_cache_tokens is not None:
        tokens = min(tokens, kv_cache_tokens)
    import torch

    kv_itemsize = resolve_kv_cache_dtype(kv_cache_dtype, torch.float16 if itemsize == 2 else torch.float32).itemsize
    kv_cache = 2 * args.n_layers * (kv // num_gpus) * tokens * kv_itemsize
    return Estimate(name, weights, kv_cache)


def check_fit(estimates: list[Estimate], *, device: str, num_gpus: int = 1, available: int | None = None) -> None:
    """Refuse, naming each model's share, when the models together need more than HEADROOM of the memory.

    available: bytes free per GPU (CUDA) or in RAM (CPU); default: asked of the GPUs or the kernel.
    """
    per_rank = sum(e.total for e in estimates)
    ranks_sharing = num_gpus if device == "cpu" else 1  # CPU ranks share the RAM; GPUs each hold one rank
    needed = per_rank * ranks_sharing
    where = f"on each of {num_gpus} GPU(s)" if device == "cuda" else "of RAM"
    if available is None:
        available = free_memory(device, num_gpus)
    if needed <= HEADROOM * available:
        return
    parts = ", ".join(f"{e.name} {_gib(e.weights)} weights + {_gib(e.kv_cache)} KV cache" for e in estimates)
    raise VicunaflowError(
        f"the model(s) do not fit: they need about {_gib(needed)} {where} ({parts}), "
        f"{_gib(available)} are free; serve fewer models, lower --kv-cache-tokens, --max-batch-size or "
        "--max-context, add --load-8bit, --load-4bit or --num-gpus"
    )


def check_memory_cap(estimates: list[Estimate], max_gpu_memory: str) -> None:
    """--max-gpu-memory, FastChat's meaning: a cap per GPU on the weights (the KV cache is --kv-cache-tokens', and
    check_fit's). The models `serve` loads share the GPU, so their weights count together: load_model checks each
    model alone, where two that each fit the cap passed although both together did not."""
    check_weights_cap(0, max_gpu_memory)  # a size it cannot read: its own message
    weights = sum(e.weights for e in estimates)
    if len(estimates) == 1:
        check_weights_cap(weights, max_gpu_memory)  # the message chat gives
        return
    try:
        check_weights_cap(weights, max_gpu_memory)
    except VicunaflowError:
        parts = ", ".join(f"{e.name} {_gib(e.weights)}" for e in estimates)
        raise VicunaflowError(
            f"--max-gpu-memory {max_gpu_memory}: the {len(estimates)} models' weights need {_gib(weights)} per GPU "
            f"together ({parts}); serve fewer models (one server per model), raise the cap, or add --load-8bit "
            "or --load-4bit"
        ) from None


def free_memory(device: str, num_gpus: int) -> int:
    if device == "cuda":
        import torch

        return min(torch.cuda.mem_get_info(i)[0] for i in range(num_gpus))
    try:  # MemAvailable: what can be allocated without swapping (free + reclaimable caches)
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"

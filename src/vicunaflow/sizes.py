"""The model sizes the workflow knows: one table, used by the CLI, the workflow and the tests.

`size` is the lower-case name in our output folders (`llama-13b-hf`); `raw_dir` is the folder
pyllama and Meta's download.sh write (`pyllama_data/13B`; the 33B model is called 30B there).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Size:
    name: str  # our name: 7b, 13b, 33b, 65b, tiny
    raw_dir: str  # pyllama's folder name: 7B, 13B, 30B, 65B, tiny
    shards: int  # model-parallel consolidated.NN.pth files in the raw release
    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int = 32000
    multiple_of: int = 256
    norm_eps: float = 1e-6

    @property
    def params_json(self) -> dict:
        """params.json as Meta ships it (vocab_size -1: taken from the tokenizer)."""
        return {
            "dim": self.dim,
            "multiple_of": self.multiple_of,
            "n_heads": self.n_heads,
            "n_layers": self.n_layers,
            "norm_eps": self.norm_eps,
            "vocab_size": -1,
        }


SIZES: dict[str, Size] = {
    s.name: s
    for s in (
        Size("7b", "7B", 1, dim=4096, n_layers=32, n_heads=32),
        Size("13b", "13B", 2, dim=5120, n_layers=40, n_heads=40),
        Size("33b", "30B", 4, dim=6656, n_layers=60, n_heads=52),
        Size("65b", "65B", 8, dim=8192, n_layers=80, n_heads=64),
        # Small enough to build, merge, fine-tune and chat on a laptop CPU in minutes;
        # two shards so the shard merge is exercised. Its vocabulary is the tokenizer we train.
        Size("tiny", "tiny", 2, dim=256, n_layers=4, n_heads=8, vocab_size=1024, multiple_of=32, norm_eps=1e-5),
    )
}

RAW_DIR_TO_SIZE = {s.raw_dir: s.name for s in SIZES.values()}


def get_size(name: str) -> Size:
    """Look a size up by our name (7b) or pyllama's folder name (7B)."""
    key = RAW_DIR_TO_SIZE.get(name, name.lower())
    if key not in SIZES:
        raise ValueError(f"unknown model size {name!r}; known: {', '.join(SIZES)}")
    return SIZES[key]


# ---- scheduler resources -------------------------------------------------------------------------
# What one job of each workflow step asks a scheduler for, per model size. vicunaflow.resources reads
# this table, applies config `resources:` (any field) and `cluster:`, and hands the workflow the
# SLURM executor's resources (workflow/rules/common.smk, get_resources).


@dataclass(frozen=True)
class Resources:
    """What one job asks for; config `resources:` (and a fine-tuning run's own) override any field."""

    runtime: int  # minutes of wall time
    mem_mb: int  # host memory per node
    cpus_per_task: int  # one task per node: the CPUs of that node's launcher and its workers
    gpu: int = 0  # GPUs per node
    nodes: int = 1


# Merge and convert stream tensor by tensor: the peak is about one layer of every input shard plus
# the output shard being written (a few GB at 13B); the numbers leave room for page cache and the
# largest tensors (embeddings, 32000 x dim in float32 for apply-delta).
# Fine-tuning is full-parameter FSDP: ~16 bytes per parameter (float32 weights and grads, two
# float32 Adam moments; bf16 copies are transient) spread over the GPUs, plus activations.
# The seed trains 7B on 4 x A100-40G or 2 x A100-80G (4 fits both: the default) and 13B on
# 8 x A100-80G; 33B (~520 GB of state) and 65B (~1 TB) need 2 and 4 nodes of 8 x 80 GB.
# Host memory: only rank 0 reads the weights (float32, 4 bytes per parameter: 27 GB at 7B, 52 GB at
# 13B, 130 GB at 33B, 261 GB at 65B) and broadcasts the shards; the other ranks start on the meta
# device. A node needs that one copy plus a few GB per process (CUDA context, data, pinned buffers).
# chat_smoke loads the model in half precision (2 bytes per parameter) on as few GPUs as hold it.
RESOURCES: dict[str, dict[str, Resources]] = {
    "download": {  # local rules (compute nodes often have no internet): sized for the login node
        "7b": Resources(runtime=240, mem_mb=4000, cpus_per_task=2),
        "13b": Resources(runtime=480, mem_mb=4000, cpus_per_task=2),
        "33b": Resources(runtime=960, mem_mb=4000, cpus_per_task=2),
        "65b": Resources(runtime=1440, mem_mb=4000, cpus_per_task=2),
        "tiny": Resources(runtime=10, mem_mb=2000, cpus_per_task=1),
    },
    "convert": {
        "7b": Resources(runtime=60, mem_mb=8000, cpus_per_task=4),
        "13b": Resources(runtime=90, mem_mb=12000, cpus_per_task=4),
        "33b": Resources(runtime=180, mem_mb=20000, cpus_per_task=4),
        "65b": Resources(runtime=300, mem_mb=28000, cpus_per_task=4),
        "tiny": Resources(runtime=10, mem_mb=2000, cpus_per_task=1),
    },
    "apply_delta": {
        "7b": Resources(runtime=60, mem_mb=8000, cpus_per_task=4),
        "13b": Resources(runtime=90, mem_mb=12000, cpus_per_task=4),
        "33b": Resources(runtime=180, mem_mb=20000, cpus_per_task=4),
        "65b": Resources(runtime=300, mem_mb=28000, cpus_per_task=4),
        "tiny": Resources(runtime=10, mem_mb=2000, cpus_per_task=1),
    },
    "quantize": {  # one tensor at a time, like apply_delta, plus its float32 copy while it is quantized
        "7b": Resources(runtime=30, mem_mb=8000, cpus_per_task=4),
        "13b": Resources(runtime=60, mem_mb=12000, cpus_per_task=4),
        "33b": Resources(runtime=120, mem_mb=20000, cpus_per_task=4),
        "65b": Resources(runtime=180, mem_mb=28000, cpus_per_task=4),
        "tiny": Resources(runtime=10, mem_mb=2000, cpus_per_task=1),
    },
    "tokenize_data": {  # the tokenizer is the same for every size; longer data, not bigger models, cost more
        "7b": Resources(runtime=60, mem_mb=8000, cpus_per_task=4),
        "13b": Resources(runtime=60, mem_mb=8000, cpus_per_task=4),
        "33b": Resources(runtime=60, mem_mb=8000, cpus_per_task=4),
        "65b": Resources(runtime=60, mem_mb=8000, cpus_per_task=4),
        "tiny": Resources(runtime=10, mem_mb=2000, cpus_per_task=1),
    },
    "finetune": {
        "7b": Resources(runtime=1440, mem_mb=64000, cpus_per_task=32, gpu=4),
        "13b": Resources(runtime=2880, mem_mb=128000, cpus_per_task=64, gpu=8),
        "33b": Resources(runtime=2880, mem_mb=240000, cpus_per_task=64, gpu=8, nodes=2),
        "65b": Resources(runtime=2880, mem_mb=400000, cpus_per_task=64, gpu=8, nodes=4),
        # CPU by default (the demo runs anywhere); the SLURM test asks for 2 fake GPUs in its config.
        "tiny": Resources(runtime=20, mem_mb=4000, cpus_per_task=2),
    },
    "chat_smoke": {
        "7b": Resources(runtime=30, mem_mb=32000, cpus_per_task=4, gpu=1),
        "13b": Resources(runtime=30, mem_mb=48000, cpus_per_task=4, gpu=1),
        "33b": Resources(runtime=60, mem_mb=96000, cpus_per_task=8, gpu=2),
        "65b": Resources(runtime=60, mem_mb=160000, cpus_per_task=8, gpu=4),
        "tiny": Resources(runtime=10, mem_mb=2000, cpus_per_task=1),
    },
}

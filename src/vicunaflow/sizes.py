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

"""Meta's raw LLaMA layout versus Hugging Face's: tensor names, shard merge dims, rotary permutation.

Meta splits model-parallel shards along dim 0 for wq/wk/wv/w1/w3/output and dim 1 for
wo/w2/tok_embeddings; norms are replicated (the layers of Meta's llama/model.py: column-parallel
versus row-parallel, and ParallelEmbedding). Meta's rotary embedding rotates interleaved pairs,
Hugging Face's rotates halves, so q and k rows are permuted on the way (the `permute` of transformers'
convert_llama_weights_to_hf.py, shipped up to 4.47). tests/test_convert.py checks all of it against a
hand-written Meta forward pass, and that the check fails without the permutation.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from vicunaflow import VicunaflowError

# Meta name (per layer, `{i}` = layer index) -> (Hugging Face name, dim to concatenate shards on,
# or None when the tensor is replicated in every shard).
LAYER_NAMES: dict[str, tuple[str, int | None]] = {
    "layers.{i}.attention.wq.weight": ("model.layers.{i}.self_attn.q_proj.weight", 0),
    "layers.{i}.attention.wk.weight": ("model.layers.{i}.self_attn.k_proj.weight", 0),
    "layers.{i}.attention.wv.weight": ("model.layers.{i}.self_attn.v_proj.weight", 0),
    "layers.{i}.attention.wo.weight": ("model.layers.{i}.self_attn.o_proj.weight", 1),
    "layers.{i}.feed_forward.w1.weight": ("model.layers.{i}.mlp.gate_proj.weight", 0),
    "layers.{i}.feed_forward.w2.weight": ("model.layers.{i}.mlp.down_proj.weight", 1),
    "layers.{i}.feed_forward.w3.weight": ("model.layers.{i}.mlp.up_proj.weight", 0),
    "layers.{i}.attention_norm.weight": ("model.layers.{i}.input_layernorm.weight", None),
    "layers.{i}.ffn_norm.weight": ("model.layers.{i}.post_attention_layernorm.weight", None),
}
GLOBAL_NAMES: dict[str, tuple[str, int | None]] = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", 1),
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
}
# dtype names the CLI accepts (--dtype) and config.json's torch_dtype uses -> torch dtypes.
DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Keys Meta checkpoints carry that are not weights (recomputed by every implementation).
# generation_config.json of a LLaMA model in Hugging Face's format: the ids of <s>, </s> and <unk> in
# LLaMA's SentencePiece vocabulary (pad is <unk>, as transformers' conversion wrote it). convert writes it;
# apply-delta writes it where the delta has none.
GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
IGNORED_META_KEYS = re.compile(r"^(rope\.freqs|layers\.\d+\.attention\.inner_attention\.rope\.freqs)$")


def read_config(config_file: Path) -> dict:
    """A model folder's config.json as a dict, or a clear error naming it (cut short, edited by hand, not UTF-8)."""
    try:
        config = json.loads(Path(config_file).read_text())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise VicunaflowError(f"{config_file}: not valid JSON ({err}); restore the model's config.json") from None
    if not isinstance(config, dict):
        raise VicunaflowError(f"{config_file}: not a JSON object; restore the model's config.json")
    return config


def meta_names(n_layers: int) -> dict[str, tuple[str, int | None]]:
    """Every Meta tensor name of an n-layer model -> (HF name, merge dim), in file order."""
    names = dict(GLOBAL_NAMES)
    for i in range(n_layers):
        for meta, (hf, dim) in LAYER_NAMES.items():
            names[meta.format(i=i)] = (hf.format(i=i), dim)
    return names


def hf_names(n_layers: int) -> list[str]:
    return [hf for hf, _ in meta_names(n_layers).values()]


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """LLaMA's FFN width: 11008 for 7B, 13824 for 13B (Meta's model.py formula)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def meta_shapes(params: dict, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Shape of every merged Meta tensor, from params.json alone (nothing is allocated)."""
    dim, n_heads = params["dim"], params["n_heads"]
    kv_dim = (params.get("n_kv_heads") or n_heads) * (dim // n_heads)
    hidden = ffn_hidden_dim(dim, params["multiple_of"], params.get("ffn_dim_multiplier"))
    per_layer = {
        "attention.wq.weight": (dim, dim),
        "attention.wk.weight": (kv_dim, dim),
        "attention.wv.weight": (kv_dim, dim),
        "attention.wo.weight": (dim, dim),
        "feed_forward.w1.weight": (hidden, dim),
        "feed_forward.w2.weight": (dim, hidden),
        "feed_forward.w3.weight": (hidden, dim),
        "attention_norm.weight": (dim,),
        "ffn_norm.weight": (dim,),
    }
    shapes = {"tok_embeddings.weight": (vocab_size, dim), "norm.weight": (dim,), "output.weight": (vocab_size, dim)}
    for i in range(params["n_layers"]):
        shapes |= {f"layers.{i}.{name}": shape for name, shape in per_layer.items()}
    return shapes


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k rows from Meta's interleaved rotary pairs to Hugging Face's rotate-half layout.

    Within each head, row pairs (2j, 2j+1) become rows (j, j + head_dim/2). Pure reindexing:
    values and dtype are unchanged.
    """
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of permute_rotary (Hugging Face -> Meta)."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_config(params: dict, vocab_size: int, dtype: torch.dtype, max_position_embeddings: int = 2048) -> dict:
    """config.json for LlamaForCausalLM from Meta's params.json."""
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv_heads = params.get("n_kv_heads") or n_heads
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": ffn_hidden_dim(dim, params["multiple_of"], params.get("ffn_dim_multiplier")),
        "num_hidden_layers": params["n_layers"],
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": dim // n_heads,
        "hidden_act": "silu",
        "rms_norm_eps": params["norm_eps"],
        "rope_theta": float(params.get("rope_theta", 10000.0)),
        "max_position_embeddings": max_position_embeddings,
        "vocab_size": vocab_size,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }

"""Meta <-> Hugging Face key maps for the real sizes, checked on the meta device (nothing allocated)."""

from __future__ import annotations

import pytest
import torch

from vicunaflow.formats import (
    ffn_hidden_dim,
    hf_config,
    hf_names,
    meta_names,
    meta_shapes,
    permute_rotary,
    unpermute_rotary,
)
from vicunaflow.sizes import get_size


@pytest.mark.parametrize(("size", "hidden"), [("7b", 11008), ("13b", 13824), ("33b", 17920), ("65b", 22016)])
def test_ffn_width(size, hidden):
    s = get_size(size)
    assert ffn_hidden_dim(s.dim, s.multiple_of) == hidden


@pytest.mark.parametrize("size", ["7b", "13b"])
def test_key_map_matches_transformers_llama(size):
    """Every converted name and shape is exactly what LlamaForCausalLM expects for the real model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    s = get_size(size)
    params = s.params_json
    config = hf_config(params, vocab_size=32000, dtype=torch.float16)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config))
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    shapes = meta_shapes(params, vocab_size=32000)
    ours = {hf: shapes[meta] for meta, (hf, _) in meta_names(s.n_layers).items()}
    assert ours == expected
    assert len(hf_names(s.n_layers)) == 3 + 9 * s.n_layers
    n_params = sum(torch.Size(shape).numel() for shape in ours.values())
    assert n_params == {"7b": 6_738_415_616, "13b": 13_015_864_320}[size]  # the published counts


def test_grouped_query_shapes():
    params = {
        "dim": 8192,
        "n_layers": 1,
        "n_heads": 64,
        "n_kv_heads": 8,
        "multiple_of": 4096,
        "ffn_dim_multiplier": 1.3,
        "norm_eps": 1e-5,
    }  # fmt: skip  (Llama 2 70B)
    shapes = meta_shapes(params, vocab_size=32000)
    assert shapes["layers.0.attention.wk.weight"] == (1024, 8192)
    assert shapes["layers.0.feed_forward.w1.weight"] == (28672, 8192)
    config = hf_config(params, 32000, torch.bfloat16)
    assert config["num_key_value_heads"] == 8 and config["intermediate_size"] == 28672


def test_merge_dims_follow_meta_layout():
    names = meta_names(1)
    assert names["layers.0.attention.wq.weight"][1] == 0
    assert names["layers.0.attention.wo.weight"][1] == 1
    assert names["layers.0.feed_forward.w2.weight"][1] == 1
    assert names["tok_embeddings.weight"][1] == 1
    assert names["output.weight"][1] == 0
    assert names["layers.0.attention_norm.weight"][1] is None


def test_permutation_is_a_pure_reindexing_and_invertible():
    w = torch.arange(8 * 16 * 3, dtype=torch.float32).reshape(8 * 16, 3)  # 8 heads of 16 rows
    p = permute_rotary(w, n_heads=8)
    assert torch.equal(unpermute_rotary(p, n_heads=8), w)
    assert torch.equal(p.sort(dim=0).values, w)
    # head 0: interleaved pairs (0,1), (2,3), ... -> evens first, then odds
    assert p[:16, 0].tolist() == [3.0 * i for i in [0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15]]

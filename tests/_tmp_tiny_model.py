"""TEMPORARY (serve engineer): a tiny random Vicuna-shaped model until conftest's tiny_vicuna works."""

import pytest


@pytest.fixture(scope="session")
def tiny_vicuna(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vicunaflow.synth import train_tokenizer
    from vicunaflow.tokenizer import write_tokenizer

    out = tmp_path_factory.mktemp("tmp-tiny") / "vicuna-tiny-all-v1.1"
    out.mkdir()
    (out / "spm.model").write_bytes(train_tokenizer(1024))
    write_tokenizer(out / "spm.model", out)
    config = LlamaConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
        max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out

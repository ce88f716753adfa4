"""synth: same arguments, same bytes (the demo and the workflow's incremental reruns rely on it)."""

from __future__ import annotations

import json

import torch

from vicunaflow.synth import synth_delta, synth_llama


def file_bytes(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != "vicunaflow.json"}


def test_synth_llama_is_deterministic(tmp_path, tiny_raw):
    again = synth_llama(folder=tmp_path / "pyllama_data", model_size="tiny")
    assert file_bytes(again) == file_bytes(tiny_raw)


def test_synth_llama_layout(tiny_raw):
    params = json.loads((tiny_raw / "params.json").read_text())
    assert params["dim"] == 256 and params["n_layers"] == 4 and params["vocab_size"] == -1
    shards = sorted(p.name for p in tiny_raw.glob("consolidated.*.pth"))
    assert shards == ["consolidated.00.pth", "consolidated.01.pth"]
    state = torch.load(tiny_raw / shards[0], weights_only=True)
    assert state["layers.0.attention.wq.weight"].shape == (128, 256)  # half of the heads
    assert state["layers.0.attention.wo.weight"].shape == (256, 128)
    assert state["tok_embeddings.weight"].dtype == torch.float16
    checklist = (tiny_raw / "checklist.chk").read_text()
    assert "consolidated.00.pth" in checklist and "params.json" in checklist
    # The manifest comes after the checklist: the checklist lists the checkpoint files only.
    assert "vicunaflow.json" not in checklist
    manifest = json.loads((tiny_raw / "vicunaflow.json").read_text())
    assert manifest["kind"] == "synthetic-llama" and manifest["shards"] == 2 and manifest["seed"] == 0


def test_synth_delta_is_deterministic_bin_layout(tmp_path, tiny_hf, tiny_delta):
    again = synth_delta(base=tiny_hf, output_dir=tmp_path / "delta")
    assert file_bytes(again) == file_bytes(tiny_delta)
    assert sorted(p.name for p in again.glob("*.bin")) == [
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
    ]


def test_synth_tokenizer_padded_to_the_requested_vocabulary():
    """Real sizes need 32000 embedding rows; the built-in corpus trains fewer pieces, unused ones fill up."""
    import sentencepiece as spm

    from vicunaflow.synth import train_tokenizer

    tokenizer = spm.SentencePieceProcessor(model_proto=train_tokenizer(8000))
    assert tokenizer.get_piece_size() == 8000
    unused = [i for i in range(8000) if tokenizer.is_unused(i)]
    assert unused and unused == list(range(8000 - len(unused), 8000))  # the padding, all at the end
    ids = tokenizer.encode("USER: Hello there, 12345 ASSISTANT: fine " * 3)
    assert ids and not any(tokenizer.is_unused(i) for i in ids)  # encoding never produces them

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

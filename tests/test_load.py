"""engine/load.py: what load_model refuses before reading any weight."""

from __future__ import annotations

import pytest

from vicunaflow import VicunaflowError
from vicunaflow.engine import build, load


@pytest.mark.parametrize("options", [{}, {"load_8bit": True}, {"load_4bit": True}])
def test_max_gpu_memory_is_checked_before_any_weight_loads(tiny_vicuna, monkeypatch, options):
    """--max-gpu-memory compares the config's weight estimate (exactly what build_model lays out) with the
    cap first: a cap one byte short refuses without building; the exact size loads."""
    model, _ = load.load_model(tiny_vicuna, device="cpu", **options)
    needed = model.weight_bytes()
    args = build.read_args(tiny_vicuna)
    bits = 8 if options.get("load_8bit") else 4 if options.get("load_4bit") else None
    assert build.weight_bytes(args, itemsize=4, bits=bits) == needed

    def no_build(*_args, **_kwargs):
        raise AssertionError("build_model ran before --max-gpu-memory was checked")

    with monkeypatch.context() as patch:
        patch.setattr(load, "build_model", no_build)
        with pytest.raises(VicunaflowError, match=r"--max-gpu-memory 1MiB: the weights need [\d.]+ MiB per GPU"):
            load.load_model(tiny_vicuna, device="cpu", max_gpu_memory="1MiB", **options)
        with pytest.raises(VicunaflowError, match=f"--max-gpu-memory {needed - 1}: "):
            load.load_model(tiny_vicuna, device="cpu", max_gpu_memory=str(needed - 1), **options)
        with pytest.raises(VicunaflowError, match="--max-gpu-memory lots: give a size such as 20GiB"):
            load.load_model(tiny_vicuna, device="cpu", max_gpu_memory="lots", **options)
    model, _ = load.load_model(tiny_vicuna, device="cpu", max_gpu_memory=str(needed), **options)
    assert model.weight_bytes() == needed

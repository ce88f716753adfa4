"""The Triton matvec kernel of the one-row decode step, run by Triton's interpreter where there is no GPU."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel is first built

from vicunaflow import kernels
from vicunaflow.engine import Engine, SamplingParams, load_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    ("n", "k", "swiglu", "residual", "dtype"),
    [
        (37, 100, False, False, torch.float16),  # neither size a multiple of a block: masked loads
        (64, 128, True, True, torch.float16),  # the MLP's down projection: silu(gate) * up in, residual added
        (12, 130, False, True, torch.bfloat16),
        (8, 64, False, False, torch.float32),
    ],
)
def test_matvec_matches_float64_reference(n, k, swiglu, residual, dtype):
    generator = torch.Generator().manual_seed(n * k)
    weight = torch.randn(n, k, generator=generator).to(DEVICE, dtype)
    x = torch.randn(1, 2 * k if swiglu else k, generator=generator).to(DEVICE, dtype)
    res = torch.randn(1, n, generator=generator).to(DEVICE, dtype) if residual else None
    out = kernels.matvec(x, weight, res, swiglu=swiglu)
    inputs = x.double()
    if swiglu:
        inputs = torch.nn.functional.silu(inputs[:, :k]) * inputs[:, k:]
    expected = inputs @ weight.double().T + (res.double() if residual else 0)
    assert out.shape == (1, n) and out.dtype == dtype
    # float32 accumulation: the only error is rounding the result to the output dtype
    tolerance = {torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float32: 1e-6}[dtype]
    assert torch.allclose(out.double(), expected, rtol=tolerance, atol=tolerance * 4)


def test_matvec_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="does not fit"):
        kernels.matvec(torch.zeros(1, 10), torch.zeros(4, 12))
    with pytest.raises(ValueError, match="contiguous"):
        kernels.matvec(torch.zeros(1, 12), torch.zeros(12, 4).T)


def test_matvec_writes_float32_into_out():
    """Tensor parallelism stores float16 products as float32 straight into its all-reduce buffer."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 96, generator=generator).to(DEVICE, torch.float16)
    x = torch.randn(1, 96, generator=generator).to(DEVICE, torch.float16)
    out = torch.empty(1, 40, device=DEVICE, dtype=torch.float32)
    assert kernels.matvec(x, weight, out=out) is out
    expected = x.double() @ weight.double().T
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.matvec(x, weight, out=torch.empty(2, 40, device=DEVICE))
    # a float32 residual stream (symmetric-memory tensor parallelism): float32 input and residual
    x32, residual = x.float() * 1.5, torch.randn(1, 40, generator=generator).to(DEVICE)
    kernels.matvec(x32, weight, residual, out=out)
    assert torch.allclose(out.double(), x32.double() @ weight.double().T + residual.double(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_matvec_folds_rms_norm_into_its_input(dtype):
    """norm=: the product of rms_norm(x) (float32 inside the kernel), as q|k|v and gate|up take it."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 200, generator=generator).to(DEVICE, dtype)
    x = (3 * torch.randn(1, 200, generator=generator)).to(DEVICE, dtype)
    norm = (1 + torch.rand(200, generator=generator)).to(DEVICE, dtype)
    out = kernels.matvec(x, weight, norm=norm, eps=1e-5)
    xd = x.double()
    normed = xd * torch.rsqrt(xd.pow(2).mean(dim=-1, keepdim=True) + 1e-5) * norm.double()
    expected = normed @ weight.double().T
    tolerance = {torch.float16: 2**-10, torch.float32: 1e-6}[dtype]
    assert torch.allclose(out.double(), expected, rtol=tolerance, atol=tolerance * 8)


def test_decode_step_with_kernels_matches_torch_path(tiny_vicuna):
    """One decode step of the tiny Vicuna: matvec projections give the logits of the plain torch ops."""
    model, _ = load_model(tiny_vicuna, device=DEVICE)
    model.layers = model.layers[:1]  # one layer is enough, and Triton's interpreter is slow
    model.setup_cache(slots=1, context=8)
    input_ids, positions = torch.tensor([[5]], device=DEVICE), torch.tensor([[0]], device=DEVICE)
    with torch.inference_mode():
        plain = model(input_ids, positions, kv_length=1)
        model.matvec = True
        fused = model(input_ids, positions, kv_length=1)
    assert fused.shape == plain.shape == (1, model.args.vocab_size)
    tolerance = 1e-4 if plain.dtype == torch.float32 else 2e-2  # half precision: two roundings of each output
    assert torch.allclose(fused.float(), plain.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_engine_uses_kernels_in_its_graphs(tiny_vicuna):
    """float16 on a GPU: the engine picks the kernels, captures them in its graphs and streams a reply."""
    model, tokenizer = load_model(tiny_vicuna, device="cuda", dtype="float16")
    with Engine(model, tokenizer, max_batch_size=2) as engine:
        events = list(engine.generate([1, 5, 6, 7], SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)))
        stats = engine.snapshot_stats()
    assert events[-1].completion_tokens == 16
    assert stats["decode_kernels"] and stats["overlap"] and stats["queued_ahead"] > 0
    assert engine.runner.cuda_graphs  # no capture fell back to eager

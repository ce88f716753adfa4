"""The Triton matvec kernel of the one-row decode step, run by Triton's interpreter where there is no GPU."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel is first built

from vicunaflow import VicunaflowError, autotuning, kernels
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


# ---- matmul_rows: batched decode steps on float weights -------------------------------------------


def rows_reference(x, weight, residual=None, swiglu=False, norm=None, eps=1e-5):
    """float64 x @ weight.T (+ residual) of the input matmul_rows forms: rms_norm(x) or silu(gate) * up,
    rounded to the weight's dtype as the kernel (and cuBLAS) multiply it."""
    inputs = x.double()
    if swiglu:
        k = weight.shape[1]
        inputs = torch.nn.functional.silu(inputs[:, :k]) * inputs[:, k:]
    if norm is not None:
        inputs = torch.nn.functional.rms_norm(inputs, (inputs.shape[1],), norm.double(), eps)
    inputs = inputs.to(weight.dtype).double()
    return inputs @ weight.double().T + (residual.double() if residual is not None else 0)


@pytest.mark.parametrize(
    ("m", "n", "k", "dtype", "epilogue"),
    [
        (2, 37, 100, torch.float16, "plain"),  # neither N nor K a multiple of a block: masked loads
        (5, 64, 128, torch.float16, "swiglu+residual"),  # down_proj: silu(gate) * up in, residual added
        (15, 48, 200, torch.float16, "norm"),  # q|k|v, gate|up: RMSNorm folded into the input tiles
        (16, 48, 200, torch.float16, "norm"),  # NORM_FIRST_ROWS: the input normalised first (rows_input)
        (33, 40, 64, torch.float16, "norm+residual"),  # BLOCK_M 64
        (5, 37, 130, torch.bfloat16, "norm+residual"),
        (2, 32, 128, torch.bfloat16, "swiglu"),
        (3, 24, 96, torch.float32, "residual"),
    ],
)
def test_matmul_rows_matches_float64_reference(m, n, k, dtype, epilogue):
    generator = torch.Generator().manual_seed(m * n + k)
    weight = torch.randn(n, k, generator=generator).to(DEVICE, dtype)
    swiglu = "swiglu" in epilogue
    x = (3 * torch.randn(m, 2 * k if swiglu else k, generator=generator)).to(DEVICE, dtype)
    norm = torch.rand(k, generator=generator).add(0.5).to(DEVICE, dtype) if "norm" in epilogue else None
    res = torch.randn(m, n, generator=generator).to(DEVICE, dtype) if "residual" in epilogue else None
    out = kernels.matmul_rows(x, weight, res, swiglu=swiglu, norm=norm, eps=1e-5)
    expected = rows_reference(x, weight, res, swiglu, norm)
    assert out.shape == (m, n) and out.dtype == dtype
    # float32 accumulation: rounding the input to the weight's dtype (in the reference too) and the result
    tolerance = {torch.float16: 2**-9, torch.bfloat16: 2**-6, torch.float32: 1e-6}[dtype]
    assert torch.allclose(out.double(), expected, rtol=tolerance, atol=tolerance * float(expected.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [6, 20])  # RMSNorm folded in, and normalised first (NORM_FIRST_ROWS)
def test_matmul_rows_writes_float32_into_out(dtype, m):
    """Tensor parallelism's multi-row steps store float32 partial sums straight into its all-reduce buffer;
    a float32 input and residual (its residual stream) are read as they are."""
    generator = torch.Generator().manual_seed(2)
    n, k = 40, 96
    weight = torch.randn(n, k, generator=generator).to(DEVICE, dtype)
    x = torch.randn(m, k, generator=generator).to(DEVICE, dtype)
    out = torch.full((m, n), float("nan"), device=DEVICE)
    assert kernels.matmul_rows(x, weight, out=out) is out
    tolerance = 1e-5 if dtype == torch.float16 else 2**-7
    expected = rows_reference(x, weight)
    assert torch.allclose(out.double(), expected, rtol=tolerance, atol=tolerance * float(expected.abs().max()))
    x32, residual = torch.randn(m, k, generator=generator).to(DEVICE), torch.randn(m, n, generator=generator).to(DEVICE)
    norm = torch.rand(k, generator=generator).add(0.5).to(DEVICE, dtype)
    kernels.matmul_rows(x32, weight, residual, out=out, norm=norm, eps=1e-6)
    expected = rows_reference(x32, weight, residual, norm=norm, eps=1e-6)
    assert torch.allclose(out.double(), expected, rtol=2**-7, atol=2**-7 * float(expected.abs().max()))


@pytest.mark.parametrize(
    ("m", "n", "k", "splits", "epilogue", "dtype"),
    [
        (4, 64, 256, 2, "residual", torch.float16),  # o: whole tiles of K in each part
        (5, 37, 200, 2, "swiglu+residual", torch.float16),  # down: N, K not multiples of a block, the last part short
        (3, 40, 130, 3, "plain", torch.float16),  # three parts of K's three tiles of 64 (the interpreter's)
        (2, 24, 96, 4, "residual", torch.float16),  # more parts than K has tiles: the last runs none, adds zeros
        (6, 40, 96, 2, "norm+residual", torch.bfloat16),  # RMSNorm asked for with splits: normalised first
        (20, 40, 96, 2, "residual+out32", torch.float16),  # tensor parallelism's float32 buffer as out
    ],
)
def test_matmul_rows_split_over_k_matches_float64(m, n, k, splits, epilogue, dtype):
    """Programs each over a part of K: the last of a tile's to finish sums the parts in split order; the
    output matches float64 and the counters are left at zero for the next launch. (That the bits repeat
    whichever program finishes last needs a GPU: the next test.)"""
    generator = torch.Generator().manual_seed(m * n + k)
    weight = torch.randn(n, k, generator=generator).to(DEVICE, dtype)
    swiglu = "swiglu" in epilogue
    x = (3 * torch.randn(m, 2 * k if swiglu else k, generator=generator)).to(DEVICE, dtype)
    res = torch.randn(m, n, generator=generator).to(DEVICE, dtype) if "residual" in epilogue else None
    norm = torch.rand(k, generator=generator).add(0.5).to(DEVICE, dtype) if "norm" in epilogue else None
    out = torch.full((m, n), float("nan"), device=DEVICE) if "out32" in epilogue else None
    result = kernels.matmul_rows(x, weight, res, swiglu=swiglu, norm=norm, eps=1e-5, k_splits=splits, out=out)
    assert result.dtype == (torch.float32 if out is not None else dtype)
    expected = rows_reference(x, weight, res, swiglu, norm)
    tolerance = {torch.float16: 2**-9, torch.bfloat16: 2**-6}[dtype]
    assert torch.allclose(result.double(), expected, rtol=tolerance, atol=tolerance * float(expected.abs().max()))
    assert not kernels._split_counters(result.device).any()


@pytest.mark.skipif(DEVICE != "cuda" or os.environ.get("TRITON_INTERPRET") == "1", reason="programs racing: a GPU")
def test_matmul_rows_split_over_k_gives_the_same_bits_whichever_program_finishes_last():
    """On a GPU a tile's programs finish in any order: the sum in split order gives the same bits every
    launch (atomic adds into the output would not), and every launch leaves the counters at zero."""
    generator = torch.Generator().manual_seed(3)
    m, n, k = 32, 4096, 11008  # a 7B's down product: 64 tiles
    weight = (torch.randn(n, k, generator=generator) / k**0.5).to(DEVICE, torch.float16)
    x = torch.randn(m, k, generator=generator).to(DEVICE, torch.float16)
    residual = torch.randn(m, n, generator=generator).to(DEVICE, torch.float16)
    for splits in (2, 3):
        first = kernels.matmul_rows(x, weight, residual, k_splits=splits)
        for _ in range(50):
            assert torch.equal(kernels.matmul_rows(x, weight, residual, k_splits=splits), first)
        assert not kernels._split_counters(first.device).any()
        expected = rows_reference(x, weight, residual)
        assert torch.allclose(first.double(), expected, rtol=2**-9, atol=2**-9 * float(expected.abs().max()))


def test_matmul_rows_normalises_many_rows_first_and_few_in_its_tiles():
    """From NORM_FIRST_ROWS rows the input is normalised by rows_input first (the same bits as doing that by
    hand), fewer rows fold RMSNorm into the product's tiles; both match float64."""
    generator = torch.Generator().manual_seed(7)
    n, k = 40, 128
    weight = torch.randn(n, k, generator=generator).to(DEVICE, torch.float16)
    norm = torch.rand(k, generator=generator).add(0.5).to(DEVICE, torch.float16)
    for m in (kernels.NORM_FIRST_ROWS - 1, kernels.NORM_FIRST_ROWS):
        x = (3 * torch.randn(m, k, generator=generator)).to(DEVICE, torch.float16)
        out = kernels.matmul_rows(x, weight, norm=norm, eps=1e-5)
        first = kernels.matmul_rows(kernels.rows_input(x, norm=norm, eps=1e-5, dtype=torch.float16), weight)
        assert torch.equal(out, first) == (m >= kernels.NORM_FIRST_ROWS)
        expected = rows_reference(x, weight, norm=norm)
        assert torch.allclose(out.double(), expected, rtol=2**-9, atol=2**-9 * float(expected.abs().max()))


def test_matmul_rows_splits_only_products_without_rmsnorm_that_underfill_the_gpu():
    """RMSNorm's sum of squares spans all of K: no split with it folded in; off CUDA, one program a tile."""
    weight = torch.zeros(8, 96, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"0 splits over K \(at least 1"):
        kernels.matmul_rows(torch.zeros(4, 96, dtype=torch.float16), weight, k_splits=0)
    with pytest.raises(ValueError, match="more only for N <="):
        kernels.matmul_rows(torch.zeros(4, 96, dtype=torch.float16), torch.zeros(65537, 96), k_splits=2)
    assert kernels.k_splits_for(4096, 32, torch.device("cpu"), whole_k=False) == 1
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        cuda = torch.device("cuda", 0)
        assert kernels.k_splits_for(64 * (sms - 1), 32, cuda, whole_k=False) == 2
        assert kernels.k_splits_for(64 * (sms - 1), 16, cuda, whole_k=False) == 1
        assert kernels.k_splits_for(64 * sms, 32, cuda, whole_k=False) == 1
        assert kernels.k_splits_for(64 * (sms - 1), 32, cuda, whole_k=True) == 1


def test_matmul_rows_hands_many_rows_without_a_residual_to_cublas(monkeypatch):
    """From CUBLAS_ROWS rows on a GPU the products with no residual (q|k|v, gate|up, the head) go to cuBLAS after
    rows_input, the ones with a residual (o, down) stay in our kernel; either way the float64 reference's result."""
    cuda = torch.device("cuda", 0)
    # the interpreter's switch back as it was before the launches below: a kernel first built while it is on
    # stays interpreted in this process (on a GPU box every later test launching it failed)
    with monkeypatch.context() as env:
        env.delenv("TRITON_INTERPRET", raising=False)
        assert kernels.takes_cublas(kernels.CUBLAS_ROWS, None, cuda)
        assert not kernels.takes_cublas(kernels.CUBLAS_ROWS - 1, None, cuda)
        assert not kernels.takes_cublas(64, torch.zeros(1), cuda)
        assert not kernels.takes_cublas(64, None, torch.device("cpu"))
        env.setenv("TRITON_INTERPRET", "1")
        assert not kernels.takes_cublas(64, None, cuda)

    launched, real = [], kernels.cublas_product
    monkeypatch.setattr(kernels, "takes_cublas", lambda rows, residual, device: rows >= 33 and residual is None)
    monkeypatch.setattr(kernels, "cublas_product", lambda *args: launched.append(1) or real(*args))
    generator = torch.Generator().manual_seed(11)
    n, k = 40, 64
    weight = torch.randn(n, k, generator=generator).to(DEVICE, torch.float16)
    norm = torch.rand(k, generator=generator).add(0.5).to(DEVICE, torch.float16)
    x = (3 * torch.randn(40, k, generator=generator)).to(DEVICE, torch.float16)
    residual = torch.randn(40, n, generator=generator).to(DEVICE, torch.float16)
    for res, through_cublas in ((None, True), (residual, False)):
        launched.clear()
        out = kernels.matmul_rows(x, weight, res, norm=norm, eps=1e-5)
        assert bool(launched) == through_cublas
        expected = rows_reference(x, weight, res, norm=norm)
        assert torch.allclose(out.double(), expected, rtol=2**-9, atol=2**-9 * float(expected.abs().max()))
    into = torch.empty(40, n, dtype=torch.float32, device=DEVICE)  # tensor parallelism's float32 buffer
    assert kernels.matmul_rows(x, weight, out=into, norm=norm, eps=1e-5) is into
    assert torch.allclose(into.double(), rows_reference(x, weight, norm=norm), rtol=2**-9, atol=2**-6)


@pytest.mark.parametrize(
    ("m", "f", "k", "dtype", "norm_on"),
    [
        (3, 48, 64, torch.float16, False),
        (5, 40, 96, torch.float16, True),  # RMSNorm folded in; F not a multiple of a tile's half: masked
        (20, 32, 64, torch.bfloat16, True),  # NORM_FIRST_ROWS: normalised first
        (2, 24, 128, torch.float32, False),
    ],
)
def test_gated_matmul_rows_gives_silu_up_as_the_product_then_rows_input(m, f, k, dtype, norm_on):
    """gated: SiLU·up in gate|up's epilogue, [M, F] out: the same bits as the product stored and rows_input after
    it (each product rounded to the weight's dtype first), and the float64 reference's values."""
    generator = torch.Generator().manual_seed(m * f + k)
    weight = (torch.randn(2 * f, k, generator=generator) / k**0.5).to(DEVICE, dtype)
    x = torch.randn(m, k, generator=generator).to(DEVICE, dtype)
    norm = torch.rand(k, generator=generator).add(0.5).to(DEVICE, dtype) if norm_on else None
    out = kernels.matmul_rows(x, weight, norm=norm, eps=1e-5, gated=True)
    unfused = kernels.rows_input(kernels.matmul_rows(x, weight, norm=norm, eps=1e-5), swiglu=True, dtype=dtype)
    assert out.shape == (m, f) and out.dtype == dtype
    assert torch.equal(out, unfused)
    gate_up = rows_reference(x, weight, norm=norm).to(dtype).double()
    expected = torch.nn.functional.silu(gate_up[:, :f]) * gate_up[:, f:]
    tolerance = {torch.float16: 2**-9, torch.bfloat16: 2**-6, torch.float32: 1e-6}[dtype]
    assert torch.allclose(out.double(), expected, rtol=tolerance, atol=tolerance * float(expected.abs().max()))


@pytest.mark.parametrize(
    ("m", "heads", "kv_heads", "dtype", "norm_on", "shared_table"),
    [
        (3, 2, 2, torch.float16, False, False),
        (5, 4, 2, torch.float16, True, True),  # RMSNorm folded in; grouped-query; two rows of one prompt's table
        (20, 2, 1, torch.bfloat16, True, False),  # NORM_FIRST_ROWS: normalised first
        (2, 2, 2, torch.float32, False, False),
    ],
)
def test_matmul_rows_with_rope_does_rope_stores_work_in_its_epilogue(m, heads, kv_heads, dtype, norm_on, shared_table):
    """rope: q rotated into out, each row's rotated key and its value stored in its block at its position, the same
    bits as the product then attention_kernels.rope_store (on a GPU within rounding: cuBLAS may take the product
    without rope); heads of 64 dims, two tiles a head where the interpreter's are 32 wide."""
    from vicunaflow import attention_kernels

    head_dim, block_size, k = 64, 4, 96
    generator = torch.Generator().manual_seed(m * heads + kv_heads)
    weight = (torch.randn((heads + 2 * kv_heads) * head_dim, k, generator=generator) / k**0.5).to(DEVICE, dtype)
    x = torch.randn(m, k, generator=generator).to(DEVICE, dtype)
    norm = torch.rand(k, generator=generator).add(0.5).to(DEVICE, dtype) if norm_on else None
    positions = torch.randint(0, 4 * block_size, (m,), generator=generator)
    tables = (1 + torch.randperm(4 * m, generator=generator)).view(m, 4)  # distinct blocks: no slot twice
    if shared_table:  # rows 0 and 1: a prompt's tokens riding in the step, its table in both rows
        tables[1], positions[1] = tables[0], positions[0] + 1
    inputs = torch.stack([positions, positions], dim=1).to(DEVICE, torch.int32)  # strided, as the runner's
    positions, tables = inputs[:, 0], tables.to(DEVICE, torch.int32)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = positions.cpu().float()[:, None] * inv_freq
    cos, sin = angles.cos().to(DEVICE), angles.sin().to(DEVICE)
    cache = [torch.zeros(4 * m + 1, kv_heads, block_size, head_dim, dtype=dtype, device=DEVICE) for _ in range(4)]

    qkv = kernels.matmul_rows(x, weight, norm=norm, eps=1e-5)
    attention_kernels.rope_store(qkv, cos, sin, positions, tables, cache[0], cache[1], heads)
    store = kernels.RopeStore(cos, sin, positions, tables, cache[2], cache[3], heads)
    out = kernels.matmul_rows(x, weight, norm=norm, eps=1e-5, rope=store)
    assert out.shape == qkv.shape and out.dtype == dtype
    q = heads * head_dim
    if DEVICE == "cpu":
        assert torch.equal(out[:, :q], qkv[:, :q])
        assert torch.equal(cache[2], cache[0]) and torch.equal(cache[3], cache[1])
    else:
        tolerance = {torch.float16: 2**-9, torch.bfloat16: 2**-6, torch.float32: 1e-5}[dtype]
        for got, expected in ((out[:, :q], qkv[:, :q]), (cache[2], cache[0]), (cache[3], cache[1])):
            assert torch.allclose(got.double(), expected.double(), rtol=tolerance, atol=tolerance)
    assert cache[2].any() and cache[3].any()
    with pytest.raises(ValueError, match="plain product"):
        kernels.matmul_rows(x, weight, residual=torch.zeros_like(qkv), rope=store)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.matmul_rows(x[:, :k], weight[: q + kv_heads * head_dim], rope=store)


@pytest.mark.parametrize(
    ("m", "k_splits", "dtype", "dim"),
    [
        (3, 1, torch.float16, 128), (20, 2, torch.float16, 128), (5, 2, torch.bfloat16, 128), (2, 1, torch.float32, 128),
        (4, 2, torch.float16, 160),  # 5 groups of squares, as 13B's 160: their one load is padded to 8
    ],
)  # fmt: skip
def test_matmul_rows_leaves_the_next_norms_input_and_the_next_product_takes_it(m, k_splits, dtype, dim):
    """norm_out: the product with its residual stored as before, and beside it those rows times the next RMSNorm's
    weight (rounded as they are stored) and their squares by groups of NORM_GROUP columns, split over K or not;
    normed: the next products (plain, gated, with the rotary) scale each row by its RMSNorm factor from those
    squares, as the RMSNorm-then-product reference gives."""
    generator = torch.Generator().manual_seed(m * 7 + k_splits)
    k, ffn, heads, head_dim = 64, 96, 1, 32 if DEVICE == "cpu" else 64
    wo = (torch.randn(dim, k, generator=generator) / k**0.5).to(DEVICE, dtype)
    x = torch.randn(m, k, generator=generator).to(DEVICE, dtype)
    residual = torch.randn(m, dim, generator=generator).to(DEVICE, dtype)
    norm = torch.rand(dim, generator=generator).add(0.5).to(DEVICE, dtype)
    normed = kernels.Normed.empty(m, dim, dtype, torch.device(DEVICE), eps=1e-5)
    out = kernels.matmul_rows(x, wo, residual, norm_out=(norm, normed), k_splits=k_splits)
    assert torch.equal(out, kernels.matmul_rows(x, wo, residual, k_splits=k_splits))
    scaled = (out.float() * norm.float()).to(dtype)
    if dtype == torch.bfloat16 and DEVICE == "cpu":  # the interpreter narrows to bfloat16 its own way: a unit apart
        assert torch.allclose(normed.scaled.float(), scaled.float(), rtol=2**-7, atol=0)
    else:
        assert torch.equal(normed.scaled, scaled)
    groups = out.float().square().view(m, dim // kernels.NORM_GROUP, kernels.NORM_GROUP).sum(-1).T
    assert torch.allclose(normed.squares, groups, rtol=1e-5)

    tolerance = {torch.float16: 2**-8, torch.bfloat16: 2**-5, torch.float32: 1e-5}[dtype]
    w13 = (torch.randn(2 * ffn, dim, generator=generator) / dim**0.5).to(DEVICE, dtype)
    reference = rows_reference(out, w13, norm=norm, eps=1e-5)  # float64, the normalised input rounded first
    plain = kernels.matmul_rows(normed.scaled, w13, normed=normed)
    assert torch.allclose(plain.double(), reference, rtol=tolerance, atol=tolerance * float(reference.abs().max()))
    gated = kernels.matmul_rows(normed.scaled, w13, normed=normed, gated=True)
    gate_up = reference.to(dtype).double()
    expected = torch.nn.functional.silu(gate_up[:, :ffn]) * gate_up[:, ffn:]
    assert torch.allclose(gated.double(), expected, rtol=tolerance, atol=tolerance * float(expected.abs().max()))
    # q|k|v with the rotary: the same products as the plain one, then rope_store's work
    wqkv = w13[: 3 * heads * head_dim]
    keys = torch.zeros(m + 1, heads, 4, head_dim, dtype=dtype, device=DEVICE)
    zeros = torch.zeros(m, head_dim // 2, device=DEVICE)
    positions, tables = torch.zeros(m, dtype=torch.int32, device=DEVICE), torch.arange(1, m + 1, device=DEVICE)[:, None]
    store = kernels.RopeStore(zeros + 1, zeros, positions, tables.to(torch.int32), keys, torch.zeros_like(keys), heads)
    qkv = kernels.matmul_rows(normed.scaled, wqkv, normed=normed, rope=store)  # cos 1, sin 0: no turn
    plain_qkv = kernels.matmul_rows(normed.scaled, wqkv, normed=normed)
    assert torch.equal(qkv[:, : heads * head_dim], plain_qkv[:, : heads * head_dim])
    assert torch.equal(store.values[1:, 0, 0], plain_qkv[:, 2 * heads * head_dim :])
    with pytest.raises(ValueError, match="not both"):
        kernels.matmul_rows(normed.scaled, w13[:dim], residual, norm_out=(norm, normed), normed=normed)
    with pytest.raises(ValueError, match="residual stream"):
        kernels.matmul_rows(x, wo, norm_out=(norm, normed))
    with pytest.raises(ValueError, match="scaled rows are the input"):
        kernels.matmul_rows(out, w13, normed=normed)


def test_gated_matmul_rows_above_its_rows_takes_the_product_then_rows_input(monkeypatch):
    """Above GATED_ROWS_MAX rows the product goes its usual way and SiLU·up is one rows_input launch after it."""
    calls, real = [], kernels.rows_input
    monkeypatch.setattr(kernels, "rows_input", lambda *a, **kw: calls.append(kw.get("swiglu")) or real(*a, **kw))
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(64, 32, generator=generator).to(DEVICE, torch.float16)
    x = torch.randn(6, 32, generator=generator).to(DEVICE, torch.float16)
    fused = kernels.matmul_rows(x, weight, gated=True)
    assert calls == []
    with pytest.raises(ValueError, match="gated needs"):
        kernels.matmul_rows(x, weight, residual=torch.zeros(6, 32, dtype=torch.float16, device=DEVICE), gated=True)
    with pytest.raises(ValueError, match="not split over K"):
        kernels.matmul_rows(x, weight, gated=True, k_splits=2)
    monkeypatch.setattr(kernels, "GATED_ROWS_MAX", 4)
    into = torch.empty(6, 32, dtype=torch.float16, device=DEVICE)
    assert kernels.matmul_rows(x, weight, gated=True, out=into) is into
    assert calls == [True] and torch.equal(into, fused)


def test_rows_tiles_names_a_launch_per_shape_or_refuses_the_spelling():
    """VICUNAFLOW_ROWS_TILES (timing choices inside real steps): a fixed tile and splits, or cuBLAS, per shape."""
    assert kernels._rows_tiles("64:4096x4096=64,128,4,5,2; 64:12288x4096=cublas;") == {
        (64, 4096, 4096): (64, 128, 4, 5, 2),
        (64, 12288, 4096): "cublas",
    }
    assert kernels._rows_tiles("") == {}
    with pytest.raises(ValueError, match="'64:4096x4096=64,128' is not BLOCK_M:NxK"):
        kernels._rows_tiles("64:4096x4096=64,128")


def test_matmul_rows_refuses_what_it_cannot_take():
    weight = torch.zeros(8, 96, dtype=torch.float16)
    assert kernels.MATMUL_MAX_ROWS == __import__("vicunaflow.quant_kernels").quant_kernels.MATMUL_MAX_ROWS
    with pytest.raises(ValueError, match="does not fit"):
        kernels.matmul_rows(torch.zeros(65, 96, dtype=torch.float16), weight)
    with pytest.raises(ValueError, match="does not fit"):
        kernels.matmul_rows(torch.zeros(4, 96, dtype=torch.float16), weight, swiglu=True)
    with pytest.raises(ValueError, match="needs a plain input"):
        kernels.matmul_rows(torch.zeros(4, 192), weight, swiglu=True, norm=torch.ones(96))
    with pytest.raises(ValueError, match="not a contiguous"):
        kernels.matmul_rows(torch.zeros(4, 96), weight, out=torch.zeros(8, 4).T)
    with pytest.raises(ValueError, match="not a contiguous"):
        kernels.matmul_rows(torch.zeros(4, 96), weight, residual=torch.zeros(4, 7))
    with pytest.raises(ValueError, match="contiguous"):
        kernels.matmul_rows(torch.zeros(4, 96), torch.zeros(96, 8, dtype=torch.float16).T)
    with pytest.raises(ValueError, match="dtype"):
        kernels.matmul_rows(torch.zeros(4, 96), weight.to(torch.float64))


def test_batched_decode_step_with_matmul_rows_matches_cublas_path(tiny_vicuna, monkeypatch):
    """A three-row decode step of the tiny Vicuna with the decode kernels on: every product through
    matmul_rows gives the logits of the plain torch ops (kernels.FLOAT_ROWS = "cublas")."""
    model, _ = load_model(tiny_vicuna, device=DEVICE)
    model.layers = model.layers[:1]  # one layer is enough, and Triton's interpreter is slow
    model.setup_cache(slots=3, context=8)
    input_ids, positions = torch.tensor([[5], [9], [2]], device=DEVICE), torch.tensor([[0], [0], [0]], device=DEVICE)
    model.matvec = True
    calls, kwargs, real = [], [], kernels.matmul_rows
    monkeypatch.setattr(kernels, "matmul_rows", lambda *a, **kw: calls.append(1) or kwargs.append(kw) or real(*a, **kw))
    with torch.inference_mode():
        monkeypatch.setattr(kernels, "FLOAT_ROWS", "cublas")
        plain = model(input_ids, positions, kv_length=1)
        assert not calls
        monkeypatch.setattr(kernels, "FLOAT_ROWS", "triton")
        fused = model(input_ids, positions, kv_length=1)
    assert len(calls) == 5  # q|k|v, o, gate|up (SiLU·up in its epilogue), down, output
    gated = [kw.get("gated", False) for kw in kwargs]
    assert gated == [False, False, True, False, False]
    assert fused.shape == plain.shape == (3, model.args.vocab_size)
    tolerance = 1e-4 if plain.dtype == torch.float32 else 2e-2
    assert torch.allclose(fused.float(), plain.float(), rtol=tolerance, atol=tolerance)


def test_batched_decode_step_rotates_and_stores_in_the_qkv_epilogue(tiny_vicuna, monkeypatch):
    """attention_kernels.ROPE "product": a three-row decode step through the decode kernels rotates q and k and
    stores the new keys and values in q|k|v's epilogue, no rope_store launch, and gives the logits and the cache
    of ROPE "separate" (the product, then rope_store) to the bit (the RMSNorms apart in both: NORMS "separate")."""
    from vicunaflow import attention_kernels
    from vicunaflow.engine import model as model_module

    monkeypatch.setattr(model_module, "NORMS", "separate")
    model, _ = load_model(tiny_vicuna, device=DEVICE)
    if not kernels.rope_fits(model.args.head_dim):
        pytest.skip(f"heads of {model.args.head_dim} dims are narrower than this device's tiles")
    model.layers = model.layers[:1]  # one layer is enough, and Triton's interpreter is slow
    model.matvec = model.attention_kernel = True
    input_ids, positions = torch.tensor([[5], [9], [2]], device=DEVICE), torch.tensor([[0], [3], [6]], device=DEVICE)
    ropes, real = [], kernels.matmul_rows
    monkeypatch.setattr(kernels, "matmul_rows", lambda *a, **kw: ropes.append(kw.get("rope")) or real(*a, **kw))
    stores, real_store = [], attention_kernels.rope_store
    monkeypatch.setattr(attention_kernels, "rope_store", lambda *a, **kw: stores.append(1) or real_store(*a, **kw))
    results = {}
    for mode in ("separate", "product"):
        monkeypatch.setattr(attention_kernels, "ROPE", mode)
        ropes.clear()
        stores.clear()
        model.setup_cache(slots=3, context=8)
        with torch.inference_mode():
            logits = model(input_ids, positions, kv_length=8)
        results[mode] = (logits, model.cache.keys[0].clone(), model.cache.values[0].clone())
        assert (ropes[0] is not None, len(stores)) == ((True, 0) if mode == "product" else (False, 1))
    for separate, product in zip(results["separate"], results["product"], strict=True):
        assert torch.equal(separate, product)
    assert results["product"][1].any()


def test_batched_decode_step_takes_its_norms_from_the_products_epilogues(tiny_vicuna, monkeypatch):
    """engine.model.NORMS "epilogue": in a three-row decode step through the decode kernels each o and down product
    leaves the next RMSNorm's input and q|k|v and gate|up take it (the last layer's down leaves none: the output's
    norm is its own launch), and the logits are those of the norms computed apart ("separate")."""
    from vicunaflow.engine import model as model_module

    model, _ = load_model(tiny_vicuna, device=DEVICE)
    if not kernels.rope_fits(model.args.head_dim):
        pytest.skip(f"heads of {model.args.head_dim} dims are narrower than this device's tiles")
    model.layers = model.layers[:2]  # a layer's down product hands the next layer its norm's input
    model.matvec = model.attention_kernel = True
    input_ids, positions = torch.tensor([[5], [9], [2]], device=DEVICE), torch.tensor([[0], [3], [6]], device=DEVICE)
    launches, real = [], kernels.matmul_rows
    monkeypatch.setattr(
        kernels, "matmul_rows",
        lambda *a, **kw: launches.append((kw.get("norm_out") is not None, kw.get("normed") is not None))
        or real(*a, **kw),
    )  # fmt: skip
    logits = {}
    for mode in ("separate", "epilogue"):
        monkeypatch.setattr(model_module, "NORMS", mode)
        launches.clear()
        model.setup_cache(slots=3, context=8)
        with torch.inference_mode():
            logits[mode] = model(input_ids, positions, kv_length=8)
    # q|k|v, o, gate|up, down a layer, then the head: which leave (norm_out) and which take (normed) a norm's input
    leave, take = (True, False), (False, True)
    plain = (False, False)
    assert launches == [plain, leave, take, leave, take, leave, take, plain, plain]
    tolerance = 1e-4 if logits["separate"].dtype == torch.float32 else 2e-2
    assert torch.allclose(logits["epilogue"].float(), logits["separate"].float(), rtol=tolerance, atol=tolerance)
    monkeypatch.setattr(model_module, "NORMS", "between")
    with pytest.raises(VicunaflowError, match="VICUNAFLOW_NORMS='between'"):
        model(input_ids, positions, kv_length=8)


def test_silu_up_goes_into_gate_up_only_in_batched_decode_steps_on_float_weights(monkeypatch):
    """takes_matmul_rows: 2..FLOAT_ROWS_MAX rows through matmul_rows on float weights; one row (the matvec folds
    SiLU·up into down's input), prefill, FLOAT_ROWS "cublas" and quantized weights keep it apart; project refuses
    gated=True anywhere else."""
    from vicunaflow import quant
    from vicunaflow.engine.model import project, takes_matmul_rows

    weight = torch.zeros(8, 16, dtype=torch.float16)
    assert takes_matmul_rows(2, weight, matvec=True) and takes_matmul_rows(kernels.FLOAT_ROWS_MAX, weight, True)
    assert not takes_matmul_rows(1, weight, matvec=True)
    assert not takes_matmul_rows(kernels.FLOAT_ROWS_MAX + 1, weight, matvec=True)
    assert not takes_matmul_rows(8, weight, matvec=False)
    assert not takes_matmul_rows(8, quant.quantize(weight.float(), bits=8), matvec=True)
    monkeypatch.setattr(kernels, "FLOAT_ROWS", "cublas")
    assert not takes_matmul_rows(8, weight, matvec=True)
    with pytest.raises(ValueError, match="batched decode steps, not 8 rows"):
        project(torch.zeros(8, 16, dtype=torch.float16), weight, matvec=True, gated=True)


@pytest.mark.skipif(DEVICE != "cuda", reason="the many-row decode path runs on CUDA only")
@pytest.mark.parametrize("float_rows", ["triton", "cublas"])
def test_products_above_matmul_rows_take_silu_up_from_rows_input(monkeypatch, float_rows):
    """More rows than matmul_rows takes (a 256-row step, a prompt): cuBLAS multiplies, and SiLU·up comes from one
    rows_input launch (float32, rounded once, as matmul_rows' input); FLOAT_ROWS "cublas" keeps torch's two."""
    from vicunaflow.engine.model import project

    calls, real = [], kernels.rows_input
    monkeypatch.setattr(kernels, "rows_input", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    monkeypatch.setattr(kernels, "FLOAT_ROWS", float_rows)
    generator = torch.Generator().manual_seed(7)
    m, n, k = kernels.FLOAT_ROWS_MAX + 36, 64, 96
    gate_up = torch.randn(m, 2 * k, generator=generator).to(DEVICE, torch.float16)
    weight = (torch.randn(n, k, generator=generator) / k**0.5).to(DEVICE, torch.float16)
    residual = torch.randn(m, n, generator=generator).to(DEVICE, torch.float16)
    got = project(gate_up, weight, residual, swiglu=True, matvec=True)
    assert len(calls) == (float_rows == "triton")
    gate, up = gate_up.float().chunk(2, dim=1)
    expected = torch.addmm(residual, (torch.nn.functional.silu(gate) * up).half(), weight.t())
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)  # sigmoid in Triton and torch: an ulp apart


# ---- the autotuner's choices, kept ------------------------------------------------------------------


def test_autotuned_kernels_keep_their_choices_on_disk(monkeypatch):
    """autotuning.autotune, which every autotuned kernel of ours goes through, has Triton keep each shape's choice."""
    import triton

    @triton.jit
    def copy_kernel(x_ptr, N, BLOCK: triton.language.constexpr):
        pass

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter never keeps them: it does not time
    configs = [triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})]
    assert autotuning.autotune(configs=configs, key=["N"])(copy_kernel).cache_results


KEPT_CHOICE = """
import sys, torch
from triton.runtime import autotuner
from vicunaflow import kernels, matmul_kernels
if sys.argv[1] == "second":
    def timed_again(*args, **kwargs):
        raise AssertionError("a shape the first process tuned was timed again")
    autotuner.Autotuner._bench = timed_again
g = torch.Generator(device="cuda").manual_seed(0)
w = torch.randn(12288, 4096, device="cuda", dtype=torch.float16, generator=g) * 0.02
one = kernels.matvec(torch.randn(1, 4096, device="cuda", dtype=torch.float16, generator=g), w)
rows = kernels.matmul_rows(torch.randn(16, 4096, device="cuda", dtype=torch.float16, generator=g), w)
torch.cuda.synchronize()
print(kernels._kernels().best_config, matmul_kernels.float_matmul_kernel.best_config)
print(one.float().sum().item(), rows.float().sum().item())
"""


@pytest.mark.skipif(DEVICE != "cuda" or os.environ.get("TRITON_INTERPRET") == "1", reason="the autotuner times: a GPU")
def test_a_second_process_takes_the_first_ones_tiles_without_timing(tmp_path):
    """Two processes sharing Triton's cache (a server's engine processes, a restarted server): the second takes the
    first's tile for each shape, so both give the same bits, and times nothing."""
    import subprocess
    import sys

    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton")}
    runs = [
        subprocess.run([sys.executable, "-c", KEPT_CHOICE, which], env=env, capture_output=True, text=True, timeout=600)
        for which in ("first", "second")
    ]
    assert all(run.returncode == 0 for run in runs), runs[-1].stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout

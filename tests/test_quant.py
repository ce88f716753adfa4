"""Weight-only int8/int4: the format's error bounds, the Triton matvecs (in Triton's interpreter where
there is no GPU), tensor-parallel shards, and the quantize verb on the tiny model against transformers."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when a kernel is first built

from vicunaflow import BUILTIN_CONVERSATIONS, VicunaflowError, kernels, quant, quant_kernels
from vicunaflow.checkpoint import Checkpoint
from vicunaflow.quantize import quantize_model

REPO = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """LLaMA-like rows: Gaussian, a different spread per row, a few large outliers."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=generator) * torch.rand(n, 1, generator=generator).add(0.1) * 0.05
    w.view(-1)[torch.randint(0, n * k, (max(1, n * k // 500),), generator=generator)] *= 8
    return w.half()


# ---- the format ----------------------------------------------------------------------------------


def test_int8_error_is_half_a_step_of_its_row():
    w = weight(48, 200).float()
    qw = quant.quantize(w, bits=8)
    assert qw.qweight.dtype == torch.int8 and qw.scales.dtype == torch.float32 and qw.zeros is None
    assert torch.equal(qw.scales, w.abs().amax(dim=1) / 127)
    error = (qw.dequantize(torch.float32) - w).abs()
    assert bool((error <= qw.scales[:, None] * (0.5 + 1e-6)).all())
    assert int(qw.qweight.abs().max()) == 127 and int(qw.qweight.min()) >= -127  # symmetric: -128 unused


@pytest.mark.parametrize(("k", "group_size"), [(256, 128), (704, 128), (200, 64), (250, 32)])
def test_int4_error_is_half_a_step_of_its_group_and_clipping_only_lowers_it(k, group_size, monkeypatch):
    """704 = tiny's MLP width: the last group of 128 is 64 wide."""
    w = weight(16, k).float()
    qw = quant.quantize(w, bits=4, group_size=group_size)
    with monkeypatch.context() as patch:
        patch.setattr(quant, "CLIP_RATIOS", (1.0,))  # the full [min, max] range only
        full_range = quant.quantize(w, bits=4, group_size=group_size)
    groups = -(-k // group_size)
    assert qw.qweight.shape == (16, k // 2) and qw.scales.shape == qw.zeros.shape == (16, groups)
    scales = full_range.scales.float().repeat_interleave(group_size, dim=1)[:, :k]
    zeros = full_range.zeros.float().repeat_interleave(group_size, dim=1)[:, :k]
    error = (full_range.dequantize(torch.float32) - w).abs()
    # half a step, plus what rounding scale and zero to float16 moves the grid's ends by
    assert bool((error <= scales * 0.5 + (zeros.abs() + 15 * scales) * 2**-11).all())
    # the range search keeps, group by group, a squared error no larger than the full range's
    clipped_error = (qw.dequantize(torch.float32) - w).square()
    per_group = [e.reshape(16, -1) for e in (clipped_error, error.square())]
    for start in range(0, k, group_size):
        assert bool(
            (
                per_group[0][:, start : start + group_size].sum(1) <= per_group[1][:, start : start + group_size].sum(1)
            ).all()
        )
    assert float(clipped_error.sum()) < float(error.square().sum())
    # both ends of each group are used: no level is spent outside the group's values
    for encoded in (qw, full_range):
        codes = quant.unpack_int4(encoded.qweight, k)
        padded = torch.cat([codes, codes[:, -1:].expand(16, groups * group_size - k)], dim=1).view(16, groups, -1)
        assert int(padded.amin(dim=2).max()) == 0 and int(padded.amax(dim=2).min()) == 15


def test_int4_packing_round_trip_and_nibble_order():
    codes = torch.randint(0, 16, (5, 12), dtype=torch.uint8)
    packed = quant.pack_int4(codes)
    assert packed.shape == (5, 6) and packed.dtype == torch.uint8
    assert torch.equal(quant.unpack_int4(packed, 12), codes)
    assert int(packed[0, 0]) == int(codes[0, 0]) | int(codes[0, 1]) << 4  # column 0 low, column 1 high


def test_constant_and_zero_rows_decode_exactly():
    w = torch.zeros(4, 64)
    w[1] = 0.25
    for bits in (8, 4):
        assert torch.equal(quant.quantize(w, bits=bits, group_size=32).dequantize(torch.float32), w)


def test_quantize_refuses_what_it_cannot_represent():
    with pytest.raises(VicunaflowError, match="bits must be 8 or 4"):
        quant.quantize(torch.ones(4, 8), bits=3)
    with pytest.raises(VicunaflowError, match="odd"):
        quant.quantize(torch.ones(4, 9), bits=4)
    with pytest.raises(VicunaflowError, match="group size"):
        quant.quantize(torch.ones(4, 8), bits=4, group_size=3)
    with pytest.raises(VicunaflowError, match="inf or NaN"):
        quant.quantize(torch.tensor([[1.0, float("nan")]]), bits=8)


# ---- the kernels and qlinear ---------------------------------------------------------------------


def reference(x: torch.Tensor, qw: quant.QuantWeight, residual, swiglu: bool) -> torch.Tensor:
    """float64: the decoded weight, SiLU·up, residual."""
    k = qw.shape[1]
    inputs = x.double()
    if swiglu:
        inputs = torch.nn.functional.silu(inputs[:, :k]) * inputs[:, k:]
    return inputs @ qw.dequantize(torch.float64).T + (residual.double() if residual is not None else 0)


KERNEL_CASES = [
    # bits, n, k, group, swiglu, residual, dtype
    (8, 37, 100, None, False, False, torch.float16),  # neither size a multiple of a block: masked loads
    (8, 64, 128, None, True, True, torch.float16),  # down_proj: silu(gate) * up in, residual added
    (8, 12, 130, None, False, True, torch.bfloat16),
    (8, 16, 64, None, False, False, torch.float32),
    (4, 32, 256, 128, True, True, torch.float16),  # a tile inside one group: the folded sum
    (4, 37, 200, 64, False, True, torch.float16),  # last group 8 wide, masked rows
    (4, 16, 704, 128, True, False, torch.bfloat16),  # tiny's down_proj: last group 64 wide
    (4, 19, 250, 32, False, False, torch.float32),  # groups narrower than a tile: per-column scales
]


@pytest.mark.parametrize(("bits", "n", "k", "group_size", "swiglu", "residual", "dtype"), KERNEL_CASES)
def test_qmatvec_matches_float64_reference(bits, n, k, group_size, swiglu, residual, dtype):
    generator = torch.Generator().manual_seed(n * k + bits)
    qw = quant.quantize(weight(n, k, seed=n + k), bits=bits, group_size=group_size or 128).to(DEVICE)
    x = torch.randn(1, 2 * k if swiglu else k, generator=generator).to(DEVICE, dtype)
    res = torch.randn(1, n, generator=generator).to(DEVICE, dtype) if residual else None
    out = quant_kernels.qmatvec(x, qw, res, swiglu)
    expected = reference(x, qw, res, swiglu)
    assert out.shape == (1, n) and out.dtype == dtype
    # float32 accumulation: the error is rounding the result to the output dtype
    tolerance = {torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float32: 1e-6}[dtype]
    scale = float(expected.abs().max())
    assert torch.allclose(out.double(), expected, rtol=tolerance, atol=tolerance * scale)


@pytest.mark.parametrize(
    ("bits", "n", "k", "group_size", "dtype"),
    [(8, 37, 100, None, torch.float16), (8, 48, 256, None, torch.float32), (4, 32, 256, 128, torch.float16),
     (4, 19, 250, 32, torch.bfloat16)],
)  # fmt: skip
@pytest.mark.parametrize("input_mode", ["fused", "separate"])
def test_qmatvec_folds_rms_norm_into_its_input(bits, n, k, group_size, dtype, input_mode, monkeypatch):
    """The engine's q|k|v and gate|up products: RMSNorm of the input inside the kernel, as kernels.matvec
    (or, with quant_kernels.INPUT "separate", by kernels.rows_input before it: the input rounds to dtype)."""
    monkeypatch.setattr(quant_kernels, "INPUT", input_mode)
    generator = torch.Generator().manual_seed(n + k)
    qw = quant.quantize(weight(n, k, seed=k), bits=bits, group_size=group_size or 128).to(DEVICE)
    x = (torch.randn(1, k, generator=generator) * 3).to(DEVICE, dtype)
    norm = torch.rand(k, generator=generator).add(0.5).to(DEVICE, dtype)
    residual = torch.randn(1, n, generator=generator).to(DEVICE, dtype)
    out = quant_kernels.qmatvec(x, qw, residual, norm=norm, eps=1e-5)
    normed = torch.nn.functional.rms_norm(x.double(), (k,), norm.double(), 1e-5)
    expected = reference(normed, qw, residual, swiglu=False)
    tolerance = {torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float32: 1e-6}[dtype]
    tolerance *= 2 if input_mode == "separate" else 1
    assert torch.allclose(out.double(), expected, rtol=tolerance, atol=tolerance * float(expected.abs().max()))
    gate_up = torch.randn(1, 2 * k, generator=generator).to(DEVICE, dtype)
    expected = reference(gate_up, qw, residual, swiglu=True)
    out = quant_kernels.qmatvec(gate_up, qw, residual, swiglu=True)
    assert torch.allclose(out.double(), expected, rtol=tolerance, atol=tolerance * float(expected.abs().max()))
    through_qlinear = quant.qlinear(x.float(), qw, norm=norm.float(), eps=1e-5, matvec=False)
    assert torch.allclose(through_qlinear.double(), reference(normed, qw, None, False), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="needs a plain input"):
        quant_kernels.qmatvec(torch.cat([x, x], dim=1), qw, swiglu=True, norm=norm)


@pytest.mark.parametrize(("n", "k", "residual"), [(37, 128, False), (64, 1024, True), (5, 96, True)])
def test_int8_in_float16_pairs_matches_float64_reference(n, k, residual, monkeypatch):
    """A float16 row times int8 codes in float16 pairs (quant_kernels.INT8_MATH "half2": codes c / 256, four
    products a lane in float16, then float32) is as close to float64 as the float32 path, and is the path taken."""
    generator = torch.Generator().manual_seed(n + k)
    qw = quant.quantize(weight(n, k, seed=k) * 5, bits=8).to(DEVICE)
    x = (torch.randn(1, k, generator=generator) * 30).to(DEVICE, torch.float16)
    x[0, 3] = 6e4  # near float16's largest: c / 256 keeps the products finite
    res = torch.randn(1, n, generator=generator).to(DEVICE, torch.float16) if residual else None
    expected = reference(x, qw, res, swiglu=False)
    scale = float(expected.abs().max())
    outputs = {}
    for math in ("half2", "float32"):
        monkeypatch.setattr(quant_kernels, "INT8_MATH", math)
        assert quant_kernels.int8_pairs(x, qw, False, None) == (math == "half2")
        outputs[math] = quant_kernels.qmatvec(x, qw, res)
        assert torch.isfinite(outputs[math]).all()
        assert torch.allclose(outputs[math].double(), expected, rtol=2**-10, atol=2**-10 * scale), math
    assert not quant_kernels.int8_pairs(x[:, :100], quant.quantize(weight(n, 100), bits=8), False, None)  # 100 % 8
    assert not quant_kernels.int8_pairs(x.bfloat16(), qw, False, None)
    monkeypatch.setattr(quant_kernels, "INT8_MATH", "int2")
    with pytest.raises(ValueError, match="VICUNAFLOW_INT8_MATH"):
        quant_kernels.qmatvec(x, qw, res)


@pytest.mark.parametrize(
    ("bits", "m", "n", "k", "group_size", "residual"),
    [(8, 3, 37, 200, None, True), (8, 16, 64, 256, None, False), (4, 5, 40, 256, 128, True),
     (4, 2, 33, 200, 32, False), (4, 17, 32, 96, 32, True)],
)  # fmt: skip
def test_qmatmul_matches_float64_reference(bits, m, n, k, group_size, residual):
    """Batched decode steps: M rows on tensor cores, codes decoded a tile at a time (masked edges, a short
    last group, M above one 16-row tile)."""
    generator = torch.Generator().manual_seed(m * n + k)
    qw = quant.quantize(weight(n, k, seed=k), bits=bits, group_size=group_size or 128).to(DEVICE)
    x = torch.randn(m, k, generator=generator).to(DEVICE, torch.float16)
    res = torch.randn(m, n, generator=generator).to(DEVICE, torch.float16) if residual else None
    out = quant_kernels.qmatmul(x, qw, res)
    expected = reference(x, qw, res, swiglu=False)
    assert out.shape == (m, n) and out.dtype == torch.float16
    assert torch.allclose(out.double(), expected, rtol=2**-9, atol=2**-9 * float(expected.abs().max()))
    buffer = torch.empty(m, n, device=DEVICE)
    assert quant_kernels.qmatmul(x, qw, res, out=buffer) is buffer
    assert torch.allclose(buffer.double(), expected, rtol=1e-5, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m", [1, 6])
def test_qmatmul_epilogues_match_qmatvec_reference(bits, m):
    """RMSNorm folded into the input (q|k|v, gate|up) and SiLU·up (down), as qmatvec: one row (the
    tensor-core path for one-row steps) and a batch."""
    generator = torch.Generator().manual_seed(bits + m)
    n, k = 48, 256
    qw = quant.quantize(weight(n, k, seed=3), bits=bits, group_size=128).to(DEVICE)
    x = (torch.randn(m, k, generator=generator) * 3).to(DEVICE, torch.float16)
    norm = torch.rand(k, generator=generator).add(0.5).to(DEVICE, torch.float16)
    residual = torch.randn(m, n, generator=generator).to(DEVICE, torch.float16)
    normed = torch.nn.functional.rms_norm(x.double(), (k,), norm.double(), 1e-5)
    expected = reference(normed, qw, residual, swiglu=False)
    out = quant_kernels.qmatmul(x, qw, residual, norm=norm, eps=1e-5)
    assert torch.allclose(out.double(), expected, rtol=2**-8, atol=2**-8 * float(expected.abs().max()))
    gate_up = torch.randn(m, 2 * k, generator=generator).to(DEVICE, torch.float16)
    expected = reference(gate_up, qw, None, swiglu=True)
    out = quant_kernels.qmatmul(gate_up, qw, swiglu=True, out=torch.empty(m, n, device=DEVICE))
    assert torch.allclose(out.double(), expected, rtol=2**-8, atol=2**-8 * float(expected.abs().max()))


def test_qmatmul_refuses_what_it_cannot_take():
    for group_size in (48, 16):
        qw = quant.quantize(weight(8, 96), bits=4, group_size=group_size).to(DEVICE)
        assert not quant_kernels.matmul_fits(qw)
        with pytest.raises(ValueError, match=f"group size {group_size} is not a power of two >= 32"):
            quant_kernels.qmatmul(torch.zeros(2, 96, device=DEVICE, dtype=torch.float16), qw)
    with pytest.raises(ValueError, match="does not fit"):
        quant_kernels.qmatmul(torch.zeros(65, 96, device=DEVICE, dtype=torch.float16), qw)


@pytest.mark.parametrize("bits", [8, 4])
def test_qlinear_matvec_writes_float32_partial_sums_into_out(bits):
    """The engine's call: one row of a [1, 1, K] step through the kernel, into a float32 buffer
    (tensor parallelism's all-reduce), as kernels.matvec(..., out=) does."""
    qw = quant.quantize(weight(40, 128), bits=bits, group_size=64).to(DEVICE)
    x = torch.randn(1, 1, 256, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.float16)
    residual = torch.randn(1, 1, 40, generator=torch.Generator().manual_seed(2)).to(DEVICE, torch.float16)
    buffer = torch.full((1, 40), float("nan"), device=DEVICE)
    result = quant.qlinear(x, qw, residual, swiglu=True, out=buffer, matvec=True)
    expected = reference(x[0], qw, residual[0], swiglu=True)[0]
    # float32 sums; SiLU·up is rounded to float16 once before the product (quant_kernels.INPUT "separate")
    tolerance = 2**-10 if quant_kernels.INPUT == "separate" else 1e-5
    assert result is buffer
    assert torch.allclose(buffer[0].double(), expected, rtol=tolerance, atol=tolerance * float(expected.abs().max()))
    plain = quant.qlinear(x, qw, residual, swiglu=True, matvec=False)
    assert plain.shape == (1, 1, 40) and plain.dtype == torch.float16
    assert torch.allclose(plain.double().view(-1), expected, rtol=2**-9, atol=2**-9 * float(expected.abs().max()))
    with pytest.raises(ValueError, match="not a contiguous"):
        quant_kernels.qmatvec(x[0], qw, swiglu=True, out=torch.empty(2, 40, device=DEVICE))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layout", ["int8", "int4", "int4-columns"])
def test_qlinear_is_captured_and_replayed_in_a_cuda_graph(layout):
    """No host syncs, no allocations outside torch's allocator: one warm-up call (the autotuner), then
    capture, new input in place, replay."""
    qw = quant.quantize(weight(4096, 11008).cuda(), bits=8 if layout == "int8" else 4)
    w = quant.int4columns(qw) if layout == "int4-columns" else qw
    x = torch.randn(1, 2 * 11008, device="cuda", dtype=torch.float16)
    residual = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    quant.qlinear(x, w, residual, swiglu=True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = quant.qlinear(x, w, residual, swiglu=True)
    x.copy_(torch.randn_like(x))
    graph.replay()
    expected = reference(x, qw, residual, swiglu=True)
    assert torch.allclose(captured.double(), expected, rtol=2**-9, atol=2**-9 * float(expected.abs().max()))


@pytest.mark.parametrize("bits", [8, 4])
def test_qlinear_dequantizes_for_batches_and_on_cpu(bits):
    qw = quant.quantize(weight(24, 64), bits=bits, group_size=32)
    x = torch.randn(2, 3, 128, dtype=torch.float64)
    residual = torch.randn(2, 3, 24, dtype=torch.float64)
    out = quant.qlinear(x, qw, residual, swiglu=True)
    expected = (torch.nn.functional.silu(x[..., :64]) * x[..., 64:]) @ qw.dequantize(torch.float64).T + residual
    assert out.shape == (2, 3, 24) and torch.allclose(out, expected)
    assert torch.allclose(qw(x[..., :64], matvec=False), x[..., :64] @ qw.dequantize(torch.float64).T)
    with pytest.raises(ValueError, match="does not fit"):
        quant.qlinear(torch.zeros(1, 10), qw)


def pdl_stand_ins(monkeypatch, *modules) -> None:
    """The PDL branch of the one-row kernels in Triton's interpreter: the two grid-control calls as no-ops,
    and `modules`' launches asking for PDL."""
    import triton.language as tl

    monkeypatch.setattr(tl.extra.cuda, "gdc_wait", lambda: None, raising=False)
    monkeypatch.setattr(tl.extra.cuda, "gdc_launch_dependents", lambda: None, raising=False)
    for module in modules:
        monkeypatch.setattr(module, "pdl_options", lambda device, rows=1: {"PDL": True})


# ---- int4 in columns of words (quant.Int4Columns) --------------------------------------------------


def test_int4columns_holds_the_same_codes_and_leaves_what_it_cannot_take():
    for n, k, group_size in [(16, 256, 128), (37, 200, 40), (12, 96, 32), (16, 704, 128)]:  # last group short
        qw = quant.quantize(weight(n, k, seed=n), bits=4, group_size=group_size).to(DEVICE)
        cw = quant.int4columns(qw)
        assert isinstance(cw, quant.Int4Columns) and cw.words.shape == (k // 8, n) and cw.nbytes == qw.nbytes
        back = cw.quant_weight()
        assert all(torch.equal(getattr(back, name), getattr(qw, name)) for name in ("qweight", "scales", "zeros"))
        assert torch.equal(cw.dequantize(torch.float32), qw.dequantize(torch.float32))
        # the decode kernel (a prefill's weight on CUDA): the same float32 grid, rounded once
        assert torch.equal(quant.decode_columns(cw, torch.float16).T, qw.dequantize(torch.float16))
    for n, k, group_size in [(16, 100, 50), (16, 96, 12)]:  # K or the group not a multiple of 8 columns
        qw = quant.quantize(weight(n, k), bits=4, group_size=group_size)
        assert quant.int4columns(qw) is qw
    int8 = quant.quantize(weight(16, 256), bits=8)
    assert quant.int4columns(int8) is int8


COLUMN_CASES = [
    # n, k, group, dtype, epilogue
    (32, 256, 128, torch.float16, "residual"),
    (37, 200, 40, torch.float16, "residual"),  # masked outputs and words, a group not a power of two
    (16, 704, 128, torch.bfloat16, "swiglu"),  # tiny's down_proj: the last group 64 wide
    (19, 256, 32, torch.float32, "norm"),
]


def test_int4_kernel_follows_the_use_unless_the_environment_names_one(monkeypatch):
    """chat (one stream) decodes int4 through Int4Columns, serve through tinygemm; $VICUNAFLOW_INT4_KERNEL wins."""
    monkeypatch.setattr(quant, "INT4_KERNEL", None)
    assert quant.int4_kernel_for(one_stream=True) == "columns"
    assert quant.int4_kernel_for(one_stream=False) == "tinygemm"
    monkeypatch.setattr(quant, "INT4_KERNEL", "triton")
    assert quant.int4_kernel_for(one_stream=True) == quant.int4_kernel_for(one_stream=False) == "triton"


@pytest.mark.parametrize(("n", "k", "group_size", "dtype", "epilogue"), COLUMN_CASES)
@pytest.mark.parametrize(("pdl", "split_rows"), [(False, None), (True, None), (False, 24), (True, 16)])
def test_qmatvec_columns_matches_float64_reference(n, k, group_size, dtype, epilogue, pdl, split_rows, monkeypatch):
    """One row through quant_kernels.qmatvec_columns: a float32 model's codes moved into 1.0's mantissa (f = 1 +
    c / 16), a float16 or bfloat16 model's each word's products in float16 pairs (Triton's interpreter runs
    them as float16 ops instead of the PTX); with PDL, the first tile read before the wait (stand-ins in the
    interpreter). split_rows 24: K split into programs of 3 tiles of 8 word rows (the loop's two tiles a step,
    then one and a masked one; a short last program where K is not a multiple), summed by each output tile's
    last program, which leaves the counters at zero for the next launch."""
    if pdl and torch.cuda.is_available():
        pytest.skip("the interpreter's stand-ins; a GPU runs the real launch")
    if pdl:
        pdl_stand_ins(monkeypatch, quant_kernels)
    tile = quant_kernels.ColumnTile(16, 8, split_rows, 1) if split_rows else None
    generator = torch.Generator().manual_seed(n * k)
    qw = quant.quantize(weight(n, k, seed=k), bits=4, group_size=group_size).to(DEVICE)
    cw = quant.int4columns(qw)
    swiglu = epilogue == "swiglu"
    x = (torch.randn(1, 2 * k if swiglu else k, generator=generator) * 3).to(DEVICE, dtype)
    residual = torch.randn(1, n, generator=generator).to(DEVICE, dtype)
    if epilogue == "norm":
        norm = torch.rand(k, generator=generator).add(0.5).to(DEVICE, dtype)
        out = quant_kernels.qmatvec_columns(x, cw, residual, norm=norm, eps=1e-5, tile=tile)
        source = torch.nn.functional.rms_norm(x.double(), (k,), norm.double(), 1e-5)
    else:
        out = quant_kernels.qmatvec_columns(x, cw, residual, swiglu, tile=tile)
        source = x
    expected = reference(source, qw, residual, swiglu)
    assert out.shape == (1, n) and out.dtype == dtype
    # The output rounds to dtype, and SiLU·up rounds its input to it first. A float32 model's sums are float32;
    # float16 and bfloat16 models take each word's products in float16 pairs (quant_kernels.COLUMN_MATH), whose
    # error is bounded by float16's rounding of the products' absolute values (`half2_bound`).
    tolerance = {torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float32: 1e-6}[dtype]
    tolerance *= 1 if epilogue == "residual" else 4
    bound = half2_bound(source, qw, swiglu) if dtype != torch.float32 else 0.0
    close = (out.double() - expected).abs() <= tolerance * (expected.abs() + expected.abs().max()) + bound
    assert close.all(), float(((out.double() - expected).abs() - bound).max())
    buffer = torch.full((1, n), float("nan"), device=DEVICE)  # tensor parallelism's float32 partial sums
    assert quant.qlinear(source.to(dtype) if epilogue == "norm" else x, cw, swiglu=swiglu, out=buffer,
                         matvec=True) is buffer  # fmt: skip
    expected = reference(source, qw, None, swiglu)
    assert ((buffer.double() - expected).abs() <= tolerance * (expected.abs() + expected.abs().max()) + bound).all()
    assert not cw.counters.any()


def test_column_tile_by_kind_of_product(monkeypatch):
    """Products adding a residual take RESIDUAL_TILE; the others split K into longer pieces while the grid has
    more than PROGRAMS_PER_SM programs an SM, up to LONGEST_SPLIT word rows (an H200's 132 SMs: 792 programs)."""
    monkeypatch.setattr(quant_kernels, "multiprocessors", lambda device: 132)
    cuda = torch.device("cuda")
    tile = quant_kernels.column_tile
    assert tile(4096, 4096, True, cuda) == tile(4096, 11008, True, cuda) == quant_kernels.RESIDUAL_TILE
    assert tile(12288, 4096, False, cuda).split_rows == 128  # 7B q|k|v: 192 output tiles x 4 splits
    assert tile(22016, 4096, False, cuda).split_rows == 256  # 7B gate|up: 344 x 2
    assert tile(27648, 5120, False, cuda).split_rows == 256  # 13B gate|up: the longest split, 432 x 3
    assert tile(4096, 4096, False, cuda) == quant_kernels.INPUT_TILE  # 64 x 8: a small product keeps short splits
    assert tile(12288, 4096, False, torch.device("cpu")) == quant_kernels.INTERPRETER_TILE


def test_qmatvec_columns_refuses_an_unknown_setting(monkeypatch):
    """A mistyped $VICUNAFLOW_COLUMN_MATH is an error naming the variable, not a silent fallback."""
    cw = quant.int4columns(quant.quantize(weight(16, 64, seed=1), bits=4, group_size=32))
    monkeypatch.setattr(quant_kernels, "COLUMN_MATH", "half")
    with pytest.raises(ValueError, match="VICUNAFLOW_COLUMN_MATH='half'"):
        quant_kernels.qmatvec_columns(torch.randn(1, 64, dtype=torch.float16), cw)


def half2_bound(source: torch.Tensor, qw: quant.QuantWeight, swiglu: bool) -> torch.Tensor:
    """[1, N]: 2^-10 (two units of float16's roundoff) times sum_k |q scale| |x| + |zero| |x|: four float16
    products and sums a word, whose rounding errors add up like a random walk, not in the worst case's 6 units."""
    k = qw.shape[1]
    inputs = source.double()
    if swiglu:
        inputs = torch.nn.functional.silu(inputs[:, :k]) * inputs[:, k:]
    codes = quant.unpack_int4(qw.qweight, k).double()
    scales = qw.scales.double().repeat_interleave(qw.group_size, dim=1)[:, :k]
    zeros = qw.zeros.double().repeat_interleave(qw.group_size, dim=1)[:, :k]
    return 2**-10 * (inputs.abs() @ ((codes * scales).abs() + zeros.abs()).T)


@pytest.mark.parametrize(
    ("m", "n", "k", "group_size"), [(3, 37, 256, 128), (2, 33, 200, 40), (17, 32, 96, 32), (2, 16, 704, 128)]
)
def test_qmatmul_reads_int4columns(m, n, k, group_size):
    """Batched steps on an Int4Columns weight: qmatmul's columns branch (codes joined back into column order
    for tl.dot), or the decoding path where its group size is not a power of two."""
    generator = torch.Generator().manual_seed(m + n)
    qw = quant.quantize(weight(n, k, seed=m), bits=4, group_size=group_size).to(DEVICE)
    cw = quant.int4columns(qw)
    x = torch.randn(m, k, generator=generator).to(DEVICE, torch.float16)
    residual = torch.randn(m, n, generator=generator).to(DEVICE, torch.float16)
    out = quant.qlinear(x, cw, residual, matvec=None if quant_kernels.matmul_fits(cw) else False)
    expected = reference(x, qw, residual, swiglu=False)
    assert torch.allclose(out.double(), expected, rtol=2**-9, atol=2**-9 * float(expected.abs().max()))
    if quant_kernels.matmul_fits(cw):
        assert torch.equal(quant_kernels.qmatmul(x, cw, residual), quant_kernels.qmatmul(x, qw, residual))


# ---- int4 in torch's tinygemm layout (quant.Int4Packed) -------------------------------------------


def tinygemm_reference(x: torch.Tensor, qw: quant.QuantWeight) -> torch.Tensor:
    """float64: the bfloat16 input times the grid tinygemm decodes (bfloat16 scale, zero' = zero + 8 scale)."""
    k = qw.shape[1]
    codes = quant.unpack_int4(qw.qweight, k).double()  # [N, K]
    scales = qw.scales.float().to(torch.bfloat16).double().repeat_interleave(qw.group_size, dim=1)
    zeros = (qw.zeros.float() + 8 * qw.scales.float()).to(torch.bfloat16).double()
    zeros = zeros.repeat_interleave(qw.group_size, dim=1)
    return x.to(torch.bfloat16).double() @ ((codes - 8) * scales + zeros).T


@pytest.mark.parametrize(("m", "n", "k", "group_size"), [(1, 64, 256, 128), (5, 48, 704, 64), (3, 16, 96, 32)])
def test_int4pack_multiplies_the_same_codes(m, n, k, group_size):
    """Int4Packed holds the QuantWeight's codes: tinygemm's product equals the float64 product of its
    grid within one bfloat16 rounding of the output, and stays within bfloat16's scale rounding of ours."""
    qw = quant.quantize(weight(n, k, seed=k), bits=4, group_size=group_size).to(DEVICE)
    packed = quant.int4pack(qw)
    assert isinstance(packed, quant.Int4Packed) and packed.shape == (n, k) and packed.nbytes == qw.nbytes
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE)
    y = quant.qlinear(x, packed)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    expected = tinygemm_reference(x, qw)
    scale = float(expected.abs().max())
    assert float((y.double() - expected).abs().max()) < 2**-7 * scale
    ours = x.double() @ qw.dequantize(torch.float64).T
    assert float((y.double() - ours).abs().max()) < 2**-5 * scale


def test_int4pack_leaves_what_tinygemm_cannot_take():
    for n, k, group_size in [(16, 256, 16), (12, 256, 128), (16, 200, 40), (16, 704, 128)]:
        qw = quant.quantize(weight(n, k), bits=4, group_size=group_size)
        assert quant.int4pack(qw) is qw, (n, k, group_size)
    int8 = quant.quantize(weight(16, 256), bits=8)
    assert quant.int4pack(int8) is int8


@pytest.mark.parametrize("residual_dtype", [torch.bfloat16, torch.float32])
def test_int4pack_linear_applies_qmatvecs_epilogues(residual_dtype):
    """RMSNorm in, SiLU·up in, the residual out, `out` of another dtype: what the model asks of qmatvec."""
    n, k = 32, 256
    qw = quant.quantize(weight(n, k, seed=3), bits=4, group_size=128).to(DEVICE)
    packed = quant.int4pack(qw)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, k, generator=generator).to(DEVICE)
    gate_up = torch.randn(2, 2 * k, generator=generator).to(DEVICE)
    norm = torch.rand(k, generator=generator).add(0.5).to(DEVICE, torch.bfloat16)
    residual = torch.randn(2, n, generator=generator).to(DEVICE, residual_dtype)
    normed = torch.nn.functional.rms_norm(x.double(), (k,), norm.double(), 1e-5)
    expected = tinygemm_reference(normed, qw) + residual.double()
    y = quant.qlinear(x, packed, residual, norm=norm, eps=1e-5)
    assert y.dtype == residual_dtype
    assert torch.allclose(y.double(), expected, atol=2**-6 * float(expected.abs().max()))
    swiglu = torch.nn.functional.silu(gate_up[:, :k].double()) * gate_up[:, k:].double()
    out = torch.empty(2, n, dtype=torch.float32, device=DEVICE)
    assert quant.qlinear(gate_up, packed, swiglu=True, out=out) is out
    expected = tinygemm_reference(swiglu, qw)
    assert torch.allclose(out.double(), expected, atol=2**-6 * float(expected.abs().max()))
    with pytest.raises(ValueError, match="does not fit"):
        quant.qlinear(torch.zeros(1, 10, device=DEVICE), packed)


@pytest.mark.parametrize(
    ("m", "width", "norm", "swiglu"),
    [(1, 256, True, False), (3, 300, True, False), (2, 704 * 2, False, True), (1, 96, False, False)],
)
def test_rows_input_prepares_a_plain_products_input(m, width, norm, swiglu):
    """kernels.rows_input (Triton's interpreter on a CPU): RMSNorm, SiLU·up or a cast, as torch computes them."""
    generator = torch.Generator().manual_seed(width)
    x = torch.randn(m, width, generator=generator).half().to(DEVICE)
    k = width // 2 if swiglu else width
    norm_weight = torch.rand(k, generator=generator).add(0.5).half().to(DEVICE) if norm else None
    y = kernels.rows_input(x, norm=norm_weight, eps=1e-5, swiglu=swiglu, dtype=torch.bfloat16)
    expected = x.double()
    if norm:
        expected = torch.nn.functional.rms_norm(expected, (k,), norm_weight.double(), 1e-5)
    if swiglu:
        expected = torch.nn.functional.silu(expected[:, :k]) * expected[:, k:]
    assert y.dtype == torch.bfloat16 and y.shape == (m, k)
    # one bfloat16 rounding (2**-8 of the value; the interpreter truncates: 2**-7)
    assert torch.allclose(y.double(), expected, rtol=2**-7, atol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        kernels.rows_input(x, norm=torch.ones(k + 2, device=DEVICE), swiglu=False)


def test_engine_with_tinygemm_int4_runs_in_bfloat16_and_matches_the_triton_path(tiny_vicuna):
    """--load-4bit with the tinygemm kernel (the CUDA default; forced here on the CPU, whose tinygemm has its
    own packing but the same grid): the model computes in bfloat16, every layer weight is Int4Packed,
    the bytes equal the QuantWeight model's, and prompt and decode logits stay close to the same codes
    through quant_kernels' path in bfloat16."""
    from vicunaflow.engine import load_model

    options = dict(device=DEVICE, load_4bit=True, group_size=64)
    packed, tokenizer = load_model(tiny_vicuna, int4_kernel="tinygemm", **options)
    plain, _ = load_model(tiny_vicuna, int4_kernel="triton", dtype="bfloat16", **options)
    assert packed.dtype == torch.bfloat16 and plain.dtype == torch.bfloat16
    assert all(isinstance(getattr(layer, name), quant.Int4Packed) for layer in packed.layers for name in
               ("wqkv", "wo", "w13", "w2"))  # fmt: skip
    assert packed.weight_bytes() == plain.weight_bytes()
    ids = tokenizer("USER: Hello, who are you? ASSISTANT:").input_ids

    def logits(model) -> torch.Tensor:
        with torch.inference_mode():
            model.setup_cache(1, len(ids) + 1)
            prompt = model(torch.tensor([ids], device=DEVICE), torch.arange(len(ids), device=DEVICE)[None],
                           kv_length=len(ids))  # fmt: skip
            token = torch.tensor([[int(prompt.argmax())]], device=DEVICE)
            step = model(token, torch.tensor([[len(ids)]], device=DEVICE), kv_length=len(ids) + 1)
        return torch.cat([prompt, step]).double()

    a, b = logits(packed), logits(plain)
    assert float((a - b).norm() / b.norm()) < 0.02
    assert torch.equal(a.argmax(dim=-1), b.argmax(dim=-1))
    assert (
        load_model(tiny_vicuna, int4_kernel="tinygemm", dtype="float32", load_4bit=True, device="cpu")[0].dtype
        == torch.float32
    )  # an explicit dtype other than bfloat16 keeps our kernels
    with pytest.raises(VicunaflowError, match="choose columns, tinygemm, triton"):
        load_model(tiny_vicuna, int4_kernel="marlin", load_4bit=True)


# ---- tensor parallelism --------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_column_shards_are_quantized_slices(bits):
    w = weight(64, 256)
    qw = quant.quantize(w, bits=bits, group_size=64)
    shards = [quant.shard(qw, 0, rank, 4) for rank in range(4)]
    for rank, part in enumerate(shards):
        expected = quant.quantize(w[rank * 16 : (rank + 1) * 16], bits=bits, group_size=64)
        assert_same(part, expected)
    assert_same(quant.cat(shards), qw)


def test_int4_row_shards_are_quantized_slices():
    w = weight(16, 512)
    qw = quant.quantize(w, bits=4, group_size=64)
    for rank in range(4):
        assert_same(quant.shard(qw, 1, rank, 4), quant.quantize(w[:, rank * 128 : (rank + 1) * 128], 4, 64))
    with pytest.raises(VicunaflowError, match="not a multiple of the int4 group size 64"):
        quant.shard(qw, 1, 0, 16)  # parts of 32 columns would cut groups in half


def test_int8_row_shards_keep_their_rows_scales():
    """Row-parallel int8 shards decode the unsharded weight's columns, and their partial products
    sum (the all-reduce) to the unsharded product."""
    w = weight(16, 512)
    qw = quant.quantize(w, bits=8)
    x = torch.randn(1, 512, dtype=torch.float64)
    partial = []
    for rank in range(4):
        part = quant.shard(qw, 1, rank, 4)
        cols = slice(rank * 128, (rank + 1) * 128)
        assert torch.equal(part.dequantize(torch.float32), qw.dequantize(torch.float32)[:, cols])
        partial.append(quant.qlinear(x[:, cols], part))
    assert torch.allclose(sum(partial), quant.qlinear(x, qw))
    with pytest.raises(VicunaflowError, match="does not split 3 ways"):
        quant.shard(qw, 1, 0, 3)


def assert_same(a: quant.QuantWeight, b: quant.QuantWeight) -> None:
    assert (a.bits, a.group_size, a.shape) == (b.bits, b.group_size, b.shape)
    for name in quant.SUFFIXES:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or torch.equal(x, y), name


# ---- the verb, the folder, the model -------------------------------------------------------------


@pytest.fixture(scope="module", params=[8, 4])
def quantized(request, tiny_vicuna, tmp_path_factory) -> tuple[Path, int]:
    bits = request.param
    out = tmp_path_factory.mktemp("quantized") / f"vicuna-tiny-all-v1.1-int{bits}"
    return quantize_model(model_path=tiny_vicuna, output_dir=out, bits=bits, max_shard_size="1MB"), bits


def test_quantized_folder_loads_back_bit_identically(quantized, tiny_vicuna):
    out, bits = quantized
    config = json.loads((out / "config.json").read_text())
    assert quant.quantization_config(out) == config["quantization_config"]
    assert config["quantization_config"]["bits"] == bits
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny_vicuna / name).read_bytes()
    manifest = json.loads((out / "vicunaflow.json").read_text())
    assert manifest["kind"] == "quantize" and manifest["bits"] == bits
    assert len(list(out.glob("model-*.safetensors"))) > 1  # 1MB shards: the writer's index is used
    with Checkpoint(tiny_vicuna) as source, Checkpoint(out) as stored:
        quantized_names = [n for n in source.names() if quant.QUANTIZED_WEIGHT.fullmatch(n)]
        assert len(quantized_names) == 7 * json.loads((tiny_vicuna / "config.json").read_text())["num_hidden_layers"]
        for name in source.names():
            loaded = quant.load_weight(stored, name)
            if name in quantized_names:
                assert name not in stored and quant.is_quantized(stored, name)
                assert_same(loaded, quant.quantize(source.get(name), bits))
            else:
                assert torch.equal(loaded, source.get(name)) and loaded.dtype == source.get(name).dtype


def test_quantize_refuses_a_quantized_folder(quantized, tmp_path):
    out, _ = quantized
    with pytest.raises(VicunaflowError, match="already quantized"):
        quantize_model(model_path=out, output_dir=tmp_path / "again")


def test_quantize_refuses_a_folder_without_a_tokenizer(tiny_vicuna, tmp_path):
    """The int8 copy of a folder without tokenizer files was written, complete by its manifest, and then refused by
    chat and serve ("its tokenizer could not be read")."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_vicuna, folder)
    for name in ("tokenizer.json", "tokenizer.model"):
        (folder / name).unlink()
    with pytest.raises(VicunaflowError, match=r"model: no tokenizer \(tokenizer.json or tokenizer.model\), so its"):
        quantize_model(model_path=folder, output_dir=tmp_path / "int8")
    assert not (tmp_path / "int8").exists()


def test_dequantized_logits_stay_close_to_float(quantized, tiny_vicuna):
    """transformers' float32 forward of the tiny model with its Linear weights decoded from the folder.

    The random tiny model amplifies any weight error (a 0.8% error per int8 matrix becomes ~3% in
    the logits, int4's ~10% becomes ~40%), so the bar is Gaussian noise of the same size per matrix:
    rounding must cost no more than unstructured noise does; int8 must also stay within 5%.
    """
    from transformers import AutoModelForCausalLM

    out, bits = quantized
    model = AutoModelForCausalLM.from_pretrained(tiny_vicuna, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    originals = {n: p.detach().clone() for n, p in model.named_parameters() if quant.QUANTIZED_WEIGHT.fullmatch(n)}

    @torch.no_grad()
    def logits(weights: dict[str, torch.Tensor]) -> torch.Tensor:
        for name, param in model.named_parameters():
            if name in weights:
                param.copy_(weights[name])
        return model(ids).logits[0].double()

    reference_logits = logits(originals)
    with Checkpoint(out) as stored:
        decoded = {n: quant.load_quantized_weight(stored, n).dequantize(torch.float32) for n in originals}
    error = float((logits(decoded) - reference_logits).norm() / reference_logits.norm())
    noise_errors = []
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        noisy = {
            n: w + torch.randn(w.shape, generator=generator) * (decoded[n] - w).std() for n, w in originals.items()
        }
        noise_errors.append(float((logits(noisy) - reference_logits).norm() / reference_logits.norm()))
    assert error <= 1.2 * sum(noise_errors) / 3, (error, noise_errors)
    if bits == 8:
        assert error < 0.05, error


# ---- the workflow ---------------------------------------------------------------------------------


def test_workflow_default_group_size_is_the_verbs():
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    default = schema["properties"]["quantize"]["properties"]["group_size"]["default"]
    assert inspect.signature(quantize_model).parameters["group_size"].default == default == quant.DEFAULT_GROUP_SIZE


def test_snakemake_dry_run_lists_the_quantized_targets(tmp_path):
    (tmp_path / "config").symlink_to(REPO / "config")
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n"]
    command += ["vicuna-tiny-all-v1.1-int4", "vicuna-7b-all-v1.1-int8", "--configfile", "config/demo.yaml"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout + result.stderr
    assert "rule quantize_model" in text and "vicuna-tiny-all-v1.1-int4" in text and "vicuna-7b-all-v1.1-int8" in text
    assert "--bits 4" in text or "quantize_model" in text


# ---- the engine (vicunaflow.engine: chat and serve) ----------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_engine_one_row_steps_through_qmatvec_match_dequantized_products(tiny_vicuna, bits):
    """The engine's matvec switch on (as on CUDA in float16), here in Triton's interpreter: every one-row
    product of a decode step goes through qmatvec with its fused epilogues (RMSNorm folded into q|k|v,
    gate|up and int4's lm_head, SiLU·up into down, the residual added by o and down); the logits equal the dequantize +
    matmul path's."""
    from vicunaflow.engine import load_model

    model, tokenizer = load_model(tiny_vicuna, device=DEVICE, dtype="float32", load_8bit=bits == 8, load_4bit=bits == 4)
    ids = tokenizer("USER: Hello ASSISTANT:").input_ids
    calls = []
    real = quant_kernels.qmatvec

    def counted(*args, **kwargs):
        calls.append(("norm" if kwargs.get("norm") is not None else "") + ("swiglu" if args[3] else ""))
        return real(*args, **kwargs)

    results = {}
    with torch.inference_mode(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(quant_kernels, "qmatvec", counted)
        for matvec in (False, True):
            model.matvec = matvec
            model.setup_cache(1, len(ids) + 2)
            prompt = torch.tensor([ids], device=DEVICE)
            logits = [model(prompt, torch.arange(len(ids), device=DEVICE)[None], kv_length=len(ids))]
            for step in range(2):  # the interpreter is slow: two steps
                token = torch.tensor([[int(logits[-1].argmax())]], device=DEVICE)
                position = torch.tensor([[len(ids) + step]], device=DEVICE)
                logits.append(model(token, position, kv_length=len(ids) + step + 1))
            results[matvec] = torch.cat(logits)
    model.matvec = False
    # int4: lm_head too, its final RMSNorm folded in, for the prompt's last position and each step
    layers, head = model.args.n_layers, 3 if bits == 4 else 0
    assert calls.count("norm") == 2 * 2 * layers + head and calls.count("swiglu") == 2 * layers
    assert len(calls) == 4 * 2 * layers + head
    assert torch.allclose(results[True], results[False], rtol=1e-4, atol=1e-4 * float(results[False].abs().max()))


def test_engine_with_int4columns_decodes_as_the_stored_layout(tiny_vicuna):
    """--load-4bit with int4_kernel "columns": every layer weight is an Int4Columns of the same bytes, and
    one-row steps through qmatvec_columns (the interpreter here) give the stored layout's decoded logits."""
    from vicunaflow.engine import load_model

    options = dict(device=DEVICE, dtype="float32", load_4bit=True, group_size=64)
    columns, tokenizer = load_model(tiny_vicuna, int4_kernel="columns", **options)
    plain, _ = load_model(tiny_vicuna, int4_kernel="triton", **options)
    names = ("wqkv", "wo", "w13", "w2")
    assert all(isinstance(getattr(layer, name), quant.Int4Columns) for layer in columns.layers for name in names)
    assert isinstance(columns.output, quant.Int4Columns)  # lm_head too, beside int4 layers
    assert columns.weight_bytes() == plain.weight_bytes()
    ids = tokenizer("USER: Hello ASSISTANT:").input_ids
    calls = []
    real = quant_kernels.qmatvec_columns

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    results = []
    with torch.inference_mode(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(quant_kernels, "qmatvec_columns", counted)
        for model, matvec in ((columns, True), (plain, False)):
            model.matvec = matvec
            model.setup_cache(1, len(ids) + 1)
            logits = [model(torch.tensor([ids], device=DEVICE), torch.arange(len(ids), device=DEVICE)[None],
                            kv_length=len(ids))]  # fmt: skip
            token = torch.tensor([[int(logits[-1].argmax())]], device=DEVICE)  # one step: the interpreter is slow
            logits.append(model(token, torch.tensor([[len(ids)]], device=DEVICE), kv_length=len(ids) + 1))
            model.matvec = False
            results.append(torch.cat(logits))
    assert len(calls) == 4 * columns.args.n_layers + 2  # + lm_head: the prompt's last position, the step
    assert torch.allclose(results[0], results[1], rtol=1e-4, atol=1e-4 * float(results[1].abs().max()))


def test_chat_cli_on_a_quantized_folder(quantized, tiny_vicuna, capsys, monkeypatch):
    """`vicunaflow chat --model-path <int8|int4 folder>` (no flag) answers as `chat --load-Nbit` on the float folder."""
    import io

    from vicunaflow.chat import chat
    from vicunaflow.loading import ModelOptions

    out, bits = quantized
    command = [sys.executable, "-m", "vicunaflow", "chat", "--model-path", str(out), "--device", "cpu"]
    command += ["--temperature", "0", "--max-new-tokens", "8"]
    result = subprocess.run(command, input="Hello\n", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))
    options = ModelOptions(device="cpu", **{f"load_{bits}bit": True})
    chat(model_path=tiny_vicuna, model_options=options, temperature=0.0, max_new_tokens=8)
    assert result.stdout == capsys.readouterr().out
    assert "ASSISTANT: " in result.stdout and f"int{bits} layer weights" in result.stderr


def test_chat_and_serve_do_not_use_bitsandbytes():
    """--load-8bit / --load-4bit are vicunaflow.quant's formats on every device, not bitsandbytes'."""
    sources = [REPO / "src/vicunaflow/chat.py", *sorted((REPO / "src/vicunaflow/serve").glob("*.py"))]
    sources += sorted((REPO / "src/vicunaflow/engine").glob("*.py"))
    assert [str(p) for p in sources if "bitsandbytes" in p.read_text()] == []


@pytest.mark.parametrize("verb", ["eval loss", "finetune"])
def test_transformers_commands_refuse_a_quantized_folder(quantized, tmp_path, verb):
    """transformers would load a `vicunaflow quantize` folder with random projections (it skips the unknown
    quantization): `eval loss` and `finetune` refuse it before loading anything, naming the float folder."""
    out, bits = quantized
    command = [
        sys.executable,
        "-m",
        "vicunaflow",
        *verb.split(),
        "--model-path",
        str(out),
        "--data",
        str(BUILTIN_CONVERSATIONS),
    ]
    if verb == "eval loss":
        command += ["--output", str(tmp_path / "loss.json"), "--device", "cpu"]
    else:
        command += ["--output-dir", str(tmp_path / "ft"), "--nproc-per-node", "1", "--max-steps", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"--model-path {out}: is a `vicunaflow quantize` folder (int{bits})" in result.stderr
    assert "give its float folder" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "loss.json").exists() and not (tmp_path / "ft").exists()


@pytest.mark.parametrize("group_size", [96, 130])
def test_a_folder_of_any_even_group_size_loads_as_quantized_at_load(tiny_vicuna, tmp_path, group_size):
    """The group size comes from the folder's config.json, not from tensor shapes: 130 (whose group count
    over 256 columns is 128's) and 96 (no power of two's) load as `--load-4bit` with that group size does."""
    from vicunaflow.engine import load_model

    out = tmp_path / f"int4-g{group_size}"
    command = [sys.executable, "-m", "vicunaflow", "quantize", "--model-path", str(tiny_vicuna)]
    command += ["--output-dir", str(out), "--bits", "4", "--group-size", str(group_size)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    stored, _ = load_model(out, device="cpu")
    at_load, _ = load_model(tiny_vicuna, device="cpu", load_4bit=True, group_size=group_size)
    stored_weights = [m for m in stored.modules() if isinstance(m, quant.QuantWeight)]
    at_load_weights = [m for m in at_load.modules() if isinstance(m, quant.QuantWeight)]
    assert len(stored_weights) == len(at_load_weights) > 0
    for a, b in zip(stored_weights, at_load_weights, strict=True):
        assert a.group_size == group_size
        assert_same(a, b)


def test_int4_scales_that_do_not_fit_the_stored_group_size_are_refused(tiny_vicuna, tmp_path):
    out = quantize_model(model_path=tiny_vicuna, output_dir=tmp_path / "int4", bits=4, group_size=64)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["group_size"] = 32
    (out / "config.json").write_text(json.dumps(config))
    with Checkpoint(out) as stored, pytest.raises(VicunaflowError, match=r"quantization_config\.group_size"):
        quant.load_quantized_weight(stored, "model.layers.0.self_attn.q_proj.weight")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's stand-ins; a GPU runs the real launch")
@pytest.mark.parametrize(("n", "k"), [(64, 512), (37, 300)], ids=["whole-tiles", "masked"])
def test_one_row_kernels_with_dependent_launch_branches(n, k, monkeypatch):
    """The PDL code path of matvec / qmatvec (first weight tile read before gdc_wait, the loop taking it at
    its first step) gives the same sums; the interpreter runs it with the two grid-control calls as no-ops."""
    pdl_stand_ins(monkeypatch, kernels, quant_kernels)
    generator = torch.Generator().manual_seed(n + k)
    w = weight(n, k)
    x = torch.randn(1, k, generator=generator).half()
    gate_up = torch.randn(1, 2 * k, generator=generator).half()
    norm = torch.rand(k, generator=generator).add(0.5).half()
    residual = torch.randn(1, n, generator=generator).half()
    out = kernels.matvec(x, w, residual)
    expected = x.double() @ w.double().T + residual.double()
    assert torch.allclose(out.double(), expected, rtol=2**-9, atol=2**-9 * float(expected.abs().max()))
    for bits, input_mode in [(8, "fused"), (8, "separate"), (4, "fused"), (4, "separate")]:
        monkeypatch.setattr(quant_kernels, "INPUT", input_mode)  # separate: kernels.rows_input's PDL branch too
        qw = quant.quantize(w, bits=bits, group_size=128)
        for inputs, swiglu, kwargs in ((x, False, {"norm": norm}), (gate_up, True, {})):
            source = torch.nn.functional.rms_norm(x.double(), (k,), norm.double(), 1e-6) if not swiglu else gate_up
            expected = reference(source, qw, residual, swiglu)
            out = quant_kernels.qmatvec(inputs, qw, residual, swiglu, **kwargs)
            tolerance = 2**-8 if input_mode == "fused" else 2**-7  # separate: the input rounds to float16 first
            assert torch.allclose(out.double(), expected, rtol=tolerance, atol=tolerance * float(expected.abs().max()))


def test_quantized_folder_keeps_the_tokenizers_chat_template_file(tiny_vicuna, tmp_path):
    """A folder whose tokenizer was saved by transformers 5 keeps its chat template in chat_template.jinja (finetune
    copies it so); its quantized copy lost that file, so the copy's tokenizer had no chat template at all."""
    from transformers import AutoTokenizer

    folder = tmp_path / "model"
    shutil.copytree(tiny_vicuna, folder)
    AutoTokenizer.from_pretrained(str(tiny_vicuna)).save_pretrained(str(folder))  # as transformers writes it
    assert (folder / "chat_template.jinja").is_file()
    source = AutoTokenizer.from_pretrained(str(folder))
    assert source.chat_template
    out = quantize_model(model_path=folder, output_dir=tmp_path / "int8")
    assert (out / "chat_template.jinja").read_bytes() == (folder / "chat_template.jinja").read_bytes()
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == source.chat_template


@pytest.mark.parametrize("block", ["int4", ["vicunaflow"], 4])
def test_a_quantization_config_that_is_not_an_object_is_refused(tmp_path, block):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": block}))
    with pytest.raises(VicunaflowError, match=r"config\.json: quantization_config is .*not a JSON object"):
        quant.quantization_config(tmp_path)

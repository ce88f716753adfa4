"""Triton kernels of quant_kernels.qmatmul: a few rows times an int8 / int4 weight on tensor cores.

A module of its own because its kernels call shared @triton.jit helpers (the input tile, each row's
RMSNorm factor), which Triton resolves among module globals; importing it needs Triton, so
quant_kernels imports it only when qmatmul runs. See qmatmul's docstring for the math.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# (BLOCK_N, BLOCK_K, warps) for int8; int4 takes BLOCK_K = its group size (one group a K step). Narrow
# BLOCK_N keeps a 4096-row weight over a few hundred programs: a matvec-sized product needs several
# programs per SM to keep enough loads in flight.
MATMUL_TILES = [(16, 256, 4), (32, 256, 4), (16, 512, 4), (32, 128, 4), (64, 128, 4), (128, 128, 4), (64, 128, 8)]

int8_configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for n, k, w in MATMUL_TILES]
int4_configs = [triton.Config({"BLOCK_N": n}, num_warps=w) for n, w in sorted({(n, w) for n, _, w in MATMUL_TILES})]
if os.environ.get("TRITON_INTERPRET") == "1":
    int8_configs = [triton.Config({"BLOCK_N": 32, "BLOCK_K": 128}, num_warps=1)]
    int4_configs = [triton.Config({"BLOCK_N": 32}, num_warps=1)]


@triton.jit
def input_tile(x_ptr, norm_ptr, rows, row_ok, ks, k_ok, K: tl.constexpr, SWIGLU: tl.constexpr, NORM: tl.constexpr):
    """The [BLOCK_M, BLOCK_K] input tile in float32 and the squares of what was loaded (NORM's sum).

    x, silu(gate) * up, or for RMSNorm x * norm weight: its per-row 1 / rms is a factor of each row's
    products, applied once at the end (`rms_factor`). Why: computing it first costs every program a
    serial pass over its rows before its first weight load. On an H200 (7B, 8 rows), int8 batched decode
    fell from 1,441 to 993 tokens/s when RMSNorm moved into qmatmul that way. (x * norm weight is rounded
    to the product dtype unnormalised: it is x's own magnitude, which x's dtype already holds.)
    """
    ok = row_ok[:, None] & k_ok[None, :]
    if SWIGLU:
        gate = tl.load(x_ptr + rows[:, None] * (2 * K) + ks[None, :], mask=ok, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + rows[:, None] * (2 * K) + K + ks[None, :], mask=ok, other=0.0).to(tl.float32)
        tile = gate * tl.sigmoid(gate) * up
        return tile, tile
    x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=ok, other=0.0).to(tl.float32)
    if NORM:
        return x * tl.load(norm_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :], x * x
    return x, x


@triton.jit
def rms_factor(squares, eps, K: tl.constexpr):
    """Each row's 1 / sqrt(mean(x^2) + eps) from the [BLOCK_M, BLOCK_K] running squares: [BLOCK_M, 1]."""
    return (1.0 / tl.sqrt(tl.sum(squares, axis=1) / K + eps))[:, None]


@triton.autotune(configs=int8_configs, key=["N", "K", "BLOCK_M", "SWIGLU", "NORM"])
@triton.jit
def int8_matmul_kernel(
    x_ptr,  # [M, K] or [M, 2K] (SWIGLU)
    q_ptr,  # int8 [N, K]
    scale_ptr,  # float32 [N]
    residual_ptr,
    out_ptr,  # [M, N]
    norm_ptr,
    eps,
    M,
    N: tl.constexpr,
    K: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    SWIGLU: tl.constexpr,
    NORM: tl.constexpr,
    BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    MAGIC_SIGNED: tl.constexpr = 0x4B400000  # see quant_kernels.py: MAGIC
    MAGIC_SIGNED_VALUE: tl.constexpr = 12582912.0
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns = weight rows
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    squares = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)  # NORM: sum of x^2 per row
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x, x_squared = input_tile(x_ptr, norm_ptr, rows, row_ok, ks, k_ok, K, SWIGLU, NORM)
        if NORM:
            squares += x_squared
        x = x.to(tl.bfloat16) if BF16 else x.to(tl.float16)
        q = tl.load(q_ptr + cols[:, None] * K + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0)
        w = ((q.to(tl.int32) + MAGIC_SIGNED).to(tl.float32, bitcast=True) - MAGIC_SIGNED_VALUE).to(x.dtype)
        acc += tl.dot(x, tl.trans(w))  # [BLOCK_M, BLOCK_N]
    y = acc * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if NORM:
        y = y * rms_factor(squares, eps, K)
    ok = row_ok[:, None] & col_ok[None, :]
    if HAS_RESIDUAL:
        y += tl.load(residual_ptr + rows[:, None] * N + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.autotune(configs=int4_configs, key=["N", "K", "G", "BLOCK_M", "SWIGLU", "NORM"])
@triton.jit
def int4_matmul_kernel(
    x_ptr,  # [M, K] or [M, 2K] (SWIGLU)
    q_ptr,  # uint8 [N, K // 2]: column 2i low nibble, 2i + 1 high nibble
    scale_ptr,  # float16 [N, NG]
    zero_ptr,  # float16 [N, NG]
    residual_ptr,
    out_ptr,  # [M, N]
    norm_ptr,
    eps,
    M,
    N: tl.constexpr,
    K: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    SWIGLU: tl.constexpr,
    NORM: tl.constexpr,
    BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    G: tl.constexpr,  # group size: a power of two >= 32, the K step
    BLOCK_N: tl.constexpr,
):
    MAGIC: tl.constexpr = 0x4B000000  # see quant_kernels.py: MAGIC
    MAGIC_VALUE: tl.constexpr = 8388608.0
    KP: tl.constexpr = K // 2
    NG: tl.constexpr = (K + G - 1) // G
    GH: tl.constexpr = G // 2
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    squares = tl.zeros((BLOCK_M, G), dtype=tl.float32)  # NORM: sum of x^2 per row
    for group in range(0, NG):
        ks = group * G + tl.arange(0, G)
        x, x_squared = input_tile(x_ptr, norm_ptr, rows, row_ok, ks, ks < K, K, SWIGLU, NORM)
        if NORM:
            squares += x_squared
        x = x.to(tl.bfloat16) if BF16 else x.to(tl.float16)
        pairs = group * GH + tl.arange(0, GH)
        packed = tl.load(
            q_ptr + cols[:, None] * KP + pairs[None, :], mask=col_ok[:, None] & (pairs < KP)[None, :], other=0
        ).to(tl.int32)  # [BLOCK_N, GH]
        low = ((packed & 15) | MAGIC).to(tl.float32, bitcast=True) - MAGIC_VALUE
        high = ((packed >> 4) | MAGIC).to(tl.float32, bitcast=True) - MAGIC_VALUE
        codes = tl.reshape(tl.join(low, high), (BLOCK_N, G)).to(x.dtype)  # columns 2i, 2i + 1 interleaved
        products = tl.dot(x, tl.trans(codes))  # [BLOCK_M, BLOCK_N]: sum(q x) over the group
        x_sum = tl.sum(x.to(tl.float32), axis=1)  # [BLOCK_M]
        scale = tl.load(scale_ptr + cols * NG + group, mask=col_ok, other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + cols * NG + group, mask=col_ok, other=0.0).to(tl.float32)
        acc += products * scale[None, :] + x_sum[:, None] * zero[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    y = acc
    if NORM:  # both terms (sum(q x) * scale and sum(x) * zero) are linear in the row's 1 / rms
        y = y * rms_factor(squares, eps, K)
    if HAS_RESIDUAL:
        y += tl.load(residual_ptr + rows[:, None] * N + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)

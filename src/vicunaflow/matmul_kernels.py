"""Triton kernel of kernels.matmul_rows: a few rows (batched decode steps) times a float16/bfloat16 weight.

The float twin of quant_matmul_kernels.int8_matmul_kernel: the same tiles, RMSNorm factor and input tile
(RMSNorm prologue; matmul_rows computes SiLU·up before it, see there), without the decoding. A module
of its own rather than a third kernel in quant_matmul_kernels.py because it serves float weights
(kernels.py's side, not quant's); it imports the shared @triton.jit helpers, which Triton resolves among
this module's globals. Importing it needs Triton, so kernels.py imports it only when matmul_rows runs.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from vicunaflow.quant_matmul_kernels import MATMUL_TILES, input_tile, rms_factor

# int8's tiles: narrow BLOCK_N, so a 4096-row weight spreads over a few hundred programs (a matvec-sized
# product needs several programs per SM to keep enough loads in flight); a float16 tile holds twice the bytes.
float_configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for n, k, w in MATMUL_TILES]
if os.environ.get("TRITON_INTERPRET") == "1":
    float_configs = [triton.Config({"BLOCK_N": 32, "BLOCK_K": 64}, num_warps=1)]


@triton.autotune(configs=float_configs, key=["N", "K", "BLOCK_M", "SWIGLU", "NORM", "FP32"])
@triton.jit
def float_matmul_kernel(
    x_ptr,  # [M, K] or [M, 2K] (SWIGLU), any float dtype
    w_ptr,  # float16 / bfloat16 (or float32) [N, K]
    residual_ptr,  # [M, N] (HAS_RESIDUAL)
    out_ptr,  # [M, N], any float dtype
    norm_ptr,  # [K] RMSNorm weight (NORM)
    eps,
    M,
    N: tl.constexpr,
    K: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    SWIGLU: tl.constexpr,
    NORM: tl.constexpr,
    FP32: tl.constexpr,  # products in float32: float32 weights, or bfloat16 under the interpreter
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns = weight rows
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    squares = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)  # NORM: sum of x^2 per row
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x, x_squared = input_tile(x_ptr, norm_ptr, rows, row_ok, ks, k_ok, K, SWIGLU, NORM)  # [BLOCK_M, BLOCK_K]
        if NORM:
            squares += x_squared
        w_ptrs = w_ptr + cols[:, None] * K + ks[None, :]
        if N % BLOCK_N == 0 and K % BLOCK_K == 0:  # decided at compile time: unmasked, vectorised loads
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
        if FP32:
            acc += tl.dot(x, tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:  # the input rounded to the weight's dtype, as cuBLAS takes it
            acc += tl.dot(x.to(w.dtype), tl.trans(w))  # [BLOCK_M, BLOCK_N]
    ok = row_ok[:, None] & col_ok[None, :]
    y = acc
    if NORM:  # RMSNorm's per-row factor, applied to the products (quant_matmul_kernels.input_tile)
        y = y * rms_factor(squares, eps, K)
    if HAS_RESIDUAL:
        y += tl.load(residual_ptr + rows[:, None] * N + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)

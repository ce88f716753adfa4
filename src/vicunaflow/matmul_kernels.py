"""Triton kernel of kernels.matmul_rows: a few rows (batched decode steps) times a float16/bfloat16 weight.

The weight tile is tl.dot's left operand and the rows its right: acc[BLOCK_N, BLOCK_M] += w[BLOCK_N, K]
@ x[BLOCK_M, K].T. Why that way round: a batch of 2-32 rows padded to a 16-row tile is too short to be
the left operand of Hopper's warp-group MMA (64 rows), while a 64-row weight tile is; and each program
then streams 64 weight rows through a deep pipeline. bench/sweep_matmul_rows.py timed this design against
x as the left operand (the previous kernel) and against CUDA-core FMAs on the 7B shapes (H200, CUDA
graphs, weights not in L2): at 8 rows it took 0.85-0.95x cuBLAS's time and 1.04-1.29x the one-row
matvec's, the x-left kernel 0.88-0.98x cuBLAS. No split over K, though it saved another 1.5 µs on the
o and down products: a split needs atomic adds, whose order changes the float32 sums from run to run.

RMSNorm comes in through quant_matmul_kernels' input tile and RMSNorm factor (the same helpers as its int8 /
int4 kernels, which Triton resolves among this module's globals); SiLU·up is computed before the kernel
(kernels.matmul_rows says why). Importing this module needs Triton, so kernels.py imports it only when
matmul_rows runs.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from vicunaflow.quant_matmul_kernels import input_tile, rms_factor

# (BLOCK_N, BLOCK_K, warps, stages) the autotuner tries, by the rows' tile (BLOCK_M). In
# bench/results/matmul_rows_sweep_h200.json (7B products, H200) the better of the two is within 1% of the
# best of 58 weight-left tiles at 2-16 rows, and within 5% at 32, where 64 x 256 in 5 stages needs more
# shared memory than there is. Two a shape, not more: the server autotunes every shape at startup.
# BLOCK_M 16: down and o take the first, q|k|v and gate|up the second; BLOCK_M 32 and more:
FEW_ROWS_TILES = [(64, 256, 4, 5), (64, 128, 4, 3)]
MANY_ROWS_TILES = [(64, 128, 4, 5), (64, 128, 4, 3)]
float_configs = [
    triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
    for n, k, w, s in dict.fromkeys(FEW_ROWS_TILES + MANY_ROWS_TILES)
]
if os.environ.get("TRITON_INTERPRET") == "1":
    float_configs = [triton.Config({"BLOCK_N": 32, "BLOCK_K": 64}, num_warps=1)]


def tiles_for_rows(configs: list, named_args: dict, **kwargs) -> list:
    """The autotuner's configs for this launch's BLOCK_M (all of them under the interpreter)."""
    tiles = FEW_ROWS_TILES if kwargs["BLOCK_M"] <= 16 else MANY_ROWS_TILES
    chosen = [c for c in configs if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) in tiles]
    return chosen or configs


@triton.autotune(
    configs=float_configs,
    key=["N", "K", "BLOCK_M", "NORM", "FP32", "HAS_RESIDUAL"],
    prune_configs_by={"early_config_prune": tiles_for_rows},
)
@triton.jit
def float_matmul_kernel(
    x_ptr,  # [M, K], any float dtype
    w_ptr,  # float16 / bfloat16 (or float32) [N, K]
    residual_ptr,  # [M, N] (HAS_RESIDUAL)
    out_ptr,  # [M, N], any float dtype
    norm_ptr,  # [K] RMSNorm weight (NORM)
    eps,
    M,
    N: tl.constexpr,
    K: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    NORM: tl.constexpr,
    FP32: tl.constexpr,  # products in float32: float32 weights, or bfloat16 under the interpreter
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns = weight rows
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # the output's transpose
    squares = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)  # NORM: sum of x^2 per row
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        w_ptrs = w_ptr + cols[:, None] * K + ks[None, :]
        if N % BLOCK_N == 0 and K % BLOCK_K == 0:  # decided at compile time: unmasked, vectorised loads
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
        x, x_squared = input_tile(x_ptr, norm_ptr, rows, row_ok, ks, k_ok, K, False, NORM)  # [BLOCK_M, BLOCK_K]
        if NORM:
            squares += x_squared
        if FP32:
            acc += tl.dot(w.to(tl.float32), tl.trans(x), input_precision="ieee")
        else:  # the input rounded to the weight's dtype, as cuBLAS takes it
            acc += tl.dot(w, tl.trans(x.to(w.dtype)))  # [BLOCK_N, BLOCK_M]
    y = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
    ok = row_ok[:, None] & col_ok[None, :]
    if NORM:  # RMSNorm's per-row factor, applied to the products (quant_matmul_kernels.input_tile)
        y = y * rms_factor(squares, eps, K)
    if HAS_RESIDUAL:
        y += tl.load(residual_ptr + rows[:, None] * N + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)

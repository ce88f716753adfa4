"""Triton kernel of kernels.matmul_rows: a few rows (batched decode steps) times a float16/bfloat16 weight.

The weight tile is tl.dot's left operand and the rows its right: acc[BLOCK_N, BLOCK_M] += w[BLOCK_N, K]
@ x[BLOCK_M, K].T. Why that way round: a batch of 2-64 rows padded to a tile of 16-64 is too short to be
the left operand of Hopper's warp-group MMA (64 rows), while a 64-row weight tile is; and each program
then streams 64 weight rows through a deep pipeline. bench/sweep_matmul_rows.py timed this design against
x as the left operand (the previous kernel) and against CUDA-core FMAs on the 7B shapes (H200, CUDA
graphs, weights not in L2): at 8 rows it took 0.85-0.95x cuBLAS's time and 1.04-1.29x the one-row
matvec's, the x-left kernel 0.88-0.98x cuBLAS.

A product with fewer 64-row weight tiles than the GPU has SMs (a 7B's o and down: 64 tiles on an H200's
132) may split K over SPLIT programs a tile (kernels.matmul_rows decides). Each writes its float32
partial; the last of a tile's programs to finish (a counter each, left at zero for the next launch)
sums the partials in split order and stores the output. Why not atomic adds into the output: their order
changes the float32 sums from run to run; here the same inputs give the same bits.

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
    key=["N", "K", "BLOCK_M", "NORM", "FP32", "HAS_RESIDUAL", "SPLIT"],
    prune_configs_by={"early_config_prune": tiles_for_rows},
)
@triton.jit
def float_matmul_kernel(
    x_ptr,  # [M, K], any float dtype
    w_ptr,  # float16 / bfloat16 (or float32) [N, K]
    residual_ptr,  # [M, N] (HAS_RESIDUAL)
    out_ptr,  # [M, N], any float dtype
    norm_ptr,  # [K] RMSNorm weight (NORM)
    partial_ptr,  # SPLIT > 1: float32 [SPLIT, N, BLOCK_M], each split's products (transposed)
    counter_ptr,  # SPLIT > 1: int32 zeros, one a weight tile (of kernels._split_counters): its programs done
    eps,
    M,
    N: tl.constexpr,
    K: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    NORM: tl.constexpr,
    FP32: tl.constexpr,  # products in float32: float32 weights, or bfloat16 under the interpreter
    SPLIT: tl.constexpr,  # programs a weight tile, each over its part of K (no NORM: its sum spans all of K)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns = weight rows
    row_ok, col_ok = rows < M, cols < N
    # this program's part of K: whole tiles of BLOCK_K (the last part masked where they do not divide evenly)
    PART: tl.constexpr = ((K + BLOCK_K - 1) // BLOCK_K + SPLIT - 1) // SPLIT * BLOCK_K
    part = tl.program_id(1)
    EVEN: tl.constexpr = N % BLOCK_N == 0 and K % (BLOCK_K * SPLIT) == 0  # no masks (decided at compile time)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # the output's transpose
    squares = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)  # NORM: sum of x^2 per row
    for start in range(0, PART, BLOCK_K):  # bounds known at compile time: the last part's excess is masked
        ks = part * PART + start + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        w_ptrs = w_ptr + cols[:, None] * K + ks[None, :]
        # [BLOCK_N, BLOCK_K]; EVEN: unmasked, vectorised loads
        w = tl.load(w_ptrs) if EVEN else tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        x, x_squared = input_tile(x_ptr, norm_ptr, rows, row_ok, ks, k_ok, K, False, NORM)  # [BLOCK_M, BLOCK_K]
        if NORM:
            squares += x_squared
        if FP32:
            acc += tl.dot(w.to(tl.float32), tl.trans(x), input_precision="ieee")
        else:  # the input rounded to the weight's dtype, as cuBLAS takes it
            acc += tl.dot(w, tl.trans(x.to(w.dtype)))  # [BLOCK_N, BLOCK_M]
    if SPLIT == 1:
        store_rows(acc, squares, residual_ptr, out_ptr, eps, rows, cols, row_ok, col_ok, N, K, HAS_RESIDUAL, NORM)
    else:
        # [BLOCK_N, BLOCK_M] offsets of this tile's products in a split's partial; loads bypass L1 (.cg): other
        # programs wrote them, and an earlier launch's may be cached
        offsets = cols[:, None] * BLOCK_M + rows[None, :]
        tl.store(partial_ptr + part * N * BLOCK_M + offsets, acc, mask=col_ok[:, None])
        tl.debug_barrier()  # every thread's stores above happen before this program is counted
        done = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu")  # the tile's programs done before
        if done == SPLIT - 1:  # the last: the others' partials are in
            tl.atomic_xchg(counter_ptr + tile, 0, sem="relaxed", scope="gpu")  # ready for the next launch
            tl.debug_barrier()
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for other in tl.static_range(SPLIT):  # in split order, whichever program came last: the same bits
                total += tl.load(
                    partial_ptr + other * N * BLOCK_M + offsets, mask=col_ok[:, None], cache_modifier=".cg"
                )
            store_rows(total, squares, residual_ptr, out_ptr, eps, rows, cols, row_ok, col_ok, N, K, HAS_RESIDUAL, NORM)


@triton.jit
def store_rows(acc, squares, residual_ptr, out_ptr, eps, rows, cols, row_ok, col_ok, N: tl.constexpr, K: tl.constexpr,
               HAS_RESIDUAL: tl.constexpr, NORM: tl.constexpr):  # fmt: skip
    """Store the products acc [BLOCK_N, BLOCK_M] (transposed) as out's rows: times RMSNorm's factor, plus the
    residual, in out's dtype."""
    y = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
    ok = row_ok[:, None] & col_ok[None, :]
    if NORM:  # RMSNorm's per-row factor, applied to the products (quant_matmul_kernels.input_tile)
        y = y * rms_factor(squares, eps, K)
    if HAS_RESIDUAL:
        y += tl.load(residual_ptr + rows[:, None] * N + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)


# Stream-K (kernels.matmul_rows from STREAM_MIN_ROWS rows): (BLOCK_N, BLOCK_K, warps, stages, programs an SM) the
# autotuner tries. A program's shared memory is stages x (BLOCK_N + BLOCK_M) x BLOCK_K x 2 bytes: two programs an
# SM fit in 96 KB each, one in up to ~220 KB.
STREAM_TILES = [(64, 128, 4, 3, 2), (128, 64, 8, 4, 2), (64, 128, 4, 5, 1), (128, 128, 8, 3, 1)]
stream_configs = [
    triton.Config({"BLOCK_N": n, "BLOCK_K": k, "PER_SM": per_sm}, num_warps=w, num_stages=s)
    for n, k, w, s, per_sm in STREAM_TILES
]
if os.environ.get("TRITON_INTERPRET") == "1":
    stream_configs = [triton.Config({"BLOCK_N": 16, "BLOCK_K": 32, "PER_SM": 1}, num_warps=1)]
STREAM_MAX_BLOCK_N = 128  # the widest weight tile of stream_configs: kernels' scratch is sized for it
STREAM_MAX_PER_SM = 2


@triton.autotune(configs=stream_configs, key=["N", "K", "BLOCK_M", "FP32", "HAS_RESIDUAL", "SMS", "INTERPRETED"])
@triton.jit
def stream_matmul_kernel(
    x_ptr,  # [M, K], any float dtype
    w_ptr,  # float16 / bfloat16 (or float32) [N, K]
    residual_ptr,  # [M, N] (HAS_RESIDUAL)
    out_ptr,  # [M, N], any float dtype
    partial_ptr,  # float32 [2 x programs, BLOCK_N, BLOCK_M]: each program's partial tiles (transposed)
    counter_ptr,  # int32 zeros, one a weight tile (kernels._split_counters): the tile's programs done
    M,
    N: tl.constexpr,
    K: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    FP32: tl.constexpr,
    SMS: tl.constexpr,  # the GPU's SMs: the grid is min(SMS x PER_SM, every K step of every tile)
    INTERPRETED: tl.constexpr,  # under TRITON_INTERPRET=1
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PER_SM: tl.constexpr,
):
    """out = x @ w.T (+ residual), the work split evenly over a grid the size of the GPU (stream-K).

    Why: a weight of T tiles of BLOCK_N rows, each STEPS steps of BLOCK_K, is T x STEPS steps of work. With a
    program a tile, a 7B's q|k|v at 64 rows (192 tiles of 64) runs 1.45 waves on 132 SMs, so a third of the time
    half the SMs stream nothing. Here program p takes steps [p x total / programs, (p + 1) x total / programs):
    whole tiles are stored as they end; a tile cut between programs is stored by whichever of its programs
    finishes last, which adds the others' float32 partials in program order, so the same inputs give the same
    bits whatever order the programs finish in (the scheme of float_matmul_kernel's splits).
    """
    TILES: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    STEPS: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
    TOTAL: tl.constexpr = TILES * STEPS
    EVEN: tl.constexpr = N % BLOCK_N == 0 and K % BLOCK_K == 0
    program = tl.program_id(0)
    programs = tl.num_programs(0)  # <= TOTAL: every program has at least one step
    begin = program * TOTAL // programs
    end = (program + 1) * TOTAL // programs
    first_tile = begin // STEPS
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    offsets = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + rows[None, :]  # a partial tile [BLOCK_N, BLOCK_M]
    at = begin
    while at < end:
        tile = at // STEPS
        step_begin = at - tile * STEPS
        step_end = tl.minimum(STEPS, step_begin + end - at)
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns = weight rows
        col_ok = cols < N
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # the output's transpose
        if INTERPRETED:  # the interpreter cannot take a range of program-dependent bounds
            step = step_begin
            while step < step_end:
                acc = step_product(acc, x_ptr, w_ptr, rows, row_ok, cols, col_ok, step, K, EVEN, FP32, BLOCK_K)
                step += 1
        else:
            for step in range(step_begin, step_end):
                acc = step_product(acc, x_ptr, w_ptr, rows, row_ok, cols, col_ok, step, K, EVEN, FP32, BLOCK_K)
        if (step_begin == 0) & (step_end == STEPS):  # the whole tile
            store_rows(acc, acc, residual_ptr, out_ptr, 0.0, rows, cols, row_ok, col_ok, N, K, HAS_RESIDUAL, False)
        else:
            slot = 2 * program + (tile != first_tile).to(tl.int32)  # a program cuts at most its first and its last tile
            tl.store(partial_ptr + slot * BLOCK_N * BLOCK_M + offsets, acc)
            tl.debug_barrier()  # every thread's stores above happen before this program is counted
            # the tile's programs: the last whose range starts at or before its first and last step
            low = ((tile * STEPS + 1) * programs - 1) // TOTAL
            high = ((tile + 1) * STEPS * programs - 1) // TOTAL
            done = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if done == high - low:  # the last: the others' partials are in
                tl.atomic_xchg(counter_ptr + tile, 0, sem="relaxed", scope="gpu")  # ready for the next launch
                tl.debug_barrier()
                total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                other = low
                while other <= high:  # in program order, whichever came last: the same bits
                    other_slot = 2 * other + (tile != (other * TOTAL // programs) // STEPS).to(tl.int32)
                    total += tl.load(partial_ptr + other_slot * BLOCK_N * BLOCK_M + offsets, cache_modifier=".cg")
                    other += 1
                store_rows(
                    total, total, residual_ptr, out_ptr, 0.0, rows, cols, row_ok, col_ok, N, K, HAS_RESIDUAL, False
                )
        at += step_end - step_begin


@triton.jit
def step_product(acc, x_ptr, w_ptr, rows, row_ok, cols, col_ok, step, K: tl.constexpr, EVEN: tl.constexpr,
                 FP32: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """acc [BLOCK_N, BLOCK_M] plus the products of K step `step`: a weight tile by the rows' input tile."""
    ks = step * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    w_ptrs = w_ptr + cols[:, None] * K + ks[None, :]
    w = tl.load(w_ptrs) if EVEN else tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
    x, _ = input_tile(x_ptr, x_ptr, rows, row_ok, ks, k_ok, K, False, False)  # [BLOCK_M, BLOCK_K]
    if FP32:
        return acc + tl.dot(w.to(tl.float32), tl.trans(x), input_precision="ieee")
    return acc + tl.dot(w, tl.trans(x.to(w.dtype)))  # the input rounded to the weight's dtype, as cuBLAS takes it

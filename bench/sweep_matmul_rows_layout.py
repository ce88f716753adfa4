"""matmul_rows' 64-row products over weights stored as contiguous tiles (CUDA): does the layout bound them?

Why: at 64 rows a 7B step's products stream their 13.2 GB at ~3.3-3.6 TB/s where a device copy moves 4.3
(twenty-eighth session). matmul_kernels' programs read a [BLOCK_N, BLOCK_K] tile a K step: BLOCK_N runs of
BLOCK_K * 2 bytes, K * 2 bytes apart, so every step of every program opens BLOCK_N DRAM pages. Stored tile by
tile ([N / BLOCK_N, K / BLOCK_K, BLOCK_N, BLOCK_K], contiguous), a program's K step reads one run of
BLOCK_N * BLOCK_K * 2 bytes instead. Each line: µs a 7B product in CUDA graphs of back-to-back launches over
rotating weights (none in L2), for cuBLAS, matmul_kernels' kernel (its two tiles) and this script's kernel over
rows as stored and over tiles (no RMSNorm, no SiLU·up; the residual added to o and down).

    python bench/sweep_matmul_rows_layout.py --rows 64

Twenty-ninth session (bench/results/matmul_rows_layout_h200_session29.txt; down was not reached): stored as tiles,
q|k|v took 27.3 µs against 28.4 as rows (tiles of 128 x 128, 4 warps, 4 stages) and cuBLAS's 28.0, gate|up 48.5
against 50.4 and cuBLAS's 48.2, o 13.1 against 14.0: 3-7%, about what cuBLAS already streams. Not adopted: the
prefill's cuBLAS products need the weights as rows, so tiles would be a second copy of them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from sweep_matmul_rows_tma import Case, sweep, timed

from vicunaflow import kernels
from vicunaflow.matmul_kernels import store_rows, store_split

LAYOUT_TILES = [  # (BLOCK_N, BLOCK_K, warps, stages)
    (64, 128, 4, 5), (64, 128, 4, 4), (64, 256, 4, 3), (64, 256, 4, 4), (128, 128, 4, 4), (128, 128, 8, 3),
    (32, 256, 4, 5), (64, 64, 4, 8),
]  # fmt: skip


@triton.jit
def layout_matmul_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # TILED: [N / BLOCK_N, K / BLOCK_K, BLOCK_N, BLOCK_K] contiguous; else [N, K]
    residual_ptr,
    out_ptr,
    partial_ptr,
    counter_ptr,
    M,
    N: tl.constexpr,
    K: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    SPLIT: tl.constexpr,
    TILED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    part = tl.program_id(1)
    PART: tl.constexpr = K // SPLIT  # whole tiles a split (layout_launch refuses the rest)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    lanes = tl.arange(0, BLOCK_N)
    cols = tile * BLOCK_N + lanes
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for start in range(0, PART, BLOCK_K):
        k = part * PART + start
        if TILED:  # tile (tile, k / BLOCK_K): BLOCK_N * BLOCK_K elements in a row
            base = (tile * (K // BLOCK_K) + k // BLOCK_K) * (BLOCK_N * BLOCK_K)
            w = tl.load(w_ptr + base + lanes[:, None] * BLOCK_K + ks[None, :])
        else:
            w = tl.load(w_ptr + cols[:, None] * K + k + ks[None, :])  # [BLOCK_N, BLOCK_K]
        x = tl.load(x_ptr + rows[:, None] * K + k + ks[None, :], mask=row_ok[:, None], other=0.0)
        acc = tl.dot(w, tl.trans(x), acc)  # [BLOCK_N, BLOCK_M]
    if SPLIT > 1:
        store_split(acc, acc, partial_ptr, counter_ptr, residual_ptr, out_ptr, 0.0, rows, cols, row_ok, cols < N,
                    tile, part, N, K, HAS_RESIDUAL, False, SPLIT, BLOCK_M)  # fmt: skip
    else:
        store_rows(acc, acc, residual_ptr, out_ptr, 0.0, rows, cols, row_ok, cols < N, N, K, HAS_RESIDUAL, False)


def tiled(weight: torch.Tensor, block_n: int, block_k: int) -> torch.Tensor:
    """weight [N, K] as [N / block_n, K / block_k, block_n, block_k], contiguous."""
    n, k = weight.shape
    return weight.view(n // block_n, block_n, k // block_k, block_k).transpose(1, 2).contiguous()


def layout_launch(x, weight, residual, out, tile, splits, is_tiled):
    """One layout_matmul_kernel launch over weight [N, K], or its tiles [N / BLOCK_N, K / BLOCK_K, BLOCK_N, BLOCK_K]."""
    block_n, block_k, warps, stages = tile
    m = x.shape[0]
    n, k = (weight.shape[0] * weight.shape[2], weight.shape[1] * weight.shape[3]) if is_tiled else weight.shape
    if n % block_n or k % (block_k * splits):
        raise ValueError(f"tiles of {block_n} x {block_k} in {splits} splits do not divide {n} x {k}")
    block_m = max(16, 1 << (m - 1).bit_length())
    partial = counters = out
    if splits > 1:
        partial = torch.empty(splits, n, block_m, dtype=torch.float32, device=x.device)
        counters = kernels._split_counters(x.device)
    layout_matmul_kernel[(n // block_n, splits)](
        x, weight, residual if residual is not None else out, out, partial, counters, m, n, k,
        HAS_RESIDUAL=residual is not None, SPLIT=splits, TILED=is_tiled, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def layout_cells(case: Case) -> list[str]:
    """This script's kernel over each of LAYOUT_TILES and split, over the weights as rows and as tiles."""
    cells = []
    for tile in LAYOUT_TILES:
        tiles = [tiled(w, *tile[:2]) for w in case.weights]
        for s in case.splits:
            for is_tiled, weights in ((False, case.weights), (True, tiles)):
                cells.append(timed(
                    ("tiled " if is_tiled else "rows  ") + "x".join(map(str, tile)) + f"/{s}",
                    lambda w, o, t=tile, s=s, v=is_tiled: layout_launch(case.x, w, case.residual, o, t, s, v),
                    case.expected, weights, case.outs, case.launches,
                ))  # fmt: skip
        del tiles
    return cells


if __name__ == "__main__":
    sweep(__doc__, layout_cells, gated_shapes=False)

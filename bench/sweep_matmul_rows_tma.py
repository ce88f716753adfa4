"""matmul_rows' products at 64 rows with the tiles brought in by the Tensor Memory Accelerator (CUDA, Hopper).

Why: at 64 rows a 7B step's products stream 13.2 GB at ~3.4-3.6 TB/s (cuBLAS's head reaches ~4.0), and the
step runs at the H200's 700 W cap (twenty-sixth session). The kernel of matmul_kernels loads its tiles with
per-thread asynchronous copies; a TMA copy is one instruction a tile, which leaves the SMs less to do per byte.
Each line: µs a 7B product (o and down with the residual; gate|up with SiLU·up in the epilogue, as steps run
them) in CUDA graphs of back-to-back launches over rotating weights (none in L2), for cuBLAS, matmul_kernels'
kernel with its two tiles, and this script's TMA kernel over (BLOCK_N, BLOCK_K, warps, stages[, split]).

    python bench/sweep_matmul_rows_tma.py --rows 64 32

Twenty-seventh session (bench/results/matmul_rows_tma_h200_session27.txt): TMA won only where little was left, q|k|v
27.4 against cuBLAS's 28.1 µs and o 12.6 against 13.8, and lost gate|up with SiLU·up, 57-85 against 51.4 (two
half-height products a K step). The same kernel in matmul_rows (not kept) replayed a 64-row step in 6.77-6.79 against
6.44 ms (bench/results/chat_7b_h200_session27_tma_*.json).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import triton
import triton.language as tl
from sweep_matmul_rows import graph_time_us
from sweep_matmul_rows_tiles import SHAPES, launch, product_inputs, rotating_weights
from triton.tools.tensor_descriptor import TensorDescriptor

from vicunaflow import kernels, matmul_kernels
from vicunaflow.matmul_kernels import store_rows, store_split

TMA_TILES = [  # (BLOCK_N, BLOCK_K, warps, stages)
    (64, 128, 4, 4), (64, 128, 4, 6), (64, 256, 4, 3), (128, 128, 4, 3), (128, 128, 4, 4), (128, 128, 8, 4),
    (128, 64, 4, 6), (64, 64, 4, 8),
]  # fmt: skip


@triton.jit
def tma_matmul_kernel(
    x_desc,  # [M, K] tiles [BLOCK_M, BLOCK_K] (rows past M read as zeros)
    w_desc,  # [N, K] tiles [BLOCK_N, BLOCK_K], or [HALF, BLOCK_K] when GATED
    residual_ptr,
    out_ptr,
    partial_ptr,  # SPLIT > 1: float32 [SPLIT, N, BLOCK_M]
    counter_ptr,
    M,
    N: tl.constexpr,
    K: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    SPLIT: tl.constexpr,
    GATED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    part = tl.program_id(1)
    PART: tl.constexpr = ((K + BLOCK_K - 1) // BLOCK_K + SPLIT - 1) // SPLIT * BLOCK_K  # whole tiles a split
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    if GATED:
        HALF: tl.constexpr = BLOCK_N // 2
        gate = tl.zeros((HALF, BLOCK_M), dtype=tl.float32)
        up = tl.zeros((HALF, BLOCK_M), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            x = x_desc.load([0, k])  # [BLOCK_M, BLOCK_K]
            gate = tl.dot(w_desc.load([tile * HALF, k]), x.T, gate)  # [HALF, BLOCK_M]
            up = tl.dot(w_desc.load([N // 2 + tile * HALF, k]), x.T, up)
        g = gate.T.to(tl.float16).to(tl.float32)  # [BLOCK_M, HALF]
        u = up.T.to(tl.float16).to(tl.float32)
        outputs = tile * HALF + tl.arange(0, HALF)
        ok = row_ok[:, None] & (outputs < N // 2)[None, :]
        value = g * tl.sigmoid(g) * u
        tl.store(out_ptr + rows[:, None] * (N // 2) + outputs[None, :], value.to(tl.float16), mask=ok)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for start in range(0, PART, BLOCK_K):  # bounds known at compile time
            k = part * PART + start
            x = x_desc.load([0, k])
            acc = tl.dot(w_desc.load([tile * BLOCK_N, k]), x.T, acc)  # [BLOCK_N, BLOCK_M]
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        if SPLIT > 1:  # matmul_kernels' split epilogue (no RMSNorm: its squares unread)
            store_split(acc, acc, partial_ptr, counter_ptr, residual_ptr, out_ptr, 0.0, rows, cols, row_ok, cols < N,
                        tile, part, N, K, HAS_RESIDUAL, False, SPLIT, BLOCK_M)  # fmt: skip
        else:  # matmul_kernels' epilogue (no RMSNorm: its squares unread)
            store_rows(acc, acc, residual_ptr, out_ptr, 0.0, rows, cols, row_ok, cols < N, N, K, HAS_RESIDUAL, False)


def tma_launch(x, weight, residual, out, tile, splits=1, gated=False):
    """One tma_matmul_kernel launch with a fixed tile (as sweep_matmul_rows_tiles.launch, without PDL)."""
    block_n, block_k, warps, stages = tile
    m, (n, k) = x.shape[0], weight.shape
    block_m = max(16, 1 << (m - 1).bit_length())
    x_desc = TensorDescriptor.from_tensor(x, [block_m, block_k])
    w_desc = TensorDescriptor.from_tensor(weight, [block_n // 2 if gated else block_n, block_k])
    partial = counters = out
    if splits > 1:
        partial = torch.empty(splits, n, block_m, dtype=torch.float32, device=x.device)
        counters = kernels._split_counters(x.device)
    tiles = -(-(n // 2 if gated else n) // (block_n // 2 if gated else block_n))
    tma_matmul_kernel[(tiles, splits)](
        x_desc, w_desc, residual if residual is not None else out, out, partial, counters, m, n, k,
        HAS_RESIDUAL=residual is not None, SPLIT=splits, GATED=gated, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def timed(label, make, expected, weights, outs, launches) -> str:
    """'label µs' of a launch checked against `expected` first, or why it could not be timed."""
    try:
        got = make(weights[0], outs[0])
        error = (got.float() - expected.float()).abs().max().item()
        if error > 0.05:
            raise AssertionError(f"max error {error}")
        return f"{label} {graph_time_us(make, weights, outs, launches):6.1f}"
    except Exception as err:  # out of shared memory, or wrong
        return f"{label} failed ({type(err).__name__}: {str(err)[:60]})"


@dataclasses.dataclass
class Case:
    """One product shape at one row count, as sweep hands it to a script's own variants."""

    x: torch.Tensor
    residual: torch.Tensor | None
    weights: list[torch.Tensor]
    outs: list[torch.Tensor]
    expected: torch.Tensor
    splits: list[int]
    gated: bool
    launches: int


@torch.inference_mode()
def sweep(description: str, variant_cells, gated_shapes: bool = True) -> None:
    """The matmul_rows sweeps' driver: for each 7B product and row count, cuBLAS and matmul_kernels' two tiles, then
    variant_cells(case)'s lines. gated_shapes: gate|up with SiLU·up in its epilogue (else the plain product)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[64])
    parser.add_argument("--launches", type=int, default=24)
    parser.add_argument("--shapes", nargs="+", default=["qkv", "gate_up", "o", "down"])
    parser.add_argument("--splits", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    torch.manual_seed(0)
    for name, n, k in SHAPES:
        if name not in args.shapes:
            continue
        weights = rotating_weights(n, k)
        for m in args.rows:
            gated = gated_shapes and name == "gate_up"
            x, residual, outs, expected = product_inputs(weights[0], m, gated)
            case = Case(x, residual, weights, outs, expected, args.splits if n == 4096 else [1], gated, args.launches)
            cells = [f"bytes {n * k * 2 / 1e6:.1f} MB"]
            if not gated:
                cells.append(timed("cublas", lambda w, o, x=x, r=residual: kernels.cublas_product(x, w, r, o),
                                   expected, weights, outs, args.launches))  # fmt: skip
            for tile in matmul_kernels.MANY_ROWS_TILES:
                for s in case.splits:
                    cells.append(timed(
                        "ours " + "x".join(map(str, tile)) + f"/{s}",
                        lambda w, o, t=tile, x=x, r=residual, s=s, g=gated: launch(x, w, r, o, t, s, False, g),
                        expected, weights, outs, args.launches,
                    ))  # fmt: skip
            cells += variant_cells(case)
            print(f"{name:8} M={m:3}\n  " + "\n  ".join(cells), flush=True)
        del weights


def tma_cells(case: Case) -> list[str]:
    """This script's kernel over each of TMA_TILES and split."""
    return [
        timed(
            "tma " + "x".join(map(str, tile)) + f"/{s}",
            lambda w, o, t=tile, s=s: tma_launch(case.x, w, case.residual, o, t, s, case.gated),
            case.expected, case.weights, case.outs, case.launches,
        )
        for tile in TMA_TILES
        for s in case.splits
    ]  # fmt: skip


if __name__ == "__main__":
    sweep(__doc__, tma_cells)

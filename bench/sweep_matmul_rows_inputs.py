"""Where a batched decode step's RMSNorm goes, and whether o and down split over K (CUDA).

Times kernels.matmul_rows on a 7B's shapes in CUDA graphs of back-to-back launches over rotating weights
(sweep_matmul_rows.graph_time_us): q|k|v and gate|up with RMSNorm folded into every program's input tile,
normalised first by kernels.rows_input, plain, and plain split over K in two; o and down (with the
residual) split over K in 1-4 parts, against cuBLAS's addmm. Each line is µs a product. With --splits, every
shape and the output head, plain input (as the products take it from NORM_FIRST_ROWS rows), split in 1-4.

    python bench/sweep_matmul_rows_inputs.py --rows 8 16 32 64 > bench/results/matmul_rows_norm_split.txt
"""

from __future__ import annotations

import argparse

import torch
from sweep_matmul_rows import graph_time_us

from vicunaflow import kernels

SHAPES = [("qkv", 12288, 4096), ("gate_up", 22016, 4096), ("o", 4096, 4096), ("down", 4096, 11008)]
NORM_FIRST_ROWS = kernels.NORM_FIRST_ROWS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--launches", type=int, default=24)
    parser.add_argument("--splits", action="store_true", help="every shape and the head: splits over K 1-4")
    args = parser.parse_args()
    torch.manual_seed(0)
    for name, n, k in SHAPES + ([("head", 32000, 4096)] if args.splits else []):
        copies = max(2, -(-256 * 2**20 // (n * k * 2)))  # none still in L2
        weights = [torch.randn(n, k, device="cuda", dtype=torch.float16) / k**0.5 for _ in range(copies)]
        for m in args.rows:
            line = splits_line(m, weights, args.launches) if args.splits else measure(name, m, weights, args.launches)
            print(f"{name:8} M={m:3} {line}", flush=True)
        del weights


def measure(name: str, m: int, weights: list[torch.Tensor], launches: int) -> str:
    """One line of µs a product for `m` rows on this shape's weights."""
    n, k = weights[0].shape
    dtype = weights[0].dtype
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    outs = [torch.empty(m, n, device="cuda", dtype=dtype) for _ in range(2)]
    if name in ("qkv", "gate_up"):
        norm = torch.rand(k, device="cuda", dtype=dtype) + 0.5
        products = {
            "norm folded": lambda w, o: kernels.matmul_rows(x, w, out=o, norm=norm, k_splits=1),
            "norm first": lambda w, o: kernels.matmul_rows(kernels.rows_input(x, norm=norm, dtype=dtype), w, out=o),
            "plain": lambda w, o: kernels.matmul_rows(x, w, out=o, k_splits=1),
            "plain split2": lambda w, o: kernels.matmul_rows(x, w, out=o, k_splits=2),
        }
    else:
        residual = torch.randn(m, n, device="cuda", dtype=dtype)
        products = {
            f"splits {splits}:": lambda w, o, s=splits: kernels.matmul_rows(x, w, residual, out=o, k_splits=s)
            for splits in (1, 2, 3, 4)
        }
        products["cuBLAS addmm"] = lambda w, o: torch.addmm(residual, x, w.t(), out=o)
    times = {}
    for label, product in products.items():
        # "norm folded" keeps RMSNorm in the tiles at any rows (matmul_rows normalises first from NORM_FIRST_ROWS)
        kernels.NORM_FIRST_ROWS = kernels.MATMUL_MAX_ROWS + 1 if label == "norm folded" else NORM_FIRST_ROWS
        times[label] = graph_time_us(product, weights, outs, launches)
    kernels.NORM_FIRST_ROWS = NORM_FIRST_ROWS
    return "  ".join(f"{label} {us:6.1f}" for label, us in times.items()) + " us"


def splits_line(m: int, weights: list[torch.Tensor], launches: int) -> str:
    """µs a product for `m` rows split over K in 1-4 parts (a residual for the square and down shapes)."""
    n, k = weights[0].shape
    dtype = weights[0].dtype
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    outs = [torch.empty(m, n, device="cuda", dtype=dtype) for _ in range(2)]
    residual = torch.randn(m, n, device="cuda", dtype=dtype) if n == 4096 else None
    times = {
        splits: graph_time_us(
            lambda w, o, s=splits: kernels.matmul_rows(x, w, residual, out=o, k_splits=s), weights, outs, launches
        )
        for splits in (1, 2, 3, 4)
    }
    return "  ".join(f"split {splits}: {us:6.1f}" for splits, us in times.items()) + " us"


if __name__ == "__main__":
    main()

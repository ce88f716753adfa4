"""matmul_rows' own kernel over tiles beyond its two autotuned ones, at the rows of batched decode steps (CUDA).

Why: matmul_kernels.MANY_ROWS_TILES were chosen at 32 rows and below; at 64 rows every program also reads the
[64, K] input from L2 once per weight tile (for gate|up as many bytes as the weight itself), which wider weight
tiles halve. (Seventeenth session: 128 x 64 tiles took the 7B gate|up from 50.5 to 46.9 µs here at 64 rows, but
offered to the autotuner beside the two, gate|up took 49.9 µs inside a 64-row step, as without them, and q|k|v
31.4 against 28.3 the call before (31.1 here with those tiles, 32.5 with 5 stages): not kept;
bench/results/matmul_rows_tiles_h200.txt.) Each line: µs a 7B product (plain input; o and down with the residual, as the engine runs them),
float_matmul_kernel launched with one fixed (BLOCK_N, BLOCK_K, warps, stages), timed as sweep_matmul_rows
times (CUDA-graph replays over rotating weights, none in L2), checked against cuBLAS first.

    python bench/sweep_matmul_rows_tiles.py --rows 32 64 > bench/results/matmul_rows_tiles_h200.txt
    python bench/sweep_matmul_rows_tiles.py --rows 64 --pdl --shapes o down --splits 1 2 3 4 8 --tiles 64,128,4,5 ...
    python bench/sweep_matmul_rows_tiles.py --rows 64 --pdl --cublas --shapes qkv gate_up head --tiles 64,128,4,5 ...
    python bench/sweep_matmul_rows_tiles.py --rows 64 32 --pdl --cublas --gated --shapes gate_up --tiles 64,128,4,5 ...

--splits times each tile split over K (kernels.k_splits_for), --pdl launches as the engine's steps do (programmatic
dependent launch, the first weight lines prefetched), --cublas adds kernels.cublas_product beside them, --gated
times gate|up with SiLU·up in its epilogue, as 2-64-row steps run it (with --cublas: cuBLAS, then the SiLU·up launch).
"""

from __future__ import annotations

import argparse

import torch
from sweep_matmul_rows import graph_time_us

from vicunaflow import kernels, matmul_kernels

SHAPES = [
    ("qkv", 12288, 4096),
    ("gate_up", 22016, 4096),
    ("o", 4096, 4096),
    ("down", 4096, 11008),
    ("head", 32000, 4096),
]
TILES = [  # (BLOCK_N, BLOCK_K, warps, stages); the first two are MANY_ROWS_TILES
    (64, 128, 4, 5), (64, 128, 4, 3), (64, 64, 4, 6), (64, 64, 4, 4), (128, 64, 4, 4), (128, 64, 8, 4),
    (128, 128, 8, 3), (128, 128, 8, 4), (64, 128, 8, 4), (64, 256, 4, 3), (32, 128, 4, 5), (32, 256, 4, 4),
    (128, 64, 4, 6), (64, 64, 4, 8),
]  # fmt: skip


def launch(x, weight, residual, out, tile, splits=1, pdl=False, gated=False):
    """One float_matmul_kernel launch with a fixed tile, split `splits` ways over K, PDL as the engine's steps;
    gated: gate|up's SiLU·up in the epilogue (out [M, N / 2])."""
    block_n, block_k, warps, stages = tile
    m, (n, k) = x.shape[0], weight.shape
    block_m = max(16, 1 << (m - 1).bit_length())
    partial = counters = out
    if splits > 1:
        partial = torch.empty(splits, n, block_m, dtype=torch.float32, device=x.device)
        counters = kernels._split_counters(x.device)
    options = {"PDL": True, "PREFETCH": True, "launch_pdl": True} if pdl else {}
    matmul_kernels.float_matmul_kernel.fn[(-(-n // block_n), splits)](
        x, weight, residual if residual is not None else out, out, x, partial, counters, 1e-6, m, n, k,
        HAS_RESIDUAL=residual is not None, NORM=False, FP32=False, SPLIT=splits, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages, GATED=gated, **options,
    )  # fmt: skip
    return out


def rotating_weights(n: int, k: int) -> list[torch.Tensor]:
    """Copies of a random float16 [n, k] weight, enough that the one a launch reads is no longer in L2."""
    copies = max(2, -(-256 * 2**20 // (n * k * 2)))
    return [torch.randn(n, k, device="cuda", dtype=torch.float16) / k**0.5 for _ in range(copies)]


def product_inputs(weight: torch.Tensor, m: int, gated: bool):
    """A product's random input [m, K], its residual (o and down: N = 4096) or None, two outputs to take in turn, and
    the expected result (cuBLAS; SiLU·up of its halves in float32 when gated)."""
    n, k = weight.shape
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    residual = torch.randn(m, n, device="cuda", dtype=torch.float16) if n == 4096 else None
    outs = [torch.empty(m, n // 2 if gated else n, device="cuda", dtype=torch.float16) for _ in range(2)]
    expected = torch.mm(x, weight.t()) + (residual if residual is not None else 0)
    if gated:
        gate, up = expected.float().chunk(2, dim=1)
        expected = torch.nn.functional.silu(gate) * up
    return x, residual, outs, expected


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--launches", type=int, default=24)
    parser.add_argument("--shapes", nargs="+", choices=[name for name, _, _ in SHAPES], help="default: all of them")
    parser.add_argument("--tiles", nargs="+", help="BLOCK_N,BLOCK_K,warps,stages each (default: TILES)")
    parser.add_argument("--splits", type=int, nargs="+", default=[1], help="programs a weight tile over K")
    parser.add_argument("--pdl", action="store_true", help="launched with PDL and the L2 prefetch, as in steps")
    parser.add_argument("--cublas", action="store_true", help="cuBLAS too, as kernels.cublas_product")
    parser.add_argument(
        "--gated", action="store_true", help="gate|up with SiLU·up in its epilogue (--cublas: then SiLU·up)"
    )
    args = parser.parse_args()
    tiles = [tuple(int(v) for v in t.split(",")) for t in args.tiles] if args.tiles else TILES
    torch.manual_seed(0)
    for name, n, k in SHAPES:
        if args.shapes and name not in args.shapes:
            continue
        weights = rotating_weights(n, k)
        for m in args.rows:
            gated = args.gated and name == "gate_up"
            x, residual, outs, expected = product_inputs(weights[0], m, gated)
            cells = []
            if args.cublas:
                product = lambda w, o, x=x, r=residual: kernels.cublas_product(x, w, r, o)  # noqa: E731
                if gated:  # the product, then SiLU·up in one launch (matmul_rows above GATED_ROWS_MAX)
                    wide = torch.empty(m, n, device="cuda", dtype=torch.float16)
                    product = lambda w, o, x=x, wide=wide: kernels.rows_input(  # noqa: E731 (o unused: a new one)
                        kernels.cublas_product(x, w, None, wide), swiglu=True, dtype=w.dtype
                    )
                us = graph_time_us(product, weights, outs, args.launches)
                cells.append(f"cublas {us:6.1f}")
            for tile in tiles:
                for splits in args.splits:
                    label = "x".join(map(str, tile)) + (f"/{splits}" if splits > 1 else "")
                    try:
                        got = launch(x, weights[0], residual, outs[0], tile, splits, args.pdl, gated)
                        error = (got.float() - expected.float()).abs().max().item()
                        if error > 0.05:
                            raise AssertionError(f"max error {error}")
                        us = graph_time_us(
                            lambda w, o, t=tile, x=x, r=residual, s=splits, g=gated: launch(
                                x, w, r, o, t, s, args.pdl, g
                            ),
                            weights, outs, args.launches,
                        )  # fmt: skip
                        cells.append(f"{label} {us:6.1f}")
                    except Exception as err:  # out of shared memory, or wrong
                        cells.append(f"{label} failed ({type(err).__name__})")
            print(f"{name:8} M={m:3}  " + "  ".join(cells), flush=True)
        del weights


if __name__ == "__main__":
    main()

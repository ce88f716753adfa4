"""Time qmatvec_columns' tiles where they run: in a CUDA graph of one product per layer, with PDL.

Why: the autotuner times each tile alone, L2 flushed. In the decode step's graph the products follow
each other with programmatic dependent launch, and the tile it picked that way landed anywhere from 332
to 447 tokens/s (7B, H200, docs/benchmarks.md "int4, ninth session"). This sweep captures, per 7B product
and per tile, a graph of `--layers` launches on distinct weights (the step's products with their
epilogues: RMSNorm into q|k|v and gate|up, SiLU·up into down, the residual into o and down), and times
its replays (the best of 5); tinygemm (Int4Packed) and the float16 matvec run the same graph for scale. Needs a CUDA GPU:

    PYTHONPATH=src python bench/sweep_int4_columns.py bench/results/int4_columns_sweep_h200.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
from bench_chat import decode_products
from sweep_matmul_rows import graph_time_us

from vicunaflow import kernels, quant, quant_kernels
from vicunaflow.formats import ffn_hidden_dim
from vicunaflow.sizes import get_size

# (BLOCK_N, BLOCK_W, warps): 4, 8 or 16 words a thread
TILES = [(32, 16, 2), (64, 16, 2), (64, 16, 4), (32, 32, 4), (128, 16, 4), (64, 32, 4), (64, 32, 8), (128, 32, 8)]
SPLIT_ROWS = [64, 128, 256]


@torch.inference_mode()
def sweep_product(n: int, k: int, swiglu: bool, has_residual: bool, layers: int, tiles=TILES) -> dict:
    """One product's graph time per launch: every columns tile, tinygemm, the float16 matvec."""
    weights = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for _ in range(layers)]
    stored = [quant.quantize(w, 4, 128) for w in weights]
    columns = [quant.int4columns(qw) for qw in stored]
    packed = [quant.int4pack(qw) for qw in stored]
    x = torch.randn(1, 2 * k if swiglu else k, device="cuda", dtype=torch.float16)
    norm = None if swiglu or has_residual else torch.rand(k, device="cuda", dtype=torch.float16) + 0.5
    residual = torch.randn(1, n, device="cuda", dtype=torch.float16) if has_residual else None
    outs = [torch.empty(1, n, device="cuda", dtype=torch.float16) for _ in range(layers)]

    def timed(product, layer_weights, **options) -> float:
        """µs a launch of product in a graph of one launch per layer."""
        launch = lambda w, out: product(x, w, residual, swiglu, out=out, norm=norm, **options)  # noqa: E731
        return graph_time_us(launch, layer_weights, outs, layers)

    # the first layer's product through the dequantized weight in float32 (qlinear's plain path)
    reference = quant.qlinear(
        x.float(), stored[0], None if residual is None else residual.float(), swiglu, matvec=False,
        norm=None if norm is None else norm.float(),
    )  # fmt: skip
    scale = float(reference.abs().max())
    row = {"n": n, "k": k, "int4_mb": columns[0].nbytes / 1e6, "tiles": {}}
    row["float16_us"] = timed(kernels.matvec, weights)
    row["tinygemm_us"] = timed(quant.qlinear, packed)
    row["configured_us"] = timed(quant_kernels.qmatvec_columns, columns)
    row["configured"] = str(quant_kernels.column_tile(n, k, has_residual, x.device))
    for (block_n, block_w, warps), split_rows in itertools.product(tiles, SPLIT_ROWS):
        tile = quant_kernels.ColumnTile(block_n, block_w, split_rows, warps)
        name = f"{block_n}x{block_w}/{split_rows} w{warps}"
        row["tiles"][name] = timed(quant_kernels.qmatvec_columns, columns, tile=tile)
        error = float((outs[0].float() - reference).abs().max()) / scale
        row["columns_error"] = max(row.get("columns_error", 0.0), error)
    best = min(row["tiles"], key=row["tiles"].get)
    row["best"], row["best_us"] = best, row["tiles"][best]
    row["best_tb_s"] = columns[0].nbytes / row["best_us"] / 1e6
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", nargs="?")
    parser.add_argument("--size", default="7b")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument(
        "--tiles", nargs="+", metavar="NxWwK", help="only these (BLOCK_N x BLOCK_W, warps), e.g. 64x16w2"
    )
    args = parser.parse_args()
    tiles = TILES
    if args.tiles:
        tiles = [tuple(int(v) for v in tile.replace("w", "x").split("x")) for tile in args.tiles]
    if not torch.cuda.is_available():
        raise SystemExit("sweep_int4_columns needs a GPU")
    torch.manual_seed(0)
    size = get_size(args.size)
    results = {"device": torch.cuda.get_device_name(), "size": args.size, "layers": args.layers, "products": {}}
    results["column_math"] = quant_kernels.COLUMN_MATH
    for name, n, k, swiglu, has_residual in decode_products(size.dim, ffn_hidden_dim(size.dim, size.multiple_of), 1)[
        :4
    ]:
        started = time.perf_counter()
        row = sweep_product(n, k, swiglu, has_residual, args.layers, tiles)
        row["seconds"] = time.perf_counter() - started
        results["products"][name] = row
        ranked = sorted(row["tiles"].items(), key=lambda item: item[1])[:5]
        print(name, {key: value for key, value in row.items() if key != "tiles"}, flush=True)
        print("   best:", [(tile, round(us, 2)) for tile, us in ranked], flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

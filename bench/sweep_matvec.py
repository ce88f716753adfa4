"""Time every tile shape, warp count and pipeline depth of `kernels.matvec` on a LLaMA size's decode products.

Why: the autotuner only tries a short list (`kernels.TILES`); this shows how far that list is from the
best tile and whether deeper pipelining (num_stages) or other tiles would close the gap to the memory
bandwidth. Each kernel is timed alone with `triton.testing.do_bench` (L2 flushed between runs), next to
the torch ops it replaces (bench_chat.product_inputs). Needs a CUDA GPU; writes results/matvec_sweep.json.

--graph LAYERS times kernels.TILES where they run instead: `kernels.matvec` pinned to each tile (PDL as
the engine launches it, RMSNorm into q|k|v, gate|up and lm_head) in a CUDA graph of one launch per layer
on LAYERS distinct weights, next to the autotuner's own pick in the same graph. Why: the autotuner times
tiles alone, and for the int4 columns kernel its picks ran 7% slower in the step's graph than the best
single tile (docs/benchmarks.md, int4, tenth session).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
from pathlib import Path

import torch
from bench_chat import decode_products, product_inputs
from triton.testing import do_bench

from vicunaflow import kernels
from vicunaflow.formats import ffn_hidden_dim
from vicunaflow.sizes import get_size

HERE = Path(__file__).resolve().parent
TILES = [  # (BLOCK_N, BLOCK_K, warps): kernels.TILES and their neighbours
    (1, 2048, 4), (2, 1024, 4), (2, 2048, 8), (4, 512, 4), (4, 1024, 4), (4, 1024, 8), (4, 2048, 8),
    (8, 256, 4), (8, 512, 4), (8, 1024, 8), (16, 256, 4), (16, 512, 8), (32, 256, 8),
]  # fmt: skip
STAGES = [1, 2, 3, 4]


@torch.inference_mode()
def sweep_product(n: int, k: int, swiglu: bool, has_residual: bool) -> dict:
    x, weight, residual, cublas = product_inputs(n, k, swiglu, has_residual, torch.float16)
    out = torch.empty(1, n, device="cuda", dtype=torch.float16)
    norm = not (swiglu or has_residual)  # q|k|v, gate|up, lm_head: the engine folds RMSNorm into them
    norm_weight = torch.ones(k, device="cuda", dtype=torch.float16)
    kernel = kernels._kernels().fn  # the plain kernel under the autotuner
    rows = []
    for (block_n, block_k, warps), stages in itertools.product(TILES, STAGES):
        launch = functools.partial(
            kernel[(-(-n // block_n),)], x, weight, residual if residual is not None else out, out, norm_weight, 1e-6,
            n, k, SWIGLU=swiglu, HAS_RESIDUAL=has_residual, NORM=norm, PDL=False, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip
        microseconds = do_bench(launch, warmup=10, rep=40) * 1e3
        rows.append({"block_n": block_n, "block_k": block_k, "warps": warps, "stages": stages, "us": microseconds})
    rows.sort(key=lambda row: row["us"])
    gigabytes = n * k * 2 / 1e9
    return {
        "cublas_us": do_bench(cublas) * 1e3,
        "best": rows[0] | {"tb_per_s": gigabytes / rows[0]["us"] * 1e3},
        "best_per_stages": {stages: min(r["us"] for r in rows if r["stages"] == stages) for stages in STAGES},
        "autotune_list_best_us": min(
            r["us"] for r in rows if (r["block_n"], r["block_k"], r["warps"]) in kernels.TILES
        ),
        "all": rows,
    }


@torch.inference_mode()
def graph_sweep(n: int, k: int, swiglu: bool, has_residual: bool, layers: int) -> dict:
    """µs a launch of kernels.matvec in a CUDA graph over `layers` weights: each of kernels.TILES, and autotuned."""
    import triton
    from sweep_matmul_rows import graph_time_us

    x, _, residual, _ = product_inputs(n, k, swiglu, has_residual, torch.float16)
    weights = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for _ in range(layers)]
    outs = [torch.empty(1, n, device="cuda", dtype=torch.float16) for _ in range(layers)]
    norm = None if swiglu or has_residual else torch.rand(k, device="cuda", dtype=torch.float16) + 0.5
    launch = lambda w, out: kernels.matvec(x, w, residual, swiglu, out=out, norm=norm)  # noqa: E731
    tuner = kernels._kernels()
    autotuned = tuner.configs
    result = {"autotuned_us": graph_time_us(launch, weights, outs, layers)}
    result["autotuned"] = str(tuner.best_config)
    for block_n, block_k, warps in kernels.TILES:
        tuner.configs = [triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps)]
        result[f"{block_n}x{block_k} w{warps}"] = graph_time_us(launch, weights, outs, layers)
    tuner.configs = autotuned
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="7b", help="model shape from vicunaflow.sizes (7b, 13b, ...)")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "matvec_sweep.json")
    parser.add_argument("--graph", type=int, metavar="LAYERS", help="time kernels.TILES in a CUDA graph instead")
    args = parser.parse_args()
    size = get_size(args.size)
    results = {"gpu": torch.cuda.get_device_name(), "size": size.name, "products": {}}
    for name, n, k, swiglu, has_residual in decode_products(
        size.dim, ffn_hidden_dim(size.dim, size.multiple_of), size.vocab_size
    ):
        if args.graph:
            result = results["products"][f"{name} [{n} x {k}]"] = graph_sweep(n, k, swiglu, has_residual, args.graph)
            print(name, {key: round(v, 2) if isinstance(v, float) else v for key, v in result.items()}, flush=True)
            continue
        result = results["products"][f"{name} [{n} x {k}]"] = sweep_product(n, k, swiglu, has_residual)
        print(
            f"{name:>31}: torch {result['cublas_us']:.1f} us, autotune list {result['autotune_list_best_us']:.1f} us,"
            f" best {result['best']['us']:.1f} us ({result['best']['tb_per_s']:.2f} TB/s) {result['best']},"
            f" best per stages { ({s: round(us, 1) for s, us in result['best_per_stages'].items()}) }",
            flush=True,
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Sweep the paged decode-attention kernel's variants on a GPU, timed as a decode step runs it.

Each variant (tensor cores or CUDA cores for the scores and outputs, warps, pipeline stages, positions
per tile and per split: attention_kernels.Tiles) is launched 32 times in a CUDA graph, one launch a layer
over 8 layers' own KV pools (bigger than L2 from 8 rows up), and the graph replayed; a launch's time is
the replay's over 32. Scenarios are the serving bench's: rows whose lengths are spread over a
128-token prompt plus up to 256 reply tokens, in a graph bucket of a 2,048-position context (the table's
width), plus one row at position 300 (chat) and 32 rows of long contexts. Every variant's output is
checked against SDPA on the gathered keys and values before it is timed.

    python bench/sweep_attention.py --json bench/results/attention_variants_sweep_h200.json
    python bench/sweep_attention.py --quick        # the first variant and a few others only
    python bench/sweep_attention.py --context 512 --variants tensor-cores,4,2,64,64,256 cuda-cores,2,1,64,64,256
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_attention import add_layer_arguments

# (rows, shortest, longest length): the serving bench's 128-token prompts with 1-256 reply tokens so far
SCENARIOS = [(1, 301, 301), (8, 129, 384), (32, 129, 384), (64, 129, 384), (256, 129, 384), (32, 1024, 2048)]
LAYERS, LAUNCHES = 8, 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_arguments(parser)
    parser.add_argument("--context", type=int, default=2048, help="the graph bucket's context: the table's width")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--pool-blocks", type=int, default=0,
        help="blocks a layer's pool holds (default: just the rows' own); the rows' blocks are spread over all of them",
    )  # fmt: skip
    parser.add_argument(
        "--kv-dtype", default="float16", choices=["float16", "float8_e4m3fn"],
        help="the KV pools' dtype (the query stays float16): float8 halves the bytes a launch reads",
    )  # fmt: skip
    parser.add_argument(
        "--variants", nargs="+", metavar="CORES,WARPS,STAGES,TILE,SPLIT_FEW,SPLIT_MANY",
        help="only these, e.g. tensor-cores,4,2,128,128,1024 (default: the built-in grid)",
    )  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=420, help="stop starting new variants after this long")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sweep_attention needs a GPU")
    from vicunaflow import attention_kernels

    variants = (
        [parse_variant(text) for text in args.variants] if args.variants else list(candidate_variants(args.quick))
    )
    scenarios = [(rows, low, high) for rows, low, high in SCENARIOS if high <= args.context]
    data = {key: scenario(args, *key) for key in scenarios}
    started, results = time.perf_counter(), []
    for variant in variants:
        if time.perf_counter() - started > args.budget_s:
            print(f"budget spent: {len(results)} of {len(variants)} variants", flush=True)
            break
        configure(attention_kernels, variant)
        row = dict(variant)
        try:
            for rows, low, high in scenarios:
                key = f"{rows}x{low}-{high}"
                pools, query, tables, lengths, counters = data[(rows, low, high)]
                row[f"error_{key}"] = check(attention_kernels, args, pools[0], query, tables, lengths, counters)
                row[f"us_{key}"] = timed(attention_kernels, args, pools, query, tables, lengths, counters)
                item = getattr(torch, args.kv_dtype).itemsize
                read = int(lengths.sum()) * args.kv_heads * args.head_dim * 2 * item  # bytes of K and V a launch reads
                row[f"gb_s_{key}"] = round(read / row[f"us_{key}"] / 1e3)
        except Exception as err:  # a variant Triton cannot build (shared memory, registers)
            row["failed"] = f"{type(err).__name__}: {str(err)[:200]}"
        results.append(row)
        print(json.dumps(row), flush=True)
    for line in best_per_class(results):
        print(line, flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=1))


def best_per_class(results: list[dict]) -> list[str]:
    """How attention_kernels' tiles were chosen: per row class (steps of 1 and 8 rows, then the rest),
    the variant whose times, each over the first variant's, have the smallest mean."""
    rows = [row for row in results if "failed" not in row]
    if not rows:
        return ["no variant ran"]
    base = rows[0]
    columns = [key for key in base if key.startswith("us_")]
    lines = []
    for name, chosen in (
        (
            "FEW_ROWS (FEW_ROWS_GROUPED for grouped-query shapes)",
            [key for key in columns if key.startswith(("us_1x", "us_8x"))],
        ),
        (
            "MANY_ROWS_TILES",
            [key for key in columns if not key.startswith(("us_1x", "us_8x"))],
        ),
    ):
        if not chosen:
            continue
        best = min(rows, key=lambda row: sum(row[key] / base[key] for key in chosen))
        ratio = sum(best[key] / base[key] for key in chosen) / len(chosen)
        split = best["split_many" if name.startswith("MANY_ROWS") else "split_few"]
        cores = "tensor-cores" if best["dot"] else "cuda-cores"
        lines.append(
            f"{name}: {cores}, {best['warps']} warps, {best['stages']} stages, tiles of {best['tile']}, "
            f"splits of {split}: {ratio:.3f} x the first variant's time"
        )
    return lines


def candidate_variants(quick: bool):
    """The tiles of 0f81b4a first, then tensor-core variants (the best of a wider first sweep,
    bench/results/attention_variants_sweep1_h200.json, and the many-row tiles of the sixteenth session: tiles of
    64, splits of 512) and CUDA-core ones over warps, stages and tiles."""
    tiles = [(64, 64, 256), (32, 64, 128), (64, 128, 256), (128, 128, 512), (64, 64, 512)]
    yield {"dot": True, "warps": 4, "stages": 3, "tile": 64, "split_few": 64, "split_many": 256}
    for number, (dot, (warps, stages), (tile, few, many)) in enumerate(
        itertools.chain(
            itertools.product([True], [(4, 2), (8, 2)], tiles),
            itertools.product([False], [(2, 1), (4, 1), (4, 2), (8, 1), (8, 2)], tiles[:2] + tiles[3:4]),
        )
    ):
        if quick and number % 5:
            continue
        yield {"dot": dot, "warps": warps, "stages": stages, "tile": tile, "split_few": few, "split_many": many}


def parse_variant(text: str) -> dict:
    cores, *numbers = text.split(",")
    if cores not in ("tensor-cores", "cuda-cores") or len(numbers) != 5:
        raise SystemExit(f"--variants: {text!r} is not CORES,WARPS,STAGES,TILE,SPLIT_FEW,SPLIT_MANY")
    warps, stages, tile, few, many = map(int, numbers)
    return {
        "dot": cores == "tensor-cores", "warps": warps, "stages": stages, "tile": tile, "split_few": few,
        "split_many": many,
    }  # fmt: skip


def configure(attention_kernels, variant: dict) -> None:
    """The same tiles for every row class: the summary picks each class's best."""
    warps, stages = variant["warps"] or 4, variant["stages"] or 3  # None: Triton's defaults
    multi_head = "tensor-cores" if variant["dot"] else "cuda-cores"
    for name in attention_kernels.TILE_CLASSES:
        split = variant["split_many" if name.startswith("MANY_ROWS") else "split_few"]
        setattr(attention_kernels, name, attention_kernels.Tiles(split, variant["tile"], warps, stages, multi_head))


def scenario(args, rows: int, low: int, high: int):
    """LAYERS pools of keys and values, one query, block tables of the context's width, lengths."""
    H, Hkv, D, size = args.heads, args.kv_heads, args.head_dim, args.block_size
    width = args.context // size
    used = -(-high // size)  # blocks a row can reach
    blocks = max(rows * used + 1, args.pool_blocks)
    generator = torch.Generator(device="cuda").manual_seed(rows)
    kv_dtype = getattr(torch, args.kv_dtype)
    pools = [
        (
            torch.randn(blocks, Hkv, size, D, dtype=torch.float16, device="cuda", generator=generator).to(kv_dtype),
            torch.randn(blocks, Hkv, size, D, dtype=torch.float16, device="cuda", generator=generator).to(kv_dtype),
        )
        for _ in range(LAYERS)
    ]
    tables = torch.zeros(rows, width, dtype=torch.int32, device="cuda")  # past a row's blocks: block 0 (unread)
    tables[:, :used] = (torch.randperm(blocks - 1, device="cuda", generator=generator)[: rows * used] + 1).view(
        rows, used
    )
    lengths = torch.randint(low, high + 1, (rows,), device="cuda", generator=generator, dtype=torch.int32)
    query = torch.randn(rows, H, D, dtype=torch.float16, device="cuda", generator=generator)
    counters = torch.zeros(rows * Hkv, dtype=torch.int32, device="cuda")
    return pools, query, tables, lengths, counters


def check(attention_kernels, args, pool, query, tables, lengths, counters) -> float:
    """Max abs difference from SDPA (float32) over each row's gathered positions."""
    keys, values = pool
    got = attention_kernels._attention(query, counters, keys, values, tables, lengths, args.heads, None)
    got = got.view(query.shape).float()
    worst = 0.0
    for row in range(query.shape[0]):
        length = int(lengths[row])
        blocks = tables[row, : -(-length // args.block_size)].long()
        k = keys[blocks].permute(1, 0, 2, 3).reshape(args.kv_heads, -1, args.head_dim)[:, :length].float()
        v = values[blocks].permute(1, 0, 2, 3).reshape(args.kv_heads, -1, args.head_dim)[:, :length].float()
        expected = F.scaled_dot_product_attention(
            query[row].float()[:, None], k, v, enable_gqa=args.kv_heads != args.heads
        )[:, 0]
        worst = max(worst, (got[row] - expected).abs().max().item())
    if worst > 2e-2:
        raise AssertionError(f"max error {worst} against SDPA")
    return worst


def timed(attention_kernels, args, pools, query, tables, lengths, counters, replays: int = 20) -> float:
    """µs a launch: LAUNCHES launches over the LAYERS pools in one CUDA graph, replayed."""

    def step():
        for launch in range(LAUNCHES):
            keys, values = pools[launch % LAYERS]
            attention_kernels._attention(query, counters, keys, values, tables, lengths, args.heads, None)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # builds the kernel outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return round(start.elapsed_time(end) * 1000 / replays / LAUNCHES, 2)


if __name__ == "__main__":
    main()

"""Time the paged decode-attention kernel (vicunaflow.attention_kernels) on a GPU, one layer of a 7B.

Per (rows, context): the kernel reading each row's keys and values through a block table scattered over
the pool, SDPA on the same keys and values already contiguous (the static cache's old decode path,
no gather), and the gather + SDPA fallback the paged cache uses without the kernel. Also the bytes of
K and V the kernel must read, and the bandwidth that implies: a decode step's attention is bound by it.

    python bench/bench_attention.py                                   # 7B shapes, float16
    python bench/bench_attention.py --kv-heads 8 --heads 64           # a grouped-query layer (70B-like)
    python bench/bench_attention.py --split-tokens 512 --tile 32      # try other kernel tiles
    python bench/bench_attention.py --json results/attention_h200.json

All rows have the full `context` (the worst case); --mixed gives them lengths spread over 1..context.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_arguments(parser)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--split-tokens", type=int, help="override attention_kernels' split_tokens")
    parser.add_argument("--tile", type=int, help="override attention_kernels' tile")
    parser.add_argument("--mixed", action="store_true", help="row lengths spread over 1..context")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention needs a GPU")
    from vicunaflow import attention_kernels

    changes = {field: value for field, value in (("split_tokens", args.split_tokens), ("tile", args.tile)) if value}
    for name in attention_kernels.TILE_CLASSES:  # every row class's tiles
        setattr(attention_kernels, name, dataclasses.replace(getattr(attention_kernels, name), **changes))
    results = []
    for context in args.contexts:
        for rows in args.rows:
            row = measure(args, rows, context)
            results.append(row)
            print(
                f"rows {rows:4d} context {context:5d}: kernel {row['kernel_us']:8.1f} us "
                f"({row['kernel_gb_per_s']:6.0f} GB/s), SDPA contiguous {row['sdpa_contiguous_us']:8.1f} us, "
                f"gather+SDPA {row['gather_sdpa_us']:8.1f} us, max error {row['max_error_vs_sdpa']}"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=1))


def add_layer_arguments(parser: argparse.ArgumentParser) -> None:
    """One layer's attention shape and the cache's block size (a 7B's by default); sweep_attention.py too."""
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)


def measure(args, rows: int, context: int) -> dict:
    """One (rows, context) point: the kernel, contiguous SDPA and gather + SDPA on the same data."""
    from vicunaflow import attention_kernels

    dtype = getattr(torch, args.dtype)
    H, Hkv, D, size = args.heads, args.kv_heads, args.head_dim, args.block_size
    width = -(-context // size)
    blocks = rows * width + 1
    keys = torch.randn(blocks, Hkv, size, D, dtype=dtype, device="cuda")  # the pool, block 0 unused
    values = torch.randn_like(keys)
    tables = (torch.randperm(blocks - 1, device="cuda")[: rows * width] + 1).view(rows, width)
    if args.mixed:
        lengths = torch.randint(1, context + 1, (rows,), device="cuda")
    else:
        lengths = torch.full((rows,), context, device="cuda")
    query = torch.randn(rows, H, D, dtype=dtype, device="cuda")
    gqa = {"enable_gqa": True} if Hkv != H else {}
    q4 = query[:, :, None]  # [rows, H, 1, D]

    def gathered() -> tuple[torch.Tensor, torch.Tensor]:  # [rows, Hkv, context, D] each
        k = keys[tables].transpose(1, 2).reshape(rows, Hkv, width * size, D)[:, :, :context]
        v = values[tables].transpose(1, 2).reshape(rows, Hkv, width * size, D)[:, :, :context]
        return k, v

    contiguous_k, contiguous_v = gathered()
    kernel_s = timed(lambda: attention_kernels.paged_decode_attention(query, keys, values, tables, lengths))
    sdpa_s = timed(lambda: F.scaled_dot_product_attention(q4, contiguous_k, contiguous_v, **gqa))
    gather_s = timed(lambda: F.scaled_dot_product_attention(q4, *gathered(), **gqa))
    error = None
    if not args.mixed:
        got = attention_kernels.paged_decode_attention(query, keys, values, tables, lengths)
        expected = F.scaled_dot_product_attention(q4, contiguous_k, contiguous_v, **gqa)[:, :, 0]
        error = (got.float() - expected.float()).abs().max().item()
    read = int(lengths.sum()) * Hkv * D * keys.element_size() * 2  # bytes of K and V the kernel must read
    return {
        "rows": rows,
        "context": context,
        "kernel_us": kernel_s * 1e6,
        "kernel_gb_per_s": read / kernel_s / 1e9,
        "sdpa_contiguous_us": sdpa_s * 1e6,
        "gather_sdpa_us": gather_s * 1e6,
        "max_error_vs_sdpa": error,
    }


def timed(call, repeats: int = 50) -> float:
    """Seconds per call: median of CUDA-event timings after a few warm-up calls (compiles the kernel)."""
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


if __name__ == "__main__":
    main()

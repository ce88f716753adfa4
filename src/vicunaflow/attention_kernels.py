"""Triton decode attention over the paged KV cache: one query token per row, read through its block table.

Why: a decode step attends each row's query to that row's cached keys and values, which live in blocks
of `block_size` positions scattered over the cache (engine/cache.py). Gathering them into one tensor per
layer and calling SDPA would copy every row's whole history each step; this kernel reads the blocks in
place. It runs inside the engine's CUDA graphs: every shape is fixed by the graph's bucket (rows, the
table's width), the block tables and lengths are device tensors, and nothing waits for the host.

Flash-decoding: the grid is (rows, KV heads, splits of the context). Each program takes one KV head's
group of query heads (grouped-query attention reads each key once for the whole group), walks its
split's positions a tile at a time with an online softmax in float32, and writes a partial output with
its running max and sum; a second kernel combines a row's splits. Splits past a row's length exit at
once, so a short row in a long-context graph costs little. Tests run it through Triton's interpreter.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from vicunaflow import kernels

# Positions per program. For a few rows, one tile, so a row's splits run side by side instead of one program
# walking dependent tiles (7B on an H200, a row at position ~300: 268.6 tokens/s at 64 against 258.9 at 256,
# the split kernel 155 against 321 µs a step; 8 rows: 112 against 134 µs a layer at 2,048 positions). Many
# rows fill the GPU anyway and each program's fixed cost then counts: at 32 rows the engine decoded 4,608
# tokens/s with 256 against 4,356 with 64 (bench_chat, bench_attention; docs/benchmarks.md).
SPLIT_TOKENS = 64
SPLIT_TOKENS_MANY_ROWS = 256
MANY_ROWS = 9  # from this many rows a step takes SPLIT_TOKENS_MANY_ROWS
TILE = 64  # positions per inner step (a tile spans several blocks; each position finds its block)


def paged_decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    tables: torch.Tensor,
    lengths: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v of each row's query over its first lengths[b] cached positions.

    query: [B, H, D] (rows may be strided: a slice of q|k); keys, values: [blocks, Hkv, block_size, D],
    contiguous (H a multiple of Hkv); tables: [B, W] block ids, rows may be strided (position p of row b
    is in block tables[b, p // block_size]); lengths: [B], each >= 1 and <= W * block_size.
    Returns [B, H, D] in query's dtype, contiguous.
    """
    B, H, D = query.shape
    _, Hkv, block_size, _ = keys.shape
    if H % Hkv or keys.shape != values.shape or keys.shape[-1] != D or tables.shape[0] != B:
        raise ValueError(
            f"paged_decode_attention: query {tuple(query.shape)}, keys {tuple(keys.shape)}, "
            f"values {tuple(values.shape)}, tables {tuple(tables.shape)} do not fit"
        )
    if query.stride()[1:] != (D, 1) or tables.stride(1) != 1 or not (keys.is_contiguous() and values.is_contiguous()):
        raise ValueError(
            "paged_decode_attention: keys and values must be contiguous, query's heads and tables' rows too"
        )
    split_tokens = SPLIT_TOKENS if B < MANY_ROWS else SPLIT_TOKENS_MANY_ROWS
    if split_tokens % TILE:  # a split of part of a tile would read its neighbour's positions too
        raise ValueError(
            f"paged_decode_attention: a split of {split_tokens} positions is not a multiple of TILE {TILE}"
        )
    group = H // Hkv
    width = tables.shape[1]
    splits = -(-width * block_size // split_tokens)
    partial = torch.empty(B, H, splits, D, dtype=torch.float32, device=query.device)
    stats = torch.empty(B, H, splits, 2, dtype=torch.float32, device=query.device)  # running max, sum
    out = torch.empty(B, H, D, dtype=query.dtype, device=query.device)
    split_kernel, combine_kernel, _ = _kernels()
    pdl = kernels.pdl_options(query.device, rows=B)
    split_kernel[(B, Hkv, splits)](
        query, keys, values, tables, lengths, partial, stats,
        scale if scale is not None else 1.0 / math.sqrt(D), query.stride(0), tables.stride(0),
        H=H, HKV=Hkv, D=D, GROUP=group, GROUP_PAD=max(16, triton_next_power_of_2(group)),
        BLOCK_SIZE=block_size, SPLITS=splits, SPLIT_TOKENS=split_tokens, TILE=TILE,
        D_PAD=triton_next_power_of_2(D), FP32=query.dtype == torch.float32 or _interpreted_bfloat16(query), **pdl,
    )  # fmt: skip
    combine_kernel[(B, H)](
        partial, stats, lengths, out, H=H, D=D, SPLITS=splits, SPLITS_PAD=max(2, triton_next_power_of_2(splits)),
        SPLIT_TOKENS=split_tokens, D_PAD=triton_next_power_of_2(D), **pdl,
    )  # fmt: skip
    return out


def rope_store(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    tables: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    heads: int,
) -> None:
    """One token per row: rotate q and k inside qkv in place (LLaMA's half-split rotary) and store the
    rotated k and the v in the row's block at its position.

    Why: one launch a layer where the rotation matrices' batched matmul, the block lookups and the two
    indexed stores took six (a decode step is launch-bound: ~2-4 µs each, 32-80 layers).
    qkv: [B, (H + 2 Hkv) * D] contiguous (q heads, k heads, v heads); cos, sin: [B, D / 2] float32
    (each row's angles, computed once a step); positions [B] and tables [B, W] (rows may be strided);
    keys, values: [blocks, Hkv, block_size, D] contiguous. Rotation in float32, rounded once.
    """
    B = qkv.shape[0]
    _, kv_heads, block_size, D = keys.shape
    if qkv.shape[1] != (heads + 2 * kv_heads) * D or not qkv.is_contiguous() or cos.shape != (B, D // 2):
        raise ValueError(
            f"rope_store: q|k|v {tuple(qkv.shape)}, cos {tuple(cos.shape)} do not fit {heads} + 2 x {kv_heads} "
            f"heads of {D}"
        )
    if tables.stride(1) != 1 or not (keys.is_contiguous() and values.is_contiguous()):
        raise ValueError("rope_store: keys and values must be contiguous, tables' rows too")
    _kernels()[2][(B, heads + kv_heads)](
        qkv, cos.contiguous(), sin.contiguous(), positions, tables, keys, values, positions.stride(0), tables.stride(0),
        H=heads, HKV=kv_heads, D=D, HALF=D // 2, BLOCK_SIZE=block_size,
        HALF_PAD=triton_next_power_of_2(D // 2), D_PAD=triton_next_power_of_2(D), **kernels.pdl_options(qkv.device, rows=B),
    )  # fmt: skip


def _interpreted_bfloat16(query: torch.Tensor) -> bool:
    """Triton's interpreter multiplies bfloat16 tiles as raw integers (numpy has no bfloat16): upcast there."""
    return query.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def triton_next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.cache
def _kernels():
    """Compile lazily: importing this module must not need Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def split_kernel(
        q_ptr,  # [B, H, D], rows q_row_stride apart
        k_ptr,  # [blocks, HKV, BLOCK_SIZE, D]
        v_ptr,
        table_ptr,  # [B, width], rows table_row_stride apart
        length_ptr,  # [B]
        partial_ptr,  # [B, H, SPLITS, D] float32
        stats_ptr,  # [B, H, SPLITS, 2] float32: max, sum of exp
        scale,
        q_row_stride,
        table_row_stride,
        H: tl.constexpr,
        HKV: tl.constexpr,
        D: tl.constexpr,
        GROUP: tl.constexpr,  # query heads per KV head
        GROUP_PAD: tl.constexpr,  # >= 16: tl.dot's smallest tile
        BLOCK_SIZE: tl.constexpr,
        SPLITS: tl.constexpr,
        SPLIT_TOKENS: tl.constexpr,
        TILE: tl.constexpr,
        D_PAD: tl.constexpr,
        FP32: tl.constexpr,  # products in float32 (no TF32): a float32 cache, or bfloat16 in the interpreter
        PDL: tl.constexpr,  # programmatic dependent launch (kernels.PDL): every input comes from earlier kernels
    ):
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        length = tl.load(length_ptr + row)
        first = split * SPLIT_TOKENS
        if first < length:
            heads = kv_head * GROUP + tl.arange(0, GROUP_PAD)  # this KV head's query heads (padded)
            head_ok = tl.arange(0, GROUP_PAD) < GROUP
            dims = tl.arange(0, D_PAD)
            dim_ok = dims < D
            q = tl.load(
                q_ptr + row * q_row_stride + heads[:, None] * D + dims[None, :],
                mask=head_ok[:, None] & dim_ok[None, :],
                other=0.0,
            )  # [GROUP_PAD, D_PAD]
            running_max = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
            running_sum = tl.zeros((GROUP_PAD,), dtype=tl.float32)
            acc = tl.zeros((GROUP_PAD, D_PAD), dtype=tl.float32)
            for tile in range(0, SPLIT_TOKENS, TILE):
                positions = first + tile + tl.arange(0, TILE)
                valid = positions < length
                block = tl.load(table_ptr + row * table_row_stride + positions // BLOCK_SIZE, mask=valid, other=0)
                offsets = (
                    block.to(tl.int64)[:, None] * (HKV * BLOCK_SIZE * D)
                    + kv_head * BLOCK_SIZE * D
                    + (positions % BLOCK_SIZE)[:, None] * D
                    + dims[None, :]
                )  # [TILE, D_PAD]
                tile_mask = valid[:, None] & dim_ok[None, :]
                k = tl.load(k_ptr + offsets, mask=tile_mask, other=0.0)  # [TILE, D_PAD]
                if FP32:
                    scores = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
                else:
                    scores = tl.dot(q, tl.trans(k))  # [GROUP_PAD, TILE] float32
                scores = tl.where(valid[None, :], scores * scale, float("-inf"))
                new_max = tl.maximum(running_max, tl.max(scores, axis=1))
                rescale = tl.exp(running_max - new_max)
                p = tl.exp(scores - new_max[:, None])  # [GROUP_PAD, TILE]
                v = tl.load(v_ptr + offsets, mask=tile_mask, other=0.0)
                if FP32:
                    acc = acc * rescale[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
                else:
                    acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
                running_sum = running_sum * rescale + tl.sum(p, axis=1)
                running_max = new_max
            base = (row * H + heads) * SPLITS + split  # [GROUP_PAD]
            tl.store(partial_ptr + base[:, None] * D + dims[None, :], acc, mask=head_ok[:, None] & dim_ok[None, :])
            tl.store(stats_ptr + base * 2, running_max, mask=head_ok)
            tl.store(stats_ptr + base * 2 + 1, running_sum, mask=head_ok)

    @triton.jit
    def combine_kernel(
        partial_ptr,
        stats_ptr,
        length_ptr,
        out_ptr,  # [B, H, D]
        H: tl.constexpr,
        D: tl.constexpr,
        SPLITS: tl.constexpr,
        SPLITS_PAD: tl.constexpr,
        SPLIT_TOKENS: tl.constexpr,
        D_PAD: tl.constexpr,
        PDL: tl.constexpr,
    ):
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row, head = tl.program_id(0), tl.program_id(1)
        length = tl.load(length_ptr + row)
        splits = tl.arange(0, SPLITS_PAD)
        used = splits * SPLIT_TOKENS < length  # the splits whose programs ran
        base = (row * H + head) * SPLITS + splits
        maxima = tl.load(stats_ptr + base * 2, mask=used, other=float("-inf"))
        sums = tl.load(stats_ptr + base * 2 + 1, mask=used, other=0.0)
        top = tl.max(maxima, axis=0)
        weights = tl.where(used, tl.exp(maxima - top), 0.0)  # [SPLITS_PAD]
        dims = tl.arange(0, D_PAD)
        parts = tl.load(
            partial_ptr + base[:, None] * D + dims[None, :], mask=used[:, None] & (dims < D)[None, :], other=0.0
        )  # [SPLITS_PAD, D_PAD]
        total = tl.sum(parts * weights[:, None], axis=0) / tl.sum(sums * weights, axis=0)
        tl.store(out_ptr + (row * H + head) * D + dims, total.to(out_ptr.dtype.element_ty), mask=dims < D)

    @triton.jit
    def rope_store_kernel(
        qkv_ptr,  # [B, (H + 2 HKV) * D]
        cos_ptr,  # [B, HALF] float32
        sin_ptr,
        position_ptr,  # [B]
        table_ptr,  # [B, width], rows table_row_stride apart
        k_ptr,  # [blocks, HKV, BLOCK_SIZE, D]
        v_ptr,
        position_stride,
        table_row_stride,
        H: tl.constexpr,
        HKV: tl.constexpr,
        D: tl.constexpr,
        HALF: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        HALF_PAD: tl.constexpr,  # powers of two >= HALF, D (tl.arange's): head_dim need not be one
        D_PAD: tl.constexpr,
        PDL: tl.constexpr,
    ):
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row, head = tl.program_id(0), tl.program_id(1)  # head < H: a query head; else key head head - H
        WIDTH: tl.constexpr = (H + 2 * HKV) * D
        j = tl.arange(0, HALF_PAD)
        j_ok = j < HALF
        cos = tl.load(cos_ptr + row * HALF + j, mask=j_ok, other=0.0)
        sin = tl.load(sin_ptr + row * HALF + j, mask=j_ok, other=0.0)
        base = qkv_ptr + row * WIDTH + head * D
        first = tl.load(base + j, mask=j_ok, other=0.0).to(tl.float32)
        second = tl.load(base + HALF + j, mask=j_ok, other=0.0).to(tl.float32)
        out_first = (first * cos - second * sin).to(qkv_ptr.dtype.element_ty)
        out_second = (second * cos + first * sin).to(qkv_ptr.dtype.element_ty)
        if head < H:
            tl.store(base + j, out_first, mask=j_ok)
            tl.store(base + HALF + j, out_second, mask=j_ok)
        else:
            kv_head = head - H
            position = tl.load(position_ptr + row * position_stride)
            block = tl.load(table_ptr + row * table_row_stride + position // BLOCK_SIZE).to(tl.int64)
            slot = ((block * HKV + kv_head) * BLOCK_SIZE + position % BLOCK_SIZE) * D
            tl.store(k_ptr + slot + j, out_first, mask=j_ok)
            tl.store(k_ptr + slot + HALF + j, out_second, mask=j_ok)
            dims = tl.arange(0, D_PAD)
            dim_ok = dims < D
            v = tl.load(qkv_ptr + row * WIDTH + (H + HKV + kv_head) * D + dims, mask=dim_ok)
            tl.store(v_ptr + slot + dims, v, mask=dim_ok)

    return split_kernel, combine_kernel, rope_store_kernel

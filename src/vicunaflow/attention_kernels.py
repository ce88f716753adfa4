"""Triton decode attention over the paged KV cache: one query token per row, read through its block table.

Why: a decode step attends each row's query to that row's cached keys and values, which live in blocks
of `block_size` positions scattered over the cache (engine/cache.py). Gathering them into one tensor per
layer and calling SDPA would copy every row's whole history each step; this kernel reads the blocks in
place. It runs inside the engine's CUDA graphs: every shape is fixed by the graph's bucket (rows, the
table's width), the block tables and lengths are device tensors, and nothing waits for the host.

Flash-decoding: the grid is (rows, KV heads, splits of the context). Each program takes one KV head's
group of query heads (grouped-query attention reads each key once for the whole group), walks its
split's positions a tile at a time with an online softmax in float32, and writes a partial output with
its running max and sum; the last of a (row, KV head)'s programs to finish (a counter each, left at
zero for the next launch) combines the splits, in split order. A row within one split needs no combination:
its program writes the output itself (ATTENTION "fused", the default). Splits past a row's length exit at once,
so a short row in a long-context graph costs little. Tests run it through Triton's interpreter.

`decode_attention` is a decode step's attention: `rope_store` (rotary of q and k, the new key and value
into the row's block), then that kernel. Why the combination inside: a one-row step is a chain of small
kernels, each costing a few µs of launch, ramp-up and drain however little it does. The store stays a
kernel of its own, before any program reads: rows of one step may share a block table (a prompt's tokens
riding in a decode step as rows of their own, engine/scheduler.py), so one row's newest key can be
among another's positions. In batched steps the q|k|v product's epilogue does rope_store's work instead (`ROPE`
"product", the default: kernels.matmul_rows(rope=)), and decode_attention(stored=True) only attends. Where no row
shares a table, `ROPE = "attention"` (VICUNAFLOW_ROPE) moves the rotary and the store into the split kernel, a
launch a layer fewer, which grew the split kernel by what rope_store took (twenty-third session).
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch

from vicunaflow import kernels


@dataclasses.dataclass(frozen=True)
class Tiles:
    """How the split kernel walks a step's rows: positions per program (a split) and per inner step (a tile,
    spanning several blocks; each position finds its block), warps and pipeline stages of a program, and
    for multi-head models (one query head per KV head: LLaMA 7B/13B) whether the scores and outputs go
    through tensor cores ("tensor-cores": tl.dot, the one query padded to 16 rows, as grouped-query
    models always do) or CUDA cores ("cuda-cores": float32 products summed per tile, reduced once a split)."""

    split_tokens: int
    tile: int
    warps: int
    stages: int
    multi_head: str = "tensor-cores"

    def __post_init__(self):
        if self.multi_head not in ("tensor-cores", "cuda-cores"):
            raise ValueError(f"attention Tiles: multi_head {self.multi_head!r} is not tensor-cores or cuda-cores")


# Few rows: one tile a split, so a row's splits run side by side instead of one program walking dependent
# tiles (7B on an H200, a row at position ~300: 268.6 tokens/s at 64 against 258.9 at 256, the split
# kernel 155 against 321 µs a step; 8 rows: 112 against 134 µs a layer at 2,048 positions), on CUDA cores
# in 2 warps, 1 stage (a 7B layer at one row: 7.4 against 9.3 µs on tensor cores; 8 rows: 17.4 against
# 20.8). Many rows fill the GPU anyway and each program's fixed cost then counts: at 32 rows the engine
# decoded 4,608 tokens/s with splits of 256 against 4,356 with 64; two pipeline stages, not Triton's
# three, took a 256-row layer from 365 to 357 µs. Both against the tiles before (tensor cores, 4 warps, 3
# stages), same run: engine 272.5 / 1,760 / 4,774 / 6,906 / 10,382 tokens/s at 1 / 8 / 32 / 64 / 256
# rows against 267.8 / 1,723 / 4,572 / 6,564 / 9,584 (bench/sweep_attention.py, bench_chat;
# docs/benchmarks.md).
FEW_ROWS = Tiles(split_tokens=64, tile=64, warps=2, stages=1, multi_head="cuda-cores")
# Grouped-query layers in steps of few rows stay on tensor cores in 4 warps and 3 stages: 2 warps and 1
# stage took 9.7 / 12.5 against 9.4 / 12.1 µs at 1 / 8 rows (64 query heads on 8 KV heads, a 70B's layer).
# A 13B's multi-head layer kept the choices above: one row 8.4 against 10.0 µs, 256 rows 439 against 451.
FEW_ROWS_GROUPED = Tiles(split_tokens=64, tile=64, warps=4, stages=3)
# Many rows: splits of 512 positions in tiles of 32, 2 warps, 2 stages, each program walking only the tiles below
# its row's length (a row within one split writes its output, no partials to combine). Splits of 512 (tiles of 64,
# 4 warps) took a 7B layer at lengths 129-384 in 41.2 / 66.7 / 263.2 µs at 32 / 64 / 256 rows on a 512-wide grid,
# against 48.7 / 81.5 / 308.7 for the splits of 128 (tiles of 32, 2 warps) walked whole before; on a 2,048-wide grid
# 180.9 at 1-2K positions against 193.4 for splits of 256 walked whole (sixteenth session, H200,
# bench/sweep_attention.py's graphs of the kernel alone; attention_loop_to_length_h200.json). Walked whole, long
# splits lost: a short row's last split ran its masked tiles too. Tiles of 32 in 2 warps against tiles of 64 in 4
# warps, timed where 7B decode steps run them (bench_chat.py --profile-attention-tiles, seventeenth session, H200):
# with int32 step inputs (runner.STEP_INPUTS) 38.7 / 73.3 / 276.3 µs a layer inside 32 / 64 / 256-row steps against
# 39.8 / 70.7 / 278.6, steps replaying in 5.21 / 6.66 / 15.42 ms against 5.24 / 6.59 / 15.71
# (attention_in_steps_int32_7b_h200.json); with int64 ones 47.1 / 77.2 / 284.2 against 46.4 / 81.5 / 313.2
# (attention_in_steps_inputs_7b_h200.json), and through the API 5,291 / 7,944 / 12,316 tokens/s at 32 / 64 / 256
# streams against 5,279 / 7,689 / 12,053 (serve_7b_h200_session17_swiglu_shuffled*.json). Alone, sweep_attention had
# them 39.5 / 69.2 / 259.9 against 41.2 / 66.7 / 263.2, and 186.9 against 180.9 for 32 rows at 1-2K positions (not
# timed inside steps). Chosen on a 7B's multi-head layers: grouped-query layers, a 13B's layers and float8 caches
# take them untimed (the 13B line above was measured with the tiles before).
MANY_ROWS_TILES = Tiles(split_tokens=512, tile=32, warps=2, stages=2)
MANY_ROWS = 9  # from this many rows a step takes MANY_ROWS_TILES (MIDDLE_ROWS_TILES in MIDDLE_ROWS)
# Steps of 33-64 rows keep tiles of 64 in 4 warps: inside 7B 64-row steps on an H200 they took 70.8 against 73.5 µs
# a layer, the step replaying in 6.59 / 6.59 against 6.67 / 6.68 ms (alternated, twice; bench_chat.py
# --profile-attention-tiles, twenty-first session, chat_7b_h200_session21_rows64.json), as in the seventeenth
# session with int32 inputs (70.7 against 73.3).
MIDDLE_ROWS_TILES = Tiles(split_tokens=512, tile=64, warps=4, stages=2)
MIDDLE_ROWS = range(33, 65)
# the names benches and tests change
TILE_CLASSES = ("FEW_ROWS", "FEW_ROWS_GROUPED", "MIDDLE_ROWS_TILES", "MANY_ROWS_TILES")
# "fused": the attention kernel's last program of a (row, KV head) combines its splits (decode_attention: two
# kernels with rope_store); "split": a combine kernel of its own, three (bench_chat --attention times both).
ATTENTION = os.environ.get("VICUNAFLOW_ATTENTION", "fused")
# "length": a split's programs walk only the tiles below the row's length; "split": every tile of the split, those
# past the row masked (the same bits; what Triton's interpreter always does), to time the difference
ATTENTION_LOOP = os.environ.get("VICUNAFLOW_ATTENTION_LOOP", "length")
# Where a decode step rotates q and k and stores the new key and value: "product", in the q|k|v product's epilogue
# where that goes through kernels.matmul_rows (batched steps on float weights: engine.model.rope_in_product), else
# as "separate"; "separate", rope_store's kernel before the attention (any rows, also rows sharing a block table);
# "attention", inside the split kernel (a launch a layer fewer, for steps whose rows each have their own table:
# the engine refuses it with mixed prefill; it grew the split kernel by what rope_store took, twenty-third session).
ROPE = os.environ.get("VICUNAFLOW_ROPE", "product")


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
    if keys.shape[-1] != D:
        raise ValueError(f"paged_decode_attention: query {tuple(query.shape)} and keys {tuple(keys.shape)} do not fit")
    if query.stride()[1:] != (D, 1):
        raise ValueError("paged_decode_attention: query's heads must be contiguous")
    return _attention(query, None, keys, values, tables, lengths, H, scale).view(B, H, D)


def decode_attention(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    lengths: torch.Tensor,
    tables: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    heads: int,
    counters: torch.Tensor,
    scale: float | None = None,
    stored: bool = False,
) -> torch.Tensor:
    """A decode step's attention, one token per row: rotate q and k in place (LLaMA's half-split rotary),
    store the rotated k and the v in the row's block at its position, attend q over the row's positions.

    qkv: [B, (H + 2 Hkv) * D] contiguous (q heads, k heads, v heads); cos, sin: [B, D / 2] float32 (the
    rows' angles); positions: [B] (rows may be strided) with lengths = positions + 1; tables, keys, values
    as for paged_decode_attention; counters: int32, zeros, at least B * Hkv (the KV cache's `counters`),
    left at zero again. With ROPE "separate" every row's key is stored before any row attends, so rows may
    share a table, and q is rotated in place; with "attention" the split kernel rotates q in registers and the
    program of a row's newest position stores its key and value before reading: no row may read another's
    newest position. stored: the q|k|v product's epilogue did rope_store's work already (ROPE "product",
    kernels.matmul_rows(rope=)): q is rotated and every row's key and value are in the cache. Returns [B, H * D]
    in qkv's dtype.
    """
    B = qkv.shape[0]
    D = keys.shape[-1]
    if ROPE not in ("product", "separate", "attention"):
        raise ValueError(f"decode_attention: VICUNAFLOW_ROPE={ROPE!r}: choose product, separate or attention")
    query = qkv[:, : heads * D].view(B, heads, D)
    if stored:
        return _attention(query, counters, keys, values, tables, lengths, heads, scale)
    if ROPE == "attention":  # the kernel takes each row's position as lengths - 1
        return _attention(query, counters, keys, values, tables, lengths, heads, scale, rope=(cos, sin))
    rope_store(qkv, cos, sin, positions, tables, keys, values, heads)
    return _attention(query, counters, keys, values, tables, lengths, heads, scale)


def _attention(query, counters, keys, values, tables, lengths, heads, scale, rope=None) -> torch.Tensor:
    """Launch the split kernel (and, with ATTENTION "split", the combine kernel): [B, H * D]. counters:
    see decode_attention; None: new ones (outside CUDA graphs). rope: (cos, sin) [B, D / 2] float32: query is
    q|k|v's q, rotated in the kernel, which also stores each row's new key and value (decode_attention)."""
    if ATTENTION_LOOP not in ("length", "split"):
        raise ValueError(
            f"paged decode attention: VICUNAFLOW_ATTENTION_LOOP={ATTENTION_LOOP!r}: choose length or split"
        )
    B = query.shape[0]
    H = heads
    _, Hkv, block_size, D = keys.shape
    if H % Hkv or keys.shape != values.shape or tables.shape[0] != B or lengths.shape != (B,):
        raise ValueError(
            f"paged decode attention: query {tuple(query.shape)}, keys {tuple(keys.shape)}, "
            f"values {tuple(values.shape)}, tables {tuple(tables.shape)} do not fit {H} heads"
        )
    if tables.stride(1) != 1 or not (keys.is_contiguous() and values.is_contiguous()):
        raise ValueError("paged decode attention: keys and values must be contiguous, tables' rows too")
    group = H // Hkv
    tiles = tiles_for(B, group)
    split_tokens = tiles.split_tokens
    if split_tokens % tiles.tile:  # a split of part of a tile would read its neighbour's positions too
        raise ValueError(
            f"paged decode attention: a split of {split_tokens} positions is not a multiple of a tile's {tiles.tile}"
        )
    width = tables.shape[1]
    splits = -(-width * block_size // split_tokens)
    partial = torch.empty(B, H, splits, D, dtype=torch.float32, device=query.device)
    stats = torch.empty(B, H, splits, 2, dtype=torch.float32, device=query.device)  # running max, sum
    out = torch.empty(B, H * D, dtype=query.dtype, device=query.device)
    fused = ATTENTION == "fused"
    if counters is None:  # one count per (row, KV head) of its programs done; the last one resets it to 0
        counters = torch.zeros(B * Hkv, dtype=torch.int32, device=query.device)
    elif counters.dtype != torch.int32 or counters.numel() < B * Hkv:
        raise ValueError(f"paged decode attention: {counters.numel()} counters for {B} rows x {Hkv} KV heads")
    split_kernel, combine_kernel, _ = _kernels()
    pdl = kernels.pdl_options(query.device, rows=B)
    dot = group > 1 or tiles.multi_head == "tensor-cores"
    shape = dict(
        H=H, HKV=Hkv, D=D, GROUP_PAD=max(16 if dot else 1, triton_next_power_of_2(group)), SPLITS=splits,
        SPLIT_TOKENS=split_tokens, D_PAD=triton_next_power_of_2(D),
    )  # fmt: skip
    cos, sin = rope if rope is not None else (lengths, lengths)  # unread without ROPE
    if rope is not None and (cos.shape != (B, D // 2) or sin.shape != cos.shape or D % 2):
        raise ValueError(f"paged decode attention: angles {tuple(cos.shape)} do not fit {B} rows of head_dim {D}")
    split_kernel[(B, Hkv, splits)](
        query, keys, values, tables, lengths, partial, stats, out, counters, cos.contiguous(), sin.contiguous(),
        scale if scale is not None else 1.0 / math.sqrt(D), query.stride(0), tables.stride(0),
        GROUP=group, BLOCK_SIZE=block_size, TILE=tiles.tile,
        FP32=query.dtype == torch.float32 or _interpreted_bfloat16(query), COMBINE=fused, DOT=dot,
        ROPE=rope is not None, WHOLE_SPLITS=os.environ.get("TRITON_INTERPRET") == "1" or ATTENTION_LOOP == "split",
        **shape, **pdl, num_warps=tiles.warps, num_stages=tiles.stages,
    )  # fmt: skip
    if not fused:
        combine_kernel[(B, Hkv)](partial, stats, lengths, out, **shape, **pdl)
    return out


def tiles_for(rows: int, group: int) -> Tiles:
    """The tiles a step of `rows` rows takes, with `group` query heads a KV head: MIDDLE_ROWS_TILES in MIDDLE_ROWS,
    MANY_ROWS_TILES from MANY_ROWS rows, else FEW_ROWS (multi-head) or FEW_ROWS_GROUPED."""
    if rows in MIDDLE_ROWS:
        return MIDDLE_ROWS_TILES
    if rows >= MANY_ROWS:
        return MANY_ROWS_TILES
    return FEW_ROWS if group == 1 else FEW_ROWS_GROUPED


def rope_store(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    tables: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    heads: int,
    *,
    tokens_per_table: int = 1,
    keys_in_place: bool = False,
) -> None:
    """One token per row: rotate q and k inside qkv in place (LLaMA's half-split rotary) and store the
    rotated k and the v in the row's block at its position.

    Why: one launch a layer where the rotation matrices' batched matmul, the block lookups and the two
    indexed stores took six (a decode step is launch-bound: ~2-4 µs each, 32-80 layers); in a prefill, where
    torch's rotary (a concatenation and four elementwise kernels over strided heads) and the indexed stores
    took over a quarter of a 7B's prefill forward (bench_chat --profile-prefill, docs/benchmarks.md).
    qkv: [B, (H + 2 Hkv) * D] contiguous (q heads, k heads, v heads); cos, sin: [B, D / 2] float32
    (each row's angles, computed once a step); positions [B] (rows may be strided); tables [W] rows, one per
    `tokens_per_table` consecutive rows of qkv (a prefill's B = prompts x length rows, a prompt's table each);
    keys, values: [blocks, Hkv, block_size, D] contiguous. Rotation in float32, rounded once. keys_in_place:
    the rotated k also replaces k in qkv (else k and v there are left as they were).
    """
    B = qkv.shape[0]
    _, kv_heads, block_size, D = keys.shape
    shapes_fit = qkv.shape[1] == (heads + 2 * kv_heads) * D and cos.shape == (B, D // 2)
    if not shapes_fit or not qkv.is_contiguous() or tables.shape[0] * tokens_per_table != B:
        raise ValueError(
            f"rope_store: q|k|v {tuple(qkv.shape)}, cos {tuple(cos.shape)} do not fit {heads} + 2 x {kv_heads} "
            f"heads of {D}, {tables.shape[0]} tables of {tokens_per_table} rows each"
        )
    if tables.stride(1) != 1 or not (keys.is_contiguous() and values.is_contiguous()):
        raise ValueError("rope_store: keys and values must be contiguous, tables' rows too")
    # a head a program in decode steps (as timed there); a prompt's many tokens, up to 8 heads a program: one a
    # program left a 7B's 8,192-token prefill at 406 µs a layer (an H200; 8,192 x 64 programs), 8 took it to 124
    per_program = 1 if tokens_per_table == 1 else math.gcd(heads, kv_heads, 8)
    _kernels()[2][(B, (heads + kv_heads) // per_program)](
        qkv, cos.contiguous(), sin.contiguous(), positions, tables, keys, values, positions.stride(0), tables.stride(0),
        tokens_per_table, H=heads, HKV=kv_heads, D=D, HALF=D // 2, BLOCK_SIZE=block_size,
        HALF_PAD=triton_next_power_of_2(D // 2), D_PAD=triton_next_power_of_2(D), KEYS_IN_PLACE=keys_in_place,
        HEADS=per_program, **kernels.pdl_options(qkv.device, rows=B),
    )  # fmt: skip


def _interpreted_bfloat16(query: torch.Tensor) -> bool:
    """Triton's interpreter multiplies bfloat16 tiles as raw integers (numpy has no bfloat16): upcast there."""
    return query.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def triton_next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _kernels():
    """The split, combine and rope_store kernels (paged_attention_kernels: importing it needs Triton)."""
    from vicunaflow import paged_attention_kernels as triton_kernels

    return triton_kernels.split_kernel, triton_kernels.combine_kernel, triton_kernels.rope_store_kernel

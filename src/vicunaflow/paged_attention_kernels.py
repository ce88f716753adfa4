"""Triton kernels of attention_kernels: paged decode attention (split, combine) and rope_store.

A module of its own because two kernels call a shared @triton.jit helper (the splits' combination), which
Triton resolves among module globals; importing it needs Triton, so attention_kernels imports it only
when a kernel runs. See attention_kernels for what each computes.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def combine(partial_ptr, stats_ptr, out_ptr, row, heads, head_ok, length,
            H: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, SPLIT_TOKENS: tl.constexpr,
            D_PAD: tl.constexpr):  # fmt: skip
    """Weigh a row's split outputs for `heads` by their softmax sums and store the attention output.
    Loads bypass L1 (.cg): other programs wrote the partials, and an earlier layer's may be cached."""
    dims = tl.arange(0, D_PAD)
    mask = head_ok[:, None] & (dims < D)[None, :]
    used = (length + SPLIT_TOKENS - 1) // SPLIT_TOKENS  # the splits whose programs ran
    top = tl.zeros_like(heads).to(tl.float32) - float("inf")  # [heads]: the largest of the splits' maxima
    for split in range(0, SPLITS):  # (a loop to `used` would be shorter; Triton's interpreter cannot run it)
        if split < used:
            base = (row * H + heads) * SPLITS + split
            top = tl.maximum(top, tl.load(stats_ptr + base * 2, mask=head_ok, other=0.0, cache_modifier=".cg"))
    total = tl.zeros(mask.shape, dtype=tl.float32)
    norm = tl.zeros(top.shape, dtype=tl.float32)
    for split in range(0, SPLITS):
        if split < used:
            base = (row * H + heads) * SPLITS + split
            weight = tl.exp(tl.load(stats_ptr + base * 2, mask=head_ok, other=0.0, cache_modifier=".cg") - top)
            part = tl.load(partial_ptr + base[:, None] * D + dims[None, :], mask=mask, other=0.0, cache_modifier=".cg")
            total += part * weight[:, None]
            norm += tl.load(stats_ptr + base * 2 + 1, mask=head_ok, other=0.0, cache_modifier=".cg") * weight
    write_output(out_ptr, total, norm, row, heads, head_ok, dims, mask, H, D)


@triton.jit
def write_output(out_ptr, acc, norm, row, heads, head_ok, dims, mask, H: tl.constexpr, D: tl.constexpr):
    """Store `heads`' attention output of a row: acc [heads, D_PAD] over its softmax sums norm [heads], in out's
    dtype. Both a combination of splits and a row's only split end here: one division, the same bits."""
    out = acc / tl.where(head_ok, norm, 1.0)[:, None]
    tl.store(out_ptr + (row * H + heads)[:, None] * D + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rotary(x_ptrs, other_ptrs, mask, first, cos, sin):
    """LLaMA's half-split rotary of head vectors in float32, x_ptrs' elements paired with other_ptrs' (the other
    half's dim): x cos - other sin where `first` (the first half), x cos + other sin elsewhere. rope_store's
    arithmetic, in its order, before the rounding to the model's dtype."""
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    other = tl.load(other_ptrs, mask=mask, other=0.0).to(tl.float32)
    return tl.where(first, x * cos - other * sin, x * cos + other * sin)


@triton.jit
def split_kernel(
    q_ptr,  # [B, H, D], rows q_row_stride apart; ROPE: q|k|v [B, (H + 2 HKV) * D], q and the new k unrotated
    k_ptr,  # [blocks, HKV, BLOCK_SIZE, D]
    v_ptr,
    table_ptr,  # [B, width], rows table_row_stride apart
    length_ptr,  # [B]
    partial_ptr,  # [B, H, SPLITS, D] float32
    stats_ptr,  # [B, H, SPLITS, 2] float32: max, sum of exp
    out_ptr,  # [B, H, D] (COMBINE)
    counter_ptr,  # [B, HKV] int32 zeros (COMBINE): programs of (row, KV head) done
    cos_ptr,  # ROPE: [B, D / 2] float32, the rows' angles (position lengths - 1)
    sin_ptr,
    scale,
    q_row_stride,
    table_row_stride,
    H: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # DOT: >= 16, tl.dot's smallest tile; else the group's power of two
    BLOCK_SIZE: tl.constexpr,
    SPLITS: tl.constexpr,
    SPLIT_TOKENS: tl.constexpr,
    TILE: tl.constexpr,
    D_PAD: tl.constexpr,
    FP32: tl.constexpr,  # products in float32 (no TF32): a float32 cache, or bfloat16 in the interpreter
    PDL: tl.constexpr,  # programmatic dependent launch (kernels.PDL): every input comes from earlier kernels
    COMBINE: tl.constexpr,  # the last program of a (row, KV head) combines the splits into out
    DOT: tl.constexpr,  # scores and outputs on tensor cores (tl.dot); else float32 products on CUDA cores
    ROPE: tl.constexpr,  # rotate q here, and store the row's new key (rotated) and value first (decode_attention)
    WHOLE_SPLITS: tl.constexpr,  # walk every tile of the split, those past the row masked (the same bits): Triton's
    # interpreter cannot loop to a bound it loaded
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
        q_ptrs = q_ptr + row * q_row_stride + heads[:, None] * D + dims[None, :]
        q_mask = head_ok[:, None] & dim_ok[None, :]
        if ROPE:
            HALF: tl.constexpr = D // 2
            first_half = dims < HALF
            partner = tl.where(first_half, dims + HALF, dims - HALF)  # the other half's dim
            cos = tl.load(cos_ptr + row * HALF + dims % HALF, mask=dim_ok, other=0.0)
            sin = tl.load(sin_ptr + row * HALF + dims % HALF, mask=dim_ok, other=0.0)
            q_other = q_ptrs - dims[None, :] + partner[None, :]
            q = rotary(q_ptrs, q_other, q_mask, first_half[None, :], cos[None, :], sin[None, :])
            q = q.to(q_ptr.dtype.element_ty)  # [GROUP_PAD, D_PAD], rounded as rope_store stores it
            position = length - 1
            if position // SPLIT_TOKENS == split:  # the new key's split stores it (and the value) before reading
                row_ptr = q_ptr + row * q_row_stride
                k_new = row_ptr + (H + kv_head) * D
                key = rotary(k_new + dims, k_new + partner, dim_ok, first_half, cos, sin)  # [D_PAD]
                block = tl.load(table_ptr + row * table_row_stride + position // BLOCK_SIZE).to(tl.int64)
                slot = ((block * HKV + kv_head) * BLOCK_SIZE + position % BLOCK_SIZE) * D
                tl.store(k_ptr + slot + dims, key.to(k_ptr.dtype.element_ty), mask=dim_ok)
                value = tl.load(row_ptr + (H + HKV + kv_head) * D + dims, mask=dim_ok)
                tl.store(v_ptr + slot + dims, value, mask=dim_ok)
                tl.debug_barrier()  # every thread's stores happen before the tiles below read them
        else:
            q = tl.load(q_ptrs, mask=q_mask, other=0.0)  # [GROUP_PAD, D_PAD]
        running_max = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
        running_sum = tl.zeros((GROUP_PAD,), dtype=tl.float32)
        acc = tl.zeros((GROUP_PAD, D_PAD), dtype=tl.float32)
        tile_acc = tl.zeros((TILE, D_PAD), dtype=tl.float32)  # not DOT: p * v summed over the tiles
        # the tiles holding the row's positions (a row's last split is often short), or every tile of the split
        for tile in range(0, SPLIT_TOKENS if WHOLE_SPLITS else tl.minimum(length - first, SPLIT_TOKENS), TILE):
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
            # [TILE, D_PAD], in q's dtype: a float8 cache is widened here (a no-op for a cache in the model's dtype)
            k = tl.load(k_ptr + offsets, mask=tile_mask, other=0.0).to(q_ptr.dtype.element_ty)
            if not DOT:  # one query head (GROUP_PAD 1): [1, D_PAD] * [TILE, D_PAD] summed over D_PAD -> [1, TILE]
                scores = tl.sum(q.to(tl.float32) * k.to(tl.float32), axis=1)[None, :]
            elif FP32:
                scores = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))  # [GROUP_PAD, TILE] float32
            scores = tl.where(valid[None, :], scores * scale, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            rescale = tl.exp(running_max - new_max)
            p = tl.exp(scores - new_max[:, None])  # [GROUP_PAD, TILE]
            v = tl.load(v_ptr + offsets, mask=tile_mask, other=0.0).to(q_ptr.dtype.element_ty)
            if not DOT:  # [TILE, D_PAD] sums, reduced over TILE once after the loop
                tile_acc = tile_acc * rescale[:, None] + tl.reshape(p, (TILE, 1)) * v.to(tl.float32)
            elif FP32:
                acc = acc * rescale[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
            running_sum = running_sum * rescale + tl.sum(p, axis=1)
            running_max = new_max
        if not DOT:
            acc = tl.sum(tile_acc, axis=0)[None, :]  # [1, D_PAD]
        out_mask = head_ok[:, None] & dim_ok[None, :]
        if COMBINE and length <= SPLIT_TOKENS:  # the row's one split: the output is its own, no partials to combine
            write_output(out_ptr, acc, running_sum, row, heads, head_ok, dims, out_mask, H, D)
        else:
            base = (row * H + heads) * SPLITS + split  # [GROUP_PAD]
            tl.store(partial_ptr + base[:, None] * D + dims[None, :], acc, mask=out_mask)
            tl.store(stats_ptr + base * 2, running_max, mask=head_ok)
            tl.store(stats_ptr + base * 2 + 1, running_sum, mask=head_ok)
            if COMBINE:
                tl.debug_barrier()  # every thread's stores above happen before this program is counted
                counter = counter_ptr + row * HKV + kv_head
                done = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")  # programs done before this one
                if done == (length + SPLIT_TOKENS - 1) // SPLIT_TOKENS - 1:  # the last: the others' partials are in
                    tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # ready for the next layer's launch
                    tl.debug_barrier()
                    combine(
                        partial_ptr, stats_ptr, out_ptr, row, heads, head_ok, length, H, D, SPLITS, SPLIT_TOKENS, D_PAD
                    )


@triton.jit
def combine_kernel(
    partial_ptr,
    stats_ptr,
    length_ptr,
    out_ptr,  # [B, H, D]
    H: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    SPLITS: tl.constexpr,
    SPLIT_TOKENS: tl.constexpr,
    D_PAD: tl.constexpr,
    PDL: tl.constexpr,
):
    """ATTENTION "split": one program per (row, KV head) combines its query heads' splits."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row, kv_head = tl.program_id(0), tl.program_id(1)
    heads = kv_head * (H // HKV) + tl.arange(0, GROUP_PAD)
    head_ok = tl.arange(0, GROUP_PAD) < H // HKV
    length = tl.load(length_ptr + row)
    combine(partial_ptr, stats_ptr, out_ptr, row, heads, head_ok, length, H, D, SPLITS, SPLIT_TOKENS, D_PAD)


# A prompt's table row stride and token count vary with its length: specialised (== 1, divisible by 16) each new
# kind would compile the kernel again on a request's path; a decode step's are fixed per bucket anyway
@triton.jit(do_not_specialize=["table_row_stride", "tokens_per_table"])
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
    tokens_per_table,  # consecutive rows (a prompt's tokens) sharing a block table: 1 in a decode step
    H: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HALF_PAD: tl.constexpr,  # powers of two >= HALF, D (tl.arange's): head_dim need not be one
    D_PAD: tl.constexpr,
    KEYS_IN_PLACE: tl.constexpr,  # also write the rotated k back into q|k|v (a prefill attending to it there)
    HEADS: tl.constexpr,  # heads a program rotates: a power of two dividing H and HKV (all query or all key heads)
    PDL: tl.constexpr,
):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row, first_head = tl.program_id(0), tl.program_id(1) * HEADS  # < H: query heads; else key heads (- H)
    heads = first_head + tl.arange(0, HEADS)  # [HEADS]
    WIDTH: tl.constexpr = (H + 2 * HKV) * D
    j = tl.arange(0, HALF_PAD)
    j_ok = (j < HALF)[None, :]  # [1, HALF_PAD]
    cos = tl.load(cos_ptr + row * HALF + j[None, :], mask=j_ok, other=0.0)  # [1, HALF_PAD]
    sin = tl.load(sin_ptr + row * HALF + j[None, :], mask=j_ok, other=0.0)
    halves = qkv_ptr + row * WIDTH + heads[:, None] * D + j[None, :]  # [HEADS, HALF_PAD]: each head's first half
    first = tl.load(halves, mask=j_ok, other=0.0).to(tl.float32)
    second = tl.load(halves + HALF, mask=j_ok, other=0.0).to(tl.float32)
    out_first = (first * cos - second * sin).to(qkv_ptr.dtype.element_ty)
    out_second = (second * cos + first * sin).to(qkv_ptr.dtype.element_ty)
    if first_head < H or KEYS_IN_PLACE:
        tl.store(halves, out_first, mask=j_ok)
        tl.store(halves + HALF, out_second, mask=j_ok)
    if first_head >= H:
        kv_heads = heads - H
        position = tl.load(position_ptr + row * position_stride)
        table_row = table_ptr + (row // tokens_per_table) * table_row_stride
        block = tl.load(table_row + position // BLOCK_SIZE).to(tl.int64)
        slots = (((block * HKV + kv_heads) * BLOCK_SIZE + position % BLOCK_SIZE) * D)[:, None]  # [HEADS, 1]
        tl.store(k_ptr + slots + j[None, :], out_first, mask=j_ok)
        tl.store(k_ptr + slots + HALF + j[None, :], out_second, mask=j_ok)
        dims = tl.arange(0, D_PAD)[None, :]
        dim_ok = dims < D
        v = tl.load(qkv_ptr + row * WIDTH + (H + HKV + kv_heads)[:, None] * D + dims, mask=dim_ok)  # [HEADS, D_PAD]
        tl.store(v_ptr + slots + dims, v, mask=dim_ok)

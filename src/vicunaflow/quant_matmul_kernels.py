"""Triton kernels of quant_kernels.qmatmul (a few rows times an int8 / int4 weight on tensor cores), of
quant_kernels.qmatvec_columns (one row times a quant.Int4Columns weight) and of qmatvec's int8 products of a
float16 row (in float16 pairs).

A module of its own because its kernels call shared @triton.jit helpers (the input tile, each row's
RMSNorm factor, a columns tile's loads), which Triton resolves among module globals; importing it needs
Triton, so quant_kernels imports it only when a kernel runs. See qmatmul's and qmatvec_columns'
docstrings for the math.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from vicunaflow.autotuning import autotune

# (BLOCK_N, BLOCK_K, warps) for int8; int4 takes BLOCK_K = its group size (one group a K step). Narrow
# BLOCK_N keeps a 4096-row weight over a few hundred programs: a matvec-sized product needs several
# programs per SM to keep enough loads in flight.
MATMUL_TILES = [(16, 256, 4), (32, 256, 4), (16, 512, 4), (32, 128, 4), (64, 128, 4), (128, 128, 4), (64, 128, 8)]

int8_configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for n, k, w in MATMUL_TILES]
int4_configs = [triton.Config({"BLOCK_N": n}, num_warps=w) for n, w in sorted({(n, w) for n, _, w in MATMUL_TILES})]
if os.environ.get("TRITON_INTERPRET") == "1":
    int8_configs = [triton.Config({"BLOCK_N": 32, "BLOCK_K": 128}, num_warps=1)]
    int4_configs = [triton.Config({"BLOCK_N": 32}, num_warps=1)]


@triton.jit
def input_tile(x_ptr, norm_ptr, rows, row_ok, ks, k_ok, K: tl.constexpr, SWIGLU: tl.constexpr, NORM: tl.constexpr):
    """The [BLOCK_M, BLOCK_K] input tile in float32 and the squares of what was loaded (NORM's sum).

    x, silu(gate) * up, or for RMSNorm x * norm weight: its per-row 1 / rms is a factor of each row's
    products, applied once at the end (`rms_factor`). Why: computing it first costs every program a
    serial pass over its rows before its first weight load. On an H200 (7B, 8 rows), int8 batched decode
    fell from 1,441 to 993 tokens/s when RMSNorm moved into qmatmul that way. (x * norm weight is rounded
    to the product dtype unnormalised: it is x's own magnitude, which x's dtype already holds.)
    """
    ok = row_ok[:, None] & k_ok[None, :]
    if SWIGLU:
        gate = tl.load(x_ptr + rows[:, None] * (2 * K) + ks[None, :], mask=ok, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + rows[:, None] * (2 * K) + K + ks[None, :], mask=ok, other=0.0).to(tl.float32)
        tile = gate * tl.sigmoid(gate) * up
        return tile, tile
    x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=ok, other=0.0).to(tl.float32)
    if NORM:
        return x * tl.load(norm_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :], x * x
    return x, x


@triton.jit
def nibble(packed, J: tl.constexpr):
    """Code J (bits 4J..4J+3) of each int32 word as a float 0..15, through its bits (quant_kernels: MAGIC)."""
    return (((packed >> (4 * J)) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def rms_factor(squares, eps, K: tl.constexpr):
    """Each row's 1 / sqrt(mean(x^2) + eps) from the [BLOCK_M, BLOCK_K] running squares: [BLOCK_M, 1]."""
    return (1.0 / tl.sqrt(tl.sum(squares, axis=1) / K + eps))[:, None]


@autotune(configs=int8_configs, key=["N", "K", "BLOCK_M", "SWIGLU", "NORM"])
@triton.jit
def int8_matmul_kernel(
    x_ptr,  # [M, K] or [M, 2K] (SWIGLU)
    q_ptr,  # int8 [N, K]
    scale_ptr,  # float32 [N]
    residual_ptr,
    out_ptr,  # [M, N]
    norm_ptr,
    eps,
    M,
    N: tl.constexpr,
    K: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    SWIGLU: tl.constexpr,
    NORM: tl.constexpr,
    BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    MAGIC_SIGNED: tl.constexpr = 0x4B400000  # see quant_kernels.py: MAGIC
    MAGIC_SIGNED_VALUE: tl.constexpr = 12582912.0
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns = weight rows
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    squares = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)  # NORM: sum of x^2 per row
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x, x_squared = input_tile(x_ptr, norm_ptr, rows, row_ok, ks, k_ok, K, SWIGLU, NORM)
        if NORM:
            squares += x_squared
        x = x.to(tl.bfloat16) if BF16 else x.to(tl.float16)
        q = tl.load(q_ptr + cols[:, None] * K + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0)
        w = ((q.to(tl.int32) + MAGIC_SIGNED).to(tl.float32, bitcast=True) - MAGIC_SIGNED_VALUE).to(x.dtype)
        acc += tl.dot(x, tl.trans(w))  # [BLOCK_M, BLOCK_N]
    y = acc * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if NORM:
        y = y * rms_factor(squares, eps, K)
    ok = row_ok[:, None] & col_ok[None, :]
    if HAS_RESIDUAL:
        y += tl.load(residual_ptr + rows[:, None] * N + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)


@autotune(configs=int4_configs, key=["N", "K", "G", "BLOCK_M", "SWIGLU", "NORM", "COLUMNS"])
@triton.jit
def int4_matmul_kernel(
    x_ptr,  # [M, K] or [M, 2K] (SWIGLU)
    q_ptr,  # uint8 [N, K // 2]: column 2i low nibble, 2i + 1 high nibble; COLUMNS: int32 words [K // 8, N]
    scale_ptr,  # float16 [N, NG]; COLUMNS: [NG, N]
    zero_ptr,  # float16 [N, NG]; COLUMNS: [NG, N]
    residual_ptr,
    out_ptr,  # [M, N]
    norm_ptr,
    eps,
    M,
    N: tl.constexpr,
    K: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    SWIGLU: tl.constexpr,
    NORM: tl.constexpr,
    BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    G: tl.constexpr,  # group size: a power of two >= 32, the K step
    COLUMNS: tl.constexpr,  # quant.Int4Columns' layout: column 8i + j of output n in bits 4j.. of word (i, n)
    BLOCK_N: tl.constexpr,
):
    MAGIC: tl.constexpr = 0x4B000000  # see quant_kernels.py: MAGIC
    MAGIC_VALUE: tl.constexpr = 8388608.0
    KP: tl.constexpr = K // 2
    NG: tl.constexpr = (K + G - 1) // G
    GH: tl.constexpr = G // 2
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    squares = tl.zeros((BLOCK_M, G), dtype=tl.float32)  # NORM: sum of x^2 per row
    for group in range(0, NG):
        ks = group * G + tl.arange(0, G)
        x, x_squared = input_tile(x_ptr, norm_ptr, rows, row_ok, ks, ks < K, K, SWIGLU, NORM)
        if NORM:
            squares += x_squared
        x = x.to(tl.bfloat16) if BF16 else x.to(tl.float16)
        if COLUMNS:
            WG: tl.constexpr = G // 8  # words a group
            words = group * WG + tl.arange(0, WG)
            packed = tl.load(
                q_ptr + words[None, :] * N + cols[:, None], mask=col_ok[:, None] & (words < K // 8)[None, :], other=0
            )  # [BLOCK_N, WG]
            c0, c1, c2, c3 = nibble(packed, 0), nibble(packed, 1), nibble(packed, 2), nibble(packed, 3)
            c4, c5, c6, c7 = nibble(packed, 4), nibble(packed, 5), nibble(packed, 6), nibble(packed, 7)
            # [BLOCK_N, WG, 2, 2, 2] whose last three indices (a, b, c) hold code j = 4a + 2b + c (join adds an
            # index last: the outermost join picks j's lowest bit), so the reshape lays column 8i + j at i * 8 + j
            nibbles = tl.join(tl.join(tl.join(c0, c4), tl.join(c2, c6)), tl.join(tl.join(c1, c5), tl.join(c3, c7)))
            codes = tl.reshape(nibbles, (BLOCK_N, G)).to(x.dtype)
            group_ptrs = group * N + cols
        else:
            pairs = group * GH + tl.arange(0, GH)
            packed = tl.load(
                q_ptr + cols[:, None] * KP + pairs[None, :], mask=col_ok[:, None] & (pairs < KP)[None, :], other=0
            ).to(tl.int32)  # [BLOCK_N, GH]
            low = ((packed & 15) | MAGIC).to(tl.float32, bitcast=True) - MAGIC_VALUE
            high = ((packed >> 4) | MAGIC).to(tl.float32, bitcast=True) - MAGIC_VALUE
            codes = tl.reshape(tl.join(low, high), (BLOCK_N, G)).to(x.dtype)  # columns 2i, 2i + 1 interleaved
            group_ptrs = cols * NG + group
        products = tl.dot(x, tl.trans(codes))  # [BLOCK_M, BLOCK_N]: sum(q x) over the group
        x_sum = tl.sum(x.to(tl.float32), axis=1)  # [BLOCK_M]
        scale = tl.load(scale_ptr + group_ptrs, mask=col_ok, other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + group_ptrs, mask=col_ok, other=0.0).to(tl.float32)
        acc += products * scale[None, :] + x_sum[:, None] * zero[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    y = acc
    if NORM:  # both terms (sum(q x) * scale and sum(x) * zero) are linear in the row's 1 / rms
        y = y * rms_factor(squares, eps, K)
    if HAS_RESIDUAL:
        y += tl.load(residual_ptr + rows[:, None] * N + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)


# ---- one row times an Int4Columns weight (quant_kernels.qmatvec_columns) ---------------------------


@triton.jit
def words_tile(w_ptr, rows, outputs, output_ok, N, row_end):
    """One step's words [BLOCK_W, BLOCK_N] (masked past the split: the loop reads one tile ahead)."""
    return tl.load(
        w_ptr + rows[:, None] * N + outputs[None, :], mask=(rows < row_end)[:, None] & output_ok[None, :], other=0
    )


@triton.jit
def groups_tile(scale_ptr, zero_ptr, rows, outputs, output_ok, N, row_end, WG):
    """The scales and zeros of those words' groups, [BLOCK_W, BLOCK_N] each."""
    ok = (rows < row_end)[:, None] & output_ok[None, :]
    group_ptrs = (rows // WG)[:, None] * N + outputs[None, :]
    return tl.load(scale_ptr + group_ptrs, mask=ok, other=0.0), tl.load(zero_ptr + group_ptrs, mask=ok, other=0.0)


@triton.jit
def columns_tile(w_ptr, scale_ptr, zero_ptr, rows, outputs, output_ok, N, row_end, WG):
    """One step's words and their groups' scales and zeros."""
    scale, zero = groups_tile(scale_ptr, zero_ptr, rows, outputs, output_ok, N, row_end, WG)
    return words_tile(w_ptr, rows, outputs, output_ok, N, row_end), scale, zero


@triton.jit
def words_input(x_ptr, norm_ptr, rows, row_end, K: tl.constexpr, SWIGLU: tl.constexpr, NORM: tl.constexpr):
    """The inputs of word rows `rows`, [BLOCK_W, 8] in float32 (a row is one 16-byte load of float16 x), and
    their squares summed a row ([BLOCK_W], NORM's). x, silu(gate) * up, or x * norm weight for RMSNorm, whose
    1 / rms multiplies the sums at the end (input_tile says why)."""
    columns = rows[:, None] * 8 + tl.arange(0, 8)[None, :]
    ok = (rows < row_end)[:, None]
    x = tl.load(x_ptr + columns, mask=ok, other=0.0).to(tl.float32)
    if NORM:
        squares = tl.sum(x * x, axis=1)
        x = x * tl.load(norm_ptr + columns, mask=ok, other=0.0).to(tl.float32)
    else:
        squares = tl.zeros_like(rows).to(tl.float32)
    if SWIGLU:
        up = tl.load(x_ptr + K + columns, mask=ok, other=0.0).to(tl.float32)
        x = x * tl.sigmoid(x) * up
    return x, squares


@triton.jit
def code_float(words, SHIFT: tl.constexpr, one):
    """f = 1 + c / 16 for the code c at bits SHIFT..SHIFT+3 of each word: c moved to mantissa bits 19..22 of
    1.0 (one: ONE_BITS in a register, so the mask and the or are one LOP3)."""
    moved = words << (19 - SHIFT) if SHIFT <= 19 else words >> (SHIFT - 19)
    return ((moved & 0x00780000) | one).to(tl.float32, bitcast=True)


# The end of a float16-pairs PTX block: its accumulator's two halves (register acc) added in float32 into $0.
LANES_TO_FLOAT32 = """mov.b32 {lo, hi}, acc;
cvt.f32.f16 flo, lo;
cvt.f32.f16 fhi, hi;
add.f32 $0, flo, fhi;
}"""
# One word's sum_j c_j x_j in float16 pairs (HALF2): the codes j and j + 4 of a word sit at bits 4j and 16 + 4j,
# so one LOP3 with code_bits 0x000f000f and half_bits 0x64006400 (float16 1024, twice) gives the pair
# (1024 + c_j, 1024 + c_j+4) of float16s, and a subtraction gives the codes exactly. Four HFMA2 then take
# x's pairs (x_j, x_j+4), and the two halves add in float32: 18 instructions for 8 weights, against about
# 35 in float32. $1: the word, $2..$5: the input pairs, $6: half_bits, $7: code_bits (kernel arguments,
# so they stay in registers).
WORD_SUMS_PTX = tl.constexpr(
    """{
.reg .b32 t, h0, h1, h2, h3, acc;
.reg .b16 lo, hi;
.reg .f32 flo, fhi;
lop3.b32 h0, $1, $7, $6, 0xea;
shr.u32 t, $1, 4;
lop3.b32 h1, t, $7, $6, 0xea;
shr.u32 t, $1, 8;
lop3.b32 h2, t, $7, $6, 0xea;
shr.u32 t, $1, 12;
lop3.b32 h3, t, $7, $6, 0xea;
sub.f16x2 h0, h0, $6;
sub.f16x2 h1, h1, $6;
sub.f16x2 h2, h2, $6;
sub.f16x2 h3, h3, $6;
mul.f16x2 acc, h0, $2;
fma.rn.f16x2 acc, h1, $3, acc;
fma.rn.f16x2 acc, h2, $4, acc;
fma.rn.f16x2 acc, h3, $5, acc;
"""
    + LANES_TO_FLOAT32
)
# sum_j x_j of a word row from its four input pairs: three HADD2, then the halves in float32. From the pairs,
# not from x in float32: the pairs are already in the words' layout, and a sum in x's own layout made the
# compiler move the whole accumulator between layouts each step (offline SASS, sm_90).
PAIR_SUMS_PTX = tl.constexpr("""{
.reg .b32 s;
.reg .b16 lo, hi;
.reg .f32 flo, fhi;
add.f16x2 s, $1, $2;
add.f16x2 s, s, $3;
add.f16x2 s, s, $4;
mov.b32 {lo, hi}, s;
cvt.f32.f16 flo, lo;
cvt.f32.f16 fhi, hi;
add.f32 $0, flo, fhi;
}""")
# x into float16 pairs: 60 |x| (four products of codes <= 15) stays below float16's 65504 up to |x| = 280k
HALF2_INPUT_SCALE = tl.constexpr(2.0**-8)


@triton.jit
def input_pairs(x, BLOCK_W: tl.constexpr):
    """x [BLOCK_W, 8] as float16 pairs (x_j, x_j+4) in int32s, x_j in the low half: 4 x [BLOCK_W]. Done on the
    x tile's own layout (a thread a row), before the values spread to every thread of their word rows."""
    bits = x.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF  # [BLOCK_W, 8]: j = 4a + r
    low, high = tl.split(tl.permute(tl.reshape(bits, (BLOCK_W, 2, 4)), (0, 2, 1)))  # [BLOCK_W, 4]: j = r, 4 + r
    pairs = tl.reshape(low | (high << 16), (BLOCK_W, 2, 2))  # r = 2b + c
    pairs_c0, pairs_c1 = tl.split(pairs)
    pair0, pair2 = tl.split(pairs_c0)
    pair1, pair3 = tl.split(pairs_c1)
    return pair0, pair1, pair2, pair3


@triton.jit
def input_half(pairs, HIGH: tl.constexpr):
    """One float16 of each input pair (the interpreter's stand-in for the PTX's registers)."""
    bits = (pairs >> 16) if HIGH else pairs
    return bits.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def pair_half(pairs, HIGH: tl.constexpr):
    """One float16 of each input pair [BLOCK_W], as a column (the interpreter's stand-in for the PTX's registers)."""
    return input_half(pairs, HIGH)[:, None]


@triton.jit
def pair_sums(pair0, pair1, pair2, pair3, ASM: tl.constexpr):
    """sum_j x_j of each word row [BLOCK_W] from its input pairs, added in float16 (PAIR_SUMS_PTX)."""
    if ASM:
        return tl.inline_asm_elementwise(
            PAIR_SUMS_PTX, "=f,r,r,r,r", [pair0, pair1, pair2, pair3], dtype=tl.float32, is_pure=True, pack=1
        )
    low = ((pair_half(pair0, False) + pair_half(pair1, False)) + pair_half(pair2, False)) + pair_half(pair3, False)
    high = ((pair_half(pair0, True) + pair_half(pair1, True)) + pair_half(pair2, True)) + pair_half(pair3, True)
    return tl.reshape(low.to(tl.float32) + high.to(tl.float32), (low.shape[0],))


@triton.jit
def word_sums_half2(words, pair0, pair1, pair2, pair3, half_bits, code_bits, ASM: tl.constexpr):
    """sum_j c_j x_j per word [BLOCK_W, BLOCK_N] in float16 pairs (WORD_SUMS_PTX). Without ASM (Triton's
    interpreter runs no PTX) the same pairs through Triton's float16 ops."""
    if ASM:
        return tl.inline_asm_elementwise(
            WORD_SUMS_PTX, "=f,r,r,r,r,r,r,r",
            [words, pair0[:, None], pair1[:, None], pair2[:, None], pair3[:, None], half_bits, code_bits],
            dtype=tl.float32, is_pure=True, pack=1,
        )  # fmt: skip
    low = nibble(words, 0).to(tl.float16) * pair_half(pair0, False)
    high = nibble(words, 4).to(tl.float16) * pair_half(pair0, True)
    low += nibble(words, 1).to(tl.float16) * pair_half(pair1, False)
    high += nibble(words, 5).to(tl.float16) * pair_half(pair1, True)
    low += nibble(words, 2).to(tl.float16) * pair_half(pair2, False)
    high += nibble(words, 6).to(tl.float16) * pair_half(pair2, True)
    low += nibble(words, 3).to(tl.float16) * pair_half(pair3, False)
    high += nibble(words, 7).to(tl.float16) * pair_half(pair3, True)
    return low.to(tl.float32) + high.to(tl.float32)


@triton.jit
def columns_output(y, squares, outputs, output_ok, residual_ptr, out_ptr, eps, K, NORM, HAS_RESIDUAL):
    """Store an output tile's sums [BLOCK_N]: times RMSNorm's 1 / rms (NORM; squares: sum x^2), + residual."""
    if NORM:
        y = y / tl.sqrt(squares / K + eps)
    if HAS_RESIDUAL:
        y += tl.load(residual_ptr + outputs, mask=output_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + outputs, y.to(out_ptr.dtype.element_ty), mask=output_ok)


@triton.jit
def add_tile(acc, square_sums, words, scale, zero, x, squares, one, half_bits, code_bits, INPUT_SCALE: tl.constexpr,
             BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, HALF2: tl.constexpr, ASM: tl.constexpr):  # fmt: skip
    """acc [BLOCK_W, BLOCK_N] plus one tile's sums (in units of 1 / INPUT_SCALE with HALF2, else of 1 / 16), and
    the running squares (RMSNorm's) plus the tile's."""
    if HALF2:  # x scaled into float16's range: sum c x * s and sum x * s, s = INPUT_SCALE; y divides by s
        pair0, pair1, pair2, pair3 = input_pairs(x * INPUT_SCALE, BLOCK_W)
        x_sum = pair_sums(pair0, pair1, pair2, pair3, ASM)  # [BLOCK_W], times INPUT_SCALE
        total = word_sums_half2(words, pair0, pair1, pair2, pair3, half_bits, code_bits, ASM)
        # one sum, not two FFMAs into acc: fewer instructions (offline SASS) but 2.8% slower on an H200
        acc += scale.to(tl.float32) * total + zero.to(tl.float32) * x_sum[:, None]
    else:
        # x [BLOCK_W, 8] as its columns: j = 4a + 2b + c of [BLOCK_W, a, b, c]; split takes c
        x_c0, x_c1 = tl.split(tl.reshape(x, (BLOCK_W, 2, 2, 2)))
        x_c0b0, x_c0b1 = tl.split(x_c0)
        x_c1b0, x_c1b1 = tl.split(x_c1)
        x0, x4 = tl.split(x_c0b0)
        x2, x6 = tl.split(x_c0b1)
        x1, x5 = tl.split(x_c1b0)
        x3, x7 = tl.split(x_c1b1)
        x_sum = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))  # [BLOCK_W]
        total = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32) - x_sum[:, None]
        total += code_float(words, 0, one) * x0[:, None]
        total += code_float(words, 4, one) * x1[:, None]
        total += code_float(words, 8, one) * x2[:, None]
        total += code_float(words, 12, one) * x3[:, None]
        total += code_float(words, 16, one) * x4[:, None]
        total += code_float(words, 20, one) * x5[:, None]
        total += code_float(words, 24, one) * x6[:, None]
        total += code_float(words, 28, one) * x7[:, None]
        acc += scale.to(tl.float32) * total + zero.to(tl.float32) * (x_sum * 0.0625)[:, None]
    return acc, square_sums + squares


@triton.jit
def int4_columns_kernel(
    x_ptr,  # [K], or [2K] gate | up (SWIGLU)
    w_ptr,  # int32 [K // 8, N]: word (i, n) holds columns 8i..8i+7 of output n, column 8i + j in bits 4j..4j+3
    scale_ptr,  # float16 [NG, N]
    zero_ptr,  # float16 [NG, N]: w = q * scale + zero
    residual_ptr,
    out_ptr,
    norm_ptr,  # [K] RMSNorm weight (NORM)
    partial_ptr,  # float32 [SPLITS, N] each split's sums, then [SPLITS, TILES] its squares (SPLITS > 1)
    counter_ptr,  # int32 [TILES] zeros: an output tile's splits done (the last one resets it)
    eps,
    one,  # ONE_BITS
    half_bits,  # HALF2_BITS
    code_bits,  # CODE_PAIR_BITS
    N: tl.constexpr,
    K: tl.constexpr,  # a multiple of 8
    G: tl.constexpr,  # group size, a multiple of 8
    SWIGLU: tl.constexpr,
    NORM: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    PDL: tl.constexpr,
    HALF2: tl.constexpr,  # each word's products in float16 pairs (word_sums_half2), else in float32
    ASM: tl.constexpr,  # HALF2 through WORD_SUMS_PTX (CUDA), else through Triton's float16 ops (interpreter)
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
    SPLIT_ROWS: tl.constexpr,  # word rows a program sums (a multiple of BLOCK_W): the split over K
):
    # f = 1 + c / 16 (code_float) times x is exact in float32 (5 and 11 significant bits). Per word and
    # output: t = sum_j f_j x_j - sum_j x_j = sum_j c_j x_j / 16; per group, sum w x = scale * sum c x +
    # zero * sum x = 16 (scale * t + zero * sum x / 16), summed over words.
    # Programs: (output tile, split of K). A product's 128-512 output tiles alone leave an H200's SMs a
    # program or two each, too few loads in flight; each split writes its sums to partial_ptr and the
    # tile's last program adds them up in split order (the same bytes whichever program is last).
    KW: tl.constexpr = K // 8
    WG: tl.constexpr = G // 8  # words a group
    INPUT_SCALE: tl.constexpr = HALF2_INPUT_SCALE
    SPLITS: tl.constexpr = (KW + SPLIT_ROWS - 1) // SPLIT_ROWS
    TILES: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    tile, split = tl.program_id(0), tl.program_id(1)
    outputs = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    output_ok = outputs < N
    first_row = split * SPLIT_ROWS
    row_end = tl.minimum(first_row + SPLIT_ROWS, KW)
    word_rows = first_row + tl.arange(0, BLOCK_W)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    words = words_tile(w_ptr, word_rows, outputs, output_ok, N, row_end)
    if PDL:  # the first tile's words were read before waiting for earlier kernels (they wrote x, not the weight)
        tl.extra.cuda.gdc_wait()
    scale, zero = groups_tile(scale_ptr, zero_ptr, word_rows, outputs, output_ok, N, row_end, WG)
    x, squares = words_input(x_ptr, norm_ptr, word_rows, row_end, K, SWIGLU, NORM)
    acc = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32)
    square_sums = tl.zeros((BLOCK_W,), dtype=tl.float32)
    # Two tiles a step, A then B, each one's loads issued before the other is decoded (over a plain range,
    # Triton's pipeliner leaves loads that feed no tl.dot in program order). Why not one tile a step with the
    # next one's loads carried over: the loop's copy of those in-flight registers waited for them at each
    # step's end (MOVs in the SASS), so decoding did not overlap the loads. Nor tl.range's pipelining into
    # shared memory (cp.async, 2-3 stages): 30-50% slower a product on an H200 (twelfth session,
    # bench/results/int4_columns_stages_h200.json). A tile past the split is masked: zeros, nothing read.
    for start in range(0, SPLIT_ROWS, 2 * BLOCK_W):
        rows = word_rows + start
        words_b, scale_b, zero_b = columns_tile(
            w_ptr, scale_ptr, zero_ptr, rows + BLOCK_W, outputs, output_ok, N, row_end, WG
        )
        x_b, squares_b = words_input(x_ptr, norm_ptr, rows + BLOCK_W, row_end, K, SWIGLU, NORM)
        acc, square_sums = add_tile(
            acc, square_sums, words, scale, zero, x, squares, one, half_bits, code_bits, INPUT_SCALE, BLOCK_W,
            BLOCK_N, HALF2, ASM,
        )  # fmt: skip
        words, scale, zero = columns_tile(
            w_ptr, scale_ptr, zero_ptr, rows + 2 * BLOCK_W, outputs, output_ok, N, row_end, WG
        )
        x, squares = words_input(x_ptr, norm_ptr, rows + 2 * BLOCK_W, row_end, K, SWIGLU, NORM)
        acc, square_sums = add_tile(
            acc, square_sums, words_b, scale_b, zero_b, x_b, squares_b, one, half_bits, code_bits, INPUT_SCALE,
            BLOCK_W, BLOCK_N, HALF2, ASM,
        )  # fmt: skip
    y = tl.sum(acc, axis=0) * (1.0 / INPUT_SCALE if HALF2 else 16.0)  # [BLOCK_N]
    square_sum = tl.sum(square_sums, axis=0)
    if SPLITS == 1:
        columns_output(y, square_sum, outputs, output_ok, residual_ptr, out_ptr, eps, K, NORM, HAS_RESIDUAL)
    else:
        tl.store(partial_ptr + split * N + outputs, y, mask=output_ok)
        if NORM:
            tl.store(partial_ptr + SPLITS * N + split * TILES + tile, square_sum)
        tl.debug_barrier()  # every thread's stores above happen before this program is counted
        done = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu")  # splits done before this one
        if done == SPLITS - 1:  # the last: the other splits' sums are in
            tl.atomic_xchg(counter_ptr + tile, 0, sem="relaxed", scope="gpu")  # ready for the next launch
            tl.debug_barrier()
            y = tl.zeros((BLOCK_N,), dtype=tl.float32)
            square_sum = 0.0
            for s in range(SPLITS):
                y += tl.load(partial_ptr + s * N + outputs, mask=output_ok, other=0.0, cache_modifier=".cg")
                if NORM:
                    square_sum += tl.load(partial_ptr + SPLITS * N + s * TILES + tile, cache_modifier=".cg")
            columns_output(y, square_sum, outputs, output_ok, residual_ptr, out_ptr, eps, K, NORM, HAS_RESIDUAL)


@triton.jit
def int4_columns_decode_kernel(
    w_ptr,  # int32 [K // 8, N] (quant.Int4Columns.words)
    scale_ptr,  # float16 [NG, N]
    zero_ptr,  # float16 [NG, N]
    out_ptr,  # [K, N]: the weight, transposed
    N,
    K,
    G: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """W.T = q * scale + zero in float32, rounded once to out's dtype: Int4Columns.dequantize on CUDA. Word row i
    decodes into rows 8i..8i+7 of W.T, each a contiguous run of outputs (coalesced stores)."""
    rows = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    outputs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rows < K // 8)[:, None] & (outputs < N)[None, :]
    words = tl.load(w_ptr + rows[:, None] * N + outputs[None, :], mask=ok, other=0)
    group_ptrs = (rows // (G // 8))[:, None] * N + outputs[None, :]
    scale = tl.load(scale_ptr + group_ptrs, mask=ok, other=0.0).to(tl.float32)
    zero = tl.load(zero_ptr + group_ptrs, mask=ok, other=0.0).to(tl.float32)
    for j in tl.static_range(8):
        w = nibble(words, j) * scale + zero
        tl.store(out_ptr + (rows * 8 + j)[:, None] * N + outputs[None, :], w.to(out_ptr.dtype.element_ty), mask=ok)


# ---- one row times an int8 weight in float16 pairs (quant_kernels.qmatvec on a float16 input) ---------------


# Two words' (8 codes of one output) sum_j (c_j / 256) x_j in float16 pairs. A word holds codes 4i..4i+3 in its
# bytes; one XOR with flip (0x80808080) makes each byte c + 128, and a PRMT with half_bits (0x64646464) sets two
# bytes under float16 1024's high byte: the pair (1024 + c_j + 128, 1024 + c_j+1 + 128). One FMA with code_scale
# (2^-8, twice) and code_offset (-4.5, twice) gives (c_j / 256, c_j+1 / 256) exactly, and HFMA2s take the input's
# own float16 pairs (x_j, x_j+1): 18 instructions for 8 weights, against about 40 in float32 (sign extension, the
# float bits, a subtraction and an FFMA a code, and the input's conversion). c / 256 keeps four products of a
# lane below float16's 65504 for any float16 input (|c / 256| <= 0.5). $1, $2: the words; $3..$6: the input
# pairs; $7 flip, $8 half_bits, $9 code_scale, $10 code_offset (kernel arguments: they stay in registers).
INT8_PAIR_SUMS_PTX = tl.constexpr(
    """{
.reg .b32 u, h0, h1, acc;
.reg .b16 lo, hi;
.reg .f32 flo, fhi;
xor.b32 u, $1, $7;
prmt.b32 h0, u, $8, 0x4140;
prmt.b32 h1, u, $8, 0x4342;
fma.rn.f16x2 h0, h0, $9, $10;
fma.rn.f16x2 h1, h1, $9, $10;
mul.f16x2 acc, h0, $3;
fma.rn.f16x2 acc, h1, $4, acc;
xor.b32 u, $2, $7;
prmt.b32 h0, u, $8, 0x4140;
prmt.b32 h1, u, $8, 0x4342;
fma.rn.f16x2 h0, h0, $9, $10;
fma.rn.f16x2 h1, h1, $9, $10;
fma.rn.f16x2 acc, h0, $5, acc;
fma.rn.f16x2 acc, h1, $6, acc;
"""
    + LANES_TO_FLOAT32
)


@triton.jit
def int8_code_half(words, J: tl.constexpr):
    """The code in byte J of each word as float16 c / 256 (the interpreter's stand-in for the PTX's pairs)."""
    return ((((words >> (8 * J)) & 0xFF) ^ 0x80) - 128).to(tl.float16) * 0.00390625


@triton.jit
def int8_pair_sums(even, odd, pair0, pair1, pair2, pair3, flip, half_bits, code_scale, code_offset, ASM: tl.constexpr):
    """sum_j (c_j / 256) x_j over the 8 codes of each word pair [BLOCK_N, PAIRS] in float16 pairs, summed in float32
    (INT8_PAIR_SUMS_PTX). Without ASM (Triton's interpreter runs no PTX) the same products in Triton's float16."""
    if ASM:
        return tl.inline_asm_elementwise(
            INT8_PAIR_SUMS_PTX, "=f,r,r,r,r,r,r,r,r,r,r",
            [even, odd, pair0, pair1, pair2, pair3, flip, half_bits, code_scale, code_offset],
            dtype=tl.float32, is_pure=True, pack=1,
        )  # fmt: skip
    low = int8_code_half(even, 0) * input_half(pair0, False)
    high = int8_code_half(even, 1) * input_half(pair0, True)
    low += int8_code_half(even, 2) * input_half(pair1, False)
    high += int8_code_half(even, 3) * input_half(pair1, True)
    low += int8_code_half(odd, 0) * input_half(pair2, False)
    high += int8_code_half(odd, 1) * input_half(pair2, True)
    low += int8_code_half(odd, 2) * input_half(pair3, False)
    high += int8_code_half(odd, 3) * input_half(pair3, True)
    return low.to(tl.float32) + high.to(tl.float32)


@triton.jit
def int8_words(w_ptr, rows, row_ok, start, N: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr):  # fmt: skip
    """The words of columns start..start+BLOCK_K of `rows` [BLOCK_N, BLOCK_K / 4]."""
    words = start // 4 + tl.arange(0, BLOCK_K // 4)
    ptrs = w_ptr + rows[:, None] * (K // 4) + words[None, :]
    if N % BLOCK_N == 0 and K % BLOCK_K == 0:  # decided at compile time: unmasked, vectorised loads
        return tl.load(ptrs)
    return tl.load(ptrs, mask=row_ok[:, None] & (words < K // 4)[None, :], other=0)


@triton.jit
def int8_pairs_matvec_kernel(  # autotuned over quant_kernels.INT8_PAIR_TILES by quant_kernels._int8_pairs_kernel
    x_ptr,  # int32 [K / 2]: the float16 input in pairs, x_2i in the low half
    w_ptr,  # int32 [N, K / 4]: the int8 codes [N, K], four a word (code 4i + j in byte j)
    scale_ptr,  # float32 [N]
    residual_ptr,
    out_ptr,
    flip,  # quant_kernels.INT8_PAIR_CONSTANTS, in order (INT8_PAIR_SUMS_PTX says what each is)
    half_bits,
    code_scale,
    code_offset,
    N: tl.constexpr,
    K: tl.constexpr,  # a multiple of 8
    HAS_RESIDUAL: tl.constexpr,
    PDL: tl.constexpr,
    ASM: tl.constexpr,  # through INT8_PAIR_SUMS_PTX (CUDA), else Triton's float16 ops (interpreter)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    PAIRS: tl.constexpr = BLOCK_K // 8  # word pairs (8 codes) a row a step
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    if PDL:  # the first tile of codes read before waiting for earlier kernels (as kernels.matvec)
        tl.extra.cuda.gdc_launch_dependents()
        first = int8_words(w_ptr, rows, row_ok, 0, N, K, BLOCK_N, BLOCK_K)
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros((BLOCK_N, PAIRS), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        if PDL:  # an if block, not a conditional expression: `start` is a runtime value (an scf.if)
            if start == 0:  # noqa: SIM108
                words = first
            else:
                words = int8_words(w_ptr, rows, row_ok, start, N, K, BLOCK_N, BLOCK_K)
        else:
            words = int8_words(w_ptr, rows, row_ok, start, N, K, BLOCK_N, BLOCK_K)
        even, odd = tl.split(tl.reshape(words, (BLOCK_N, PAIRS, 2)))  # codes 8i..8i+3, 8i+4..8i+7
        pairs = start // 2 + tl.arange(0, 4 * PAIRS)
        xs = tl.load(x_ptr + pairs, mask=pairs < K // 2, other=0)
        # [PAIRS, a, c]: pair 2a + c of the word pair's four, (x_8i+2p, x_8i+2p+1)
        c0, c1 = tl.split(tl.reshape(xs, (PAIRS, 2, 2)))
        pair0, pair2 = tl.split(c0)
        pair1, pair3 = tl.split(c1)
        acc += int8_pair_sums(
            even, odd, pair0[None, :], pair1[None, :], pair2[None, :], pair3[None, :], flip, half_bits, code_scale,
            code_offset, ASM,
        )  # fmt: skip
    y = tl.sum(acc, axis=1) * (256.0 * tl.load(scale_ptr + rows, mask=row_ok, other=0.0))
    if HAS_RESIDUAL:
        y += tl.load(residual_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)

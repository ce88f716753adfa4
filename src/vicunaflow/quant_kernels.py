"""Triton kernels for decode steps on int8 / int4 weights (quant.QuantWeight): qmatvec for one row,
qmatmul (tensor cores, kernels in quant_matmul_kernels.py) for batched steps of up to MATMUL_MAX_ROWS.

qmatvec is the quantized twin of `kernels.matvec`, with the same epilogues: RMSNorm of the input (for
q|k|v and gate|up), SiLU(gate)·up (for down_proj), both computed once by kernels.rows_input before the
product by default (INPUT below), and the residual added while storing the output. Each program
reads BLOCK_N weight rows once, decodes them in registers and accumulates in float32:
- int8: acc += q * x over the row, times the row's scale once at the end.
- int4: each byte holds columns 2i (low nibble) and 2i+1 (high); w = q * scale + zero per group.
  When the group size divides BLOCK_K (the tiles below, for group 128), a tile holds whole groups
  and each group's sum is folded to scale * sum(q * x) + zero * sum(x); otherwise scales are
  gathered per column (any even group size works, more slowly).

CUDA graphs: `qmatvec` and `qmatmul` do no host syncs and allocate only their output (torch's caching
allocator: graph-safe). The autotuner times its candidates on the first call of each shape, so
run one eager step per shape before capturing, as for `kernels.matvec`. The signature is
kernels.matvec's (x, weight, residual, swiglu, out, norm, eps), with a quant.QuantWeight for the weight.
Tests run both kernels on the CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch

from vicunaflow.autotuning import autotune
from vicunaflow.kernels import autotune_configs, one_row_output, pdl_options, rows_input

# (BLOCK_N, BLOCK_K, warps) the autotuner tries. A program's loads in flight set the bandwidth it
# gets: float16's tiles (kernels.TILES, 4-16 KB a step) streamed ~3.3 TB/s on a 7B, while int8 on the
# same tiles (half the bytes) reached 1.8 TB/s and int4 on 64-128-column tiles 0.55 TB/s (one H200,
# docs/benchmarks.md). So int8 tiles are twice as wide in columns, and int4 tiles hold whole groups
# of 128 (BLOCK_K a multiple of the group: the folded sum) with as many bytes as int8's.
INT8_TILES = [(2, 4096, 8), (4, 2048, 4), (4, 2048, 8), (8, 1024, 4), (8, 2048, 8), (16, 1024, 8), (1, 4096, 4)]
# with the input prepared once (INPUT "separate") a program's input reads no longer cost three times its
# codes, so taller tiles, which read the input for more rows at once, may win: the autotuner decides
INT8_TILES += [(8, 512, 4), (16, 512, 4), (32, 512, 8)]
# int8 in float16 pairs (int8_pairs): a thread's rows share their input pairs, so taller tiles too
INT8_PAIR_TILES = [*INT8_TILES, (32, 256, 4), (64, 256, 8)]
INT4_TILES = [(4, 2048, 4), (8, 1024, 4), (8, 2048, 8), (16, 1024, 8), (4, 4096, 8), (2, 4096, 4), (16, 512, 4)]

# MAGIC: codes become floats through their bits, not through I2F (int-to-float conversions run at 16 a clock
# per SM on Hopper, a quarter of integer and float adds, and capped the int8 kernel near 2.4 TB/s):
# the float32 whose bits are 0x4B000000 | c is 2**23 + c exactly for 0 <= c < 2**23, and the one
# whose bits are 0x4B400000 + c is 1.5 * 2**23 + c for |c| < 2**22; subtracting the constant leaves c.
# (Constants inside the kernels: Triton reads only constexpr globals.)


# Where qmatvec's RMSNorm / SiLU·up inputs are computed: "separate" (kernels.rows_input first, once, then a
# plain product) or "fused" (in every program, from the raw input: one launch fewer). Fused costs each
# program a pass over the input and its norm weight: with int8's 2-row tiles three times the bytes of the
# codes it reads (from L2), with int4's more. On an H200 (7B, bench_chat --quant-input) separate decodes
# int8 at 343.1 tokens/s against 313.8 fused (the int8 products 2,481 against 3,454 µs a step) and int4
# at 254.0 against 235.0.
INPUT = os.environ.get("VICUNAFLOW_QUANT_INPUT", "separate")

# int8 products of one float16 row: "half2" (quant_matmul_kernels.int8_pairs_matvec_kernel: codes and input in
# float16 pairs, 18 instructions for 8 weights) or "float32" (int8_matvec_kernel below: each code through the
# float bits, then an FFMA, about 5 a weight with the input's conversion). Other inputs (bfloat16, float32,
# RMSNorm or SiLU·up inside) take float32.
INT8_MATH = os.environ.get("VICUNAFLOW_INT8_MATH", "half2")
# the PTX's constants as int32 kernel arguments: a byte's sign bit four times, float16 1024's high byte four
# times, then float16 pairs 2^-8 and -4.5 (quant_matmul_kernels.INT8_PAIR_SUMS_PTX)
INT8_PAIR_CONSTANTS = tuple(
    v - (1 << 32) if v >= 1 << 31 else v for v in (0x80808080, 0x64646464, 0x1C001C00, 0xC480C480)
)


def qmatvec(
    x: torch.Tensor,
    qw,
    residual: torch.Tensor | None = None,
    swiglu: bool = False,
    out: torch.Tensor | None = None,
    norm: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """out = x @ W.T (+ residual) for one row, W = qw (a quant.QuantWeight) decoded on the fly.

    x: [1, K], or [1, 2K] with swiglu (input = silu(x[:, :K]) * x[:, K:]); residual: [1, N] or None.
    Returns a new [1, N] tensor of x's dtype, or `out` ([1, N], contiguous, any float dtype: tensor
    parallelism writes float32 partial sums straight into its all-reduce buffer), as kernels.matvec.
    norm: [K], RMSNorm's weight: the input is rms_norm(x, norm, eps), computed in float32 by every
    program (a first pass over the few-KB row, as kernels.matvec does).
    """
    n, k = qw.shape
    out = one_row_output("qmatvec", x, (n, k), swiglu, norm, out, x.dtype)
    if INPUT == "separate" and (swiglu or norm is not None):
        x = rows_input(x.contiguous(), norm=norm, eps=eps, swiglu=swiglu, dtype=model_dtype(x, norm))
        norm, swiglu = None, False
    tensors = [x, qw.qweight, qw.scales] + ([qw.zeros] if qw.zeros is not None else [])
    if not all(t.is_contiguous() for t in tensors) or (residual is not None and not residual.is_contiguous()):
        raise ValueError("qmatvec: input, residual and weight tensors must be contiguous")
    grid = lambda meta: (-(-n // meta["BLOCK_N"]),)  # noqa: E731
    res = residual if residual is not None else out
    if int8_pairs(x, qw, swiglu, norm):
        _int8_pairs_kernel()[grid](
            x.view(torch.int32), qw.qweight.view(torch.int32), qw.scales, res, out, *INT8_PAIR_CONSTANTS, n, k,
            HAS_RESIDUAL=residual is not None, ASM=x.device.type == "cuda", **pdl_options(x.device),
        )  # fmt: skip
        return out
    flags = dict(SWIGLU=swiglu, HAS_RESIDUAL=residual is not None, NORM=norm is not None, **pdl_options(x.device))
    norm = norm if norm is not None else x  # not read without NORM
    if qw.bits == 8:
        _int8_kernel()[grid](x, qw.qweight, qw.scales, res, out, norm, eps, n, k, **flags)
    else:
        _int4_kernel()[grid](x, qw.qweight, qw.scales, qw.zeros, res, out, norm, eps, n, k, qw.group_size, **flags)
    return out


def int8_pairs(x: torch.Tensor, qw, swiglu: bool, norm: torch.Tensor | None) -> bool:
    """Whether qmatvec's int8 product goes through float16 pairs (INT8_MATH): a plain float16 input whose K is
    whole word pairs (8 codes), its tensors viewable as int32 words."""
    if INT8_MATH not in ("half2", "float32"):
        raise ValueError(f"qmatvec: VICUNAFLOW_INT8_MATH={INT8_MATH!r}: choose half2 or float32")
    k = qw.shape[1]
    return (
        INT8_MATH == "half2" and qw.bits == 8 and x.dtype == torch.float16 and not swiglu and norm is None
        and k % 8 == 0 and x.storage_offset() % 2 == 0 and qw.qweight.storage_offset() % 4 == 0
    )  # fmt: skip


def model_dtype(x: torch.Tensor, norm: torch.Tensor | None) -> torch.dtype:
    """A one-row product's model dtype: its RMSNorm weight's where it has one (x may be tensor parallelism's
    float32 sums), else x's."""
    return norm.dtype if norm is not None else x.dtype


@functools.cache
def _int8_pairs_kernel():
    """quant_matmul_kernels.int8_pairs_matvec_kernel autotuned over INT8_PAIR_TILES (lazily: importing this module
    must not need Triton, and the kernels' module does not import this one)."""
    from vicunaflow import quant_matmul_kernels

    configs = autotune_configs(INT8_PAIR_TILES, interpreted=(16, 64))
    return autotune(configs=configs, key=["N", "K", "HAS_RESIDUAL", "PDL"])(
        quant_matmul_kernels.int8_pairs_matvec_kernel
    )


@functools.cache
def _int8_kernel():
    """Compile lazily: importing this module must not need Triton."""
    import triton
    import triton.language as tl

    @autotune(configs=autotune_configs(INT8_TILES, interpreted=(16, 64)), key=["N", "K", "SWIGLU", "NORM", "PDL"])
    @triton.jit
    def int8_matvec_kernel(
        x_ptr,
        q_ptr,  # int8 [N, K]
        scale_ptr,  # float32 [N]
        residual_ptr,
        out_ptr,
        norm_ptr,  # [K] RMSNorm weight (NORM)
        eps,
        N: tl.constexpr,
        K: tl.constexpr,
        SWIGLU: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
        NORM: tl.constexpr,
        PDL: tl.constexpr,  # programmatic dependent launch (kernels.PDL)
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        MAGIC_SIGNED: tl.constexpr = 0x4B400000  # see MAGIC above
        MAGIC_SIGNED_VALUE: tl.constexpr = 12582912.0
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        if PDL:  # the first tile of codes read before waiting for earlier kernels (as kernels.matvec)
            tl.extra.cuda.gdc_launch_dependents()
            first_cols = tl.arange(0, BLOCK_K)
            first_ptrs = q_ptr + rows[:, None] * K + first_cols[None, :]
            if N % BLOCK_N == 0 and K % BLOCK_K == 0:
                first_q = tl.load(first_ptrs)
            else:
                first_q = tl.load(first_ptrs, mask=row_ok[:, None] & (first_cols < K)[None, :], other=0)
            tl.extra.cuda.gdc_wait()
        if NORM:  # 1 / sqrt(mean(x^2) + eps); the input is then x * rstd * norm weight
            squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for start in range(0, K, BLOCK_K):
                cols = start + tl.arange(0, BLOCK_K)
                v = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
                squares += v * v
            rstd = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / K + eps)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            if SWIGLU:
                gate = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
                up = tl.load(x_ptr + K + cols, mask=col_ok, other=0.0).to(tl.float32)
                x = gate * tl.sigmoid(gate) * up
            else:
                x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            if NORM:
                x = x * rstd * tl.load(norm_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            q_ptrs = q_ptr + rows[:, None] * K + cols[None, :]
            if PDL:  # the first tile is already in registers
                if start == 0:
                    q = first_q
                elif N % BLOCK_N == 0 and K % BLOCK_K == 0:
                    q = tl.load(q_ptrs)
                else:
                    q = tl.load(q_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0)
            elif N % BLOCK_N == 0 and K % BLOCK_K == 0:  # compile-time: unmasked, vectorised loads
                q = tl.load(q_ptrs)
            else:
                q = tl.load(q_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0)
            # codes to floats without a conversion instruction (see MAGIC): an integer add, a float subtract
            acc += ((q.to(tl.int32) + MAGIC_SIGNED).to(tl.float32, bitcast=True) - MAGIC_SIGNED_VALUE) * x[None, :]
        y = tl.sum(acc, axis=1) * tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
        if HAS_RESIDUAL:
            y += tl.load(residual_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)

    return int8_matvec_kernel


@functools.cache
def _int4_kernel():
    import triton
    import triton.language as tl

    @autotune(configs=autotune_configs(INT4_TILES, interpreted=(16, 128)), key=["N", "K", "G", "SWIGLU", "NORM", "PDL"])
    @triton.jit
    def int4_matvec_kernel(
        x_ptr,
        q_ptr,  # uint8 [N, K // 2]: column 2i low nibble, 2i + 1 high nibble
        scale_ptr,  # float16 [N, NG]
        zero_ptr,  # float16 [N, NG]: w = q * scale + zero
        residual_ptr,
        out_ptr,
        norm_ptr,  # [K] RMSNorm weight (NORM)
        eps,
        N: tl.constexpr,
        K: tl.constexpr,  # even
        G: tl.constexpr,  # group size, even; the last group may be short
        SWIGLU: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
        NORM: tl.constexpr,
        PDL: tl.constexpr,  # programmatic dependent launch (kernels.PDL)
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,  # columns a step: BLOCK_K // 2 bytes
    ):
        KP: tl.constexpr = K // 2
        NG: tl.constexpr = (K + G - 1) // G
        HALF: tl.constexpr = BLOCK_K // 2
        FOLD: tl.constexpr = BLOCK_K % G == 0  # a tile holds whole groups (G then a power of two)
        MAGIC: tl.constexpr = 0x4B000000  # see MAGIC above
        MAGIC_VALUE: tl.constexpr = 8388608.0
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        if PDL:  # the first tile of codes (whole groups) read before waiting for earlier kernels
            tl.extra.cuda.gdc_launch_dependents()
            if FOLD:
                GT0: tl.constexpr = BLOCK_K // G
                GH0: tl.constexpr = G // 2
                first_pairs = tl.arange(0, GT0)[:, None] * GH0 + tl.arange(0, GH0)[None, :]
                first_ptrs = q_ptr + rows[:, None, None] * KP + first_pairs[None, :, :]
                if N % BLOCK_N == 0 and K % BLOCK_K == 0:
                    first_packed = tl.load(first_ptrs)
                else:
                    first_packed = tl.load(
                        first_ptrs, mask=row_ok[:, None, None] & (first_pairs < KP)[None, :, :], other=0
                    )
            tl.extra.cuda.gdc_wait()
        if NORM:
            squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for start in range(0, K, BLOCK_K):
                cols = start + tl.arange(0, BLOCK_K)
                v = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
                squares += v * v
            rstd = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / K + eps)
        if FOLD:
            GT: tl.constexpr = BLOCK_K // G  # groups a tile
            GH: tl.constexpr = G // 2  # bytes a group
            acc = tl.zeros((BLOCK_N, GT), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            if FOLD:  # byte columns as [GT, GH]: sum(w * x) = scale * sum(q * x) + zero * sum(x) per group
                pairs = start // 2 + tl.arange(0, GT)[:, None] * GH + tl.arange(0, GH)[None, :]
            else:
                pairs = start // 2 + tl.arange(0, HALF)  # byte columns
            pair_ok = pairs < KP
            even, odd = 2 * pairs, 2 * pairs + 1  # both < K where pair_ok (K even)
            if SWIGLU:
                gate = tl.load(x_ptr + even, mask=pair_ok, other=0.0).to(tl.float32)
                up = tl.load(x_ptr + K + even, mask=pair_ok, other=0.0).to(tl.float32)
                x_even = gate * tl.sigmoid(gate) * up
                gate = tl.load(x_ptr + odd, mask=pair_ok, other=0.0).to(tl.float32)
                up = tl.load(x_ptr + K + odd, mask=pair_ok, other=0.0).to(tl.float32)
                x_odd = gate * tl.sigmoid(gate) * up
            else:
                x_even = tl.load(x_ptr + even, mask=pair_ok, other=0.0).to(tl.float32)
                x_odd = tl.load(x_ptr + odd, mask=pair_ok, other=0.0).to(tl.float32)
            if NORM:
                x_even = x_even * rstd * tl.load(norm_ptr + even, mask=pair_ok, other=0.0).to(tl.float32)
                x_odd = x_odd * rstd * tl.load(norm_ptr + odd, mask=pair_ok, other=0.0).to(tl.float32)
            if FOLD:
                q_ptrs = q_ptr + rows[:, None, None] * KP + pairs[None, :, :]  # [BLOCK_N, GT, GH]
                if PDL:  # the first tile is already in registers
                    if start == 0:
                        packed = first_packed.to(tl.int32)
                    elif N % BLOCK_N == 0 and K % BLOCK_K == 0:
                        packed = tl.load(q_ptrs).to(tl.int32)
                    else:
                        packed = tl.load(q_ptrs, mask=row_ok[:, None, None] & pair_ok[None, :, :], other=0)
                        packed = packed.to(tl.int32)
                elif N % BLOCK_N == 0 and K % BLOCK_K == 0:
                    packed = tl.load(q_ptrs).to(tl.int32)
                else:
                    packed = tl.load(q_ptrs, mask=row_ok[:, None, None] & pair_ok[None, :, :], other=0).to(tl.int32)
                low = ((packed & 15) | MAGIC).to(tl.float32, bitcast=True) - MAGIC_VALUE  # codes 0..15 as floats
                high = ((packed >> 4) | MAGIC).to(tl.float32, bitcast=True) - MAGIC_VALUE
                part = tl.sum(low * x_even[None, :, :] + high * x_odd[None, :, :], axis=2)  # [BLOCK_N, GT]
                x_sum = tl.sum(x_even + x_odd, axis=1)  # [GT]
                groups = start // G + tl.arange(0, GT)
                group_ptrs = rows[:, None] * NG + groups[None, :]
                ok = row_ok[:, None] & (groups < NG)[None, :]
                scale = tl.load(scale_ptr + group_ptrs, mask=ok, other=0.0).to(tl.float32)
                zero = tl.load(zero_ptr + group_ptrs, mask=ok, other=0.0).to(tl.float32)
                acc += scale * part + zero * x_sum[None, :]
            else:  # G even: columns 2i and 2i + 1 share a group; scales gathered per column
                q_ptrs = q_ptr + rows[:, None] * KP + pairs[None, :]
                ok = row_ok[:, None] & pair_ok[None, :]
                packed = tl.load(q_ptrs, mask=ok, other=0).to(tl.int32)
                low = ((packed & 15) | MAGIC).to(tl.float32, bitcast=True) - MAGIC_VALUE  # codes 0..15 as floats
                high = ((packed >> 4) | MAGIC).to(tl.float32, bitcast=True) - MAGIC_VALUE
                group = rows[:, None] * NG + (even // G)[None, :]
                scale = tl.load(scale_ptr + group, mask=ok, other=0.0).to(tl.float32)
                zero = tl.load(zero_ptr + group, mask=ok, other=0.0).to(tl.float32)
                acc += (low * scale + zero) * x_even[None, :] + (high * scale + zero) * x_odd[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_RESIDUAL:
            y += tl.load(residual_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)

    return int4_matvec_kernel


# ---- int4 in columns of words (quant.Int4Columns): one row ----------------------------------------


def qmatvec_columns(
    x: torch.Tensor,
    cw,
    residual: torch.Tensor | None = None,
    swiglu: bool = False,
    out: torch.Tensor | None = None,
    norm: torch.Tensor | None = None,
    eps: float = 1e-6,
    tile: ColumnTile | None = None,
) -> torch.Tensor:
    """out = x @ W.T (+ residual) for one row, W = cw (a quant.Int4Columns) decoded on the fly; qmatvec's
    contract, with RMSNorm and SiLU·up computed inside the kernel (in float32; a kernel of their own before
    each product was 3 of 9 launches a layer).

    Why a layout of its own: with words [K / 8, N] a thread's 16-byte load holds one word (8 columns) of
    4 outputs, so each input value it loads serves 4 outputs, and a code becomes a number in few
    instructions: in float32 a shift, one LOP3 (mask, then the bits of 1.0) and an FFMA a weight; with
    COLUMN_MATH "half2" one LOP3 makes two codes float16s and one HFMA2 multiplies two weights (see the
    kernel). qmatvec's [N, K / 2] bytes cost it about 9 instructions a weight in its inner loop (SASS, sm_90).
    tile: the program's shape (`column_tile`'s by default; sweeps and tests pin one).
    """
    n, k = cw.shape
    out = one_row_output("qmatvec_columns", x, (n, k), swiglu, norm, out, x.dtype)
    if not (x.is_contiguous() and (residual is None or residual.is_contiguous())):
        raise ValueError("qmatvec_columns: input and residual must be contiguous")
    if COLUMN_MATH not in ("half2", "float32"):
        raise ValueError(f"qmatvec_columns: VICUNAFLOW_COLUMN_MATH={COLUMN_MATH!r}: choose half2 or float32")
    from vicunaflow import quant_matmul_kernels  # Triton: imported only when a kernel runs

    tile = tile or column_tile(n, k, residual is not None, x.device)
    if tile.split_rows % tile.block_w:
        raise ValueError(f"qmatvec_columns: {tile}: split_rows is not a multiple of block_w")
    if -(-n // tile.block_n) > cw.counters.numel():
        raise ValueError(f"qmatvec_columns: {cw.counters.numel()} counters for {n} outputs in tiles of {tile.block_n}")
    splits = -(-(k // 8) // tile.split_rows)
    half2 = COLUMN_MATH == "half2" and model_dtype(x, norm) != torch.float32
    partial = torch.empty(splits * (n + cw.counters.numel()), dtype=torch.float32, device=x.device)
    grid = (-(-n // tile.block_n), splits)
    quant_matmul_kernels.int4_columns_kernel[grid](
        x, cw.words, cw.scales, cw.zeros, residual if residual is not None else out, out,
        norm if norm is not None else x, partial, cw.counters, eps, ONE_BITS, HALF2_BITS, CODE_PAIR_BITS, n, k,
        cw.group_size,
        SWIGLU=swiglu, NORM=norm is not None, HAS_RESIDUAL=residual is not None, HALF2=half2,
        ASM=x.device.type == "cuda", BLOCK_N=tile.block_n, BLOCK_W=tile.block_w, SPLIT_ROWS=tile.split_rows,
        num_warps=tile.warps, num_stages=1, **pdl_options(x.device),
    )  # fmt: skip
    return out


@dataclasses.dataclass(frozen=True)
class ColumnTile:
    """qmatvec_columns' program: block_n outputs by block_w words (8 columns each) a step, split_rows word rows
    (8 * split_rows columns of K) a program, in `warps` warps; a thread's 16-byte loads each hold one word of 4
    outputs."""

    block_n: int
    block_w: int
    split_rows: int
    warps: int


# One tile for each kind of product, chosen in the decode step's CUDA graph, where the products follow each other
# with PDL (bench/sweep_int4_columns.py, 7B, H200, twelfth session: bench/results/int4_columns_tiles_h200.json).
# Not the autotuner: it times tiles alone, L2 flushed, and its picks ran 7% slower in the graph than the best tile
# there (ninth session). Products that add a residual (o, down) take twice the words a step in 4 warps; the
# others (RMSNorm into q|k|v and gate|up: wide products over the model's width) take longer splits of K, the
# shortest that keeps the grid within PROGRAMS_PER_SM programs an SM: a program fewer per split saves its
# partial sums' round trip. At 7B each product's tile is within 2% of the best of 24 there, and a layer takes 51.8 µs
# against 55.1 with one tile for all four (13B's q|k|v and gate|up preferred shorter splits: docs/benchmarks.md).
RESIDUAL_TILE = ColumnTile(64, 32, 64, 4)
INPUT_TILE = ColumnTile(64, 16, 64, 2)
LONGEST_SPLIT = 256  # word rows
PROGRAMS_PER_SM = 6
INTERPRETER_TILE = ColumnTile(64, 32, 64, 1)  # Triton's interpreter: fewer, larger programs run faster


def column_tile(n: int, k: int, has_residual: bool, device: torch.device) -> ColumnTile:
    """The tile qmatvec_columns runs an [n, k] product in (see RESIDUAL_TILE)."""
    if device.type != "cuda":
        return INTERPRETER_TILE
    if has_residual:
        return RESIDUAL_TILE
    tile, programs = INPUT_TILE, PROGRAMS_PER_SM * multiprocessors(device)
    while tile.split_rows < LONGEST_SPLIT and -(-n // tile.block_n) * -(-(k // 8) // tile.split_rows) > programs:
        tile = dataclasses.replace(tile, split_rows=2 * tile.split_rows)
    return tile


@functools.cache
def multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


ONE_BITS = 0x3F800000  # float32 1.0, passed as an argument: in a register, `& mask | one` is a single LOP3
HALF2_BITS, CODE_PAIR_BITS = 0x64006400, 0x000F000F  # float16 1024 twice, codes j and j + 4 (HALF2 products)
# How qmatvec_columns multiplies: "half2" (each word's 8 products in float16 pairs, then float32; float32 models keep
# float32) or "float32" (every product in float32, exactly).
COLUMN_MATH = os.environ.get("VICUNAFLOW_COLUMN_MATH", "half2")


# ---- a few rows at once: batched decode steps -----------------------------------------------------

MATMUL_MAX_ROWS = 64  # above this (prefill), decoding the weight once for cuBLAS costs less than re-reading it
# One-row steps of a quantized model: "matvec" (qmatvec, CUDA cores) or "matmul" (qmatmul, the row padded
# to 16 on tensor cores, which leaves the ALUs only the decoding); bench_chat measures both.
ONE_ROW = os.environ.get("VICUNAFLOW_QUANT_ONE_ROW", "matvec")


def qmatmul(
    x: torch.Tensor,
    qw,
    residual: torch.Tensor | None = None,
    swiglu: bool = False,
    out: torch.Tensor | None = None,
    norm: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """out = x @ W.T (+ residual) for M <= MATMUL_MAX_ROWS rows on tensor cores, W decoded tile by tile.

    Why: a batched decode step (M = 2..64 rows) that decodes each whole weight to float16 before
    cuBLAS reads and writes it three times; this reads the codes once, decodes a tile in registers
    (codes are exact in float16 and bfloat16), multiplies on tensor cores and applies the scales to
    the float32 products: int8 by output row at the end, int4 by group (one group a K step, so
    sum(w x) = scale * sum(q x) + zero * sum(x) per group). The epilogues of qmatvec: x [M, K] or,
    with swiglu, [M, 2K] (input silu(gate) * up); norm [K]: RMSNorm of each row first; residual,
    out: [M, N] contiguous (out any float dtype). The products are in bfloat16 if x (or norm) is, else
    float16 (a float32 input, tensor parallelism's residual stream, is rounded to it). Needs an int4
    group size that is a power of two >= 32.
    """
    m = x.shape[0]
    n, k = qw.shape
    if x.dim() != 2 or x.shape[1] != (2 * k if swiglu else k) or m > MATMUL_MAX_ROWS or not x.is_contiguous():
        raise ValueError(f"qmatmul: input {tuple(x.shape)} does not fit weight {qw.shape} (<= {MATMUL_MAX_ROWS} rows)")
    if norm is not None and (swiglu or norm.shape != (k,)):
        raise ValueError(f"qmatmul: norm {tuple(norm.shape)} needs a plain input of {k} columns")
    if any(t is not None and not t.is_contiguous() for t in (residual, out)):
        raise ValueError("qmatmul: residual and out must be contiguous")
    from vicunaflow import quant_matmul_kernels  # Triton: imported only when a kernel runs

    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if swiglu:  # torch first: a program per tile recomputing it for 16 padded rows tripled matmul_rows' down product
        x, swiglu = torch.nn.functional.silu(x[:, :k]) * x[:, k:], False  # [M, K]
    block_m = max(16, 1 << (m - 1).bit_length())  # tl.dot's smallest tile is 16
    grid = lambda meta: (-(-n // meta["BLOCK_N"]),)  # noqa: E731
    res = residual if residual is not None else out
    flags = dict(HAS_RESIDUAL=residual is not None, SWIGLU=swiglu, NORM=norm is not None, BLOCK_M=block_m)
    flags["BF16"] = (norm if norm is not None else x).dtype == torch.bfloat16  # the products' dtype
    norm = norm if norm is not None else x  # not read without NORM
    if qw.bits == 8:
        quant_matmul_kernels.int8_matmul_kernel[grid](x, qw.qweight, qw.scales, res, out, norm, eps, m, n, k, **flags)
    else:
        if not matmul_fits(qw):
            raise ValueError(f"qmatmul: int4 group size {qw.group_size} is not a power of two >= 32")
        columns = not hasattr(qw, "qweight")  # quant.Int4Columns
        quant_matmul_kernels.int4_matmul_kernel[grid](
            x, qw.words if columns else qw.qweight, qw.scales, qw.zeros, res, out, norm, eps, m, n, k,
            G=qw.group_size, COLUMNS=columns, **flags,
        )  # fmt: skip
    return out


def matmul_fits(qw) -> bool:
    """qmatmul takes int8, and int4 whose groups are a power of two of at least 32 columns (groups of 16
    gave wrong sums on an H200 and are left to the decoding path)."""
    g = qw.group_size or 0
    return qw.bits == 8 or (g >= 32 and g & (g - 1) == 0)

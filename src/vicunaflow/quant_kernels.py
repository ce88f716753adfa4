"""Triton matvec kernels for one-row decode steps on int8 / int4 weights (quant.QuantWeight).

The quantized twin of `kernels.matvec`, with the same epilogues: RMSNorm of the input folded in
(for q|k|v and gate|up: one launch fewer), SiLU(gate)·up computed while loading the input (for
down_proj) and the residual added while storing the output. Each program
reads BLOCK_N weight rows once, decodes them in registers and accumulates in float32:
- int8: acc += q * x over the row, times the row's scale once at the end.
- int4: each byte holds columns 2i (low nibble) and 2i+1 (high); w = q * scale + zero per group.
  When BLOCK_K divides the group size (the tiles below, for group 128), a tile lies in one group
  and the sum is folded to scale * sum(q * x) + zero * sum(x); otherwise scales are gathered per
  column (any group size works, more slowly).

CUDA graphs: `qmatvec` does no host syncs and allocates only its output (torch's caching
allocator: graph-safe). The autotuner times its candidates on the first call of each shape, so
run one eager step per shape before capturing, as for `kernels.matvec`. The signature is
kernels.matvec's (x, weight, residual, swiglu, out, norm, eps), with a quant.QuantWeight for the weight.
Tests run both kernels on the CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import functools

import torch

from vicunaflow.kernels import TILES, autotune_configs, one_row_output

# (BLOCK_N, BLOCK_K, warps) for int4: BLOCK_K divides the default group of 128, so tiles take the
# folded path. Not timed on a GPU yet (bench/sweep_matvec.py does it for float16).
INT4_TILES = [(8, 128, 4), (16, 128, 4), (32, 128, 4), (32, 64, 4), (64, 128, 8), (16, 64, 2)]


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
    tensors = [x, qw.qweight, qw.scales] + ([qw.zeros] if qw.zeros is not None else [])
    if not all(t.is_contiguous() for t in tensors) or (residual is not None and not residual.is_contiguous()):
        raise ValueError("qmatvec: input, residual and weight tensors must be contiguous")
    grid = lambda meta: (-(-n // meta["BLOCK_N"]),)  # noqa: E731
    res = residual if residual is not None else out
    flags = dict(SWIGLU=swiglu, HAS_RESIDUAL=residual is not None, NORM=norm is not None)
    norm = norm if norm is not None else x  # not read without NORM
    if qw.bits == 8:
        _int8_kernel()[grid](x, qw.qweight, qw.scales, res, out, norm, eps, n, k, **flags)
    else:
        _int4_kernel()[grid](x, qw.qweight, qw.scales, qw.zeros, res, out, norm, eps, n, k, qw.group_size, **flags)
    return out


@functools.cache
def _int8_kernel():
    """Compile lazily: importing this module must not need Triton."""
    import triton
    import triton.language as tl

    @triton.autotune(configs=autotune_configs(TILES, interpreted=(16, 64)), key=["N", "K", "SWIGLU", "NORM"])
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
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
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
            if N % BLOCK_N == 0 and K % BLOCK_K == 0:  # compile-time: unmasked, vectorised loads
                q = tl.load(q_ptrs)
            else:
                q = tl.load(q_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0)
            acc += q.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1) * tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
        if HAS_RESIDUAL:
            y += tl.load(residual_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)

    return int8_matvec_kernel


@functools.cache
def _int4_kernel():
    import triton
    import triton.language as tl

    @triton.autotune(configs=autotune_configs(INT4_TILES, interpreted=(16, 64)), key=["N", "K", "G", "SWIGLU", "NORM"])
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
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,  # columns a step: BLOCK_K // 2 bytes
    ):
        KP: tl.constexpr = K // 2
        NG: tl.constexpr = (K + G - 1) // G
        HALF: tl.constexpr = BLOCK_K // 2
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        if NORM:
            squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for start in range(0, K, BLOCK_K):
                cols = start + tl.arange(0, BLOCK_K)
                v = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
                squares += v * v
            rstd = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / K + eps)
        acc = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
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
            q_ptrs = q_ptr + rows[:, None] * KP + pairs[None, :]
            if N % BLOCK_N == 0 and K % BLOCK_K == 0:
                packed = tl.load(q_ptrs).to(tl.int32)
            else:
                packed = tl.load(q_ptrs, mask=row_ok[:, None] & pair_ok[None, :], other=0).to(tl.int32)
            low = (packed & 15).to(tl.float32)
            high = (packed >> 4).to(tl.float32)
            if G % BLOCK_K == 0:  # compile-time: the whole tile is in group start // G
                group = rows * NG + start // G
                scale = tl.load(scale_ptr + group, mask=row_ok, other=0.0).to(tl.float32)
                zero = tl.load(zero_ptr + group, mask=row_ok, other=0.0).to(tl.float32)
                acc += scale[:, None] * (low * x_even[None, :] + high * x_odd[None, :])
                acc += zero[:, None] * (x_even + x_odd)[None, :]
            else:  # G even: columns 2i and 2i + 1 share a group
                group = rows[:, None] * NG + (even // G)[None, :]
                ok = row_ok[:, None] & pair_ok[None, :]
                scale = tl.load(scale_ptr + group, mask=ok, other=0.0).to(tl.float32)
                zero = tl.load(zero_ptr + group, mask=ok, other=0.0).to(tl.float32)
                acc += (low * scale + zero) * x_even[None, :] + (high * scale + zero) * x_odd[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_RESIDUAL:
            y += tl.load(residual_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)

    return int4_matvec_kernel

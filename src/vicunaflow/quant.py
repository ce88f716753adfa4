"""Weight-only int8 and int4 quantization of LLaMA's Linear weights: the format, the math, a weight module.

Why: a decode step reads every weight once, so tokens/s follows bytes per weight. int8 halves
the bytes of float16, int4 (group 128) cuts them to 4.25 bits a weight; the activations stay in
the compute dtype (float16/bfloat16 on CUDA, float32 on CPU).

Formats (docs/quantize.md), for a Linear weight W [N out, K in]:
- int8: symmetric, one float32 scale per output row: scale = max|W[n]| / 127,
  q = clamp(round(W / scale), -127, 127) (int8; -128 unused, so the grid is symmetric),
  W ~ q * scale.
- int4: asymmetric, one float16 (scale, zero) pair per output row and group of `group_size`
  input columns (the last group may be shorter): W ~ q * scale + zero, q = 0..15. `zero` is the
  float value code 0 decodes to (not GPTQ's integer zero point), so the ends of the group's range
  land exactly on codes 0 and 15 and no level is wasted on the side of zero a group does not
  reach. The range is [min, max] of the group, or that range shrunk about its middle by the
  ratio in CLIP_RATIOS of least squared error for the group (values outside clamp to 0 or 15):
  zero = range start, scale = range width / 15. Two codes a byte: column 2i in the low nibble.
Rounding is to nearest (ties to even), computed in float32 with the stored (already rounded)
scale and zero, so dequantizing anywhere (CPU, GPU, Triton) decodes the same grid.

`quantize` runs per weight at load time (on whatever device the weight is); `QuantWeight` holds the
result and is an nn.Module, so `.to(device)` and `state_dict()` carry its tensors; `qlinear` is
the one call a model makes: the Triton matvec for one row on CUDA, dequantize + matmul otherwise.
`shard` / `cat` split and fuse quantized weights for tensor parallelism without requantizing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vicunaflow import VicunaflowError, kernels, quant_kernels
from vicunaflow.formats import read_config

BITS = (8, 4)
DEFAULT_GROUP_SIZE = 128
FORMAT_VERSION = 1
QUANT_METHOD = "vicunaflow"
# The Linear weights quantized in a LLaMA checkpoint (`vicunaflow quantize`); embeddings, norms and lm_head stay
# in float (lm_head is 2% of 7B's bytes and its error goes straight into the logits). Beside int4 layers the engine
# quantizes lm_head at load (engine/build.py), so a folder reads the same whichever version wrote it.
QUANTIZED_WEIGHT = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")
SUFFIXES = ("qweight", "scales", "zeros")  # tensor names in a quantized folder: <module>.<suffix>
# int4 ranges tried per group, as fractions of [min, max] shrunk about its middle; each group keeps
# the one of least squared error, so clipping a rare extreme buys finer steps for the rest (never
# worse than 1.0 alone: -5.7% weight error, -6.5% logit error at group 128 on the tiny model,
# bench/quant_error.py).
CLIP_RATIOS = (1.0, 0.98, 0.96, 0.94, 0.92, 0.9, 0.88, 0.86, 0.84, 0.82, 0.8)


class QuantWeight(nn.Module):
    """A quantized [N, K] Linear weight: qweight, scales, zeros (int4 only), bits, group_size, shape.

    qweight: int8 [N, K] (bits 8) or uint8 [N, K/2] (bits 4, two codes a byte).
    scales: float32 [N] (bits 8) or float16 [N, ceil(K/group_size)] (bits 4).
    zeros: None (bits 8) or float16 [N, ceil(K/group_size)]: W ~ q * scale + zero.
    Calling it is `qlinear(x, self, residual, swiglu, out=..., matvec=...)`.
    """

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        bits: int,
        group_size: int | None,
        shape: tuple[int, int],
    ):
        super().__init__()
        self.bits, self.group_size, self.shape = bits, group_size, (int(shape[0]), int(shape[1]))
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        _check_layout(self)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros) if t is not None)

    def dequantize(self, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        """The [N, K] weight the codes stand for, computed in float32 and rounded once to `dtype`."""
        k = self.shape[1]
        if self.bits == 8:
            return (self.qweight.float() * self.scales[:, None]).to(dtype)
        codes = unpack_int4(self.qweight, k).float()  # [N, K]
        scales = self.scales.float().repeat_interleave(self.group_size, dim=1)[:, :k]
        zeros = self.zeros.float().repeat_interleave(self.group_size, dim=1)[:, :k]
        return torch.addcmul(zeros, codes, scales).to(dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, swiglu: bool = False, **options
    ) -> torch.Tensor:
        return qlinear(x, self, residual, swiglu, **options)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, bits={self.bits}, group_size={self.group_size}"


def quantize(w: torch.Tensor, bits: int = 8, group_size: int = DEFAULT_GROUP_SIZE) -> QuantWeight:
    """Quantize one [N, K] Linear weight (on its own device); see the module docstring for the math."""
    if w.dim() != 2:
        raise VicunaflowError(f"quantize: expected a [out, in] weight, got shape {tuple(w.shape)}")
    if bits not in BITS:
        raise VicunaflowError(f"quantize: bits must be 8 or 4, not {bits}")
    if not bool(torch.isfinite(w).all()):  # one host sync, at load time
        raise VicunaflowError("quantize: the weight holds inf or NaN")
    n, k = w.shape
    w32 = w.float()
    if bits == 8:
        scales = _divide(w32.abs().amax(dim=1), 127)
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero row: any scale works
        qweight = torch.round(w32 / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        return QuantWeight(qweight, scales, None, 8, None, (n, k))
    _check_group_size(group_size, k)
    groups = -(-k // group_size)
    pad = groups * group_size - k
    if pad:  # the last group is short: repeat its last column, which changes neither min nor max
        w32 = torch.cat([w32, w32[:, -1:].expand(n, pad)], dim=1)
    grouped = w32.view(n, groups, group_size)
    valid = (torch.arange(groups * group_size, device=w.device) < k).view(groups, group_size)  # not the padding
    # Blocks of rows: on the CPU 64K values, so the search's temporaries stay in L2 (10x faster than
    # whole 7B matrices); on a GPU 16M, so a 65B MLP weight does not need gigabytes of temporaries.
    rows = max(1, (1 << (24 if w.device.type == "cuda" else 16)) // (groups * group_size))
    ranges = [_search_range(grouped[i : i + rows], valid) for i in range(0, n, rows)]
    scales, zeros = torch.cat([r[0] for r in ranges]), torch.cat([r[1] for r in ranges])
    codes = _codes(grouped, scales, zeros).to(torch.uint8).view(n, groups * group_size)[:, :k]
    return QuantWeight(pack_int4(codes), scales, zeros, 4, group_size, (n, k))


def _divide(values: torch.Tensor, divisor: int) -> torch.Tensor:
    """values / divisor rounded as IEEE division on every device. CUDA divides by a Python number as a
    multiply by its reciprocal (off by an ulp at times), so quantizing at load on a GPU gave int8 codes
    that differed from those of the folder `vicunaflow quantize` wrote on the CPU; a tensor divisor
    divides exactly there too."""
    return values / torch.full_like(values, divisor)


def _search_range(grouped: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 (scales, zeros) [rows, groups]: per group, the CLIP_RATIOS range of least squared error."""
    low, high = grouped.amin(dim=2), grouped.amax(dim=2)
    mid = (low + high) / 2
    best_error = scales = zeros = None
    for ratio in CLIP_RATIOS:  # each group keeps the range of least squared error (1.0: min and max)
        zero = (mid + (low - mid) * ratio).to(torch.float16)
        scale = _divide((high - low) * ratio, 15).to(torch.float16)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: every code 0
        decoded = _codes(grouped, scale, zero).mul_(scale.float()[..., None]).add_(zero.float()[..., None])
        error = decoded.sub_(grouped).square_().mul_(valid).sum(dim=2)
        if best_error is None:
            best_error, scales, zeros = error, scale, zero
        else:
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            scales, zeros = torch.where(better, scale, scales), torch.where(better, zero, zeros)
    return scales, zeros


def _codes(grouped: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Round to nearest on the stored (float16) grid: float32 codes 0..15 of [N, groups, G] values."""
    return torch.round((grouped - zeros.float()[..., None]) / scales.float()[..., None]).clamp_(0, 15)


def qlinear(
    x: torch.Tensor,
    qw: QuantWeight | Int4Packed | Int4Columns,
    residual: torch.Tensor | None = None,
    swiglu: bool = False,
    *,
    out: torch.Tensor | None = None,
    matvec: bool | None = None,
    norm: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """x @ W.T (+ residual), W = qw decoded; with swiglu, x is [..., 2K] = gate | up and the input is
    silu(gate) * up (kernels.matvec's epilogues). Returns x's dtype, or writes into `out` (any float
    dtype: a float32 all-reduce buffer for tensor parallelism) and returns it. norm: RMSNorm's weight
    [K]: the input is rms_norm(x, norm, eps) first (folded into the kernel for one row).

    matvec: None picks the Triton kernels on CUDA in float16/bfloat16 (graph-capturable, the codes read
    once): qmatvec for one row (or qmatmul, with quant_kernels.ONE_ROW = "matmul"), qmatmul for up to
    MATMUL_MAX_ROWS rows (batched decode steps); True takes them too, and qmatvec for one row even off
    CUDA (Triton's interpreter on a CPU); False never. Otherwise (prefill, CPU): dequantize to x's
    dtype, then a plain matmul. An Int4Packed weight takes tinygemm for every row count (int4pack_linear).
    """
    if isinstance(qw, Int4Packed):
        return int4pack_linear(x, qw, residual, swiglu, out=out, norm=norm, eps=eps)
    n, k = qw.shape
    if x.shape[-1] != (2 * k if swiglu else k):
        raise ValueError(f"qlinear: input {tuple(x.shape)} does not fit weight {qw.shape}")
    rows = x.numel() // x.shape[-1]
    one_row = rows == 1
    on_tensor_cores = (
        (not one_row or quant_kernels.ONE_ROW == "matmul")
        and rows <= quant_kernels.MATMUL_MAX_ROWS
        and quant_kernels.matmul_fits(qw)
        and matvec is not False
        and _kernel_fits(x, qw)
    )
    on_cuda_cores = one_row and (matvec or (matvec is None and _kernel_fits(x, qw)))
    if on_tensor_cores or on_cuda_cores:  # the kernels take the same arguments and check their layouts
        one_row_kernel = quant_kernels.qmatvec_columns if isinstance(qw, Int4Columns) else quant_kernels.qmatvec
        kernel = quant_kernels.qmatmul if on_tensor_cores else one_row_kernel
        flat_out = None if out is None else out.view(rows, n)
        flat_residual = None if residual is None else residual.reshape(rows, n)
        y = kernel(x.reshape(rows, -1).contiguous(), qw, flat_residual, swiglu, out=flat_out, norm=norm, eps=eps)
        return out if out is not None else y.view(*x.shape[:-1], n)
    x = kernels.plain_input(x, norm=norm, eps=eps, swiglu=swiglu)
    y = F.linear(x, qw.dequantize(x.dtype))
    if residual is not None:
        y += residual
    return y if out is None else out.copy_(y)


def _kernel_fits(x: torch.Tensor, qw: QuantWeight) -> bool:
    return (
        x.device.type == "cuda"
        and qw.device == x.device
        and x.dtype in (torch.float16, torch.bfloat16)
        and kernels.available()
    )


# --------------------------------------------------------------------------------------------
# int4 on torch's tinygemm kernel

# int4 products on CUDA: "columns" (Int4Columns: quant_kernels.qmatvec_columns, any float16/bfloat16 model),
# "tinygemm" (Int4Packed, torch's kernel; the model then computes in bfloat16) or "triton" (quant_kernels on
# the stored layout). engine.load reads it (None: by use, int4_kernel_for); bench_chat --int4-kernel times them.
INT4_KERNELS = ("columns", "tinygemm", "triton")
INT4_KERNEL = os.environ.get("VICUNAFLOW_INT4_KERNEL")


def int4_kernel_for(one_stream: bool) -> str:
    """$VICUNAFLOW_INT4_KERNEL, else the faster kernel for the use: Int4Columns when one conversation decodes
    at a time (chat: one-row steps at 7B on an H200, 464 tokens/s against tinygemm's 355), tinygemm when
    steps batch many (serve: 8 streams 1,087 against 572 tokens/s; docs/benchmarks.md)."""
    return INT4_KERNEL or ("columns" if one_stream else "tinygemm")


TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)


class Int4Packed(nn.Module):
    """An int4 weight in the layout of torch's tinygemm kernel (`torch._weight_int4pack_mm`, gpt-fast's).

    Why: it decodes codes on tensor cores, where quant_kernels' int4 matvec spends more instructions per
    weight than the bytes allow. On an H200 a 7B decodes at 366-371 tokens/s with it against 254-269 with
    ours (float16: 269-272; docs/benchmarks.md, fifth session). It takes bfloat16 inputs
    only, so a model holding these computes in bfloat16, and it has no epilogues (kernels.rows_input
    prepares its input; the residual is a torch add).
    Same codes as the QuantWeight it is packed from (`int4pack`); tinygemm decodes w = (q - 8) * scale
    + zero', so zero' = zero + 8 * scale, and scales and zeros are stored as bfloat16 [K / G, N, 2].
    packed: tinygemm's opaque int32 tiles on CUDA, its CPU layout (uint8) on the CPU.
    """

    bits = 4

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, shape):
        super().__init__()
        self.group_size, self.shape = group_size, (int(shape[0]), int(shape[1]))
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales_and_zeros))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, swiglu: bool = False, **options):
        return int4pack_linear(x, self, residual, swiglu, **options)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, bits=4, group_size={self.group_size}, layout=tinygemm"


def int4pack(qw: QuantWeight) -> Int4Packed | QuantWeight:
    """qw (int4) in tinygemm's layout on qw's device, or qw itself where the kernel cannot take its shape
    (group size 32-256 dividing K, N a multiple of 16 (the CPU kernel's tile), K of 32)."""
    n, k = qw.shape
    inner_k_tiles = next((tiles for tiles in (8, 4, 2) if k % (16 * tiles) == 0), None)
    if qw.bits != 4 or qw.group_size not in TINYGEMM_GROUP_SIZES or k % qw.group_size or n % 16 or not inner_k_tiles:
        return qw
    codes = unpack_int4(qw.qweight, k)  # [N, K] uint8 0..15
    if qw.device.type == "cuda":  # two codes a byte, even column in the high nibble
        packed = torch._convert_weight_to_int4pack((codes[:, 0::2] << 4) | codes[:, 1::2], inner_k_tiles)
    else:
        packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), inner_k_tiles)
    del codes
    scales = qw.scales.float()  # [N, K / G]
    zeros = qw.zeros.float() + 8 * scales
    scales_and_zeros = torch.stack([scales.T, zeros.T], dim=2).to(torch.bfloat16).contiguous()  # [K / G, N, 2]
    return Int4Packed(packed, scales_and_zeros, qw.group_size, (n, k))


def int4pack_linear(
    x: torch.Tensor,
    w: Int4Packed,
    residual: torch.Tensor | None = None,
    swiglu: bool = False,
    *,
    out: torch.Tensor | None = None,
    norm: torch.Tensor | None = None,
    eps: float = 1e-6,
    matvec: bool | None = None,
) -> torch.Tensor:
    """qlinear's contract for an Int4Packed weight, any number of rows: the input prepared in bfloat16
    (RMSNorm, SiLU·up, cast: kernels.rows_input on CUDA), tinygemm's product, then the residual added.
    Returns bfloat16 (or float32 with a float32 residual), or writes into `out`. matvec is ignored:
    every row count takes the same kernel."""
    n, k = w.shape
    if x.shape[-1] != (2 * k if swiglu else k):
        raise ValueError(f"int4pack_linear: input {tuple(x.shape)} does not fit weight {w.shape}")
    rows = x.numel() // x.shape[-1]
    flat = x.reshape(rows, x.shape[-1])
    cuda = flat.device.type == "cuda"
    if norm is not None or swiglu or flat.dtype != torch.bfloat16 or not flat.is_contiguous():
        if cuda and kernels.available():
            flat = kernels.rows_input(flat.contiguous(), norm=norm, eps=eps, swiglu=swiglu, dtype=torch.bfloat16)
        else:  # in float32, rounded once, as rows_input
            norm32 = norm.float() if norm is not None else None
            flat = kernels.plain_input(flat.float(), norm=norm32, eps=eps, swiglu=swiglu)
            flat = flat.to(torch.bfloat16).contiguous()
    product = torch._weight_int4pack_mm if cuda else torch._weight_int4pack_mm_for_cpu
    y = product(flat, w.packed, w.group_size, w.scales_and_zeros)  # [rows, N] bfloat16
    flat_out = None if out is None else out.view(rows, n)
    if residual is not None:
        y = torch.add(residual.reshape(rows, n), y, out=flat_out)
    elif flat_out is not None:
        y = flat_out.copy_(y)
    return out if out is not None else y.view(*x.shape[:-1], n)


# --------------------------------------------------------------------------------------------
# int4 in columns of words, for quant_kernels.qmatvec_columns


class Int4Columns(nn.Module):
    """An int4 weight laid out for quant_kernels' columns kernels: the same codes, scales and zeros as the
    QuantWeight it comes from (`int4columns`), transposed.

    words: int32 [K / 8, N]: word (i, n) holds columns 8i..8i+7 of output n, column 8i + j in bits 4j..4j+3
    (a QuantWeight's bytes of one row, read as int32, transposed). scales, zeros: float16 [K / G, N].
    counters: int32 zeros, one per 8 outputs, for the kernel's split over K (its last program of an output
    tile resets its count). Why: see qmatvec_columns. Same bytes as the QuantWeight.
    """

    bits = 4

    def __init__(self, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, shape):
        super().__init__()
        self.group_size, self.shape = group_size, (int(shape[0]), int(shape[1]))
        self.register_buffer("words", words)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        counters = torch.zeros(-(-self.shape[0] // 8), dtype=torch.int32, device=words.device)
        self.register_buffer("counters", counters, persistent=False)

    @property
    def device(self) -> torch.device:
        return self.words.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.words, self.scales, self.zeros))

    def quant_weight(self) -> QuantWeight:
        """Back to the QuantWeight layout (the stored format)."""
        n, k = self.shape
        qweight = self.words.T.contiguous().view(torch.uint8).view(n, k // 2)
        return QuantWeight(qweight, self.scales.T.contiguous(), self.zeros.T.contiguous(), 4, self.group_size, (n, k))

    def dequantize(self, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        """The [N, K] weight (a transposed view on CUDA), as QuantWeight.dequantize computes it: q * scale + zero
        in float32, rounded once. On CUDA one Triton kernel writes it (a prefill's product: torch's several
        float32 passes took a 7B's first token from 8 to 152 ms on an H200); elsewhere the QuantWeight's path."""
        if self.device.type == "cuda" and kernels.available():
            return decode_columns(self, dtype).T
        return self.quant_weight().dequantize(dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, swiglu: bool = False, **options):
        return qlinear(x, self, residual, swiglu, **options)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, bits=4, group_size={self.group_size}, layout=columns"


def decode_columns(cw: Int4Columns, dtype: torch.dtype) -> torch.Tensor:
    """W.T [K, N] of an Int4Columns weight in `dtype`, by quant_matmul_kernels' decode kernel (Triton: CUDA, or
    the interpreter)."""
    from vicunaflow import quant_matmul_kernels  # Triton: imported only when a kernel runs

    n, k = cw.shape
    transposed = torch.empty(k, n, dtype=dtype, device=cw.device)
    grid = (-(-k // 8 // 16), -(-n // 128))
    quant_matmul_kernels.int4_columns_decode_kernel[grid](
        cw.words, cw.scales, cw.zeros, transposed, n, k, G=cw.group_size, BLOCK_W=16, BLOCK_N=128
    )
    return transposed


def int4columns(qw: QuantWeight) -> Int4Columns | QuantWeight:
    """qw (int4) as Int4Columns on qw's device, or qw itself where the kernels cannot take it (K and the
    group size must be multiples of 8: a word's 8 columns share a group; the last group may be short)."""
    n, k = qw.shape
    if qw.bits != 4 or k % 8 or qw.group_size % 8:
        return qw
    words = qw.qweight.view(torch.int32).T.contiguous()  # [N, K / 8] -> [K / 8, N]
    return Int4Columns(words, qw.scales.T.contiguous(), qw.zeros.T.contiguous(), qw.group_size, (n, k))


# --------------------------------------------------------------------------------------------
# int4 packing


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes 0..15 (K even) -> uint8 [N, K/2]: column 2i in the low nibble, 2i+1 in the high one."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 [N, K] codes."""
    return torch.stack([packed & 15, packed >> 4], dim=2).view(packed.shape[0], -1)[:, :k]


# --------------------------------------------------------------------------------------------
# Tensor parallelism


def shard(qw: QuantWeight, dim: int, rank: int, world: int) -> QuantWeight:
    """Rank `rank`'s part of `qw` split in `world` along `dim`, with its scales and zeros (contiguous copies).

    dim 0 splits output rows (column-parallel q|k|v, gate|up: shard each, then `cat`); dim 1
    splits input columns (row-parallel o_proj, down_proj). A dim-1 split of int4 must fall on group
    boundaries, so it equals quantizing the slice; int8 keeps each row's scale, so the shards
    decode exactly the columns of the unsharded weight (quantizing a slice alone would not).
    """
    n, k = qw.shape
    if dim not in (0, 1) or not 0 <= rank < world:
        raise ValueError(f"shard: dim {dim}, rank {rank} of {world}")
    size = qw.shape[dim]
    if size % world:
        raise VicunaflowError(f"shard: dimension {dim} of {qw.shape} does not split {world} ways")
    part = size // world
    lo, hi = rank * part, (rank + 1) * part
    if dim == 0:
        zeros = None if qw.zeros is None else qw.zeros[lo:hi].contiguous()
        return QuantWeight(
            qw.qweight[lo:hi].contiguous(), qw.scales[lo:hi].contiguous(), zeros, qw.bits, qw.group_size, (part, k)
        )
    if qw.bits == 8:
        return QuantWeight(qw.qweight[:, lo:hi].contiguous(), qw.scales.clone(), None, 8, None, (n, part))
    if part % qw.group_size and world > 1:
        raise VicunaflowError(
            f"shard: {world} ranks split the {k} input columns into parts of {part}, not a multiple of "
            f"the int4 group size {qw.group_size}; quantize with a group size dividing {part}"
        )
    g_lo, g_hi = lo // qw.group_size, -(-hi // qw.group_size)
    return QuantWeight(
        qw.qweight[:, lo // 2 : hi // 2].contiguous(), qw.scales[:, g_lo:g_hi].contiguous(),
        qw.zeros[:, g_lo:g_hi].contiguous(), 4, qw.group_size, (n, part),
    )  # fmt: skip


def cat(weights: list[QuantWeight]) -> QuantWeight:
    """Stack quantized weights along their output rows (fused q|k|v, gate|up): same K, bits and groups."""
    first = weights[0]
    for qw in weights[1:]:
        if (qw.bits, qw.group_size, qw.shape[1]) != (first.bits, first.group_size, first.shape[1]):
            raise VicunaflowError(f"cat: {qw} does not stack with {first}")
    zeros = None if first.zeros is None else torch.cat([qw.zeros for qw in weights])
    return QuantWeight(
        torch.cat([qw.qweight for qw in weights]), torch.cat([qw.scales for qw in weights]), zeros,
        first.bits, first.group_size, (sum(qw.shape[0] for qw in weights), first.shape[1]),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Quantized folders (written by `vicunaflow quantize`)


def quantization_config(model_path: str | Path) -> dict | None:
    """The `quantization_config` block of a model folder's config.json if it is one of ours, else None."""
    config_path = Path(model_path) / "config.json"
    if not config_path.exists():
        return None
    block = read_config(config_path).get("quantization_config")
    if not block:
        return None
    if not isinstance(block, dict):
        raise VicunaflowError(
            f"{config_path}: quantization_config is {block!r}, not a JSON object; remove it for a float model, "
            "or quantize the float folder again with `vicunaflow quantize`"
        )
    if block.get("quant_method") != QUANT_METHOD:
        raise VicunaflowError(f"{config_path}: quantization {block.get('quant_method')!r} is not vicunaflow's")
    if block.get("format_version") != FORMAT_VERSION:
        raise VicunaflowError(f"{config_path}: quantized format version {block.get('format_version')}, expected 1")
    return block


def refuse_quantized(model_path: str | Path, option: str) -> None:
    """Refuse a `vicunaflow quantize` folder where transformers would load it: it skips a quantization it does
    not know and initialises every projection at random, silently (eval loss, finetune)."""
    config_path = Path(model_path) / "config.json"
    try:
        block = read_config(config_path).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return  # no config.json: the caller's own check names it
    if isinstance(block, dict) and block.get("quant_method") == QUANT_METHOD:
        raise VicunaflowError(
            f"{option} {model_path}: is a `vicunaflow quantize` folder (int{block.get('bits')}), which transformers "
            "would load with random weights; give its float folder"
        )


def config_block(bits: int, group_size: int) -> dict:
    """What `vicunaflow quantize` writes into config.json."""
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "bits": bits,
        "group_size": group_size if bits == 4 else None,
        "scheme": "symmetric per output channel" if bits == 8 else "asymmetric per group (float zero = group min)",
        "modules": QUANTIZED_WEIGHT.pattern,
    }


def module_prefix(weight_name: str) -> str:
    """'model.layers.0.mlp.up_proj.weight' -> 'model.layers.0.mlp.up_proj'."""
    return weight_name.removesuffix(".weight")


def quantized_names(weight_name: str, bits: int) -> list[str]:
    """The tensors a quantized weight is stored as: <module>.qweight, .scales (and .zeros for int4)."""
    prefix = module_prefix(weight_name)
    return [f"{prefix}.{suffix}" for suffix in (SUFFIXES if bits == 4 else SUFFIXES[:2])]


def is_quantized(reader, weight_name: str) -> bool:
    """Whether `reader` (a checkpoint.Checkpoint) stores `weight_name` quantized."""
    return f"{module_prefix(weight_name)}.qweight" in reader


def load_quantized_weight(
    reader, weight_name: str, device: torch.device | str | None = None, *, group_size: int | None = None
) -> QuantWeight:
    """The QuantWeight stored for `weight_name` ('...q_proj.weight' or '...q_proj') in a quantized folder.

    `reader` is a checkpoint.Checkpoint (names / get); bits and shape follow from the stored dtypes
    and shapes: int8 qweight [N, K]; uint8 qweight [N, K/2] with scales [N, groups] for int4. The int4
    group size is the folder's (config.json's quantization_config, unless given): shapes cannot tell
    it (ceil(K/G) is the same for many G), they are only checked against it.
    """
    prefix = module_prefix(weight_name)
    qweight = reader.get(f"{prefix}.qweight")
    scales = reader.get(f"{prefix}.scales")
    if qweight.dtype == torch.int8:
        qw = QuantWeight(qweight, scales, None, 8, None, tuple(qweight.shape))
    elif qweight.dtype == torch.uint8:
        n, k = qweight.shape[0], 2 * qweight.shape[1]
        if group_size is None:
            group_size = stored_group_size(reader.directory)
        if scales.ndim != 2 or -(-k // group_size) != scales.shape[1]:
            raise VicunaflowError(
                f"{reader.directory}: {prefix}.scales has shape {tuple(scales.shape)}, but {k} columns in groups "
                f"of {group_size} (config.json quantization_config.group_size) make {-(-k // group_size)}; "
                "quantize the float folder again"
            )
        qw = QuantWeight(qweight, scales, reader.get(f"{prefix}.zeros"), 4, group_size, (n, k))
    else:
        raise VicunaflowError(f"{prefix}.qweight: dtype {qweight.dtype} is neither int8 nor uint8 (int4)")
    return qw.to(device) if device is not None else qw


def stored_group_size(model_path: str | Path) -> int:
    """The int4 group size a `vicunaflow quantize` folder was written with (its config.json)."""
    block = quantization_config(model_path)
    group_size = (block or {}).get("group_size")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2 or group_size % 2:
        raise VicunaflowError(
            f"{Path(model_path) / 'config.json'}: quantization_config.group_size is {group_size!r}, not an even "
            "int4 group size; quantize the float folder again"
        )
    return group_size


def load_weight(
    reader, weight_name: str, bits: int | None = None, group_size: int = DEFAULT_GROUP_SIZE, device=None
) -> torch.Tensor | QuantWeight:
    """One Linear weight for the engine: stored quantized -> QuantWeight; float and `bits` given ->
    quantized at load (on `device`); float otherwise -> the tensor."""
    if is_quantized(reader, weight_name):
        return load_quantized_weight(reader, weight_name, device)
    weight = reader.get(weight_name)
    weight = weight.to(device) if device is not None else weight
    return quantize(weight, bits, group_size) if bits else weight


# --------------------------------------------------------------------------------------------
# Checks


def _check_group_size(group_size: int, k: int) -> None:
    if group_size < 2 or group_size % 2:
        raise VicunaflowError(f"int4 group size must be even and at least 2, not {group_size}")
    if k % 2:
        raise VicunaflowError(f"int4 packs two input columns a byte; this weight has an odd {k}")


def _check_layout(qw: QuantWeight) -> None:
    n, k = qw.shape
    if qw.bits == 8:
        expected = [("qweight", qw.qweight, torch.int8, (n, k)), ("scales", qw.scales, torch.float32, (n,))]
        if qw.zeros is not None:
            raise VicunaflowError("int8 weights have no zeros")
    elif qw.bits == 4:
        groups = -(-k // qw.group_size)
        expected = [
            ("qweight", qw.qweight, torch.uint8, (n, k // 2)),
            ("scales", qw.scales, torch.float16, (n, groups)),
            ("zeros", qw.zeros, torch.float16, (n, groups)),
        ]
    else:
        raise VicunaflowError(f"bits must be 8 or 4, not {qw.bits}")
    for name, tensor, dtype, shape in expected:
        if tensor is None or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            got = None if tensor is None else f"{tensor.dtype} {tuple(tensor.shape)}"
            raise VicunaflowError(f"int{qw.bits} {name}: expected {dtype} {shape}, got {got}")

"""Triton kernels for the one-row decode step: matrix-vector products that stream each weight once.

Why: decoding one token of a 7B model reads its 13.5 GB of weights once, so tokens/s is set by how
fast those reads go. cuBLAS runs the one-row fp16 products of a 7B at 1.5-3.3 TB/s on an H200 (the
chip streams ~4.3) and needs extra kernels for SiLU·up and for the residual add. `matvec` reads wide
tiles of weight rows, accumulates in float32, computes SiLU(gate)·up while loading its input and adds
the residual while storing its output, so a LLaMA MLP is two kernels instead of four; it takes
0.82-0.93x cuBLAS's time on each 7B weight shape (docs/benchmarks.md).

Used by `engine.model.project` for one-row steps on CUDA in float16/bfloat16. `matmul_rows` is the
same for a batched decode step (tensor cores, kernel in matmul_kernels.py). Tests run both on the CPU
through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import torch.nn.functional as F

MATMUL_MAX_ROWS = 64  # matmul_rows' limit, as quant_kernels.MATMUL_MAX_ROWS: above it (prefill) cuBLAS wins
# engine.model.project takes matmul_rows up to this many rows (a batched decode step). On an H200
# (bench/sweep_matmul_rows.py, 7B shapes, CUDA graphs) its products took 0.84-0.96x cuBLAS's time at 2-32
# rows. At 64 rows it lost with RMSNorm folded in (gate|up 83 against 56 µs, bench_matmul_rows.py); with the
# input normalised first and o / down split over K (NORM_FIRST_ROWS, k_splits_for), 64 streams through the API
# ran at 7,338 against 6,998 tokens/s with cuBLAS there (fifteenth session, serve_7b_h200_session15_rows64.json).
FLOAT_ROWS_MAX = 64
# From this many rows matmul_rows normalises its input first (rows_input, one launch) instead of in every
# program's input tile. On an H200 the 7B q|k|v product with RMSNorm folded in took 40.2 µs at 32 rows and
# gate|up 83.1 at 64 (bench_matmul_rows.py), normalised first 30.0 and 53.5 (sweep_matmul_rows_inputs.py),
# and a 32-row step replayed in 5.63 against 6.03 ms (bench/results/chat_step_rows_7b_h200_session15.json).
# Below 16 rows a step was not timed both ways: the fold stays there (alone, at 8 rows, 31.5 against 30.0 µs).
NORM_FIRST_ROWS = 16
# From this many rows matmul_rows hands products with no residual to add to cuBLAS (takes_cublas says why).
CUBLAS_ROWS = 33
# Up to this many rows matmul_rows(gated=True) computes SiLU·up in the gate|up product's epilogue; above it the
# product goes its usual way (cuBLAS from CUBLAS_ROWS) and SiLU·up is one rows_input launch after it.
GATED_ROWS_MAX = 64
# Splits over K (k_splits_for): weight rows a program takes on a GPU (BLOCK_N of matmul_kernels' configs), and
# the counters a split launch may use, one a weight tile (N <= 65,536 with tiles of 16 rows or more).
SPLIT_TILE_ROWS = 64
SPLIT_COUNTERS = 4096
# Batched decode steps on float weights: "triton" (matmul_rows, RMSNorm and the residual folded in) or
# "cublas" (F.linear plus separate RMSNorm / SiLU·up / add kernels), read by engine.model.project;
# bench_chat --float-rows times both.
FLOAT_ROWS = os.environ.get("VICUNAFLOW_FLOAT_ROWS", "triton")
# Programmatic dependent launch (Hopper and later; Triton's launch_pdl): a decode kernel lets the next one's
# programs start on the SMs its last wave leaves idle, where they read their first weight tile (no kernel
# of a step writes weights) and then wait (gdc_wait) for every earlier result before loading anything else.
# A step is a few hundred kernels each ramping up and draining: this overlaps those edges. One-row steps
# only: on an H200 a 7B step of 32 rows (cuBLAS products between our attention kernels) replayed 7% slower
# with it (4,398 against 4,745 tokens/s); one row gained 1-2% (13B: 145.0 against 142.1 tokens/s). With
# batched steps all Triton (matmul_rows), PDL on them too still cost: an 8-row 7B step replayed in 4.69
# against 4.34 ms, 32 rows 6.16 against 6.11 (bench/results/chat_rows_pdl_h200.json).
# "0" turns it off (bench_chat --pdl on off times both).
PDL = os.environ.get("VICUNAFLOW_PDL", "1") == "1"
# Batched steps of up to FLOAT_ROWS_MAX rows with PDL too, now that matmul_rows lets the next kernel launch only
# once its programs have read all of K: "2" (the default) also prefetches its first weight lines to L2 before it
# waits, "1" does not, "0" keeps PDL to one-row steps. On an H200 (7B, eighteenth session) steps of 64 rows
# replayed in 6.59 / 6.62 / 6.71 ms with 2 / 1 / 0, of 32 rows in 5.17 / 5.18 / 5.19; through the API 8,203
# against 8,173 tokens/s at 64 streams and 5,674 against 5,612 at 32 with 2 against 0, in one run
# (bench/results/chat_7b_h200_session18_pdl_rows*.json, serve_7b_h200_session18_pdl_rows*.json). Deeper, the first 4
# or 8 tiles' lines, 64-row steps replayed in 6.63 and 6.74-6.75 ms against 6.57-6.60 (thirtieth session).
PDL_ROWS = int(os.environ.get("VICUNAFLOW_PDL_ROWS", "2"))


def _rows_tiles(spec: str) -> dict[tuple[int, int, int], tuple[int, ...] | str]:
    """VICUNAFLOW_ROWS_TILES: "BLOCK_M:NxK=BLOCK_N,BLOCK_K,warps,stages,splits" or "BLOCK_M:NxK=cublas", separated
    by ";"; matmul_rows launches those shapes that way instead of the autotuner's and k_splits_for's choice."""
    tiles: dict[tuple[int, int, int], tuple[int, ...] | str] = {}
    for entry in filter(None, (part.strip() for part in spec.split(";"))):
        try:
            rows_and_shape, how = entry.split("=")
            block_m, shape = rows_and_shape.split(":")
            n, k = shape.split("x")
            key = (int(block_m), int(n), int(k))
            tiles[key] = "cublas" if how == "cublas" else tuple(int(v) for v in how.split(","))
            if tiles[key] != "cublas" and len(tiles[key]) != 5:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"VICUNAFLOW_ROWS_TILES: {entry!r} is not BLOCK_M:NxK=BLOCK_N,BLOCK_K,warps,stages,splits or BLOCK_M:NxK=cublas"
            ) from None
    return tiles


# Products of a batched decode step launched one fixed way, by (BLOCK_M, N, K): a tile and its splits over K, or
# cuBLAS. For timing choices inside real steps (bench_chat, bench_serve through the environment); empty: the
# autotuner's tiles and k_splits_for.
ROWS_TILES = _rows_tiles(os.environ.get("VICUNAFLOW_ROWS_TILES", ""))

# (BLOCK_N, BLOCK_K, warps) the autotuner tries per weight shape; bench/sweep_matvec.py times these
# against a wider set on the 7B shapes.
TILES = [(4, 1024, 4), (8, 512, 4), (8, 1024, 8), (16, 256, 4), (16, 512, 8), (32, 256, 8), (2, 2048, 8)]


@functools.cache
def available() -> bool:
    """Triton importable (it ships with CUDA builds of torch, not with CPU wheels)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def pdl_options(device: torch.device, rows: int = 1) -> dict:
    """Launch arguments of a kernel with a `PDL` constexpr: PDL on (and Triton's launch_pdl) for a one-row
    step, and (PDL_ROWS) a batched one of up to FLOAT_ROWS_MAX rows, where the GPU and Triton have it; off
    for more rows (prefill), on older GPUs, in Triton's interpreter and with VICUNAFLOW_PDL=0."""
    on = PDL and (rows == 1 or (PDL_ROWS > 0 and rows <= FLOAT_ROWS_MAX)) and device.type == "cuda"
    on = on and _pdl_supported(device.index if device.index is not None else -1)
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@functools.cache
def _pdl_supported(index: int) -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    import triton.language as tl

    major = torch.cuda.get_device_capability(index if index >= 0 else None)[0]
    return major >= 9 and hasattr(tl.extra.cuda, "gdc_wait")


def matvec(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor | None = None,
    swiglu: bool = False,
    out: torch.Tensor | None = None,
    norm: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """out = x @ weight.T (+ residual) for one row.

    x: [1, K], or [1, 2K] with swiglu (input = silu(x[:, :K]) * x[:, K:]); weight: [N, K] contiguous;
    residual: [1, N] or None. Returns a new [1, N] tensor of weight's dtype, or `out` ([1, N],
    contiguous, any float dtype: tensor parallelism writes float32 partial sums straight into its
    all-reduce buffer). norm: [K], RMSNorm's weight: the input is rms_norm(x, norm, eps), computed in
    float32 by every program (x is a few KB: a first pass over it costs less than a kernel launch).
    """
    n, k = weight.shape
    out = one_row_output("matvec", x, tuple(weight.shape), swiglu, norm, out, weight.dtype)
    if not (weight.is_contiguous() and x.is_contiguous()):
        raise ValueError("matvec: weight and input must be contiguous")
    kernel = _kernels()
    grid = lambda meta: (-(-n // meta["BLOCK_N"]),)  # noqa: E731
    kernel[grid](
        x, weight, residual if residual is not None else out, out, norm if norm is not None else x, eps, n, k,
        SWIGLU=swiglu, HAS_RESIDUAL=residual is not None, NORM=norm is not None, **pdl_options(x.device),
    )  # fmt: skip
    return out


@dataclasses.dataclass(frozen=True)
class RopeStore:
    """What a q|k|v product's epilogue needs to do attention_kernels.rope_store's work (matmul_rows(rope=)): the
    rows' angles cos, sin [M, D / 2] float32, positions [M] and block tables [M, width] (rows may be strided),
    the layer's keys and values [blocks, Hkv, block_size, D] (contiguous), and the query heads H."""

    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor
    tables: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    heads: int


# Columns of the residual stream whose squares a product's epilogue sums together for the next RMSNorm (Normed): the
# narrowest tile of matmul_kernels (the interpreter's, 32) holds whole groups, and 4,096 or 5,120 columns too
NORM_GROUP = 32


@dataclasses.dataclass(frozen=True)
class Normed:
    """The next RMSNorm's input as a product's epilogue leaves it (matmul_rows(norm_out=)): the rows it stored times
    the norm's weight, rounded to their dtype ([M, N]), and their squares summed over each NORM_GROUP columns
    (float32 [N / NORM_GROUP, M]), from which the product taking them (matmul_rows(normed=)) scales each row's
    products by 1 / sqrt(mean(x^2) + eps), the norm's eps: RMSNorm as the fold computes it, without a launch of
    its own."""

    scaled: torch.Tensor
    squares: torch.Tensor
    eps: float

    @classmethod
    def empty(cls, rows: int, columns: int, dtype: torch.dtype, device: torch.device, eps: float) -> Normed:
        if columns % NORM_GROUP:
            raise ValueError(f"Normed: {columns} columns are not groups of {NORM_GROUP}")
        squares = torch.empty(columns // NORM_GROUP, rows, dtype=torch.float32, device=device)
        return cls(torch.empty(rows, columns, dtype=dtype, device=device), squares, eps)


def rope_fits(head_dim: int) -> bool:
    """Whether matmul_rows(rope=) takes a head of head_dim dims: a program's tile must lie within one head (tiles of
    64 and 128 weight rows on a GPU, matmul_kernels.INTERPRETED_BLOCK_N in Triton's interpreter)."""
    return head_dim % (32 if os.environ.get("TRITON_INTERPRET") == "1" else 64) == 0


def matmul_rows(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor | None = None,
    swiglu: bool = False,
    out: torch.Tensor | None = None,
    norm: torch.Tensor | None = None,
    eps: float = 1e-6,
    k_splits: int | None = None,
    gated: bool = False,
    rope: RopeStore | None = None,
    norm_out: tuple[torch.Tensor, Normed] | None = None,
    normed: Normed | None = None,
) -> torch.Tensor:
    """out = x @ weight.T (+ residual) for M <= MATMUL_MAX_ROWS rows on tensor cores: matvec for a batch.

    Why: cuBLAS reads a weight once for a batched decode step too, but the step also needs RMSNorm,
    SiLU·up and the residual add as kernels of their own (on an H200 a 7B 8-row step spent 0.57 of its
    5.07 ms in them); one program per BLOCK_N weight rows here serves all M rows (padded to a tile of 16,
    32 or 64) and folds those in, as matvec does for one row (matmul_kernels.py says why its tiles). From
    NORM_FIRST_ROWS rows RMSNorm is one rows_input launch first instead.
    x: [M, K], or [M, 2K] with swiglu (input silu(gate) * up); weight: [N, K] float16/bfloat16 (float32
    works, slowly: exact products); norm: [K], the input is rms_norm(x, norm, eps) (float32 inside);
    residual, out: [M, N] contiguous, out any float dtype (tensor parallelism's float32 buffer).
    Products are in the weight's dtype (the input rounded to it), accumulated in float32. Returns a
    new [M, N] tensor of weight's dtype, or `out`. With swiglu, SiLU·up is computed first, by rows_input (one
    launch): in every program's input tile instead, the 7B down product took 1.7-4.4x as long at 2-64 rows on
    an H200, and an 8-row 7B step replayed in 5.60 against 4.34 ms (bench/results/matmul_rows_h200.json,
    chat_rows_h200.json); the engine's steps take it from gate|up's epilogue instead (`gated`). k_splits:
    programs per weight tile, each over a part of K (matmul_kernels says how their sums stay exact run to run);
    None: `k_splits_for`'s choice. From CUBLAS_ROWS rows on a GPU a product with no residual goes to cuBLAS
    instead (`takes_cublas`), its input through rows_input first; VICUNAFLOW_ROWS_TILES fixes a shape's launch
    (not a gated one's).

    gated: weight is gate|up [2F, K] (the MLP's, gate rows first) and out is silu(x @ gate.T) * (x @ up.T)
    [M, F], the down product's input, computed in the epilogue up to GATED_ROWS_MAX rows (no residual, no split):
    one launch and a [M, F] write instead of the product, its [M, 2F] output and a rows_input launch. On an H200
    (7B, twenty-second session) steps of 8 / 32 / 64 rows replayed in 4.29 / 5.02 / 6.44 ms against 4.33 / 5.11 /
    6.52 (at 64 rows against cuBLAS's gate|up and rows_input). Each product is rounded to the weight's dtype
    before SiLU·up, as the unfused path stores gate|up: the same bits as that path where the sums are the same.

    rope: weight is q|k|v [(H + 2 Hkv) * D, K] and the epilogue does attention_kernels.rope_store's work for one
    token a row (a decode step): out's q rotated (its k and v columns left unwritten), each row's rotated key and
    its value stored into its block at its position, with the same bits as the product then rope_store where the
    sums are the same. Always our kernel (never cuBLAS, never split over K), a tile within a head (`rope_fits`).
    Why: a launch a layer fewer, and rope_store's launch between the product and the attention cost more than
    its own time: a 7B's 64-row step replayed in 6.57 against 6.82 ms on an H200 (rope_store's kernels were 181 µs
    of the step; twenty-ninth session, docs/benchmarks.md).

    norm_out: (the next RMSNorm's weight [N], a Normed for [M, N]): the epilogue also leaves that norm's input
    there (store_normed) as it stores out (a product adding into the residual stream: o, down). normed: x is a
    Normed's scaled rows (q|k|v, gate|up after them), and each row's products are scaled by its RMSNorm factor
    from the squares, with the Normed's eps (not `eps`). Both our kernel only. Why: the rows_input launch between
    the two products goes, and under NORM_FIRST_ROWS rows the fold's squares accumulator in every program: a 7B's
    8-row step took 4.07 against 4.28 ms of GPU time on an H200, a 32-row step the same, a 64-row step 6.75
    against 6.58 (twenty-ninth session), so engine.model uses it up to 32 rows.
    """
    m = x.shape[0]
    n, k = weight.shape
    if x.dim() != 2 or not 0 < m <= MATMUL_MAX_ROWS or x.shape[1] != (2 * k if swiglu else k):
        raise ValueError(
            f"matmul_rows: input {tuple(x.shape)} does not fit weight {(n, k)} (<= {MATMUL_MAX_ROWS} rows)"
        )
    if norm is not None and (swiglu or norm.shape != (k,)):
        raise ValueError(f"matmul_rows: norm {tuple(norm.shape)} needs a plain input of {k} columns")
    if gated and (swiglu or residual is not None or n % 2):
        raise ValueError(f"matmul_rows: gated needs a plain input, no residual and gate|up rows (got {n})")
    if rope is not None:
        check_rope_store(rope, m, n, residual, swiglu, gated, k_splits)
    if norm_out is not None or normed is not None:
        check_norms(norm_out, normed, x, m, n, k, residual, swiglu, norm)
    if gated and m > GATED_ROWS_MAX:  # the product as usual, then SiLU·up in one launch
        gate_up = matmul_rows(x, weight, norm=norm, eps=eps, k_splits=k_splits)  # [M, 2F]
        activated = rows_input(gate_up, swiglu=True, dtype=weight.dtype)  # [M, F]
        return activated if out is None else out.copy_(activated)
    if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"matmul_rows: weight dtype {weight.dtype} is not a float16/bfloat16/float32")
    outputs = n // 2 if gated else n
    for name, t in (("residual", residual), ("out", out)):
        if t is not None and (t.shape != (m, outputs) or not t.is_contiguous()):
            raise ValueError(f"matmul_rows: {name} {tuple(t.shape)} is not a contiguous [{m}, {outputs}]")
    if not (weight.is_contiguous() and x.is_contiguous()):
        raise ValueError("matmul_rows: weight and input must be contiguous")
    from vicunaflow import matmul_kernels  # Triton: imported only when the kernel runs

    if k_splits is not None and (k_splits < 1 or (k_splits > 1 and n > SPLIT_COUNTERS * 16)):
        raise ValueError(
            f"matmul_rows: {k_splits} splits over K (at least 1; more only for N <= {SPLIT_COUNTERS * 16})"
        )
    if swiglu:
        x = rows_input(x, swiglu=True, dtype=x.dtype)  # [M, K], x's dtype (as the cuBLAS path)
    elif norm is not None and (m >= NORM_FIRST_ROWS or (k_splits or 1) > 1):
        # [M, K] normalised, rounded as the products take it (the fold's sum of squares would span every split)
        x, norm = rows_input(x, norm=norm, eps=eps, dtype=weight.dtype), None
    if normed is not None:
        eps = normed.eps
    block_m = max(16, 1 << (m - 1).bit_length())  # tl.dot's smallest tile is 16
    ours = gated or rope is not None or norm_out is not None or normed is not None  # epilogues only our kernel has
    fixed = ROWS_TILES.get((block_m, n, k)) if x.is_cuda and k_splits is None and not ours else None
    if fixed == "cublas" or (fixed is None and k_splits is None and not ours and takes_cublas(m, residual, x.device)):
        if norm is not None:  # fewer than NORM_FIRST_ROWS rows, through ROWS_TILES
            x = rows_input(x, norm=norm, eps=eps, dtype=weight.dtype)
        return cublas_product(x.to(weight.dtype), weight, residual, out)
    if fixed is not None and norm is not None and fixed[4] > 1:
        x, norm = rows_input(x, norm=norm, eps=eps, dtype=weight.dtype), None
    if out is None:
        out = torch.empty(m, outputs, dtype=weight.dtype, device=x.device)
    # Triton's interpreter multiplies bfloat16 tiles as raw integers (numpy has no bfloat16): float32 there
    interpreted_bf16 = weight.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    whole_k = norm is not None or gated or rope is not None  # a split's epilogue would see part of the sums
    splits = k_splits_for(n, m, x.device, whole_k) if k_splits is None else k_splits
    if fixed is not None:
        splits = fixed[4]
    if gated and splits != 1:
        raise ValueError(f"matmul_rows: gated products are not split over K ({splits} splits asked)")
    partial = counters = out  # unread without splits
    if splits > 1:
        partial = torch.empty(splits, n, block_m, dtype=torch.float32, device=x.device)
        counters = _split_counters(x.device)
    grid = lambda meta: (-(-n // meta["BLOCK_N"]), splits)  # noqa: E731
    kernel, tile = matmul_kernels.float_matmul_kernel, {}
    if fixed is not None:
        kernel = kernel.fn  # past the autotuner
        tile = dict(zip(("BLOCK_N", "BLOCK_K", "num_warps", "num_stages"), fixed[:4], strict=True))
    kernel[grid](
        x, weight, residual if residual is not None else out, out, norm if norm is not None else x, partial,
        counters, eps, m, n, k, HAS_RESIDUAL=residual is not None, NORM=norm is not None,
        FP32=weight.dtype == torch.float32 or interpreted_bf16, SPLIT=splits, BLOCK_M=block_m,
        PREFETCH=PDL_ROWS == 2, GATED=gated, **_rope_arguments(rope), **_norm_arguments(norm_out, normed),
        **pdl_options(x.device, rows=m), **tile,
    )  # fmt: skip
    return out


def check_norms(norm_out, normed, x, m: int, n: int, k: int, residual, swiglu: bool, norm) -> None:
    """Refuse a matmul_rows(norm_out=, normed=) launch that does not fit, naming what."""
    if norm_out is not None and normed is not None:
        raise ValueError("matmul_rows: a product either leaves a Normed (norm_out) or takes one (normed), not both")
    if norm_out is not None:
        weight, into = norm_out
        if weight.shape != (n,) or into.scaled.shape != (m, n) or into.squares.shape != (n // NORM_GROUP, m):
            raise ValueError(
                f"matmul_rows: norm_out's weight {tuple(weight.shape)}, rows {tuple(into.scaled.shape)} and squares "
                f"{tuple(into.squares.shape)} do not fit [{m}, {n}] in groups of {NORM_GROUP}"
            )
        if residual is None:
            raise ValueError("matmul_rows: norm_out is for a product adding into the residual stream")
    fits = normed is None or (x is normed.scaled and normed.squares.shape == (k // NORM_GROUP, m))
    if not fits or (normed is not None and (swiglu or norm is not None)):
        raise ValueError(
            "matmul_rows: normed's scaled rows are the input (no swiglu, no norm), its squares "
            f"{tuple(normed.squares.shape)} [{k // NORM_GROUP}, {m}]"
        )


def _norm_arguments(norm_out: tuple[torch.Tensor, Normed] | None, normed: Normed | None) -> dict:
    """float_matmul_kernel's NORM_OUT / SQUARES arguments (none without them: the kernel's defaults)."""
    if norm_out is not None:
        weight, into = norm_out
        return dict(
            norm_out_ptr=weight, scaled_ptr=into.scaled, squares_ptr=into.squares, NORM_OUT=True, NORM_GROUP=NORM_GROUP
        )
    if normed is not None:
        return dict(squares_ptr=normed.squares, SQUARES=True, NORM_GROUP=NORM_GROUP)
    return {}


def check_rope_store(rope: RopeStore, m: int, n: int, residual, swiglu: bool, gated: bool, k_splits) -> None:
    """Refuse a matmul_rows(rope=) launch its epilogue cannot do, naming what does not fit."""
    _, kv_heads, _, head_dim = rope.keys.shape
    if residual is not None or swiglu or gated or (k_splits or 1) != 1:
        raise ValueError("matmul_rows: rope needs a plain product (no residual, swiglu, gated or split over K)")
    fits = n == (rope.heads + 2 * kv_heads) * head_dim and rope.cos.shape == (m, head_dim // 2)
    fits = fits and rope.sin.shape == rope.cos.shape and rope.positions.shape == (m,) and rope.tables.shape[0] == m
    if not fits or rope.keys.shape != rope.values.shape or not rope_fits(head_dim):
        raise ValueError(
            f"matmul_rows: rope's {rope.heads} + 2 x {kv_heads} heads of {head_dim} (angles {tuple(rope.cos.shape)}, "
            f"{rope.positions.shape[0]} positions, {rope.tables.shape[0]} tables) do not fit {m} rows of q|k|v {n} "
            f"wide, or its heads are not whole tiles"
        )
    contiguous = rope.cos.is_contiguous() and rope.sin.is_contiguous() and rope.tables.stride(1) == 1
    if not (contiguous and rope.keys.is_contiguous() and rope.values.is_contiguous()):
        raise ValueError("matmul_rows: rope's angles, keys and values must be contiguous, its tables' rows too")


def _rope_arguments(rope: RopeStore | None) -> dict:
    """float_matmul_kernel's ROPE arguments (none without rope: the kernel's defaults)."""
    if rope is None:
        return {}
    _, kv_heads, block_size, head_dim = rope.keys.shape
    return dict(
        cos_ptr=rope.cos, sin_ptr=rope.sin, position_ptr=rope.positions, table_ptr=rope.tables, k_ptr=rope.keys,
        v_ptr=rope.values, position_stride=rope.positions.stride(0), table_row_stride=rope.tables.stride(0),
        ROPE=True, H=rope.heads, HKV=kv_heads, D=head_dim, BLOCK_SIZE=block_size,
    )  # fmt: skip


def takes_cublas(rows: int, residual: torch.Tensor | None, device: torch.device) -> bool:
    """Whether matmul_rows hands a product to cuBLAS (its input normalised or SiLU·up'd first, by rows_input): from
    CUBLAS_ROWS rows on a GPU, a product with no residual to add (q|k|v, the head; gate|up when not `gated`).

    Why: at 64 rows cuBLAS streamed those weights faster than our tiles, while the products with a residual (o,
    down, split over K) stay ours. On an H200 (7B, graphs of 24 launches with PDL) q|k|v took 28.6 µs either way
    and gate|up 47.5 against 50.0; through the API 64 streams ran at 8,392 against 8,276 and 8,293 tokens/s in one
    call (twenty-first session, docs/benchmarks.md). At 32 rows and fewer our tiles won every product.
    """
    return (
        residual is None and rows >= CUBLAS_ROWS and device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
    )


def cublas_product(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, out: torch.Tensor | None
) -> torch.Tensor:
    """x @ weight.T (+ residual) through cuBLAS, into `out` when given (the residual added in its epilogue)."""
    if out is None:
        return F.linear(x, weight) if residual is None else torch.addmm(residual, x, weight.t())
    if residual is None and out.dtype == weight.dtype:
        return torch.mm(x, weight.t(), out=out)
    if residual is not None and out.dtype == residual.dtype == weight.dtype:
        return torch.addmm(residual, x, weight.t(), out=out)
    return out.copy_(x @ weight.t() if residual is None else residual + x @ weight.t())


def k_splits_for(n: int, rows: int, device: torch.device, whole_k: bool) -> int:
    """Programs per weight tile of a matmul_rows launch: 2 for more than 16 rows where the product has fewer
    tiles than the GPU has SMs (a 7B's o and down on an H200: 64 tiles on 132; on tensor-parallel ranks any
    product that small), else 1; always 1 for a product that needs all of K in one program (`whole_k`: RMSNorm
    folded in, whose sum of squares spans it, or SiLU·up in the epilogue) and off CUDA.

    Why: with one program a tile, half the SMs stream nothing. On an H200 (7B, graphs of 24 launches) the
    down product took 25.8 against 28.0 µs at 32 rows split in two and 27.5 against 30.6 at 64, o 12.3
    against 12.6 and 14.0 against 14.7; a 32-row step replayed in 5.63 against 5.73 ms. At 8 and 16 rows
    the split cost 0.3-0.6 µs a product (fifteenth session; bench/results/matmul_rows_norm_split_h200.txt).
    """
    if whole_k or rows <= 16 or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return 1
    tiles = -(-n // SPLIT_TILE_ROWS)
    return 2 if tiles < _multiprocessors(device.index) else 1


@functools.cache
def _multiprocessors(index: int | None) -> int:
    return torch.cuda.get_device_properties(
        index if index is not None else torch.cuda.current_device()
    ).multi_processor_count


_counters: dict[torch.device, torch.Tensor] = {}


def _split_counters(device: torch.device) -> torch.Tensor:
    """The split launches' counters on `device`: zeros, and left at zero by every launch (the last program of a
    tile resets its own). One set a device serves every launch, which holds while split launches on a device
    run one after another: on one stream, as the engine's graphs, its warm-up (fenced both ways) and several
    engines on one GPU (no graphs, the default stream) do. Two at once on different streams would mix their
    counts. Made on first use, which must not be inside a CUDA graph's capture: the engine runs each step twice
    first."""
    counters = _counters.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("matmul_rows: the first split launch on a device is being captured; run it once first")
        counters = _counters[device] = torch.zeros(SPLIT_COUNTERS, dtype=torch.int32, device=device)
    return counters


def plain_input(
    x: torch.Tensor, *, norm: torch.Tensor | None = None, eps: float = 1e-6, swiglu: bool = False
) -> torch.Tensor:
    """rows_input's torch twin in x's dtype, for the paths without the fused kernels (the CPU; on CUDA, RMSNorm
    before cuBLAS products of more than FLOAT_ROWS_MAX rows, and everything with FLOAT_ROWS "cublas"):
    rms_norm(x, norm, eps), or silu(gate) * up with swiglu (x [..., 2K]), or x itself."""
    if norm is not None:
        x = F.rms_norm(x, (x.shape[-1],), norm, eps)
    if swiglu:
        half = x.shape[-1] // 2
        x = F.silu(x[..., :half]) * x[..., half:]
    return x


def rows_input(
    x: torch.Tensor,
    *,
    norm: torch.Tensor | None = None,
    eps: float = 1e-6,
    swiglu: bool = False,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The input a plain product needs, from the arguments matvec folds in: rms_norm(x, norm, eps), or
    silu(gate) * up (swiglu, x [M, 2K]), or x; cast to `dtype`, in one launch. Returns a new [M, K].

    Why: a kernel without those epilogues (torch's int4 tinygemm, quant.Int4Packed) needs its input
    prepared, which torch does in several launches (RMSNorm, SiLU and the multiply, the cast); this is one,
    a program per row and block of BLOCK columns (each sums its row's squares itself: a few KB, from L2).
    """
    m, width = x.shape
    k = width // 2 if swiglu else width
    if (swiglu and width % 2) or (norm is not None and (swiglu or norm.shape != (k,))) or not x.is_contiguous():
        raise ValueError(f"rows_input: input {tuple(x.shape)} (contiguous?) does not fit norm / swiglu")
    out = torch.empty(m, k, dtype=dtype, device=x.device)
    block = 256 if os.environ.get("TRITON_INTERPRET") != "1" else 64
    whole = min(4096, 1 << (k - 1).bit_length())  # the squares' pass reads this many columns at a time
    _rows_input_kernel()[(m, -(-k // block))](
        x, norm if norm is not None else x, out, eps, width, k,
        NORM=norm is not None, SWIGLU=swiglu, BLOCK=block, WHOLE=whole, **pdl_options(x.device, rows=m),
    )  # fmt: skip
    return out


@functools.cache
def _rows_input_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rows_input_kernel(
        x_ptr,  # [M, WIDTH]
        norm_ptr,  # [K] (NORM)
        out_ptr,  # [M, K]
        eps,
        WIDTH: tl.constexpr,
        K: tl.constexpr,
        NORM: tl.constexpr,
        SWIGLU: tl.constexpr,
        BLOCK: tl.constexpr,
        WHOLE: tl.constexpr,
        PDL: tl.constexpr,  # the next kernel (a one-row product) may start reading its weights now
    ):
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < K
        x_row = x_ptr + row * WIDTH
        if SWIGLU:
            gate = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
            up = tl.load(x_row + K + cols, mask=ok, other=0.0).to(tl.float32)
            value = gate * tl.sigmoid(gate) * up
        else:
            value = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
        if NORM:  # 1 / sqrt(mean(x^2) + eps) over the whole row, then x * rstd * norm weight
            squares = tl.zeros((WHOLE,), dtype=tl.float32)
            for start in range(0, K, WHOLE):
                every = start + tl.arange(0, WHOLE)
                v = tl.load(x_row + every, mask=every < K, other=0.0).to(tl.float32)
                squares += v * v
            rstd = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / K + eps)
            value = value * rstd * tl.load(norm_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * K + cols, value.to(out_ptr.dtype.element_ty), mask=ok)

    return rows_input_kernel


def one_row_output(
    name: str, x: torch.Tensor, shape: tuple[int, int], swiglu: bool, norm, out, dtype: torch.dtype
) -> torch.Tensor:
    """Check a one-row product's input, norm and out against its weight's [N, K] `shape` (matvec and
    quant_kernels.qmatvec take the same arguments); return the [1, N] tensor to write: `out` or a new one."""
    n, k = shape
    if x.dim() != 2 or x.shape[0] != 1 or x.shape[1] != (2 * k if swiglu else k):
        raise ValueError(f"{name}: input {tuple(x.shape)} does not fit weight {shape}")
    if norm is not None and (swiglu or norm.shape != (k,)):
        raise ValueError(f"{name}: norm {tuple(norm.shape)} needs a plain input of {k} columns")
    if out is None:
        return torch.empty(1, n, dtype=dtype, device=x.device)
    if out.shape != (1, n) or not out.is_contiguous():
        raise ValueError(f"{name}: out {tuple(out.shape)} is not a contiguous [1, {n}]")
    return out


def autotune_configs(tiles: list[tuple[int, int, int]], interpreted: tuple[int, int]) -> list:
    """Triton configs for (BLOCK_N, BLOCK_K, warps) tiles; under TRITON_INTERPRET=1 the one small
    `interpreted` (BLOCK_N, BLOCK_K) tile, as the interpreter runs on the CPU, slowly."""
    import triton

    if os.environ.get("TRITON_INTERPRET") == "1":
        block_n, block_k = interpreted
        return [triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=1)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=warps) for n, k, warps in tiles]


@functools.cache
def _kernels():
    """Compile lazily: importing this module must not need Triton."""
    import triton
    import triton.language as tl

    from vicunaflow.autotuning import autotune

    @autotune(configs=autotune_configs(TILES, interpreted=(32, 64)), key=["N", "K", "SWIGLU", "NORM", "PDL"])
    @triton.jit
    def matvec_kernel(
        x_ptr,
        w_ptr,
        residual_ptr,
        out_ptr,
        norm_ptr,
        eps,
        N: tl.constexpr,  # constants: one build per weight shape, loops and masks known at compile time
        K: tl.constexpr,
        SWIGLU: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
        NORM: tl.constexpr,
        PDL: tl.constexpr,  # programmatic dependent launch (see PDL above)
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        if PDL:  # the next kernel may take SMs this one's last wave leaves; this one reads its first weight
            # tile before waiting (no kernel writes weights), then waits for every earlier kernel's writes
            tl.extra.cuda.gdc_launch_dependents()
            first_cols = tl.arange(0, BLOCK_K)
            first_ptrs = w_ptr + rows[:, None] * K + first_cols[None, :]
            if N % BLOCK_N == 0 and K % BLOCK_K == 0:
                first_w = tl.load(first_ptrs)
            else:
                first_w = tl.load(first_ptrs, mask=row_ok[:, None] & (first_cols < K)[None, :], other=0.0)
            tl.extra.cuda.gdc_wait()
        if NORM:  # RMSNorm of the input: 1 / sqrt(mean(x^2) + eps), then x * rstd * norm weight below
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
            w_ptrs = w_ptr + rows[:, None] * K + cols[None, :]
            if PDL:  # the first tile is already in registers
                if start == 0:
                    w = first_w
                elif N % BLOCK_N == 0 and K % BLOCK_K == 0:
                    w = tl.load(w_ptrs)
                else:
                    w = tl.load(w_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            elif N % BLOCK_N == 0 and K % BLOCK_K == 0:  # decided at compile time: unmasked, vectorised loads
                w = tl.load(w_ptrs)
            else:
                w = tl.load(w_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_RESIDUAL:
            y += tl.load(residual_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)

    return matvec_kernel

"""Triton kernel of kernels.matmul_rows: a few rows (batched decode steps) times a float16/bfloat16 weight.

The weight tile is tl.dot's left operand and the rows its right: acc[BLOCK_N, BLOCK_M] += w[BLOCK_N, K]
@ x[BLOCK_M, K].T. Why that way round: a batch of 2-64 rows padded to a tile of 16-64 is too short to be
the left operand of Hopper's warp-group MMA (64 rows), while a 64-row weight tile is; and each program
then streams 64 weight rows through a deep pipeline. bench/sweep_matmul_rows.py timed this design against
x as the left operand (the previous kernel) and against CUDA-core FMAs on the 7B shapes (H200, CUDA
graphs, weights not in L2): at 8 rows it took 0.85-0.95x cuBLAS's time and 1.04-1.29x the one-row
matvec's, the x-left kernel 0.88-0.98x cuBLAS.

A product with fewer 64-row weight tiles than the GPU has SMs (a 7B's o and down: 64 tiles on an H200's
132) may split K over SPLIT programs a tile (kernels.matmul_rows decides). Each writes its float32
partial; the last of a tile's programs to finish (a counter each, left at zero for the next launch)
sums the partials in split order and stores the output. Why not atomic adds into the output: their order
changes the float32 sums from run to run; here the same inputs give the same bits.

RMSNorm comes in through quant_matmul_kernels' input tile and RMSNorm factor (the same helpers as its int8 /
int4 kernels, which Triton resolves among this module's globals). SiLU·up comes either from before the kernel
(a swiglu input: kernels.matmul_rows says why not in the input tiles) or, GATED, from the gate|up product's own
epilogue: a program then takes BLOCK_N / 2 gate rows and the up rows of the same outputs. Importing this module
needs Triton, so kernels.py imports it only when matmul_rows runs.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from vicunaflow.autotuning import autotune
from vicunaflow.quant_matmul_kernels import input_tile, rms_factor

# (BLOCK_N, BLOCK_K, warps, stages) the autotuner tries, by the rows' tile (BLOCK_M). In
# bench/results/matmul_rows_sweep_h200.json (7B products, H200) the better of the two is within 1% of the
# best of 58 weight-left tiles at 2-16 rows, and within 5% at 32, where 64 x 256 in 5 stages needs more
# shared memory than there is. Two a shape, not more: the server autotunes every shape at startup.
# BLOCK_M 16: down and o take the first, q|k|v and gate|up the second; BLOCK_M 32 and more:
FEW_ROWS_TILES = [(64, 256, 4, 5), (64, 128, 4, 3)]
MANY_ROWS_TILES = [(64, 128, 4, 5), (64, 128, 4, 3)]
# q|k|v with the rotary and the cache stores in its epilogue (ROPE), from BLOCK_M 32: a 7B's 64-row q|k|v took
# 28.4 µs in tiles of 128 x 128 (4 warps, 4 stages) against cuBLAS's 28.0 and 28.8 in the second tile above,
# alone (bench/sweep_matmul_rows_layout.py), and a 64-row step replayed in 6.58 against 6.63 ms with it in place
# of cuBLAS (twenty-ninth session, docs/benchmarks.md)
ROPE_MANY_ROWS_TILES = [(128, 128, 4, 4), (64, 128, 4, 3)]
float_configs = [
    triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
    for n, k, w, s in dict.fromkeys(FEW_ROWS_TILES + MANY_ROWS_TILES + ROPE_MANY_ROWS_TILES)
]
INTERPRETED_BLOCK_N = 32
if os.environ.get("TRITON_INTERPRET") == "1":
    float_configs = [triton.Config({"BLOCK_N": INTERPRETED_BLOCK_N, "BLOCK_K": 64}, num_warps=1)]


def tiles_for_rows(configs: list, named_args: dict, **kwargs) -> list:
    """The autotuner's configs for this launch's BLOCK_M (all of them under the interpreter); with ROPE only
    tiles within a head (the rotary pairs dims d and d + D / 2 inside a program)."""
    if kwargs["BLOCK_M"] <= 16:
        tiles = FEW_ROWS_TILES
    else:
        tiles = ROPE_MANY_ROWS_TILES if kwargs.get("ROPE") else MANY_ROWS_TILES
    chosen = [c for c in configs if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) in tiles]
    if kwargs.get("ROPE"):
        chosen = [c for c in chosen or configs if kwargs["D"] % c.kwargs["BLOCK_N"] == 0]
    return chosen or configs


# what the autotuner times a launch of float_matmul_kernel by
FLOAT_KEY = ["N", "K", "BLOCK_M", "NORM", "FP32", "HAS_RESIDUAL", "SPLIT", "PDL", "PREFETCH", "GATED", "ROPE",
             "NORM_OUT", "SQUARES"]  # fmt: skip


@autotune(configs=float_configs, key=FLOAT_KEY, prune_configs_by={"early_config_prune": tiles_for_rows})
@triton.jit
def float_matmul_kernel(
    x_ptr,  # [M, K], any float dtype
    w_ptr,  # float16 / bfloat16 (or float32) [N, K]
    residual_ptr,  # [M, N] (HAS_RESIDUAL)
    out_ptr,  # [M, N], any float dtype
    norm_ptr,  # [K] RMSNorm weight (NORM)
    partial_ptr,  # SPLIT > 1: float32 [SPLIT, N, BLOCK_M], each split's products (transposed)
    counter_ptr,  # SPLIT > 1: int32 zeros, one a weight tile (of kernels._split_counters): its programs done
    eps,
    M,
    N: tl.constexpr,
    K: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    NORM: tl.constexpr,
    FP32: tl.constexpr,  # products in float32: float32 weights, or bfloat16 under the interpreter
    SPLIT: tl.constexpr,  # programs a weight tile, each over its part of K (no NORM: its sum spans all of K)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (kernels.PDL_ROWS)
    PREFETCH: tl.constexpr = False,  # PDL: ask for the first weight tiles into L2 before waiting for the inputs
    GATED: tl.constexpr = False,  # w is gate|up [N, K]: out [M, N / 2] = silu(x @ gate.T) * (x @ up.T) (no SPLIT)
    # ROPE: w is q|k|v [(H + 2 HKV) * D, K]; the epilogue rotates q into out and stores the rotated k and the v
    # into the rows' cache blocks (store_rope; no SPLIT, no residual)
    cos_ptr=None,  # [M, D / 2] float32, the rows' angles
    sin_ptr=None,
    position_ptr=None,  # [M], position_stride apart
    table_ptr=None,  # [M, width] block ids, rows table_row_stride apart
    k_ptr=None,  # [blocks, HKV, BLOCK_SIZE, D]
    v_ptr=None,
    position_stride=0,
    table_row_stride=0,
    ROPE: tl.constexpr = False,
    H: tl.constexpr = 0,
    HKV: tl.constexpr = 0,
    D: tl.constexpr = 0,
    BLOCK_SIZE: tl.constexpr = 0,
    # NORM_OUT: the stored rows (the residual stream) also times the next RMSNorm's weight into scaled_ptr, and
    # their squares summed over each NORM_GROUP columns into squares_ptr (store_normed); SQUARES: x is such rows
    # times the weight, and squares_ptr their squares [K / NORM_GROUP, M]: each row's RMSNorm factor from them
    # scales its products (the fold's result without its squares accumulator)
    norm_out_ptr=None,  # [N] (NORM_OUT)
    scaled_ptr=None,  # [M, N] (NORM_OUT)
    squares_ptr=None,  # float32 [N / NORM_GROUP, M] (NORM_OUT), [K / NORM_GROUP, M] (SQUARES)
    NORM_OUT: tl.constexpr = False,
    SQUARES: tl.constexpr = False,
    NORM_GROUP: tl.constexpr = 0,  # NORM_OUT, SQUARES: columns a sum of squares spans (kernels.NORM_GROUP)
):
    tile = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    if ROPE:  # BLOCK_N / 2 dims of one head's first half and their partners D / 2 further on
        ROPE_HALF: tl.constexpr = BLOCK_N // 2
        head = tile // (D // BLOCK_N)
        first_dim = tile % (D // BLOCK_N) * ROPE_HALF
        lanes = tl.arange(0, BLOCK_N)
        cols = head * D + first_dim + lanes % ROPE_HALF + (lanes >= ROPE_HALF).to(tl.int32) * (D // 2)
        col_ok = cols < N
    elif GATED:  # BLOCK_N / 2 gate rows and the up rows of the same outputs, N / 2 weight rows further on
        HALF: tl.constexpr = BLOCK_N // 2
        lanes = tl.arange(0, BLOCK_N)
        outputs = tile * HALF + lanes % HALF
        cols = tl.where(lanes < HALF, outputs, N // 2 + outputs)  # [BLOCK_N] weight rows
        col_ok = outputs < N // 2
    else:
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns = weight rows
        col_ok = cols < N
    row_ok = rows < M
    # this program's part of K: whole tiles of BLOCK_K (the last part masked where they do not divide evenly)
    PART: tl.constexpr = ((K + BLOCK_K - 1) // BLOCK_K + SPLIT - 1) // SPLIT * BLOCK_K
    part = tl.program_id(1)
    if PDL:
        if PREFETCH:  # no kernel of a step writes weights: these lines can be on their way while the last one ends
            lines = part * PART + tl.arange(0, 2 * BLOCK_K // 64) * 64  # 128-byte lines of float16
            prefetch_l2(w_ptr + cols[:, None] * K + lines[None, :], col_ok[:, None] & (lines < K)[None, :])
        tl.extra.cuda.gdc_wait()  # every earlier kernel's results are in
    if SQUARES:  # [BLOCK_M, 1]: each row's squares over all of K, as rms_factor sums them. Read before the K loop,
        # whose first weight tiles' loads hide it; read after the loop, group by group, it held up every program's end
        # (a 7B's 8 / 32-row steps replayed 5% / 0.9% slower on an H200: thirty-first session)
        squares = row_squares(squares_ptr, rows, row_ok, M, K, NORM_GROUP)
    else:  # NORM: x^2 per row, summed over K below (kernels.check_norms refuses NORM with SQUARES)
        squares = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    EVEN: tl.constexpr = N % BLOCK_N == 0 and K % (BLOCK_K * SPLIT) == 0  # no masks (decided at compile time)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # the output's transpose
    for start in range(0, PART, BLOCK_K):  # bounds known at compile time: the last part's excess is masked
        ks = part * PART + start + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        w_ptrs = w_ptr + cols[:, None] * K + ks[None, :]
        # [BLOCK_N, BLOCK_K]; EVEN: unmasked, vectorised loads
        w = tl.load(w_ptrs) if EVEN else tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        x, x_squared = input_tile(x_ptr, norm_ptr, rows, row_ok, ks, k_ok, K, False, NORM)  # [BLOCK_M, BLOCK_K]
        if NORM:
            squares += x_squared
        if FP32:
            acc += tl.dot(w.to(tl.float32), tl.trans(x), input_precision="ieee")
        else:  # the input rounded to the weight's dtype, as cuBLAS takes it
            acc += tl.dot(w, tl.trans(x.to(w.dtype)))  # [BLOCK_N, BLOCK_M]
    if PDL:  # the next kernel may launch once every program has read all of its K
        tl.extra.cuda.gdc_launch_dependents()
    FACTOR: tl.constexpr = NORM or SQUARES  # each row's products times its RMSNorm factor
    if ROPE:
        store_rope(acc, squares, out_ptr, eps, rows, row_ok, head, first_dim, cos_ptr, sin_ptr, position_ptr,
                   table_ptr, k_ptr, v_ptr, position_stride, table_row_stride, N, K, FACTOR, BLOCK_M, BLOCK_N, H, HKV,
                   D, BLOCK_SIZE)  # fmt: skip
    elif GATED:
        store_gated(acc, squares, out_ptr, w_ptr, eps, rows, row_ok, tile, N // 2, K, FACTOR, BLOCK_M, BLOCK_N)
    elif SPLIT == 1:
        store_rows(acc, squares, residual_ptr, out_ptr, eps, rows, cols, row_ok, col_ok, N, K, HAS_RESIDUAL, FACTOR,
                   norm_out_ptr, scaled_ptr, squares_ptr, M, NORM_OUT, NORM_GROUP)  # fmt: skip
    else:
        store_split(acc, squares, partial_ptr, counter_ptr, residual_ptr, out_ptr, eps, rows, cols, row_ok, col_ok,
                    tile, part, N, K, HAS_RESIDUAL, FACTOR, SPLIT, BLOCK_M, norm_out_ptr, scaled_ptr, squares_ptr, M,
                    NORM_OUT, NORM_GROUP)  # fmt: skip


@triton.jit
def store_split(acc, squares, partial_ptr, counter_ptr, residual_ptr, out_ptr, eps, rows, cols, row_ok, col_ok, tile,
                part, N: tl.constexpr, K: tl.constexpr, HAS_RESIDUAL: tl.constexpr, NORM: tl.constexpr,
                SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, norm_out_ptr=None, scaled_ptr=None, squares_ptr=None, M=0,
                NORM_OUT: tl.constexpr = False, NORM_GROUP: tl.constexpr = 0):  # fmt: skip
    """One split's products acc [BLOCK_N, BLOCK_M] (transposed) into its float32 partial; the tile's last program
    to finish sums every split's partial in split order (the same bits whichever came last) and stores the rows
    (store_rows), leaving the tile's counter at zero for the next launch."""
    # [BLOCK_N, BLOCK_M] offsets of this tile's products in a split's partial; loads bypass L1 (.cg): other
    # programs wrote them, and an earlier launch's may be cached
    offsets = cols[:, None] * BLOCK_M + rows[None, :]
    tl.store(partial_ptr + part * N * BLOCK_M + offsets, acc, mask=col_ok[:, None])
    tl.debug_barrier()  # every thread's stores above happen before this program is counted
    done = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu")  # the tile's programs done before
    if done == SPLIT - 1:  # the last: the others' partials are in
        tl.atomic_xchg(counter_ptr + tile, 0, sem="relaxed", scope="gpu")  # ready for the next launch
        tl.debug_barrier()
        total = tl.zeros_like(acc)  # float32, as acc
        for other in tl.static_range(SPLIT):  # in split order, whichever program came last: the same bits
            total += tl.load(partial_ptr + other * N * BLOCK_M + offsets, mask=col_ok[:, None], cache_modifier=".cg")
        store_rows(total, squares, residual_ptr, out_ptr, eps, rows, cols, row_ok, col_ok, N, K, HAS_RESIDUAL, NORM,
                   norm_out_ptr, scaled_ptr, squares_ptr, M, NORM_OUT, NORM_GROUP)  # fmt: skip


@triton.jit
def store_rows(acc, squares, residual_ptr, out_ptr, eps, rows, cols, row_ok, col_ok, N: tl.constexpr, K: tl.constexpr,
               HAS_RESIDUAL: tl.constexpr, NORM: tl.constexpr, norm_out_ptr=None, scaled_ptr=None, squares_ptr=None,
               M=0, NORM_OUT: tl.constexpr = False, NORM_GROUP: tl.constexpr = 0):  # fmt: skip
    """Store the products acc [BLOCK_N, BLOCK_M] (transposed) as out's rows: times RMSNorm's factor, plus the
    residual, in out's dtype; NORM_OUT: what the next RMSNorm's product needs of them too (store_normed)."""
    y = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
    ok = row_ok[:, None] & col_ok[None, :]
    if NORM:  # RMSNorm's per-row factor, applied to the products (quant_matmul_kernels.input_tile)
        y = y * rms_factor(squares, eps, K)
    if HAS_RESIDUAL:
        y += tl.load(residual_ptr + rows[:, None] * N + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    stored = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], stored, mask=ok)
    if NORM_OUT:
        store_normed(stored.to(tl.float32), norm_out_ptr, scaled_ptr, squares_ptr, rows, cols, row_ok, col_ok, M, N,
                     NORM_GROUP)  # fmt: skip


@triton.jit
def store_normed(h, norm_ptr, scaled_ptr, squares_ptr, rows, cols, row_ok, col_ok, M, N: tl.constexpr,
                 NORM_GROUP: tl.constexpr):  # fmt: skip
    """A tile of the rows just stored, h [BLOCK_M, BLOCK_N] in float32, as the next RMSNorm's product takes them
    (quant_matmul_kernels.input_tile's fold): times the norm's weight, rounded to scaled's dtype, into scaled
    [M, N]; and their squares summed over each NORM_GROUP columns into squares [N / NORM_GROUP, M] (rms_factor's
    sum over all N comes from these; row_squares)."""
    BLOCK_M: tl.constexpr = h.shape[0]
    GROUPS: tl.constexpr = h.shape[1] // NORM_GROUP
    ok = row_ok[:, None] & col_ok[None, :]
    weight = tl.load(norm_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    scaled = (h * weight[None, :]).to(scaled_ptr.dtype.element_ty)
    tl.store(scaled_ptr + rows[:, None] * N + cols[None, :], scaled, mask=ok)
    sums = tl.sum(tl.reshape(h * h, (BLOCK_M, GROUPS, NORM_GROUP)), axis=2)  # [BLOCK_M, GROUPS]
    groups = tl.min(tl.reshape(cols, (GROUPS, NORM_GROUP)), axis=1) // NORM_GROUP  # [GROUPS]
    mask = row_ok[:, None] & (groups < N // NORM_GROUP)[None, :]
    tl.store(squares_ptr + groups[None, :] * M + rows[:, None], sums, mask=mask)


@triton.jit
def row_squares(squares_ptr, rows, row_ok, M, K: tl.constexpr, NORM_GROUP: tl.constexpr):
    """Each row's sum of squares over K [BLOCK_M, 1] from store_normed's per-group sums [K / NORM_GROUP, M]."""
    GROUPS: tl.constexpr = K // NORM_GROUP
    GROUPS_PAD: tl.constexpr = triton.next_power_of_2(GROUPS)
    groups = tl.arange(0, GROUPS_PAD)
    mask = row_ok[:, None] & (groups < GROUPS)[None, :]
    # one load of every group ([BLOCK_M, GROUPS_PAD]): a loop over them waited for each load in turn
    total = tl.sum(tl.load(squares_ptr + groups[None, :] * M + rows[:, None], mask=mask, other=0.0), axis=1)
    return total[:, None]


@triton.jit
def store_gated(acc, squares, out_ptr, w_ptr, eps, rows, row_ok, tile, F: tl.constexpr, K: tl.constexpr,
                NORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Store silu(gate) * up for this program's BLOCK_N / 2 outputs from acc [BLOCK_N, BLOCK_M] (gate rows, then
    up rows), as the unfused path computes it: each product rounded to the weight's dtype first, as gate|up would
    be stored, then SiLU·up in float32 (kernels.rows_input's formula), rounded to out's dtype."""
    HALF: tl.constexpr = BLOCK_N // 2
    y = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
    if NORM:
        y = y * rms_factor(squares, eps, K)
    y = y.to(w_ptr.dtype.element_ty).to(tl.float32)
    gate, up = tl.split(tl.permute(tl.reshape(y, (BLOCK_M, 2, HALF)), (0, 2, 1)))  # [BLOCK_M, HALF] each
    outputs = tile * HALF + tl.arange(0, HALF)
    ok = row_ok[:, None] & (outputs < F)[None, :]
    value = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + rows[:, None] * F + outputs[None, :], value.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def store_rope(acc, squares, out_ptr, eps, rows, row_ok, head, first_dim, cos_ptr, sin_ptr, position_ptr, table_ptr,
               k_ptr, v_ptr, position_stride, table_row_stride, N: tl.constexpr, K: tl.constexpr, NORM: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
               BLOCK_SIZE: tl.constexpr):  # fmt: skip
    """The q|k|v products acc [BLOCK_N, BLOCK_M] (transposed) of `head`'s dims first_dim.. (BLOCK_N / 2 of them)
    and their partners D / 2 further on, as attention_kernels.rope_store would leave them: each product rounded
    to out's dtype (as q|k|v is stored), a query or key head rotated in float32 (LLaMA's half-split rotary) and
    rounded again; a query head's into out, a key head's into the k cache and a value head's as it is into the v
    cache, at each row's position in its block (rows' tables may be the same: a prompt riding in the step)."""
    HALF: tl.constexpr = BLOCK_N // 2
    y = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
    if NORM:
        y = y * rms_factor(squares, eps, K)
    y = y.to(out_ptr.dtype.element_ty)
    first, second = tl.split(tl.permute(tl.reshape(y, (BLOCK_M, 2, HALF)), (0, 2, 1)))  # [BLOCK_M, HALF] each
    dims = first_dim + tl.arange(0, HALF)  # [HALF]: the first half's dims; their partners are dims + D / 2
    if head < H + HKV:  # a query or key head: rotated
        angles = rows[:, None] * (D // 2) + dims[None, :]  # [BLOCK_M, HALF]
        cos = tl.load(cos_ptr + angles, mask=row_ok[:, None], other=0.0)
        sin = tl.load(sin_ptr + angles, mask=row_ok[:, None], other=0.0)
        x1, x2 = first.to(tl.float32), second.to(tl.float32)
        first = (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty)
        second = (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty)
    if head < H:
        q_ptrs = out_ptr + rows[:, None] * N + head * D + dims[None, :]
        tl.store(q_ptrs, first, mask=row_ok[:, None])
        tl.store(q_ptrs + D // 2, second, mask=row_ok[:, None])
    else:
        position = tl.load(position_ptr + rows * position_stride, mask=row_ok, other=0)  # [BLOCK_M]
        block = tl.load(table_ptr + rows * table_row_stride + position // BLOCK_SIZE, mask=row_ok, other=0)
        kv_head = (head - H) % HKV
        slots = ((block.to(tl.int64) * HKV + kv_head) * BLOCK_SIZE + position % BLOCK_SIZE) * D  # [BLOCK_M]
        offsets = slots[:, None] + dims[None, :]  # [BLOCK_M, HALF]
        if head < H + HKV:
            tl.store(k_ptr + offsets, first, mask=row_ok[:, None])
            tl.store(k_ptr + offsets + D // 2, second, mask=row_ok[:, None])
        else:
            tl.store(v_ptr + offsets, first, mask=row_ok[:, None])
            tl.store(v_ptr + offsets + D // 2, second, mask=row_ok[:, None])


@triton.jit
def prefetch_l2(ptrs, mask):
    """Ask for the lines at `ptrs` (where `mask`) to be brought into L2, without waiting for them."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
        "=r,l,r", [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
    )  # fmt: skip

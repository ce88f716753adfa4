"""Launch boundaries against device-side flags: chains of 64-row products, a launch each or one persistent launch.

Why: what a 64-row 7B step still loses lies between its launches (thirtieth session, docs/engine.md: the SMs hold no
program for a fifth to a third of a lone product's cycles, and asking for more of the next weight before the PDL
wait made steps slower). The design left is a persistent step, a program per SM walking a layer's products and
passing counts in memory instead of launches. Before building it, this measures its core on two chains over
`--layers` layers of distinct weights (none in L2 when read), each product needing every output of the one before:

  o     x[l + 1] = x[l] @ Wo[l].T (4096 x 4096, split over K in two as steps run o)
  mlp   a 7B layer's products but the attention: h[l] + h[l] @ Wo.T -> silu(gate) * up of it (11,008 wide, in
        gate|up's epilogue) -> plus its product by down (split in two): h[l + 1]; no RMSNorms

    python bench/sweep_persistent_chain.py --layers 32 --rows 64      # one H200
    TRITON_INTERPRET=1 python bench/sweep_persistent_chain.py --tiny    # the persistent kernels' sums, on the CPU

Lines, µs a layer:
  launches     matmul_kernels' kernel, a launch a product with PDL and its 2-tile L2 prefetch, in a CUDA graph (the
               engine's way), with its tile and split (gate|up in the tile given, as the autotuner may choose)
  persistent   one launch, a program an SM (all resident, so a wait never waits on a program that cannot run), each
               taking its share of every product's tiles in turn: before waiting for the product before it, it
               asks for `prefetch` K tiles of its weight into L2, or (o, `preload`) loads its first tile into registers
  copy's rate  the weights' bytes at a device-to-device copy's rate (reads and writes counted): what no chain beats
Every variant's last output is checked against torch's chain first. --tiny runs the persistent kernels with one
program through Triton's interpreter on small shapes against torch (no timing): their sums and counts, not their
concurrency.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import torch
import triton
import triton.language as tl
from sweep_matmul_rows import graph_time_us
from sweep_matmul_rows_tiles import launch

from vicunaflow import matmul_kernels
from vicunaflow.matmul_kernels import prefetch_l2, store_gated


@triton.jit
def wait_for(count_ptr, target):
    """Spin until the count reaches target; the acquire orders this program's later loads after the stores counted."""
    while tl.atomic_add(count_ptr, 0, sem="acquire", scope="gpu") < target:
        pass


@triton.jit
def products(acc, w_rows, x_rows, row_ok, first, START: tl.constexpr, PART: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] plus w [BLOCK_N, PART] @ x [BLOCK_M, PART].T from offset START of the part. x comes
    through L2 (.cg): other programs of this launch stored it, and L1 may hold an older copy."""
    for offset in range(START, PART, BLOCK_K):
        ks = first + offset
        w = tl.load(w_rows + ks[None, :])
        x = tl.load(x_rows + ks[None, :], mask=row_ok[:, None], other=0.0, cache_modifier=".cg")
        acc += tl.dot(w, tl.trans(x))
    return acc


@triton.jit
def finish_split(acc, partial_ptr, tile_count_ptr, done_ptr, out_ptr, residual_ptr, rows, row_ok, cols, part,
                 N: tl.constexpr, SPLIT: tl.constexpr, HAS_RESIDUAL: tl.constexpr):  # fmt: skip
    """One split's products acc [BLOCK_N, BLOCK_M] into its partial [SPLIT, N, BLOCK_M]; the tile's last split to
    finish sums the parts in split order, adds the residual, stores out's columns [M, N] and counts the tile done."""
    BLOCK_M: tl.constexpr = acc.shape[1]
    offsets = cols[:, None] * BLOCK_M + rows[None, :]
    tl.store(partial_ptr + part * N * BLOCK_M + offsets, acc)
    tl.debug_barrier()  # every thread's stores happen before this program is counted
    if tl.atomic_add(tile_count_ptr, 1, sem="acq_rel", scope="gpu") == SPLIT - 1:
        tl.debug_barrier()
        total = tl.zeros(acc.shape, dtype=tl.float32)
        for other in tl.static_range(SPLIT):
            total += tl.load(partial_ptr + other * N * BLOCK_M + offsets, cache_modifier=".cg")
        y = tl.trans(total)  # [BLOCK_M, BLOCK_N]
        at = rows[:, None] * N + cols[None, :]
        if HAS_RESIDUAL:
            y += tl.load(residual_ptr + at, mask=row_ok[:, None], other=0.0, cache_modifier=".cg").to(tl.float32)
        tl.store(out_ptr + at, y.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        tl.debug_barrier()
        tl.atomic_add(done_ptr, 1, sem="release", scope="gpu")


@triton.jit
def ask_l2(w_rows, part_start, K: tl.constexpr, PREFETCH: tl.constexpr, BLOCK_K: tl.constexpr):
    """Ask for the lines of PREFETCH K tiles of these weight rows from part_start into L2 (PREFETCH 0: none)."""
    if PREFETCH > 0:
        lines = part_start + tl.arange(0, PREFETCH * BLOCK_K // 64) * 64  # 128-byte lines of float16
        prefetch_l2(w_rows + lines[None, :], (lines < K)[None, :])


@triton.jit
def chain_kernel(
    x_ptr,  # [L + 1, M, K] float16: x[0] given, x[l + 1] stored by layer l
    w_ptr,  # [L, N, K] float16, N == K
    partial_ptr,  # [L, SPLIT, N, BLOCK_M] float32: each split's products (transposed)
    tile_count_ptr,  # [L, N / BLOCK_N] int32 zeros: a tile's splits done
    layer_count_ptr,  # [L] int32 zeros: a layer's tiles stored
    M,
    L: tl.constexpr,
    N: tl.constexpr,
    K: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREFETCH: tl.constexpr,  # K tiles of the weight asked into L2 before waiting for the layer before
    PRELOAD: tl.constexpr,  # the first K tile loaded into registers before waiting
    PROGRAMS: tl.constexpr,  # the grid (all resident)
):
    TILES: tl.constexpr = N // BLOCK_N
    PART: tl.constexpr = K // SPLIT
    START: tl.constexpr = BLOCK_K if PRELOAD else 0  # the K loop's first offset: PRELOAD took the first tile
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    for layer in range(0, L):
        # items split-major: with TILES * SPLIT programs each takes one item a layer, a tile's splits on two SMs
        for turn in range(0, (TILES * SPLIT + PROGRAMS - 1) // PROGRAMS):
            item = tl.program_id(0) + turn * PROGRAMS
            if item < TILES * SPLIT:
                tile, part = item % TILES, item // TILES
                cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns = weight rows
                first = part * PART + tl.arange(0, BLOCK_K)
                w_rows = w_ptr + layer * N * K + cols[:, None] * K  # [BLOCK_N, 1]
                ask_l2(w_rows, part * PART, K, PREFETCH, BLOCK_K)
                if PRELOAD:
                    w_first = tl.load(w_rows + first[None, :])  # [BLOCK_N, BLOCK_K], in flight while this waits
                if layer > 0:  # every tile of x[layer] stored
                    wait_for(layer_count_ptr + layer - 1, TILES)
                x_rows = x_ptr + layer * M * K + rows[:, None] * K  # [BLOCK_M, 1]
                acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # the output's transpose
                if PRELOAD:
                    x = tl.load(x_rows + first[None, :], mask=row_ok[:, None], other=0.0, cache_modifier=".cg")
                    acc += tl.dot(w_first, tl.trans(x))
                acc = products(acc, w_rows, x_rows, row_ok, first, START, PART, BLOCK_K)
                finish_split(acc, partial_ptr + layer * SPLIT * N * BLOCK_M, tile_count_ptr + layer * TILES + tile,
                             layer_count_ptr + layer, x_ptr + (layer + 1) * M * K, x_ptr, rows, row_ok, cols, part, N,
                             SPLIT, False)  # fmt: skip


@triton.jit
def split_item(item, w_ptr, x_rows, wait_ptr, wait_target, partial_ptr, tile_count_ptr, done_ptr, out_ptr, residual_ptr,
               rows, row_ok, lanes, N: tl.constexpr, K: tl.constexpr, SPLIT: tl.constexpr, BLOCK_K: tl.constexpr,
               PREFETCH: tl.constexpr):  # fmt: skip
    """One item (a tile's split) of a product over K split in SPLIT, w [N, K], x rows [BLOCK_M, K] from x_rows, once
    wait_ptr's count reaches wait_target; the tile's last split stores out = residual + x @ w.T [M, N]."""
    TILES: tl.constexpr = N // lanes.shape[0]
    PART: tl.constexpr = K // SPLIT
    tile, part = item % TILES, item // TILES
    cols = tile * lanes.shape[0] + lanes
    w_rows = w_ptr + cols[:, None] * K
    ask_l2(w_rows, part * PART, K, PREFETCH, BLOCK_K)
    wait_for(wait_ptr, wait_target)
    acc = tl.zeros((lanes.shape[0], rows.shape[0]), dtype=tl.float32)
    acc = products(acc, w_rows, x_rows, row_ok, part * PART + tl.arange(0, BLOCK_K), 0, PART, BLOCK_K)
    finish_split(acc, partial_ptr, tile_count_ptr + tile, done_ptr, out_ptr, residual_ptr, rows, row_ok, cols, part,
                 N, SPLIT, True)  # fmt: skip


@triton.jit
def mlp_chain_kernel(
    h_ptr,  # [L + 1, M, D] float16: h[0] given, h[l + 1] stored by layer l's down
    mid_ptr,  # [L, M, D] float16: h[l] + h[l] @ Wo[l].T
    act_ptr,  # [L, M, F] float16: silu(gate) * up of mid[l]
    wo_ptr,  # [L, D, D] float16
    w13_ptr,  # [L, 2F, D] float16: gate rows, then up rows
    w2_ptr,  # [L, D, F] float16
    partial_ptr,  # [L, 2, SPLIT, D, BLOCK_M] float32: o's and down's split products
    tile_count_ptr,  # [L, 2, D / BLOCK_N] int32 zeros
    done_ptr,  # [L, 3] int32 zeros: o's tiles, gate|up's tiles, down's tiles stored
    M,
    L: tl.constexpr,
    D: tl.constexpr,
    F: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREFETCH: tl.constexpr,
    PROGRAMS: tl.constexpr,
):
    TILES: tl.constexpr = D // BLOCK_N  # o's and down's output tiles
    HALF: tl.constexpr = BLOCK_N // 2
    GATED: tl.constexpr = F // HALF  # gate|up's tiles: HALF gate rows and the HALF up rows of the same outputs
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    lanes = tl.arange(0, BLOCK_N)
    for layer in range(0, L):
        wide_layer = tl.cast(layer, tl.int64)  # a layer's offset into w13 passes 2**31 elements from the 24th layer on
        h_rows = h_ptr + layer * M * D + rows[:, None] * D
        mid = mid_ptr + layer * M * D
        for turn in range(0, (TILES * SPLIT + PROGRAMS - 1) // PROGRAMS):  # o: h -> mid
            item = tl.program_id(0) + turn * PROGRAMS
            if item < TILES * SPLIT:  # the layer before's down stored h[layer] (nothing to wait for in the first)
                after = done_ptr + tl.maximum(layer - 1, 0) * 3 + 2
                split_item(item, wo_ptr + wide_layer * D * D, h_rows, after, tl.where(layer > 0, TILES, 0),
                           partial_ptr + layer * 2 * SPLIT * D * BLOCK_M, tile_count_ptr + layer * 2 * TILES,
                           done_ptr + layer * 3, mid, h_ptr + layer * M * D, rows, row_ok, lanes, D, D, SPLIT, BLOCK_K,
                           PREFETCH)  # fmt: skip
        for turn in range(0, (GATED + PROGRAMS - 1) // PROGRAMS):  # gate|up: mid -> act
            item = tl.program_id(0) + turn * PROGRAMS
            if item < GATED:
                outputs = item * HALF + lanes % HALF
                cols = tl.where(lanes < HALF, outputs, F + outputs)  # [BLOCK_N] weight rows
                w_rows = w13_ptr + wide_layer * 2 * F * D + cols[:, None] * D
                ask_l2(w_rows, 0, D, PREFETCH, BLOCK_K)
                wait_for(done_ptr + layer * 3, TILES)
                acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                acc = products(acc, w_rows, mid + rows[:, None] * D, row_ok, tl.arange(0, BLOCK_K), 0, D, BLOCK_K)
                store_gated(acc, acc, act_ptr + layer * M * F, w13_ptr, 0.0, rows, row_ok, item, F, D, False, BLOCK_M,
                            BLOCK_N)  # fmt: skip
                tl.debug_barrier()  # every thread's stores happen before the tile is counted
                tl.atomic_add(done_ptr + layer * 3 + 1, 1, sem="release", scope="gpu")
        for turn in range(0, (TILES * SPLIT + PROGRAMS - 1) // PROGRAMS):  # down: mid + act @ W2.T -> h[layer + 1]
            item = tl.program_id(0) + turn * PROGRAMS
            if item < TILES * SPLIT:
                split_item(item, w2_ptr + wide_layer * D * F, act_ptr + layer * M * F + rows[:, None] * F,
                           done_ptr + layer * 3 + 1, GATED, partial_ptr + (layer * 2 + 1) * SPLIT * D * BLOCK_M,
                           tile_count_ptr + (layer * 2 + 1) * TILES, done_ptr + layer * 3 + 2, h_ptr + (layer + 1) * M * D,
                           mid, rows, row_ok, lanes, D, F, SPLIT, BLOCK_K, PREFETCH)  # fmt: skip


def persistent_chain(xs, weights, partial, counters, programs, tile, split, prefetch=0, preload=False) -> None:
    """x[1:] from x[0] through every weight in one chain_kernel launch of `programs` programs (counters zeroed first:
    a graph replays the zeroing too)."""
    block_n, block_k, warps, stages = tile
    layers, m, k = weights.shape[0], xs.shape[1], xs.shape[2]
    counters.zero_()
    chain_kernel[(programs,)](
        xs, weights, partial, counters, counters[layers * (k // block_n) :], m,
        L=layers, N=k, K=k, SPLIT=split, BLOCK_M=partial.shape[-1], BLOCK_N=block_n, BLOCK_K=block_k,
        PREFETCH=prefetch, PRELOAD=preload, PROGRAMS=programs, num_warps=warps, num_stages=stages,
    )  # fmt: skip


def buffers(layers: int, m: int, k: int, tile, split: int, device: str):
    """The chain's activations [L + 1, m, k] (x[0] random), partials and counters."""
    block_m = max(16, 1 << (m - 1).bit_length())
    xs = torch.zeros(layers + 1, m, k, dtype=torch.float16, device=device)
    xs[0] = torch.randn(m, k, device=device)
    partial = torch.empty(layers, split, k, block_m, dtype=torch.float32, device=device)
    counters = torch.zeros(layers * (k // tile[0] + 1), dtype=torch.int32, device=device)
    return xs, partial, counters


def reference(xs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The chain's last output through torch's products, float16 as the kernels store it."""
    x = xs[0]
    for weight in weights:
        x = torch.mm(x.float(), weight.float().t()).to(x.dtype)
    return x


@dataclasses.dataclass
class Mlp:
    """The mlp chain's weights and buffers: h [L + 1, M, D] (h[0] random), mid, act, partials and counts."""

    wo: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    h: torch.Tensor
    mid: torch.Tensor
    act: torch.Tensor
    partial: torch.Tensor
    counters: torch.Tensor

    @classmethod
    def random(cls, layers: int, m: int, d: int, f: int, block_n: int, split: int, device: str) -> Mlp:
        def weight(*shape, scale):  # o's and down's products small against the residual: h stays near 1
            return (torch.randn(layers, *shape, device=device) * scale / shape[-1] ** 0.5).to(torch.float16)

        block_m = max(16, 1 << (m - 1).bit_length())
        h = torch.zeros(layers + 1, m, d, dtype=torch.float16, device=device)
        h[0] = torch.randn(m, d, device=device)
        return cls(
            weight(d, d, scale=0.2), weight(2 * f, d, scale=1.0), weight(d, f, scale=0.2), h,
            torch.zeros(layers, m, d, dtype=torch.float16, device=device),
            torch.zeros(layers, m, f, dtype=torch.float16, device=device),
            torch.empty(layers, 2, split, d, block_m, dtype=torch.float32, device=device),
            torch.zeros(layers * (2 * (d // block_n) + 3), dtype=torch.int32, device=device),
        )  # fmt: skip

    def reference(self) -> torch.Tensor:
        """The last h through torch's products, each rounded to float16 where the kernels store it."""
        h = self.h[0]
        for wo, w13, w2 in zip(self.wo, self.w13, self.w2, strict=True):
            mid = (h.float() + h.float() @ wo.float().t()).half()
            gate, up = (mid.float() @ w13.float().t()).half().float().chunk(2, dim=1)
            act = (torch.nn.functional.silu(gate) * up).half()
            h = (mid.float() + act.float() @ w2.float().t()).half()
        return h

    def launches(self, tile, gated_tile, split: int) -> None:
        """Every layer's three products as the engine launches them (PDL, o and down split over K)."""
        for layer in range(self.wo.shape[0]):
            h, mid, act = self.h[layer], self.mid[layer], self.act[layer]
            launch(h, self.wo[layer], h, mid, tile, split, pdl=True)
            launch(mid, self.w13[layer], None, act, gated_tile, 1, pdl=True, gated=True)
            launch(act, self.w2[layer], mid, self.h[layer + 1], tile, split, pdl=True)

    def persistent(self, programs: int, tile, split: int, prefetch: int = 0) -> None:
        """Every layer's three products in one mlp_chain_kernel launch (counts zeroed first, in a graph too)."""
        block_n, block_k, warps, stages = tile
        layers, m, d = self.wo.shape[0], self.h.shape[1], self.h.shape[2]
        self.counters.zero_()
        mlp_chain_kernel[(programs,)](
            self.h, self.mid, self.act, self.wo, self.w13, self.w2, self.partial, self.counters,
            self.counters[layers * 2 * (d // block_n) :], m, L=layers, D=d, F=self.act.shape[2], SPLIT=split,
            BLOCK_M=self.partial.shape[-1], BLOCK_N=block_n, BLOCK_K=block_k, PREFETCH=prefetch, PROGRAMS=programs,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip


def graph_us(run, layers: int) -> float:
    """µs a product: sweep_matmul_rows' best replay of a CUDA graph of `run` (the whole chain), over the layers."""
    return graph_time_us(lambda weight, out: run(), [None], [None], 1) / layers


def checked(label: str, run, outputs: torch.Tensor, expected: torch.Tensor, layers: int) -> str:
    """'label µs' after checking the chain's last output (outputs[-1]) against `expected`, or why it was not timed."""
    try:
        outputs[1:].zero_()
        run()
        error = (outputs[-1].float() - expected.float()).abs().max().item() / expected.float().abs().max().item()
        if not error < 0.02:
            raise AssertionError(f"relative error {error:.3g}")
        return f"{label:48} {graph_us(run, layers):7.2f}"
    except Exception as err:  # out of shared memory, or wrong
        return f"{label:48} failed ({type(err).__name__}: {str(err)[:80]})"


def tiny() -> None:
    """The persistent kernel with one program through the interpreter, against torch."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--tiny runs through Triton's interpreter: set TRITON_INTERPRET=1")
    torch.manual_seed(0)
    layers, m, k, tile, split = 3, 5, 64, (32, 16, 1, 1), 2
    weights = torch.randn(layers, k, k, dtype=torch.float16) / k**0.5
    xs, partial, counters = buffers(layers, m, k, tile, split, "cpu")
    for preload in (False, True):
        xs[1:].zero_()
        persistent_chain(xs, weights, partial, counters, 1, tile, split, preload=preload)
        expected = reference(xs, weights)
        torch.testing.assert_close(xs[-1].float(), expected.float(), atol=2e-2, rtol=2e-2)
        done = counters[layers * (k // tile[0]) :].tolist()
        if done != [k // tile[0]] * layers:
            raise AssertionError(f"layer counts {done}")
        print(f"persistent o chain, preload {preload}: {layers} layers as torch's, every layer's tiles counted")
    mlp = Mlp.random(layers, m, k, 96, tile[0], split, "cpu")
    mlp.persistent(1, tile, split)
    torch.testing.assert_close(mlp.h[-1].float(), mlp.reference().float(), atol=2e-2, rtol=2e-2)
    done = mlp.counters[layers * 2 * (k // tile[0]) :].view(layers, 3).tolist()
    if done != [[k // tile[0], 96 // (tile[0] // 2), k // tile[0]]] * layers:
        raise AssertionError(f"mlp counts {done}")
    print(f"persistent mlp chain: {layers} layers as torch's, every product's tiles counted")


def o_chain(args, sms: int, split: int) -> None:
    """The o chain's lines: launches, then the persistent kernel at each prefetch, for each of matmul_rows' tiles."""
    k = 4096
    weights = torch.randn(args.layers, k, k, dtype=torch.float16, device="cuda") / k**0.5
    print(f"o: {k} x {k}, {args.layers} layers; at a copy's rate {k * k * 2 / args.read_rate:.2f} µs a layer")
    for m in args.rows:
        print(f"M={m}")
        for tile in matmul_kernels.MANY_ROWS_TILES:
            xs, partial, counters = buffers(args.layers, m, k, tile, split, "cuda")
            expected = reference(xs, weights)
            name = "x".join(map(str, tile))

            def launches(xs=xs, tile=tile):
                for layer in range(args.layers):
                    launch(xs[layer], weights[layer], None, xs[layer + 1], tile, split, pdl=True)

            print(checked(f"  launches {name}/{split}", launches, xs, expected, args.layers), flush=True)
            programs = min(sms, k // tile[0] * split)  # one a tile's split, or one an SM
            for prefetch in args.prefetch:
                for preload in (False, True):
                    run = lambda f=prefetch, q=preload, xs=xs, partial=partial, c=counters, t=tile, p=programs: (  # noqa: E731
                        persistent_chain(xs, weights, partial, c, p, t, split, f, q)
                    )
                    label = f"  persistent {name}/{split} x {programs} prefetch {prefetch}" + (" preload" * preload)
                    print(checked(label, run, xs, expected, args.layers), flush=True)


def mlp_chain(args, sms: int, split: int) -> None:
    """The mlp chain's lines: launches (with each gate|up tile), then the persistent kernel at each prefetch."""
    d, f = 4096, 11008
    size = (d * d + 3 * d * f) * 2
    print(
        f"mlp: o, gate|up with SiLU·up, down, {size / 1e6:.0f} MB; at a copy's rate {size / args.read_rate:.2f} µs a layer"
    )
    for m in args.rows:
        print(f"M={m}")
        for tile in matmul_kernels.MANY_ROWS_TILES:
            mlp = Mlp.random(args.layers, m, d, f, tile[0], split, "cuda")
            expected = mlp.reference()
            name = "x".join(map(str, tile))
            for gated_tile in matmul_kernels.MANY_ROWS_TILES:
                label = f"  launches {name}/{split}, gate|up " + "x".join(map(str, gated_tile))
                run = lambda mlp=mlp, t=tile, g=gated_tile: mlp.launches(t, g, split)  # noqa: E731
                print(checked(label, run, mlp.h, expected, args.layers), flush=True)
            for prefetch in args.prefetch:  # a program an SM: gate|up has more tiles than there are SMs
                run = lambda mlp=mlp, t=tile, f=prefetch: mlp.persistent(sms, t, split, f)  # noqa: E731
                label = f"  persistent {name}/{split} x {sms} prefetch {prefetch}"
                print(checked(label, run, mlp.h, expected, args.layers), flush=True)
            del mlp


def copy_rate() -> float:
    """Bytes a µs a device-to-device copy of 1 GiB moves, its reads and writes counted."""
    source = torch.empty(2**29, dtype=torch.float16, device="cuda")
    target = torch.empty_like(source)
    return source.numel() * 2 * 2 / graph_us(lambda: target.copy_(source), 1)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rows", type=int, nargs="+", default=[64])
    parser.add_argument("--prefetch", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--chains", nargs="+", choices=["o", "mlp"], default=["o", "mlp"])
    parser.add_argument("--tiny", action="store_true", help="the interpreter's check on the CPU (no timing)")
    args = parser.parse_args()
    if args.tiny:
        return tiny()
    torch.manual_seed(0)
    sms, split = torch.cuda.get_device_properties(0).multi_processor_count, 2
    args.read_rate = copy_rate()
    print(f"{sms} SMs; a device-to-device copy moves {args.read_rate / 1e6:.2f} TB/s (reads and writes)")
    if "o" in args.chains:
        o_chain(args, sms, split)
    if "mlp" in args.chains:
        mlp_chain(args, sms, split)


if __name__ == "__main__":
    main()

"""Launch boundaries against device-side flags: a chain of 64-row products, a launch each or one persistent launch.

Why: what a 64-row 7B step still loses lies between its launches (thirtieth session, docs/engine.md: the SMs hold no
program for a fifth to a third of a lone product's cycles, and asking for more of the next weight before the PDL
wait made steps slower). The design left is a persistent step, a program per SM walking a layer's products and
passing flags in memory instead of launches. Before building it, this measures its core on the simplest chain:
`--layers` products x[l + 1] = x[l] @ W[l].T of o's shape (4096 x 4096, split over K in two as steps run o), each
needing every tile of the one before, over distinct weights (none in L2 when read).

    python bench/sweep_persistent_chain.py --layers 32 --rows 64     # one H200
    TRITON_INTERPRET=1 python bench/sweep_persistent_chain.py --tiny   # the persistent kernel's sums, on the CPU

Lines, µs a product:
  launches     matmul_kernels' kernel, a launch a product with PDL and its 2-tile L2 prefetch, in a CUDA graph (the
               engine's way), with its tile and split
  persistent   one launch of chain_kernel, a program an SM (all resident, so a spin never waits on a program that
               cannot run), each taking its tile of every layer in turn: before waiting for the layer before it, it
               asks for `prefetch` K tiles of its weight into L2, or (`preload`) loads its first tile into registers
  copy         the weights' bytes at a device-to-device copy's rate: what no product can beat
Every variant's last output is checked against cuBLAS's chain first. --tiny runs the persistent kernel with one
program through Triton's interpreter on small shapes against torch (no timing): its splits' sums and flags, not
its concurrency.
"""

from __future__ import annotations

import argparse
import os

import torch
import triton
import triton.language as tl
from sweep_matmul_rows import graph_time_us
from sweep_matmul_rows_tiles import launch

from vicunaflow import matmul_kernels
from vicunaflow.matmul_kernels import prefetch_l2


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
                if PREFETCH > 0:
                    lines = part * PART + tl.arange(0, PREFETCH * BLOCK_K // 64) * 64  # 128-byte lines of float16
                    prefetch_l2(w_rows + lines[None, :], (lines < K)[None, :])
                if PRELOAD:
                    w_first = tl.load(w_rows + first[None, :])  # [BLOCK_N, BLOCK_K], in flight while this program waits
                if layer > 0:  # every tile of x[layer] stored (the acquire orders the loads of x below after it)
                    while tl.atomic_add(layer_count_ptr + layer - 1, 0, sem="acquire", scope="gpu") < TILES:
                        pass
                x_rows = x_ptr + layer * M * K + rows[:, None] * K  # [BLOCK_M, 1]
                acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # the output's transpose
                if PRELOAD:  # .cg: other programs of this launch stored x, which L1 may hold stale
                    x = tl.load(x_rows + first[None, :], mask=row_ok[:, None], other=0.0, cache_modifier=".cg")
                    acc += tl.dot(w_first, tl.trans(x))
                for offset in range(START, PART, BLOCK_K):
                    ks = first + offset
                    w = tl.load(w_rows + ks[None, :])
                    x = tl.load(x_rows + ks[None, :], mask=row_ok[:, None], other=0.0, cache_modifier=".cg")
                    acc += tl.dot(w, tl.trans(x))  # [BLOCK_N, BLOCK_M]
                # the tile's last split to finish sums the parts in split order and stores x[layer + 1]'s columns
                offsets = cols[:, None] * BLOCK_M + rows[None, :]
                tl.store(partial_ptr + (layer * SPLIT + part) * N * BLOCK_M + offsets, acc)
                tl.debug_barrier()  # every thread's stores happen before this program is counted
                if tl.atomic_add(tile_count_ptr + layer * TILES + tile, 1, sem="acq_rel", scope="gpu") == SPLIT - 1:
                    tl.debug_barrier()
                    total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                    for other in tl.static_range(SPLIT):
                        total += tl.load(
                            partial_ptr + (layer * SPLIT + other) * N * BLOCK_M + offsets, cache_modifier=".cg"
                        )
                    out = x_ptr + (layer + 1) * M * K + rows[:, None] * N + cols[None, :]
                    tl.store(out, tl.trans(total).to(x_ptr.dtype.element_ty), mask=row_ok[:, None])
                    tl.debug_barrier()
                    tl.atomic_add(layer_count_ptr + layer, 1, sem="release", scope="gpu")


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


def graph_us(run, layers: int) -> float:
    """µs a product: sweep_matmul_rows' best replay of a CUDA graph of `run` (the whole chain), over the layers."""
    return graph_time_us(lambda weight, out: run(), [None], [None], 1) / layers


def checked(label: str, run, xs: torch.Tensor, expected: torch.Tensor, layers: int) -> str:
    """'label µs' after checking the chain's last output against `expected`, or why it could not be timed."""
    try:
        xs[1:].zero_()
        run()
        error = (xs[-1].float() - expected.float()).abs().max().item() / expected.float().abs().max().item()
        if not error < 0.02:
            raise AssertionError(f"relative error {error:.3g}")
        return f"{label:40} {graph_us(run, layers):7.2f}"
    except Exception as err:  # out of shared memory, or wrong
        return f"{label:40} failed ({type(err).__name__}: {str(err)[:80]})"


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
        print(f"persistent chain, preload {preload}: {layers} layers as torch's, every layer's tiles counted")


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rows", type=int, nargs="+", default=[64])
    parser.add_argument("--prefetch", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--tiny", action="store_true", help="the interpreter's check on the CPU (no timing)")
    args = parser.parse_args()
    if args.tiny:
        return tiny()
    torch.manual_seed(0)
    k, split = 4096, 2
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    weights = torch.randn(args.layers, k, k, dtype=torch.float16, device="cuda") / k**0.5
    copy = torch.empty_like(weights)
    copy_us = graph_us(lambda: copy.copy_(weights), args.layers)  # read and write: half of it is the reads' time
    print(f"o's shape {k} x {k}, {args.layers} layers, {sms} SMs; copy {copy_us / 2:.2f} µs a weight's bytes read")
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


if __name__ == "__main__":
    main()

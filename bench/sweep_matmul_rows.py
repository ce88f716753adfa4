"""Which kernel design multiplies a batched decode step's few rows by a float16 weight fastest (CUDA)?

Why: an 8-row 7B step costs ~1.4x a one-row step on an H200 (issue 16 wants ~1.1x), and
kernels.matmul_rows (tensor cores, x as the tile's rows) measured no faster than cuBLAS. This times
three designs over a wide set of tiles, each kernel alone on the plain product out = x @ W.T (no
RMSNorm, SiLU·up or residual: those fold in the same way for all three), next to cuBLAS and, for
scale, kernels.matvec's one row:

    fma     CUDA cores, kernels.matvec's loop with BLOCK_M rows: acc[M, N, K] += x[M, 1, K] * w[1, N, K]
    dot     tensor cores, x as tl.dot's rows: acc[16, N] += x[16, K] @ w[N, K].T (matmul_rows' form)
    swap    tensor cores, the weight as tl.dot's rows: acc[N, 16] += w[N, K] @ x[16, K].T, so a 64-row
            weight tile can take Hopper's warp-group MMA; optionally split over K (SPLIT > 1: float32
            atomic adds into a zeroed output, the zeroing not timed)

Each time is a CUDA-graph replay of back-to-back launches over enough copies of the weight that none
is still in L2 (50 MB), divided by the launches: what a kernel costs inside the engine's graphs.

    python bench/sweep_matmul_rows.py --rows 2 4 8 16 32 --output results/matmul_rows_sweep.json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import platform
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

SHAPES = {"qkv": (3 * 4096, 4096), "o": (4096, 4096), "gate_up": (2 * 11008, 4096), "down": (4096, 11008)}


@triton.jit
def fma_kernel(x_ptr, w_ptr, out_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # weight rows = output columns
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=k_ok[None, :], other=0.0)  # [BN, BK]
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=(rows < M)[:, None] & k_ok[None, :], other=0.0)
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]  # [BM, BN, BK]
    y = tl.sum(acc, axis=2)  # [BM, BN]
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=(rows < M)[:, None])


@triton.jit
def dot_kernel(x_ptr, w_ptr, out_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=(rows < M)[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=k_ok[None, :], other=0.0)  # [BN, BK]
        acc += tl.dot(x, tl.trans(w))  # [BM, BN]
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=(rows < M)[:, None])


@triton.jit
def swap_kernel(
    x_ptr, w_ptr, out_ptr, M, N, K, k_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr,
):  # fmt: skip
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    first = tl.program_id(1) * k_per_split
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for step in range(0, k_per_split, BLOCK_K):
        ks = first + step + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=k_ok[None, :], other=0.0)  # [BN, BK]
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=(rows < M)[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(w, tl.trans(x))  # [BN, BM]
    ptrs = out_ptr + rows[None, :] * N + cols[:, None]
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=(rows < M)[None, :], sem="relaxed")
    else:
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows < M)[None, :])


def pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def candidates(m: int) -> list[dict]:
    """Every (design, tile) tried for m rows."""
    found = []
    if m <= 8:  # CUDA cores: the accumulator holds BLOCK_M x BLOCK_N x BLOCK_K floats, <= 64 a thread
        block_m = pow2(m)
        for block_n, block_k, warps in [
            (1, 1024, 4), (1, 2048, 8), (2, 512, 4), (2, 1024, 8), (4, 256, 4), (4, 512, 8), (8, 256, 8), (1, 512, 2),
        ]:  # fmt: skip
            if block_m * block_n * block_k <= 64 * 32 * warps:
                found.append(
                    dict(design="fma", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, warps=warps, stages=1)
                )
    block_m = max(16, pow2(m))
    for block_n, block_k, stages in itertools.product([16, 32, 64], [128, 256], [2, 4]):
        found.append(dict(design="dot", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, warps=4, stages=stages))
    for block_n, block_k, stages, split in itertools.product([32, 64, 128], [64, 128, 256], [3, 5], [1, 2, 4]):
        if block_n == 128 and block_k == 256:
            continue  # 64 KB a stage
        found.append(
            dict(design="swap", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, warps=4, stages=stages, split=split)
        )
    for block_n, block_k, split in [(64, 128, 1), (128, 128, 1), (128, 64, 2)]:
        found.append(
            dict(design="swap", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, warps=8, stages=4, split=split)
        )
    return found


def launcher(config: dict, x: torch.Tensor, n: int, k: int):
    """fn(weight, out) launching `config` on x; None when the tile does not fit the shape."""
    m = x.shape[0]
    meta = {key: config[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
    options = dict(num_warps=config["warps"], num_stages=config["stages"])
    if n % config["BLOCK_N"]:
        return None
    if config["design"] == "fma":
        return lambda w, out: fma_kernel[(n // config["BLOCK_N"],)](x, w, out, m, n, k, **meta, **options)
    if config["design"] == "dot":
        return lambda w, out: dot_kernel[(n // config["BLOCK_N"],)](x, w, out, m, n, k, **meta, **options)
    split = config["split"]
    k_per_split = -(-k // (split * config["BLOCK_K"])) * config["BLOCK_K"]
    grid = (n // config["BLOCK_N"], split)
    return lambda w, out: swap_kernel[grid](
        x, w, out, m, n, k, k_per_split, **meta, ATOMIC=split > 1, **options
    )  # fmt: skip


def graph_time_us(launch, weights: list[torch.Tensor], outs: list[torch.Tensor], launches: int) -> float:
    """Microseconds a launch inside a CUDA graph of `launches` back-to-back launches over rotating weights."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(2):  # compile, then warm
            launch(weights[i % len(weights)], outs[i % len(outs)])
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(launches):
            launch(weights[i % len(weights)], outs[i % len(outs)])
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / launches)
    del graph
    return best


def one_row(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    from vicunaflow import kernels

    return kernels.matvec(x, weight, out=out)


def cublas(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.mm(x, weight.t(), out=out)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--launches", type=int, default=24)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "matmul_rows_sweep.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "host": platform.node(), "products": {}}  # fmt: skip
    for name in args.shapes:
        n, k = SHAPES[name]
        copies = max(2, -(-256 * 2**20 // (n * k * 2)))  # > 5x the L2 between two reads of one copy
        weights = [torch.randn(n, k, device="cuda", dtype=torch.float16) / k**0.5 for _ in range(copies)]
        gigabytes = n * k * 2 / 1e9
        x1 = torch.randn(1, k, device="cuda", dtype=torch.float16)
        outs1 = [torch.empty(1, n, device="cuda", dtype=torch.float16) for _ in range(2)]
        matvec_us = graph_time_us(functools.partial(one_row, x1), weights, outs1, args.launches)
        product = {"n": n, "k": k, "weight_gb": gigabytes, "matvec_1_row_us": matvec_us, "rows": {}}
        print(
            f"{name} [{n} x {k}]: matvec one row {matvec_us:.1f} us ({gigabytes / matvec_us * 1e3:.2f} TB/s)",
            flush=True,
        )
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            outs = [torch.empty(m, n, device="cuda", dtype=torch.float16) for _ in range(2)]
            atomic_outs = [torch.zeros(m, n, device="cuda", dtype=torch.float32) for _ in range(2)]
            expected = x.float() @ weights[0].float().T
            cublas_us = graph_time_us(functools.partial(cublas, x), weights, outs, args.launches)
            rows = []
            for config in candidates(m):
                launch = launcher(config, x, n, k)
                if launch is None:
                    continue
                atomic = config.get("split", 1) > 1
                targets = atomic_outs if atomic else outs
                try:
                    targets[0].zero_()
                    launch(weights[0], targets[0])
                    error = float((targets[0].float() - expected).abs().max() / expected.abs().max())
                    us = graph_time_us(launch, weights, targets, args.launches)
                except Exception as failure:  # a tile that does not compile (registers, shared memory)
                    rows.append(config | {"error": str(failure).splitlines()[0][:200]})
                    continue
                rows.append(config | {"us": us, "tb_per_s": gigabytes / us * 1e3, "max_rel_error": error})
            timed = sorted((r for r in rows if "us" in r and r["max_rel_error"] < 1e-2), key=lambda r: r["us"])
            best_by_design = {}
            for row in timed:
                best_by_design.setdefault(row["design"], row)
            product["rows"][m] = {"cublas_us": cublas_us, "best": best_by_design, "all": rows}
            line = "  ".join(f"{d} {r['us']:.1f}" for d, r in best_by_design.items())
            print(f"  M={m:>2}: cuBLAS {cublas_us:.1f} us | best {line}"
                  f" | {timed[0]['design']} {timed[0]['BLOCK_N']}x{timed[0]['BLOCK_K']}"
                  f" w{timed[0]['warps']} s{timed[0]['stages']} split{timed[0].get('split', 1)}"
                  f" = {timed[0]['us'] / matvec_us:.2f}x matvec, {timed[0]['us'] / cublas_us:.2f}x cuBLAS", flush=True)  # fmt: skip
        report["products"][name] = product
        del weights
        torch.cuda.empty_cache()
    report["seconds"] = time.perf_counter() - started
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.output} in {report['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()

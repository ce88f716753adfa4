"""kernels.matmul_rows against cuBLAS on a 7B's weight shapes, M rows of a batched decode step (CUDA).

Each product as the engine runs it: q|k|v and gate|up with RMSNorm of the input, o with the residual,
down with SiLU·up and the residual. "cublas" is the path it replaces (F.rms_norm / F.silu * up, then
F.linear or addmm); "matvec" the one-row kernel for scale. Times are CUDA-graph replays of back-to-back
calls over rotating weight copies, none still in L2 (sweep_matmul_rows.graph_time_us); checks the
kernel's output against cuBLAS's first. --rows-swiglu times matmul_rows' two ways of computing SiLU·up.

    python bench/bench_matmul_rows.py --rows 2 8 16 32 64 --rows-swiglu separate fused
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from sweep_matmul_rows import graph_time_us

from vicunaflow import kernels

SHAPES = {  # name: (N, K, epilogue) of LLaMA-7B
    "qkv": (3 * 4096, 4096, "norm"),
    "o": (4096, 4096, "residual"),
    "gate_up": (2 * 11008, 4096, "norm"),
    "down": (4096, 11008, "swiglu"),
}


def cublas(weight, out, *, x, residual, swiglu, norm):
    if norm is not None:
        x = F.rms_norm(x, (x.shape[1],), norm, 1e-6)
    if swiglu:
        half = x.shape[1] // 2
        x = F.silu(x[:, :half]) * x[:, half:]
    return torch.mm(x, weight.t(), out=out) if residual is None else torch.addmm(residual, x, weight.t(), out=out)


def ours_product(kernel, weight, out, *, x, residual, swiglu, norm):
    return kernel(x, weight, residual, swiglu, out=out, norm=norm)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[2, 8, 16, 32, 64])
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--output", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    results = []
    print(f"{'shape':>8} {'M':>3} {'ours us':>8} {'cublas us':>10} {'ratio':>6} {'TB/s':>6} {'max err':>8}")
    for name, (n, k, epilogue) in SHAPES.items():
        copies = max(2, -(-256 * 2**20 // (n * k * 2)))
        weights = [torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5 for _ in range(copies)]
        norm = torch.rand(k, device="cuda", dtype=dtype) + 0.5 if epilogue == "norm" else None
        swiglu = epilogue == "swiglu"
        for m in args.rows:
            x = torch.randn(m, 2 * k if swiglu else k, device="cuda", dtype=dtype)
            residual = torch.randn(m, n, device="cuda", dtype=dtype) if epilogue != "norm" else None
            outs = [torch.empty(m, n, device="cuda", dtype=dtype) for _ in range(2)]
            inputs = {"x": x, "residual": residual, "swiglu": swiglu, "norm": norm}
            expected = cublas(weights[0], None, **inputs).float()
            theirs_us = graph_time_us(functools.partial(cublas, **inputs), weights, outs, 24)
            kernel = kernels.matvec if m == 1 else kernels.matmul_rows
            ours = functools.partial(ours_product, kernel, **inputs)
            error = float((ours(weights[0], outs[0]).float() - expected).abs().max() / expected.abs().max())
            ours_us = graph_time_us(ours, weights, outs, 24)
            row = {"shape": name, "n": n, "k": k, "rows": m, "ours_us": ours_us, "cublas_us": theirs_us,
                   "tb_per_s": n * k * 2 / ours_us / 1e6, "max_rel_error": error}  # fmt: skip
            results.append(row)
            print(
                f"{name:>8} {m:>3} {ours_us:>8.1f} {theirs_us:>10.1f} {ours_us / theirs_us:>6.2f}"
                f" {row['tb_per_s']:>6.2f} {error:>8.1e}",
                flush=True,
            )
        del weights
    if args.output:
        args.output.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": results}, indent=1))


if __name__ == "__main__":
    main()

"""kernels.matmul_rows against cuBLAS on a 7B's weight shapes, M rows of a batched decode step (CUDA).

Each product as the engine runs it: q|k|v and gate|up with RMSNorm of the input, o with the residual,
down with SiLU·up and the residual. "cublas" is the path it replaces (F.rms_norm / F.silu * up, then
F.linear or addmm); "matvec" the one-row kernel for scale. Times are CUDA-graph replays (triton's
do_bench_cudagraph); checks the kernel's output against cuBLAS's first.

    python bench/bench_matmul_rows.py --rows 2 8 16 32 64 --dtype float16
"""

from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F

from vicunaflow import kernels

SHAPES = {  # name: (N, K, epilogue) of LLaMA-7B
    "qkv": (3 * 4096, 4096, "norm"),
    "o": (4096, 4096, "residual"),
    "gate_up": (2 * 11008, 4096, "norm"),
    "down": (4096, 11008, "swiglu"),
}


def cublas(x, weight, residual, swiglu, norm):
    if norm is not None:
        x = F.rms_norm(x, (x.shape[1],), norm, 1e-6)
    if swiglu:
        half = x.shape[1] // 2
        x = F.silu(x[:, :half]) * x[:, half:]
    return F.linear(x, weight) if residual is None else torch.addmm(residual, x, weight.t())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[2, 8, 16, 32, 64])
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    args = parser.parse_args()
    from triton.testing import do_bench_cudagraph

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(f"{'shape':>8} {'M':>3} {'triton us':>10} {'cublas us':>10} {'ratio':>6} {'TB/s':>6} {'max err':>8}")
    for name, (n, k, epilogue) in SHAPES.items():
        weight = torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5
        norm = torch.rand(k, device="cuda", dtype=dtype) + 0.5 if epilogue == "norm" else None
        swiglu = epilogue == "swiglu"
        for m in args.rows:
            x = torch.randn(m, 2 * k if swiglu else k, device="cuda", dtype=dtype)
            residual = torch.randn(m, n, device="cuda", dtype=dtype) if epilogue != "norm" else None
            kernel = kernels.matvec if m == 1 else kernels.matmul_rows
            ours = functools.partial(kernel, x, weight, residual, swiglu, norm=norm)
            theirs = functools.partial(cublas, x, weight, residual, swiglu, norm)
            expected = theirs().float()
            error = float((ours().float() - expected).abs().max() / expected.abs().max())
            t_ours, t_theirs = do_bench_cudagraph(ours) * 1e3, do_bench_cudagraph(theirs) * 1e3
            print(
                f"{name:>8} {m:>3} {t_ours:>10.1f} {t_theirs:>10.1f} {t_ours / t_theirs:>6.2f}"
                f" {weight.numel() * weight.element_size() / t_ours / 1e6:>6.2f} {error:>8.1e}",
                flush=True,
            )


if __name__ == "__main__":
    main()

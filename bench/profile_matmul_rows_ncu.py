"""Launch three 64-row products of a 7B step through kernels.matmul_rows, for Nsight Compute to read one launch each.

Why: inside a step the products stream at ~3.3-3.7 TB/s where the H200 copies at ~4.3; the hardware counters say
whether the bytes, the SMs' time or their start and end are what is missing. Each shape is launched three times
with the engine's 64-row tile fixed through VICUNAFLOW_ROWS_TILES (no autotuning launches in between), so the third
launch of shape i is float_matmul_kernel launch 3 i + 2:

    export VICUNAFLOW_PDL=0 VICUNAFLOW_ROWS_TILES="64:4096x4096=64,128,4,5,2;64:4096x11008=64,128,4,5,2;64:12288x4096=64,128,4,5,1"
    ncu --clock-control none -k regex:float_matmul --launch-skip 5 --launch-count 1 --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
        python bench/profile_matmul_rows_ncu.py     # the down product; --launch-skip 2: o, 8: the 12288-wide one

Thirtieth session (bench/results/ncu_matmul_rows_64_*_h200_session30.txt): o 14.8 µs at 2.43 TB/s, down 28.7 at 3.30,
the 12288-wide product 34.5 at 3.07; the SMs active 72%, 80% and 68% of each launch's cycles, one program an SM
(shared memory), no spills.
"""

from __future__ import annotations

import torch

from vicunaflow import kernels

SHAPES = ((4096, 4096), (4096, 11008), (12288, 4096))  # (N, K): o, down, a q|k|v-wide product; residual added
ROWS, LAUNCHES = 64, 3


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("profile_matmul_rows_ncu needs a GPU")
    torch.manual_seed(0)
    for n, k in SHAPES:
        x = torch.randn(ROWS, k, device="cuda", dtype=torch.float16)
        weight = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        residual = torch.randn(ROWS, n, device="cuda", dtype=torch.float16)
        for _ in range(LAUNCHES):
            kernels.matmul_rows(x, weight, residual)
        torch.cuda.synchronize()
        print(f"{ROWS} x {k} times {n} x {k}: {LAUNCHES} launches", flush=True)


if __name__ == "__main__":
    main()

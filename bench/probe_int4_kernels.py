"""Time one-row int4 products on a GPU: our qmatvec, the columns kernel, the float16 matvec, and torch's
tinygemm kernel.

Why: `--load-4bit` decodes slower than float16 (issue 14) because quant_kernels' int4 matvec is bound by
its instructions, not its bytes. torch ships a tensor-core int4 kernel (`torch._weight_int4pack_mm`,
tinygemm, the one gpt-fast uses); it takes bfloat16 activations and its own packing. This probe sets
the three side by side on the 7B shapes (L2 flushed between runs by triton.testing.do_bench) and checks
tinygemm against our dequantized weights, so a decision to adopt it rests on numbers:

    PYTHONPATH=src python bench/probe_int4_kernels.py results/int4_kernels_probe_h200.json

The columns kernel (quant.Int4Columns, quant_kernels.qmatvec_columns) is checked here, not timed: this
probe's timer goes through the Python launch path, which costs more than these kernels take, and
bench/sweep_int4_columns.py times its tiles where they run, in a CUDA graph. Timed: the columns layout's
prefill decode (quant.decode_columns) against the stored layout's dequantize, and 8-row products
(qmatmul on both layouts, tinygemm).

tinygemm's convention is w = (q - 8) * scale + zero with bfloat16 scales and zeros [K / G, N, 2] and two
codes a byte (even column in the high nibble); ours is w = q * scale + zero (float16), even column low,
so the probe repacks: zero' = zero + 8 * scale.
"""

from __future__ import annotations

import json
import sys

import torch
import triton

from vicunaflow import kernels, quant, quant_kernels

SHAPES = [
    (12288, 4096),
    (4096, 4096),
    (22016, 4096),
    (4096, 11008),
    (32000, 4096),
]  # 7B q|k|v, o, gate|up, down, lm_head


def tinygemm_weights(qw: quant.QuantWeight, inner_k_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Our int4 weight in tinygemm's layout: (packed weight, bfloat16 scales and zeros [K / G, N, 2])."""
    codes = quant.unpack_int4(qw.qweight, qw.shape[1]).to(torch.int32)  # [N, K]
    packed = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)  # [N, K / 2], even column high
    scales, zeros = qw.scales.float().T, (qw.zeros.float() + 8 * qw.scales.float()).T  # [K / G, N]
    scales_and_zeros = torch.stack([scales, zeros], dim=2).to(torch.bfloat16).contiguous()
    return torch._convert_weight_to_int4pack(packed, inner_k_tiles), scales_and_zeros


def time_us(fn, *args, warmup: int = 50, rep: int = 200) -> float:
    """fn(*args) on the GPU, µs (median of do_bench, the L2 flushed before each run)."""
    return 1000 * triton.testing.do_bench(lambda: fn(*args), warmup=warmup, rep=rep)


def columns_rows(qw: quant.QuantWeight, x: torch.Tensor, reference: torch.Tensor, scale: float) -> dict:
    """The columns kernel on one shape: its error, the prefill decode, 8 rows."""
    cw = quant.int4columns(qw)
    row = {"columns_error": float((quant_kernels.qmatvec_columns(x, cw).float() - reference).abs().max()) / scale}
    row["decode_columns_us"] = time_us(quant.decode_columns, cw, torch.float16)
    row["dequantize_stored_us"] = time_us(qw.dequantize, torch.float16)
    x8 = torch.randn(8, x.shape[1], device="cuda").half()
    row["qmatmul8_columns_us"] = time_us(quant_kernels.qmatmul, x8, cw)
    row["qmatmul8_stored_us"] = time_us(quant_kernels.qmatmul, x8, qw)
    return row


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("probe_int4_kernels needs a GPU")
    torch.manual_seed(0)
    results = {}
    for n, k in SHAPES:
        w = (torch.randn(n, k, device="cuda") * 0.02).half()
        qw = quant.quantize(w, 4, 128)
        x = torch.randn(1, k, device="cuda").half()
        reference = x.float() @ qw.dequantize(torch.float32).T  # [1, N]
        scale = float(reference.abs().max())
        row = {"int4_gb": (n * k / 2 + 4 * n * k / 128) / 1e9}
        row["ours_error"] = float((quant_kernels.qmatvec(x, qw).float() - reference).abs().max()) / scale
        row["ours_us"] = time_us(quant_kernels.qmatvec, x, qw)
        row["float16_us"] = time_us(kernels.matvec, x, w)
        row |= columns_rows(qw, x, reference, scale)
        try:
            for tiles in (8, 4, 2):
                packed, scales_and_zeros = tinygemm_weights(qw, tiles)
                xb = x.to(torch.bfloat16)
                y = torch._weight_int4pack_mm(xb, packed, 128, scales_and_zeros)
                row[f"tinygemm{tiles}_error"] = float((y.float() - reference).abs().max()) / scale
                row[f"tinygemm{tiles}_us"] = time_us(torch._weight_int4pack_mm, xb, packed, 128, scales_and_zeros)
                for m in (8, 16):
                    xm = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    row[f"tinygemm{tiles}_m{m}_us"] = time_us(
                        torch._weight_int4pack_mm, xm, packed, 128, scales_and_zeros, warmup=20, rep=100
                    )
        except Exception as err:  # an older torch, or a GPU tinygemm does not build for
            row["tinygemm_error_message"] = repr(err)[:300]
        results[f"{n}x{k}"] = row
        print(n, k, {key: round(value, 4) if isinstance(value, float) else value for key, value in row.items()})
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

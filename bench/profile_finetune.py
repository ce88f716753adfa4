"""Where one optimizer step of `vicunaflow finetune` spends its GPU time (one process, torch.profiler).

Runs the real command in this process for a few steps and profiles the last one: GPU kernel time
by kind (matrix products, attention, NCCL, element-wise and the rest), the top kernels, and the
step's wall time. Used to find what keeps MFU below the matrix units' rate.

    python bench/profile_finetune.py --model MODEL_DIR --data DATA.json --output-dir /tmp/prof [--compile]
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

KINDS = (
    ("attention", re.compile(r"flash|fmha|attention|sdpa", re.I)),  # before matmul: cuDNN's also say wgmma
    ("matmul", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|wgmma", re.I)),
    ("nccl", re.compile(r"nccl", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach", re.I)),
    ("cross_entropy", re.compile(r"softmax|nll|cross_entropy", re.I)),
    ("triton (compiled)", re.compile(r"^triton_", re.I)),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3, help="steps to run; the last one is profiled")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--accumulation", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--report", type=Path, help="write the summary as JSON here")
    args = parser.parse_args()

    import torch

    from vicunaflow import finetune
    from vicunaflow.finetune import loop
    from vicunaflow.finetune.config import TrainConfig

    original = loop.train_step
    calls = {"n": 0}
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def profiled_step(*step_args, **step_kwargs):
        calls["n"] += 1
        if calls["n"] != args.steps:
            return original(*step_args, **step_kwargs)
        synchronize()
        started = time.perf_counter()
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as profile:
            result = original(*step_args, **step_kwargs)
            synchronize()
        summarise(profile, time.perf_counter() - started, args)
        return result

    loop.train_step = profiled_step  # fit() looks it up at each step
    config = TrainConfig(
        model_path=args.model, data=args.data, output_dir=args.output_dir, max_steps=args.steps,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.accumulation,
        model_max_length=args.seq_len, save_strategy="no", report_to="none", lazy_preprocess=False,
        compile=args.compile,
    )  # fmt: skip
    finetune.setup(config=config, nproc_per_node=1)


def summarise(profile, wall_s: float, args) -> None:
    """Kernel time by kind and the top kernels of the profiled forward and backward passes."""
    from torch.autograd import DeviceType

    kernels = {}
    for event in profile.key_averages():
        if event.device_type != DeviceType.CUDA:
            continue
        microseconds = getattr(event, "self_device_time_total", None) or event.self_cuda_time_total
        kernels[event.key] = kernels.get(event.key, 0.0) + microseconds
    total = sum(kernels.values())
    by_kind: dict[str, float] = {}
    for name, microseconds in kernels.items():
        kind = next((k for k, pattern in KINDS if pattern.search(name)), "element-wise and other")
        by_kind[kind] = by_kind.get(kind, 0.0) + microseconds
    print(
        f"profiled step: wall {wall_s:.3f}s, GPU kernel time {total / 1e6:.3f}s ({100 * total / 1e6 / wall_s:.0f}% busy)"
    )
    for kind, microseconds in sorted(by_kind.items(), key=lambda item: -item[1]):
        print(f"  {kind:<24} {microseconds / 1e6:8.3f}s  {100 * microseconds / total:5.1f}%")
    top = sorted(kernels.items(), key=lambda item: -item[1])[:25]
    print("top kernels:")
    for name, microseconds in top:
        print(f"  {microseconds / 1e6:8.3f}s  {name[:110]}")
    if args.report:
        report = {
            "compile": args.compile,
            "wall_s": wall_s,
            "kernel_s": total / 1e6,
            "by_kind_s": {k: v / 1e6 for k, v in by_kind.items()},
            "top_kernels_s": {k: v / 1e6 for k, v in top},
        }
        args.report.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

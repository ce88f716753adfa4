"""Inference throughput: vicunaflow's batching engine vs transformers' generate vs FastChat's generate_stream.

All sides run a randomly initialised LLaMA of the same shape (float16, seed 0), greedy, with a fixed
prompt length and a fixed reply length (EOS ignored, so every request makes the same number of tokens).
Ours is vicunaflow.engine's own model (`load_model(RandomWeights(...))`, the path chat and serve take);
transformers and FastChat get a LlamaForCausalLM (SDPA). `--num-gpus 1 2` measures each count in turn:
ours with tensor parallelism (`--all-reduce symm-mem nccl`: each all-reduce in turn), transformers
with its layers spread over the GPUs as `device_map` does (accelerate's dispatch_model):

    single stream   one request: time to the first token, decode tokens/s after it, end-to-end tokens/s
                    and the wall time of the whole reply (reply_s)
    aggregate       C requests at once (C = 1, 8, 32): C x new tokens / wall time
                    ours: C concurrent requests submitted to the engine (continuous batching)
                    transformers: one model.generate() over a batch of C equal-length prompts
                    fastchat 0.2.36: generate_stream serves one request at a time (its model worker
                    runs a batch of one), so its aggregate equals its single-stream rate
    step profile    ours: the decode step alone (graph replay, then sync) against the engine's time per
                    token; the difference is the engine's host-side work per step (sampling sync,
                    detokenising, streaming); weight bytes / step time = the bandwidth reached;
                    `--profile-rows 32 --profile-positions serving` times the steps bench_serve.py serves
    --ablations     ours again, one request at a time, with each speed-up of the decode step switched off
                    (Triton matvec kernels, overlapped steps, both), and the bandwidth of the matvec
                    kernel vs cuBLAS on each 7B/13B weight shape
    --quant 8 4     ours again with weight-only int8 / int4 (group 128) layer weights, quantized at load
                    (`load_model(load_8bit=True / load_4bit=True)`, the path of `chat --load-8bit / --load-4bit`;
                    Triton qmatvec for one-row steps): the same rows as float16, next to them, plus weight GiB
                    (`--load-8bit` = `--quant 8`). With fastchat in --only, `--quant 8` also times FastChat's own
                    `--load-8bit` (fastchat.model.compression: int8 groups of 256, decompressed before every
                    product), loaded from the random model written to --scratch
    --float-rows triton cublas
                    ours, float16: batched decode steps (2..32 rows) through kernels.matmul_rows (RMSNorm
                    and the residual folded in; the default) and/or cuBLAS with separate kernels, each in
                    turn (VICUNAFLOW_FLOAT_ROWS; rows tagged "float_rows")
    --int4-kernel columns tinygemm triton
                    ours, --quant 4: int4 products through quant_kernels' columns kernels (quant.Int4Columns),
                    torch's tinygemm kernel (quant.Int4Packed; the model then computes in bfloat16) and/or
                    quant_kernels on the stored layout, in turn
    --quant-input fused separate
                    ours, --quant: quant_kernels' one-row RMSNorm / SiLU·up computed in every program (fused) and/or
                    once by kernels.rows_input before the product (separate), in turn (VICUNAFLOW_QUANT_INPUT)
    --pdl on off    ours: the Triton decode kernels with programmatic dependent launch on / off, in turn
    --rope product separate attention
                    ours: a decode step's rotary and new key's store in the q|k|v product's epilogue (batched
                    steps), in rope_store's kernel, or inside the attention kernel, in turn (attention_kernels.ROPE)
    --attention fused split
                    ours: a decode step's attention with the splits combined inside the attention kernel
                    (two kernels a layer with the rotary + K/V store) and/or by a combine kernel of its own
                    (three), in turn (attention_kernels.ATTENTION)
    --bnb 8 4       the reference: transformers' generate with bitsandbytes LLM.int8() / NF4 weights (CUDA;
                    the random model is written once to --scratch and loaded with a BitsAndBytesConfig)

FastChat 0.2.36 needs transformers 4.x: `--fastchat-pythonpath DIR` runs the FastChat side in a child
process with DIR (holding fschat 0.2.36, transformers 4.57.1 and its tokenizers/huggingface_hub, and
accelerate for its --load-8bit) first on PYTHONPATH; without it, FastChat is imported from the current
environment:

    pip install --no-deps --target /tmp/ref fschat==0.2.36 transformers==4.57.1 tokenizers==0.22.2 \
        huggingface_hub==0.36.2 accelerate==1.10.1

    python bench/bench_chat.py --fastchat-pythonpath /tmp/ref --load-8bit       # 7B, C = 1 8 32
    python bench/bench_chat.py --only ours transformers --quant 8 4 --bnb 8 4     # float16 | int8 | int4 | bnb
    python bench/bench_chat.py --size 13b --concurrency 1 --num-gpus 1 2 --append # 13B, 1 and 2 GPUs
    python bench/bench_chat.py --tiny                                             # CPU smoke test of the script
    python bench/bench_chat.py --tiny --num-gpus 1 2                              # the same with 2 gloo ranks

The tokenizer is synthetic (32000 pieces, LLaMA's decoder pipeline: "▁" -> space, byte fallback) so
detokenising costs what it does with LLaMA's, and decoded prompts encode back to the same ids (FastChat
takes text). Results go to bench/results/chat.json (or --output; --append adds a run to the file).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, few tokens")
    parser.add_argument("--size", default="7b", help="model shape from vicunaflow.sizes (7b, 13b, ...)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-gpus", type=int, nargs="+", default=[1], help="measure with each GPU count in turn")
    parser.add_argument(
        "--all-reduce", nargs="+", choices=["symm-mem", "nccl"], default=["symm-mem", "nccl"],
        help="ours on several GPUs: each all-reduce in turn",
    )  # fmt: skip
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument(
        "--reference-new-tokens", type=int, help="transformers: tokens per reply (default: --new-tokens)"
    )
    parser.add_argument("--context", type=int, default=2048, help="KV cache length per request")
    parser.add_argument("--repeats", type=int, default=2, help="ours: timed runs per measurement (best is kept)")
    parser.add_argument("--reference-repeats", type=int, default=1, help="timed runs of transformers and FastChat")
    parser.add_argument(
        "--only", nargs="+", choices=["ours", "transformers", "fastchat"], default=["ours", "transformers", "fastchat"]
    )
    parser.add_argument("--no-cuda-graphs", action="store_true", help="ours: plain eager decode steps")
    parser.add_argument("--no-decode-kernels", action="store_true", help="ours: cuBLAS, not Triton, for one-row steps")
    parser.add_argument("--no-overlap", action="store_true", help="ours: wait for each step before queueing the next")
    parser.add_argument("--ablations", action="store_true", help="ours: also single-stream with each speed-up off")
    parser.add_argument("--fastchat-pythonpath", help="run FastChat in a child process with this first on PYTHONPATH")
    parser.add_argument("--load-8bit", action="store_true", help="the same as --quant 8")
    parser.add_argument(
        "--quant", type=int, nargs="+", choices=[8, 4], default=[],
        help="ours: also with int8 / int4 layer weights quantized at load (rows next to float16's)",
    )  # fmt: skip
    parser.add_argument(
        "--bnb", type=int, nargs="+", choices=[8, 4], default=[],
        help="transformers: also with bitsandbytes LLM.int8() / NF4 weights (CUDA; the reference rows)",
    )  # fmt: skip
    parser.add_argument("--scratch", type=Path, help="--bnb: where the random model is written (default: a temp dir)")
    parser.add_argument("--quant-only", action="store_true", help="ours: only the --quant rows, no float16 row")
    parser.add_argument(
        "--quant-one-row", nargs="+", choices=["matvec", "matmul"], default=["matvec"],
        help="ours, --quant: one-row steps through qmatvec and/or qmatmul (tensor cores), each in turn",
    )  # fmt: skip
    parser.add_argument(
        "--quant-input", nargs="+", choices=["fused", "separate"], default=["separate"],
        help="ours, --quant: qmatvec's RMSNorm / SiLU·up input in every program, or once before it, in turn",
    )  # fmt: skip
    parser.add_argument(
        "--int4-kernel", nargs="+", choices=["columns", "tinygemm", "triton"], default=["tinygemm"],
        help="ours, --quant 4: Int4Columns, torch's tinygemm (the model in bfloat16) and/or quant_kernels, in turn",
    )  # fmt: skip
    parser.add_argument(
        "--pdl", nargs="+", choices=["on", "off"], default=["on"],
        help="ours: Triton decode kernels with programmatic dependent launch on / off, each in turn (VICUNAFLOW_PDL)",
    )  # fmt: skip
    parser.add_argument(
        "--rope", nargs="+", choices=["product", "separate", "attention"], default=["product"],
        help="ours: decode steps' rotary and new-key store in q|k|v's epilogue (batched steps), a kernel of their own "
        "or the attention kernel (VICUNAFLOW_ROPE), in turn",
    )  # fmt: skip
    parser.add_argument(
        "--attention", nargs="+", choices=["fused", "split"], default=["fused"],
        help="ours: decode attention's splits combined in its kernel, or by a kernel of their own (VICUNAFLOW_ATTENTION)",
    )  # fmt: skip
    parser.add_argument(
        "--float-rows", nargs="+", choices=["triton", "cublas"], default=["triton"],
        help="ours, float16: batched decode steps through kernels.matmul_rows and/or cuBLAS, each in turn",
    )  # fmt: skip
    parser.add_argument(
        "--memory-cap-gib", type=float,
        help="cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction), e.g. 24 for a 24 GiB card",
    )  # fmt: skip
    parser.add_argument(
        "--profile-rows", type=int, nargs="+", default=[1],
        help="ours: step profiles (graph replay, kernel time) of decode steps with these many rows",
    )  # fmt: skip
    parser.add_argument(
        "--profile-positions", choices=["300", "serving"], default="300",
        help="ours: where the profiled steps' rows are: all at position 300, or spread over 128-383 as in "
        "bench_serve.py's 128-token prompts and 256-token replies (the served steps' gaps, beside it)",
    )  # fmt: skip
    parser.add_argument(
        "--profile-prefill", type=int, nargs="+", metavar="PROMPTS", default=[],
        help="ours: time and profile one prefill forward of this many --prompt-tokens prompts, as a burst of users "
        "gets (Runner.prefill_chunks), each count in turn",
    )  # fmt: skip
    parser.add_argument(
        "--profile-attention-tiles", nargs="+", metavar="SPLIT,TILE,WARPS,STAGES", default=[],
        help="ours: profile each many-row step again with these tiles in place of its attention_kernels class "
        "(MANY_ROWS_TILES, or MIDDLE_ROWS_TILES at 33-64 rows; tensor cores), "
        "and time the attention alone over the engine's own cache: tiles timed where a step runs them",
    )  # fmt: skip
    parser.add_argument(
        "--attention-split-tokens", type=int,
        help="ours: positions per program of the paged decode-attention kernel, any rows (attention_kernels.Tiles)",
    )  # fmt: skip
    parser.add_argument("--output", type=Path, default=HERE / "results" / "chat.json")
    parser.add_argument("--append", action="store_true", help="add this run to the runs already in --output")
    args = parser.parse_args()
    if args.load_8bit and 8 not in args.quant:
        args.quant = [8, *args.quant]
    if args.tiny:
        args.size, args.device, args.concurrency = "tiny", "cpu", [1, 4]
        args.prompt_tokens, args.new_tokens, args.context, args.repeats = 32, 32, 256, 1
    if max(args.profile_rows) > max(args.concurrency):  # the engine holds max(--concurrency) rows
        parser.error(f"--profile-rows {max(args.profile_rows)} needs --concurrency of at least that many rows")
    # these machines forbid NVLink multicast; spawned ranks inherit the environment
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

    if args.attention_split_tokens:
        from vicunaflow import attention_kernels

        for name in attention_kernels.TILE_CLASSES:
            tiles = dataclasses.replace(getattr(attention_kernels, name), split_tokens=args.attention_split_tokens)
            setattr(attention_kernels, name, tiles)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    if args.memory_cap_gib and args.device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total))
    info = {
        "size": args.size,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "gpus_visible": torch.cuda.device_count(),
        "dtype": str(dtype).removeprefix("torch."),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "cuda_graphs": args.device == "cuda" and not args.no_cuda_graphs,
        "decode_kernels": args.device == "cuda" and not args.no_decode_kernels,
        "overlap": args.device == "cuda" and not args.no_overlap,
        "memory_cap_gib": args.memory_cap_gib,
        "attention_split_tokens": args.attention_split_tokens,
        "command": " ".join(["python", "bench/bench_chat.py", *sys.argv[1:]]),
    }
    print(json.dumps(info), flush=True)
    results = []
    if "fastchat" in args.only and args.fastchat_pythonpath:  # first, while this process holds no GPU memory
        results += run_fastchat_child(args)
    model_args = make_args(args.size, args.context)
    tokenizer = make_tokenizer(model_args.vocab_size)
    prompts = make_prompts(tokenizer, max(args.concurrency), args.prompt_tokens)
    if "ours" in args.only:
        from vicunaflow import attention_kernels, kernels, quant_kernels

        for num_gpus in args.num_gpus:
            for all_reduce in args.all_reduce if num_gpus > 1 and args.device == "cuda" else ["none"]:
                # float16 first (unless --quant-only), then each quantized format with the same rows
                # one_row: qmatvec / qmatmul, or "tinygemm" / "columns" for int4 in quant.Int4Packed / Int4Columns
                runs = [(None, "matvec", rows) for rows in args.float_rows] if not args.quant_only else []
                runs += [
                    (bits, one_row, args.float_rows[0])
                    for bits in args.quant
                    for one_row in (args.quant_one_row if bits == 8 else quant_one_rows_int4(args))
                ]
                runs = [  # each --pdl, --attention and --rope, and each --quant-input for the runs through quant_kernels
                    (*run, pdl, attention, rope, quant_input)
                    for run in runs
                    for pdl in args.pdl
                    for attention in args.attention
                    for rope in args.rope
                    for quant_input in (args.quant_input if run[0] and run[1] not in OWN_LAYOUTS else ["separate"])
                ]
                for bits, one_row, float_rows, pdl, attention, rope, quant_input in runs:
                    attention_kernels.ATTENTION = os.environ["VICUNAFLOW_ATTENTION"] = attention
                    attention_kernels.ROPE = os.environ["VICUNAFLOW_ROPE"] = rope
                    kernels.PDL = pdl == "on"
                    os.environ["VICUNAFLOW_PDL"] = "1" if kernels.PDL else "0"
                    quant_kernels.ONE_ROW = os.environ["VICUNAFLOW_QUANT_ONE_ROW"] = (
                        "matvec" if one_row in OWN_LAYOUTS else one_row
                    )
                    kernels.FLOAT_ROWS = os.environ["VICUNAFLOW_FLOAT_ROWS"] = float_rows
                    quant_kernels.INPUT = os.environ["VICUNAFLOW_QUANT_INPUT"] = quant_input
                    tinygemm = one_row == "tinygemm"
                    model_dtype = torch.bfloat16 if tinygemm else dtype  # tinygemm multiplies bfloat16 only
                    model = make_model(
                        model_args, args.device, model_dtype, num_gpus, all_reduce, bits=bits,
                        int4_kernel=one_row if one_row in OWN_LAYOUTS else "triton",
                    )  # fmt: skip
                    try:
                        tags = {"num_gpus": num_gpus, "all_reduce": getattr(model.comm, "mode", "none")}
                        tags |= {
                            "weights": f"int{bits}" if bits else tags_dtype(dtype),
                            "dtype": tags_dtype(model.dtype),
                        }
                        tags |= {"quant_one_row": one_row} if bits else {"float_rows": float_rows}
                        tags |= {"pdl": pdl, "attention": attention, "rope": rope}
                        tags |= {"weight_gib": model.weight_bytes() / 2**30}
                        if args.device == "cuda":  # the earlier models' cached blocks would count as this one's
                            torch.cuda.empty_cache()
                            torch.cuda.reset_peak_memory_stats()
                        rows = bench_ours(model, tokenizer, prompts, args)
                        if args.device == "cuda":
                            tags |= {"peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
                        if args.ablations and num_gpus == 1 and bits is None:
                            rows += bench_ablations(model, tokenizer, prompts, args)
                        name = f"vicunaflow int{bits} {one_row}" if bits else None
                        if name and len(args.quant_input) > 1 and one_row != "tinygemm":
                            name += f" input:{quant_input}"
                        results += [row | tags | ({"engine": name} if name else {}) for row in rows]
                        if not bits and len(args.float_rows) > 1:  # side by side: say which in the table
                            for row in results[-len(rows) :]:
                                row["engine"] += f" rows:{float_rows}"
                        if len(args.pdl) > 1:
                            for row in results[-len(rows) :]:
                                row["engine"] += f" pdl:{pdl}"
                        if len(args.attention) > 1:
                            for row in results[-len(rows) :]:
                                row["engine"] += f" attention:{attention}"
                        if len(args.rope) > 1:
                            for row in results[-len(rows) :]:
                                row["engine"] += f" rope:{rope}"
                    finally:
                        model.close()
                    free(model)
    for num_gpus in args.num_gpus if "transformers" in args.only or "fastchat" in args.only else []:
        if num_gpus > 1 and args.device != "cuda":
            continue  # device_map spreads layers over GPUs only
        hf_model = make_hf_model(args.size, args.device, dtype, args.context, num_gpus)
        if "transformers" in args.only:
            results += [row | {"num_gpus": num_gpus} for row in bench_transformers(hf_model, prompts, args)]
        if "fastchat" in args.only and not args.fastchat_pythonpath and num_gpus == 1:
            results += bench_fastchat(hf_model, tokenizer, prompts, args)
            if 8 in args.quant:  # FastChat's --load-8bit: its compression module, on a folder of this model
                folder = scratch_folder(args, "fastchat", lambda model=hf_model: model, tokenizer)
                free(hf_model)
                hf_model, gib = load_fastchat_8bit(folder, args.device, dtype)
                rows = bench_fastchat(hf_model, tokenizer, prompts, args)
                results += [row | {"engine": row["engine"] + " --load-8bit", "weights": "fastchat-int8",
                                   "weight_gib": gib} for row in rows]  # fmt: skip
        free(hf_model)
    for bits in args.bnb if "transformers" in args.only else []:
        if args.device != "cuda":
            print(f"bitsandbytes int{bits}: CUDA only, skipped", flush=True)
            continue
        bnb_model = make_bnb_model(args, dtype, bits)
        name = "transformers.generate + bitsandbytes " + ("LLM.int8()" if bits == 8 else "NF4")
        gib = bnb_model.get_memory_footprint() / 2**30
        rows = bench_transformers(bnb_model, prompts, args)
        results += [row | {"engine": name, "num_gpus": 1, "weights": f"bnb{bits}", "weight_gib": gib} for row in rows]
        free(bnb_model)
    print_table(results)
    runs = []
    if args.append and args.output.exists():
        runs = json.loads(args.output.read_text())["runs"]
    runs.append({"info": info, "results": results})
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    print(f"wrote {args.output}", flush=True)


def make_args(size_name: str, context: int):
    """The engine's ModelArgs of a known size (LLaMA-1: as many KV heads as heads)."""
    from vicunaflow.engine import ModelArgs
    from vicunaflow.formats import ffn_hidden_dim
    from vicunaflow.sizes import get_size

    size = get_size(size_name)
    return ModelArgs(
        dim=size.dim,
        n_layers=size.n_layers,
        n_heads=size.n_heads,
        n_kv_heads=size.n_heads,
        ffn_dim=ffn_hidden_dim(size.dim, size.multiple_of),
        vocab_size=32000 if size_name != "tiny" else size.vocab_size,
        norm_eps=size.norm_eps,
        max_position_embeddings=max(context, 2048),
    )


def make_model(
    model_args, device: str, dtype: torch.dtype, num_gpus: int, all_reduce: str, bits: int | None = None,
    int4_kernel: str = "triton",
):  # fmt: skip
    """Our model with random weights (seed 0), as chat/serve load one: whole, or split over num_gpus ranks;
    bits 8 / 4: its layer weights quantized at load (`--load-8bit` / `--load-4bit`); int4_kernel: tinygemm
    (with dtype bfloat16: `--load-4bit`'s default on CUDA) or triton."""
    from vicunaflow.engine import RandomWeights, load_model

    start = time.perf_counter()
    model, _ = load_model(
        RandomWeights(model_args, seed=0),
        device=device,
        num_gpus=num_gpus,
        dtype=str(dtype).removeprefix("torch."),
        all_reduce="auto" if all_reduce == "none" else all_reduce,
        load_8bit=bits == 8,
        load_4bit=bits == 4,
        int4_kernel=int4_kernel,
    )
    print(
        f"ours: {num_gpus} rank(s), all-reduce {all_reduce}, weights {f'int{bits}' if bits else tags_dtype(dtype)}, "
        f"{model.weight_bytes() / 2**30:.2f} GiB a rank, built in {time.perf_counter() - start:.1f} s",
        flush=True,
    )
    return model


OWN_LAYOUTS = ("tinygemm", "columns")  # int4 runs with a weight layout (and load_model int4_kernel) of their own


def quant_one_rows_int4(args) -> list[str]:
    """The int4 runs: "tinygemm" (torch's kernel, CUDA), "columns" (quant.Int4Columns) and/or quant_kernels'
    one-row choices on the stored layout."""
    kernels = [k for k in args.int4_kernel if k != "tinygemm" or args.device == "cuda"] or ["triton"]
    return [one_row for k in kernels for one_row in ([k] if k in OWN_LAYOUTS else args.quant_one_row)]


def tags_dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def make_bnb_model(args, dtype: torch.dtype, bits: int):
    """transformers' LlamaForCausalLM of the same shape with bitsandbytes weights: the random float model is
    saved once (seed 0) and loaded back through a BitsAndBytesConfig, as `from_pretrained` users do."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    scratch = scratch_folder(args, "bnb", lambda: make_hf_model(args.size, "cpu", dtype, args.context))
    if bits == 8:
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(scratch, quantization_config=config, dtype=dtype, device_map={"": 0})
    print(f"bitsandbytes int{bits}: loaded in {time.perf_counter() - start:.1f} s", flush=True)
    return model.eval()


def scratch_folder(args, purpose: str, hf_model, tokenizer=None) -> Path:
    """The random model as a Hugging Face folder (--scratch, or a temporary one), written once, for the references
    that load from disk (bitsandbytes, FastChat's compression). hf_model() gives the model, called only to write it."""
    import gc

    scratch = args.scratch or Path(tempfile.mkdtemp(prefix=f"bench-{purpose}-"))
    if not (scratch / "config.json").exists():
        hf_model().save_pretrained(scratch)
        gc.collect()  # a model made for the folder alone goes now, before the reference loads its own
    if tokenizer is not None and not (scratch / "tokenizer.json").exists():
        tokenizer.save_pretrained(scratch)
    return scratch


def load_fastchat_8bit(folder: Path, device: str, dtype: torch.dtype):
    """FastChat 0.2.36's `--load-8bit` (fastchat.model.compression: int8 groups of 256, decompressed to `dtype`
    before every product), as its CLI loads it; returns the model and the GiB it holds on the GPU (None on CPU)."""
    from fastchat.model.compression import load_compress_model

    before = torch.cuda.memory_allocated() if device == "cuda" else 0
    start = time.perf_counter()
    model, _ = load_compress_model(str(folder), device, dtype, use_fast=True)
    gib = (torch.cuda.memory_allocated() - before) / 2**30 if device == "cuda" else None
    print(f"fastchat --load-8bit: loaded in {time.perf_counter() - start:.1f} s", flush=True)
    return model.eval(), gib


def make_hf_model(size_name: str, device: str, dtype: torch.dtype, context: int, num_gpus: int = 1):
    """A random LlamaForCausalLM of a known size (seed 0); on several GPUs its layers are spread over
    them as transformers' device_map="auto" does (accelerate.dispatch_model: hooks move activations)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model_args = make_args(size_name, context)
    config = LlamaConfig(
        vocab_size=model_args.vocab_size,
        hidden_size=model_args.dim,
        intermediate_size=model_args.ffn_dim,
        num_hidden_layers=model_args.n_layers,
        num_attention_heads=model_args.n_heads,
        num_key_value_heads=model_args.n_kv_heads,
        max_position_embeddings=model_args.max_position_embeddings,
        rms_norm_eps=model_args.norm_eps,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: a float32 7B would need twice the memory
    try:
        if num_gpus == 1:
            with torch.device(device):
                return LlamaForCausalLM(config).eval()
        from accelerate import dispatch_model
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        with torch.device("meta"):
            model = LlamaForCausalLM(config).eval()
        layers = config.num_hidden_layers
        device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0}
        device_map |= {f"model.layers.{i}": i * num_gpus // layers for i in range(layers)}
        device_map |= {"model.norm": num_gpus - 1, "lm_head": num_gpus - 1}
        with torch.no_grad():
            for name, gpu in device_map.items():
                module = model.get_submodule(name)
                module.to_empty(device=f"cuda:{gpu}")
                for parameter in module.parameters():
                    if parameter.dim() == 1:  # RMSNorm weights
                        parameter.fill_(1.0)
                    else:
                        parameter.normal_(0, 0.02)
        model.model.rotary_emb = LlamaRotaryEmbedding(config, device="cuda:0")
        return dispatch_model(model, device_map=device_map)
    finally:
        torch.set_default_dtype(default_dtype)


def free(model) -> None:
    import gc

    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_tokenizer(vocab_size: int):
    """A 32000-piece tokenizer with LLaMA's decoder ("▁" -> space, byte fallback) that round-trips text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab |= {f"<0x{b:02X}>": 3 + b for b in range(256)}
    vocab |= {f"▁w{i}": i for i in range(len(vocab), vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """Random word pieces after BOS; each decodes to text that encodes back to the same ids."""
    generator = torch.Generator().manual_seed(0)
    prompts = [
        [1, *torch.randint(300, len(tokenizer), (length - 1,), generator=generator).tolist()] for _ in range(count)
    ]
    assert tokenizer(tokenizer.decode(prompts[0][1:])).input_ids == prompts[0], "synthetic tokenizer round trip"
    return prompts


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def engine_options(args, **changes) -> dict:
    options = {
        "cuda_graphs": not args.no_cuda_graphs,
        "decode_kernels": False if args.no_decode_kernels else None,
        "overlap": False if args.no_overlap else None,
    }
    return options | changes


def bench_ours(model, tokenizer, prompts, args) -> list[dict]:
    from vicunaflow.engine import Engine, SamplingParams

    params = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens, ignore_eos=True)
    results = []
    engine = Engine(
        model, tokenizer, max_batch_size=max(args.concurrency), max_context=args.context, **engine_options(args)
    )
    with engine:
        list(engine.generate(prompts[0], SamplingParams(temperature=0.0, max_new_tokens=8)))  # warm-up
        single = single_stream(engine, prompts[0], params, args.repeats)
        results.append({"engine": "vicunaflow", "mode": "single-stream", "concurrency": 1, **single})
        print(results[-1], flush=True)
        for concurrency in args.concurrency:
            best_rate, tokens = 0.0, 0
            for _ in range(args.repeats + 1):  # the first run captures the CUDA graphs of its buckets
                counts = [0] * concurrency
                done = threading.Semaphore(0)

                def sink(event, i, counts=counts, done=done):
                    counts[i] = event.completion_tokens
                    if event.finish_reason is not None:
                        done.release()

                start = time.perf_counter()
                for i in range(concurrency):
                    engine.submit(prompts[i], params, lambda event, i=i, sink=sink: sink(event, i))
                for _ in range(concurrency):
                    done.acquire()
                elapsed = time.perf_counter() - start
                tokens = sum(counts)
                best_rate = max(best_rate, tokens / elapsed)
            stats = engine.snapshot_stats()
            results.append(
                {
                    "engine": "vicunaflow",
                    "mode": "aggregate",
                    "concurrency": concurrency,
                    "tokens": tokens,
                    "aggregate_tok_s": best_rate,
                    "max_batch": stats["max_batch"],
                    "cuda_graphs": stats["cuda_graphs"],
                    "decode_kernels": stats["decode_kernels"],
                    "overlap": stats["overlap"],
                }
            )
            print(results[-1], flush=True)
    for rows in args.profile_rows:
        profile = step_profile(engine, model, single, rows=rows, spread=args.profile_positions == "serving")
        results.append({"engine": "vicunaflow", "mode": "step-profile", "concurrency": rows, **profile})
        print(results[-1], flush=True)
        graphs = model.comm.world == 1 and engine.runner.cuda_graphs  # replays one rank's graph alone
        if args.profile_attention_tiles and rows >= attention_kernels_module().MANY_ROWS and graphs:
            tiles = attention_tiles_in_steps(engine, model, rows, args.profile_attention_tiles)
            results.append({"engine": "vicunaflow", "mode": "attention-tiles", "concurrency": rows, "tiles": tiles})
    for prompts in args.profile_prefill:
        profile = prefill_profile(engine, model, prompts, args.prompt_tokens)
        results.append({"engine": "vicunaflow", "mode": "prefill-profile", "prompts": prompts, **profile})
        print({k: v for k, v in results[-1].items() if k != "kernel_time"}, flush=True)
    del engine
    return results


def bench_ablations(model, tokenizer, prompts, args) -> list[dict]:
    """One request at a time with each decode speed-up switched off, then matvec vs cuBLAS per weight shape."""
    import gc

    from vicunaflow.engine import Engine, SamplingParams

    params = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens, ignore_eos=True)
    results = []
    variants = {
        "all on": {},
        "no Triton matvec": {"decode_kernels": False},
        "no overlap": {"overlap": False},
        "neither": {"decode_kernels": False, "overlap": False},
    }
    for label, changes in variants.items():
        gc.collect()  # the previous engine's KV cache and graphs
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        engine = Engine(model, tokenizer, max_batch_size=1, max_context=args.context, **engine_options(args, **changes))
        with engine:
            list(engine.generate(prompts[0], SamplingParams(temperature=0.0, max_new_tokens=8)))  # warm-up
            single = single_stream(engine, prompts[0], params, args.repeats)
            stats = engine.snapshot_stats()
        row = {"engine": f"vicunaflow, {label}", "mode": "ablation", "concurrency": 1, **single}
        row |= {key: stats[key] for key in ("cuda_graphs", "decode_kernels", "overlap")}
        row |= {"step_profile": step_profile(engine, model, single)}
        results.append(row)
        print(results[-1], flush=True)
        del engine
    if torch.device(args.device).type == "cuda":
        results.append(
            {"engine": "matvec vs cuBLAS", "mode": "kernel", "concurrency": 1, "shapes": matvec_profile(model)}
        )
        print(results[-1], flush=True)
    return results


def decode_products(dim: int, ffn: int, vocab: int) -> list[tuple[str, int, int, bool, bool]]:
    """The one-row products of a LLaMA decode step: (name, rows N, columns K, SiLU·up input, residual added)."""
    return [
        ("q|k|v", 3 * dim, dim, False, False),
        ("o_proj + residual", dim, dim, False, True),
        ("gate|up", 2 * ffn, dim, False, False),
        ("silu*up -> down_proj + residual", dim, ffn, True, True),
        ("lm_head", vocab, dim, False, False),
    ]


def product_inputs(n: int, k: int, swiglu: bool, has_residual: bool, dtype: torch.dtype):
    """Random GPU inputs of one product, and the torch ops that matvec replaces (SiLU·up, cuBLAS, residual add).

    Returns (x, weight, residual or None, cublas) with cublas() computing the product from them.
    """
    weight = torch.randn(n, k, device="cuda", dtype=dtype) * 0.02
    x = torch.randn(1, 2 * k if swiglu else k, device="cuda", dtype=dtype)
    residual = torch.randn(1, n, device="cuda", dtype=dtype) if has_residual else None

    def cublas():
        inputs = torch.nn.functional.silu(x[:, :k]) * x[:, k:] if swiglu else x
        if residual is None:
            return torch.nn.functional.linear(inputs, weight)
        return torch.addmm(residual, inputs, weight.t())

    return x, weight, residual, cublas


@torch.inference_mode()
def matvec_profile(model) -> list[dict]:
    """GB/s of weights read by one-row products: vicunaflow.kernels.matvec vs torch's linear (cuBLAS)."""
    import triton.testing

    from vicunaflow import kernels

    config, dtype = model.args, model.dtype
    rows = []
    for name, n, k, swiglu, has_residual in decode_products(config.dim, config.ffn_dim, config.vocab_size):
        x, weight, residual, cublas = product_inputs(n, k, swiglu, has_residual, dtype)

        def ours(x=x, weight=weight, residual=residual, swiglu=swiglu):
            return kernels.matvec(x, weight, residual, swiglu)

        error = (ours().float() - cublas().float()).abs().max().item()
        ours_ms = triton.testing.do_bench(ours, warmup=50, rep=300)
        cublas_ms = triton.testing.do_bench(cublas, warmup=50, rep=300)
        gigabytes = weight.numel() * weight.element_size() / 1e9
        rows.append(
            {
                "shape": f"{name} [{n} x {k}]",
                "matvec_us": 1000 * ours_ms,
                "cublas_us": 1000 * cublas_ms,
                "matvec_gb_s": gigabytes / ours_ms * 1000,
                "cublas_gb_s": gigabytes / cublas_ms * 1000,
                "max_abs_difference": error,
            }
        )
    return rows


def single_stream(engine, prompt: list[int], params, repeats: int) -> dict:
    """One request alone; the run with the best decode rate is kept."""
    best = None
    for _ in range(repeats):
        times = []
        start = time.perf_counter()
        for event in engine.generate(prompt, params):
            times.append(time.perf_counter())
            tokens = event.completion_tokens
        run = {
            "first_token_s": times[0] - start,
            "decode_tok_s": (tokens - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0,
            "e2e_tok_s": tokens / (times[-1] - start),
            "reply_s": times[-1] - start,
            "tokens": tokens,
        }
        best = run if best is None or run["decode_tok_s"] > best["decode_tok_s"] else best
    return best


def served_positions(engine, rows: int) -> list[int]:
    """Rows spread evenly over positions 128-383: bench_serve's 128-token prompts with 1-256 reply tokens so far."""
    return [min(128 + 255 * i // max(1, rows - 1), engine.context - 2) for i in range(rows)]


@torch.inference_mode()
def step_profile(engine, model, single: dict, steps: int = 50, rows: int = 1, spread: bool = False) -> dict:
    """Time the bare decode step of `rows` rows (as the engine runs it) against the engine's time per
    token (one row) or per step at that concurrency (`rows` tokens a step: rows / step time is the rate
    the GPU alone would allow). Rows at position 300, or with `spread` evenly over 128-383 (the serving
    bench's 128-token prompts with 1-256 reply tokens so far).

    With several ranks only the step as the engine runs it is timed: replaying rank 0's graph alone
    would wait forever for the other ranks' half of its collectives.
    """
    runner, device = engine.runner, engine.device
    position = min(300, engine.context - 2)  # 7B: inside the 512-token bucket, like most single-stream steps
    positions = [position] * rows
    if spread:
        positions = served_positions(engine, rows)
        position = max(positions)
    runner.step([5] * rows, positions)  # make sure its graph exists
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        runner.step([5] * rows, positions)[1].tolist()  # inputs in, greedy tokens out, one sync
    step_s = (time.perf_counter() - start) / steps
    profile = {"step_ms": 1000 * step_s, "step_bound_tok_s": rows / step_s}
    if rows == 1:
        profile["engine_ms_per_token"] = 1000 / single["decode_tok_s"]
    profile["weight_gb_per_rank"] = model.weight_bytes() / 1e9
    profile["weights_gb_per_s_per_rank"] = model.weight_bytes() / step_s / 1e9
    bucket = runner.buckets.get(runner.bucket_key(rows, position + 1))
    single_rank = model.comm.world == 1
    if single_rank and bucket is not None and bucket.get("graph") is not None:
        replay_s = graph_ms(bucket["graph"].replay, steps) / 1000
        profile["graph_replay_ms"] = 1000 * replay_s
        profile["replay_bound_tok_s"] = rows / replay_s
        profile["weights_gb_per_s"] = model.weight_bytes() / replay_s / 1e9
        profile["kernel_time"] = kernel_breakdown(bucket["graph"].replay, steps)
    if rows == 1:
        profile["host_overhead_ms"] = profile["engine_ms_per_token"] - profile.get(
            "graph_replay_ms", profile["step_ms"]
        )
    if single_rank and bucket is not None and torch.device(device).type == "cuda":
        profile["kernels_per_step"] = count_kernels(lambda: runner._forward(bucket))
    return profile


@torch.inference_mode()
def prefill_profile(engine, model, prompts: int, length: int, repeats: int = 5) -> dict:
    """One prefill forward of `prompts` prompts of `length` tokens in rows 0.., as the engine writes a burst of
    users' prompts: its wall time (best of `repeats`, synced), the rate in tokens/s and in model FLOP/s (two a
    weight a token), and its kernels by name (one forward profiled)."""
    from vicunaflow.engine.runner import PrefillChunk

    runner, device = engine.runner, engine.device
    chunks = [PrefillChunk([5 + (row + i) % 1000 for i in range(length)], 0, row) for row in range(prompts)]
    try:
        runner.prefill_chunks(chunks)  # first use: allocations
        sync(device)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            runner.prefill_chunks(chunks)
            sync(device)
            best = min(best, time.perf_counter() - start)
        tokens = prompts * length
        profile = {"tokens": tokens, "prefill_ms": 1000 * best, "prefill_tok_s": tokens / best}
        profile["model_tflops"] = 2 * model.weight_bytes() / model.dtype.itemsize * tokens / best / 1e12
        if torch.device(device).type == "cuda":
            profile["kernel_time"] = kernel_breakdown(lambda: runner.prefill_chunks(chunks), 1, top=16)
        return profile
    finally:
        for row in range(prompts):
            engine.cache.release(row)


def attention_kernels_module():
    from vicunaflow import attention_kernels

    return attention_kernels


@torch.inference_mode()
def attention_tiles_in_steps(engine, model, rows: int, variants: list[str]) -> list[dict]:
    """Each variant of the tiles these rows take (MANY_ROWS_TILES, or MIDDLE_ROWS_TILES at 33-64 rows) timed where a
    decode step runs it: the step's graph captured again with it (replay, and the split kernel's µs a layer between
    the products), and its launches alone over the engine's own pools, tables and lengths (one a layer, in a
    graph), as the step gives them and changed one way at a time (attention_inputs). Why: the attention took 46.5 /
    89.5 / 319.4 µs a 7B layer inside 32 / 64 / 256-row steps against 41.2 / 66.7 / 263.2 in sweep_attention's
    graphs of it alone; the step's int64 inputs were the difference (engine/runner.py's STEP_INPUTS)."""
    attention_kernels = attention_kernels_module()
    group = model.args.n_heads // model.args.n_kv_heads
    taken = attention_kernels.tiles_for(rows, group)  # the class these rows take: MIDDLE_ROWS_TILES at 33-64 rows
    name = next(name for name in attention_kernels.TILE_CLASSES if getattr(attention_kernels, name) is taken)
    runner = engine.runner
    positions = served_positions(engine, rows)
    bucket = runner.buckets[runner.bucket_key(rows, max(positions) + 1)]
    results = []
    try:
        for text in variants:
            split, tile, warps, stages = map(int, text.split(","))
            setattr(attention_kernels, name, attention_kernels.Tiles(split, tile, warps, stages))
            bucket["graph"] = None  # captured again with these tiles by the next step
            runner.step([5] * rows, positions)[1].tolist()
            replay_ms = graph_ms(bucket["graph"].replay)
            split_us = next(
                (
                    r["us"]
                    for r in kernel_breakdown(bucket["graph"].replay, 20, quiet=True) or []
                    if r["kernel"] == "split_kernel"
                ),
                None,
            )
            results.append(
                {"tiles": text, "replay_ms": round(replay_ms, 3), "split_kernel_us_a_layer": round(split_us / model.args.n_layers, 2) if split_us else None}
                | {f"alone_us_a_layer_{name}": round(attention_alone_us(model, tables, lengths), 2) for name, (tables, lengths) in attention_inputs(model, bucket, rows).items()}
            )  # fmt: skip
            print(f"  attention tiles {text} at {rows} rows: {results[-1]}", flush=True)
    finally:
        setattr(attention_kernels, name, taken)
        bucket["graph"] = None
    return results


def graph_ms(replay, replays: int = 50) -> float:
    """Mean wall-clock ms of `replays` calls of a CUDA graph's `replay`, synchronised before and after."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(replays):
        replay()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / replays


def attention_inputs(model, bucket, rows: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The step's block tables and lengths as the step reads them ("engine": rows of the step's inputs, int32 since
    runner.STEP_INPUTS, int64 before), and changed one way at a time: an int32 contiguous copy; every block id sent
    through one random permutation (the same lengths and dtype, the blocks elsewhere in the pool); the rows in
    another order."""
    cache, inputs = model.cache, bucket["step_inputs"]
    tables = inputs[:rows, 2 : 2 + cache.blocks_for(bucket["kv_length"])]
    lengths = inputs[:rows, 1] + 1
    generator = torch.Generator(device=tables.device).manual_seed(0)
    permutation = torch.cat(
        [torch.zeros(1, dtype=torch.long, device=tables.device),
         torch.randperm(cache.blocks, generator=generator, device=tables.device) + 1]
    )  # fmt: skip
    order = torch.randperm(rows, generator=generator, device=tables.device)
    return {
        "engine": (tables, lengths),
        "int32": (tables.to(torch.int32).contiguous(), lengths),
        "random_ids": (permutation[tables].to(tables.dtype), lengths),
        "rows_shuffled": (tables[order], lengths[order]),
    }


def attention_alone_us(model, tables: torch.Tensor, lengths: torch.Tensor) -> float:
    """µs a launch of the attention alone over the engine's own pools, with these tables and lengths."""
    attention_kernels = attention_kernels_module()
    cache, rows = model.cache, tables.shape[0]
    query = torch.randn(rows, model.heads, model.args.head_dim, dtype=model.dtype, device=tables.device)

    def launches():
        for layer in range(model.args.n_layers):
            attention_kernels._attention(
                query, cache.counters, cache.keys[layer], cache.values[layer], tables, lengths, model.heads, None
            )

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        launches()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launches()
    graph.replay()
    return 1000 * graph_ms(graph.replay, 20) / model.args.n_layers


def count_kernels(step) -> int | None:
    """GPU kernels one eager call of `step` launches (what a CUDA graph of it replays)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type.name == "CUDA" and "memcpy" not in e.name.lower())
    except Exception as err:  # CUPTI may be unavailable
        print(f"kernel count failed: {err}", flush=True)
        return None


def kernel_breakdown(replay, steps: int, top: int = 12, quiet: bool = False) -> list[dict] | None:
    """Where a step's time goes: the kernels of `steps` graph replays, grouped by name, slowest first
    (µs and launches per step; names cut to 60 characters)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                replay()
            torch.cuda.synchronize()
    except Exception as err:  # CUPTI may be unavailable
        print(f"kernel breakdown failed: {err}", flush=True)
        return None
    totals: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type.name == "CUDA":
            total = totals.setdefault(event.name[:60], [0.0, 0])
            total[0] += event.device_time
            total[1] += 1
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])
    rows = [{"kernel": name, "us": t / steps, "launches": n / steps} for name, (t, n) in ranked[:top]]
    rest = ranked[top:]
    rows.append(
        {
            "kernel": "(the rest)",
            "us": sum(t for _, (t, _) in rest) / steps,
            "launches": sum(n for _, (_, n) in rest) / steps,
        }
    )
    if quiet:
        return rows
    for row in rows:
        print(f"  {row['us']:9.1f} us {row['launches']:6.1f}x  {row['kernel']}", flush=True)
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    rows.append({"kernel": "(timeline)", **timeline(kernels, steps)})
    return rows


def timeline(kernels: list, steps: int) -> dict:
    """The replays' kernels in launch order: how much of a step the GPU sat between kernels, and the first 20
    launches (the first layers) and last 6 one by one (µs each, the median over steps), to tell one product
    from another."""
    per_step = len(kernels) // steps
    if not per_step:
        return {}
    busy = sum(e.time_range.end - e.time_range.start for e in kernels) / steps
    spans = [
        kernels[(i + 1) * per_step - 1].time_range.end - kernels[i * per_step].time_range.start for i in range(steps)
    ]
    span = statistics.median(spans)
    sequence = []
    for index in sorted(set(range(min(per_step, 20))) | set(range(max(0, per_step - 6), per_step))):
        durations = [kernels[i * per_step + index].time_range.end - kernels[i * per_step + index].time_range.start
                     for i in range(steps)]  # fmt: skip
        sequence.append((kernels[index].name[:40], round(statistics.median(durations), 2)))
    gaps = [b.time_range.start - a.time_range.end for a, b in itertools.pairwise(kernels[:per_step])]
    result = {
        "busy_us": round(busy, 1),
        "span_us": round(span, 1),
        "idle_us": round(span - busy, 1),
        "launches": per_step,
        "first_step_gap_p50_us": round(statistics.median(gaps), 2) if gaps else None,
        "sequence": sequence,
    }
    print(f"  timeline: busy {result['busy_us']} us of a {result['span_us']} us span, {per_step} launches", flush=True)
    for name, us in sequence:
        print(f"    {us:8.2f} us  {name}", flush=True)
    return result


@torch.inference_mode()
def bench_transformers(model, prompts, args) -> list[dict]:
    results = []
    device = model.get_input_embeddings().weight.device  # dispatched over GPUs: inputs go to the first
    new_tokens = args.reference_new_tokens or args.new_tokens
    model.generate(torch.tensor([prompts[0]], device=device), max_new_tokens=4, do_sample=False)  # warm-up
    for concurrency in args.concurrency:
        batch = torch.tensor(prompts[:concurrency], device=device)  # equal lengths: no padding needed
        best = 0.0
        for _ in range(args.reference_repeats):
            sync(device)
            start = time.perf_counter()
            out = model.generate(
                batch,
                attention_mask=torch.ones_like(batch),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            sync(device)
            elapsed = time.perf_counter() - start
            best = max(best, concurrency * (out.shape[1] - batch.shape[1]) / elapsed)
        mode = "single-stream" if concurrency == 1 else "aggregate"
        row = {"engine": "transformers.generate", "mode": mode, "concurrency": concurrency, "aggregate_tok_s": best}
        if concurrency == 1:
            row |= {"e2e_tok_s": best, "reply_s": new_tokens / best, "tokens": new_tokens}
        results.append(row)
        print(results[-1], flush=True)
    return results


def run_fastchat_child(args) -> list[dict]:
    """The FastChat side in its own process, with the transformers 4.x it needs first on the path."""
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "fastchat.json"
        command = [sys.executable, __file__, "--only", "fastchat", "--output", str(output)]
        command += ["--size", args.size, "--device", args.device, "--context", str(args.context)]
        command += ["--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
        command += ["--reference-repeats", str(args.reference_repeats), "--concurrency", "1"]
        command += ["--tiny"] if args.tiny else []
        command += ["--quant", "8"] if 8 in args.quant else []  # FastChat's own --load-8bit too
        command += ["--scratch", str(args.scratch)] if args.scratch else []
        src = str(HERE.parent / "src")
        # FastChat's transformers 4.x first; then this process's own path (its other packages, after the 4.x ones)
        path = [args.fastchat_pythonpath, src, *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        print("fastchat child:", " ".join(command), flush=True)
        if subprocess.run(command, env=env).returncode != 0 or not output.exists():
            print("fastchat child failed", flush=True)
            return []
        return json.loads(output.read_text())["runs"][0]["results"]


def bench_fastchat(model, tokenizer, prompts, args) -> list[dict]:
    """FastChat 0.2.36's generate_stream (its model worker's loop, default stream interval), one request."""
    try:
        import fastchat
        from fastchat.serve.inference import generate_stream
    except ImportError as err:
        print(f"fastchat: skipped ({err}); pip install fschat==0.2.36")
        return []
    prompt = tokenizer.decode(prompts[0][1:])
    assert tokenizer(prompt).input_ids == prompts[0]  # FastChat tokenises the text itself: same prompt as ours

    def params(new_tokens: int) -> dict:
        return {"prompt": prompt, "temperature": 0.0, "max_new_tokens": new_tokens, "echo": False}

    eos = tokenizer.eos_token_id
    tokenizer.eos_token_id = None  # generate_stream stops at EOS; never let the random model end early
    try:
        for _ in generate_stream(model, tokenizer, params(8), args.device, args.context):  # warm-up
            pass
        best = None
        for _ in range(args.reference_repeats):
            start = time.perf_counter()
            first = output = None
            for output in generate_stream(model, tokenizer, params(args.new_tokens), args.device, args.context):  # noqa: B007
                first = first or time.perf_counter()
            end = time.perf_counter()
            tokens = output["usage"]["completion_tokens"] + 1  # FastChat counts from 0
            run = {
                "first_token_s": first - start,
                "decode_tok_s": (tokens - 1) / (end - first),
                "e2e_tok_s": tokens / (end - start),
                "reply_s": end - start,
                "tokens": tokens,
            }
            best = run if best is None or run["e2e_tok_s"] > best["e2e_tok_s"] else best
    except Exception as err:  # report rather than abort the other results
        print(f"fastchat: failed with transformers {info_version()}: {type(err).__name__}: {err}")
        return []
    finally:
        tokenizer.eos_token_id = eos
    versions = {"fastchat": fastchat.__version__, "transformers": info_version()}
    return [
        {"engine": "fastchat.generate_stream", "mode": "single-stream", "concurrency": 1, **best, **versions},
        {
            "engine": "fastchat.generate_stream",
            "mode": "aggregate",
            "concurrency": 1,
            "aggregate_tok_s": best["e2e_tok_s"],
            "note": "one request at a time: the same rate at any concurrency",
            **versions,
        },
    ]


def info_version() -> str:
    return __import__("transformers").__version__


def print_table(results: list[dict]) -> None:
    columns = ["engine", "weights", "weight_gib", "num_gpus", "all_reduce", "mode", "concurrency", "decode_tok_s"]
    columns += ["e2e_tok_s"]
    columns += ["aggregate_tok_s", "reply_s"]
    columns += ["first_token_s", "replay_bound_tok_s"]
    print(" | ".join(f"{c:>14}" for c in columns))
    for row in results:
        cells = []
        for c in columns:
            value = row.get(c, "")
            cells.append(f"{value:>14.3f}" if isinstance(value, float) else f"{value!s:>14}")
        print(" | ".join(cells))


if __name__ == "__main__":
    main()

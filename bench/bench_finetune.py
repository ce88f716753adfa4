"""Fine-tuning throughput: tokens/s and model FLOPs utilisation (MFU), vicunaflow vs FastChat's recipe.

Both sides train the same randomly initialised 7B-shaped LLaMA on the same 2048-token sequences,
bf16, FSDP full_shard per decoder layer, gradient checkpointing, batch 1 per GPU, 8 micro-batches per step:

    ours      torchrun -m vicunaflow finetune   (FSDP2, SDPA)
    fastchat  torchrun bench_finetune.py --worker hf   (transformers Trainer + FSDP, as train_mem.py;
              SDPA stands in for FastChat's flash-attn monkey patch, which needs a flash-attn build)

    python bench/bench_finetune.py --gpus 1 2            # on a GPU machine (7B shape, 2048 tokens)
    python bench/bench_finetune.py --tiny                # CPU smoke test of the script itself

Tokens/s counts every input token; MFU = tokens/s x FLOPs per token / (GPUs x peak bf16 FLOPs),
FLOPs per token = 6 N + 12 L d T (PaLM's estimate; N without the input embedding; recomputation by
gradient checkpointing is not counted as useful work). The first --warmup steps are not timed.
Results go to bench/results/finetune.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Dense bf16 peak of one GPU, TFLOPs (vendor data sheets, SXM parts).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, 256 tokens, few steps")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="GPU counts to measure")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    parser.add_argument("--gradient-checkpointing", choices=["true", "false"], default="true")
    parser.add_argument("--accumulation", type=int, default=8, help="micro-batches per step (FastChat's 8)")
    parser.add_argument("--peak-tflops", type=float, help="bf16 peak per GPU; default: from the GPU's name")
    parser.add_argument("--workdir", type=Path, default=HERE / "work-finetune")
    parser.add_argument("--only", choices=["ours", "fastchat"], help="measure one side only")
    parser.add_argument("--worker", choices=["hf"], help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "hf":
        return hf_trainer_worker(args)

    if args.tiny:
        args.gpus, args.seq_len, args.steps, args.warmup, args.accumulation = [0], 256, 6, 2, 1
    args.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = make_model(args.workdir / ("model-tiny" if args.tiny else "model-7b"), tiny=args.tiny)
    n_samples = max(64, args.steps * args.accumulation * max(args.gpus))
    data_file = make_data(args.workdir / f"data-{args.seq_len}-{n_samples}.json", n=n_samples)
    flops_per_token = model_flops_per_token(model_dir, args.seq_len)
    peak = args.peak_tflops or detect_peak_tflops()
    results = []
    for gpus in args.gpus:
        for side in ("ours", "fastchat"):
            if args.only and side != args.only:
                continue
            run = measure(side, gpus, model_dir, data_file, args)
            run["mfu"] = run["tokens_per_s"] * flops_per_token / (max(gpus, 1) * peak * 1e12) if peak else None
            results.append(run)
            print_row(run)
    report = {
        "model": str(model_dir),
        "seq_len": args.seq_len,
        "flops_per_token": flops_per_token,
        "peak_tflops_per_gpu": peak,
        "device": device_name(),
        "results": results,
    }
    out = HERE / "results" / ("finetune-tiny.json" if args.tiny else "finetune.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


def measure(side: str, gpus: int, model_dir: Path, data_file: Path, args) -> dict:
    """Run one side for --steps steps and time the steps after --warmup from its per-step log."""
    nproc = max(gpus, 1)
    out = args.workdir / f"out-{side}-{nproc}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.parent / ".checkpoints", ignore_errors=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    if side == "ours":
        command = [*launcher, "-m", "vicunaflow", "finetune", "--model-path", str(model_dir), "--data", str(data_file)]
        command += ["--output-dir", str(out), "--max-steps", str(args.steps), "--per-device-train-batch-size", "1"]
        command += ["--gradient-accumulation-steps", str(args.accumulation), "--model-max-length", str(args.seq_len)]
        command += ["--gradient-checkpointing", args.gradient_checkpointing, "--save-strategy", "no"]
        command += ["--lazy-preprocess", "false", "--report-to", "none", "--learning-rate", "2e-5"]
    else:
        command = [*launcher, str(Path(__file__).resolve()), "--worker", "hf", "--model", str(model_dir)]
        command += ["--data", str(data_file), "--out", str(out), "--steps", str(args.steps)]
        command += ["--seq-len", str(args.seq_len), "--gradient-checkpointing", args.gradient_checkpointing]
        command += ["--accumulation", str(args.accumulation)]
    started = time.perf_counter()
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - started
    (args.workdir / f"log-{side}-{nproc}.txt").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"{side} on {nproc} process(es) failed; see {args.workdir}/log-{side}-{nproc}.txt")
    steps = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    timed = steps[args.warmup :]
    tokens = sum(s["input_tokens"] for s in timed)
    seconds = sum(s["seconds"] for s in timed)
    return {
        "side": side,
        "gpus": gpus,
        "tokens_per_s": tokens / seconds,
        "tokens_per_s_per_gpu": tokens / seconds / nproc,
        "median_step_s": statistics.median(s["seconds"] for s in timed),
        "timed_steps": len(timed),
        "final_loss": steps[-1]["loss"],
        "wall_s": round(wall, 1),
    }


def print_row(run: dict) -> None:
    mfu = f"{100 * run['mfu']:.1f}%" if run["mfu"] is not None else "n/a"
    print(
        f"{run['side']:>8} gpus={run['gpus']}  {run['tokens_per_s']:10.0f} tokens/s  "
        f"({run['tokens_per_s_per_gpu']:.0f}/GPU)  step {run['median_step_s']:.3f}s  MFU {mfu}  wall {run['wall_s']}s",
        flush=True,
    )


# --- inputs ---------------------------------------------------------------------------------------


def make_model(path: Path, tiny: bool) -> Path:
    """A random LLaMA in bf16 (7B shape, or dim 256 x 4 layers) with a small trained tokenizer."""
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vicunaflow.synth import train_tokenizer
    from vicunaflow.tokenizer import write_tokenizer

    shape = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8)
    if not tiny:
        shape = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    config = LlamaConfig(
        vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, tie_word_embeddings=False, **shape,
    )  # fmt: skip
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(tmp)
    (tmp / "spm.model").write_bytes(train_tokenizer(1024))
    write_tokenizer(tmp / "spm.model", tmp, model_max_length=2048)
    (tmp / "spm.model").unlink()
    tmp.rename(path)
    return path


def make_data(path: Path, n: int) -> Path:
    """Conversations long enough that every sample is truncated to --seq-len tokens (all full length)."""
    if path.is_file():
        return path
    words = [
        "the",
        "model",
        "learns",
        "to",
        "answer",
        "questions",
        "about",
        "science",
        "history",
        "music",
        "cooking",
        "travel",
        "and",
        "code",
    ]
    records = []
    for i in range(n):
        reply = " ".join(words[(i + j) % len(words)] for j in range(3000))
        records.append(
            {
                "id": f"bench-{i}",
                "conversations": [{"from": "human", "value": "Tell me."}, {"from": "gpt", "value": reply}],
            }
        )
    path.write_text(json.dumps(records))
    return path


def model_flops_per_token(model_dir: Path, seq_len: int) -> float:
    config = json.loads((model_dir / "config.json").read_text())
    d, layers, vocab, ffn = (
        config["hidden_size"],
        config["num_hidden_layers"],
        config["vocab_size"],
        config["intermediate_size"],
    )
    per_layer = 4 * d * d + 3 * d * ffn + 2 * d  # attention q k v o, MLP gate up down, two norms
    n = layers * per_layer + d + vocab * d  # + final norm + lm_head (the input embedding is a lookup)
    return 6 * n + 12 * layers * d * seq_len


def detect_peak_tflops() -> float | None:
    name = device_name()
    return next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name), None)


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


# --- FastChat's recipe: transformers Trainer + FSDP -------------------------------------------


def hf_trainer_worker(args) -> None:
    """One torchrun worker of the baseline: FastChat train.py's Trainer settings on the same data.

    Writes trainer_log.jsonl in the same shape as vicunaflow's, timed by a callback per step.
    """
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from vicunaflow import data as conversations

    tokenizer = conversations.load_tokenizer(args.model)
    samples = conversations.encode_all(conversations.load_conversations(args.data), tokenizer, args.seq_len)

    class Dataset(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(samples)

        def __getitem__(self, i: int) -> dict:
            ids = torch.tensor(samples[i].input_ids)
            return {"input_ids": ids, "labels": torch.tensor(samples[i].labels), "attention_mask": torch.ones_like(ids)}

    cuda = torch.cuda.is_available()

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, training_args, state, *_, **__) -> None:
            if cuda:
                torch.cuda.synchronize()
            if state.is_world_process_zero:
                world = training_args.world_size
                entry = {"step": state.global_step, "loss": None, "seconds": time.perf_counter() - self.started}
                # batch 1 per process and micro-batch, every sample full length
                entry["input_tokens"] = world * args.seq_len * args.accumulation
                with (args.out / "trainer_log.jsonl").open("a") as f:
                    f.write(json.dumps(entry) + "\n")

    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    training_args = TrainingArguments(
        output_dir=str(args.out),
        max_steps=args.steps,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=args.accumulation,
        learning_rate=2e-5,
        weight_decay=0.0,
        warmup_steps=0.03,  # transformers 5: a float below 1 is a ratio of the steps
        lr_scheduler_type="cosine",
        logging_steps=1,
        save_strategy="no",
        bf16=cuda,
        tf32=cuda and torch.cuda.get_device_capability() >= (8, 0),
        gradient_checkpointing=args.gradient_checkpointing == "true",
        fsdp="full_shard auto_wrap" if cuda and multi else "",
        fsdp_config={"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]} if cuda and multi else None,
        report_to=[],
        dataloader_num_workers=0,
        use_cpu=not cuda,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    trainer = Trainer(model=model, args=training_args, train_dataset=Dataset(), callbacks=[StepTimer()])
    trainer.train()
    if trainer.is_world_process_zero():
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        lines = [json.loads(line) for line in (args.out / "trainer_log.jsonl").read_text().splitlines()]
        for entry, loss in zip(lines, losses, strict=False):
            entry["loss"] = loss
        (args.out / "trainer_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))


if __name__ == "__main__":
    main()

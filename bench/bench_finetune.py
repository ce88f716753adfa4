"""Fine-tuning throughput: tokens/s and model FLOPs utilisation (MFU), vicunaflow vs FastChat's recipe.

Both sides train the same randomly initialised 7B-shaped LLaMA on the same 2048-token sequences,
bf16, FSDP full_shard per decoder layer, gradient checkpointing, batch 1 per GPU, 8 micro-batches per step:

    ours      torchrun -m vicunaflow finetune   (FSDP2, SDPA)
    fastchat  torchrun bench_finetune.py --worker hf   (transformers Trainer + FSDP, as train_mem.py;
              SDPA stands in for FastChat's flash-attn monkey patch, which needs a flash-attn build)

    python bench/bench_finetune.py --gpus 1 2            # on a GPU machine (7B shape, 2048 tokens)
    python bench/bench_finetune.py --tiny                # CPU smoke test of the script itself
    python bench/bench_finetune.py --gpus 1 --runs ours ours-compile fastchat --workdir /dev/shm/ft

--runs picks the configurations: ours (the command's defaults), ours-no-gc (no gradient checkpointing),
ours-sync-every (reduce-scatter after every micro-batch), ours-compile (--compile), fastchat.
A run stops once its last timed step is logged (the final model save is not part of the benchmark).

Tokens/s counts every input token; MFU = tokens/s x FLOPs per token / (GPUs x peak bf16 FLOPs),
FLOPs per token = 6 N + 12 L d T (PaLM's estimate; N without the input embedding; recomputation by
gradient checkpointing is not counted as useful work). The first --warmup steps are not timed.
Results go to bench/results/finetune.json (or --results), rewritten after every run, and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Dense bf16 peak of one GPU, TFLOPs (vendor data sheets, SXM parts).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
# Extra `vicunaflow finetune` options of each configuration of ours.
OURS_RUNS = {
    "ours": [],
    "ours-no-gc": ["--gradient-checkpointing", "false"],
    "ours-sync-every": ["--gradient-sync", "micro_batch"],
    "ours-compile": ["--compile", "true"],
    "ours-no-gc-compile": ["--gradient-checkpointing", "false", "--compile", "true"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, 256 tokens, few steps")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="GPU counts to measure")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    parser.add_argument("--gradient-checkpointing", choices=["true", "false"], default="true")
    parser.add_argument("--accumulation", type=int, default=8, help="micro-batches per step (FastChat's 8)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per GPU and micro-batch")
    parser.add_argument("--peak-tflops", type=float, help="bf16 peak per GPU; default: from the GPU's name")
    parser.add_argument("--workdir", type=Path, default=HERE / "work-finetune")
    parser.add_argument("--runs", nargs="+", choices=[*OURS_RUNS, "fastchat"], default=["ours", "fastchat"])
    parser.add_argument("--results", type=Path, help="result JSON (default: bench/results/finetune.json)")
    parser.add_argument("--run-timeout", type=float, default=900, help="seconds before a run is stopped")
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
    started = time.perf_counter()
    model_dir = make_model(args.workdir / ("model-tiny" if args.tiny else "model-7b"), tiny=args.tiny)
    n_samples = max(64, args.steps * args.accumulation * args.batch * max(args.gpus))
    data_file = make_data(args.workdir / f"data-{args.seq_len}-{n_samples}.json", n=n_samples)
    print(f"inputs ready in {time.perf_counter() - started:.0f}s", flush=True)
    flops_per_token = model_flops_per_token(model_dir, args.seq_len)
    peak = args.peak_tflops or detect_peak_tflops()
    out = args.results or HERE / "results" / ("finetune-tiny.json" if args.tiny else "finetune.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "model": str(model_dir),
        "seq_len": args.seq_len,
        "steps": args.steps,
        "timed_steps": args.steps - args.warmup,
        "accumulation": args.accumulation,
        "per_device_batch": args.batch,
        "gradient_checkpointing": args.gradient_checkpointing == "true",
        "flops_per_token": flops_per_token,
        "peak_tflops_per_gpu": peak,
        "device": device_name(),
        "versions": versions(),
        "results": [],
    }
    for gpus in args.gpus:
        runs = measure_all(args.runs, gpus, model_dir, data_file, args)
        for run in runs:
            if "tokens_per_s" in run:
                run["mfu"] = run["tokens_per_s"] * flops_per_token / (max(gpus, 1) * peak * 1e12) if peak else None
            report["results"].append(run)
            print_row(run)
            out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


def measure_all(names: list[str], gpus: int, model_dir: Path, data_file: Path, args) -> list[dict]:
    """Measure each configuration; one-GPU runs go side by side, one per visible GPU (they share nothing)."""
    visible = device_count()
    if gpus == 1 and visible > 1:
        results = []
        for first in range(0, len(names), visible):
            batch = names[first : first + visible]
            processes = [start(name, gpus, model_dir, data_file, args, cuda_device=i) for i, name in enumerate(batch)]
            results += [finish(process, args) for process in processes]
        return results
    return [finish(start(name, gpus, model_dir, data_file, args), args) for name in names]


def start(name: str, gpus: int, model_dir: Path, data_file: Path, args, cuda_device: int | None = None) -> dict:
    """Launch one configuration under torchrun, in its own process group (so it can be stopped as a whole)."""
    nproc = max(gpus, 1)
    out = args.workdir / f"out-{name}-{nproc}"
    checkpoints = args.workdir / f"checkpoints-{name}-{nproc}"
    for path in (out, checkpoints):
        shutil.rmtree(path, ignore_errors=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    if name in OURS_RUNS:
        command = [*launcher, "-m", "vicunaflow", "finetune", "--model-path", str(model_dir), "--data", str(data_file)]
        command += [
            "--output-dir",
            str(out),
            "--max-steps",
            str(args.steps),
            "--per-device-train-batch-size",
            str(args.batch),
        ]
        command += ["--gradient-accumulation-steps", str(args.accumulation), "--model-max-length", str(args.seq_len)]
        command += ["--gradient-checkpointing", args.gradient_checkpointing, "--save-strategy", "no"]
        command += ["--lazy-preprocess", "false", "--report-to", "none", "--learning-rate", "2e-5"]
        command += ["--checkpoint-dir", str(checkpoints), *OURS_RUNS[name]]
        step_log = checkpoints / "trainer_log.jsonl"  # written there while training, copied to the output at the end
    else:
        command = [*launcher, str(Path(__file__).resolve()), "--worker", "hf", "--model", str(model_dir)]
        command += ["--data", str(data_file), "--out", str(out), "--steps", str(args.steps)]
        command += ["--seq-len", str(args.seq_len), "--gradient-checkpointing", args.gradient_checkpointing]
        command += ["--accumulation", str(args.accumulation), "--batch", str(args.batch)]
        step_log = out / "trainer_log.jsonl"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if cuda_device is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(cuda_device)
    log_path = args.workdir / f"log-{name}-{nproc}.txt"
    log_file = log_path.open("w")
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    print(f"started {name} on {nproc} GPU(s){'' if cuda_device is None else f' (GPU {cuda_device})'}", flush=True)
    return {"name": name, "gpus": gpus, "process": process, "log": log_path, "log_file": log_file,
            "step_log": step_log, "output_log": out / "trainer_log.jsonl", "started": time.perf_counter()}  # fmt: skip


def finish(run: dict, args) -> dict:
    """Wait until the run has logged --steps steps (then stop it) or ended; time the steps after --warmup."""
    process, step_log = run["process"], run["step_log"]
    deadline = run["started"] + args.run_timeout
    while process.poll() is None and logged_steps(step_log) < args.steps and time.perf_counter() < deadline:
        time.sleep(1)
    stopped = process.poll() is None
    if stopped:
        os.killpg(process.pid, signal.SIGTERM)  # the torchrun group this script started
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    run["log_file"].close()
    wall = time.perf_counter() - run["started"]
    result = {"side": run["name"], "gpus": run["gpus"], "wall_s": round(wall, 1), "log": str(run["log"])}
    steps = read_steps(step_log) or read_steps(run["output_log"])  # a run that ended moved its log there
    if len(steps) < args.steps:
        tail = run["log"].read_text()[-3000:]
        print(f"{run['name']} on {run['gpus']} GPU(s) failed or timed out; log tail:\n{tail}", flush=True)
        return result | {"error": tail.strip().splitlines()[-1] if tail.strip() else "no output"}
    timed = steps[args.warmup : args.steps]
    tokens = sum(s["input_tokens"] for s in timed)
    seconds = sum(s["seconds"] for s in timed)
    return result | {
        "tokens_per_s": tokens / seconds,
        "tokens_per_s_per_gpu": tokens / seconds / max(run["gpus"], 1),
        "median_step_s": statistics.median(s["seconds"] for s in timed),
        "timed_steps": len(timed),
        "losses": [s["loss"] for s in steps[: args.steps]],
        "stopped_after_last_step": stopped,
    }


def read_steps(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip().endswith("}")]


def logged_steps(path: Path) -> int:
    return len(read_steps(path))


def print_row(run: dict) -> None:
    if "error" in run:
        print(f"{run['side']:>18} gpus={run['gpus']}  FAILED: {run['error']}", flush=True)
        return
    mfu = f"{100 * run['mfu']:.1f}%" if run["mfu"] is not None else "n/a"
    print(
        f"{run['side']:>18} gpus={run['gpus']}  {run['tokens_per_s']:10.0f} tokens/s  "
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
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random numbers for 7B: seconds on a GPU
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(torch.bfloat16)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(tmp)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the runs need the whole GPU
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


def device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def versions() -> dict:
    import platform

    import accelerate
    import torch
    import transformers

    found = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    found["accelerate"] = accelerate.__version__
    if torch.cuda.is_available():
        found |= {
            "cuda": torch.version.cuda,
            "gpus": device_count(),
            "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        }
    return found


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
        """Times each optimizer step (synchronised); the entry is written when the step's loss is logged."""

        entry: dict | None = None

        def on_step_begin(self, *_, **__) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, training_args, state, *_, **__) -> None:
            if cuda:
                torch.cuda.synchronize()
            world = training_args.world_size
            self.entry = {"step": state.global_step, "loss": None, "seconds": time.perf_counter() - self.started}
            # every sample is full length
            self.entry["input_tokens"] = world * args.batch * args.seq_len * args.accumulation

        def on_log(self, training_args, state, control, logs=None, **__) -> None:
            if self.entry is None or not state.is_world_process_zero:
                return
            self.entry["loss"] = (logs or {}).get("loss")
            with (args.out / "trainer_log.jsonl").open("a") as f:
                f.write(json.dumps(self.entry) + "\n")
            self.entry = None

    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    training_args = TrainingArguments(
        output_dir=str(args.out),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
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


if __name__ == "__main__":
    main()

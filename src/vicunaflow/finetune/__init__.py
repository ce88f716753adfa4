"""Supervised fine-tuning of a LLaMA/Vicuna model on conversations, FastChat's recipe without its Trainer.

One code path from a laptop CPU to several GPU nodes: every process runs `fit()`; the decoder
layers and then the whole model are sharded with FSDP2 (`fully_shard`), gloo on CPU and NCCL on
CUDA; attention is PyTorch SDPA. Start it any of these ways:

    vicunaflow finetune --model-path vicuna-7b-all-v1.1 --data data.json --output-dir out   # all local GPUs
    torchrun --nproc_per_node 2 -m vicunaflow finetune --model-path ... --data ... --output-dir out
    (in a SLURM job of N nodes) vicunaflow finetune ...   # srun + torchrun per node, see launch.py

Resumable: every save_steps, a sharded checkpoint (state.py: model, optimizer,
scheduler, step, RNG; the data position follows from the step) goes to a sibling of the output,
`<output_dir parent>/.checkpoints/<output_dir name>/checkpoint-N`, not into the output directory:
Snakemake deletes the output of a failed job, and the checkpoints must outlive the failure. Running
the same command again resumes from the newest one. Only rank 0 writes the final output, a Hugging
Face model directory, atomically (it appears complete or not at all); then the checkpoints go.

The package, each module importing only those above it:

    config   TrainConfig (options, bounds, validation), Runtime, file names; no torch
    data     tokenised sequences, packing, batches, the per-process data plan
    model    loading, LoRA / QLoRA, FSDP2 sharding, the optimizer
    state    checkpoints: save, find, resume
    output   the run's log while it trains and the final model directory
    loop     main() in every process: distributed setup, fit(), train_step(), gradient sync
    __init__ setup(): the `vicunaflow finetune` verb, which validates and starts the processes
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from vicunaflow import VicunaflowError
from vicunaflow.finetune.config import LORA_TARGETS, PATH_FIELDS, TrainConfig, default_checkpoint_dir


def setup(
    *,
    model_path: Path,
    data: Path,
    output_dir: Path,
    method: Literal["full", "lora", "qlora"] = "full",
    num_train_epochs: float = 2.0,
    max_steps: int = -1,
    per_device_train_batch_size: int = 1,
    gradient_accumulation_steps: int = 8,
    learning_rate: float = 2e-5,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.03,
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = "cosine",
    max_grad_norm: float = 1.0,
    logging_steps: int = 1,
    save_strategy: Literal["steps", "epoch", "no"] = "steps",
    save_steps: int = 300,
    save_total_limit: int | None = 10,
    model_max_length: int = 2048,
    gradient_checkpointing: bool = True,
    gradient_sync: Literal["auto", "micro_batch", "step"] = "auto",
    compile: bool = False,
    bf16: bool = True,
    tf32: bool = True,
    report_to: Literal["tensorboard", "none"] = "tensorboard",
    fsdp: str = "full_shard auto_wrap",
    lazy_preprocess: bool = True,
    packing: bool = False,
    seed: int = 42,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    lora_target_modules: tuple[str, ...] = LORA_TARGETS,
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    checkpoint_dir: Path | None = None,
    keep_checkpoints: bool = False,
    nproc_per_node: int | None = None,
    overwrite: bool = False,
) -> Path | None:
    """Fine-tune a Hugging Face LLaMA model on Vicuna v1.1 conversations (loss on the replies only).

    Defaults are FastChat's Vicuna v1.1 recipe (train_mem.py: FSDP, bf16, 2048 tokens, lr 2e-5, cosine).

    Arguments:
        model_path: Hugging Face model directory to start from (e.g. vicuna-7b-all-v1.1, llama-7b-hf).
        data: conversations (JSON list or JSONL, ShareGPT records) or a directory from `vicunaflow data tokenize`.
        output_dir: the fine-tuned Hugging Face model directory to write (LoRA: plus `adapter/`).
        method: full (all weights), lora (peft adapters, also merged into the output) or qlora (4-bit base, CUDA only).
        num_train_epochs: passes over the data (may be fractional).
        max_steps: stop after this many optimizer steps; -1: as many as num_train_epochs gives.
        per_device_train_batch_size: sequences per process per micro-batch.
        gradient_accumulation_steps: micro-batches per optimizer step.
        learning_rate: peak learning rate (AdamW).
        weight_decay: AdamW weight decay, applied to matrices only (not norms), as the HF Trainer does.
        warmup_ratio: fraction of the steps spent warming the learning rate up linearly from 0.
        lr_scheduler_type: decay after warm-up: cosine, linear, or constant.
        max_grad_norm: clip the gradient norm to this (0: no clipping).
        logging_steps: log loss and learning rate every N steps (console, trainer_log.jsonl, tensorboard).
        save_strategy: checkpoint every save_steps (steps), at each epoch's end (epoch), or never (no).
        save_steps: optimizer steps between checkpoints.
        save_total_limit: keep only the newest N checkpoints (null: all).
        model_max_length: longest sequence in tokens; longer conversations are truncated.
        gradient_checkpointing: recompute activations in the backward pass to save memory (whole decoder layers).
        gradient_sync: when sharded gradients are reduced across processes: every micro_batch (least memory), once per optimizer step (step: gradients accumulate locally in float32 and weights stay gathered between micro-batches; least communication, ~6 bytes more GPU memory per parameter), or auto: step on GPUs with room for it.
        compile: torch.compile each decoder layer (fuses norms, rotary and activations; the first step compiles).
        bf16: bfloat16 mixed precision on GPUs that support it (float32 master weights); float32 elsewhere, logged.
        tf32: TF32 matmuls on Ampere or newer GPUs (ignored elsewhere, logged).
        report_to: tensorboard logs in the output's runs/ (none: only trainer_log.jsonl).
        fsdp: FastChat's option: "full_shard auto_wrap" (shard params, grads, optimizer; each decoder layer one unit), "shard_grad_op auto_wrap" (keep params gathered between forward and backward), add "offload" to keep shards in CPU memory.
        lazy_preprocess: with a conversation file, tokenise each sample when first used instead of all up front.
        packing: pack several conversations into each model_max_length sequence (attention kept within each).
        seed: seed of the data order, LoRA initialisation and dropout.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (scale = alpha / r).
        lora_dropout: dropout on the LoRA input.
        lora_target_modules: linear layers that get LoRA adapters.
        save_dtype: dtype of the saved weights; auto: the base model's.
        checkpoint_dir: where resumable checkpoints go; default: <output_dir parent>/.checkpoints/<output_dir name>.
        keep_checkpoints: keep the checkpoint directory after the output is written.
        nproc_per_node: processes per node when not started by torchrun; default: the visible GPUs, or 1 on CPU.
        overwrite: replace an output_dir that exists but is not a complete vicunaflow output (default: refuse).
    """
    from vicunaflow import launch
    from vicunaflow.outputs import check_output_dir

    arguments = dict(locals())
    output_dir = Path(output_dir)
    config = TrainConfig(
        model_path=str(model_path),
        data=str(data),
        output_dir=str(output_dir),
        checkpoint_dir=str(checkpoint_dir or default_checkpoint_dir(output_dir)),
        **{f.name: arguments[f.name] for f in dataclasses.fields(TrainConfig) if f.name not in PATH_FIELDS},
    )
    config.lora_target_modules = list(config.lora_target_modules)
    config.validate()
    if nproc_per_node is not None and nproc_per_node < 1:
        raise VicunaflowError(f"--nproc-per-node must be at least 1, not {nproc_per_node}")
    check_output_dir(output_dir, inputs=config.inputs(), overwrite=overwrite)  # before any process starts
    if not launch.is_launched():
        procs = nproc_per_node or launch.default_nproc_per_node()
        if launch.relaunch(["finetune", *config.to_argv()], procs):
            return output_dir
    from vicunaflow.finetune.loop import main  # torch from here on

    return main(config)

"""Supervised fine-tuning of a LLaMA/Vicuna model on conversations, FastChat's recipe without its Trainer.

One code path from a laptop CPU to several GPU nodes: every process runs `fit()`; the decoder
layers and then the whole model are sharded with FSDP2 (`fully_shard`), gloo on CPU and NCCL on
CUDA; attention is PyTorch SDPA. Start it any of these ways:

    vicunaflow finetune --model-path vicuna-7b-all-v1.1 --data data.json --output-dir out   # all local GPUs
    torchrun --nproc_per_node 2 -m vicunaflow finetune --model-path ... --data ... --output-dir out
    (in a SLURM job of N nodes) vicunaflow finetune ...   # srun + torchrun per node, see launch.py

Resumable: every save_steps, a sharded checkpoint (train_state.py: model, optimizer,
scheduler, step, RNG; the data position follows from the step) goes to a sibling of the output,
`<output_dir parent>/.checkpoints/<output_dir name>/checkpoint-N`, not into the output directory:
Snakemake deletes the output of a failed job, and the checkpoints must outlive the failure. Running
the same command again resumes from the newest one. Only rank 0 writes the final output, a Hugging
Face model directory, atomically (it appears complete or not at all); then the checkpoints go.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vicunaflow import VicunaflowError
from vicunaflow.train_state import HYPERPARAMETERS, resume_if_possible, save_checkpoint

log = logging.getLogger(__name__)

TRAINER_LOG = "trainer_log.jsonl"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
        checkpoint_dir=str(checkpoint_dir or output_dir.parent / ".checkpoints" / output_dir.name),
        **{f.name: arguments[f.name] for f in dataclasses.fields(TrainConfig) if f.name not in _PATH_FIELDS},
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
    return main(config)


_PATH_FIELDS = ("model_path", "data", "output_dir", "checkpoint_dir")


# Each numeric option's lowest value and whether that value itself is allowed (TrainConfig.validate);
# workflow/schemas/config.schema.yaml has the same bounds, so `snakemake -n` refuses them too.
BOUNDS: dict[str, tuple[int, bool]] = {
    "per_device_train_batch_size": (1, True), "gradient_accumulation_steps": (1, True),
    "logging_steps": (1, True), "save_steps": (1, True), "model_max_length": (1, True), "lora_r": (1, True),
    "learning_rate": (0, True), "weight_decay": (0, True), "max_grad_norm": (0, True),  # lr 0: tests the loading
    "num_train_epochs": (0, True), "warmup_ratio": (0, True), "lora_alpha": (0, False), "lora_dropout": (0, True),
    "max_steps": (-1, True),
}  # fmt: skip


@dataclass
class TrainConfig:
    """The resolved arguments of a run: logged first, saved with each checkpoint and the output."""

    model_path: str
    data: str
    output_dir: str
    checkpoint_dir: str
    method: str
    num_train_epochs: float
    max_steps: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    weight_decay: float
    warmup_ratio: float
    lr_scheduler_type: str
    max_grad_norm: float
    logging_steps: int
    save_strategy: str
    save_steps: int
    save_total_limit: int | None
    model_max_length: int
    gradient_checkpointing: bool
    gradient_sync: str
    compile: bool
    bf16: bool
    tf32: bool
    report_to: str
    fsdp: str
    lazy_preprocess: bool
    packing: bool
    seed: int
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_target_modules: list[str]
    save_dtype: str
    keep_checkpoints: bool
    overwrite: bool = False  # a default: checkpoints saved before it existed still load

    # A checkpoint may only be resumed by a run that would have produced it.
    RESUME_KEYS = (
        "model_path", "method", "num_train_epochs", "max_steps", "per_device_train_batch_size",
        "gradient_accumulation_steps", "learning_rate", "weight_decay", "warmup_ratio", "lr_scheduler_type",
        "model_max_length", "packing", "seed", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
    )  # fmt: skip

    def validate(self) -> None:
        """Refuse bad options at once: cheap checks before torch, the model or the data load."""
        for name, (low, inclusive) in BOUNDS.items():
            value = getattr(self, name)
            if not math.isfinite(value) or value < low or (value == low and not inclusive):
                relation = "at least" if inclusive else "more than"
                raise VicunaflowError(f"--{name.replace('_', '-')} must be {relation} {low}, not {value}")
        if self.max_steps == 0:
            raise VicunaflowError("--max-steps must be a number of steps, or -1 to train --num-train-epochs")
        if self.num_train_epochs == 0 and self.max_steps < 1:
            raise VicunaflowError("--num-train-epochs must be > 0 (or give --max-steps)")
        for name in ("warmup_ratio", "lora_dropout"):  # fractions
            if getattr(self, name) >= 1:
                raise VicunaflowError(f"--{name.replace('_', '-')} must be below 1, not {getattr(self, name)}")
        if not self.lora_target_modules:
            raise VicunaflowError(f"--lora-target-modules names no layer; e.g. {list(LORA_TARGETS)}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise VicunaflowError("--save-total-limit must be at least 1 (or null to keep all)")
        unknown = set(self.fsdp.split()) - {"full_shard", "shard_grad_op", "auto_wrap", "offload"}
        if unknown:
            raise VicunaflowError(
                f"--fsdp {self.fsdp!r}: unknown option(s) {sorted(unknown)}; use e.g. 'full_shard auto_wrap'"
            )
        if not Path(self.model_path, "config.json").is_file():
            raise VicunaflowError(f"{self.model_path}: not a Hugging Face model directory (no config.json)")
        if not Path(self.data).exists():
            raise VicunaflowError(f"{self.data}: no such data file or tokenised dataset directory")
        if Path(self.data).is_dir():
            from vicunaflow.data import read_tokenized_meta

            read_tokenized_meta(Path(self.data))  # an empty dataset fails now, not in the first step

    def inputs(self) -> list[str]:
        """What the run reads, or deletes when done (checkpoint_dir): the output may not be, hold or lie in them."""
        return [self.model_path, self.data, self.checkpoint_dir]

    def to_argv(self) -> list[str]:
        """Command-line arguments that recreate this config (for re-executing under torchrun)."""
        argv = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            text = json.dumps(value) if isinstance(value, (list, bool)) or value is None else str(value)
            argv.append(f"--{field.name}={text}")
        return argv

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Runtime:
    """What this process is: read from the environment once."""

    rank: int
    local_rank: int
    world_size: int
    device: object  # torch.device
    dtype: object  # compute dtype: torch.bfloat16 or torch.float32

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def main(config: TrainConfig) -> Path:
    import torch
    import torch.distributed as dist

    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger("vicunaflow").setLevel(logging.WARNING)  # one voice: rank 0 reports progress
    log.info("finetune: %s", json.dumps(config.as_dict()))
    runtime = init_distributed(config)
    try:
        return fit(config, runtime)
    except torch.OutOfMemoryError as err:
        raise VicunaflowError(
            f"out of memory on {runtime.device} ({str(err).splitlines()[0]}); lower --per-device-train-batch-size "
            "(and raise --gradient-accumulation-steps to keep the batch), keep --gradient-checkpointing on, lower "
            "--model-max-length, use more GPUs, or fine-tune with --method lora"
        ) from err
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(config: TrainConfig) -> Runtime:
    """Join the process group (gloo on CPU, NCCL on CUDA) and resolve precision for this machine."""
    import torch
    import torch.distributed as dist

    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if "MASTER_ADDR" not in os.environ:  # a single process started without torchrun
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("cuda:nccl,cpu:gloo", rank=rank, world_size=world_size, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    dtype = _resolve_precision(config, device)
    return Runtime(rank=rank, local_rank=local_rank, world_size=world_size, device=device, dtype=dtype)


def _resolve_precision(config: TrainConfig, device) -> object:
    """bf16/tf32/flash attention where the hardware has them; otherwise an explicit, logged fallback."""
    import torch

    cuda = device.type == "cuda"
    capability = torch.cuda.get_device_capability(device) if cuda else (0, 0)
    if config.method == "qlora" and not cuda:
        raise VicunaflowError("--method qlora needs a CUDA GPU (bitsandbytes 4-bit); use --method lora on this machine")
    dtype = torch.float32
    if config.bf16 and cuda and torch.cuda.is_bf16_supported():
        dtype = torch.bfloat16
    elif config.bf16:
        log.warning("bf16 requested, but %s has no bfloat16 support; training in float32", device)
    if config.tf32 and capability >= (8, 0):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif config.tf32:
        log.warning("tf32 requested, but it needs an Ampere or newer GPU (found %s); ignored", device)
    if cuda and capability >= (8, 0):
        log.info("attention: PyTorch SDPA (flash kernels on this %s)", torch.cuda.get_device_name(device))
    else:
        log.info("attention: PyTorch SDPA without flash kernels on %s (math or memory-efficient kernel)", device)
    return dtype


# --- the training loop --------------------------------------------------------------------------


def fit(config: TrainConfig, runtime: Runtime) -> Path:
    import torch
    import torch.distributed as dist

    run_dir = Path(config.checkpoint_dir)
    if runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    random.seed(config.seed + runtime.rank)
    torch.manual_seed(config.seed + runtime.rank)  # dropout (LoRA) differs per rank, repeatably
    dataset = TrainingData(config, runtime)
    model = build_model(config, runtime)
    accumulation = Accumulation.plan(model, config, runtime)
    optimizer = build_optimizer(model, config)
    plan = Plan.make(len(dataset), config, runtime.world_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, plan.total_steps))
    log.info(
        "%d sequences, %d processes x %d per micro-batch x %d accumulation: %d steps per epoch, %d steps",
        len(dataset), runtime.world_size, config.per_device_train_batch_size, config.gradient_accumulation_steps,
        plan.steps_per_epoch, plan.total_steps,
    )  # fmt: skip

    start_step = resume_if_possible(run_dir, config, model, optimizer, scheduler, runtime)
    logger = RunLogger(run_dir, config, runtime, start_step)
    model.train()
    step_started = time.perf_counter()
    window_loss, window_tokens, window_inputs = 0.0, 0, 0
    for step in range(start_step, plan.total_steps):
        micro_batches = [dataset.collate(indices) for indices in plan.micro_batches(step, runtime.rank)]
        loss_sum, n_tokens, n_inputs = train_step(model, micro_batches, runtime, accumulation)
        grad_norm = _clip_gradients(model, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window_loss, window_tokens, window_inputs = (
            window_loss + loss_sum,
            window_tokens + n_tokens,
            window_inputs + n_inputs,
        )
        done = step + 1
        if done % config.logging_steps == 0 or done == plan.total_steps:
            elapsed = time.perf_counter() - step_started
            logger.log(
                step=done,
                epoch=round(done / plan.steps_per_epoch, 4),
                loss=window_loss / max(window_tokens, 1),
                learning_rate=scheduler.get_last_lr()[0],
                grad_norm=grad_norm,
                trained_tokens=window_tokens,
                input_tokens=window_inputs,
                seconds=round(elapsed, 4),
            )
            window_loss, window_tokens, window_inputs, step_started = 0.0, 0, 0, time.perf_counter()
        if plan.is_checkpoint_step(done, config):
            save_checkpoint(run_dir, done, config, model, optimizer, scheduler, runtime)
            step_started = time.perf_counter()  # saving is not training time
    logger.close()
    write_output(config, model, runtime, run_dir)
    dist.barrier()
    if runtime.is_main and not config.keep_checkpoints:
        shutil.rmtree(run_dir, ignore_errors=True)
        _remove_if_empty(run_dir.parent)
    return Path(config.output_dir)


def train_step(
    model, micro_batches: Sequence[dict], runtime: Runtime, accumulation: Accumulation | None = None
) -> tuple[float, int, int]:
    """Forward and backward over the micro-batches of one optimizer step.

    The loss is the mean over every trained token of the step on all processes (not a mean of
    per-batch means), so padding, packing and accumulation do not change the objective. FSDP
    averages gradients over processes, hence the factor world_size.
    Returns (sum of token losses, trained tokens, input tokens) over all processes.
    """
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    local_tokens = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in micro_batches)
    local_inputs = sum(batch["num_tokens"] for batch in micro_batches)
    counts = torch.tensor([local_tokens, local_inputs], dtype=torch.float64)
    dist.all_reduce(counts)
    n_tokens, n_inputs = int(counts[0]), int(counts[1])
    loss_sum = torch.zeros((), dtype=torch.float32, device=runtime.device)  # summed on device: no sync per micro-batch
    for index, batch in enumerate(micro_batches):
        if accumulation is not None:
            accumulation.before_micro_batch(model, last=index == len(micro_batches) - 1)
        batch = {k: v.to(runtime.device, non_blocking=True) for k, v in batch.items() if k != "num_tokens"}
        labels = batch.pop("labels")
        with _autocast(model, runtime):
            logits = model(**batch, use_cache=False).logits  # (B, T, V)
        # Position t predicts token t + 1.
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
        )
        (loss * runtime.world_size / max(n_tokens, 1)).backward()
        loss_sum += loss.detach()
    dist.all_reduce(loss_sum)
    return float(loss_sum), n_tokens, n_inputs


@dataclass
class Accumulation:
    """How FSDP treats the micro-batches of one optimizer step.

    By default FSDP reduce-scatters the gradients after every micro-batch and gathers (and casts to
    bf16) each layer's weights twice per micro-batch (forward, backward). With `sync_once`, the
    non-final micro-batches keep full-size float32 gradients locally and the gathered bf16 weights stay
    in place until the last backward, so a step gathers the weights once and reduce-scatters once:
    1/accumulation of the traffic, for ~6 bytes per parameter of extra GPU memory. Same sum, so the
    same update up to rounding.
    """

    sync_once: bool

    @classmethod
    def plan(cls, model, config: TrainConfig, runtime: Runtime) -> Accumulation | None:
        """Decide once per run (--gradient-sync); None when there is nothing to choose (not sharded, no accumulation)."""
        import torch
        from torch.distributed.fsdp import FSDPModule

        options = config.fsdp.split()
        if not isinstance(model, FSDPModule) or config.gradient_accumulation_steps == 1 or "offload" in options:
            return None
        sync_once = config.gradient_sync == "step"
        if config.gradient_sync == "auto" and runtime.device.type == "cuda":
            need = _accumulation_memory_estimate(model, config, runtime.world_size)
            budget = 0.85 * torch.cuda.get_device_properties(runtime.device).total_memory
            sync_once = need <= budget
            log.info(
                "gradient sync: %s (estimated %.1f of %.1f GiB usable with per-step sync)",
                "once per step" if sync_once else "every micro-batch", need / 2**30, budget / 2**30,
            )  # fmt: skip
        if sync_once:
            for layer in _decoder_layers(model):
                if isinstance(layer, FSDPModule):
                    layer.set_reshard_after_forward(False)  # gathered from the first forward to the last backward
        return cls(sync_once=sync_once)

    def before_micro_batch(self, model, last: bool) -> None:
        if self.sync_once:
            model.set_requires_gradient_sync(last)
            model.set_reshard_after_backward(last)  # the last backward frees the gathered weights


def _accumulation_memory_estimate(model, config: TrainConfig, world_size: int) -> int:
    """Bytes per GPU of a step that reduces gradients once: shards, gathered weights and gradients, activations."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)  # DTensor.numel() is the full size
    trainable = sum(p.numel() for p in params if p.requires_grad)
    sharded = (total * 4 + trainable * 12) // world_size  # float32 weights; gradients and two AdamW moments
    gathered = total * 2 + trainable * 4  # bf16 weights kept gathered, float32 gradients accumulated in full
    shape = model.config
    hidden, ffn, n_layers = shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers
    tokens = config.per_device_train_batch_size * config.model_max_length
    per_layer = (16 * hidden + 4 * ffn) * 2  # bytes per token a decoder layer keeps for backward (bf16, SDPA)
    kept = hidden * 2 * n_layers + per_layer if config.gradient_checkpointing else per_layer * n_layers
    return sharded + gathered + tokens * (kept + shape.vocab_size * 12)  # + logits, float32 logits, their grads


def _autocast(model, runtime: Runtime):
    """bf16 compute for an unsharded model (FSDP2's MixedPrecisionPolicy does it for sharded ones)."""
    import torch
    from torch.distributed.fsdp import FSDPModule

    enabled = runtime.dtype == torch.bfloat16 and not isinstance(model, FSDPModule)
    return torch.autocast(runtime.device.type, dtype=torch.bfloat16, enabled=enabled)


def _clip_gradients(model, max_norm: float) -> float:
    import torch

    parameters = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm > 0 else float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # DTensor under FSDP2
    return float(norm)


@dataclass
class Plan:
    """Which sequences each process sees at each step: a pure function of (seed, epoch, step).

    Like DistributedSampler: each epoch a seeded permutation of all sequences, padded by wrapping
    around to a multiple of the number of processes, process r taking every world_size-th one.
    The data position of a resumed run therefore follows from its step alone.
    """

    n_sequences: int
    world_size: int
    batch_size: int
    accumulation: int
    seed: int
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def make(cls, n_sequences: int, config: TrainConfig, world_size: int) -> Plan:
        per_process = math.ceil(n_sequences / world_size)
        batches_per_epoch = math.ceil(per_process / config.per_device_train_batch_size)
        steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
        total = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * steps_per_epoch)
        return cls(
            n_sequences, world_size, config.per_device_train_batch_size, config.gradient_accumulation_steps,
            config.seed, steps_per_epoch, total,
        )  # fmt: skip

    def is_checkpoint_step(self, done: int, config: TrainConfig) -> bool:
        if done >= self.total_steps:
            return False  # the final state goes to the output instead
        if config.save_strategy == "steps":
            return done % config.save_steps == 0
        return config.save_strategy == "epoch" and done % self.steps_per_epoch == 0

    def epoch_order(self, epoch: int, rank: int) -> list[int]:
        import torch

        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.n_sequences, generator=generator).tolist()
        per_process = math.ceil(self.n_sequences / self.world_size)
        order += order[: per_process * self.world_size - len(order)]
        return order[rank :: self.world_size]

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch, rank)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        first = step_in_epoch * self.accumulation
        return batches[first : first + self.accumulation]


def lr_lambda(config: TrainConfig, total_steps: int):
    """Learning-rate multiplier per step, as the HF Trainer's schedulers (warm-up steps rounded up)."""
    warmup = math.ceil(config.warmup_ratio * total_steps)

    def multiplier(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if config.lr_scheduler_type == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if config.lr_scheduler_type == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return multiplier


# --- data -------------------------------------------------------------------------------------------


class TrainingData:
    """Training sequences: tokenised conversations, one per sequence or packed several per sequence."""

    def __init__(self, config: TrainConfig, runtime: Runtime) -> None:
        from vicunaflow import data as conversations

        self.config = config
        self.max_length = config.model_max_length
        self.tokenizer = conversations.load_tokenizer(Path(config.model_path))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        path = Path(config.data)
        self.conversations = None
        if path.is_dir():
            samples, meta = conversations.load_tokenized(path)
            if meta["model_max_length"] < self.max_length:
                log.warning(
                    "%s was tokenised with model_max_length %d < %d: its samples stay that short",
                    path, meta["model_max_length"], self.max_length,
                )  # fmt: skip
            if meta["model_max_length"] > self.max_length:
                samples = [
                    conversations.Sample(s.id, s.input_ids[: self.max_length], s.labels[: self.max_length])
                    for s in samples
                ]
            if meta["tokenizer_sha256"].get("tokenizer.json") not in (
                None,
                _sha256(Path(config.model_path, "tokenizer.json")),
            ):
                raise VicunaflowError(
                    f"{path}: tokenised with another tokenizer than {config.model_path}'s; re-run `vicunaflow data tokenize`"
                )
            self.samples = samples
        elif config.lazy_preprocess and not config.packing:
            self.conversations = conversations.load_conversations(path)  # validates every record now
            self.samples = [None] * len(self.conversations)
        else:
            self.samples = conversations.encode_all(
                conversations.load_conversations(path), self.tokenizer, self.max_length
            )
        self.sequences = (
            pack(self.samples, self.max_length) if config.packing else [[i] for i in range(len(self.samples))]
        )
        if config.packing and runtime.is_main:
            log.info(
                "packed %d conversations into %d sequences of up to %d tokens",
                len(self.samples),
                len(self.sequences),
                self.max_length,
            )

    def __len__(self) -> int:
        return len(self.sequences)

    def sample(self, index: int):
        if self.samples[index] is None:
            from vicunaflow import data as conversations

            self.samples[index] = conversations.encode(self.conversations[index], self.tokenizer, self.max_length)
        return self.samples[index]

    def collate(self, indices: Sequence[int]) -> dict:
        """Right-padded tensors for some sequences; packed ones get position_ids restarting per sample.

        With packing there is no attention_mask: transformers then derives a block-diagonal causal
        mask from the restarting position_ids, so packed conversations never see each other.
        """
        import torch

        rows = []
        for sequence in indices:
            ids, labels, positions = [], [], []
            for sample_index in self.sequences[sequence]:
                sample = self.sample(sample_index)
                ids += sample.input_ids
                labels += sample.labels
                positions += range(len(sample.input_ids))
            rows.append((ids, labels, positions))
        width = max(len(ids) for ids, _, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
        for row, (ids, row_labels, positions) in enumerate(rows):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(row_labels)
            attention_mask[row, : len(ids)] = 1
            position_ids[row, : len(ids)] = torch.tensor(positions)
            position_ids[row, len(ids) :] = torch.arange(width - len(ids))  # padding: a sequence of its own
        num_tokens = sum(len(ids) for ids, _, _ in rows)  # without padding, for tokens/s
        if self.config.packing:
            return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "num_tokens": num_tokens}
        if num_tokens == input_ids.numel():
            # No padding: no mask at all, so SDPA runs its causal flash kernel without transformers
            # first checking the mask on the GPU (a host sync per micro-batch).
            return {"input_ids": input_ids, "labels": labels, "num_tokens": num_tokens}
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "num_tokens": num_tokens}


def pack(samples: Sequence, max_length: int) -> list[list[int]]:
    """Group sample indices into sequences of at most max_length tokens, first fit in sample order.

    Deterministic (no shuffling here: the epoch order shuffles the packed sequences).
    """
    sequences: list[list[int]] = []
    room: list[int] = []
    for index, sample in enumerate(samples):
        length = len(sample.input_ids)
        for s, free in enumerate(room):
            if length <= free:
                sequences[s].append(index)
                room[s] -= length
                break
        else:
            sequences.append([index])
            room.append(max_length - length)
    return sequences


# --- model, optimizer ---------------------------------------------------------------------------


def build_model(config: TrainConfig, runtime: Runtime):
    """Load the model (float32 master weights), add LoRA if asked, and shard it with FSDP2.

    With several processes only rank 0 reads the weights; the others build the model on the meta
    device (no memory) and receive their shards from rank 0 once it is sharded. So a node needs
    host memory for one float32 copy of the model, not one per GPU.
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    if config.method == "qlora" and runtime.world_size > 1:
        raise VicunaflowError("--method qlora runs on one GPU; start it without torchrun or use --method lora")
    options = set(config.fsdp.split())
    sharded = runtime.world_size > 1 or "offload" in options
    on_meta = sharded and not runtime.is_main and "offload" not in options
    load_kwargs: dict = {"dtype": torch.float32, "attn_implementation": "sdpa"}
    if on_meta:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config.model_path), **load_kwargs)
    else:
        if config.method == "qlora":
            load_kwargs |= _qlora_kwargs(runtime)
        model = AutoModelForCausalLM.from_pretrained(config.model_path, **load_kwargs)
    model.config.use_cache = False
    if config.gradient_checkpointing:
        _enable_checkpointing(model)
    if config.compile:
        for layer in _decoder_layers(model):
            # forward only: FSDP's hooks and the checkpoint wrapper stay in eager __call__ around it;
            # every layer runs the same code, so the graph compiled for the first serves them all.
            layer.forward = torch.compile(layer.forward)
    if config.method in ("lora", "qlora"):
        model = _add_lora(model, config)
    else:
        model.requires_grad_(True)
    if not sharded:
        # Nothing to shard: a plain module is faster (no gathers); bf16 then comes from autocast.
        return model.to(runtime.device)

    full_state = model.state_dict() if runtime.is_main else {}  # rank 0: the loaded weights (+ LoRA init)
    mixed = MixedPrecisionPolicy(param_dtype=runtime.dtype, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if "offload" in options else OffloadPolicy()
    reshard = "shard_grad_op" not in options
    # One FSDP unit per decoder layer (FastChat's auto_wrap on LlamaDecoderLayer), then the rest.
    for layer in _decoder_layers(model):
        fully_shard(layer, mp_policy=mixed, offload_policy=offload, reshard_after_forward=reshard)
    fully_shard(model, mp_policy=mixed, offload_policy=offload, reshard_after_forward=reshard)
    if "offload" in options:
        return model
    if on_meta:
        model.to_empty(device=runtime.device)
    model.to(runtime.device)
    options_broadcast = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    set_model_state_dict(model, full_state, options=options_broadcast)  # each rank keeps its shard
    del full_state
    for buffer in model.buffers():  # rotary frequencies: not in the state dict, computed on rank 0 only
        dist.broadcast(buffer, src=0)
    return model


def _enable_checkpointing(model) -> None:
    """Recompute each decoder layer in backward (non-reentrant): transformers >= 5.20 renamed the method."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _decoder_layers(model) -> list:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    layers = [m for m in model.modules() if isinstance(m, LlamaDecoderLayer)]
    if not layers:
        raise VicunaflowError(
            f"{type(model).__name__}: no LlamaDecoderLayer found; only LLaMA-architecture models are supported"
        )
    return layers


def _add_lora(model, config: TrainConfig):
    import torch
    from peft import LoraConfig, get_peft_model

    if config.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    torch.manual_seed(config.seed)  # LoRA's A matrices are random: same seed, same start
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if config.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed layers still need a grad path
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA: %d trainable parameters of %d", trainable, sum(p.numel() for p in model.parameters()))
    return model


def _qlora_kwargs(runtime: Runtime) -> dict:
    import torch

    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as err:
        raise VicunaflowError("--method qlora needs bitsandbytes (pip install bitsandbytes) and a CUDA GPU") from err
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=runtime.dtype if runtime.dtype == torch.bfloat16 else torch.float16,
    )
    return {"quantization_config": quantization, "device_map": {"": runtime.device.index}}


def build_optimizer(model, config: TrainConfig):
    """AdamW with weight decay on matrices only (norm gains and biases are not decayed)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    fused = params[0].device.type == "cuda"  # one kernel for all parameters on GPUs
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8, fused=fused
    )


# --- logging ------------------------------------------------------------------------------------


class RunLogger:
    """Rank 0's record of the run: the console, trainer_log.jsonl and tensorboard, resumable.

    Both files live in the run's checkpoint directory while training; a resumed run first drops
    the entries a killed run wrote after its last checkpoint, so the files read as one clean run.
    """

    def __init__(self, run_dir: Path, config: TrainConfig, runtime: Runtime, start_step: int) -> None:
        self.enabled = runtime.is_main
        self.writer = None
        if not self.enabled:
            return
        self.path = run_dir / TRAINER_LOG
        kept = []
        if self.path.exists():
            kept = [
                line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= start_step
            ]
        self.path.write_text("".join(line + "\n" for line in kept))
        if config.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events a killed run logged after the checkpoint we resumed from.
            self.writer = SummaryWriter(log_dir=str(run_dir / "runs"), purge_step=start_step or None)
            if not start_step:
                self.writer.add_text("hyperparameters", "```\n" + json.dumps(config.as_dict(), indent=1) + "\n```")

    def log(self, **entry) -> None:
        if not self.enabled:
            return
        log.info(
            "step %d  epoch %.2f  loss %.4f  lr %.3g  grad_norm %.3f  %.0f tokens/s",
            entry["step"], entry["epoch"], entry["loss"], entry["learning_rate"], entry["grad_norm"],
            entry["input_tokens"] / max(entry["seconds"], 1e-9),
        )  # fmt: skip
        with self.path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        if self.writer is not None:
            for key in ("loss", "learning_rate", "grad_norm", "epoch"):
                self.writer.add_scalar(f"train/{key}", entry[key], entry["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# --- the output ---------------------------------------------------------------------------------


def write_output(config: TrainConfig, model, runtime: Runtime, run_dir: Path) -> None:
    """Gather the full weights to rank 0 and write the Hugging Face model directory atomically."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    lora = config.method != "full"
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=lora)
    state = get_model_state_dict(model, options=options)  # collective: every process takes part
    if not runtime.is_main:
        return
    from transformers import AutoConfig

    from vicunaflow.outputs import atomic_output_dir, write_manifest

    base_config = AutoConfig.from_pretrained(config.model_path)
    dtype = _save_dtype(config, base_config)
    with atomic_output_dir(config.output_dir, inputs=config.inputs(), overwrite=config.overwrite) as out:
        if lora:
            adapter_dir = out / "adapter"
            _save_adapter(model, state, adapter_dir)
            state = _merged_state(config, adapter_dir)
        state = {name: tensor.to(dtype) for name, tensor in state.items()}
        _save_model(state, base_config, dtype, config.model_path, out)
        for name in (TRAINER_LOG, "runs"):
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, out / name)
            elif (run_dir / name).is_dir():
                shutil.copytree(run_dir / name, out / name)
        (out / HYPERPARAMETERS).write_text(json.dumps(config.as_dict(), indent=1) + "\n")
        inputs = [Path(config.model_path, "config.json")]
        inputs += [p for p in (Path(config.data), Path(config.data, "meta.json")) if p.is_file()]
        if Path(config.model_path, "vicunaflow.json").is_file():
            inputs.append(Path(config.model_path, "vicunaflow.json"))
        write_manifest(out, inputs=inputs, kind=f"finetune-{config.method}", world_size=runtime.world_size)
    log.info("wrote %s", config.output_dir)


def _save_dtype(config: TrainConfig, base_config):
    import torch

    if config.save_dtype != "auto":
        return getattr(torch, config.save_dtype)
    dtype = getattr(base_config, "dtype", None) or getattr(base_config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _save_model(state: dict, base_config, dtype, model_path: str, out: Path) -> None:
    """safetensors shards + index, config, generation config and the base's tokenizer files."""
    from huggingface_hub import save_torch_state_dict

    save_torch_state_dict(state, out, max_shard_size="5GB", metadata={"format": "pt"})
    for weights in out.glob("model*.safetensors*"):
        weights.chmod(0o644)  # written through a private temporary file; outputs are meant to be shared
    base_config.dtype = dtype
    base_config.use_cache = True
    base_config.save_pretrained(out)
    copy_tokenizer_and_generation_files(Path(model_path), out)


def copy_tokenizer_and_generation_files(model_path: Path, out: Path) -> None:
    """Copy the base's tokenizer files as they are; make sure the Vicuna chat template is in them."""
    from vicunaflow import template

    names = (
        "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
        "chat_template.jinja", "generation_config.json",
    )  # fmt: skip
    for name in names:
        if (model_path / name).is_file():
            shutil.copy2(model_path / name, out / name)
    config_path = out / "tokenizer_config.json"
    if config_path.is_file() and not (out / "chat_template.jinja").is_file():
        tokenizer_config = json.loads(config_path.read_text())
        if not tokenizer_config.get("chat_template"):
            tokenizer_config["chat_template"] = template.CHAT_TEMPLATE
            config_path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")


def _save_adapter(model, state: dict, adapter_dir: Path) -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    adapter_dir.mkdir()
    adapter_state = get_peft_model_state_dict(model, state_dict=state)
    save_file({k: v.contiguous() for k, v in adapter_state.items()}, str(adapter_dir / "adapter_model.safetensors"))
    model.peft_config["default"].save_pretrained(str(adapter_dir))


def _merged_state(config: TrainConfig, adapter_dir: Path) -> dict:
    """The base weights with the adapter merged in, computed by peft on a fresh float32 copy (rank 0, CPU)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(config.model_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return {name: tensor.detach() for name, tensor in merged.state_dict().items()}


# --- small helpers ------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sha256(path: Path) -> str | None:
    from vicunaflow.outputs import sha256_file

    return sha256_file(path) if path.is_file() else None


def _remove_if_empty(path: Path) -> None:
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()

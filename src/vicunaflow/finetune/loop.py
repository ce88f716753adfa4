"""The run itself: join the process group, build data and model, train step by step, checkpoint, write the output.

`main()` is what every process runs (setup() in __init__ starts them). One optimizer step is
`train_step()` over its micro-batches; `Accumulation` decides how FSDP syncs gradients within a step.
"""

from __future__ import annotations

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

from vicunaflow import VicunaflowError
from vicunaflow.finetune.config import TENSORBOARD_DIR, TRAINER_LOG, Runtime, TrainConfig
from vicunaflow.finetune.data import Plan, TrainingData
from vicunaflow.finetune.model import build_model, build_optimizer, decoder_layers
from vicunaflow.finetune.output import RunLogger, remove_if_empty, write_output
from vicunaflow.finetune.state import list_checkpoints, resume_if_possible, save_checkpoint

log = logging.getLogger(__name__)

CHECKPOINT_MARKER = ".vicunaflow-checkpoints"  # written into a checkpoint folder this run made: it may remove it


def main(config: TrainConfig) -> Path:
    import torch
    import torch.distributed as dist

    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger("vicunaflow").setLevel(logging.WARNING)  # one voice: rank 0 reports progress
    log.info("finetune: %s", json.dumps(config.as_dict()))
    if int(os.environ.get("RANK", "0")) == 0:
        for note in config.warnings():
            log.warning("%s", note)
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
    if "offload" in config.fsdp.split() and not cuda:  # FSDP pins the CPU shards for a GPU: a traceback on CPU
        raise VicunaflowError(
            f"--fsdp {config.fsdp!r}: offload keeps a GPU's shards in CPU memory; on {device} the weights are there "
            "already: leave offload out"
        )
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


def fit(config: TrainConfig, runtime: Runtime) -> Path:
    run_dir = Path(config.checkpoint_dir)
    if runtime.is_main:
        claim_checkpoint_dir(run_dir)
    try:
        return train(config, runtime, run_dir)
    except BaseException:  # Ctrl-C and SIGTERM too
        if runtime.is_main:
            remove_if_nothing_to_resume(run_dir)
        raise


def train(config: TrainConfig, runtime: Runtime, run_dir: Path) -> Path:
    import torch
    import torch.distributed as dist

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
        if (run_dir / CHECKPOINT_MARKER).is_file():
            shutil.rmtree(run_dir, ignore_errors=True)
            remove_if_empty(run_dir.parent)
        else:
            log.warning("kept %s: it held other files before this run (no %s)", run_dir, CHECKPOINT_MARKER)
    return Path(config.output_dir)


def claim_checkpoint_dir(run_dir: Path) -> None:
    """Mark a checkpoint folder this run creates (or finds empty) as vicunaflow's: only such a folder is
    removed when training ends. One that holds other files is used, never removed."""
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / CHECKPOINT_MARKER).is_file():
        log.warning("%s already holds files; it will be kept after training", run_dir)
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CHECKPOINT_MARKER).write_text("checkpoints of a vicunaflow finetune run; removed when it ends\n")


def remove_if_nothing_to_resume(run_dir: Path) -> None:
    """After a failed run, remove the checkpoint folder when it is this run's (its marker) and holds neither a
    checkpoint nor a logged step: a failure before training leaves no folder that looks like a run to resume.
    One holding a checkpoint is kept (a rerun resumes from it), and so is one whose trainer log records steps:
    the record of how a run went before it failed."""
    if not (run_dir / CHECKPOINT_MARKER).is_file():
        return  # not ours, or it held other files before this run
    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        log.info("keeping %s: running the same command again resumes from %s", run_dir, checkpoints[-1].name)
        return
    log_file = run_dir / TRAINER_LOG
    if log_file.is_file() and log_file.stat().st_size:
        log.info(
            "keeping %s: no checkpoint to resume from, but %s records the steps before the failure",
            run_dir,
            TRAINER_LOG,
        )
        return
    ours = {CHECKPOINT_MARKER, TRAINER_LOG, TENSORBOARD_DIR}
    if any(entry.name not in ours and not entry.name.startswith(".tmp-checkpoint-") for entry in run_dir.iterdir()):
        return
    log.info("removing %s: it holds no checkpoint to resume from", run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    remove_if_empty(run_dir.parent)


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
            for layer in decoder_layers(model):
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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

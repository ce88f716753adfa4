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
Face model directory, atomically (it appears complete or not at all); then the checkpoints go. A run that
fails before its first checkpoint removes the checkpoint folder it made: nothing there to resume.

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

import json
from pathlib import Path

from vicunaflow import VicunaflowError
from vicunaflow.finetune.config import TrainConfig


def setup(*, config: TrainConfig, nproc_per_node: int | None = None) -> Path | None:
    """Fine-tune a Hugging Face LLaMA model on Vicuna v1.1 conversations (loss on the replies only).

    Defaults are FastChat's Vicuna v1.1 recipe (train_mem.py: FSDP, bf16, 2048 tokens, lr 2e-5, cosine).
    Options come as flags (`--learning-rate 1e-4`) or as the keys of a `--config FILE` (YAML or JSON;
    a run's training_args.json is one); flags after `--config` win.

    Arguments:
        config: the run's options, each a flag of its own (vicunaflow.finetune.config.TrainConfig).
        nproc_per_node: processes per node when not started by torchrun; default: the visible GPUs, or 1 on CPU.
    """
    from vicunaflow import launch
    from vicunaflow.outputs import check_output_dir

    config.validate()
    if nproc_per_node is not None and nproc_per_node < 1:
        raise VicunaflowError(f"--nproc-per-node must be at least 1, not {nproc_per_node}")
    output_dir = Path(config.output_dir)
    check_output_dir(output_dir, inputs=config.inputs(), overwrite=config.overwrite)  # before any process starts
    from vicunaflow.engine.build import check_folder

    # Its headers only, before any process starts: transformers would start a layer the weights lack at random
    # (and train it as if it were the model's), and a shard cut short would fail in it as a raw traceback.
    check_folder(Path(config.model_path))
    if not launch.is_launched():
        procs = nproc_per_node or launch.default_nproc_per_node()
        # The processes get the resolved options as one --config (a JSON text, which jsonargparse reads like a file).
        if launch.relaunch(["finetune", "--config", json.dumps(config.as_dict())], procs):
            return output_dir
    from vicunaflow.finetune.loop import main  # torch from here on

    return main(config)

"""What a fine-tuning run is: its resolved options (TrainConfig), this process (Runtime), the names of its files.

Imports no torch and nothing else of the package: `vicunaflow finetune --help`, the workflow and
report.py read it cheaply, and every other module of vicunaflow.finetune builds on it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vicunaflow import VicunaflowError

TRAINER_LOG = "trainer_log.jsonl"  # one JSON line per logged step (report.py draws the loss from it)
TENSORBOARD_DIR = "runs"  # tensorboard events, beside the trainer log
HYPERPARAMETERS = "training_args.json"  # the resolved arguments, in each checkpoint and in the output
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

PATH_FIELDS = ("model_path", "data", "output_dir", "checkpoint_dir")


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
    """The options of a fine-tuning run: the one definition of their names, types, defaults and help.

    `vicunaflow finetune` takes them as flags (each field is one: `--learning-rate`) or from a `--config`
    file of these keys; the workflow's `finetune.defaults` are these defaults (config.schema.yaml, kept
    equal by a test). The resolved options are logged first and saved with each checkpoint and the
    output (training_args.json, itself a valid `--config`). Defaults are FastChat's Vicuna v1.1 recipe
    (train_mem.py: FSDP, bf16, 2048 tokens, lr 2e-5, cosine).

    Arguments:
        model_path: Hugging Face model directory to start from (e.g. vicuna-7b-all-v1.1, llama-7b-hf).
        data: conversations (JSON list or JSONL, ShareGPT records) or a directory from `vicunaflow data tokenize`.
        output_dir: the fine-tuned Hugging Face model directory to write (LoRA: plus `adapter/`).
        checkpoint_dir: where resumable checkpoints go; default: <output_dir parent>/.checkpoints/<output_dir name>.
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
        keep_checkpoints: keep the checkpoint directory after the output is written (only one this run created is ever removed).
        overwrite: replace an output_dir that exists but is not a complete vicunaflow output (default: refuse).
    """

    # Paths are kept as text: they are compared with those a checkpoint saved (RESUME_KEYS) and written as JSON.
    model_path: str
    data: str
    output_dir: str
    checkpoint_dir: str | None = None  # None: resolved from output_dir when the config is made
    method: Literal["full", "lora", "qlora"] = "full"
    num_train_epochs: float = 2.0
    max_steps: int = -1
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 8
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = 1.0
    logging_steps: int = 1
    save_strategy: Literal["steps", "epoch", "no"] = "steps"
    save_steps: int = 300
    save_total_limit: int | None = 10
    model_max_length: int = 2048
    gradient_checkpointing: bool = True
    gradient_sync: Literal["auto", "micro_batch", "step"] = "auto"
    compile: bool = False
    bf16: bool = True
    tf32: bool = True
    report_to: Literal["tensorboard", "none"] = "tensorboard"
    fsdp: str = "full_shard auto_wrap"
    lazy_preprocess: bool = True
    packing: bool = False
    seed: int = 42
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = dataclasses.field(default_factory=lambda: list(LORA_TARGETS))
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    keep_checkpoints: bool = False
    overwrite: bool = False  # last, and with a default: checkpoints saved before it existed still load

    # A checkpoint may only be resumed by a run that would have produced it.
    RESUME_KEYS = (
        "model_path", "data", "method", "num_train_epochs", "max_steps", "per_device_train_batch_size",
        "gradient_accumulation_steps", "learning_rate", "weight_decay", "warmup_ratio", "lr_scheduler_type",
        "model_max_length", "packing", "seed", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
    )  # fmt: skip

    def __post_init__(self) -> None:
        for name in PATH_FIELDS:  # a caller's Path objects, as text
            if getattr(self, name) is not None:
                setattr(self, name, str(getattr(self, name)))
        if self.checkpoint_dir is None:
            self.checkpoint_dir = str(default_checkpoint_dir(Path(self.output_dir)))
        self.lora_target_modules = list(self.lora_target_modules)

    def validate(self) -> None:
        """Refuse bad options at once: cheap checks before torch, the model or the data load."""
        for name in PATH_FIELDS:  # text, not Path, so the CLI's check of path flags does not see them
            value, flag = getattr(self, name), f"--{name.replace('_', '-')}"
            if value is not None and not value.strip():
                raise VicunaflowError(f"{flag} is empty; give a path (was a shell variable unset?)")
            if value == "-":
                raise VicunaflowError(f"{flag} -: vicunaflow reads and writes files by path, not stdin or stdout")
        for name, (low, inclusive) in BOUNDS.items():
            value = getattr(self, name)
            if not math.isfinite(value) or value < low or (value == low and not inclusive):
                relation = "at least" if inclusive else "more than"
                raise VicunaflowError(f"--{name.replace('_', '-')} must be {relation} {low}, not {value}")
        if not -(2**63) <= self.seed < 2**63:  # torch's generators take 64 bits: a traceback in every process
            raise VicunaflowError(f"--seed must be a 64-bit integer (e.g. 42), not {self.seed}")
        if self.max_steps == 0:
            raise VicunaflowError("--max-steps must be a number of steps, or -1 to train --num-train-epochs")
        if self.num_train_epochs == 0 and self.max_steps < 1:
            raise VicunaflowError("--num-train-epochs must be > 0 (or give --max-steps)")
        for name in ("warmup_ratio", "lora_dropout"):  # fractions
            if getattr(self, name) >= 1:
                raise VicunaflowError(f"--{name.replace('_', '-')} must be below 1, not {getattr(self, name)}")
        if not self.lora_target_modules:
            raise VicunaflowError(f"--lora-target-modules names no layer; e.g. {list(LORA_TARGETS)}")
        unknown = [name for name in self.lora_target_modules if name not in (*LORA_TARGETS, "lm_head")]
        if unknown:  # peft would fail in every worker, after the model loaded
            raise VicunaflowError(
                f"--lora-target-modules {unknown}: a LLaMA's linear layers are {[*LORA_TARGETS, 'lm_head']}"
            )
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise VicunaflowError("--save-total-limit must be at least 1 (or null to keep all)")
        unknown = set(self.fsdp.split()) - {"full_shard", "shard_grad_op", "auto_wrap", "offload"}
        if unknown:
            raise VicunaflowError(
                f"--fsdp {self.fsdp!r}: unknown option(s) {sorted(unknown)}; use e.g. 'full_shard auto_wrap'"
            )
        if not Path(self.model_path, "config.json").is_file():
            raise VicunaflowError(f"{self.model_path}: not a Hugging Face model directory (no config.json)")
        from vicunaflow.quant import refuse_quantized

        refuse_quantized(self.model_path, "--model-path")
        self.check_lora_rank()
        if not Path(self.data).exists():
            raise VicunaflowError(f"{self.data}: no such data file or tokenised dataset directory")
        if Path(self.data).is_dir():
            from vicunaflow.data import read_tokenized_meta

            read_tokenized_meta(Path(self.data))  # an empty dataset fails now, not in the first step
        self.check_checkpoint_dir()

    def check_lora_rank(self) -> None:
        """Refuse a LoRA rank above the smaller dimension of a target layer (config.json): such adapters hold more
        parameters than the layers they adapt (--lora-r 100000 asked for billions on a tiny model, and the run was
        killed for memory) and can learn no more than a rank of that dimension."""
        import json

        if self.method == "full":
            return
        try:
            shape = json.loads(Path(self.model_path, "config.json").read_text())
            hidden, heads, ffn = shape["hidden_size"], shape["num_attention_heads"], shape["intermediate_size"]
            head_dim = shape.get("head_dim") or hidden // heads
            kv = (shape.get("num_key_value_heads") or heads) * head_dim
            vocab = shape["vocab_size"]
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
            return  # the model's own check names what is wrong with its config.json
        sizes = {"q_proj": heads * head_dim, "k_proj": kv, "v_proj": kv, "o_proj": heads * head_dim}
        sizes |= {"gate_proj": ffn, "up_proj": ffn, "down_proj": ffn, "lm_head": vocab}
        name = min(self.lora_target_modules, key=lambda target: min(hidden, sizes[target]))
        largest = min(hidden, sizes[name])
        if self.lora_r > largest:
            raise VicunaflowError(
                f"--lora-r {self.lora_r}: above {largest}, the smaller dimension of {name} in {self.model_path}; "
                f"give a rank of at most {largest} (8 to 64 usually), or --method full to train every weight"
            )

    def warnings(self) -> list[str]:
        """What the options ask for that the run will not do: said once, when it starts (rank 0)."""
        import json

        notes = []
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}
        lora = [name for name in ("lora_r", "lora_alpha", "lora_dropout") if getattr(self, name) != defaults[name]]
        lora += ["lora_target_modules"] if self.lora_target_modules != list(LORA_TARGETS) else []
        if self.method == "full" and lora:
            flags = ", ".join(f"--{name.replace('_', '-')}" for name in lora)
            notes.append(f"{flags} ignored: --method full trains every weight; give --method lora for LoRA adapters")
        try:
            positions = json.loads(Path(self.model_path, "config.json").read_text()).get("max_position_embeddings")
        except (OSError, ValueError, AttributeError):
            positions = None
        if isinstance(positions, int) and self.model_max_length > positions:
            notes.append(
                f"--model-max-length {self.model_max_length} is beyond the {positions} positions of {self.model_path} "
                "(max_position_embeddings): tokens past them are at positions the model never saw"
            )
        return notes

    def check_checkpoint_dir(self) -> None:
        """Refuse a checkpoint_dir whose removal after training (unless keep_checkpoints) or whose
        checkpoints could destroy the model, the data, the output, the working or the home directory, and one that
        is, or lies under, a file."""
        from vicunaflow.outputs import path_relation

        given = self.checkpoint_dir
        for name in ("model_path", "data", "output_dir"):
            relation = path_relation(given, getattr(self, name))
            if relation:
                raise VicunaflowError(
                    f"--checkpoint-dir {given}: it {relation} the --{name.replace('_', '-')} {getattr(self, name)}; "
                    "choose a checkpoint folder of its own (default: <output_dir parent>/.checkpoints/<name>)"
                )
        for name, where in (("working directory", Path.cwd), ("home directory", Path.home)):
            try:
                protected = where()
            except (OSError, RuntimeError):  # a deleted cwd, no HOME: nothing to protect there
                continue
            relation = path_relation(given, protected)
            if relation in ("is", "contains"):  # lying inside them is where checkpoints usually go
                raise VicunaflowError(
                    f"--checkpoint-dir {given}: it {relation} the {name} {protected}; "
                    "choose a checkpoint folder of its own (default: <output_dir parent>/.checkpoints/<name>)"
                )
        existing = next(p for p in (Path(given), *Path(given).absolute().parents) if p.exists() or p.is_symlink())
        # mkdir failed in the run ("[Errno 17] File exists"); a file above the output too is the output's to name
        if not existing.is_dir() and path_relation(self.output_dir, existing) not in ("is", "lies inside"):
            raise VicunaflowError(
                f"--checkpoint-dir {given}: {existing} is a file, not a folder; move it away or choose another "
                "checkpoint folder (default: <output_dir parent>/.checkpoints/<name>)"
            )

    def inputs(self) -> list[str]:
        """What the run reads, or deletes when done (checkpoint_dir): the output may not be, hold or lie in them."""
        return [self.model_path, self.data, self.checkpoint_dir]

    def as_dict(self) -> dict:
        """The options as the keys of a `--config`; checkpoint_dir null where it is output_dir's default, so a
        run's training_args.json given with another --output-dir checkpoints beside that output: it resumed from
        (and, when done, removed) the checkpoints of the run that wrote it."""
        options = dataclasses.asdict(self)
        if self.checkpoint_dir == str(default_checkpoint_dir(Path(self.output_dir))):
            options["checkpoint_dir"] = None
        return options


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


def default_checkpoint_dir(output_dir: Path) -> Path:
    """`<output_dir parent>/.checkpoints/<output_dir name>`: outside the output, which Snakemake deletes on failure."""
    return output_dir.parent / ".checkpoints" / output_dir.name

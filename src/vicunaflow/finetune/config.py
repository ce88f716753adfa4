"""What a fine-tuning run is: its resolved options (TrainConfig), this process (Runtime), the names of its files.

Imports no torch and nothing else of the package: `vicunaflow finetune --help`, the workflow and
report.py read it cheaply, and every other module of vicunaflow.finetune builds on it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from vicunaflow import VicunaflowError

TRAINER_LOG = "trainer_log.jsonl"  # one JSON line per logged step (report.py draws the loss from it)
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


def default_checkpoint_dir(output_dir: Path) -> Path:
    """`<output_dir parent>/.checkpoints/<output_dir name>`: outside the output, which Snakemake deletes on failure."""
    return output_dir.parent / ".checkpoints" / output_dir.name

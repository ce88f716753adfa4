"""What a run leaves: its log while it trains (rank 0), then the Hugging Face model directory, written atomically."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

from vicunaflow.finetune.config import HYPERPARAMETERS, TENSORBOARD_DIR, TRAINER_LOG, Runtime, TrainConfig

log = logging.getLogger(__name__)


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
            kept = [line for line in self.path.read_text().splitlines() if _logged_step(line, self.path) <= start_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        if config.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events a killed run logged after the checkpoint we resumed from.
            self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR), purge_step=start_step or None)
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


def _logged_step(line: str, path: Path) -> float:
    """The step a trainer log line records; infinity (dropped) for a line that is not one, such as the last line a
    run killed (or a disk filling up) cut short, which would otherwise stop every resume with a JSON traceback."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        step = None
    if isinstance(step, bool) or not isinstance(step, int):
        if line.strip():
            log.warning("%s: dropping a line that is not a logged step (cut short?): %.80s", path, line)
        return math.inf
    return step


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
        for name in (TRAINER_LOG, TENSORBOARD_DIR):
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, out / name)
            elif (run_dir / name).is_dir():
                shutil.copytree(run_dir / name, out / name)
        (out / HYPERPARAMETERS).write_text(json.dumps(config.as_dict(), indent=1) + "\n")
        inputs = [Path(config.model_path, "config.json")]
        inputs += [p for p in (Path(config.data), Path(config.data, "meta.json")) if p.is_file()]
        if Path(config.model_path, "vicunaflow.json").is_file():
            inputs.append(Path(config.model_path, "vicunaflow.json"))
        write_manifest(
            out, inputs=inputs, kind=f"finetune-{config.method}", world_size=runtime.world_size, verb="finetune"
        )
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


def remove_if_empty(path: Path) -> None:
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()

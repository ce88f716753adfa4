"""Training state I/O for `vicunaflow finetune`: save, find and resume checkpoints.

A fine-tune checkpoint, `<run dir>/checkpoint-N`, holds everything a killed run needs to continue
exactly where it stopped (the data position follows from the step):

    state-rank<R>.pt      each process's shards of the model and optimizer state (LoRA: the adapters only)
    rng-rank<R>.pt/.json  each process's random state (torch and CUDA generators; Python's as JSON)
    scheduler.json        the learning-rate scheduler's state
    trainer_state.json    the step and the world size
    training_args.json    the resolved arguments, which a resuming run must match

Checkpoints hold tensors (torch.load(weights_only=True)) and JSON only: nothing in them is unpickled
as objects, so a checkpoint directory shared with others cannot run code when resumed. (Not DCP:
its .metadata is a pickle, and it loads non-tensor values with weights_only=False.) A checkpoint is
written under a temporary name and renamed once complete. torch is imported inside the functions:
importing this module stays stdlib-only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
from pathlib import Path

from vicunaflow import VicunaflowError
from vicunaflow.finetune.config import HYPERPARAMETERS, Runtime, TrainConfig

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
SCHEDULER_STATE = "scheduler.json"


def save_checkpoint(
    run_dir: Path, step: int, config: TrainConfig, model, optimizer, scheduler, runtime: Runtime
) -> None:
    """Write checkpoint-<step> (each process's model + optimizer shards, scheduler, RNG), then rotate old ones.

    Written under a temporary name and renamed by rank 0 once every process has finished, so a
    checkpoint directory without the temporary prefix is always complete.
    """
    import torch
    import torch.distributed as dist

    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f".tmp-checkpoint-{step}"
    if runtime.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_state, optimizer_state = _get_state(model, optimizer, config)
    shards = _local({"model": model_state, "optimizer": optimizer_state})
    torch.save(shards, tmp / _state_file(runtime.rank))
    _save_rng_state(tmp, runtime.rank)
    dist.barrier()
    if runtime.is_main:
        (tmp / SCHEDULER_STATE).write_text(json.dumps(scheduler.state_dict()) + "\n")  # numbers only
        state = {"step": step, "world_size": runtime.world_size}
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1) + "\n")
        (tmp / HYPERPARAMETERS).write_text(json.dumps(config.as_dict(), indent=1) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        log.info("saved %s", final)
        checkpoints = list_checkpoints(run_dir)
        if config.save_total_limit is not None:
            for old in checkpoints[: -config.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
                log.info("removed %s (save_total_limit %d)", old, config.save_total_limit)
    dist.barrier()


def resume_if_possible(run_dir: Path, config: TrainConfig, model, optimizer, scheduler, runtime: Runtime) -> int:
    """Load the newest complete checkpoint of this run, if any; return the step to continue from."""
    import torch
    import torch.distributed as dist

    found: list[str | None] = [None]
    if runtime.is_main:
        for partial in run_dir.glob(".tmp-checkpoint-*"):  # left by a run killed while saving
            shutil.rmtree(partial, ignore_errors=True)
        checkpoints = list_checkpoints(run_dir)
        found = [str(checkpoints[-1]) if checkpoints else None]
    dist.broadcast_object_list(found, src=0)  # every process resumes from the same one
    if found[0] is None:
        return 0
    checkpoint = Path(found[0])
    saved = _read(checkpoint / HYPERPARAMETERS, run_dir, _json_object)
    state = _read(checkpoint / TRAINER_STATE, run_dir, _trainer_state)
    changed = [k for k in config.RESUME_KEYS if saved.get(k) != getattr(config, k)]
    if state["world_size"] != runtime.world_size:
        changed.append(f"world_size ({state['world_size']} -> {runtime.world_size})")
    if changed:
        raise VicunaflowError(
            f"{checkpoint}: saved by a run with other settings ({', '.join(changed)}); resume with the same "
            f"settings, or delete {run_dir} to start over"
        )
    # Every process checks every file, so all of them stop together rather than hang in a collective.
    per_rank = [name for rank in range(runtime.world_size) for name in (_state_file(rank), *_rng_files(rank))]
    needed = [SCHEDULER_STATE, *per_rank]
    for name in needed:
        if not (checkpoint / name).is_file():
            raise VicunaflowError(
                f"{checkpoint / name}: missing (the checkpoint was written by an older vicunaflow, or is "
                f"incomplete); delete {run_dir} to start over"
            )
    state_file = checkpoint / _state_file(runtime.rank)
    shards = _read(state_file, run_dir, lambda path: torch.load(path, map_location="cpu", weights_only=True))
    scheduler_state = _read(checkpoint / SCHEDULER_STATE, run_dir, _json_object)
    _read(checkpoint, run_dir, lambda path: _load_rng_state(path, runtime.rank))
    model_state, optimizer_state = _get_state(model, optimizer, config)
    with torch.no_grad():
        loaded = _load_into({"model": model_state, "optimizer": optimizer_state}, shards, str(state_file))
    _set_state(model, optimizer, loaded["model"], loaded["optimizer"], config)
    scheduler.load_state_dict(scheduler_state)
    log.info("resuming from %s at step %d", checkpoint, state["step"])
    return int(state["step"])


def _read(path: Path, run_dir: Path, reader):
    """reader(path), or an error naming the damaged file and what to delete (a disk filled up or a copy cut
    short can leave a checkpoint whose files are all there but unreadable)."""
    import pickle

    try:
        return reader(path)
    except (ValueError, KeyError, TypeError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise VicunaflowError(
            f"{path}: cannot be read ({type(err).__name__}: {str(err)[:200]}); the checkpoint is damaged: delete "
            f"{path if path.is_dir() else path.parent} to resume from the one before it, or {run_dir} to start over"
        ) from None


def _json_object(path: Path, *keys: str) -> dict:
    record = json.loads(path.read_text())
    if not isinstance(record, dict) or any(key not in record for key in keys):
        raise ValueError(f"expected a JSON object with {', '.join(keys) or 'settings'}")
    return record


def _trainer_state(path: Path) -> dict:
    """trainer_state.json, its step and world size whole numbers (an edited or damaged one stopped the resume with
    a traceback from int() after the model had loaded, or as a world size that "changed" from 1 to 1)."""
    state = _json_object(path, "step", "world_size")
    for key, least in (("step", 0), ("world_size", 1)):
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{key} is {json.dumps(value)}, expected a whole number of at least {least}")
    return state


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [
        p for p in run_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and (p / TRAINER_STATE).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _state_options(config: TrainConfig):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # LoRA: the frozen base is the input model, not state; checkpoint only the adapters.
    return StateDictOptions(ignore_frozen_params=config.method != "full")


def _get_state(model, optimizer, config: TrainConfig):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer, options=_state_options(config))


def _set_state(model, optimizer, model_state, optimizer_state, config: TrainConfig) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    # LoRA state holds the adapters only, so loading it cannot be strict.
    options = dataclasses.replace(_state_options(config), strict=config.method == "full")
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state, options=options)


def _state_file(rank: int) -> str:
    return f"state-rank{rank}.pt"


def _local(value):
    """A state dict with each DTensor replaced by this process's shard: plain tensors, containers, numbers.

    Each process saves and loads its own shards; resuming needs the same world size, as checked.
    """
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.to_local()
    if isinstance(value, dict):
        return {k: _local(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_local(v) for v in value)
    return value


def _load_into(template, saved, where: str):
    """Copy saved values into the template's tensors in place (shards stay on their devices), like DCP."""
    import torch
    from torch.distributed.tensor import DTensor

    if isinstance(template, torch.Tensor):
        local = template.to_local() if isinstance(template, DTensor) else template
        if not isinstance(saved, torch.Tensor) or (saved.shape, saved.dtype) != (local.shape, local.dtype):
            got = f"{saved.dtype} {tuple(saved.shape)}" if isinstance(saved, torch.Tensor) else type(saved).__name__
            raise VicunaflowError(f"{where}: {got} saved, {local.dtype} {tuple(local.shape)} expected")
        local.copy_(saved)
        return template
    if isinstance(template, dict):
        if not isinstance(saved, dict) or saved.keys() != template.keys():
            raise VicunaflowError(f"{where}: other keys than this model's state")
        return {k: _load_into(v, saved[k], f"{where}: {k}") for k, v in template.items()}
    return saved


def _rng_files(rank: int) -> tuple[str, str]:
    """One process's random state: generator states as uint8 tensors, Python's as JSON."""
    return f"rng-rank{rank}.pt", f"rng-rank{rank}.json"


def _save_rng_state(directory: Path, rank: int) -> None:
    """Save this process's random state (NumPy's is not kept: training never draws from it)."""
    import torch

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()  # this process's device
    version, words, gauss_next = random.getstate()
    tensor_file, json_file = _rng_files(rank)
    torch.save(tensors, directory / tensor_file)
    (directory / json_file).write_text(json.dumps({"python": [version, list(words), gauss_next]}) + "\n")


def _load_rng_state(directory: Path, rank: int) -> None:
    """Restore what _save_rng_state saved, so a resumed run draws the same numbers (dropout)."""
    import torch

    tensor_file, json_file = _rng_files(rank)
    tensors = torch.load(directory / tensor_file, weights_only=True)
    version, words, gauss_next = json.loads((directory / json_file).read_text())["python"]
    random.setstate((version, tuple(words), gauss_next))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])

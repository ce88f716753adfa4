"""How `chat`, `serve` and `eval answers` load a model: one set of options, FastChat's flags.

No torch here: the commands' `--help` and signatures read ModelOptions cheaply; `load()` imports the
engine. The CLI spreads the dataclass into its fields (vicunaflow.cli.spread), so the flags stay
`--device`, `--num-gpus`, `--max-gpu-memory`, `--load-8bit`, `--load-4bit`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vicunaflow import VicunaflowError


@dataclass(frozen=True)
class ModelOptions:
    """Where and how a model's weights load (vicunaflow.engine.load_model).

    Arguments:
        device: auto (CUDA when a GPU is visible, else CPU), cpu or cuda.
        num_gpus: tensor parallelism over this many GPUs, one process each (with --device cpu: CPU ranks).
        max_gpu_memory: refuse to load when the weights need more than this per GPU, e.g. 20GiB.
        load_8bit: quantize the layers' weights to int8 as they load (one scale per output row; docs/quantize.md).
        load_4bit: quantize them to int4 (a scale and zero per 128 input columns); a `vicunaflow quantize` folder needs neither.
            On CUDA chat decodes through our int4 columns kernel, and serve in bfloat16 through torch's tinygemm (docs/quantize.md).
    """

    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_gpus: int = 1
    max_gpu_memory: str | None = None
    load_8bit: bool = False
    load_4bit: bool = False

    def load(self, model_path: str | Path, one_stream: bool = False) -> tuple[object, object]:
        """(model, tokenizer) of the folder; `contextlib.closing(model)` stops the other tensor-parallel ranks.
        one_stream: one conversation at a time (chat), which picks the int4 kernel (engine.load_model)."""
        from vicunaflow.engine import load_model

        require_servable_model(model_path)
        return load_model(model_path, **dataclasses.asdict(self), one_stream=one_stream)


def require_servable_model(model_path: str | Path) -> None:
    """Refuse a --model-path that is no model to run: not a Hugging Face folder (a file, a raw Meta checkpoint), or
    a Vicuna delta. `serve` asks it of every path before the first model loads."""
    require_model_dir(model_path, "--model-path")
    if recorded_role(Path(model_path)) == "delta":
        raise VicunaflowError(
            f"{model_path}: a Vicuna delta (its vicunaflow.json says so), not a model: its weights are differences "
            "to add to LLaMA; merge it first (vicunaflow apply-delta --base llama-13b-hf --delta "
            f"{model_path} --target vicuna-13b-all-v1.1) and give --model-path the merged folder"
        )


DEFAULT_MODEL_OPTIONS = ModelOptions()  # the commands' default (frozen: safe to share)

DELTA_KINDS = ("make-delta", "synthetic-delta")
MODEL_KINDS = ("convert", "apply-delta", "quantize")  # and finetune-<method>


def recorded_role(folder: Path) -> Literal["delta", "model"] | None:
    """What a folder's vicunaflow.json says it is: a Vicuna delta (make-delta, synth delta, or a Hub repository named
    like lmsys's `*-delta-*`), a model (convert, apply-delta, quantize, finetune), or None (no manifest, or another)."""
    try:
        manifest = json.loads((Path(folder) / "vicunaflow.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    kind, repo = str(manifest.get("kind", "")), str(manifest.get("repo", ""))
    if kind in DELTA_KINDS or re.search(r"(^|[-_])delta([-_]|$)", repo.rsplit("/", 1)[-1], re.IGNORECASE):
        return "delta"
    if kind in MODEL_KINDS or kind.startswith("finetune-"):
        return "model"
    return None


def require_model_dir(path: str | Path, flag: str) -> Path:
    """`path` if it is a Hugging Face model folder (config.json inside); else one line saying what it is instead
    and what to give: a file, a raw Meta checkpoint (convert it first), a Hub repository id (download it first)."""
    path = Path(path)
    if path.is_file():
        raise VicunaflowError(
            f"{path} is a file, not a model folder; give {flag} the folder that holds it ({path.parent})"
        )
    if not path.exists():
        hub = re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) and not path.parent.exists()
        hint = (
            f"; a Hugging Face repository? download it first (vicunaflow download hf --repo {path} --local-dir "
            f"{path.name}) and give {flag} {path.name}"
            if hub
            else ""
        )
        raise VicunaflowError(f"{path}: no such folder ({flag}){hint}")
    if not (path / "config.json").is_file():
        if (path / "params.json").is_file() or any(path.glob("consolidated.*.pth")):
            raise VicunaflowError(
                f"{path}: a raw Meta checkpoint (params.json, consolidated.NN.pth), not a Hugging Face folder; convert "
                f"it first (vicunaflow convert --input-dir {path} --output-dir llama-13b-hf) and give {flag} the output"
            )
        raise VicunaflowError(f"{path}: no config.json; give {flag} a Hugging Face model folder")
    return path

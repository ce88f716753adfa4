"""How `chat`, `serve` and `eval answers` load a model: one set of options, FastChat's flags.

No torch here: the commands' `--help` and signatures read ModelOptions cheaply; `load()` imports the
engine. The CLI spreads the dataclass into its fields (vicunaflow.cli.spread), so the flags stay
`--device`, `--num-gpus`, `--max-gpu-memory`, `--load-8bit`, `--load-4bit`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


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

        return load_model(model_path, **dataclasses.asdict(self), one_stream=one_stream)


DEFAULT_MODEL_OPTIONS = ModelOptions()  # the commands' default (frozen: safe to share)

"""Text generation for `chat` and `serve`: our own LLaMA model, its KV cache and a batching engine.

    model.py      Transformer: fused q|k|v and gate|up, one forward for prefill and decode, project()
    cache.py      KVCache: paged, blocks of 16 positions per layer, a block table per request row
    load.py       load_model: a Hugging Face folder (float or quantized) or random weights, 1..N ranks
    build.py      build_model: one rank's weights (our checkpoint readers; int8/int4 through vicunaflow.quant)
    tp.py         tensor parallelism: spawned ranks, all-reduces (symmetric memory, NCCL, gloo)
    runner.py     Runner: prefill chunks, bucketed decode steps, CUDA graphs, warm-up, orders to the other ranks
    sampling.py   SamplingParams and the sampler
    text.py       prompts, IncrementalDecoder (streamed text), stop strings
    scheduler.py  Engine: continuous batching, chunked prefill, KV block admission and preemption, one step
                  queued ahead, events to each request's sink

Kernels: vicunaflow/kernels.py (Triton matvec of one-row products), vicunaflow/attention_kernels.py
(Triton decode attention through the block tables, and rotary fused with the K/V store),
vicunaflow/quant_kernels.py (int8/int4 products: qmatvec, qmatmul). docs/engine.md describes the
serving design.

transformers is not used to run the model (only its tokenizer class, and as the reference in tests).
"""

from vicunaflow.engine.load import RandomWeights, load_model, resolve_device
from vicunaflow.engine.model import ModelArgs, Transformer
from vicunaflow.engine.sampling import SamplingParams
from vicunaflow.engine.scheduler import Engine, Event, Request, check_max_context, context_length, timed
from vicunaflow.engine.text import IncrementalDecoder, encode_prompt, fit_conversation

__all__ = [
    "Engine",
    "Event",
    "IncrementalDecoder",
    "ModelArgs",
    "RandomWeights",
    "Request",
    "SamplingParams",
    "Transformer",
    "check_max_context",
    "context_length",
    "encode_prompt",
    "fit_conversation",
    "load_model",
    "resolve_device",
    "timed",
]

"""Text generation shared by `chat` and `serve`: model loading, sampling, streaming and a batching engine.

Why an engine of our own instead of `model.generate`: a server must let requests join and leave a
running batch (continuous batching), stream text while it is produced, and free a slot the moment a
client goes away. `generate()` runs one fixed batch to the end. Here one background thread owns the
model and steps every active request together:

    admit waiting requests -> prefill them (one forward, padded) -> decode step for all rows -> repeat

The KV cache is static, one row ("slot") per request: keys and values of shape
[max_batch_size, kv_heads, context, head_dim] per layer, allocated once. Each row has its own cache
position, so requests of any length share one decode step; attention masks are explicit 4-D boolean
masks (SDPA). Active requests always occupy rows 0..n-1 (a finished row is refilled by moving the last
one into it), so every step works on plain slices of the cache, never on gathered copies.

The Hugging Face model is used as is (LlamaForCausalLM, also 8-bit/4-bit bitsandbytes or a
device_map split over several GPUs); our cache object only has to answer `update()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import threading
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import torch

from vicunaflow import VicunaflowError, kernels, template
from vicunaflow.formats import DTYPES

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
Dtype = Literal["auto", "float16", "bfloat16", "float32"]


def load_model(
    model_path: str | Path,
    *,
    device: Device = "cpu",
    num_gpus: int = 1,
    max_gpu_memory: str | None = None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    dtype: Dtype = "auto",
):
    """Load a LLaMA/Vicuna Hugging Face directory for inference; return (model, tokenizer).

    device "auto" is CUDA when a GPU is visible, else the CPU (FastChat's CLI assumes CUDA).

    float16 on CUDA, float32 on CPU (CPU float16 matmuls are slow or missing). `load_8bit` on CUDA
    uses bitsandbytes LLM.int8(); on CPU, PyTorch's dynamic int8 quantization of every Linear layer
    (weights stored int8, activations quantized on the fly): about a quarter of float32 weight memory
    for the Linear layers, which hold nearly all parameters.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_path = Path(model_path)
    if not (model_path / "config.json").exists():
        raise VicunaflowError(f"{model_path}: no config.json; give a Hugging Face model directory (--model-path)")
    if load_8bit and load_4bit:
        raise VicunaflowError("--load-8bit and --load-4bit exclude each other; choose one")
    if device == "cuda" and not torch.cuda.is_available():
        raise VicunaflowError("--device cuda: no CUDA device is visible; use --device cpu")
    if device == "cpu" and load_4bit:
        raise VicunaflowError("--load-4bit needs CUDA (bitsandbytes 4-bit kernels); on CPU use --load-8bit")
    if device == "cuda" and num_gpus > torch.cuda.device_count():
        raise VicunaflowError(f"--num-gpus {num_gpus}: only {torch.cuda.device_count()} CUDA devices are visible")

    torch_dtype = DTYPES.get(dtype, torch.float16 if device == "cuda" else torch.float32)
    kwargs: dict = {"dtype": torch_dtype, "attn_implementation": "sdpa"}
    if device == "cuda":
        if load_8bit or load_4bit:
            kwargs["quantization_config"] = _bitsandbytes_config(load_8bit, torch_dtype)
        if num_gpus > 1 or load_8bit or load_4bit:
            kwargs["device_map"] = "auto"
            if max_gpu_memory:
                kwargs["max_memory"] = {i: max_gpu_memory for i in range(num_gpus)}
            elif num_gpus > 1:
                kwargs["max_memory"] = {i: torch.cuda.get_device_properties(i).total_memory for i in range(num_gpus)}
        else:
            kwargs["device_map"] = {"": 0}

    config = AutoConfig.from_pretrained(model_path)
    if config.model_type != "llama":
        log.warning("%s: model_type %r is not llama; trying anyway", model_path, config.model_type)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    model.eval()
    if device == "cpu" and load_8bit:
        full_bytes = weight_bytes(model)
        model = quantize_int8_cpu(model)
        log.info(
            "8-bit (CPU dynamic int8): weights %.1f MiB, were %.1f MiB", weight_bytes(model) / 2**20, full_bytes / 2**20
        )
    else:
        log.info("loaded %s: weights %.1f MiB on %s", model_path, weight_bytes(model) / 2**20, device)
    return model, tokenizer


def quantize_int8_cpu(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every nn.Linear by PyTorch's dynamically quantized int8 Linear (CPU only)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch.ao.quantization warns that it moves to torchao; it still works
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the weights, counting int8-packed Linear weights (which are not parameters)."""
    seen: set[int] = set()
    total = 0
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.data_ptr() not in seen and not tensor.is_meta:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    for module in model.modules():
        packed = getattr(module, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            qweight, bias = packed._weight_bias()
            total += qweight.numel() * qweight.element_size() + (
                bias.numel() * bias.element_size() if bias is not None else 0
            )
    return total


def _bitsandbytes_config(load_8bit: bool, compute_dtype: torch.dtype):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise VicunaflowError(
            "--load-8bit/--load-4bit on CUDA need bitsandbytes: pip install bitsandbytes==0.50.2"
        ) from err
    from transformers import BitsAndBytesConfig

    if load_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_type="nf4")


def cache_argument(model) -> str:
    """The keyword under which this transformers version takes a KV cache: `cache` (5.2x) or `past_key_values`.

    An unknown keyword is silently swallowed by the model's **kwargs, so our cache would be ignored.
    """
    import inspect

    parameters = inspect.signature(model.model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def context_length(model, max_context: int | None = None) -> int:
    """Tokens the model attends over: its max_position_embeddings (2048 for LLaMA-1), or less if asked."""
    limit = int(getattr(model.config, "max_position_embeddings", 2048))
    return min(limit, max_context) if max_context else limit


# ---------------------------------------------------------------------------------------------------------
# Prompts


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a rendered prompt, starting with BOS, as FastChat feeds Vicuna.

    Earlier replies end in the literal `</s>`, which the tokenizer maps to the EOS special token.
    """
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    bos = tokenizer.bos_token_id
    return [bos, *ids] if bos is not None and (not ids or ids[0] != bos) else ids


def fit_conversation(
    tokenizer, turns: list[tuple[str, str | None]], budget: int, system: str = template.SYSTEM_PROMPT
) -> tuple[list[tuple[str, str | None]], list[int]]:
    """Drop the oldest (user, assistant) exchanges until the prompt fits `budget` tokens.

    `turns` ends with (ASSISTANT, None). Returns the kept turns and their token ids; raises if even
    the last user message alone does not fit.
    """
    while True:
        ids = encode_prompt(tokenizer, template.render(turns, system))
        if len(ids) <= budget:
            return turns, ids
        if len(turns) <= 2:
            raise VicunaflowError(f"the message is {len(ids)} tokens with the system prompt; at most {budget} fit")
        turns = turns[2:]


# ---------------------------------------------------------------------------------------------------------
# Streaming text


class IncrementalDecoder:
    """Turn token ids into text deltas whose concatenation equals decoding all ids at once.

    SentencePiece needs context: a byte-fallback character spans several tokens (half of it
    decodes to U+FFFD) and a leading "▁" becomes a space only after another piece. So each step
    decodes a short window twice, with and without the tokens not yet settled, and emits the new
    text except a trailing run of U+FFFD, which may still become a character.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: a token decoded before, so it gives stable context
        self.read_offset = 0  # text up to this token is settled and emitted
        self.emitted = 0  # characters emitted beyond read_offset (before an unfinished character)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        new = self._unsettled()
        settled = not new.endswith("\ufffd")
        ready = new if settled else new.rstrip("\ufffd")
        delta = ready[self.emitted :]
        self.emitted = max(self.emitted, len(ready))
        if settled:
            self.prefix_offset, self.read_offset, self.emitted = self.read_offset, len(self.ids), 0
        return delta

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character at the end)."""
        new = self._unsettled()
        delta = new[self.emitted :]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.emitted = 0
        return delta

    def _unsettled(self) -> str:
        # Sliced by length, not by prefix: tokenizers' ByteFallback may rewrite an emitted ASCII byte
        # token as U+FFFD when an invalid byte follows it (only models emitting raw ASCII bytes do).
        before = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        after = self.tokenizer.decode(self.ids[self.prefix_offset :])
        return after[len(before) :]


# ---------------------------------------------------------------------------------------------------------
# Requests


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()  # stop strings (OpenAI `stop`); EOS always stops
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens


@dataclasses.dataclass
class Event:
    """One streamed piece of a reply; the last one has finish_reason set."""

    text: str
    finish_reason: Literal["stop", "length", "cancelled", "error"] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class Request:
    _ids = itertools.count()

    def __init__(self, prompt_ids: Sequence[int], params: SamplingParams, sink: Callable[[Event], None], tokenizer):
        self.id = next(self._ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sink = sink
        self.decoder = IncrementalDecoder(tokenizer)
        self.text = ""  # emitted so far
        self.held = ""  # decoded but held back: might be the start of a stop string
        self.cancelled = False
        self.done = False

    def cancel(self) -> None:
        """Ask the engine to drop this request at its next step (e.g. the client disconnected)."""
        self.cancelled = True

    @property
    def completion_tokens(self) -> int:
        return len(self.decoder.ids)


# ---------------------------------------------------------------------------------------------------------
# The KV cache


class SlotCache:
    """Static per-layer K/V buffers [slots, kv_heads, context, head_dim]; rows are requests.

    Before each forward the engine says which rows and positions it is writing (`for_prefill`,
    `for_decode`); the attention layers then call `update()` and get back the keys and values to
    attend over, as views into the buffers.
    """

    def __init__(self, model, slots: int, context: int):
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = config.num_key_value_heads or config.num_attention_heads
        dtype = model.get_input_embeddings().weight.dtype
        per_layer = 2 * slots * kv_heads * context * head_dim * dtype.itemsize
        _check_gpu_memory(
            [layer.input_layernorm.weight.device for layer in model.model.layers], per_layer, slots, context
        )
        self.keys, self.values = [], []
        for layer in model.model.layers:
            device = layer.input_layernorm.weight.device  # device_map may spread layers over GPUs
            self.keys.append(torch.zeros(slots, kv_heads, context, head_dim, dtype=dtype, device=device))
            self.values.append(torch.zeros(slots, kv_heads, context, head_dim, dtype=dtype, device=device))
        self.slots, self.context = slots, context
        self._mode: tuple = ()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def for_prefill(self, first_row: int, rows: int, length: int) -> None:
        self._mode = ("prefill", first_row, rows, length)

    def for_decode(self, rows: int, positions: list[torch.Tensor], kv_length: int) -> None:
        """positions: per layer device, a [rows] tensor with the cache index of each row's new token."""
        self._mode = ("decode", rows, positions, kv_length)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self._mode[0] == "prefill":
            _, first, rows, length = self._mode
            # key_states: [rows, kv_heads, length, head_dim], written at positions 0..length-1
            keys[first : first + rows, :, :length] = key_states
            values[first : first + rows, :, :length] = value_states
            return keys[first : first + rows, :, :length], values[first : first + rows, :, :length]
        _, rows, positions, kv_length = self._mode
        position = positions[layer_idx]
        row_index = torch.arange(rows, device=keys.device)
        # key_states: [rows, kv_heads, 1, head_dim]; each row writes its own position
        keys[row_index, :, position] = key_states[:, :, 0]
        values[row_index, :, position] = value_states[:, :, 0]
        return keys[:rows, :, :kv_length], values[:rows, :, :kv_length]

    def move_row(self, source: int, target: int, length: int) -> None:
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[target, :, :length] = keys[source, :, :length]
            values[target, :, :length] = values[source, :, :length]


class FusedDecoder:
    """The decode step of a plain LLaMA (one new token per row) in few kernels per layer.

    Why: inside a CUDA graph every kernel still costs a few microseconds, however small. The Hugging
    Face layer launches about 45 per decode step (RMSNorm in six pieces, rotary embeddings in ten,
    three projections, mask conversion, ...): on an H200 that added ~0.1 ms per layer, as much as
    reading the 7B weights, and capped a graph-replayed 7B at ~140 tokens/s. Here a layer is ~14:

        RMSNorm (one fused op) -> q|k|v one GEMM -> rotary of q and k one batched matmul by each
        row's rotation matrix -> K/V written into the slot cache -> SDPA with an additive mask
        built once per step -> o_proj GEMM adding into the residual -> RMSNorm -> gate|up one GEMM
        -> silu * up -> down GEMM adding into the residual

    The fused weights are the model's own memory: q/k/v and gate/up weights become row slices
    (views) of one concatenated tensor, so prefill through the Hugging Face forward reads the same
    values and nothing is stored twice. Used on one device, for unquantized LLaMA layers only.

    With `kernels` (one row on a GPU: a single chat stream), the projections are `kernels.matvec`:
    weights streamed once at a higher rate than cuBLAS's one-row GEMMs, SiLU·up folded into the down
    projection and the residual adds into the stores.
    """

    def __init__(self, model, cache: SlotCache, kernels: bool = False):
        self.model, self.cache, self.kernels = model, cache, kernels
        config = model.config
        self.heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.layers = []
        with torch.no_grad():
            for layer in model.model.layers:
                attn, mlp = layer.self_attn, layer.mlp
                self.layers.append(
                    (
                        layer.input_layernorm,
                        _fused_weight([attn.q_proj, attn.k_proj, attn.v_proj]),  # [3 * dim, dim]
                        attn.o_proj.weight,  # [dim, dim]
                        layer.post_attention_layernorm,
                        _fused_weight([mlp.gate_proj, mlp.up_proj]),  # [2 * ffn, dim]
                        mlp.down_proj.weight,  # [dim, ffn]
                    )
                )
        lm_head = model.lm_head
        plain = type(lm_head) is torch.nn.Linear and lm_head.bias is None and lm_head.weight.is_contiguous()
        self.lm_head_weight = lm_head.weight if plain else None  # None: call the module (e.g. quantized)

    @staticmethod
    def supports(model) -> bool:
        config = model.config
        heads = config.num_attention_heads
        layer = model.model.layers[0]
        linears = [getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        linears += [getattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
        return (
            config.model_type == "llama"
            and getattr(config, "quantization_config", None) is None
            and (config.num_key_value_heads or heads) == heads
            and config.hidden_act == "silu"
            and not getattr(config, "attention_bias", False)
            and not getattr(config, "mlp_bias", False)
            and all(type(m) is torch.nn.Linear for m in linears)  # not bitsandbytes, not LoRA-wrapped
            and hasattr(layer.input_layernorm, "variance_epsilon")
        )

    @staticmethod
    def supports_kernels(model) -> bool:
        weight = model.get_input_embeddings().weight
        return weight.device.type == "cuda" and weight.dtype in (torch.float16, torch.bfloat16) and kernels.available()

    def project(
        self, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None, swiglu: bool = False
    ) -> torch.Tensor:
        """x @ weight.T (+ residual); with swiglu, x is gate|up and the input is silu(gate) * up."""
        if self.kernels and x.shape[0] == 1:
            return kernels.matvec(x.contiguous(), weight, residual, swiglu)
        if swiglu:
            ffn = x.shape[1] // 2
            x = torch.nn.functional.silu(x[:, :ffn]) * x[:, ffn:]
        if residual is None:
            return torch.nn.functional.linear(x, weight)
        return torch.addmm(residual, x, weight.t())

    def logits(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_index: torch.Tensor) -> torch.Tensor:
        """input_ids [rows, 1] go to cache positions [rows]; kv_index = arange(kv); returns logits [rows, vocab]."""
        rows, heads, head_dim = input_ids.shape[0], self.heads, self.head_dim
        dim = heads * head_dim
        hidden = self.model.model.embed_tokens(input_ids[:, 0])  # [rows, dim]
        cos, sin = self.model.model.rotary_emb(hidden, position_ids=positions[:, None])  # [rows, 1, head_dim]
        rotation = _rotation_matrices(cos[:, 0], sin[:, 0])  # [rows, head_dim, head_dim]
        # mask[b, 0, 0, k]: 0 where row b sees key k (its tokens 0..positions[b]), -inf elsewhere
        mask = torch.zeros(rows, 1, 1, kv_index.shape[0], dtype=hidden.dtype, device=hidden.device)
        mask.masked_fill_((kv_index[None, :] > positions[:, None])[:, None, None], float("-inf"))
        row_index = torch.arange(rows, device=hidden.device)
        kv_length = kv_index.shape[0]
        for i, (norm1, qkv_weight, o_weight, norm2, gate_up_weight, down_weight) in enumerate(self.layers):
            x = torch.nn.functional.rms_norm(hidden, (dim,), norm1.weight, norm1.variance_epsilon)
            qkv = self.project(x, qkv_weight)  # [rows, 3 * dim]
            qk = torch.bmm(qkv[:, : 2 * dim].view(rows, 2 * heads, head_dim), rotation)  # [rows, 2 * heads, hd]
            keys, values = self.cache.keys[i], self.cache.values[i]  # [slots, heads, context, hd]
            keys[row_index, :, positions] = qk[:, heads:]
            values[row_index, :, positions] = qkv[:, 2 * dim :].view(rows, heads, head_dim)
            attention = torch.nn.functional.scaled_dot_product_attention(
                qk[:, :heads, None],  # [rows, heads, 1, hd]
                keys[:rows, :, :kv_length],
                values[:rows, :, :kv_length],
                attn_mask=mask,
            )  # [rows, heads, 1, hd]
            hidden = self.project(attention.reshape(rows, dim), o_weight, residual=hidden)
            x = torch.nn.functional.rms_norm(hidden, (dim,), norm2.weight, norm2.variance_epsilon)
            gate_up = self.project(x, gate_up_weight)  # [rows, 2 * ffn]
            hidden = self.project(gate_up, down_weight, residual=hidden, swiglu=True)
        norm = self.model.model.norm
        hidden = torch.nn.functional.rms_norm(hidden, (dim,), norm.weight, norm.variance_epsilon)
        if self.lm_head_weight is not None:
            return self.project(hidden, self.lm_head_weight)  # [rows, vocab]
        return self.model.lm_head(hidden)


def _fused_weight(linears: list[torch.nn.Linear]) -> torch.Tensor:
    """Concatenate the weights of Linear layers (rows) and make each layer's weight a view into the result."""
    starts = list(itertools.accumulate([m.weight.shape[0] for m in linears], initial=0))
    fused = getattr(linears[0], "_vicunaflow_fused", None)
    if (
        fused is not None
        and all(  # fused by an earlier engine on the same model, and still in place
            m.weight.data_ptr() == fused[start:].data_ptr() for m, start in zip(linears, starts, strict=False)
        )
    ):
        return fused
    fused = torch.cat([m.weight.detach() for m in linears])  # [sum of out_features, in_features]
    for m, start, end in zip(linears, starts[:-1], starts[1:], strict=True):
        m.weight.data = fused[start:end]
    linears[0]._vicunaflow_fused = fused
    return fused


def _rotation_matrices(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Per row, the matrix R with x @ R == x * cos + rotate_half(x) * sin (LLaMA's half-split rotary).

    cos, sin: [rows, head_dim]. rotate_half(x) = cat(-x[half:], x[:half]), so output j < half takes
    -x[j + half] * sin[j] and output j >= half takes x[j - half] * sin[j].
    """
    half = cos.shape[1] // 2
    rotation = torch.diag_embed(cos)  # [rows, head_dim, head_dim]
    index = torch.arange(half, device=cos.device)
    rotation[:, index + half, index] = -sin[:, :half]
    rotation[:, index, index + half] = sin[:, half:]
    return rotation


class DecodeRunner:
    """The forward pass of one decode step: n rows, one new token each, at their own positions.

    On one GPU, the Python overhead of a Hugging Face forward (hundreds of small kernel launches for
    7B) costs more than reading the weights, so each step is padded to a bucket (rows 1, 2, 4, ...,
    max_batch_size; attended length in steps of 256) and replayed from a CUDA graph captured once per
    bucket. Padding rows are free cache rows (active rows are always 0..n-1): they write position 0
    of a row nobody reads before its next prefill overwrites it. Elsewhere: exact shapes, eagerly.

    A step's inputs may be the previous step's sampled tokens, still on the device: then the host can
    queue step t+1 before step t has finished (see `Engine._decode_step`).
    """

    KV_STEP = 256

    def __init__(
        self,
        model,
        cache: SlotCache,
        layer_devices: list,
        *,
        padded: bool,
        cuda_graphs: bool,
        fused: bool = False,
        kernels: bool = False,
    ):
        self.model, self.cache, self.layer_devices = model, cache, layer_devices
        self.fused = FusedDecoder(model, cache, kernels=kernels) if fused else None
        self.cache_keyword = cache_argument(model)
        self.padded, self.cuda_graphs = padded or cuda_graphs, cuda_graphs
        self.row_buckets = sorted({min(2**i, cache.slots) for i in range(cache.slots.bit_length() + 1)})
        self.buckets: dict[tuple[int, int], dict] = {}
        self.pool = torch.cuda.graph_pool_handle() if cuda_graphs else None

    def step(self, tokens: list[int] | torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens[i] goes to cache position lengths[i] of row i (tokens: a list, or a [n] device tensor).

        Returns (logits [n, vocab] in the model's dtype, greedy tokens [n]) on the device, without waiting.
        """
        n = len(lengths)
        if not self.padded:
            bucket = self._buffers(n, max(lengths) + 1, device=self.layer_devices[0], reused=False)
            self._fill(bucket, tokens, lengths)
            logits = self._forward(bucket)
            return logits, logits.argmax(dim=-1)
        rows = next(b for b in self.row_buckets if b >= n)
        kv_length = min(-(-(max(lengths) + 1) // self.KV_STEP) * self.KV_STEP, self.cache.context)
        key = (rows, kv_length)
        if key not in self.buckets:
            self.buckets[key] = self._buffers(rows, kv_length, device=self.layer_devices[0])
        bucket = self.buckets[key]
        self._fill(bucket, tokens, lengths)
        if self.cuda_graphs and bucket.get("graph") is None:
            self._capture(bucket)
        if bucket.get("graph") is not None:
            bucket["graph"].replay()
            return bucket["logits"][:n], bucket["greedy"][:n]
        logits = self._forward(bucket)[:n]
        return logits, logits.argmax(dim=-1)

    def _buffers(self, rows: int, kv_length: int, device, reused: bool = True) -> dict:
        # tokens and positions travel in one host->device copy per step, from pinned memory on CUDA. A
        # bucket kept for reuse has two host buffers taken in turn, so filling step t+1 never races the
        # copy of step t still queued; a one-off bucket needs one.
        pinned = torch.device(device).type == "cuda"
        host = [torch.zeros(2, rows, dtype=torch.long, pin_memory=pinned) for _ in range(2 if reused else 1)]
        step_inputs = torch.zeros(2, rows, dtype=torch.long, device=device)  # [tokens; positions]
        return {
            "rows": rows,
            "kv_length": kv_length,
            "host": host,
            "fills": 0,
            "step_inputs": step_inputs,
            "input_ids": step_inputs[0][:, None],  # [rows, 1], a view
            "positions": step_inputs[1],  # [rows], a view
            "kv_index": torch.arange(kv_length, device=device),  # [kv]
        }

    def _fill(self, bucket: dict, tokens: list[int] | torch.Tensor, lengths: list[int]) -> None:
        n = len(lengths)
        # taken in turn: this buffer's last copy was queued before the step the engine last waited on
        host = bucket["host"][bucket["fills"] % len(bucket["host"])]
        bucket["fills"] += 1
        host.zero_()  # padding rows: token 0 at position 0
        if not isinstance(tokens, torch.Tensor):
            host[0, :n] = torch.tensor(tokens)
        host[1, :n] = torch.tensor(lengths)
        bucket["step_inputs"].copy_(host, non_blocking=True)
        if isinstance(tokens, torch.Tensor):
            bucket["step_inputs"][0, :n].copy_(tokens)  # device to device, in stream order

    def _forward(self, bucket: dict) -> torch.Tensor:
        positions = bucket["positions"]
        if self.fused is not None:
            return self.fused.logits(bucket["input_ids"], positions, bucket["kv_index"])
        # mask[b, 0, 0, k]: row b sees its own tokens 0..positions[b] (built on the device: part of the graph)
        mask = (bucket["kv_index"][None, :] <= positions[:, None])[:, None, None]
        per_device = {positions.device: positions}
        for device in self.layer_devices:
            if device not in per_device:
                per_device[device] = positions.to(device)
        self.cache.for_decode(bucket["rows"], [per_device[d] for d in self.layer_devices], bucket["kv_length"])
        return self.model(
            input_ids=bucket["input_ids"],
            attention_mask=mask,
            position_ids=positions[:, None],
            use_cache=True,
            **{self.cache_keyword: self.cache},
        ).logits[:, -1]  # [rows, vocab]

    def _capture(self, bucket: dict) -> None:
        """Warm up on a side stream (writes the same K/V the real step will), then capture the step."""
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._forward(bucket)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                bucket["logits"] = self._forward(bucket)
                bucket["greedy"] = bucket["logits"].argmax(dim=-1)
            bucket["graph"] = graph
            log.debug("captured a CUDA graph for %d rows x %d tokens", bucket["rows"], bucket["kv_length"])
        except Exception as err:
            log.warning("CUDA graph capture failed (%s: %s); decoding without graphs", type(err).__name__, err)
            self.cuda_graphs = False
            bucket["graph"] = None


def _check_gpu_memory(layer_devices: list, per_layer: int, slots: int, context: int) -> None:
    """Fail with advice, not an out-of-memory trace, when the KV cache cannot fit next to the weights."""
    needed = Counter(layer_devices)
    for device, layers in needed.items():
        if device.type != "cuda":
            continue
        free, _ = torch.cuda.mem_get_info(device)
        if layers * per_layer > 0.9 * free:
            raise VicunaflowError(
                f"the KV cache for {slots} requests x {context} tokens needs {layers * per_layer / 2**30:.1f} GiB "
                f"on {device}, {free / 2**30:.1f} GiB are free; lower --max-batch-size or --max-context"
            )


# ---------------------------------------------------------------------------------------------------------
# The engine


@dataclasses.dataclass
class DecodeStep:
    """A launched decode step: the rows it ran for, its sampled tokens (device) and their host copy."""

    rows: list[Request]
    tokens: torch.Tensor
    host: torch.Tensor
    done: torch.cuda.Event | None


class Engine:
    """Continuous batching over one model: requests join and leave a running batch.

    `submit()` is thread-safe and returns at once; events reach the request's `sink` from the
    engine thread. `generate()` is the blocking, iterator form used by the chat CLI and the bench.

    With `overlap` the engine keeps one decode step queued ahead: step t+1 is launched from step t's
    sampled tokens (still on the device) before the host detokenises and streams step t, so the GPU
    never waits for that host work. A row whose request ends at step t wastes its slot of step t+1;
    the batch only changes (admissions, finished rows) once no step is in flight.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch_size: int = 16,
        max_context: int | None = None,
        prefill_tokens: int = 4096,
        seed: int | None = None,
        cuda_graphs: bool = True,
        padded_decode: bool | None = None,
        fused_decode: bool | None = None,
        decode_kernels: bool | None = None,
        overlap: bool | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.context = context_length(model, max_context)
        self.max_batch_size = max_batch_size
        self.prefill_tokens = max(prefill_tokens, self.context)  # one longest prompt always fits a prefill
        self.eos_id = tokenizer.eos_token_id
        self.device = model.get_input_embeddings().weight.device
        self.layer_devices = [layer.input_layernorm.weight.device for layer in model.model.layers]
        self.cache = SlotCache(model, max_batch_size, self.context)
        single_gpu = self.device.type == "cuda" and len(set(self.layer_devices)) == 1
        quantized = getattr(model.config, "quantization_config", None) is not None
        # bitsandbytes kernels and multi-GPU hooks are not replayed from a graph
        cuda_graphs = cuda_graphs and single_gpu and not quantized
        padded_decode = cuda_graphs if padded_decode is None else padded_decode
        fused_decode = cuda_graphs if fused_decode is None else fused_decode
        fused_decode = fused_decode and len(set(self.layer_devices)) == 1 and FusedDecoder.supports(model)
        decode_kernels = fused_decode if decode_kernels is None else decode_kernels
        decode_kernels = decode_kernels and fused_decode and FusedDecoder.supports_kernels(model)
        self.runner = DecodeRunner(
            model,
            self.cache,
            self.layer_devices,
            padded=padded_decode,
            cuda_graphs=cuda_graphs,
            fused=fused_decode,
            kernels=decode_kernels,
        )
        self.overlap = self.device.type == "cuda" if overlap is None else overlap  # CPU kernels run synchronously
        self.in_flight: DecodeStep | None = None  # launched, its tokens not yet read on the host
        pinned = self.device.type == "cuda"
        self.host_tokens = [torch.zeros(max_batch_size, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self.launches = 0
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(7), "little"))
        self.rows: list[Request] = []  # active requests; row i of the cache belongs to rows[i]
        self.lengths: list[int] = []  # tokens in the cache per row
        self.last_tokens: list[int] = []  # sampled, not yet in the cache
        self.waiting: deque[Request] = deque()
        self.lock = threading.Condition()
        self.running = False
        self.thread: threading.Thread | None = None
        self.stats = {"steps": 0, "decode_tokens": 0, "prefills": 0, "max_batch": 0, "requests": 0, "cancelled": 0}
        self.stats["queued_ahead"] = 0  # steps launched while the previous one was still in flight
        self.batch_sizes: Counter[int] = Counter()
        log.info(
            "engine: %d slots x %d tokens, KV cache %.1f MiB, CUDA graphs %s, fused decode step %s%s, overlap %s",
            max_batch_size,
            self.context,
            self.cache.nbytes() / 2**20,
            "on" if cuda_graphs else "off",
            "on" if fused_decode else "off",
            " with Triton matvec" if decode_kernels else "",
            "on" if self.overlap else "off",
        )

    # -- public API ---------------------------------------------------------------------------------------

    def start(self) -> Engine:
        if not self.running:
            self.running = True
            self.thread = threading.Thread(target=self._loop, name="vicunaflow-engine", daemon=True)
            self.thread.start()
        return self

    def stop(self) -> None:
        with self.lock:
            self.running = False
            self.lock.notify_all()
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, sink: Callable[[Event], None]) -> Request:
        if not prompt_ids:
            raise ValueError("empty prompt")
        if len(prompt_ids) >= self.context:
            raise VicunaflowError(f"the prompt is {len(prompt_ids)} tokens; the context is {self.context} tokens")
        request = Request(prompt_ids, params, sink, self.tokenizer)
        with self.lock:
            self.waiting.append(request)
            self.stats["requests"] += 1
            self.lock.notify_all()
        return request

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[Event]:
        """Submit one request and yield its events; closing the iterator early cancels the request."""
        import queue

        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        request = self.submit(prompt_ids, params, events.put)
        try:
            while True:
                event = events.get()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            request.cancel()

    def max_new_tokens(self, prompt_length: int, requested: int | None) -> int:
        """Cap a reply so prompt + reply fit the context."""
        room = self.context - prompt_length
        return max(0, min(requested, room) if requested else room)

    def snapshot_stats(self) -> dict:
        with self.lock:
            return {
                **self.stats,
                "active": sum(not r.done for r in self.rows),
                "waiting": len(self.waiting),
                "batch_sizes": dict(sorted(self.batch_sizes.items())),
                "max_batch_size": self.max_batch_size,
                "context": self.context,
                "cuda_graphs": self.runner.cuda_graphs,
                "fused_decode": self.runner.fused is not None,
                "decode_kernels": self.runner.fused is not None and self.runner.fused.kernels,
                "overlap": self.overlap,
            }

    # -- the loop -----------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.lock:
                while self.running and not self.rows and not self.waiting:
                    self.lock.wait()
                if not self.running:
                    break
                admitted = self._take_waiting()
            try:
                self._drop_finished()
                if admitted:
                    self._drain()  # new rows join a batch with no step in flight
                    self._prefill(admitted)
                self._drop_finished()
                if self.rows:
                    self._decode_step()
            except Exception as err:  # a failed step fails its requests, not the server
                log.exception("generation step failed")
                for request in self.rows + admitted:
                    if not request.done:
                        self._finish(request, "error", error=f"{type(err).__name__}: {err}")
                self.rows, self.lengths, self.last_tokens, self.in_flight = [], [], [], None
        for request in self.rows + list(self.waiting):
            self._finish(request, "cancelled")

    def _take_waiting(self) -> list[Request]:
        """Pop as many waiting requests as there are free rows and prefill budget."""
        admitted: list[Request] = []
        budget = self.prefill_tokens
        while self.waiting and len(self.rows) + len(admitted) < self.max_batch_size:
            request = self.waiting[0]
            if request.cancelled:
                self.waiting.popleft()
                self._finish(request, "cancelled")
                continue
            longest = max([len(r.prompt_ids) for r in admitted] + [len(request.prompt_ids)])
            if admitted and longest * (len(admitted) + 1) > budget:
                break
            admitted.append(self.waiting.popleft())
        return admitted

    @torch.inference_mode()
    def _prefill(self, requests: list[Request]) -> None:
        """Run all new prompts in one padded forward, writing rows len(self.rows)... of the cache."""
        first_row, n = len(self.rows), len(requests)
        length = max(len(r.prompt_ids) for r in requests)
        input_ids = torch.zeros(n, length, dtype=torch.long)
        for i, request in enumerate(requests):
            input_ids[i, : len(request.prompt_ids)] = torch.tensor(request.prompt_ids)
        prompt_lengths = torch.tensor([len(r.prompt_ids) for r in requests], device=self.device)
        positions = torch.arange(length, device=self.device)
        # mask[b, 0, q, k]: causal, and keys of a shorter prompt stop at its end (padding is never attended)
        mask = (positions[None, :] <= positions[:, None])[None] & (
            positions[None, None, :] < prompt_lengths[:, None, None]
        )
        self.cache.for_prefill(first_row, n, length)
        hidden = self.model.model(
            input_ids=input_ids.to(self.device),
            attention_mask=mask[:, None],
            position_ids=positions[None].expand(n, length),
            use_cache=True,
            **{self.runner.cache_keyword: self.cache},
        ).last_hidden_state  # [n, length, dim]
        last = hidden[torch.arange(n, device=hidden.device), prompt_lengths.to(hidden.device) - 1]  # [n, dim]
        logits = self.model.lm_head(last)  # [n, vocab]
        tokens = self._sample(logits, logits.argmax(dim=-1), requests).tolist()
        self.stats["prefills"] += 1
        for request, token in zip(requests, tokens, strict=True):
            self.rows.append(request)
            self.lengths.append(len(request.prompt_ids))
            self.last_tokens.append(token)
            self._emit(request, token)

    @torch.inference_mode()
    def _decode_step(self) -> None:
        """Feed each row its last sampled token at its own position; read and emit one step's tokens.

        With overlap, the step after the one in flight is queued first (from its tokens on the device),
        unless the batch is about to change: a request waits, a row is done, or a row could reach its
        length limit with the token in flight.
        """
        if self.in_flight is None:
            self.in_flight = self._launch(self.last_tokens)
        queued = None
        if self.overlap and self._batch_stays():
            queued = self._launch(self.in_flight.tokens)
            self.stats["queued_ahead"] += 1
        self._collect(self.in_flight)
        self.in_flight = queued

    def _batch_stays(self) -> bool:
        """True when every row will still be running after the step in flight, as far as the host can tell."""
        if self.waiting:
            return False
        for request, length in zip(self.rows, self.lengths, strict=True):
            generated = request.completion_tokens + 1  # with the token in flight
            if request.done or request.cancelled or length + 1 >= self.context:
                return False
            if generated >= request.params.max_new_tokens or len(request.prompt_ids) + generated >= self.context:
                return False
        return True

    def _launch(self, tokens: list[int] | torch.Tensor) -> DecodeStep:
        """Queue one decode step and the copy of its sampled tokens to the host; returns without waiting."""
        n = len(self.rows)
        logits, greedy = self.runner.step(tokens, self.lengths)
        sampled = self._sample(logits, greedy, self.rows)  # [n] on the device
        host = self.host_tokens[self.launches % 2][:n]  # last used two launches ago, and read since
        self.launches += 1
        host.copy_(sampled, non_blocking=host.is_pinned())
        done = None
        if sampled.device.type == "cuda":
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(sampled.device))
        self.lengths = [length + 1 for length in self.lengths]  # the step writes each row's token into the cache
        return DecodeStep(list(self.rows), sampled, host, done)

    def _collect(self, step: DecodeStep) -> None:
        """Wait for a launched step's tokens and emit them (the batch has not changed since its launch)."""
        if step.done is not None:
            step.done.synchronize()
        tokens = step.host.tolist()
        n = len(tokens)
        self.stats["steps"] += 1
        self.stats["decode_tokens"] += n
        self.stats["max_batch"] = max(self.stats["max_batch"], n)
        self.batch_sizes[n] += 1
        for i, (request, token) in enumerate(zip(step.rows, tokens, strict=True)):
            self.last_tokens[i] = token
            if not request.done:
                self._emit(request, token)

    def _drain(self) -> None:
        """Read the step in flight, if any, so the batch can change."""
        if self.in_flight is not None:
            step, self.in_flight = self.in_flight, None
            self._collect(step)

    def _sample(self, logits: torch.Tensor, greedy: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """Per-row temperature and nucleus (top-p) sampling; temperature 0 is greedy (greedy: argmax per row).

        logits: [n, vocab]; returns [n] token ids on the device. Every choice is made on the host: no sync.
        """
        if all(r.params.temperature <= 1e-5 for r in requests):
            return greedy
        logits = logits.float()
        temperature = torch.tensor([r.params.temperature for r in requests], device=logits.device)
        probs = torch.softmax(logits / temperature.clamp(min=1e-5)[:, None], dim=-1)
        top_p = torch.tensor([r.params.top_p for r in requests], device=logits.device)
        if any(r.params.top_p < 1.0 for r in requests):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p[:, None]
            sorted_probs = sorted_probs.masked_fill(outside, 0.0)
            picked = torch.multinomial(sorted_probs, 1, generator=self.generator)  # [n, 1]
            sampled = order.gather(-1, picked)[:, 0]
        else:
            sampled = torch.multinomial(probs, 1, generator=self.generator)[:, 0]
        return torch.where(temperature <= 1e-5, greedy, sampled)

    # -- bookkeeping --------------------------------------------------------------------------------------

    def _emit(self, request: Request, token: int) -> None:
        """Send the new text of one sampled token; finish on EOS, a stop string or the length limit."""
        if token == self.eos_id and not request.params.ignore_eos:
            tail = request.held + request.decoder.flush()
            request.decoder.ids.append(token)
            request.held = ""
            self._finish(request, "stop", text=tail)
            return
        request.held += request.decoder.push(token)
        stop_at = _find_stop(request.held, request.params.stop)
        if stop_at is not None:
            self._finish(request, "stop", text=request.held[:stop_at])
            return
        n_generated = request.completion_tokens
        prompt_full = len(request.prompt_ids) + n_generated >= self.context
        if n_generated >= request.params.max_new_tokens or prompt_full:
            self._finish(request, "length", text=request.held + request.decoder.flush())
            return
        keep = _stop_prefix_length(request.held, request.params.stop)
        ready, request.held = request.held[: len(request.held) - keep], request.held[len(request.held) - keep :]
        if ready:
            request.text += ready
            request.sink(Event(ready, prompt_tokens=len(request.prompt_ids), completion_tokens=n_generated))

    def _finish(self, request: Request, reason: str, text: str = "", error: str | None = None) -> None:
        if request.done:
            return
        request.done = True
        if reason == "cancelled":
            self.stats["cancelled"] += 1
        request.text += text
        with contextlib.suppress(Exception):
            request.sink(
                Event(
                    text,
                    finish_reason=reason,
                    prompt_tokens=len(request.prompt_ids),
                    completion_tokens=request.completion_tokens,
                    error=error,
                )
            )

    def _drop_finished(self) -> None:
        """Free the rows of finished or cancelled requests, moving the last rows into the gaps."""
        if any(r.done or r.cancelled for r in self.rows):
            self._drain()
        i = 0
        while i < len(self.rows):
            request = self.rows[i]
            if request.cancelled and not request.done:
                self._finish(request, "cancelled")
            if not request.done:
                i += 1
                continue
            last = len(self.rows) - 1
            if i != last:
                self.cache.move_row(last, i, self.lengths[last])
                self.rows[i], self.lengths[i], self.last_tokens[i] = (
                    self.rows[last],
                    self.lengths[last],
                    self.last_tokens[last],
                )
            self.rows.pop()
            self.lengths.pop()
            self.last_tokens.pop()


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    positions = [text.find(s) for s in stops if s and s in text]
    return min(positions) if positions else None


def _stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that could start a stop string (held back until decided)."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                longest = max(longest, k)
                break
    return longest


def timed(events: Iterator[Event]) -> tuple[str, Event, float]:
    """Drain an event iterator; return (text, last event, seconds). For prompts mode and benchmarks."""
    start = time.perf_counter()
    text, last = "", Event("")
    for last in events:
        text += last.text
    return text, last, time.perf_counter() - start

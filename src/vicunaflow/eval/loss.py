"""`vicunaflow eval loss`: mean loss and perplexity of a model on held-out conversations.

The tokens and loss masks are those of training (vicunaflow.data: the Vicuna v1.1 prompt, loss on the
assistant replies and their `</s>` only), so the number is the fine-tuning loss measured on other
data. The mean is over every trained token of every conversation (not a mean of per-batch means),
so it does not depend on the batch size; perplexity is exp(mean loss).

`--load-8bit` / `--load-4bit` measure what int8 / int4 weights cost: each layer's Linear becomes a
quant.QuantWeight quantized from the stored tensor, exactly as chat's and serve's `--load-Nbit` (and
`vicunaflow quantize`) make it, and the products run through quant.qlinear (decode, then matmul;
on CUDA in half precision, a batch of at most quant_kernels.MATMUL_MAX_ROWS tokens takes the Triton kernels).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Literal

from vicunaflow import VicunaflowError, require_dir

log = logging.getLogger(__name__)


def loss(
    *,
    model_path: Path,
    data: Path,
    output: Path,
    model_id: str | None = None,
    dataset: str | None = None,
    model_max_length: int = 2048,
    batch_size: int = 4,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto",
    load_8bit: bool = False,
    load_4bit: bool = False,
    overwrite: bool = False,
) -> dict:
    """Mean loss and perplexity on conversations, with the training masks (assistant replies only).

    Arguments:
        model_path: a Hugging Face model directory.
        data: held-out conversations (ShareGPT JSON or JSONL, as for `vicunaflow data tokenize`), or a
            tokenised dataset directory written by it.
        output: the JSON file to write: model, dataset, loss, perplexity, tokens, dropped (conversations
            with no reply token within model_max_length), and per conversation.
        model_id: the model's name in the file; default: the directory name.
        dataset: the dataset's name in the file; default: the data file's name without suffixes.
        model_max_length: truncate conversations to this many tokens, as training does.
        batch_size: conversations per forward pass.
        device: auto (CUDA when a GPU is visible, else CPU), cpu or cuda.
        dtype: weights' dtype; auto: the checkpoint's on CUDA, float32 on CPU. Losses are computed in float32.
        load_8bit: quantize the layers' weights to int8 as they load, as chat and serve do (docs/quantize.md).
        load_4bit: quantize them to int4 (a scale and zero per 128 input columns).
        overwrite: replace output files that exist but are not this verb's unchanged earlier outputs (default: refuse).
    """
    from vicunaflow.data import (
        Sample,
        check_tokenizer_of,
        encode_all,
        load_conversations,
        load_tokenized,
        load_tokenizer,
    )
    from vicunaflow.outputs import atomic_write_bytes, check_output_files, sha256_file
    from vicunaflow.quant import refuse_quantized

    log.info(
        "eval loss: model_path=%s data=%s output=%s model_max_length=%d batch_size=%d device=%s dtype=%s "
        "load_8bit=%s load_4bit=%s",
        model_path, data, output, model_max_length, batch_size, device, dtype, load_8bit, load_4bit,
    )  # fmt: skip
    if batch_size < 1:
        raise VicunaflowError(f"--batch-size {batch_size}: must be at least 1")
    if load_8bit and load_4bit:
        raise VicunaflowError("--load-8bit and --load-4bit: choose one")
    bits = 8 if load_8bit else 4 if load_4bit else None
    refuse_quantized(model_path, "--model-path")
    check_output_files({"--output": output}, inputs=[data, model_path], overwrite=overwrite)
    from vicunaflow.engine.build import check_folder

    check_folder(Path(model_path))  # transformers would start a layer missing from the weights at random
    data = Path(data)
    if data.is_dir():
        whole, meta = load_tokenized(data)
        check_tokenizer_of(data, meta, model_path)
        truncated = [Sample(s.id, s.input_ids[:model_max_length], s.labels[:model_max_length]) for s in whole]
    else:
        whole = load_conversations(data)
        truncated = encode_all(whole, load_tokenizer(model_path), model_max_length, drop_untrained=False)
    samples = [s for s in truncated if _trained_tokens(s.labels)]  # the rest would divide by zero tokens
    dropped = len(whole) - len(samples)
    if not samples:
        raise VicunaflowError(
            f"{data}: none of its {len(whole)} conversations has a reply token within --model-max-length "
            f"{model_max_length}; raise --model-max-length"
        )
    if dropped:
        log.warning(
            "dropped %d of %d conversations: no reply token within %d tokens", dropped, len(whole), model_max_length
        )
    model = _load_model(model_path, device, dtype)
    if bits:
        quantize_layers(model, model_path, bits)
    started = time.perf_counter()
    per_sample = sample_losses(model, samples, batch_size)
    total = sum(nll for nll, _ in per_sample)
    tokens = sum(n for _, n in per_sample)
    mean = total / tokens
    result = {
        "model": model_id or Path(model_path).name,
        "dataset": dataset or data.name.split(".")[0],
        "loss": mean,
        "perplexity": math.exp(mean),
        "tokens": tokens,
        "conversations": len(samples),
        "dropped": dropped,  # conversations with no reply token within model_max_length: not counted
        "model_max_length": model_max_length,
        "dtype": str(model.get_input_embeddings().weight.dtype).removeprefix("torch."),
        # the layers' Linear weights: null (float, the dtype above), or int8 / int4 as chat's --load-Nbit
        "quantization": None if bits is None else quantization_block(bits),
        "data": str(data),
        "data_sha256": sha256_file(data) if data.is_file() else None,
        "samples": [
            {"id": s.id, "tokens": n, "loss": nll / n} for s, (nll, n) in zip(samples, per_sample, strict=True)
        ],
    }
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(output, (json.dumps(result, indent=1) + "\n").encode())
    log.info(
        "%s on %s: loss %.4f, perplexity %.3f over %d tokens of %d conversations (%.1fs)",
        result["model"], result["dataset"], mean, result["perplexity"], tokens, len(samples),
        time.perf_counter() - started,
    )  # fmt: skip
    return result


def sample_losses(model, samples, batch_size: int) -> list[tuple[float, int]]:
    """(summed loss in nats, trained tokens) of each sample, in order; batched by similar length."""
    import torch

    from vicunaflow.data import IGNORE_INDEX

    device = model.get_input_embeddings().weight.device
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids))  # little padding per batch
    results: list[tuple[float, int]] = [(0.0, 0)] * len(samples)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = [samples[i] for i in order[start : start + batch_size]]
            length = max(len(s.input_ids) for s in batch)
            input_ids = torch.zeros(len(batch), length, dtype=torch.long)  # [B, T], right-padded
            labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)  # [B, T]
            attention_mask = torch.zeros(len(batch), length, dtype=torch.long)  # [B, T]
            for row, sample in enumerate(batch):
                n = len(sample.input_ids)
                input_ids[row, :n] = torch.tensor(sample.input_ids)
                labels[row, :n] = torch.tensor(sample.labels)
                attention_mask[row, :n] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits  # [B, T, V]
            # token t+1 is predicted from positions <= t, as in training
            targets = labels[:, 1:].to(device)  # [B, T-1]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
            )  # [B, T-1]
            counted = (targets != IGNORE_INDEX).sum(dim=1)  # [B]
            for row, index in enumerate(order[start : start + batch_size]):
                results[index] = (nll[row].sum().item(), int(counted[row]))
    return results


def _trained_tokens(labels) -> int:
    """Tokens a sample's loss is taken over: the labels after the first (position t predicts t + 1)."""
    from vicunaflow.data import IGNORE_INDEX

    return sum(label != IGNORE_INDEX for label in labels[1:])


def quantization_block(bits: int) -> dict:
    from vicunaflow import quant

    return {"bits": bits, "group_size": quant.DEFAULT_GROUP_SIZE if bits == 4 else None}


def quantize_layers(model, model_path: Path, bits: int) -> int:
    """Swap each layer's Linear (q, k, v, o, gate, up, down) for a quant.QuantWeight; returns how many.

    Quantized from the stored tensor on the model's device, as the engine's --load-Nbit does, not from
    the loaded copy: a float16 copy of a float32 folder would round once more and give other codes.
    Embeddings and norms stay float, and lm_head too unless the layers are int4, as in chat and serve.
    """
    from vicunaflow import quant
    from vicunaflow.checkpoint import Checkpoint

    device = model.get_input_embeddings().weight.device
    names = [name for name, _ in model.named_modules() if quant.QUANTIZED_WEIGHT.fullmatch(f"{name}.weight")]
    with Checkpoint(model_path) as reader:
        for name in names:
            parent, _, child = name.rpartition(".")
            weight = quant.load_weight(reader, f"{name}.weight", bits, quant.DEFAULT_GROUP_SIZE, device)
            setattr(model.get_submodule(parent), child, weight)  # QuantWeight(x) is qlinear(x, weight)
            reader.release()
        if bits == 4 and names:  # lm_head in int4 beside int4 layers, as engine/build.py lays it out
            tied = model.config.tie_word_embeddings
            source = reader.get("model.embed_tokens.weight" if tied else "lm_head.weight").to(device)
            model.lm_head = quant.quantize(source, 4, quant.DEFAULT_GROUP_SIZE)
            reader.release()
    if not names:
        raise VicunaflowError(f"{model_path}: no layer weight to quantize (expected LLaMA's q_proj ... down_proj)")
    log.info("quantized %d layer weights to int%d as they loaded", len(names), bits)
    return len(names)


def _load_model(model_path: Path, device: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    from vicunaflow.formats import DTYPES

    require_dir(model_path, "model directory")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    torch_dtype = DTYPES[dtype] if dtype != "auto" else ("auto" if cuda else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch_dtype)
    return model.to("cuda" if cuda else "cpu").eval()

"""How much each quantization choice costs: rounding and zero point for int4, and AWQ-style scaling.

Why: quant.py's choices (int8 symmetric per row; int4 asymmetric per group with a float zero and a
per-group range search, round to nearest) should be the cheapest in error among the simple ones, and activation-aware
scaling (AWQ: per-input-channel scales s = mean|x|^alpha searched per Linear on calibration
text, W -> Q(W * s) / s) is worth its complexity only if it measurably lowers the error.
Measured on a model folder (the tiny Vicuna, or any float LLaMA folder) on the CPU in float32:
- weights: relative Frobenius error ||Q(W) - W|| / ||W|| over all Linear weights;
- model: relative logit error ||logits_q - logits|| / ||logits|| and top-1 agreement on held-out
  conversations (vicunaflow's built-in set: the first half calibrates, the second half evaluates).
Writes results/quant_error.json.

    python bench/quant_error.py --model-path vicuna-tiny-all-v1.1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vicunaflow import BUILTIN_CONVERSATIONS, quant

HERE = Path(__file__).resolve().parent


# ---- int4 schemes compared with quant.quantize (all group-wise, round to nearest) -------------------


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, groups, group_size], a short last group padded with its last column (as quant does)."""
    n, k = w.shape
    pad = -k % group_size
    w = torch.cat([w.float(), w.float()[:, -1:].expand(n, pad)], dim=1)
    return w.view(n, -1, group_size)


def ungroup(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return g.reshape(w.shape[0], -1)[:, : w.shape[1]]


def int4_symmetric(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Codes -8..7, scale = max|w| / 7 (one code spent on -8, used only by the most negative)."""
    g = grouped(w, group_size)
    scale = (g.abs().amax(dim=2, keepdim=True) / 7).clamp_min(1e-12).half().float()
    return ungroup(torch.round(g / scale).clamp(-8, 7) * scale, w)


def int4_integer_zero(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """GPTQ / AWQ: scale = (max - min) / 15, integer zero point z = round(-min / scale)."""
    g = grouped(w, group_size)
    low, high = g.amin(dim=2, keepdim=True), g.amax(dim=2, keepdim=True)
    scale = ((high - low) / 15).clamp_min(1e-12).half().float()
    zero = torch.round(-low / scale).clamp(0, 15)
    return ungroup(((torch.round(g / scale) + zero).clamp(0, 15) - zero).mul(scale), w)


def int4_float_zero_full_range(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """quant.quantize without its range search: zero = group min (float16), scale = (max - min) / 15."""
    ratios, quant.CLIP_RATIOS = quant.CLIP_RATIOS, (1.0,)
    try:
        return quant.quantize(w, 4, group_size).dequantize(torch.float32)
    finally:
        quant.CLIP_RATIOS = ratios


def int4_ours(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """quant.quantize: float zero, each group's range shrunk by the CLIP_RATIOS entry of least error."""
    return quant.quantize(w, 4, group_size).dequantize(torch.float32)


SCHEMES = {
    "int8 symmetric per row": lambda w, g: quant.quantize(w, 8).dequantize(torch.float32),
    "int4 symmetric": int4_symmetric,
    "int4 integer zero (GPTQ/AWQ)": int4_integer_zero,
    "int4 float zero, full range": int4_float_zero_full_range,
    "int4 float zero + range search (ours)": int4_ours,
}


# ---- AWQ-style scaling --------------------------------------------------------------------------


def awq_weight(w: torch.Tensor, x: torch.Tensor, fake_quant, group_size: int) -> tuple[torch.Tensor, float]:
    """Q(W * s) / s with s = mean|x|^alpha, alpha in 0 ... 1 of least output error on x [T, K] (alpha 0: plain)."""
    w = w.float()
    target = x @ w.T
    magnitude = x.abs().mean(dim=0).clamp_min(1e-8)
    best, best_error, best_alpha = None, None, 0.0
    for alpha in torch.linspace(0, 1, 11).tolist():
        s = magnitude.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        decoded = fake_quant(w * s, group_size) / s
        error = float((x @ decoded.T - target).pow(2).sum())
        if best_error is None or error < best_error:
            best, best_error, best_alpha = decoded, error, alpha
    return best, best_alpha


def calibration_inputs(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The float model's input rows [T, K] to every quantized Linear on `ids`."""
    inputs, hooks = {}, []
    for name, module in model.named_modules():
        if quant.QUANTIZED_WEIGHT.fullmatch(f"{name}.weight"):
            hook = module.register_forward_hook(lambda m, args, out, name=name: inputs.__setitem__(name, args[0][0]))
            hooks.append(hook)
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return inputs


def token_batches(tokenizer, conversations: list[dict], length: int) -> torch.Tensor:
    text = "\n".join(turn["value"] for c in conversations for turn in c["conversations"])
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    usable = ids.numel() // length * length
    return ids[:usable].view(-1, length)


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, required=True)
    parser.add_argument("--length", type=int, default=128, help="tokens per evaluated sequence")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "quant_error.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    conversations = json.loads(Path(BUILTIN_CONVERSATIONS).read_text())
    half = len(conversations) // 2
    calibration = token_batches(tokenizer, conversations[:half], args.length)[:8].reshape(1, -1)
    evaluation = token_batches(tokenizer, conversations[half:], args.length)[:16]
    originals = {n: p.detach().clone() for n, p in model.named_parameters() if quant.QUANTIZED_WEIGHT.fullmatch(n)}

    @torch.no_grad()
    def logits(weights: dict[str, torch.Tensor]) -> torch.Tensor:
        params = dict(model.named_parameters())
        for name, value in weights.items():
            params[name].copy_(value)
        return torch.cat([model(row[None]).logits[0] for row in evaluation]).double()

    reference = logits(originals)

    def model_error(weights: dict[str, torch.Tensor]) -> dict:
        out = logits(weights)
        logits(originals)
        return {
            "logit_error": float((out - reference).norm() / reference.norm()),
            "top1_agreement": float((out.argmax(-1) == reference.argmax(-1)).double().mean()),
            "weight_error": float(
                sum((weights[n] - w).pow(2).sum() for n, w in originals.items()).sqrt()
                / sum(w.pow(2).sum() for w in originals.values()).sqrt()
            ),
        }

    results = {"model": str(args.model_path), "evaluated_tokens": evaluation.numel(), "schemes": {}, "awq": {}}
    for group_size in (128, 64, 32):
        for label, scheme in SCHEMES.items():
            if label.startswith("int8") and group_size != 128:
                continue
            key = label if label.startswith("int8") else f"{label}, group {group_size}"
            results["schemes"][key] = model_error({n: scheme(w, group_size) for n, w in originals.items()})
            print(key, results["schemes"][key], flush=True)

    inputs = calibration_inputs(model, calibration)
    for label in ("int8 symmetric per row", "int4 float zero + range search (ours)"):
        for group_size in (128,) if label.startswith("int8") else (128, 32):
            alphas, weights = {}, {}
            for name, w in originals.items():
                module = name.removesuffix(".weight")
                weights[name], alphas[module] = awq_weight(w, inputs[module], SCHEMES[label], group_size)
            key = label if label.startswith("int8") else f"{label}, group {group_size}"
            results["awq"][key] = {**model_error(weights), "mean_alpha": sum(alphas.values()) / len(alphas)}
            print("AWQ", key, results["awq"][key], flush=True)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

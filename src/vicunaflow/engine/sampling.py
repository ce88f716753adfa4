"""Per-request sampling settings and the sampler: temperature and nucleus (top-p) per row."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()  # stop strings (OpenAI `stop`); EOS always stops
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens


def sample(
    logits: torch.Tensor, greedy: torch.Tensor, params: Sequence[SamplingParams], generator: torch.Generator
) -> torch.Tensor:
    """One token per row: greedy (argmax, given) where temperature is 0, else sampled.

    logits: [n, vocab]; greedy: [n]; returns [n] token ids on the device. Every choice between the
    paths is made on the host from `params`, so nothing waits for the device.
    """
    if all(p.temperature <= 1e-5 for p in params):
        return greedy
    logits = logits.float()
    temperature = torch.tensor([p.temperature for p in params], device=logits.device)
    probs = torch.softmax(logits / temperature.clamp(min=1e-5)[:, None], dim=-1)
    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p for p in params], device=logits.device)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p[:, None]
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        picked = torch.multinomial(sorted_probs, 1, generator=generator)  # [n, 1]
        sampled = order.gather(-1, picked)[:, 0]
    else:
        sampled = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return torch.where(temperature <= 1e-5, greedy, sampled)

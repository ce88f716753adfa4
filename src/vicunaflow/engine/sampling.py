"""Per-request sampling settings, the sampler (temperature and nucleus top-p per row) and log-probabilities."""

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
    # None: not computed (the request pays nothing). k >= 0: each sampled token's log-probability and the
    # k most likely tokens at its position, from the raw distribution (before temperature and top-p)
    logprobs: int | None = None
    # the same for every prompt token after the first (OpenAI's echo): prefill computes every position's logits
    prompt_logprobs: int | None = None


@dataclasses.dataclass
class TokenLogprob:
    """One token of a prompt or a reply with its log-probability given the tokens before it."""

    token: int
    logprob: float | None  # None: the first prompt token (nothing before it predicts it)
    top: list[tuple[int, float]]  # the k most likely (token, logprob) at this position, most likely first


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


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log_softmax of logits [n, vocab] in float32: (logprob of tokens [n], top-k logprobs [n, k], their ids [n, k]).

    Runs on the device without waiting; the caller reads the results when it reads the step's tokens.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [n, vocab]
    chosen = logprobs.gather(-1, tokens.long()[:, None])[:, 0]
    values, ids = logprobs.topk(k, dim=-1)
    return chosen, values, ids


def to_entries(
    tokens: Sequence[int], host: tuple[list, list, list], ks: Sequence[int | None]
) -> list[TokenLogprob | None]:
    """Host lists of `logprobs_of` -> one TokenLogprob per row (None where the row did not ask)."""
    chosen, values, ids = host
    return [
        None if k is None else TokenLogprob(token, chosen[i], list(zip(ids[i][:k], values[i][:k], strict=True)))
        for i, (token, k) in enumerate(zip(tokens, ks, strict=True))
    ]

"""Per-request sampling settings, the sampler (temperature, top-k and nucleus top-p per row) and log-probabilities.

Seeded requests (`SamplingParams.seed`) are reproducible whatever the scheduling: the random numbers
behind a request's t-th reply token come from a generator seeded with (seed, t) alone, so they do not
depend on the rows it shares a step with, the draws made before it, a step queued ahead (overlap),
the prefill chunk its prompt ended in, or a preemption (a resumed request's next token is drawn with
the index it would have had anyway). Unseeded rows share the engine's generator, in batched draws.
"""

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
    # None: drawn from the engine's generator (depends on what ran alongside). An int (OpenAI's `seed`): the
    # t-th reply token is drawn from a generator seeded with (seed, t), so the same prompt, parameters and
    # seed give the same reply however the request was batched, chunked or preempted (module docstring)
    seed: int | None = None
    # the k most likely tokens only (FastChat's and vLLM's top_k); 0: all. Last: fields above are given by position
    top_k: int = 0


@dataclasses.dataclass
class TokenLogprob:
    """One token of a prompt or a reply with its log-probability given the tokens before it."""

    token: int
    logprob: float | None  # None: the first prompt token (nothing before it predicts it)
    top: list[tuple[int, float]]  # the k most likely (token, logprob) at this position, most likely first


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: nearby inputs (seed s and s + 1, token t and t + 1) give unrelated outputs."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def token_seed(seed: int, index: int) -> int:
    """The generator seed of reply token `index` of a request seeded with `seed` (any int; 63 bits out).

    A function of (seed, index) only: no generator state travels with the request, so nothing needs
    restoring when a preempted request resumes, and no other request's draws can shift it.
    """
    return _mix64(_mix64(seed & _MASK64) ^ index) >> 1


def sample(
    logits: torch.Tensor,
    greedy: torch.Tensor,
    params: Sequence[SamplingParams],
    generator: torch.Generator,
    indices: Sequence[int] | None = None,
) -> torch.Tensor:
    """One token per row: greedy (argmax, given) where temperature is 0, else sampled.

    logits: [n, vocab]; greedy: [n]; indices: each row's index of the token drawn in its reply (needed
    for seeded rows); returns [n] token ids on the device. Every choice between the paths is made on
    the host from `params`, so nothing waits for the device.

    A sampled row takes argmax(p / q) with q ~ Exp(1) per vocabulary entry (what torch.multinomial does
    for one sample), over p in vocabulary order with what top-k and top-p leave out zeroed (top-p taken over
    the top-k tokens' renormalised mass, as vLLM does): a row's token then depends only on its own p and its own
    noise. Unseeded rows' noise is one batched draw from `generator`; a seeded
    row's is drawn from a fresh generator seeded with token_seed(seed, index), on the logits' device,
    a few more kernel launches per seeded row and no host sync.
    """
    if all(p.temperature <= 1e-5 for p in params):
        return greedy
    logits = logits.float()
    temperature = torch.tensor([p.temperature for p in params], device=logits.device)
    probs = torch.softmax(logits / temperature.clamp(min=1e-5)[:, None], dim=-1)
    top_k = any(0 < p.top_k < probs.shape[-1] for p in params)
    if top_k or any(p.top_p < 1.0 for p in params):
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)  # ties: the lower token id first
        if top_k:
            k = torch.tensor([p.top_k if p.top_k > 0 else probs.shape[-1] for p in params], device=logits.device)
            outside = torch.arange(probs.shape[-1], device=logits.device)[None, :] >= k[:, None]
            sorted_probs = sorted_probs.masked_fill(outside, 0.0)
            sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
        else:
            outside = torch.zeros_like(sorted_probs, dtype=torch.bool)
        top_p = torch.tensor([p.top_p for p in params], device=logits.device)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        outside |= sorted_probs.cumsum(dim=-1) - sorted_probs > top_p[:, None]
        probs = probs.masked_fill(torch.zeros_like(outside).scatter_(-1, order, outside), 0.0)
    sampled_rows = [i for i, p in enumerate(params) if p.temperature > 1e-5]
    seeded = [i for i in sampled_rows if params[i].seed is not None]
    if len(seeded) < len(sampled_rows):  # some row draws from the shared generator
        noise = torch.empty_like(probs).exponential_(generator=generator)
    else:
        noise = torch.ones_like(probs)
    if seeded:
        if indices is None:
            raise ValueError("seeded sampling needs each row's token index")
        for i in seeded:
            own = torch.Generator(device=logits.device)
            own.manual_seed(token_seed(params[i].seed, indices[i]))
            noise[i].exponential_(generator=own)
    # an Exp(1) draw can round to 0: keep p / q finite (0 / 0 would be NaN, which argmax takes)
    sampled = (probs / noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(dim=-1)
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

"""Turning next-token logits into token ids: repetition penalty, temperature, top-k, top-p, sampling.

The order follows Hugging Face's logits processors so seeded outputs are comparable: repetition
penalty (Keskar et al. 2019, CTRL, section 4.1), temperature, top-k (Fan et al. 2018), top-p /
nucleus (Holtzman et al. 2020). All arithmetic is on fp32 logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """Make already-seen tokens less likely: positive logits divided by ``penalty``, negative multiplied.

    Args:
        logits: ``(B, V)`` fp32.
        seen: ``(B, V)`` bool, True where the token occurred in the prompt or the output so far.
        penalty: > 1 discourages repetition; 1 is a no-op. A float or a ``(B, 1)`` tensor (one per row).
    Returns:
        ``(B, V)`` logits (a new tensor).
    """
    if isinstance(penalty, float) and penalty == 1.0:
        return logits
    logits = logits.float()
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    # A tiny or huge penalty leaves fp32's range (1.5 / 1e-300 = inf, 0 * 1e300 = NaN): the largest
    # finite value ranks the same and keeps the softmax defined (inf - inf would be NaN); 0 stays 0.
    finite = torch.finfo(torch.float32).max
    penalized = torch.nan_to_num(penalized, nan=0.0, posinf=finite, neginf=-finite)
    return torch.where(seen, penalized, logits)


def scale_by_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature`` in fp32, shifted so each row's largest logit is 0.

    Total: any temperature > 0 gives 0 for the best token and a finite value or ``-inf`` for the
    others, so the softmax that follows is always a distribution (a temperature of 1e-300 is greedy,
    not NaN). The shift does not change the softmax.
    """
    logits = logits.float()
    shifted = logits - logits.amax(dim=-1, keepdim=True)  # (B, V), <= 0
    # Floor at fp32's smallest normal (1.2e-38): the scalar is cast to fp32, where 1e-40 or 1e-300
    # would be 0 (0 / 0 = NaN at the best token). Below the floor every visible gap scales to -1e30 or
    # less, probability 0, as it would with the exact temperature.
    return shifted / max(temperature, torch.finfo(torch.float32).tiny)


def temperature_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(logits / temperature)`` over the last dimension, computed as :func:`scale_by_temperature` does."""
    return torch.softmax(scale_by_temperature(logits, temperature), dim=-1)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row (``k == 0``: keep all); others become ``-inf``."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``p`` (nucleus sampling)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
    drop_sorted = mass_before >= p
    # The most likely token is always kept: a p below fp32's range (1e-300) rounds to 0, and 0 >= 0
    # would drop every token (softmax over all -inf is NaN).
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_from_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                       generators: Sequence[torch.Generator | None] | torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row.

    Args:
        logits: ``(B, V)``; upcast to fp32 here.
        temperature: 0 = greedy (argmax); otherwise logits are divided by it before sampling.
        top_k: keep the k most likely tokens (0 = all).
        top_p: nucleus mass (1 = all).
        generators: one ``torch.Generator`` per row (or one for all) for reproducible sampling.
    Returns:
        ``(B,)`` token ids (int64).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_top_p(filter_top_k(scale_by_temperature(logits, temperature), top_k), top_p)
    return sample_from_probs(torch.softmax(logits, dim=-1), generators)  # (B, V) -> (B,)


def sample_from_probs(probs: torch.Tensor,
                      generators: Sequence[torch.Generator | None] | torch.Generator | None = None) -> torch.Tensor:
    """Draw one index per row of ``probs`` (``(B, V)``, non-negative, each row's sum > 0).

    Args:
        probs: ``(B, V)`` weights; a row need not sum to 1 (``torch.multinomial`` normalizes).
        generators: one ``torch.Generator`` per row, or one for all rows.
    Returns:
        ``(B,)`` indices (int64).
    """
    if generators is None or isinstance(generators, torch.Generator):
        return torch.multinomial(probs, 1, generator=generators)[:, 0]
    return torch.cat([torch.multinomial(probs[b : b + 1], 1, generator=g)[:, 0] for b, g in enumerate(generators)])

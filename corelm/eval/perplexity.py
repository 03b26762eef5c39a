"""Perplexity of a causal LM over a long text with a sliding window.

A text longer than the context is cut into windows of ``window`` tokens whose starts are ``stride`` apart.
A token is scored once, in the first window that contains it *and* at least one token before it. With
``stride < window`` every token after the first is scored and sees at least ``window - stride`` tokens of
context (Hugging Face's "perplexity of fixed-length models" recipe); ``stride == window`` gives disjoint
chunks (fast, pessimistic), whose first tokens have no context and are not scored.

Logits are computed only for the scored positions (hidden states -> LM head on a slice), so memory stays
``O(scored tokens x vocab)`` instead of ``O(window x vocab)`` -- evaluation should not run out of memory
where training did not.

A model that decodes on corelm's C++ step (a quantized decoder on the CPU, see
:func:`corelm.generate.step.step_for`) is scored on that step, window by window in one cache: the same
kernels as its generation, fp32 activations, and corelm's thread pool instead of OpenMP regions (measured
on the embedded SmolLM2, 2048 tokens of standard-library source, 2-core Zen 4 shared at load 3.3-3.7:
14-18 s against 88-103 s for the PyTorch forward of the same quantized layers; perplexity 7.886 against
the PyTorch forward's 7.909 in bf16 activations and the fp32 model's 7.896).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from corelm.models import head_logits


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """The ``(begin, first_scored, end)`` of each window; targets ``first_scored..end-1`` are scored."""
    if window < 2 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 2 and 1 <= stride <= window, got window={window}, stride={stride}")
    out, scored_to = [], 1  # token 0 has no context and is never scored
    for begin in range(0, max(n_tokens - 1, 1), stride):
        end = min(begin + window, n_tokens)
        first = max(scored_to, begin + 1)
        if first < end:
            out.append((begin, first, end))
            scored_to = end
        if end == n_tokens:
            break
    return out


def _logits_at(model: torch.nn.Module, ids: torch.Tensor, positions: slice) -> torch.Tensor:
    """Logits ``(len(positions), V)`` of one row, from hidden states when the model exposes them."""
    if hasattr(model, "hidden_states") and hasattr(model, "lm_head"):
        hidden = model.hidden_states(ids)[0, positions]  # (n, d)
        return head_logits(model, hidden)
    return model(ids)[0, positions]


def _kernel_step(model: torch.nn.Module) -> object | None:
    """The model's C++ decoder step when it has one (a quantized decoder on the CPU, in eval mode), else None."""
    from corelm.generate.step import kernel_step_supported, step_for

    if model.training or getattr(model, "config", None) is None or kernel_step_supported(model) is not None:
        return None
    return step_for(model)


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: Sequence[int] | torch.Tensor, window: int = 512,
               stride: int | None = None, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Sliding-window perplexity of ``ids`` under a causal LM.

    Args:
        model: Decoder with ``model(ids[1, T]) -> logits[1, T, V]`` (DESIGN.md), in eval mode.
        ids: Token ids of the whole text.
        window: Tokens per forward pass (at most the model's context).
        stride: Distance between window starts; default ``window // 2``.
        progress: Called with the number of tokens scored after each window.

    Returns:
        ``{"perplexity", "nll" (mean per token, nats), "tokens" (scored), "window", "stride"}``.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    stride = stride or max(window // 2, 1)
    if ids.numel() < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    device = next(model.parameters()).device
    step = _kernel_step(model)
    cache = step.new_cache(1, window) if step is not None else None
    total, count = 0.0, 0
    for begin, first, end in windows(ids.numel(), window, stride):
        chunk = ids[begin:end].to(device)[None]  # (1, end - begin)
        # logits at position j predict token j + 1
        if step is not None:
            logits = step.extend(cache, 0, chunk[0].tolist(), 0, at=torch.arange(first - begin - 1, end - begin - 1))
        else:
            logits = _logits_at(model, chunk, slice(first - begin - 1, end - begin - 1))
        targets = chunk[0, first - begin:end - begin]
        # the loss upcasts to fp32: log-softmax over a 49k vocabulary loses digits in bf16
        total += F.cross_entropy(logits.float(), targets, reduction="sum").item()
        count += end - first
        if progress:
            progress(end - first)
    nll = total / count
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": count, "window": window, "stride": stride}

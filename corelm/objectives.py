"""Pretraining objectives: causal LM (next-token cross-entropy) and BERT's masked LM (+ NSP).

Each loss has the loop's signature ``loss_fn(model, batch) -> (mean loss, metrics)``. Logits are
upcast to fp32 before the softmax: under bf16 autocast the log-sum-exp over a large vocabulary
loses the precision the gradient needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


def causal_lm_loss(model: nn.Module, batch: torch.Tensor | dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Next-token cross-entropy.

    Args:
        model: decoder, ``model(input_ids) -> logits (B, T, V)``.
        batch: packed token windows ``(B, T+1)`` (inputs are ``[:, :-1]``, targets ``[:, 1:]``), or a dict
            with ``input_ids (B, T)`` and ``labels (B, T)`` already shifted, ``-100`` where ignored.

    Returns:
        Mean loss over predicted tokens, and ``{"n_tokens": count}``.
    """
    if isinstance(batch, dict):
        inputs, targets = batch["input_ids"], batch["labels"]
    else:
        inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(inputs)  # (B, T, V)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    return loss, {"n_tokens": int((targets != IGNORE).sum())}

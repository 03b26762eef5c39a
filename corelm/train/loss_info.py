"""What a loss function returns besides the loss: the tokens it covered and metrics to log.

A loss function (``loss_fn(model, batch) -> (loss, info)``) may return, as ``info``, the number of
tokens, a dict of metrics (optionally with ``n_tokens``), or None; the training loop and the pipeline
schedule read it the same way through :func:`split_loss_info`.
"""

from __future__ import annotations

from typing import Any

import torch


def split_loss_info(info: int | dict[str, Any] | None, batch: Any) -> tuple[int, dict[str, float]]:
    """``(tokens, metrics)`` from a loss function's ``info``; tokens default to the batch's first tensor's size."""
    if isinstance(info, dict):
        metrics = {k: float(v) for k, v in info.items()
                   if k != "n_tokens" and isinstance(v, (int, float, torch.Tensor))}
        n = info.get("n_tokens")
    else:
        metrics, n = {}, info
    if n is None:
        first = (batch if isinstance(batch, torch.Tensor)
                 else next(iter(batch.values())) if isinstance(batch, dict) else None)
        n = first.numel() if isinstance(first, torch.Tensor) else 0
    return int(n), metrics

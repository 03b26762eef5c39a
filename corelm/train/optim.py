"""AdamW with decoupled weight decay (or SGD with momentum), and the warmup + cosine learning-rate schedule.

Weight decay (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization") shrinks matrices
toward zero; it is not applied to biases, norm gains or embeddings, whose scale carries meaning
(the GPT-3 and nanoGPT recipes do the same).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split the trainable parameters of ``model`` into a decayed and a non-decayed group.

    Decayed: matrices of ``nn.Linear`` (and other >= 2-D weights that are not embeddings).
    Not decayed: biases, norm weights (anything 1-D) and embedding tables (``nn.Embedding``),
    including an LM head tied to the token embedding.

    Args:
        model: the unwrapped model; parameters with ``requires_grad=False`` are skipped, which is how
            a caller selects what trains (freeze first, then build the optimizer).
        weight_decay: decoupled decay coefficient for the decayed group.

    Returns:
        Parameter groups for ``torch.optim.AdamW``; each group carries ``names`` for logging.
    """
    embedding_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in model.named_parameters():  # shared (tied) parameters are listed once
        if not p.requires_grad:
            continue
        if p.ndim < 2 or id(p) in embedding_params:
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "names": decay_names})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "names": no_decay_names})
    return groups


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    groups: Iterable[dict] | None = None,
    kind: str = "adamw",
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """AdamW (or SGD) over the trainable parameters of ``model`` (or over caller-given ``groups``).

    ``kind="sgd"``: stochastic gradient descent with heavy-ball momentum (Polyak 1964; Sutskever et al.
    2013), ``v = momentum * v + g; w -= lr * v``; its weight decay is the classic L2 term added to the
    gradient, on the same groups AdamW decays. ``betas`` and ``eps`` are AdamW's only.

    ``foreach`` is on: one fused multi-tensor kernel per group instead of a Python loop per tensor.
    Each group remembers its base ``lr`` as ``initial_lr`` so the schedule scales it.
    """
    groups = list(groups) if groups is not None else param_groups(model, weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters (every requires_grad is False)")
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    if kind == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(clean, lr=lr, momentum=momentum, foreach=True)
    elif kind == "adamw":
        opt = torch.optim.AdamW(clean, lr=lr, betas=betas, eps=eps, foreach=True)
    else:
        raise ValueError(f"unknown optimizer {kind!r}; expected adamw or sgd")
    for g in opt.param_groups:
        g.setdefault("initial_lr", g["lr"])
    return opt


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Linear warmup from ``1/warmup`` to 1 over ``warmup_steps``, then cosine decay to ``min_ratio`` at
    ``total_steps`` (as in GPT-3, Brown et al. 2020, sec. B). A pure function of the step, so resuming
    restores the schedule exactly from the saved step count.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Scale every group's ``initial_lr`` by ``factor``; return the first group's new lr."""
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * factor
    return optimizer.param_groups[0]["lr"]

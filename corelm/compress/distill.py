"""Knowledge distillation (Hinton et al. 2015) through corelm's one training loop.

The student learns from the teacher's whole next-token distribution, softened by a temperature
``T``, mixed with the ordinary next-token loss on the data:

    loss = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)

The ``T^2`` keeps the soft term's gradient scale independent of ``T`` (Hinton et al., sec. 2).
Teacher and student must share the tokenizer (same vocabulary); the teacher is frozen and runs
under ``no_grad``. Everything else -- optimizer, schedule, precision, compile, checkpoints, exact
resume, torchrun -- is :func:`corelm.train.loop.train`, unchanged: distillation is only a loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from corelm.errors import CorelmError

IGNORE = -100


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            temperature: float = 2.0, alpha: float = 0.5) -> tuple[torch.Tensor, dict[str, float]]:
    """The distillation loss on logits ``(B, T, V)`` and targets ``(B, T)`` (``-100`` = ignored).

    Returns:
        ``(loss, {"kd": soft term, "ce": hard term})``; softmaxes run in fp32 (a 49k-way log-sum-exp
        in bf16 loses the small probabilities the soft targets are made of).
    """
    keep = targets != IGNORE
    s = student_logits.float()[keep]  # (N, V)
    t = teacher_logits.float()[keep]
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    kd = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * temperature**2
    ce = F.cross_entropy(s, targets[keep])
    loss = alpha * kd + (1.0 - alpha) * ce
    return loss, {"kd": float(kd.detach()), "ce": float(ce.detach())}


def check_pair(teacher: nn.Module, student: nn.Module) -> None:
    tv, sv = teacher.config.vocab_size, student.config.vocab_size
    if tv != sv:
        raise CorelmError(f"teacher and student vocabularies differ ({tv} vs {sv} tokens); distillation needs "
                          "the same tokenizer (llama-tiny uses SmolLM2's)")


def distill_loss_fn(teacher: nn.Module, temperature: float = 2.0, alpha: float = 0.5):
    """A ``loss_fn(model, batch)`` for :func:`corelm.train.loop.train` that distills ``teacher``.

    ``batch`` is what :func:`corelm.objectives.causal_lm_loss` takes: packed windows ``(B, T+1)`` or
    a dict with ``input_ids``/``labels``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise CorelmError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise CorelmError(f"temperature must be positive, got {temperature}")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss_fn(model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        if isinstance(batch, dict):
            inputs, targets = batch["input_ids"], batch["labels"]
        else:
            inputs, targets = batch[:, :-1], batch[:, 1:]
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        loss, parts = kd_loss(model(inputs), teacher_logits, targets, temperature, alpha)
        return loss, {"n_tokens": int((targets != IGNORE).sum()), **parts}

    return loss_fn

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
from torch import nn

from corelm.errors import CorelmError

IGNORE = -100


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            temperature: float = 2.0, alpha: float = 0.5) -> tuple[torch.Tensor, dict[str, float]]:
    """The distillation loss on logits ``(B, T, V)`` and targets ``(B, T)`` (``-100`` = ignored).

    Returns:
        ``(loss, {"kd": soft term, "ce": hard term})``; softmaxes run in fp32 (a 49k-way log-sum-exp
        in bf16 loses the small probabilities the soft targets are made of). The gradient is only
        with respect to ``student_logits``; the teacher is a constant.
    """
    keep = (targets != IGNORE).flatten()
    s = student_logits.flatten(0, -2)  # (N, V)
    t = teacher_logits.detach().flatten(0, -2)
    y = targets.flatten()
    if not bool(keep.all()):
        s, t, y = s[keep], t[keep], y[keep]
    loss, kd, ce = _KDLoss.apply(s, t, y, float(temperature), float(alpha))
    return loss, {"kd": float(kd), "ce": float(ce)}


class _KDLoss(torch.autograd.Function):
    """``alpha * T^2 * KL + (1 - alpha) * CE`` over rows of ``(N, V)`` logits, gradient computed in forward.

    With a 49k vocabulary every elementwise op over the logits moves ~200 kB a row; autograd's
    version keeps six such tensors alive and makes ~15 passes (0.9 s for 512 rows on one core). Here
    each chunk of rows is processed while it is in cache and only the gradient is stored:

        d/ds [T^2 KL(p_t^T || p_s^T)] = T (p_s^T - p_t^T),   d/ds CE = p_s - onehot(y)   (per row, / N)
    """

    CHUNK = 8  # rows per pass: 8 x 49152 fp32 = 1.5 MB, resident in L2/L3 (8-16 measured fastest, 512 ~3x slower)

    @staticmethod
    def forward(ctx: Any, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temperature: float,
                alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = s.shape[0]
        grad = torch.empty(s.shape, dtype=torch.float32, device=s.device)
        kd_sum = torch.zeros((), dtype=torch.float64, device=s.device)
        ce_sum = torch.zeros((), dtype=torch.float64, device=s.device)
        for i in range(0, n, _KDLoss.CHUNK):
            rows = slice(i, min(i + _KDLoss.CHUNK, n))
            s_c, t_c, y_c = s[rows].float(), t[rows].float(), y[rows]  # fp32: see kd_loss
            log_p = torch.log_softmax(s_c, dim=-1)  # (c, V) at T = 1, for the hard labels
            ce_sum += -log_p.gather(1, y_c[:, None]).sum(dtype=torch.float64)
            if temperature != 1.0:
                log_ps_t = torch.log_softmax(s_c / temperature, dim=-1)
            else:
                log_ps_t = log_p
            log_pt_t = torch.log_softmax(t_c / temperature, dim=-1)
            p_t = log_pt_t.exp()
            kd_sum += (p_t * (log_pt_t - log_ps_t)).sum(dtype=torch.float64)
            g = grad[rows]
            # (1 - alpha) (p_s - onehot) + alpha T (p_s^T - p_t^T), built in place in the output buffer
            torch.exp(log_p, out=g)
            if temperature != 1.0:
                g.mul_(1.0 - alpha).add_(log_ps_t.exp_().sub_(p_t), alpha=alpha * temperature)
            else:
                g.sub_(p_t, alpha=alpha)  # p_s - alpha p_t; the onehot part is subtracted below
            g.scatter_add_(1, y_c[:, None], torch.full_like(y_c[:, None], -(1.0 - alpha), dtype=g.dtype))
        grad.div_(max(n, 1))
        kd = (kd_sum * temperature**2 / max(n, 1)).float()
        ce = (ce_sum / max(n, 1)).float()
        ctx.save_for_backward(grad)
        ctx.input_dtype = s.dtype
        ctx.mark_non_differentiable(kd, ce)
        return alpha * kd + (1.0 - alpha) * ce, kd, ce

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss).to(ctx.input_dtype), None, None, None, None


def check_pair(teacher: nn.Module, student: nn.Module) -> None:
    tv, sv = teacher.config.vocab_size, student.config.vocab_size
    if tv != sv:
        raise CorelmError(f"teacher and student vocabularies differ ({tv} vs {sv} tokens); distillation needs "
                          "the same tokenizer (llama-tiny uses SmolLM2's)")


def check_loss_params(temperature: float, alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise CorelmError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise CorelmError(f"temperature must be positive, got {temperature}")


def distill_loss_fn(teacher: nn.Module, temperature: float = 2.0, alpha: float = 0.5):
    """A ``loss_fn(model, batch)`` for :func:`corelm.train.loop.train` that distills ``teacher``.

    ``batch`` is what :func:`corelm.objectives.causal_lm_loss` takes: packed windows ``(B, T+1)`` or
    a dict with ``input_ids``/``labels``.
    """
    check_loss_params(temperature, alpha)
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

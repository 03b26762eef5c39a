"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR).

Each targeted linear gets an update in SVD form, ``Delta W = P diag(lambda) Q`` (``P: (out, r)``,
``lambda: (r,)``, ``Q: (r, in)``), stored as ``lora_B``, ``lora_E``, ``lora_A``. Training:

1. adds the orthogonality regularizer ``R = ||P^T P - I||_F + ||Q Q^T - I||_F`` (eq. 4), so ``lambda``
   behave like singular values and zeroing one removes one rank;
2. after every optimizer step, scores each parameter by its smoothed sensitivity
   ``I_bar = b1 I_bar + (1 - b1) |w * grad|`` times its uncertainty
   ``U_bar = b2 U_bar + (1 - b2) |I - I_bar|`` (eqs. 8-10), and each *triplet* ``(P_{:,i}, lambda_i, Q_{i,:})``
   by ``S_i = s(lambda_i) + mean_j s(P_{j,i}) + mean_j s(Q_{i,j})`` (eq. 11);
3. every ``interval`` steps keeps the ``b(t)`` highest-scoring triplets over *all* matrices and zeroes the
   other ``lambda`` (eq. 12), where the budget ``b(t)`` falls from ``init_rank x n`` to ``target_rank x n``
   on a cubic schedule after ``warmup`` steps and holds for the last ``final`` steps (section 3.3), during
   which the final rank pattern is fixed.

Ranks therefore move to the matrices that matter: the total rank reaches ``target_rank x n_matrices``
while individual matrices end up with more or fewer. The allocator hooks onto the optimizer
(``register_step_post_hook``), so the one training loop runs AdaLoRA unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from corelm.errors import CorelmError
from corelm.finetune.lora import SharedLinear, find_experts, find_linears, freeze, replace_module


class SVDLinear(SharedLinear):
    """``y = W x + b + (alpha / r0) * P (lambda * (Q x))`` with ``r0`` the initial rank."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__(base)
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.rank, self.scaling = rank, alpha / rank
        # lambda = 0 makes the update start at 0; P and Q start small and random (paper, section 3.1)
        self.lora_A = nn.Parameter(torch.randn(rank, self.in_features, **kw) * 0.02)   # Q
        self.lora_E = nn.Parameter(torch.zeros(rank, **kw))                           # lambda
        self.lora_B = nn.Parameter(torch.randn(self.out_features, rank, **kw) * 0.02)  # P
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """``scaling * P diag(lambda) Q``, shape ``(out, in)``, in fp32."""
        return (self.lora_B.float() * self.lora_E.float()) @ self.lora_A.float() * self.scaling

    def active_rank(self) -> int:
        """Number of nonzero ``lambda`` (the rank of the update)."""
        return int((self.lora_E != 0).sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + F.linear(F.linear(x, self.lora_A) * self.lora_E, self.lora_B) * self.scaling


def apply_adalora(model: nn.Module, targets: Iterable[str] | str, init_rank: int = 12,
                  alpha: float = 16.0) -> list[str]:
    """Freeze ``model`` and wrap the targeted linears with :class:`SVDLinear`; returns their names."""
    if init_rank < 1:
        raise CorelmError(f"AdaLoRA initial rank must be >= 1, got {init_rank}")
    experts = find_experts(model, targets) if targets not in ("all-linear", ["all-linear"]) else []
    if experts:
        raise CorelmError(f"AdaLoRA adapts nn.Linear layers; {experts[0]} holds stacked MoE experts: "
                          "use --method lora for them, or leave them out of --targets")
    names = find_linears(model, targets)
    freeze(model)
    for name in names:
        replace_module(model, name, SVDLinear(model.get_submodule(name), init_rank, alpha))
    return names


class RankAllocator:
    """Importance scores, the budget schedule and the masking of AdaLoRA (see the module docstring).

    Args:
        model: A model after :func:`apply_adalora`.
        target_rank: Final average rank per matrix; the total budget is ``target_rank x n_matrices``.
        total_steps: Optimizer steps of the run ``T``.
        warmup: Steps ``t_i`` at the initial budget before pruning starts.
        final: Steps ``t_f`` at the end with the final, fixed rank pattern.
        interval: Reallocate every ``interval`` steps (``Delta T``).
        beta1, beta2: Smoothing of sensitivity and uncertainty.
        orth_weight: Weight ``gamma`` of the orthogonality regularizer in the loss.
    """

    def __init__(self, model: nn.Module, target_rank: int, total_steps: int, warmup: int | None = None,
                 final: int | None = None, interval: int = 1, beta1: float = 0.85, beta2: float = 0.85,
                 orth_weight: float = 0.1) -> None:
        self.modules = {n: m for n, m in model.named_modules() if isinstance(m, SVDLinear)}
        if not self.modules:
            raise CorelmError("AdaLoRA needs a model with SVD adapters (apply_adalora first)")
        init_rank = next(iter(self.modules.values())).rank
        if not 0 <= target_rank <= init_rank:
            raise CorelmError(f"--target-rank {target_rank} must be between 0 and the initial rank {init_rank}")
        self.total_steps = total_steps
        self.warmup = total_steps // 10 if warmup is None else warmup
        self.final = total_steps // 5 if final is None else final
        if self.warmup + self.final >= total_steps:
            raise CorelmError(f"AdaLoRA schedule: warmup {self.warmup} + final {self.final} steps leave no room to "
                              f"reallocate in {total_steps} steps; train longer")
        self.interval, self.beta1, self.beta2, self.orth_weight = interval, beta1, beta2, orth_weight
        self.init_budget = init_rank * len(self.modules)
        self.target_budget = target_rank * len(self.modules)
        self.ipt: dict[str, torch.Tensor] = {}
        self.unc: dict[str, torch.Tensor] = {}
        self.step_count = 0
        self.final_pattern: dict[str, torch.Tensor] | None = None

    # -- schedule
    def budget(self, step: int) -> int:
        """``b(t)``: the number of triplets kept after step ``step`` (cubic decrease, paper eq. in 3.3)."""
        if step <= self.warmup:
            return self.init_budget
        if step > self.total_steps - self.final:
            return self.target_budget
        progress = (step - self.warmup) / (self.total_steps - self.final - self.warmup)
        return int(self.target_budget + (self.init_budget - self.target_budget) * (1 - progress) ** 3)

    # -- the training-loop side
    def regularizer(self) -> torch.Tensor:
        """``gamma * mean over matrices of (||P^T P - I||_F + ||Q Q^T - I||_F)`` -- add it to the loss."""
        total = 0.0
        for m in self.modules.values():
            eye = torch.eye(m.rank, device=m.lora_A.device)
            total = total + torch.linalg.norm(m.lora_A.float() @ m.lora_A.float().T - eye) \
                + torch.linalg.norm(m.lora_B.float().T @ m.lora_B.float() - eye)
        return self.orth_weight * total / (2 * len(self.modules))

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Run :meth:`step` after each ``optimizer.step()`` (gradients are still there).

        Steps without any gradient are not training steps and are ignored: restoring a checkpoint through
        ``torch.distributed.checkpoint`` initializes the optimizer state with one step on zero gradients.
        """
        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if any(m.lora_E.grad is not None and bool(m.lora_E.grad.any()) for m in self.modules.values()):
                self.step()

        optimizer.register_step_post_hook(hook)

    @torch.no_grad()
    def step(self) -> int:
        """Update importance and reallocate ranks after optimizer step ``t``; returns ``b(t)``."""
        self.step_count += 1
        t = self.step_count
        if t <= self.total_steps - self.final:
            self._update_importance()
        budget = self.budget(t)
        if t > self.total_steps - self.final:
            if self.final_pattern is None:  # entering the final phase: fix the rank pattern once
                self.final_pattern = self._mask_to(budget)
            for name, m in self.modules.items():
                m.lora_E.masked_fill_(~self.final_pattern[name], 0.0)
        elif t > self.warmup and t % self.interval == 0:
            self._mask_to(budget)
        return budget

    def _update_importance(self) -> None:
        for name, m in self.modules.items():
            for pname, p in (("A", m.lora_A), ("E", m.lora_E), ("B", m.lora_B)):
                if p.grad is None:
                    continue
                key = f"{name}.{pname}"
                sensitivity = (p * p.grad).abs().float()
                if key not in self.ipt:
                    self.ipt[key] = torch.zeros_like(sensitivity)
                    self.unc[key] = torch.zeros_like(sensitivity)
                self.ipt[key].mul_(self.beta1).add_(sensitivity, alpha=1 - self.beta1)
                self.unc[key].mul_(self.beta2).add_((sensitivity - self.ipt[key]).abs(), alpha=1 - self.beta2)

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """``S_i`` (eq. 11) of every triplet, one ``(r,)`` vector per matrix."""
        scores = {}
        for name in self.modules:
            s = {p: self._score(f"{name}.{p}") for p in ("A", "E", "B")}
            scores[name] = s["E"] + (s["A"].mean(dim=1) if s["A"].dim() == 2 else 0) \
                + (s["B"].mean(dim=0) if s["B"].dim() == 2 else 0)
        return scores

    def _score(self, key: str) -> torch.Tensor:
        """``s = I_bar * U_bar`` of one parameter tensor (zero before its first gradient)."""
        return self.ipt[key] * self.unc[key] if key in self.ipt else torch.zeros(1)

    def _mask_to(self, budget: int) -> dict[str, torch.Tensor]:
        """Keep the ``budget`` best triplets over all matrices, zero the others' ``lambda``."""
        scores = self.triplet_scores()
        flat = torch.cat([scores[n].flatten() for n in self.modules])
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.topk(flat, min(budget, flat.numel())).indices] = True
        pattern, start = {}, 0
        for name, m in self.modules.items():
            pattern[name] = keep[start:start + m.rank].to(m.lora_E.device)
            m.lora_E.masked_fill_(~pattern[name], 0.0)
            start += m.rank
        return pattern

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (step, importance averages, final pattern) for exact resume."""
        return {"step_count": self.step_count,
                "ipt": {k: v.tolist() for k, v in self.ipt.items()},
                "unc": {k: v.tolist() for k, v in self.unc.items()},
                "final_pattern": None if self.final_pattern is None else
                {k: v.tolist() for k, v in self.final_pattern.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = state["step_count"]
        self.ipt = {k: torch.tensor(v) for k, v in state["ipt"].items()}
        self.unc = {k: torch.tensor(v) for k, v in state["unc"].items()}
        pattern = state.get("final_pattern")
        self.final_pattern = None if pattern is None else {k: torch.tensor(v, dtype=torch.bool)
                                                           for k, v in pattern.items()}

    def ranks(self) -> dict[str, int]:
        """Current rank (nonzero ``lambda``) of every matrix."""
        return {name: m.active_rank() for name, m in self.modules.items()}

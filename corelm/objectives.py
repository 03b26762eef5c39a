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


@dataclass(frozen=True)
class MaskingSpec:
    """BERT's masked-LM corruption (Devlin et al. 2019, sec. 3.1 and appendix A.1).

    ``prob`` of the (non-special) tokens are selected as targets; of those, ``mask_frac`` become
    ``[MASK]``, ``random_frac`` a random token and the rest stay unchanged (the 80/10/10 rule).
    """

    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...] = ()
    prob: float = 0.15
    mask_frac: float = 0.8
    random_frac: float = 0.1


def mask_tokens(ids: torch.Tensor, spec: MaskingSpec, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt ``ids`` for masked LM.

    Args:
        ids: token ids, any shape.
        spec: the masking rule.
        generator: RNG for the draws (a per-example generator makes masks independent of batching).

    Returns:
        ``(inputs, labels)``: corrupted ids, and the original id at selected positions / ``-100`` elsewhere.
    """
    u = torch.rand(ids.shape, generator=generator)
    selectable = torch.ones_like(ids, dtype=torch.bool)
    for sid in spec.special_ids:
        selectable &= ids != sid
    selected = (u < spec.prob) & selectable
    labels = torch.where(selected, ids, torch.full_like(ids, IGNORE))
    # A second uniform decides what a selected token becomes: [0, .8) mask, [.8, .9) random, rest kept.
    v = torch.rand(ids.shape, generator=generator)
    to_mask = selected & (v < spec.mask_frac)
    to_random = selected & (v >= spec.mask_frac) & (v < spec.mask_frac + spec.random_frac)
    random_ids = torch.randint(0, spec.vocab_size, ids.shape, generator=generator)
    inputs = torch.where(to_mask, torch.full_like(ids, spec.mask_id), ids)
    inputs = torch.where(to_random, random_ids, inputs)
    return inputs, labels


class MLMCollate:
    """Windows of ``T - 2`` (or ``T - 3`` with NSP) raw tokens -> a masked-LM batch.

    Each example gets ``[CLS] A [SEP]`` (or ``[CLS] A [SEP] B [SEP]`` with NSP, where ``B`` is the true
    continuation half the time and another window's second half otherwise). All randomness comes from a
    generator seeded by ``(seed, epoch, index)``, so an example is corrupted the same way whatever the
    batch size, rank or resume point. Use with ``ResumableLoader(..., collate_with_indices=True)``.
    """

    def __init__(self, dataset: Sequence[torch.Tensor], spec: MaskingSpec, cls_id: int, sep_id: int,
                 seed: int = 0, nsp: bool = False) -> None:
        self.dataset, self.spec, self.cls_id, self.sep_id = dataset, spec, cls_id, sep_id
        self.seed, self.nsp = seed, nsp

    def __call__(self, items: list[torch.Tensor], indices: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        rows, types, labels, nsp_labels = [], [], [], []
        for window, (epoch, index) in zip(items, indices):
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_000_007 + index)
            cls, sep = torch.tensor([self.cls_id]), torch.tensor([self.sep_id])
            if self.nsp:
                half = len(window) // 2
                a, b = window[:half], window[half:]
                is_random = bool(torch.rand((), generator=g) < 0.5)
                if is_random:
                    other = int(torch.randint(0, len(self.dataset) - 1, (), generator=g))
                    other += other >= index  # never the example itself
                    b = self.dataset[other][half:]
                ids = torch.cat([cls, a, sep, b, sep])
                tt = torch.cat([torch.zeros(len(a) + 2, dtype=torch.long), torch.ones(len(b) + 1, dtype=torch.long)])
                nsp_labels.append(int(is_random))  # HF convention: 0 = B follows A, 1 = B is random
            else:
                ids = torch.cat([cls, window, sep])
                tt = torch.zeros_like(ids)
            inp, lab = mask_tokens(ids, self.spec, g)
            rows.append(inp)
            labels.append(lab)
            types.append(tt)
        batch = {"input_ids": torch.stack(rows), "labels": torch.stack(labels), "token_type_ids": torch.stack(types)}
        if self.nsp:
            batch["nsp_labels"] = torch.tensor(nsp_labels)
        return batch


def _unwrap(model: nn.Module) -> nn.Module:
    """The model behind ``torch.compile`` / DDP wrappers (to reach its heads)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def mlm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Masked-LM cross-entropy on the selected positions (+ next-sentence prediction if labelled).

    The MLM head runs only on the ~15% selected positions: the vocabulary projection is the largest
    matmul of a small BERT, and the other 85% of its output would be discarded.
    """
    hidden = model(batch["input_ids"], token_type_ids=batch.get("token_type_ids"))  # (B, T, d)
    inner = _unwrap(model)
    labels = batch["labels"]
    selected = labels != IGNORE
    logits = inner.mlm_logits(hidden[selected])  # (n_selected, V)
    loss = F.cross_entropy(logits.float(), labels[selected])
    metrics: dict[str, Any] = {"n_tokens": int(selected.sum()), "mlm_loss": float(loss.detach()),
                               "mlm_acc": float((logits.argmax(-1) == labels[selected]).float().mean())}
    if "nsp_labels" in batch:
        nsp_logits = inner.nsp_logits(inner.pooled(hidden))  # (B, 2)
        nsp = F.cross_entropy(nsp_logits.float(), batch["nsp_labels"])
        loss = loss + nsp
        metrics["nsp_loss"] = float(nsp.detach())
        metrics["nsp_acc"] = float((nsp_logits.argmax(-1) == batch["nsp_labels"]).float().mean())
    return loss, metrics

"""Weight pruning as a model transform: magnitude and Wanda, unstructured or N:M semi-structured.

- magnitude: remove the weights of smallest ``|W|`` (Han et al. 2015).
- Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"): score
  ``|W_ij| * ||X_j||_2``, where ``||X_j||`` is the norm of input feature ``j`` over calibration
  tokens, and compare weights *within each output row*. No retraining, one forward pass.
- N:M (e.g. 2:4, Mishra et al. 2021): in every group of M consecutive input weights keep the N of
  highest score. The pattern NVIDIA sparse tensor cores accelerate; on CPU (and in PyTorch's CPU
  kernels) sparse weights are not faster than dense, so here it is a quality experiment, and the
  table corelm prints says so.

Pruning zeroes weights in place: the result is an ordinary dense model that saves, loads, exports
and quantizes like any other. Every row gets exactly ``floor(sparsity * in_features)`` zeros.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from corelm.errors import CorelmError

METHODS = ("magnitude", "wanda")


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """``"2:4"`` -> (2, 4); ``None`` -> unstructured."""
    if pattern is None:
        return None
    try:
        n, m = (int(p) for p in pattern.split(":"))
    except ValueError:
        raise CorelmError(f"pattern must look like N:M (e.g. 2:4), got {pattern!r}") from None
    if not 0 < n < m:
        raise CorelmError(f"pattern N:M needs 0 < N < M, got {pattern!r}")
    return n, m


def prune_mask(score: torch.Tensor, sparsity: float = 0.5, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Boolean keep-mask ``(N, K)`` from a score: lowest scores pruned, per row or per N:M group."""
    rows, cols = score.shape
    if nm is not None:
        n, m = nm
        if cols % m:
            raise CorelmError(f"pattern {n}:{m} needs the layer width {cols} to be a multiple of {m}")
        groups = score.reshape(rows, cols // m, m)
        keep_idx = groups.topk(n, dim=-1).indices
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep_idx, True).reshape(rows, cols)
    k = int(sparsity * cols)
    mask = torch.ones(rows, cols, dtype=torch.bool, device=score.device)
    if k:
        drop = score.topk(k, dim=1, largest=False).indices
        mask.scatter_(1, drop, False)
    return mask


def _targets(model: nn.Module, skip: Iterable[str]) -> dict[str, nn.Linear]:
    skip = tuple(skip)
    return {name: m for name, m in model.named_modules()
            if type(m) is nn.Linear and not any(name == s or name.startswith(s + ".") for s in skip)}


@torch.no_grad()
def input_norms(model: nn.Module, layers: dict[str, nn.Linear], batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``||X_j||_2`` of each layer's input features over all calibration tokens (Wanda's statistic)."""
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in layers.items()}
    hooks = []
    for name, module in layers.items():
        def hook(mod, args, out, name=name):
            x = args[0].detach().reshape(-1, mod.in_features).double()
            sums[name] += x.pow(2).sum(0).cpu()
        hooks.append(module.register_forward_hook(hook))
    try:
        seen = 0
        for ids in batches:
            model(ids)
            seen += 1
    finally:
        for h in hooks:
            h.remove()
    if not seen:
        raise CorelmError("Wanda needs calibration text (got no batches)")
    return {name: s.sqrt().float() for name, s in sums.items()}


@torch.no_grad()
def prune_model(model: nn.Module, method: str = "wanda", sparsity: float = 0.5, pattern: str | None = None,
                calibration: Iterable[torch.Tensor] | None = None, skip: Iterable[str] = ("lm_head",)) -> dict:
    """Zero weights of every ``nn.Linear`` of ``model`` in place.

    Args:
        model: a float corelm model (quantized models are refused: prune first, then quantize).
        method: ``magnitude`` or ``wanda``.
        sparsity: fraction of each row to remove, in [0, 1) (ignored with ``pattern``).
        pattern: ``"N:M"`` for semi-structured sparsity, or ``None``.
        calibration: batches of input ids ``(B, T)`` for Wanda.
        skip: modules left dense (the LM head by default: it is shared with the embedding).

    Returns:
        ``{"method", "sparsity", "pattern", "layers", "zeros", "weights"}`` — what was done.
    """
    from corelm.compress.quant import is_quantized

    if method not in METHODS:
        raise CorelmError(f"unknown pruning method {method!r}; expected one of {', '.join(METHODS)}")
    if not (0.0 <= sparsity < 1.0):
        raise CorelmError(f"sparsity must be in [0, 1), got {sparsity}")
    if is_quantized(model):
        raise CorelmError("the model is quantized; prune the float model, then quantize it")
    nm = parse_pattern(pattern)
    layers = _targets(model, skip)
    if not layers:
        raise CorelmError("the model has no linear layers to prune")
    if nm is not None:
        for name, m in layers.items():
            if m.in_features % nm[1]:
                raise CorelmError(f"pattern {pattern} needs {name}'s width {m.in_features} to be a multiple of {nm[1]}")
    norms = input_norms(model, layers, calibration or []) if method == "wanda" else None
    zeros = total = 0
    for name, module in layers.items():
        w = module.weight
        score = w.abs().float()
        if norms is not None:
            score = score * norms[name].to(w.device)[None, :]
        mask = prune_mask(score, sparsity, nm)
        w.mul_(mask.to(w.dtype))
        zeros += int((~mask).sum())
        total += mask.numel()
    return {"method": method, "sparsity": sparsity if nm is None else 1 - nm[0] / nm[1], "pattern": pattern,
            "layers": len(layers), "zeros": zeros, "weights": total}


def sparsity_of(weight: torch.Tensor) -> float:
    return float((weight == 0).float().mean())


def satisfies_pattern(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive input weights has at most ``n`` non-zeros."""
    groups = weight.reshape(weight.shape[0], -1, m)
    return bool(((groups != 0).sum(-1) <= n).all())

"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", ICML).

An adapter is a small residual MLP ``h + W_up act(W_down h)`` (width ``d -> m -> d``, ``m << d``) placed on
the output of each sub-layer's projection back to the residual width -- after the attention output
projection and after the feed-forward output projection, before the skip connection is added (the
paper's figure 2). corelm applies it as a wrapper around those ``nn.Linear`` children, so the base model
does not change. ``W_up`` starts at zero, so an untrained adapter is the identity.

A sparse MoE's feed-forward sub-layer has no single output projection (each token's output is a
weighted sum over its experts), so there the adapter follows the whole routed sub-layer
(:class:`AdapterOutput` around ``mlp``), which is the same place in the paper's figure.

Adapters are nonlinear: unlike LoRA they cannot be folded into the base weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from corelm.errors import CorelmError
from corelm.finetune.lora import (
    _IN_BLOCK,
    SUBLAYER_OUTPUTS,
    SharedLinear,
    _family_table,
    _matches,
    find_linears,
    freeze,
    replace_module,
)


class AdapterLinear(SharedLinear):
    """``h = W x + b`` followed by the adapter ``h + up(gelu(down(h)))``."""

    def __init__(self, base: nn.Linear, size: int) -> None:
        super().__init__(base)
        if size < 1:
            raise CorelmError(f"adapter size must be >= 1, got {size}")
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.adapter_down = nn.Linear(self.out_features, size, **kw)
        self.adapter_up = nn.Linear(size, self.out_features, **kw)
        nn.init.zeros_(self.adapter_up.weight)  # identity at start (the paper uses a near-zero init)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.weight, self.bias)
        return h + self.adapter_up(F.gelu(self.adapter_down(h)))


class AdapterOutput(nn.Module):
    """Any sub-layer ``f`` (a MoE's routed MLP) followed by the adapter: ``h = f(x)``, ``h + up(gelu(down(h)))``.

    It adopts ``f``'s children, parameters and settings under their own names, so the parameter names
    of the model do not change; ``f``'s own ``forward`` computes ``h``.
    """

    def __init__(self, base: nn.Module, width: int, size: int) -> None:
        super().__init__()
        if size < 1:
            raise CorelmError(f"adapter size must be >= 1, got {size}")
        for name, value in vars(base).items():  # plain settings (n_experts, top_k, ...)
            if not name.startswith("_") and name != "training":
                setattr(self, name, value)
        for name, child in base.named_children():
            self.add_module(name, child)
        for name, param in base.named_parameters(recurse=False):
            self.register_parameter(name, param)
        self.base_forward = type(base).forward  # a function, called with this module as ``self``
        p = next(base.parameters())
        self.adapter_down = nn.Linear(width, size, dtype=p.dtype, device=p.device)
        self.adapter_up = nn.Linear(size, width, dtype=p.dtype, device=p.device)
        nn.init.zeros_(self.adapter_up.weight)  # identity at start, as AdapterLinear
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        h = self.base_forward(self, *args, **kwargs)
        return h + self.adapter_up(F.gelu(self.adapter_down(h)))


def _sublayers(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Block modules matched by ``targets`` that are not linears (a MoE's routed ``mlp``)."""
    targets = list(targets)
    return [name for name, module in model.named_modules()
            if _IN_BLOCK.search(name) and not isinstance(module, nn.Linear) and "Linear" not in type(module).__name__
            and any(_matches(name, t) for t in targets)]


def apply_adapters(model: nn.Module, family: str, size: int = 64,
                   targets: Iterable[str] | None = None) -> list[str]:
    """Freeze ``model`` and add a bottleneck adapter after every sub-layer output projection.

    Args:
        model: A corelm model (or a head wrapping one).
        family: ``llama``, ``gemma``, ``olmo2``, ``moe``, ``gpt2`` or ``bert``; picks the default targets.
        size: Bottleneck width ``m``.
        targets: Override the modules to wrap (dotted suffixes): linears, or whole sub-layers.

    Returns:
        The names of the wrapped modules.
    """
    targets = list(targets or _family_table(SUBLAYER_OUTPUTS, family, "adapter places"))
    modules = _sublayers(model, targets)
    linear_targets = [t for t in targets if not any(_matches(name, t) for name in modules)]
    names = find_linears(model, linear_targets, required=not modules) if linear_targets else []
    width = getattr(getattr(model, "config", None), "d_model", None)
    if modules and width is None:
        raise CorelmError(f"an adapter after {modules[0]} needs the model's width (model.config.d_model)")
    freeze(model)
    for name in names:
        replace_module(model, name, AdapterLinear(model.get_submodule(name), size))
    for name in modules:
        replace_module(model, name, AdapterOutput(model.get_submodule(name), width, size))
    return names + modules

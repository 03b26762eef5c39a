"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", ICML).

An adapter is a small residual MLP ``h + W_up act(W_down h)`` (width ``d -> m -> d``, ``m << d``) placed on
the output of each sub-layer's projection back to the residual width -- after the attention output
projection and after the feed-forward output projection, before the skip connection is added (the
paper's figure 2). corelm applies it as a wrapper around those ``nn.Linear`` children, so the base model
does not change. ``W_up`` starts at zero, so an untrained adapter is the identity.

Adapters are nonlinear: unlike LoRA they cannot be folded into the base weights.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from corelm.errors import CorelmError
from corelm.finetune.lora import SUBLAYER_OUTPUTS, SharedLinear, find_linears, freeze, replace_module


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


def apply_adapters(model: nn.Module, family: str, size: int = 64,
                   targets: Iterable[str] | None = None) -> list[str]:
    """Freeze ``model`` and add a bottleneck adapter after every sub-layer output projection.

    Args:
        model: A corelm model (or a head wrapping one).
        family: ``llama``, ``gpt2`` or ``bert``; picks the default targets.
        size: Bottleneck width ``m``.
        targets: Override the linears to wrap (dotted suffixes).

    Returns:
        The names of the wrapped modules.
    """
    names = find_linears(model, targets or SUBLAYER_OUTPUTS[family])
    freeze(model)
    for name in names:
        replace_module(model, name, AdapterLinear(model.get_submodule(name), size))
    return names

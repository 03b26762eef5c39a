"""Weight initialisation shared by the families (GPT-2, Llama and BERT all use the same scheme)."""

from __future__ import annotations

import torch
from torch import nn


def init_normal_(module: nn.Module, std: float = 0.02) -> None:
    """Normal(0, ``std``) for Linear/Embedding weights, zero biases, zero padding embedding.

    Use as ``model.apply(init_normal_)``. LayerNorm/RMSNorm keep their constructor's ones/zeros.
    """
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()

"""Weight initialisation shared by the families (GPT-2, Llama and BERT all use the same scheme)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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


@contextmanager
def skip_init() -> Iterator[None]:
    """Make ``torch.nn.init`` fills no-ops while a model is built on the meta device.

    The weights are replaced by the checkpoint's right after, and a random fill on meta tensors goes
    through PyTorch's reference decompositions, whose first use imports ~2 s of modules.
    (transformers' ``no_init_weights`` does the same.)
    """
    names = ("normal_", "zeros_", "ones_", "uniform_", "constant_", "trunc_normal_", "xavier_uniform_",
             "xavier_normal_", "kaiming_uniform_", "kaiming_normal_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)

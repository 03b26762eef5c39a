"""Weight initialisation shared by the families (GPT-2, Llama and BERT all use the same scheme).

Two schemes, chosen by ``ModelConfig.init``: ``normal`` draws N(0, std^2) (GPT-2, Radford et al. 2019);
``uniform`` draws U(-a, a) with ``a = sqrt(3) * std``, the uniform distribution with the same standard
deviation (variance a^2 / 3), so swapping one for the other changes the shape of the draw, not its scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

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


def fill_(tensor: torch.Tensor, scheme: str = "normal", std: float = 0.02) -> torch.Tensor:
    """Fill ``tensor`` with N(0, std^2) (``normal``) or U(-sqrt(3) std, sqrt(3) std) (``uniform``)."""
    if scheme == "uniform":
        bound = math.sqrt(3.0) * std
        return nn.init.uniform_(tensor, -bound, bound)
    return nn.init.normal_(tensor, mean=0.0, std=std)


def init_uniform_(module: nn.Module, std: float = 0.02) -> None:
    """:func:`init_normal_` with uniform draws of the same standard deviation: ``U(-0.0346, 0.0346)`` for
    ``std=0.02``. Use as ``model.apply(init_uniform_)``."""
    if isinstance(module, nn.Linear):
        fill_(module.weight, "uniform", std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        fill_(module.weight, "uniform", std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()


INITS = {"normal": init_normal_, "uniform": init_uniform_}


def init_weights(scheme: str, std: float = 0.02) -> Callable[[nn.Module], None]:
    """The per-module initializer of ``scheme`` (``normal`` or ``uniform``), for ``model.apply(...)``."""
    return INITS[scheme] if std == 0.02 else partial(INITS[scheme], std=std)


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

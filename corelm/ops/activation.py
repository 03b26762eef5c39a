"""The MLP nonlinearities corelm implements, by the names :class:`corelm.config.ModelConfig` uses.

``gelu`` is the exact ``x * Phi(x)`` (Hendrycks & Gimpel 2016), ``gelu_tanh`` its tanh approximation
(GPT-2, Gemma; HF's ``gelu_new``/``gelu_pytorch_tanh``), ``silu`` is ``x * sigmoid(x)`` (Elfwing et al.
2018; HF's ``swish``), ``relu`` is ``max(0, x)`` (the original Transformer's FFN, Vaswani et al. 2017).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from corelm.config import ACTIVATIONS
from corelm.errors import CorelmError

_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
}
assert set(_FUNCTIONS) == set(ACTIVATIONS)


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The elementwise function called ``name`` (one of :data:`corelm.config.ACTIVATIONS`)."""
    if name not in _FUNCTIONS:
        raise CorelmError(f"unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}")
    return _FUNCTIONS[name]

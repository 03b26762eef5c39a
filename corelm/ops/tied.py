"""Weight tying between the token embedding and the output projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TiedLMHead(nn.Module):
    """The LM head that reuses the token embedding matrix (Press & Wolf 2017).

    It owns no parameter, so the state dict has no ``lm_head.weight`` and loading with
    ``assign=True`` cannot untie it. The embedding is kept in a tuple so it is not registered twice.
    """

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self._embedding = (embedding,)

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

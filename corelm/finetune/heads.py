"""Task heads on top of a corelm backbone: sequence classification and token classification.

The backbone is any corelm model (DESIGN.md forward contracts): an encoder returns hidden states
``(B, T, d)`` from ``model(ids, attention_mask=...)``; a decoder exposes ``model.hidden_states(ids)``.

Sequence pooling (one vector per text):

* ``cls``: the first token's hidden state (BERT's ``[CLS]``);
* ``pooled``: BERT's pooler, ``tanh(W h_[CLS] + b)``, as in ``BertForSequenceClassification``;
* ``mean``: the masked mean over tokens (sentence-transformers' pooling, what MiniLM was trained for);
* ``last``: the last non-padding token, the only one a causal decoder has seen the whole text with.

Labels travel with the head (``labels`` list) and are saved next to its weights by ``corelm.finetune.run``.
"""

from __future__ import annotations

import torch
from torch import nn

POOLINGS = ("cls", "pooled", "mean", "last")


def backbone_hidden(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    is_encoder: bool) -> torch.Tensor:
    """Final hidden states ``(B, T, d)`` of an encoder or a decoder.

    Decoders get no mask: batches are right-padded, and causal attention never lets a real token see the
    padding after it.
    """
    if is_encoder:
        return backbone(input_ids, attention_mask=attention_mask)
    return backbone.hidden_states(input_ids)


class SequenceClassifier(nn.Module):
    """``logits = W pool(backbone(x)) + b``, shape ``(B, n_labels)``."""

    def __init__(self, backbone: nn.Module, d_model: int, labels: list[str], pooling: str,
                 is_encoder: bool, dropout: float = 0.1) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if pooling == "pooled" and not hasattr(backbone, "pooled"):
            raise ValueError("pooling 'pooled' needs an encoder with a pooler")
        self.backbone, self.labels, self.pooling, self.is_encoder = backbone, list(labels), pooling, is_encoder
        self.dropout = nn.Dropout(dropout)
        dtype = next(backbone.parameters()).dtype
        self.classifier = nn.Linear(d_model, len(labels), dtype=dtype)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One vector per sequence, ``(B, d)``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = backbone_hidden(self.backbone, input_ids, attention_mask, self.is_encoder)  # (B, T, d)
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "pooled":
            return self.backbone.pooled(hidden)
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        last = attention_mask.sum(1) - 1  # (B,) index of the last real token
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.dropout(self.features(input_ids, attention_mask)))


class TokenClassifier(nn.Module):
    """``logits = W backbone(x)_t + b`` for every token, shape ``(B, T, n_labels)``."""

    def __init__(self, backbone: nn.Module, d_model: int, labels: list[str], is_encoder: bool,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.backbone, self.labels, self.is_encoder = backbone, list(labels), is_encoder
        self.dropout = nn.Dropout(dropout)
        dtype = next(backbone.parameters()).dtype
        self.classifier = nn.Linear(d_model, len(labels), dtype=dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = backbone_hidden(self.backbone, input_ids, attention_mask, self.is_encoder)
        return self.classifier(self.dropout(hidden))


def head_state_dict(head: nn.Module) -> dict[str, torch.Tensor]:
    """The head's own weights (everything outside ``backbone``)."""
    return {k: v for k, v in head.state_dict().items() if not k.startswith("backbone.")}

"""BERT (Devlin et al. 2019): a bidirectional post-LayerNorm encoder with MLM and NSP heads.

Parameter names are those of Hugging Face ``BertForPreTraining`` without the ``bert.`` prefix:
``embeddings.*``, ``encoder.layer.{i}.*``, ``pooler.dense.*``, ``cls.predictions.*`` and
``cls.seq_relationship.*``. all-MiniLM-L6-v2 is this architecture at 6 layers x 384.
"""

from __future__ import annotations

import torch
from torch import nn

from corelm.config import ModelConfig
from corelm.errors import CorelmError
from corelm.ops.attention import attention
from corelm.ops.init import init_normal_
from corelm.ops.norm import LayerNorm
from corelm.ops.tied import TiedLMHead


def _activation(name: str) -> nn.Module:
    return nn.GELU(approximate="tanh" if name == "gelu_tanh" else "none") if name.startswith("gelu") else nn.ReLU()


class Embeddings(nn.Module):
    """Token + absolute position + segment embeddings, then LayerNorm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_seq_len, config.d_model)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.d_model)
        self.LayerNorm = LayerNorm(config.d_model, eps=config.norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        if T > self.position_embeddings.num_embeddings:
            raise CorelmError(f"input of {T} tokens is longer than the {self.position_embeddings.num_embeddings} "
                              "positions this encoder has")
        positions = torch.arange(T, device=input_ids.device)  # (T,)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
             + self.token_type_embeddings(token_type_ids))  # (B, T, d)
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention; padding keys are masked out."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        inner = config.n_head * config.head_dim
        self.query = nn.Linear(config.d_model, inner, bias=config.bias)
        self.key = nn.Linear(config.d_model, inner, bias=config.bias)
        self.value = nn.Linear(config.d_model, inner, bias=config.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.query(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, hd)
        k = self.key(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, hd)
        v = self.value(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, hd)
        y = attention(q, k, v, mask)  # (B, n_head, T, hd)
        return y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, d)


class ResidualOutput(nn.Module):
    """Post-LN residual: ``LayerNorm(residual + dense(h))`` (HF's ``*Output`` modules)."""

    def __init__(self, d_in: int, config: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, config.d_model, bias=config.bias)
        self.LayerNorm = LayerNorm(config.d_model, eps=config.norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dense(h))


class AttentionSublayer(nn.Module):
    """``LayerNorm(x + SelfAttention(x))``; HF names the two parts ``self`` and ``output``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self = SelfAttention(config)
        self.output = ResidualOutput(config.n_head * config.head_dim, config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class Intermediate(nn.Module):
    """The MLP's expansion: ``gelu(dense(x))``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.act = _activation(config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class Layer(nn.Module):
    """Post-LN encoder block (the original Transformer's order)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention = AttentionSublayer(config)
        self.intermediate = Intermediate(config)
        self.output = ResidualOutput(config.d_ff, config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, mask)  # LayerNorm(x + Attention(x))
        x = self.output(self.intermediate(x), x)  # LayerNorm(x + MLP(x))
        return x


class Encoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(config) for _ in range(config.n_layer))


class Pooler(nn.Module):
    """``tanh(dense(h_[CLS]))``: the sentence vector NSP was trained on."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class PredictionTransform(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.act = _activation(config.activation)
        self.LayerNorm = LayerNorm(config.d_model, eps=config.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class MLMHead(nn.Module):
    """Masked-LM head: transform, then the tied word-embedding matrix plus an output bias."""

    def __init__(self, config: ModelConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.transform = PredictionTransform(config)
        self.decoder = TiedLMHead(word_embeddings)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden)) + self.bias


class PreTrainingHeads(nn.Module):
    """HF's ``cls.*``: ``predictions`` (MLM) and ``seq_relationship`` (next-sentence prediction)."""

    def __init__(self, config: ModelConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.predictions = MLMHead(config, word_embeddings)
        self.seq_relationship = nn.Linear(config.d_model, 2)


class Bert(nn.Module):
    """BERT encoder; ``forward`` returns the last hidden states ``(B, T, d_model)``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.pooler = Pooler(config)
        self.cls = PreTrainingHeads(config, self.embeddings.word_embeddings)
        self.apply(init_normal_)

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Encode a batch.

        Args:
            input_ids: ``(B, T)`` token ids.
            attention_mask: ``(B, T)`` 1 = token, 0 = padding; padding keys are never attended.
            token_type_ids: ``(B, T)`` segment ids (0 for sentence A, 1 for sentence B); default 0.
        Returns:
            hidden states ``(B, T, d_model)``.
        """
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(B, T, d) -> (B, d)``: the pooler's sentence vector."""
        return self.pooler(hidden)

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(B, T, d) -> (B, T, vocab)`` masked-token logits."""
        return self.cls.predictions(hidden)

    def nsp_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """``(B, d) -> (B, 2)``: is-next / not-next logits."""
        return self.cls.seq_relationship(pooled)

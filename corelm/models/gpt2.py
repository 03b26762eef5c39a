"""GPT-2 (Radford et al. 2019): learned positions, pre-LayerNorm blocks, GELU MLP, tied LM head.

Textbook options for training from scratch: ``activation`` (ReLU, GELU, GELU-tanh, SiLU), ``dropout`` and
``attn_dropout`` (train mode only), and ``positions="sinusoidal"`` (Vaswani et al. 2017, no position table).

Parameter names are those of Hugging Face ``GPT2LMHeadModel``; corelm uses ``nn.Linear`` where HF
uses its transposed ``Conv1D``, and :mod:`corelm.io.hf` transposes on import/export.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from corelm.config import ModelConfig
from corelm.errors import CorelmError
from corelm.ops.activation import activation_fn
from corelm.ops.attention import AttentionContext, cached_attention, decoder_context
from corelm.ops.init import fill_, init_weights
from corelm.ops.kv_cache import KVCache
from corelm.ops.norm import LayerNorm
from corelm.ops.tied import TiedLMHead


class Attention(nn.Module):
    """Causal multi-head self-attention with one fused query/key/value projection (``c_attn``)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.head_dim = config.n_head, config.head_dim
        inner = config.n_head * config.head_dim
        self.c_attn = nn.Linear(config.d_model, 3 * inner, bias=config.bias)
        self.c_proj = nn.Linear(inner, config.d_model, bias=config.bias)
        self.attn_dropout = config.attn_dropout

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.n_head * self.head_dim, dim=-1)  # 3 x (B, T, n_head * hd)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, hd)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, hd)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, hd)
        p = self.attn_dropout if self.training else 0.0
        y = cached_attention(q, k, v, ctx, self.layer_idx, dropout_p=p)  # (B, n_head, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, n_head * hd)
        return self.c_proj(y)


class MLP(nn.Module):
    """``c_proj(act(c_fc(x)))``; GPT-2 was trained with the tanh approximation of GELU."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.c_proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.act = activation_fn(config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class SinusoidalPositions(nn.Module):
    """Fixed position encodings (Vaswani et al. 2017, section 3.5), added to the token embeddings:
    ``PE[p, 2i] = sin(p / 10000^(2i/d))``, ``PE[p, 2i+1] = cos(p / 10000^(2i/d))``. No parameters."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model = d_model

    def forward(self, input_pos: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` positions -> ``(B, T, d_model)`` fp32 encodings."""
        i = torch.arange(0, self.d_model, 2, dtype=torch.float64, device=input_pos.device)
        # fp64 angles: p * w in fp32 loses the low frequencies' phase at positions in the thousands
        angles = input_pos.to(torch.float64)[..., None] / 10000.0 ** (i / self.d_model)  # (B, T, ceil(d/2))
        pe = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # (B, T, 2*ceil(d/2)) interleaved
        return pe[..., : self.d_model].float()


class Block(nn.Module):
    """Pre-LN residual block."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)  # on each sub-layer's output (GPT-2's resid_pdrop)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln_1(x), ctx))
        x = x + self.dropout(self.mlp(self.ln_2(x)))
        return x


class Transformer(nn.Module):
    """HF's ``transformer.*`` namespace: token and position embeddings, blocks, final LayerNorm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe: nn.Module = (nn.Embedding(config.max_seq_len, config.d_model) if config.positions == "learned"
                               else SinusoidalPositions(config.d_model))
        self.drop = nn.Dropout(config.dropout)  # on the summed embeddings (GPT-2's embd_pdrop)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


class GPT2(nn.Module):
    """Decoder-only GPT-2; ``forward`` returns next-token logits ``(B, T, vocab)``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        if config.tie_embeddings:
            self.lm_head: nn.Module = TiedLMHead(self.transformer.wte)
        else:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(init_weights(config.init))
        # GPT-2 paper, section 2.3: residual projections scaled by 1/sqrt(number of residual layers).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                fill_(p, config.init, std=0.02 / math.sqrt(2 * config.n_layer))

    @property
    def layers(self) -> nn.ModuleList:
        return self.transformer.h

    def hidden_states(self, input_ids: torch.Tensor, *, input_pos: torch.Tensor | None = None,
                      kv_cache: KVCache | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-LayerNorm hidden states ``(B, T, d_model)``; arguments as in :meth:`forward`."""
        if input_pos is None and kv_cache is None and input_ids.shape[1] > self.config.max_seq_len:
            raise CorelmError(f"input of {input_ids.shape[1]} tokens is longer than GPT-2's "
                              f"{self.config.max_seq_len} positions")
        ctx = decoder_context(input_ids, input_pos, kv_cache, attention_mask)
        tok = self.transformer.wte(input_ids)  # (B, T, d)
        x = self.transformer.drop(tok + self.transformer.wpe(ctx.input_pos).to(tok.dtype))  # (B, T, d)
        for block in self.transformer.h:
            x = block(x, ctx)
        return self.transformer.ln_f(x)

    def forward(self, input_ids: torch.Tensor, *, input_pos: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits.

        Args:
            input_ids: ``(B, T)`` token ids.
            input_pos: ``(B, T)`` (or ``(T,)``) positions; default ``0..T-1``.
            kv_cache: a :class:`KVCache` to write this step's keys/values into and read from.
            attention_mask: ``(B, T)`` 1 = token, 0 = padding (only without a cache).
        Returns:
            logits ``(B, T, vocab_size)``.
        """
        return self.lm_head(self.hidden_states(input_ids, input_pos=input_pos, kv_cache=kv_cache,
                                               attention_mask=attention_mask))

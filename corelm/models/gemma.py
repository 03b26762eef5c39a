"""The Gemma family (Gemma Team 2024, 2024b, 2025): Gemma 1, Gemma 2 and the text decoder of Gemma 3.

What sets it apart from :mod:`corelm.models.llama`:

* RMSNorm scales by ``1 + weight`` (weights stored around 0), computed in fp32 before the cast.
* The token embeddings are multiplied by ``sqrt(d_model)`` (rounded to the model's dtype).
* The MLP is GeGLU with tanh-approximated GELU: ``down(gelu_tanh(gate(x)) * up(x))``.
* Gemma 2/3 wrap each sub-layer in a *sandwich* of norms: ``x + post_norm(f(pre_norm(x)))``.
* Gemma 2 soft-caps attention logits and output logits: ``cap * tanh(logits / cap)``.
* Attention scores are scaled by ``query_pre_attn_scalar ** -0.5`` rather than ``head_dim ** -0.5``.
* Layers alternate between sliding-window (local) and global attention (``config.layer_types``);
  Gemma 3's local layers use their own RoPE base (``rope_local_theta``) and every layer normalises
  each query/key head (QK norm).

Every switch is fixed at construction, so ``forward`` has no branch on tensor values. Parameter
names are those of Hugging Face ``Gemma{,2,3}ForCausalLM`` checkpoints (Gemma 1's pre-MLP norm is
renamed ``pre_feedforward_layernorm`` at import; see ``corelm/io/hf.py``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from corelm.config import ModelConfig
from corelm.ops.activation import activation_fn
from corelm.ops.attention import AttentionContext, cached_attention, decoder_context
from corelm.ops.init import init_weights
from corelm.ops.kv_cache import KVCache
from corelm.ops.rope import RopeTable, apply_rope
from corelm.ops.tied import TiedLMHead


class GemmaRMSNorm(nn.Module):
    """``x / rms(x) * (1 + weight)``: the weight is a zero-centred offset from identity."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 for the mean of squares, and the scale applied before the cast (transformers PR 29402)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(x / cap)``: a smooth clamp of logits to ``(-cap, cap)`` (Gemma 2, section 2)."""
    return torch.tanh(x / cap) * cap


class Attention(nn.Module):
    """Grouped-query attention with RoPE, optional QK norm, a sliding window and soft-capped scores."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.sliding = config.is_sliding(layer_idx)
        # Gemma 3's local layers rotate with their own base; the model computes both tables
        self.local_rope = self.sliding and config.rope_local_theta is not None
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.scale = (config.query_pre_attn_scalar or config.head_dim) ** -0.5
        self.softcap = config.attn_softcap
        d, hd = config.d_model, config.head_dim
        self.q_proj = nn.Linear(d, config.n_head * hd, bias=False)
        self.k_proj = nn.Linear(d, config.n_kv_head * hd, bias=False)
        self.v_proj = nn.Linear(d, config.n_kv_head * hd, bias=False)
        self.o_proj = nn.Linear(config.n_head * hd, d, bias=False)
        self.q_norm = GemmaRMSNorm(hd, config.norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = GemmaRMSNorm(hd, config.norm_eps) if config.qk_norm else nn.Identity()
        self.attn_dropout = config.attn_dropout

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_head, self.head_dim)).transpose(1, 2)  # (B, n_head, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        k = self.k_norm(k).transpose(1, 2)  # (B, n_kv_head, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, hd)
        cos, sin = ctx.rope_local if self.local_rope else ctx.rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        p = self.attn_dropout if self.training else 0.0
        y = cached_attention(q, k, v, ctx, self.layer_idx, sliding=self.sliding, scale=self.scale,
                             softcap=self.softcap, dropout_p=p)  # (B, n_head, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, n_head * hd)
        return self.o_proj(y)


class MLP(nn.Module):
    """Gated MLP (Shazeer 2020): ``down(act(gate(x)) * up(x))``; GeGLU with Gemma's ``gelu_tanh``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = activation_fn(config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """``x + post_norm(attn(pre_norm(x)))`` then the same around the MLP.

    Gemma 1 has no post norms (``nn.Identity``): a plain pre-norm block.
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        d, eps = config.d_model, config.norm_eps
        self.input_layernorm = GemmaRMSNorm(d, eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = GemmaRMSNorm(d, eps) if config.sandwich_norm else nn.Identity()
        self.pre_feedforward_layernorm = GemmaRMSNorm(d, eps)
        self.mlp = MLP(config)
        self.post_feedforward_layernorm = GemmaRMSNorm(d, eps) if config.sandwich_norm else nn.Identity()
        self.dropout = nn.Dropout(config.dropout)  # on each sub-layer's output before the residual add

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x = x + self.dropout(self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), ctx)))
        x = x + self.dropout(self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))))
        return x


class GemmaBody(nn.Module):
    """Embeddings, blocks and final norm: HF's ``model.*`` namespace."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)  # on the scaled token embeddings
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = GemmaRMSNorm(config.d_model, config.norm_eps)


class Gemma(nn.Module):
    """Decoder-only Gemma; ``forward`` returns next-token logits ``(B, T, vocab)``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = GemmaBody(config)
        if config.tie_embeddings:
            self.lm_head: nn.Module = TiedLMHead(self.model.embed_tokens)
        else:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.rope = RopeTable(config.head_dim, config.rope_theta, config.rope_scaling,
                              rotary_dim=config.rotary_dim, max_seq_len=config.max_seq_len)
        self.rope_local = RopeTable(config.head_dim, config.rope_local_theta) if config.rope_local_theta else None
        self.sliding_window = config.sliding_window if any(map(config.is_sliding, range(config.n_layer))) else None
        # sqrt(d_model) is rounded to the activation dtype before the multiply, as the checkpoints were trained
        self.embed_scale = math.sqrt(config.d_model)
        self.final_softcap = config.final_softcap
        self.apply(init_weights(config.init))

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def hidden_states(self, input_ids: torch.Tensor, *, input_pos: torch.Tensor | None = None,
                      kv_cache: KVCache | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states ``(B, T, d_model)``; arguments as in :meth:`forward`."""
        ctx = decoder_context(input_ids, input_pos, kv_cache, attention_mask, self.sliding_window)
        max_pos = ctx.n_keys - 1 if kv_cache is not None else None
        ctx.rope = self.rope(ctx.input_pos, max_pos)  # (B, 1, T, head_dim) each, shared by the global layers
        if self.rope_local is not None:
            ctx.rope_local = self.rope_local(ctx.input_pos, max_pos)
        x = self.model.embed_tokens(input_ids)  # (B, T, d)
        x = self.model.dropout(x * torch.tensor(self.embed_scale, dtype=x.dtype, device=x.device))
        for block in self.model.layers:
            x = block(x, ctx)
        return self.model.norm(x)

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
        logits = self.lm_head(self.hidden_states(input_ids, input_pos=input_pos, kv_cache=kv_cache,
                                                 attention_mask=attention_mask))
        if self.final_softcap is not None:
            logits = softcap(logits, self.final_softcap)
        return logits

"""OLMo 2 (Team OLMo 2024, "2 OLMo 2 Furious", section 3.2): Llama with its norms moved.

Two changes for training stability, both visible in the block's residual math:

* *Reordered norm*: the RMSNorm is applied to each sub-layer's **output**, before the residual add,
  instead of to its input: ``x = x + norm(attn(x))``, ``x = x + norm(mlp(x))``.
* *QK-norm over the whole projection*: the queries ``(B, T, n_head * head_dim)`` and keys
  ``(B, T, n_kv_head * head_dim)`` are RMS-normalised across all heads at once, before RoPE.

The RMSNorm multiplies by its weight in fp32 and casts afterwards (transformers' ``Olmo2RMSNorm``).
Parameter names are those of Hugging Face ``Olmo2ForCausalLM`` checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from corelm.config import ModelConfig
from corelm.ops.attention import AttentionContext, cached_attention, decoder_context
from corelm.ops.init import init_normal_
from corelm.ops.kv_cache import KVCache
from corelm.ops.rope import RopeTable, apply_rope
from corelm.ops.tied import TiedLMHead


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, the product taken in fp32 before the cast back."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32: the mean of squares over thousands of channels overflows/underflows in half precision
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(x.dtype)


class Attention(nn.Module):
    """Grouped-query attention with RoPE, its queries and keys normalised over all heads together."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.sliding = config.is_sliding(layer_idx)
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        d, hd = config.d_model, config.head_dim
        self.q_proj = nn.Linear(d, config.n_head * hd, bias=False)
        self.k_proj = nn.Linear(d, config.n_kv_head * hd, bias=False)
        self.v_proj = nn.Linear(d, config.n_kv_head * hd, bias=False)
        self.o_proj = nn.Linear(config.n_head * hd, d, bias=False)
        self.q_norm = RMSNorm(config.n_head * hd, config.norm_eps)
        self.k_norm = RMSNorm(config.n_kv_head * hd, config.norm_eps)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x)).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, hd)
        k = self.k_norm(self.k_proj(x)).view(B, T, self.n_kv_head, self.head_dim)
        k = k.transpose(1, 2)  # (B, n_kv_head, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, hd)
        cos, sin = ctx.rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = cached_attention(q, k, v, ctx, self.layer_idx, sliding=self.sliding)  # (B, n_head, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, n_head * hd)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Post-sub-layer norms: ``x + norm(attn(x))`` then ``x + norm(mlp(x))``."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)
        self.post_feedforward_layernorm = RMSNorm(config.d_model, config.norm_eps)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(x, ctx))
        x = x + self.post_feedforward_layernorm(self.mlp(x))
        return x


class Olmo2Body(nn.Module):
    """Embeddings, blocks and final norm: HF's ``model.*`` namespace."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)


class Olmo2(nn.Module):
    """Decoder-only OLMo 2; ``forward`` returns next-token logits ``(B, T, vocab)``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Olmo2Body(config)
        if config.tie_embeddings:
            self.lm_head: nn.Module = TiedLMHead(self.model.embed_tokens)
        else:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.rope = RopeTable(config.head_dim, config.rope_theta, config.rope_scaling,
                              rotary_dim=config.rotary_dim, max_seq_len=config.max_seq_len)
        self.sliding_window = config.sliding_window if any(map(config.is_sliding, range(config.n_layer))) else None
        self.apply(init_normal_)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def hidden_states(self, input_ids: torch.Tensor, *, input_pos: torch.Tensor | None = None,
                      kv_cache: KVCache | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states ``(B, T, d_model)``; arguments as in :meth:`forward`."""
        ctx = decoder_context(input_ids, input_pos, kv_cache, attention_mask, self.sliding_window)
        max_pos = ctx.n_keys - 1 if kv_cache is not None else None
        ctx.rope = self.rope(ctx.input_pos, max_pos)  # (B, 1, T, head_dim) each, shared by all layers
        x = self.model.embed_tokens(input_ids)  # (B, T, d)
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
        return self.lm_head(self.hidden_states(input_ids, input_pos=input_pos, kv_cache=kv_cache,
                                               attention_mask=attention_mask))

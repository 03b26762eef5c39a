"""The Llama family (Touvron et al. 2023): pre-RMSNorm blocks, RoPE, SwiGLU MLP, grouped-query attention.

SmolLM2, Llama 2/3, Mistral (sliding-window attention), Qwen2 (query/key/value biases) and Qwen3
(RMSNorm on each query/key head, ``head_dim`` independent of ``d_model``) are this architecture
with different shapes and switches fixed at construction. Parameter names are those of Hugging
Face ``LlamaForCausalLM`` checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn

from corelm.config import ModelConfig
from corelm.ops.activation import activation_fn
from corelm.ops.attention import AttentionContext, cached_attention, decoder_context
from corelm.ops.init import init_weights
from corelm.ops.kv_cache import KVCache
from corelm.ops.rope import RopeTable, apply_rope
from corelm.ops.tied import TiedLMHead


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` (Zhang & Sennrich 2019): LayerNorm without the mean and the bias."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32: the mean of squares over thousands of channels overflows/underflows in half precision
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention with RoPE on queries and keys and ``n_kv_head`` shared key/value heads."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.sliding = config.is_sliding(layer_idx)
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        d, hd = config.d_model, config.head_dim
        qkv_bias = config.bias or config.qkv_bias
        self.q_proj = nn.Linear(d, config.n_head * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(d, config.n_kv_head * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, config.n_kv_head * hd, bias=qkv_bias)
        self.o_proj = nn.Linear(config.n_head * hd, d, bias=config.bias)
        # Qwen3 (Yang et al. 2025, section 2): per-head RMSNorm keeps q.k logits bounded
        self.q_norm = RMSNorm(hd, config.norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(hd, config.norm_eps) if config.qk_norm else nn.Identity()
        self.attn_dropout = config.attn_dropout

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_head, self.head_dim)).transpose(1, 2)  # (B, n_head, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        k = self.k_norm(k).transpose(1, 2)  # (B, n_kv_head, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, hd)
        cos, sin = ctx.rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        p = self.attn_dropout if self.training else 0.0
        y = cached_attention(q, k, v, ctx, self.layer_idx, sliding=self.sliding, dropout_p=p)  # (B, n_head, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, n_head * hd)
        return self.o_proj(y)


class MLP(nn.Module):
    """Gated MLP (Shazeer 2020): ``down(act(gate(x)) * up(x))``; SwiGLU with ``silu`` (Llama), ReGLU with ``relu``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.act = activation_fn(config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: attention then MLP, each added to the residual stream."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)  # on each sub-layer's output before the residual add

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), ctx))
        x = x + self.dropout(self.mlp(self.post_attention_layernorm(x)))
        return x


class LlamaBody(nn.Module):
    """Embeddings, blocks and final norm: HF's ``model.*`` namespace."""

    def __init__(self, config: ModelConfig, block: type[nn.Module], norm: type[nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)  # on the token embeddings
        self.layers = nn.ModuleList(block(config, i) for i in range(config.n_layer))
        self.norm = norm(config.d_model, config.norm_eps)


class Llama(nn.Module):
    """Decoder-only Llama; ``forward`` returns next-token logits ``(B, T, vocab)``.

    Families that differ from Llama only inside the block (OLMo 2's norm placement, MoE's sparse MLP)
    subclass it and name their own ``block`` (and final ``norm``) class: the embeddings, RoPE, mask,
    head and the loop over blocks are this class's.
    """

    block: type[nn.Module] = Block
    norm: type[nn.Module] = RMSNorm

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaBody(config, self.block, self.norm)
        if config.tie_embeddings:
            self.lm_head: nn.Module = TiedLMHead(self.model.embed_tokens)
        else:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.rope = RopeTable(config.head_dim, config.rope_theta, config.rope_scaling,
                              rotary_dim=config.rotary_dim, max_seq_len=config.max_seq_len)
        # the window of the sliding layers, None when every layer attends the whole prefix
        self.sliding_window = config.sliding_window if any(map(config.is_sliding, range(config.n_layer))) else None
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
        ctx.rope = self.rope(ctx.input_pos, max_pos)  # (B, 1, T, head_dim) each, shared by all layers
        x = self.model.dropout(self.model.embed_tokens(input_ids))  # (B, T, d)
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

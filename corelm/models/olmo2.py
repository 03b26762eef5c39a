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
from corelm.models.llama import Llama
from corelm.ops.attention import AttentionContext, cached_attention
from corelm.ops.rope import apply_rope


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


class Olmo2(Llama):
    """Decoder-only OLMo 2: Llama with :class:`Block` (norms after each sub-layer); ``forward`` returns logits."""

    block = Block
    norm = RMSNorm  # OLMo 2's: the weight multiplies in fp32

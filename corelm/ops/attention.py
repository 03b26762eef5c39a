"""Scaled dot-product attention: the formula as written, and PyTorch's fused kernel.

Both paths compute ``softmax(Q K^T / sqrt(d) + mask) V`` (Vaswani et al. 2017, eq. 1). The
reference path spells the formula out so it can be read next to the paper; the ``sdpa`` path calls
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels), and is the
default. ``tests/test_ops_attention.py`` checks that they agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from corelm.errors import CorelmError
from corelm.ops.kv_cache import KVCache

IMPLS = ("sdpa", "reference")
_impl = "sdpa"


def set_attention_impl(name: str) -> None:
    """Choose the attention path used by every model: ``"sdpa"`` (fast) or ``"reference"`` (readable)."""
    global _impl
    if name not in IMPLS:
        raise CorelmError(f"unknown attention implementation {name!r}; expected one of {', '.join(IMPLS)}")
    _impl = name


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Share each key/value head with ``n_rep`` query heads (grouped-query attention, Ainslie et al. 2023).

    Args:
        x: ``(B, n_kv_head, S, head_dim)``.
    Returns:
        ``(B, n_kv_head * n_rep, S, head_dim)``.
    """
    if n_rep == 1:
        return x
    return x.repeat_interleave(n_rep, dim=1)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None = None, is_causal: bool = False,
                        scale: float | None = None, softcap: float | None = None,
                        dropout_p: float = 0.0) -> torch.Tensor:
    """``softmax(Q K^T / sqrt(d)) V`` exactly as the formula reads.

    Args:
        q: ``(B, n_head, T, head_dim)`` queries.
        k, v: ``(B, n_kv_head, S, head_dim)`` keys and values.
        mask: boolean, broadcastable to ``(B, n_head, T, S)``; True = may attend.
        is_causal: apply the lower-triangular mask (query t sees keys 0..t); needs ``T == S``.
        scale: multiplies the scores instead of ``1 / sqrt(head_dim)`` (Gemma's query_pre_attn_scalar).
        softcap: scores become ``softcap * tanh(scores / softcap)`` before the mask (Gemma 2,
            Team et al. 2024, section 2): bounded logits, no single key can dominate.
        dropout_p: drop attention probabilities with this probability (training; the caller passes 0 in eval).
    Returns:
        ``(B, n_head, T, head_dim)``.
    """
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, n_head, T, S)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    # softmax in fp32: exp() of bf16 scores loses the small probabilities that sum to the output
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p)
    return probs @ v  # (B, n_head, T, head_dim)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None = None, is_causal: bool = False,
                   scale: float | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Same contract as :func:`reference_attention` (no soft-capping), through PyTorch's fused kernels."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          is_causal=is_causal and mask is None, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None = None, is_causal: bool = False,
              scale: float | None = None, softcap: float | None = None,
              dropout_p: float = 0.0) -> torch.Tensor:
    """Dispatch to the path chosen with :func:`set_attention_impl` (shapes as in :func:`reference_attention`).

    Soft-capped scores always take the reference path: the fused kernels cannot cap them.
    """
    if _impl == "reference" or softcap is not None:
        return reference_attention(q, k, v, mask, is_causal, scale, softcap, dropout_p)
    return sdpa_attention(q, k, v, mask, is_causal, scale, dropout_p)


def causal_mask(input_pos: torch.Tensor, n_keys: int, attention_mask: torch.Tensor | None = None,
                slots: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """Boolean mask ``(B, 1, T, S)`` letting a query at position p see key slots ``0..p``.

    Args:
        input_pos: ``(B, T)`` position of each query token.
        n_keys: number of key slots S.
        attention_mask: optional ``(B, S)`` with 1 for real tokens and 0 for padding (no cache).
        slots: a precomputed ``arange`` of at least ``n_keys`` slots (the KV cache keeps one).
        window: sliding-window attention (Beltagy et al. 2020; Mistral): only slots ``p - window + 1
            .. p``, the last ``window`` positions, are seen (transformers' ``sliding_window_overlay``).
    """
    if slots is None:
        slots = torch.arange(n_keys, device=input_pos.device)
    mask = slots[None, None, :n_keys] <= input_pos[:, :, None]  # (B, T, S)
    if window is not None:
        mask = mask & (slots[None, None, :n_keys] > input_pos[:, :, None] - window)
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, :]
        # A padding query may have no visible key; letting it see itself avoids a NaN row
        # (its output is never used).
        T = input_pos.shape[1]
        if T == n_keys:
            mask = mask | torch.eye(T, dtype=torch.bool, device=mask.device)
    return mask[:, None]


@dataclass
class AttentionContext:
    """What every block of one forward pass needs besides the hidden states.

    Attributes:
        input_pos: ``(B, T)`` position of each token.
        mask: boolean ``(B, 1, T, S)`` or None.
        is_causal: no explicit mask; use the lower-triangular one (no cache, no padding).
        n_keys: key slots S attended (cache only).
        kv_cache: the cache written and read by each layer, or None.
        rope: ``(cos, sin)`` tables ``(B, 1, T, head_dim)`` for RoPE families, else None.
        window_mask: the mask of sliding-window layers ``(B, 1, T, S)``, or None when no layer slides.
        rope_local: RoPE tables of sliding-window layers when they use another base (Gemma 3).
    """

    input_pos: torch.Tensor
    mask: torch.Tensor | None
    is_causal: bool
    n_keys: int
    kv_cache: KVCache | None = None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    window_mask: torch.Tensor | None = None
    rope_local: tuple[torch.Tensor, torch.Tensor] | None = None


def decoder_context(input_ids: torch.Tensor, input_pos: torch.Tensor | None, kv_cache: KVCache | None,
                    attention_mask: torch.Tensor | None, sliding_window: int | None = None) -> AttentionContext:
    """Resolve positions and the attention mask of a decoder forward (docs/DESIGN.md, "Models").

    * no cache: causal over the T tokens given; ``attention_mask`` (B, T) hides padding keys and
      sets positions to the running count of real tokens (so left padding works too).
    * with a cache: token at position p attends slots ``0..p`` of its row; only the first
      ``max(input_pos) + 1`` slots are read.
    * ``sliding_window``: also build ``window_mask``, the same mask restricted to each query's last
      ``sliding_window`` positions (slot indices, as transformers counts them with padding).
    """
    B, T = input_ids.shape
    device = input_ids.device
    if input_pos is not None:
        input_pos = input_pos.to(device)
        if input_pos.dim() == 1:
            input_pos = input_pos[None].expand(B, T)
    if kv_cache is None:
        if input_pos is None:
            if attention_mask is not None:
                input_pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                input_pos = torch.arange(T, device=device)[None].expand(B, T)
        order = torch.arange(T, device=device)[None].expand(B, T)
        window_mask = None
        if sliding_window is not None:
            window_mask = causal_mask(order, T, attention_mask, window=sliding_window)
        if attention_mask is None:
            return AttentionContext(input_pos, None, True, T, window_mask=window_mask)
        return AttentionContext(input_pos, causal_mask(order, T, attention_mask), False, T, window_mask=window_mask)
    if input_pos is None:
        input_pos = torch.arange(T, device=device)[None].expand(B, T)
    n_keys = kv_cache.max_seq_len if kv_cache.full_window else int(input_pos.max()) + 1
    if n_keys > kv_cache.max_seq_len:
        raise CorelmError(f"position {n_keys - 1} is beyond the KV cache's {kv_cache.max_seq_len} slots")
    if B == 1 and T == 1 and not kv_cache.full_window:
        mask = None  # a single new token at the end of its row sees every slot read
    else:
        mask = causal_mask(input_pos, n_keys, slots=kv_cache.slots)
    window_mask = None
    if sliding_window is not None:
        # the cache stays preallocated at full length: slots older than the window are masked, not evicted
        window_mask = causal_mask(input_pos, n_keys, slots=kv_cache.slots, window=sliding_window)
    return AttentionContext(input_pos, mask, False, n_keys, kv_cache, window_mask=window_mask)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext,
                     layer: int, *, sliding: bool = False, scale: float | None = None,
                     softcap: float | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Write ``k, v`` into the cache (if any) and attend.

    Args:
        q: ``(B, n_head, T, head_dim)``; k, v: ``(B, n_kv_head, T, head_dim)``.
        ctx: the forward's :class:`AttentionContext`.
        layer: index of the calling layer in the cache.
        sliding: the layer attends through ``ctx.window_mask`` (a fixed per-layer property).
        scale, softcap, dropout_p: as in :func:`reference_attention`.
    Returns:
        ``(B, n_head, T, head_dim)``.
    """
    if ctx.kv_cache is not None:
        k, v = ctx.kv_cache.update(layer, ctx.input_pos, k, v, ctx.n_keys)  # (B, n_kv_head, S, head_dim)
    if sliding:
        return attention(q, k, v, ctx.window_mask, False, scale, softcap, dropout_p)
    return attention(q, k, v, ctx.mask, ctx.is_causal, scale, softcap, dropout_p)

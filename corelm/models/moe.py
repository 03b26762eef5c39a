"""Sparse mixture-of-experts decoders: Mixtral, Qwen2-MoE and Qwen3-MoE.

The attention half of every block is Llama's (:mod:`corelm.models.llama`: RoPE, grouped-query
attention, Mistral's sliding window, Qwen2's q/k/v biases, Qwen3's per-head QK norm). The MLP half
is a router and ``n_experts`` SwiGLU experts (Shazeer et al. 2017; Fedus et al. 2022, "Switch
Transformers"; Jiang et al. 2024, "Mixtral of Experts", eq. 1-2)::

    p = softmax(x W_gate^T)                       # (N, E) router probabilities
    w, e = topk(p, k)                             # each token's k experts and their weights
    w = w / sum(w)            if norm_topk_prob   # Mixtral, Qwen3-MoE; Qwen2-MoE keeps p's values
    y = sum_j w_j * SwiGLU_{e_j}(x)
      + sigmoid(x W_sg^T) * SwiGLU_shared(x)      # Qwen2-MoE's shared expert

The experts run as *grouped* matmuls: the ``N * k`` (token, expert) assignments are sorted by
expert, so each expert's tokens are one contiguous block of rows, and one ``torch._grouped_mm``
call multiplies every block by its expert's weights (one matmul per expert where that kernel does
not apply). No Python loop runs over tokens, and on the grouped path none over experts either.
Under ``torch.compile`` (the engine's decode step) the few tokens' expert matrices are gathered
and multiplied in one batched matmul instead: static shapes, one graph.

Parameter names are those of transformers 5 ``MixtralForCausalLM`` / ``Qwen2MoeForCausalLM`` /
``Qwen3MoeForCausalLM`` modules: experts stored fused, ``mlp.experts.gate_up_proj`` ``(E, 2F, d)``
(gate rows first) and ``mlp.experts.down_proj`` ``(E, d, F)``. Checkpoint files keep one tensor per
expert (``block_sparse_moe.experts.{e}.w1`` for Mixtral, ``mlp.experts.{e}.gate_proj`` for Qwen);
:func:`state_dict_from_hf` stacks them (and takes already-fused tensors as they are) and
:func:`state_dict_to_hf` writes them back the way transformers' ``save_pretrained`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from corelm.config import ModelConfig
from corelm.models.llama import Attention, Llama, RMSNorm
from corelm.ops.attention import AttentionContext

# --------------------------------------------------------------------------------------------
# routing and grouped expert computation (stateless)
# --------------------------------------------------------------------------------------------


def route(router_logits: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing over the softmax of the router logits.

    Args:
        router_logits: ``(N, E)``.
        k: experts per token.
        normalize: divide the k probabilities by their sum (``norm_topk_prob``).
    Returns:
        ``(weights (N, k), experts (N, k))``; weights in the logits' dtype.
    """
    # fp32: the probabilities pick the experts; in bf16 close ones round equal and top-k picks by rounding
    probs = torch.softmax(router_logits.float(), dim=-1)  # (N, E)
    weights, experts = torch.topk(probs, k, dim=-1)  # (N, k) each
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), experts


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands: CPU (fp32/bf16/fp16) or CUDA bf16, and rows
    of 16-byte multiples (the kernel's stride rule)."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype:
        return False
    if x.device.type == "cpu":
        ok_dtype = x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    else:
        ok_dtype = x.device.type == "cuda" and x.dtype == torch.bfloat16
    size = x.element_size()
    return ok_dtype and (x.shape[1] * size) % 16 == 0 and (w.shape[1] * size) % 16 == 0


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``y[rows of e] = x[rows of e] @ weight[e]^T`` for rows grouped by expert.

    Args:
        x: ``(M, in)``, the rows of expert e at ``offsets[e-1]:offsets[e]`` (``offsets[-1] == M``).
        weight: ``(E, out, in)``, as ``nn.Linear`` stores it, one matrix per expert.
        offsets: ``(E,)`` int32, the end row of each expert's block (a cumulative count).
    Returns:
        ``(M, out)``.
    """
    if _grouped_mm_ok(x, weight):
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)  # one call for every expert
    out = x.new_empty(x.shape[0], weight.shape[1])
    ends = offsets.tolist()
    for e, (lo, hi) in enumerate(zip([0, *ends[:-1]], ends)):  # one matmul per expert over its rows
        if hi > lo:
            out[lo:hi] = x[lo:hi] @ weight[e].t()
    return out


def experts_forward(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                    gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """``sum_j weights[:, j] * SwiGLU_{experts[:, j]}(x)`` with grouped matmuls.

    Args:
        x: ``(N, d)`` tokens.
        weights: ``(N, k)`` routing weights; experts: ``(N, k)`` expert ids.
        gate_up_proj: ``(E, 2F, d)``, gate rows then up rows; down_proj: ``(E, d, F)``.
    Returns:
        ``(N, d)``.
    """
    if torch.compiler.is_compiling():
        return gathered_experts_forward(x, weights, experts, gate_up_proj, down_proj)
    N, d = x.shape
    k = experts.shape[1]
    E = gate_up_proj.shape[0]
    flat = experts.reshape(-1)  # (N*k,) expert of each (token, slot) assignment
    order = flat.argsort(stable=True)  # (N*k,) assignments grouped by expert
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))  # (E,) tokens per expert
    offsets = counts.cumsum(0, dtype=torch.int32)  # (E,) end row of each expert's block
    xs = x[order // k]  # (N*k, d) each assignment's token, grouped by expert
    gate, up = grouped_linear(xs, gate_up_proj, offsets).chunk(2, dim=-1)  # (N*k, F) each
    ys = grouped_linear(F.silu(gate) * up, down_proj, offsets)  # (N*k, d)
    ys = ys * weights.reshape(-1)[order, None]
    y = torch.empty_like(ys)
    y[order] = ys  # back to (token, slot) order
    return y.view(N, k, d).sum(dim=1)  # (N, d)


def gathered_experts_forward(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                             gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """:func:`experts_forward` as one batched matmul over each assignment's gathered expert matrices.

    The form a compiled decode step traces (a few tokens, so gathering ``N * k`` matrices costs about
    what reading them costs anyway): static shapes, no host sync, and no ``torch._grouped_mm``, whose
    meta kernel in torch 2.13 accepts only bf16. Arguments and result as in :func:`experts_forward`.
    """
    N, d = x.shape
    k = experts.shape[1]
    flat = experts.reshape(-1)  # (N*k,)
    xs = x[:, None].expand(N, k, d).reshape(N * k, d, 1)  # (N*k, d, 1) each assignment's token
    gate, up = torch.bmm(gate_up_proj[flat], xs).squeeze(-1).chunk(2, dim=-1)  # (N*k, F) each
    ys = torch.bmm(down_proj[flat], (F.silu(gate) * up)[:, :, None]).squeeze(-1)  # (N*k, d)
    return (ys * weights.reshape(-1, 1)).view(N, k, d).sum(dim=1)  # (N, d)


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020) of a given width: the dense layers and Qwen2-MoE's shared expert."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """``n_experts`` SwiGLU MLPs stored as stacked matrices (transformers 5's fused layout)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        E, d, f = config.n_experts, config.d_model, config.moe_d_ff
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * f, d))  # (E, 2F, d): gate rows, then up rows
        self.down_proj = nn.Parameter(torch.empty(E, d, f))  # (E, d, F)
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        return experts_forward(x, weights, experts, self.gate_up_proj, self.down_proj)


class SparseMoE(nn.Module):
    """Router, routed experts and (Qwen2-MoE) the sigmoid-gated shared expert."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k = config.n_experts, config.n_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.d_model, config.n_experts, bias=False)  # the router
        self.experts = Experts(config)
        if config.shared_expert_d_ff:
            self.shared_expert = MLP(config.d_model, config.shared_expert_d_ff)
            self.shared_expert_gate = nn.Linear(config.d_model, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        x = x.reshape(B * T, d)  # (N, d): routing is per token
        # routers may be kept in fp32 in a bf16 model (GGUF files store them F32): they pick the experts
        logits = self.gate(x.to(self.gate.weight.dtype))  # (N, E)
        weights, experts = route(logits, self.top_k, self.norm_topk_prob)  # (N, k) each
        y = self.experts(x, weights.to(x.dtype), experts)  # (N, d)
        if hasattr(self, "shared_expert"):
            gate = self.shared_expert_gate(x.to(self.shared_expert_gate.weight.dtype))
            y = y + torch.sigmoid(gate).to(x.dtype) * self.shared_expert(x)
        return y.view(B, T, d)


class Block(nn.Module):
    """Pre-norm residual block: Llama attention, then a sparse (or, in ``dense_layers``, dense) MLP."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        sparse = layer_idx not in (config.dense_layers or ())
        self.mlp: nn.Module = SparseMoE(config) if sparse else MLP(config.d_model, config.d_ff)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class MoE(Llama):
    """Decoder-only sparse MoE: Llama with :class:`Block` (a routed MLP); ``forward`` returns logits."""

    block = Block


# --------------------------------------------------------------------------------------------
# router auxiliary loss (training)
# --------------------------------------------------------------------------------------------


def load_balancing_loss(router_logits: Sequence[torch.Tensor], n_experts: int, top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer's auxiliary load-balancing loss (Fedus et al. 2022, eq. 4-6), top-k form.

    ``E * sum_e f_e * P_e``, with ``f_e`` the fraction of (token, slot) assignments that go to
    expert e (summing to k, as Mixtral/transformers count it) and ``P_e`` the mean router
    probability of e, over the tokens of every layer. It is minimal (``k``) when routing is
    uniform; ``f`` carries no gradient, ``P`` pulls the router towards balance.

    Args:
        router_logits: one ``(N, E)`` tensor per sparse layer (N = B*T tokens).
        n_experts: E.
        top_k: experts per token.
        attention_mask: optional ``(B, T)`` 1 = token, 0 = padding (padding is not counted).
    Returns:
        scalar fp32 loss.
    """
    logits = torch.cat([t.float() for t in router_logits])  # (L*N, E)
    probs = torch.softmax(logits, dim=-1)
    chosen = F.one_hot(torch.topk(probs, top_k, dim=-1).indices, n_experts).sum(dim=1).float()  # (L*N, E)
    if attention_mask is None:
        mask = torch.ones(logits.shape[0], 1, device=logits.device)
    else:
        mask = attention_mask.reshape(-1, 1).float().repeat(len(router_logits), 1).to(logits.device)
    rows = mask.sum()
    f = (chosen * mask).sum(dim=0) / rows  # (E,)
    P = (probs * mask).sum(dim=0) / rows  # (E,)
    return n_experts * (f * P).sum()


def with_router_aux_loss(loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, Any]],
                         coef: float = 0.01) -> Callable[[nn.Module, Any], tuple[torch.Tensor, Any]]:
    """Add ``coef * load_balancing_loss`` to a training loop ``loss_fn(model, batch)``.

    The router logits of the forward are caught by hooks on each :class:`SparseMoE`'s ``gate``
    (the model itself stays unaware); the metrics gain ``router_aux_loss``. Mixtral and Qwen-MoE
    train with ``coef = 0.001`` (``router_aux_loss_coef`` in their configs); Switch uses 0.01.
    Padding is counted like any token (use :func:`load_balancing_loss` directly to mask it).
    """

    def wrapped(model: nn.Module, batch: Any) -> tuple[torch.Tensor, Any]:
        moes = [m for m in model.modules() if isinstance(m, SparseMoE)]
        caught: list[torch.Tensor] = []
        handles = [m.gate.register_forward_hook(lambda _m, _i, out: caught.append(out)) for m in moes]
        try:
            loss, info = loss_fn(model, batch)
        finally:
            for h in handles:
                h.remove()
        if not caught:
            return loss, info
        aux = load_balancing_loss(caught, moes[0].n_experts, moes[0].top_k)
        metrics = dict(info) if isinstance(info, dict) else {} if info is None else {"n_tokens": info}
        metrics["router_aux_loss"] = float(aux.detach())
        return loss + coef * aux, metrics

    return wrapped

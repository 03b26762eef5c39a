"""LoRA (Hu et al. 2021, arXiv:2106.09685) as a transform that swaps ``nn.Linear`` children.

``apply_lora(model, targets, rank, alpha)`` replaces each targeted ``nn.Linear`` by a :class:`LoRALinear`
that *shares* the original weight and bias (nothing is copied, parameter names stay the Hugging Face
ones) and adds the low-rank update ``(alpha / r) * B A x``. ``B`` starts at zero, so the model's outputs
are unchanged at step 0. The base weight is frozen: LoRA training leaves it bit-identical.

Merging folds ``(alpha / r) B A`` into the weight (computed in fp32, then cast), so a merged model is an
ordinary model with no extra inference cost; ``unmerge`` subtracts it again (exact up to one rounding of
the weight dtype). Packed/quantized modules are not ``nn.Linear`` and are refused with a clear error.

Sparse MoE models (:mod:`corelm.models.moe`) store their routed experts as stacked tensors
(``mlp.experts.gate_up_proj (E, 2F, d)``, ``mlp.experts.down_proj (E, d, F)``), not ``nn.Linear``.
Targeting ``experts`` (or ``mlp``, or ``all-linear``) gives every expert its own rank-``r`` pair,
stacked the same way (:class:`LoRAExperts`), computed with the same grouped matmuls as the experts
(no per-token loop, no expert weight materialized) and merged expert by expert. Routers
(``mlp.gate``, ``shared_expert_gate``) are left alone unless named: a small change to a router moves
tokens to other experts, and they hold a negligible share of the parameters.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from corelm.errors import CorelmError

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_GATED_MLP = ("gate_proj", "up_proj", "down_proj")
# The layers behind the target names ``attention`` and ``mlp`` in each family (HF parameter names).
# ``mlp`` of a sparse MoE: its dense layers, the shared expert, and the stacked routed experts.
TARGET_GROUPS: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": {"attention": _ATTENTION, "mlp": _GATED_MLP},  # Llama, Mistral, Qwen2/3, Phi-3 (split qkv)
    "gemma": {"attention": _ATTENTION, "mlp": _GATED_MLP},  # Gemma 1/2/3 (GeGLU has the same three names)
    "olmo2": {"attention": _ATTENTION, "mlp": _GATED_MLP},
    "moe": {"attention": _ATTENTION, "mlp": (*_GATED_MLP, "experts")},  # Mixtral, Qwen2-MoE, Qwen3-MoE
    "gpt2": {"attention": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")},
    "bert": {"attention": ("self.query", "self.key", "self.value", "attention.output.dense"),
             "mlp": ("intermediate.dense", "layer.*.output.dense")},
    # encoder-decoders: self-attention and cross-attention (encoder_attn / EncDecAttention) alike
    "bart": {"attention": ("q_proj", "k_proj", "v_proj", "out_proj"), "mlp": ("fc1", "fc2")},
    "t5": {"attention": tuple(f"{a}.{p}" for a in ("SelfAttention", "EncDecAttention") for p in "qkvo"),
           "mlp": ("DenseReluDense.wi", "DenseReluDense.wi_0", "DenseReluDense.wi_1", "DenseReluDense.wo")},
}
# Which layers LoRA targets by default: the attention projections, as in the paper (section 7.1 finds
# W_q and W_v the most effective budget; all four cost little more).
DEFAULT_TARGETS = {family: groups["attention"] for family, groups in TARGET_GROUPS.items()}
# The output projections of each sub-layer, where Houlsby et al. (2019) insert bottleneck adapters.
# A sparse MoE's feed-forward output is the whole routed sub-layer (``mlp``), not one linear.
SUBLAYER_OUTPUTS = {
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "gemma": ("self_attn.o_proj", "mlp.down_proj"),
    "olmo2": ("self_attn.o_proj", "mlp.down_proj"),
    "moe": ("self_attn.o_proj", "mlp"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "bert": ("attention.output.dense", "layer.*.output.dense"),
    "bart": ("self_attn.out_proj", "encoder_attn.out_proj", "fc2"),
    "t5": ("SelfAttention.o", "EncDecAttention.o", "DenseReluDense.wo"),
}
# MoE routers: never part of ``all-linear`` (see the module docstring); name them to adapt them.
ROUTERS = ("mlp.gate", "shared_expert_gate")
_IN_BLOCK = re.compile(r"(^|\.)(layers|h|layer)\.\d+\.")  # modules inside the Transformer blocks


def _family_table(table: dict[str, Any], family: str, what: str) -> Any:
    if family not in table:
        raise CorelmError(f"no default {what} for {family} models; name the layers with --targets")
    return table[family]


def resolve_targets(family: str, targets: Iterable[str] | str | None) -> list[str]:
    """Target names with the family's groups expanded: ``attention`` and ``mlp`` become the layer
    names of :data:`TARGET_GROUPS`; ``None`` is the default (``attention``); other names pass through.

    Raises:
        CorelmError: a group asked of a family without a table.
    """
    targets = ["attention"] if targets is None else [targets] if isinstance(targets, str) else list(targets)
    out: list[str] = []
    for t in targets:
        if t in ("attention", "mlp"):
            out.extend(_family_table(TARGET_GROUPS, family, "LoRA targets")[t])
        else:
            out.append(t)
    return list(dict.fromkeys(out))


def _matches(name: str, pattern: str) -> bool:
    """``pattern`` matches a dotted suffix of ``name``; ``*`` stands for one path component."""
    regex = r"(^|\.)" + re.escape(pattern).replace(r"\*", r"[^.]+") + "$"
    return re.search(regex, name) is not None


def _is_experts(module: nn.Module) -> bool:
    """Stacked routed experts (:class:`corelm.models.moe.Experts`, or LoRA over them)."""
    return isinstance(getattr(module, "gate_up_proj", None), torch.Tensor) and module.gate_up_proj.dim() == 3


def find_experts(model: nn.Module, targets: Iterable[str] | str) -> list[str]:
    """Names of the stacked-expert modules of a sparse MoE matched by ``targets`` (or ``all-linear``)."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    return [name for name, module in model.named_modules()
            if _IN_BLOCK.search(name) and _is_experts(module)
            and (targets == ["all-linear"] or any(_matches(name, t) for t in targets))]


def find_linears(model: nn.Module, targets: Iterable[str] | str, required: bool = True) -> list[str]:
    """Names of the block linears matched by ``targets`` (dotted suffixes, or ``"all-linear"``).

    ``all-linear`` leaves out MoE routers (:data:`ROUTERS`); stacked experts are never linears here
    (see :func:`find_experts`).

    Raises:
        CorelmError: nothing matched (when ``required``), or a match is not a plain ``nn.Linear``
            (e.g. a quantized module).
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    names = []
    for name, module in model.named_modules():
        if not _IN_BLOCK.search(name) or _is_experts(module):
            continue
        wanted = (targets == ["all-linear"] and isinstance(module, nn.Linear)
                  and not any(_matches(name, r) for r in ROUTERS))
        wanted = wanted or any(_matches(name, t) for t in targets)
        if not wanted:
            continue
        if not isinstance(module, nn.Linear):
            raise CorelmError(f"{name} is a {type(module).__name__}, not nn.Linear: LoRA/adapters need the "
                              "unquantized model (load it without --quantize)")
        names.append(name)
    if not names and required:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                          if isinstance(m, nn.Linear) and _IN_BLOCK.search(n)})
        raise CorelmError(f"no linear layer matches targets {targets}; this model has: {', '.join(linears)}")
    return names


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the child ``name`` (dotted path) of ``model`` for ``new``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


class SharedLinear(nn.Linear):
    """An ``nn.Linear`` that adopts another linear's weight and bias (same tensors, same names)."""

    def __init__(self, base: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias

    def plain(self) -> nn.Linear:
        """An ordinary ``nn.Linear`` holding the same weight and bias."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    merged = False  # subclasses that add a low-rank update define delta_weight() and can fold it in

    def delta_weight(self) -> torch.Tensor:
        """The update ``(out, in)`` in fp32 that :meth:`merge` adds to the weight."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False


class LoRALinear(SharedLinear):
    """``y = W x + b + (alpha / r) * B (A dropout(x))`` with ``A: (r, in)``, ``B: (out, r)``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base)
        if rank < 1:
            raise CorelmError(f"LoRA rank must be >= 1, got {rank}")
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.rank, self.scaling = rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        # A as an nn.Linear weight would be initialized (Kaiming-uniform); B = 0 makes the update start at 0
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """``(alpha / r) B A``, shape ``(out, in)``, in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, scaling={self.scaling:g}"


def _grouped_rows(x: torch.Tensor, experts: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, ...]:
    """The (token, slot) assignments sorted by expert, as :func:`corelm.models.moe.experts_forward` sorts them.

    Returns:
        ``order (N*k,)``, ``offsets (E,)`` (end row of each expert's block) and ``xs (N*k, d)``.
    """
    k = experts.shape[1]
    flat = experts.reshape(-1)  # (N*k,)
    order = flat.argsort(stable=True)  # (N*k,) assignments grouped by expert
    counts = torch.zeros(n_experts, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))  # (E,)
    return order, counts.cumsum(0, dtype=torch.int32), x[order // k]


class LoRAExperts(nn.Module):
    """Per-expert LoRA over stacked SwiGLU experts: expert ``e`` computes with
    ``W_e + (alpha / r) B_e A_e`` for both of its matrices.

    Shares ``gate_up_proj (E, 2F, d)`` and ``down_proj (E, d, F)`` with the experts it wraps (same
    tensors, same names) and adds ``lora_A_gate_up (E, r, d)``, ``lora_B_gate_up (E, 2F, r)``,
    ``lora_A_down (E, r, F)``, ``lora_B_down (E, d, r)``; ``B`` starts at zero. The low-rank branch
    runs on each expert's block of rows with the experts' own grouped matmul
    (:func:`corelm.models.moe.grouped_linear`), so no ``(E, 2F, d)`` update is ever formed, except by
    :meth:`merge`.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise CorelmError(f"LoRA rank must be >= 1, got {rank}")
        self.gate_up_proj, self.down_proj = base.gate_up_proj, base.down_proj
        E, two_f, d = self.gate_up_proj.shape
        kw = {"dtype": self.gate_up_proj.dtype, "device": self.gate_up_proj.device}
        self.rank, self.scaling = rank, alpha / rank
        self.lora_A_gate_up = nn.Parameter(torch.empty(E, rank, d, **kw))
        self.lora_B_gate_up = nn.Parameter(torch.zeros(E, two_f, rank, **kw))
        self.lora_A_down = nn.Parameter(torch.empty(E, rank, two_f // 2, **kw))
        self.lora_B_down = nn.Parameter(torch.zeros(E, d, rank, **kw))
        for e in range(E):  # each expert's A initialized as LoRALinear's
            nn.init.kaiming_uniform_(self.lora_A_gate_up[e], a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lora_A_down[e], a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha / r) B_e A_e`` of every expert for both matrices, ``(E, 2F, d)`` and ``(E, d, F)``, fp32."""
        return (torch.bmm(self.lora_B_gate_up.float(), self.lora_A_gate_up.float()) * self.scaling,
                torch.bmm(self.lora_B_down.float(), self.lora_A_down.float()) * self.scaling)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """As :class:`corelm.models.moe.Experts`: ``x (N, d)``, ``weights``/``experts (N, k)`` -> ``(N, d)``."""
        from corelm.models.moe import experts_forward, grouped_linear

        if self.merged:
            return experts_forward(x, weights, experts, self.gate_up_proj, self.down_proj)
        if torch.compiler.is_compiling():  # static shapes: the update of each assignment's expert, batched
            gu, dn = (w.to(x.dtype) for w in self.delta_weights())
            return experts_forward(x, weights, experts, self.gate_up_proj + gu, self.down_proj + dn)
        N, d = x.shape
        k = experts.shape[1]
        order, offsets, xs = _grouped_rows(x, experts, self.gate_up_proj.shape[0])  # xs: (N*k, d)

        def lora_linear(inp: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            low = grouped_linear(self.dropout(inp), a, offsets)  # (N*k, r)
            return grouped_linear(inp, w, offsets) + grouped_linear(low, b, offsets) * self.scaling

        gate, up = lora_linear(xs, self.gate_up_proj, self.lora_A_gate_up, self.lora_B_gate_up).chunk(2, dim=-1)
        ys = lora_linear(F.silu(gate) * up, self.down_proj, self.lora_A_down, self.lora_B_down)  # (N*k, d)
        ys = ys * weights.reshape(-1)[order, None]
        y = torch.empty_like(ys)
        y[order] = ys  # back to (token, slot) order
        return y.view(N, k, d).sum(dim=1)  # (N, d)

    @torch.no_grad()
    def _add(self, sign: float) -> None:
        for w, delta in zip((self.gate_up_proj, self.down_proj), self.delta_weights()):
            w.copy_((w.float() + sign * delta).to(w.dtype))

    def merge(self) -> None:
        if not self.merged:
            self._add(1.0)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._add(-1.0)
            self.merged = False

    def plain(self) -> nn.Module:
        """Ordinary experts holding the same (merged or not) tensors."""
        from corelm.models.moe import Experts

        experts = Experts.__new__(Experts)
        nn.Module.__init__(experts)
        experts.gate_up_proj, experts.down_proj = self.gate_up_proj, self.down_proj
        return experts

    def extra_repr(self) -> str:
        E, two_f, d = self.gate_up_proj.shape
        return f"experts={E}, d={d}, ffn={two_f // 2}, rank={self.rank}, scaling={self.scaling:g}"


def freeze(model: nn.Module) -> None:
    """Stop gradients for every parameter of ``model``."""
    for p in model.parameters():
        p.requires_grad_(False)


def apply_lora(model: nn.Module, targets: Iterable[str] | str, rank: int = 8, alpha: float = 16.0,
               dropout: float = 0.0) -> list[str]:
    """Freeze ``model`` and wrap the targeted linears with LoRA; only ``lora_A``/``lora_B`` train.

    Args:
        model: Any corelm model (or a head wrapping one).
        targets: Dotted name suffixes (``"q_proj"``, ``"attention.output.dense"``, a MoE's ``"experts"``)
            or ``"all-linear"`` (see :func:`resolve_targets` for the ``attention``/``mlp`` groups).
        rank: ``r``, the rank of the update.
        alpha: Scale numerator; the update is multiplied by ``alpha / r``.
        dropout: Dropout on the LoRA branch's input.

    Returns:
        The names of the wrapped modules (linears, then stacked experts).
    """
    experts = find_experts(model, targets)
    names = find_linears(model, targets, required=not experts)
    freeze(model)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, SharedLinear):
            raise CorelmError(f"{name} already carries {type(module).__name__}")
        replace_module(model, name, LoRALinear(module, rank, alpha, dropout))
    for name in experts:
        module = model.get_submodule(name)
        if isinstance(module, LoRAExperts):
            raise CorelmError(f"{name} already carries LoRA")
        replace_module(model, name, LoRAExperts(module, rank, alpha, dropout))
    return names + experts


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of ``model`` that carries a mergeable low-rank update (LoRA or AdaLoRA)."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "delta_weight") or isinstance(m, LoRAExperts)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every low-rank update into its weight and swap the wrappers back to plain ``nn.Linear``.

    The result has exactly the parameter names of the base model, ready for ``save_hf_dir``.
    """
    for name, module in lora_modules(model).items():
        module.merge()
        replace_module(model, name, module.plain())
    return model


def set_merged(model: nn.Module, merged: bool) -> None:
    """Merge (fast inference) or unmerge (training) every low-rank update in place."""
    for module in lora_modules(model).values():
        module.merge() if merged else module.unmerge()

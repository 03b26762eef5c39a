"""LoRA (Hu et al. 2021, arXiv:2106.09685) as a transform that swaps ``nn.Linear`` children.

``apply_lora(model, targets, rank, alpha)`` replaces each targeted ``nn.Linear`` by a :class:`LoRALinear`
that *shares* the original weight and bias (nothing is copied, parameter names stay the Hugging Face
ones) and adds the low-rank update ``(alpha / r) * B A x``. ``B`` starts at zero, so the model's outputs
are unchanged at step 0. The base weight is frozen: LoRA training leaves it bit-identical.

Merging folds ``(alpha / r) B A`` into the weight (computed in fp32, then cast), so a merged model is an
ordinary model with no extra inference cost; ``unmerge`` subtracts it again (exact up to one rounding of
the weight dtype). Packed/quantized modules are not ``nn.Linear`` and are refused with a clear error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from corelm.errors import CorelmError

# Which linear layers of each family LoRA targets by default: the attention projections, as in the paper
# (section 7.1 finds W_q and W_v the most effective budget; all four cost little more).
DEFAULT_TARGETS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gpt2": ("attn.c_attn", "attn.c_proj"),
    "bert": ("self.query", "self.key", "self.value", "attention.output.dense"),
}
# The output projections of each sub-layer, where Houlsby et al. (2019) insert bottleneck adapters.
SUBLAYER_OUTPUTS = {
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "bert": ("attention.output.dense", "layer.*.output.dense"),
}
_IN_BLOCK = re.compile(r"(^|\.)(layers|h|layer)\.\d+\.")  # modules inside the Transformer blocks


def _matches(name: str, pattern: str) -> bool:
    """``pattern`` matches a dotted suffix of ``name``; ``*`` stands for one path component."""
    regex = r"(^|\.)" + re.escape(pattern).replace(r"\*", r"[^.]+") + "$"
    return re.search(regex, name) is not None


def find_linears(model: nn.Module, targets: Iterable[str] | str) -> list[str]:
    """Names of the block linears matched by ``targets`` (dotted suffixes, or ``"all-linear"``).

    Raises:
        CorelmError: nothing matched, or a match is not a plain ``nn.Linear`` (e.g. a quantized module).
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    names = []
    for name, module in model.named_modules():
        if not _IN_BLOCK.search(name):
            continue
        wanted = targets == ["all-linear"] and isinstance(module, nn.Linear)
        wanted = wanted or any(_matches(name, t) for t in targets)
        if not wanted:
            continue
        if not isinstance(module, nn.Linear):
            raise CorelmError(f"{name} is a {type(module).__name__}, not nn.Linear: LoRA/adapters need the "
                              "unquantized model (load it without --quantize)")
        names.append(name)
    if not names:
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


def freeze(model: nn.Module) -> None:
    """Stop gradients for every parameter of ``model``."""
    for p in model.parameters():
        p.requires_grad_(False)


def apply_lora(model: nn.Module, targets: Iterable[str] | str, rank: int = 8, alpha: float = 16.0,
               dropout: float = 0.0) -> list[str]:
    """Freeze ``model`` and wrap the targeted linears with LoRA; only ``lora_A``/``lora_B`` train.

    Args:
        model: Any corelm model (or a head wrapping one).
        targets: Dotted name suffixes (``"q_proj"``, ``"attention.output.dense"``) or ``"all-linear"``.
        rank: ``r``, the rank of the update.
        alpha: Scale numerator; the update is multiplied by ``alpha / r``.
        dropout: Dropout on the LoRA branch's input.

    Returns:
        The names of the wrapped modules.
    """
    names = find_linears(model, targets)
    freeze(model)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, SharedLinear):
            raise CorelmError(f"{name} already carries {type(module).__name__}")
        replace_module(model, name, LoRALinear(module, rank, alpha, dropout))
    return names


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of ``model`` that carries a mergeable low-rank update (LoRA or AdaLoRA)."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "delta_weight")}


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

"""Several LoRA adapters over one base model, each row of a batch with its own (S-LoRA / Punica style).

LoRA (:mod:`corelm.finetune.lora`) adds ``(alpha / r) B A x`` to a linear layer. To serve many
adapters from one base model without one batch per adapter, :func:`apply_multi_lora` wraps each
block linear in a :class:`MultiLoRALinear` holding the adapters *stacked*: ``A (slots, r_max, in)``
and ``B (slots, out, r_max)``, slot ``k`` holding adapter ``k`` (Sheng et al. 2023, "S-LoRA",
arXiv:2311.03285; Chen et al. 2023, "Punica", arXiv:2310.18547, whose gather kernel is BGMV). A
forward over ``B`` rows reads one adapter slot per row from :class:`AdapterRows` (slot 0 = no adapter),
gathers those rows' ``A`` and ``B`` and adds the low-rank update with two batched matmuls
(``torch.bmm``) -- the base matmul stays one matmul for the whole batch.

Choices, and why:

- Rank padding: an adapter of rank ``r < r_max`` fills ``A[k, :r]`` and ``B[k, :, :r]``; the padded
  products add exact zeros, so a row's numbers do not depend on the other adapters' ranks.
- ``alpha / r`` is folded into ``B`` when the adapter is installed (one multiply fewer per token).
- Only rows with an adapter are gathered; rows without one get the base output untouched, so they
  equal the plain model bit for bit. A module that no adapter of the forward targets is skipped.
- Each row's update is its own small matmul pair, so a row's output does not depend on which other
  rows share the batch: a request gives the same tokens alone or in any company.

The wrapped base may be any linear-like module (``nn.Linear``, corelm's quantized layers): the update
is computed in the activations' dtype beside it, never merged into the (possibly packed) weight.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from corelm.errors import CorelmError
from corelm.finetune.lora import _IN_BLOCK, replace_module

TASK_FILE = "corelm_task.json"
ADAPTER_FILE = "adapter.safetensors"
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])$")


@dataclass
class AdapterRows:
    """Which adapter slot each row of the next forward uses; shared by every :class:`MultiLoRALinear`
    of a model and set by the caller before each forward.

    Attributes:
        ids: ``(B,)`` int64 slot per row (0 = none), or None when no row has an adapter.
        picked: ``(P,)`` the rows with an adapter, or None when every row has one; ``picked_ids``: their
            slots ``(P,)``; ``slots``: the distinct slots (a Python set). Computed once per forward, not
            once per layer.
    """

    ids: torch.Tensor | None = None
    picked: torch.Tensor | None = None
    picked_ids: torch.Tensor | None = None
    slots: frozenset[int] = field(default_factory=frozenset)

    def set(self, ids: list[int] | None, device: torch.device | str = "cpu") -> None:
        """Use slot ``ids[b]`` for row ``b`` of the next forward (None or all zeros: the base model)."""
        if not ids or not any(ids):
            self.ids, self.picked, self.picked_ids, self.slots = None, None, None, frozenset()
            return
        ids = list(ids)
        self.ids = torch.as_tensor(ids, dtype=torch.long, device=device)
        self.picked = None if all(ids) else torch.tensor([b for b, s in enumerate(ids) if s], device=device)
        self.picked_ids = self.ids if self.picked is None else self.ids[self.picked]
        self.slots = frozenset(i for i in ids if i)


class MultiLoRALinear(nn.Module):
    """``y = base(x) + B[s] (A[s] x)`` with ``s`` the row's slot (:class:`AdapterRows`).

    Args:
        base: the linear layer (``in_features``/``out_features``; ``nn.Linear`` or quantized).
        slots: adapters it can hold at once (slot 0, "no adapter", comes on top).
        rank: ``r_max``: the largest adapter rank it holds.
        rows: the model's shared :class:`AdapterRows`.
        dtype: dtype of the stacks (the activations' dtype).
    """

    def __init__(self, base: nn.Module, slots: int, rank: int, rows: AdapterRows, dtype: torch.dtype) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)
        device = next(iter([*base.parameters(), *base.buffers()])).device
        self.register_buffer("lora_A", torch.zeros(slots + 1, rank, self.in_features, dtype=dtype, device=device))
        self.register_buffer("lora_B", torch.zeros(slots + 1, self.out_features, rank, dtype=dtype, device=device))
        self.rows = rows
        self.used: set[int] = set()  # slots whose adapter targets this layer
        # the same as a (slots + 1,) uint8 mask, for corelm's C++ step (which reads these stacks in place)
        self.used_mask = torch.zeros(slots + 1, dtype=torch.uint8, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self.rows
        if rows.ids is None or self.used.isdisjoint(rows.slots):
            return y
        n, picked, ids = rows.ids.shape[0], rows.picked, rows.picked_ids
        x3 = x.reshape(n, -1, self.in_features)  # (B, T, in)
        x3 = (x3 if picked is None else x3[picked]).to(self.lora_A.dtype)  # (P, T, in): the rows with an adapter
        h = torch.bmm(x3, self.lora_A[ids].transpose(1, 2))  # (P, T, r)
        delta = torch.bmm(h, self.lora_B[ids].transpose(1, 2)).to(y.dtype)  # (P, T, out)
        y3 = y.view(n, -1, self.out_features)
        if picked is None:
            y3 += delta
        else:
            y3.index_add_(0, picked, delta)
        return y

    def extra_repr(self) -> str:
        slots, rank = self.lora_A.shape[0] - 1, self.lora_A.shape[1]
        return f"{self.in_features}, {self.out_features}, slots={slots}, max_rank={rank}"


@dataclass
class LoRAWeights:
    """One LoRA run's update, read from its directory: ``layers[name] = (A (r, in), B (out, r))``."""

    rank: int
    scaling: float
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    base: str = ""

    def delta(self, name: str) -> torch.Tensor:
        """``(alpha / r) B A`` of layer ``name``, ``(out, in)`` fp32 (what merging adds to its weight)."""
        a, b = self.layers[name]
        return (b.float() @ a.float()) * self.scaling


def read_lora(path: str | Path) -> LoRAWeights:
    """A ``corelm finetune --method lora`` run directory's update (safetensors and JSON only).

    Raises:
        CorelmError: one line saying what is missing or wrong.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        found = (path / TASK_FILE).is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte: not a run either
        found = False
    if not found:
        raise CorelmError(f"not a fine-tuning run directory (no {TASK_FILE})")
    try:
        task = json.loads((path / TASK_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorelmError(f"{TASK_FILE} cannot be read: {exc}") from None
    if not isinstance(task, dict) or task.get("method") != "lora":
        method = task.get("method") if isinstance(task, dict) else None
        raise CorelmError(f"the run's method is {method!r}: only LoRA runs (--method lora) can be served as adapters")
    if task.get("task") != "sft":
        raise CorelmError(f"the run fine-tuned a {task.get('task')!r} model: only language-model runs (--task sft) "
                          "can be served")
    config = task.get("method_config") or {}
    if not isinstance(config, dict):
        raise CorelmError(f"{TASK_FILE} has an invalid method_config")
    rank, alpha = config.get("rank", 8), config.get("alpha", 16.0)
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise CorelmError(f"{TASK_FILE} has an invalid LoRA rank or alpha")
    try:
        tensors = load_file(str(path / ADAPTER_FILE))
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:  # missing, truncated or malformed
        raise CorelmError(f"{ADAPTER_FILE} cannot be read: {exc}") from None
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise CorelmError(f"{ADAPTER_FILE} holds {key!r}, which is not a LoRA matrix (<layer>.lora_A/B)")
        parts.setdefault(match["module"], {})[match["part"]] = value
    layers = {}
    for name, pair in parts.items():
        a, b = pair.get("A"), pair.get("B")
        if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise CorelmError(f"{ADAPTER_FILE}: {name} is not a rank-{rank} pair A (r, in), B (out, r)")
        layers[name] = (a, b)
    if not layers:
        raise CorelmError(f"{ADAPTER_FILE} holds no LoRA matrices")
    return LoRAWeights(rank, float(alpha) / rank, layers, str(task.get("base", "")))


_ROUTED_EXPERT = re.compile(r"\.experts\.\d+\.")  # inside corelm.quant.experts.QuantizedExperts


def block_linears(model: nn.Module) -> list[str]:
    """Names of the linear-like layers inside the Transformer blocks (plain or quantized), not counting a
    MoE's quantized routed experts (``mlp.experts.{e}.gate_proj``: adapters train the experts as stacks)."""
    return [name for name, m in model.named_modules()
            if _IN_BLOCK.search(name) and isinstance(getattr(m, "in_features", None), int)
            and isinstance(getattr(m, "out_features", None), int) and not isinstance(m, MultiLoRALinear)
            and not name.endswith(".base") and not _ROUTED_EXPERT.search(name)]


class MultiLoRA:
    """The adapter stacks of one model: :func:`apply_multi_lora` makes it.

    Attributes:
        rows: set before each forward (:meth:`AdapterRows.set`).
        layers: the wrapped layers by name.
        slots, rank: capacity (adapters at once, largest rank).
    """

    def __init__(self, model: nn.Module, slots: int, rank: int, dtype: torch.dtype) -> None:
        if slots < 1 or rank < 1:
            raise CorelmError(f"adapter slots and maximum rank must be >= 1, got {slots} and {rank}")
        self.slots, self.rank, self.rows = slots, rank, AdapterRows()
        self.layers: dict[str, MultiLoRALinear] = {}
        for name in block_linears(model):
            layer = MultiLoRALinear(model.get_submodule(name), slots, rank, self.rows, dtype)
            replace_module(model, name, layer)
            self.layers[name] = layer

    def nbytes(self) -> int:
        """Memory of the stacks."""
        return sum(t.numel() * t.element_size() for m in self.layers.values() for t in (m.lora_A, m.lora_B))

    def check(self, weights: LoRAWeights) -> None:
        """Raise a one-line CorelmError unless ``weights`` fits this base model and these stacks."""
        if weights.rank > self.rank:
            raise CorelmError(f"the adapter has rank {weights.rank}, above the server's maximum of {self.rank} "
                              "(start it with a larger --max-lora-rank)")
        for name, (a, b) in weights.layers.items():
            layer = self.layers.get(name)
            if layer is None:
                raise CorelmError(f"the adapter adapts {name}, which this base model does not have "
                                  "(was it trained on another base model?)")
            if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
                raise CorelmError(f"the adapter's {name} maps {a.shape[1]} -> {b.shape[0]} features but the base "
                                  f"model's maps {layer.in_features} -> {layer.out_features} (another base model?)")

    @torch.no_grad()
    def install(self, slot: int, weights: LoRAWeights) -> None:
        """Put ``weights`` (checked with :meth:`check`) in ``slot`` (1..slots) of every layer."""
        self.check(weights)
        if not 1 <= slot <= self.slots:
            raise CorelmError(f"adapter slot {slot} is outside 1..{self.slots}")
        self.clear(slot)
        r = weights.rank
        for name, (a, b) in weights.layers.items():
            layer = self.layers[name]
            layer.lora_A[slot, :r].copy_(a)
            layer.lora_B[slot, :, :r].copy_(b.float() * weights.scaling)  # alpha / r folded in (fp32, then cast)
            layer.used.add(slot)
            layer.used_mask[slot] = 1

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        """Empty ``slot`` in every layer (zeros: it adds nothing)."""
        for layer in self.layers.values():
            if slot in layer.used:
                layer.used.discard(slot)
                layer.used_mask[slot] = 0
                layer.lora_A[slot].zero_()
                layer.lora_B[slot].zero_()


def apply_multi_lora(model: nn.Module, slots: int, rank: int, dtype: torch.dtype | None = None) -> MultiLoRA:
    """Wrap every block linear of ``model`` in a :class:`MultiLoRALinear` with room for ``slots``
    adapters of rank up to ``rank``; returns the :class:`MultiLoRA` that loads and selects them.

    With no row selecting an adapter, the wrapped model computes exactly what it computed before.
    ``dtype`` of the stacks: default fp32 on the CPU (a bf16 ``bmm`` of a few rows and rank 8 is slower
    there than fp32: measured 0.62x vs 0.80x of the base step's tokens/s, docs/serving.md), else the
    model's dtype.
    """
    if dtype is None:
        from corelm.generate.step import model_device, model_dtype

        dtype = torch.float32 if model_device(model).type == "cpu" else model_dtype(model)
    return MultiLoRA(model, slots, rank, dtype)

"""A sparse MoE's routed experts on quantized layers: one SwiGLU of int4, int8 or GGUF-block matrices per expert.

:mod:`corelm.models.moe` keeps the routed experts stacked in floats (:class:`~corelm.models.moe.Experts`:
``gate_up_proj (E, 2F, d)``, ``down_proj (E, d, F)``), which is what training and the grouped matmuls want.
They are also most of a MoE's weights (Qwen1.5-MoE-A2.7B: 12.5 of its 14.3 B parameters), so a quantized MoE
that kept them in floats would not be much smaller. :func:`quantize_experts` swaps each stack for a
:class:`QuantizedExperts`: ``E`` :class:`~corelm.models.moe.MLP` modules whose ``gate_proj``, ``up_proj`` and
``down_proj`` are quantized layers (quantized per expert: a scale never spans two experts), named
``mlp.experts.{e}.gate_proj`` as Qwen's checkpoints name them. :func:`gguf_experts` builds the same from a
GGUF file's expert stacks (``ffn_gate_exps`` / ``ffn_up_exps`` / ``ffn_down_exps``, ``(E, F, d)``), each
expert's rows kept in the file's block type as :class:`~corelm.quant.kquant.GGUFBlockLinear` (fp16 scales
as stored; Q4_0/Q4_1 as int4 layers when ``int4`` is asked for, as ``quantize_model(..., "int4")`` does).
Routers stay in floats (:func:`corelm.quant.transform._routers`).

The forward groups the ``N * k`` (token, expert) assignments by expert as the float model does and runs each
expert's quantized layers on its rows only; an expert no token picked is not read. (Under ``torch.compile``
every expert runs on every token instead, weighted 0 where not picked: static shapes, one graph.) corelm's
C++ decode step runs the same per-expert matrices (:func:`corelm.generate.step.describe_layer`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from corelm.errors import CorelmError
from corelm.models.moe import MLP, Experts

MATRICES = ("gate_proj", "up_proj", "down_proj")
# llama.cpp's expert stacks, (E, F, d) and (E, d, F); a file may store gate and up fused (E, 2F, d)
GGUF_STACKS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


class QuantizedExperts(nn.ModuleList):
    """``n_experts`` SwiGLU MLPs (:class:`~corelm.models.moe.MLP`) whose matrices are quantized layers.

    Called as :class:`~corelm.models.moe.Experts` is: ``(x (N, d), weights (N, k), experts (N, k)) -> (N, d)``.
    """

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._dense(x, weights, experts)
        N, d = x.shape
        k = experts.shape[1]
        flat = experts.reshape(-1)  # (N*k,) expert of each (token, slot) assignment
        order = flat.argsort(stable=True)  # (N*k,) assignments grouped by expert, tokens in order
        counts = torch.bincount(flat, minlength=len(self)).tolist()  # tokens per expert
        xs = x[order // k]  # (N*k, d) each assignment's token, grouped by expert
        ys = torch.empty_like(xs)
        start = 0
        for mlp, n in zip(self, counts):  # only the experts some token picked read their weights
            if n:
                ys[start:start + n] = mlp(xs[start:start + n])
            start += n
        ys = ys * weights.reshape(-1)[order, None]
        y = torch.empty_like(ys)
        y[order] = ys  # back to (token, slot) order
        return y.view(N, k, d).sum(dim=1)  # (N, d)

    def _dense(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Every expert over every token, weighted 0 where the token did not pick it: the static-shape form a
        compiled decode step traces (the grouped form's per-expert row counts would recompile it at every
        new count). It reads every expert's weights, n_experts / k times what the grouped form reads."""
        w = torch.zeros(x.shape[0], len(self), dtype=weights.dtype, device=x.device)
        w = w.scatter_add(1, experts, weights)  # (N, E) each token's weight per expert
        y = torch.zeros_like(x)
        for e, mlp in enumerate(self):
            y = y + w[:, e:e + 1] * mlp(x)
        return y

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The float stacks these layers multiply with: ``gate_up_proj (E, 2F, d)``, ``down_proj (E, d, F)``."""
        gate_up = torch.stack([torch.cat([m.gate_proj.dequantize(), m.up_proj.dequantize()]) for m in self])
        return gate_up, torch.stack([m.down_proj.dequantize() for m in self])


def expert_layers(model: nn.Module) -> list[nn.Module]:
    """Every quantized expert matrix of ``model`` (what the C++ step must be able to read)."""
    return [getattr(mlp, name) for m in model.modules() if isinstance(m, QuantizedExperts) for mlp in m
            for name in MATRICES]


def float_stacks(model: nn.Module, skip: Iterable[str] = ()) -> list[tuple[str, nn.Module, Experts]]:
    """``(qualified name, parent, Experts)`` of every float expert stack not in ``skip``."""
    skip = tuple(skip)
    found = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        full = f"{name}.experts" if name else "experts"
        if isinstance(experts, Experts) and not any(full == s or full.startswith(s + ".") for s in skip):
            found.append((full, module, experts))
    return found


def _linear(weight: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` around ``weight`` (N, K) without a copy or an init: what the quantizers take."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    return linear


def _shapes(d: int, f: int) -> dict[str, tuple[int, int]]:
    """``(in_features, out_features)`` of each matrix of an expert of width ``f``."""
    return {"gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


def _expert(d: int, f: int, layers: dict[str, nn.Module]) -> MLP:
    """An expert's SwiGLU with ``layers`` (one per name of :data:`MATRICES`) as its matrices."""
    with torch.device("meta"):
        mlp = MLP(d, f)
    for name in MATRICES:
        setattr(mlp, name, layers[name])
    return mlp


def expert_shapes(experts: Experts) -> tuple[int, int, int]:
    """``(n_experts, d_model, expert width F)`` of a float stack."""
    E, d, f = experts.down_proj.shape
    return E, d, f


def check_experts(model: nn.Module, method: str, group_size: int, skip: Iterable[str] = ()) -> None:
    """Raise a CorelmError, before anything changes, when an expert matrix's width does not fit ``method``:
    an int4 group that does not divide it, or int8 on corelm's kernels (whole blocks of 32 columns)."""
    from corelm.quant.layers import check_group_size, use_kernels

    for name, _, experts in float_stacks(model, skip):
        _, d, f = expert_shapes(experts)
        if method == "int4":
            check_group_size(d, group_size)
            check_group_size(f, group_size)
        elif method == "int8" and (d % 32 or f % 32) and use_kernels(experts.down_proj.device):
            raise CorelmError(f"int8 experts on corelm's kernels need widths that are multiples of 32; {name} has "
                              f"d_model {d} and expert width {f} (leave them in floats: skip=[{name!r}])")


def quantize_experts(model: nn.Module, method: str, group_size: int = 32, skip: Iterable[str] = (),
                     from_gguf: object | None = None) -> list[str]:
    """Swap every float expert stack of ``model`` (not under ``skip``) for :class:`QuantizedExperts`, in place.

    Args:
        model: a corelm MoE (any model: one without experts is left as it is).
        method: ``"int8"`` (per output channel) or ``"int4"`` (group-wise), as
            :func:`corelm.quant.layers.quantize_linear` quantizes each expert's gate, up and down.
        group_size: int4 group width.
        skip: qualified names (``model.layers.3.mlp.experts``) of stacks to leave in floats.
        from_gguf: the GGUF file the model was loaded from: with ``int4`` and group 32, experts stored as
            Q4_0/Q4_1 take their blocks as they are instead of re-quantizing dequantized values.

    Returns:
        The qualified names of the stacks replaced.
    """
    from corelm.quant.layers import quantize_linear

    check_experts(model, method, group_size, skip)
    if from_gguf is not None and method == "int4" and group_size == 32:
        done = gguf_experts(model, from_gguf, kinds=("Q4_0", "Q4_1"), skip=skip, int4=True)
    else:
        done = []
    for name, parent, experts in float_stacks(model, skip):
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        E, d, f = expert_shapes(experts)
        stacks = {"gate_proj": gate_up[:, :f], "up_proj": gate_up[:, f:], "down_proj": down}
        parent.experts = QuantizedExperts([
            _expert(d, f, {m: quantize_linear(_linear(stacks[m][e]), method, group_size) for m in MATRICES})
            for e in range(E)])
        done.append(name)
    return done


def experts_structure(model: nn.Module, method: str, group_size: int, skip: Iterable[str] = ()) -> None:
    """Give ``model`` (real or on ``meta``) empty :class:`QuantizedExperts` of ``method`` where
    :func:`quantize_experts` would put them, so that a saved quantized state dict loads into it."""
    from corelm.quant.layers import new_layer

    for _, parent, experts in float_stacks(model, skip):
        E, d, f = expert_shapes(experts)
        device = "cpu" if experts.down_proj.is_meta else experts.down_proj.device
        parent.experts = QuantizedExperts([
            _expert(d, f, {m: new_layer(method, nn.Linear(k, n, bias=False, device="meta"), group_size, device)
                           for m, (k, n) in _shapes(d, f).items()})
            for _ in range(E)])


def _layer_index(name: str) -> int:
    """The block index in a qualified name ``model.layers.{i}.mlp.experts``."""
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1])


def gguf_expert_stacks(file: object, layer: int) -> dict[str, tuple[str, int]]:
    """Matrix name -> (GGUF tensor, first row of each expert's block) of block ``layer``'s expert stacks."""
    fused = f"blk.{layer}.ffn_gate_up_exps.weight"
    if fused in file.tensors:
        f = file.tensors[fused].shape[1] // 2
        return {"gate_proj": (fused, 0), "up_proj": (fused, f), "down_proj": (f"blk.{layer}.ffn_down_exps.weight", 0)}
    return {m: (f"blk.{layer}.{g}.weight", 0) for m, g in GGUF_STACKS.items()}


def gguf_experts(model: nn.Module, source: object, kinds: Iterable[str] | None = None,
                 skip: Iterable[str] = (), int4: bool = False) -> list[str]:
    """Swap every float expert stack of ``model`` for :class:`QuantizedExperts` on the blocks of the GGUF
    file ``source`` (path or :class:`corelm.io.gguf.GGUFFile`), each expert's rows in their stored type.

    The model may be on ``meta`` (the loader builds the experts from the file before any float copy
    exists). Each layer owns a copy of its expert's bytes (the file's map can close).

    Args:
        model: a corelm MoE loaded from (or built for) ``source``.
        source: the GGUF file.
        kinds: GGML type names to take (default: every type with a layer); a stack of another type is
            left in floats (``kinds`` given) or refused (``kinds`` None).
        skip: qualified names of stacks to leave in floats.
        int4: Q4_0/Q4_1 experts as corelm's int4 layers (bf16 scales) instead of their blocks as stored.

    Returns:
        The qualified names of the stacks replaced.

    Raises:
        CorelmError: a stack missing from the file, of the wrong shape, or (``kinds`` None) of a type no
            corelm layer runs natively.
    """
    from corelm.io import gguf as gguf_io

    file = source if isinstance(source, gguf_io.GGUFFile) else gguf_io.read_gguf(source)
    done = []
    for name, parent, experts in float_stacks(model, skip):
        E, d, f = expert_shapes(experts)
        stacks = gguf_expert_stacks(file, _layer_index(name))
        types = set()
        for mat, (tensor, row0) in stacks.items():
            info = file.tensors.get(tensor)
            rows, cols = (f, d) if mat != "down_proj" else (d, f)
            if info is None or len(info.shape) != 3 or info.shape[0] != E or info.shape[2] != cols \
                    or info.shape[1] < row0 + rows:
                raise CorelmError(f"{getattr(file, 'path', 'the GGUF file')}: no expert stack of {E} x {rows} x "
                                  f"{cols} for {name}.*.{mat} ({tensor})")
            types.add(info.qtype.name)
        if kinds is not None and not types <= set(kinds):
            continue
        shapes = _shapes(d, f)
        parent.experts = QuantizedExperts([
            _expert(d, f, {m: _expert_layer(file, tensor, row0, e, shapes[m][1], shapes[m][0], int4)
                           for m, (tensor, row0) in stacks.items()})
            for e in range(E)])
        done.append(name)
    return done


def _expert_layer(file: object, tensor: str, row0: int, e: int, rows: int, cols: int, int4: bool = False) -> nn.Module:
    """Expert ``e``'s ``rows`` x ``cols`` matrix (rows ``row0..`` of its block of ``tensor``) as a layer on its
    stored blocks: a GGUFBlockLinear (with ``int4``, Q4_0/Q4_1 an int4 layer of group 32)."""
    from corelm.quant.gguf_blocks import int4_from_gguf
    from corelm.quant.kquant import INT4_TYPES, TYPE_IDS, GGUFBlockLinear
    from corelm.quant.layers import int4_class

    info = file.tensors[tensor]
    kind = info.qtype.name
    if kind not in INT4_TYPES and kind not in TYPE_IDS:
        raise CorelmError(f"{tensor} is {kind}: no corelm kernel runs it natively")
    per_row = info.nbytes // (info.shape[0] * info.shape[1])  # bytes of one row of blocks
    raw = file.raw(tensor).reshape(info.shape[0], info.shape[1], per_row)
    blocks = torch.from_numpy(raw[e, row0:row0 + rows].copy())  # (rows, row bytes): the layer owns its copy
    if int4 and kind in INT4_TYPES:
        layer = int4_class("cpu")(cols, rows, 32, False, "cpu")
        layer.set_quantized(*int4_from_gguf(blocks, kind, (rows, cols)))
        return layer
    return GGUFBlockLinear(blocks, TYPE_IDS[kind], cols)

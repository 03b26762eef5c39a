"""Weight-only quantization as a model transform: int8 per-channel and int4 group-wise.

``quantize_model(model, "int8" | "int4")`` swaps every ``nn.Linear`` child for a layer of
:mod:`corelm.quant.layers` that keeps its weight packed in memory; the model file never knows. The
layer for each device is picked here (:func:`~corelm.quant.layers.int4_class`: corelm's kernel
layout on a CPU with corelm's C++ kernels, PyTorch's int4pack layout otherwise and on CUDA). A MoE's
stacked routed experts are quantized per expert (:mod:`corelm.quant.experts`); its routers stay in floats.

The output head is quantized on its own terms (``head``, :class:`~corelm.quant.layers.Q8Linear` by
default): it is the largest matrix of a small model and its error lands directly in the logits.
With tied embeddings the token embedding becomes an :class:`~corelm.quant.layers.Int8Embedding`
sharing the head's int8 matrix, also when the head is a parameter-free tied head
(:class:`corelm.ops.tied.TiedLMHead`). :func:`quantized_structure` gives a float model the module
structure of a quantized one, so that a quantized state dict (:mod:`corelm.quant.io`) loads into it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from corelm.errors import CorelmError
from corelm.quant.experts import (
    QuantizedExperts,
    check_experts,
    experts_structure,
    float_stacks,
    gguf_experts,
    quantize_experts,
)
from corelm.quant.gguf_blocks import GGUFBlocks
from corelm.quant.layers import (
    Int4Linear,
    Int4PackedLinear,
    Int8Embedding,
    Int8Linear,
    Q8Linear,
    check_group_size,
    new_layer,
    quantize_linear,
)

METHODS = ("int8", "int4")
HEAD_METHODS = ("q8", "int8", "int4")
HEAD_REFINE = 8  # top logits of a q8 head recomputed in fp32 (see Q8Linear.forward)


def _linears(model: nn.Module, skip: Iterable[str]) -> list[tuple[nn.Module, str, nn.Linear]]:
    skip = tuple(skip)
    found = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not any(full == s or full.startswith(s + ".") for s in skip):
                found.append((module, child_name, child))
    return found


def _routers(model: nn.Module) -> tuple[str, ...]:
    """Qualified names of a MoE's routers (and Qwen2-MoE's shared-expert gate): they stay in floating point,
    as llama.cpp leaves them ("do not quantize expert gating tensors"): a few thousand weights decide which
    experts run, and rounding them can flip a top-k choice."""
    names = []
    for prefix, module in model.named_modules():
        if hasattr(module, "experts"):
            names += [f"{prefix}.{g}" for g in ("gate", "shared_expert_gate")
                      if isinstance(getattr(module, g, None), nn.Linear)]
    return tuple(names)


def _tied_embedding(model: nn.Module) -> tuple[nn.Module, str, nn.Embedding] | None:
    """The embedding whose matrix ``model.lm_head`` reuses (an ``nn.Linear`` sharing the parameter, or
    a parameter-free tied head such as :class:`corelm.ops.tied.TiedLMHead`), with its parent."""
    head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    if weight is None:
        return None
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, nn.Embedding) and child.weight is weight:
                return module, child_name, child
    return None


def tied_head(head: nn.Module | None) -> nn.Module | None:
    """``head`` when it is an int8 LM head a tied embedding can read (:meth:`Int8Embedding.tied`), else None."""
    return head if isinstance(head, (Int8Linear, Q8Linear)) else None


def _tie_quantized(model: nn.Module, tied: tuple[nn.Module, str, nn.Embedding] | None,
                   out_dtype: torch.dtype | None = None) -> None:
    head = tied_head(getattr(model, "lm_head", None))
    if tied is not None and head is not None:
        parent, name, emb = tied
        setattr(parent, name, Int8Embedding.tied(head, out_dtype or emb.weight.dtype))


def _targets(model: nn.Module, skip: tuple[str, ...]) -> tuple[list, tuple | None]:
    tied = _tied_embedding(model)
    targets = _linears(model, skip)
    if tied is not None and not isinstance(model.lm_head, nn.Linear) and "lm_head" not in skip:
        # a parameter-free tied head (TiedLMHead): the embedding matrix is quantized as the head
        weight = tied[2].weight
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        linear.weight = weight
        targets.append((model, "lm_head", linear))
    return targets, tied


def _cast_kept(model: nn.Module, dtype: torch.dtype, replaced: set[int]) -> None:
    """Cast every float parameter of ``model`` except those in ``replaced`` (ids) to ``dtype``; a parameter
    shared by several modules (a tied embedding and head) stays shared."""
    cast: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for pname, p in list(module._parameters.items()):
            if p is None or id(p) in replaced or not p.is_floating_point() or p.dtype == dtype:
                continue
            if id(p) not in cast:
                cast[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
            module._parameters[pname] = cast[id(p)]


def _quantize_gguf(model: nn.Module, from_gguf: object | None) -> nn.Module:
    """``method="gguf"``: a MoE's expert stacks onto their blocks (unless the loader built them already), then
    every other matrix (:func:`corelm.quant.kquant.quantize_gguf`)."""
    from corelm.quant.kquant import quantize_gguf

    if from_gguf is not None:
        gguf_experts(model, from_gguf)
    return quantize_gguf(model, from_gguf, _targets(model, _routers(model)))


def quantize_model(model: nn.Module, method: str, group_size: int = 32, head: str | None = None,
                   skip: Iterable[str] = (), from_gguf: object | None = None,
                   progress: object | None = None, dtype: torch.dtype | None = None,
                   reuse_blocks: bool = True) -> nn.Module:
    """Swap the ``nn.Linear`` children of ``model`` for packed int8/int4 layers, in place.

    Args:
        model: any corelm model (decoder or encoder), on CPU or CUDA.
        method: ``"int8"`` (per output channel), ``"int4"`` (group-wise asymmetric), or ``"gguf"``:
            every matrix keeps the block type ``from_gguf`` stores it in (Q4_0/Q4_1 int4 layers;
            Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K/IQ4_NL/IQ4_XS :class:`corelm.quant.kquant.GGUFBlockLinear`), the other
            arguments unused.
        group_size: int4 group width (32, 64 or 128); must divide every quantized layer's width.
        head: method for ``lm_head``: ``q8`` (default: int8 with a scale per 32 columns, see
            :class:`Q8Linear`), ``int8`` (per channel) or ``int4``. The output head is the largest
            matrix of a small model and its error lands directly in the logits, which is why
            llama.cpp's Q4 files keep it at 8 bits too.
        skip: qualified module names to leave in floating point (a MoE's routers are always left so; a
            stack of routed experts, ``model.layers.{i}.mlp.experts``, may be named too).
        from_gguf: the GGUF file (path or :class:`corelm.io.gguf.GGUFFile`) the model was loaded
            from: its Q4_0/Q4_1 tensors become int4 layers (group 32) and a Q8_0 head a
            :class:`Q8Linear` directly from their blocks, without re-quantizing dequantized values. A
            matrix the loader left as a placeholder (``load_parts(..., quantize=...)`` of a GGUF file) is
            dequantized from this file just before it is quantized, and freed with its float layer.
        progress: optional wrapper for the list of layers (e.g. ``tqdm``), to show progress.
        dtype: the float dtype the quantized model runs in, for a model loaded in its checkpoint's dtype
            (what :func:`corelm.loading.load_parts` does when it quantizes at load): every float parameter
            that is not quantized (embeddings, norms, routers) is cast to it, and each matrix is quantized
            from the checkpoint's own values and freed before the next, so the load never holds a copy
            of the whole model in ``dtype`` (fp32 would double a bf16 checkpoint).
        reuse_blocks: False quantizes every matrix of a GGUF model from its dequantized values, Q4 blocks
            included (``corelm quantize --requantize``).

    Returns:
        The same model. With tied embeddings the token embedding becomes an :class:`Int8Embedding`
        that shares the head's int8 matrix. A MoE's routed experts become
        :class:`~corelm.quant.experts.QuantizedExperts` (one ``method`` layer per expert matrix).
        ``model.corelm_quantization`` records the spec.

    Raises:
        CorelmError: unknown method, or a group size that does not divide a layer width (checked for
        every layer before anything is changed).
    """
    if method == "gguf":
        return _quantize_gguf(model, from_gguf)
    if method not in METHODS:
        raise CorelmError(f"unknown quantization method {method!r}; expected one of {', '.join(METHODS)}")
    skip = tuple(skip)
    skip += tuple(name for name in _routers(model) if name not in skip)
    if getattr(model, "corelm_quantization", None):
        raise CorelmError("the model is already quantized")
    head = head or "q8"
    if head not in HEAD_METHODS:
        raise CorelmError(f"unknown head quantization method {head!r}; expected one of {', '.join(HEAD_METHODS)}")
    targets, tied = _targets(model, skip)
    for parent, name, linear in targets:
        kind = head if parent is model and name == "lm_head" else method
        if kind == "int4":
            check_group_size(linear.in_features, group_size)
        elif kind == "q8":
            check_group_size(linear.in_features, 32)
    check_experts(model, method, group_size, skip)
    out_dtype = tied[2].weight.dtype if tied is not None else None
    if dtype is not None:
        stacks = {id(p) for _, _, experts in float_stacks(model, skip) for p in experts.parameters()}  # quantized too
        _cast_kept(model, dtype, {id(linear.weight) for _, _, linear in targets} | stacks)
        out_dtype = dtype if tied is not None else None
    blocks = GGUFBlocks(from_gguf, model) if from_gguf is not None else None
    for i in (progress(range(len(targets))) if progress else range(len(targets))):
        parent, name, linear = targets[i]
        targets[i] = None  # the float layer is freed once replaced, not at the end
        kind = head if parent is model and name == "lm_head" else method
        setattr(parent, name, _quantized(model, name, linear, kind, group_size, blocks, reuse_blocks))
    quantize_experts(model, method, group_size, skip, blocks.file if blocks is not None else None)
    experts = any(isinstance(m, QuantizedExperts) for m in model.modules())  # or the loader took them from a file
    _tie_quantized(model, tied, out_dtype)
    model.corelm_quantization = {"method": method, "group_size": group_size, "head": head,
                                 "skip": list(skip), "tied_embedding": tied is not None, "experts": bool(experts),
                                 "embedding_dtype": str(out_dtype).removeprefix("torch.") if out_dtype else None}
    return model


def _quantized(model: nn.Module, name: str, linear: nn.Linear, kind: str, group_size: int,
               blocks: GGUFBlocks | None, reuse: bool = True) -> nn.Module:
    """The layer ``kind`` makes of ``linear`` (child ``name``): from the GGUF file's own blocks where they are
    already that layer's integers (Q4_0/Q4_1 as int4 group 32, a Q8_0 head as q8), else quantized (from
    the file's dequantized tensor when the loader left a placeholder)."""
    from corelm.io.gguf import is_placeholder

    new = None
    reuse = reuse and blocks is not None
    if reuse and kind == "int4" and group_size == 32:
        if (qb := blocks.int4(linear)) is not None:
            new = new_layer(kind, linear, 32, linear.weight.device)
            new.set_quantized(*qb)
            if linear.bias is not None:  # Qwen2's q/k/v biases are float tensors next to the blocks
                new.bias = linear.bias
    elif reuse and kind == "q8" and (qb := blocks.q8(model, name, linear)) is not None:
        new = new_layer(kind, linear, 32, linear.weight.device)
        new.set_quantized(*qb)
    if new is None:
        if is_placeholder(linear.weight):  # the loader left it in the file: its values, now
            w = blocks.float_weight(linear, linear.weight.dtype) if blocks is not None else None
            if w is None:
                raise CorelmError(f"{name}: the loader left this matrix in its GGUF file, and no file was given")
            linear.weight = nn.Parameter(w, requires_grad=False)
        new = quantize_linear(linear, kind, group_size)
    if kind == "q8" and name == "lm_head":
        new.refine = HEAD_REFINE
    return new


def quantized_structure(model: nn.Module, spec: dict) -> nn.Module:
    """Give a float model (real or on ``meta``) the module structure of a quantized one, without
    quantizing anything, so that a quantized state dict (:func:`quantize_model` + ``state_dict()``)
    loads into it with ``load_state_dict``. Int4 layers take this machine's layout and pack into it
    while loading.
    """
    method, group_size, head = spec["method"], int(spec["group_size"]), spec.get("head", "q8")
    targets, tied = _targets(model, tuple(spec.get("skip", ())))
    for parent, name, linear in targets:
        kind = head if parent is model and name == "lm_head" else method
        device = "cpu" if linear.weight.is_meta else linear.weight.device
        new = new_layer(kind, linear, group_size, device)
        if kind == "q8" and name == "lm_head":
            new.refine = HEAD_REFINE
        setattr(parent, name, new)
    if spec.get("experts"):  # saved before routed experts were quantized: no such key, float stacks
        experts_structure(model, method, group_size, tuple(spec.get("skip", ())))
    dtype = getattr(torch, spec["embedding_dtype"]) if spec.get("embedding_dtype") else None
    _tie_quantized(model, tied, dtype)
    model.corelm_quantization = dict(spec)
    return model


def is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "corelm_quantization", None)) or any(
        isinstance(m, (Int8Linear, Int4Linear, Int4PackedLinear, Q8Linear, QuantizedExperts)) for m in model.modules())


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer as held in memory (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen or t.is_meta:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total

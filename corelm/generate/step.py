"""The decode step: the one interface through which every decode path runs a model.

The engine (batched generation, streaming, beam search), speculative decoding and the server's
continuous batcher all call a *step* with the same five operations and never a model directly:

- ``new_cache(batch, max_len)``: a preallocated KV cache of ``batch`` rows;
- ``prefill(cache, prompts, rows)``: each prompt into its row from position 0, returning the logits
  after each prompt's last token;
- ``extend(cache, row, tokens, pos0)``: ``T`` tokens of one row at ``pos0..`` (a speculative verify
  pass), returning the logits of every one of them;
- ``decode(cache, tokens, pos, rows)``: one token for each of several rows, each at its own position;
- ``reorder(cache, origins)`` / ``share_prefix(cache, n)``: beam search's row copies;
- ``read_slots(cache, row, start, stop)`` / ``write_slots(cache, row, start, kv)``: a copy of one
  row's keys and values at slots ``start..stop``, and its way back into any row (the server's prefix
  cache: a prompt's head is prefilled once and copied into the next request that starts with it).

:class:`KernelStep` also has ``mixed(cache, runs)``: several rows, each feeding a run of tokens at
its own positions, in one call (the server's decode rows and a chunk of a prompt's prefill together).

Two steps implement them:

- :class:`ModelStep`: any corelm decoder through its own ``forward`` over the static
  :class:`~corelm.ops.kv_cache.KVCache` (the model file is the only statement of the math); with
  ``compile=True`` the decode step is one ``torch.compile`` graph (gpt-fast's recipe: static shapes
  over the whole cache, inductor ``freezing`` and ``cpp_wrapper`` on CPU, CUDA graphs on GPU).
- :class:`KernelStep`: a quantized llama-family model on CPU through corelm's C++
  ``DecoderStep`` (:mod:`corelm.kernels`): every layer and the head in one call, with no Python or
  dispatcher work per layer. The model is described to it once, by name (``q_proj.values``, ...);
  a batched decode step of B requests is one call of B tokens, and a token's logits do not depend
  on the other tokens of the call (the server's rows equal the same request served alone).

:func:`step_for` picks the kernel step when the model can run on it and the kernels are built,
else the model step.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from corelm import cache as private_cache
from corelm.errors import CorelmError
from corelm.ops.kv_cache import KVCache

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype activations (and so the KV cache) have: that of the first floating-point parameter."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer (quantized layers' packed
    values and scales included) except the input embedding table, of which a step reads one row --
    unless the output head shares it. Decode is bandwidth-bound: tokens/s times this is the memory
    bandwidth achieved."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    embed = embed or getattr(getattr(model, "model", None), "embed_tokens", None)
    skip: set[int] = set()
    head = getattr(model, "lm_head", None)
    tied = head is not None and any(t is e for t in head.parameters() for e in (embed.parameters() if embed else []))
    if embed is not None and not tied:
        skip = {id(t) for t in [*embed.parameters(), *embed.buffers()]}
    seen: dict[int, torch.Tensor] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in skip and t.dtype != torch.bool:
            seen[id(t)] = t
    return sum(t.numel() * t.element_size() for t in seen.values())


def _row_tensor(rows: Sequence[int] | None, n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device) if rows is None else torch.as_tensor(list(rows), device=device)


# --------------------------------------------------------------------------------------------------
# The model's own forward
# --------------------------------------------------------------------------------------------------


class ModelStep:
    """Decode through the model's ``forward`` (any corelm decoder: GPT-2, the llama families, ...).

    Args:
        model: a corelm decoder (``model(ids, input_pos=, kv_cache=)``, ``hidden_states``, ``lm_head``).
        compile: ``torch.compile`` the decode step (see :func:`compile_step`); prefill stays eager.
    """

    kind = "pytorch"

    def __init__(self, model: nn.Module, compile: bool = False) -> None:
        self.model = model
        self.compile = compile
        self.device = model_device(model)
        self._compiled = None

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        cache = KVCache.for_model(self.model.config, batch, max_len, model_dtype(self.model), self.device)
        cache.full_window = self.compile  # every step sees the same shapes: one compiled graph
        return cache

    def prefill(self, cache: KVCache, prompts: Sequence[Sequence[int]],
                rows: Sequence[int] | None = None) -> torch.Tensor:
        """Prompts into rows ``rows`` (default ``0..B-1``) from position 0 -> ``(B, V)`` fp32 logits.

        Prompts of one contiguous block of rows run as one right-padded forward: padding writes
        slots no query reads before decoding overwrites them (docs/DESIGN.md). The LM head runs only
        on each prompt's last position.
        """
        rows = list(range(len(prompts))) if rows is None else list(rows)
        if rows != list(range(rows[0], rows[0] + len(rows))):
            return torch.cat([self.prefill(cache, [p], [r]) for p, r in zip(prompts, rows)])
        view = cache if (rows[0], len(rows)) == (0, cache.batch) else cache.rows(slice(rows[0], rows[0] + len(rows)))
        lens = torch.tensor([len(p) for p in prompts], device=self.device)
        T = int(lens.max())
        ids = torch.zeros(len(prompts), T, dtype=torch.long, device=self.device)  # (B, T) right-padded
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
        pos = torch.arange(T, device=self.device)[None].expand(len(prompts), T)  # (B, T)
        hidden = self.model.hidden_states(ids, input_pos=pos, kv_cache=view)  # (B, T, d)
        last = hidden[torch.arange(len(prompts), device=self.device), lens - 1]  # (B, d)
        return self.model.lm_head(last).float()

    def extend(self, cache: KVCache, row: int, tokens: Sequence[int], pos0: int,
               all_logits: bool = True) -> torch.Tensor:
        """``tokens`` of row ``row`` at positions ``pos0..`` -> ``(T, V)`` fp32 logits of every one
        (``(1, V)`` for the last one when ``all_logits`` is False)."""
        ids = torch.as_tensor([list(tokens)], device=self.device)
        pos = torch.arange(pos0, pos0 + len(tokens), device=self.device)[None]
        view = cache if cache.batch == 1 else cache.rows(slice(row, row + 1))
        hidden = self.model.hidden_states(ids, input_pos=pos, kv_cache=view)[0]  # (T, d)
        return self.model.lm_head(hidden if all_logits else hidden[-1:]).float()

    def decode(self, cache: KVCache, tokens: torch.Tensor, pos: torch.Tensor,
               rows: Sequence[int] | None = None) -> torch.Tensor:
        """One token per row: ``tokens (n,)`` at ``pos (n,)`` in rows ``rows`` -> ``(n, V)`` fp32.

        With ``rows``, cache rows ``0..max(rows)`` run together; rows not listed feed a dummy token at
        slot 0, which only they read (the server's free rows).
        """
        if rows is not None:
            index = torch.as_tensor(list(rows), device=self.device)
            hi = int(index.max()) + 1
            full_tokens = torch.zeros(hi, dtype=torch.long, device=self.device)
            full_pos = torch.zeros(hi, dtype=torch.long, device=self.device)
            full_tokens[index], full_pos[index] = tokens.to(self.device), pos.to(self.device)
            view = cache if hi == cache.batch else cache.rows(slice(0, hi))
            return self.decode(view, full_tokens, full_pos)[index]
        if self.compile:
            if self._compiled is None:
                self._compiled = compile_step(_decode_one, cuda=self.device.type == "cuda")
            return self._compiled(self.model, cache, tokens.clone(), pos.clone())
        return _decode_one(self.model, cache, tokens, pos)

    def reorder(self, cache: KVCache, origins: torch.Tensor) -> None:
        """Row ``b`` continues from row ``origins[b]``'s keys and values (beam search)."""
        for layer in range(cache.n_layer):
            cache.k[layer].copy_(cache.k[layer].index_select(0, origins))
            cache.v[layer].copy_(cache.v[layer].index_select(0, origins))

    def share_prefix(self, cache: KVCache, n: int) -> None:
        """Copy row 0's first ``n`` slots into every other row (beams start from one prompt)."""
        for layer in range(cache.n_layer):
            cache.k[layer][1:, :, :n] = cache.k[layer][:1, :, :n]
            cache.v[layer][1:, :, :n] = cache.v[layer][:1, :, :n]

    def read_slots(self, cache: KVCache, row: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of row ``row``'s keys and values at slots ``start..stop``:
        ``(n_layer, n_kv_head, n, head_dim)`` each."""
        return (torch.stack([k[row, :, start:stop] for k in cache.k]),
                torch.stack([v[row, :, start:stop] for v in cache.v]))

    def write_slots(self, cache: KVCache, row: int, start: int, kv: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Put :meth:`read_slots`' ``kv`` into row ``row`` at slots ``start..``."""
        n = kv[0].shape[2]
        for layer in range(cache.n_layer):
            cache.k[layer][row, :, start:start + n] = kv[0][layer]
            cache.v[layer][row, :, start:start + n] = kv[1][layer]


def _decode_one(model: nn.Module, cache: KVCache, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, None], input_pos=input_pos[:, None], kv_cache=cache)  # (B, 1, V)
    return logits[:, 0].float()


def cpu_capability() -> str:
    """The instruction set ATen dispatches to on this CPU (``AVX512``, ``AVX2``, ``DEFAULT``)."""
    return torch.backends.cpu.get_cpu_capability()


def compile_cache_dir() -> Path:
    """Where compiled decode steps live across runs: one private, checked directory per instruction set
    (inductor loads the code it finds there, see :mod:`corelm.cache`)."""
    return private_cache.cache_subdir("inductor", cpu_capability().lower())


def compile_step(fn, cuda: bool = False):
    """``torch.compile`` a decode step with a per-instruction-set cache that persists across runs.

    CPU: inductor with ``freezing`` (weights become constants of the generated code) and
    ``cpp_wrapper`` (the graph is called from C++, not a Python launcher). CUDA: ``reduce-overhead``
    (CUDA graphs: the whole step replays as one launch; the static cache buffers make that legal).
    Compiling costs minutes on 2 cores the first time; inductor's on-disk cache makes the next run
    take seconds.
    """
    where = compile_cache_dir() if not cuda else private_cache.cache_subdir("inductor", "cuda")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(where)  # inductor reads it at every cache lookup
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    if cuda:
        return torch.compile(fn, mode="reduce-overhead", dynamic=False)
    inductor_config.freezing = True
    inductor_config.cpp_wrapper = True
    return torch.compile(fn, dynamic=False)


# --------------------------------------------------------------------------------------------------
# corelm's C++ step
# --------------------------------------------------------------------------------------------------


@dataclass
class KernelCache:
    """The C++ step's KV cache: ``k``, ``v`` of shape ``(n_layer, B, n_kv_head, S, head_dim)``, bf16 by
    default (half of fp32's memory; keys and values rounded to nearest even, every attention sum in
    fp32: on SmolLM2 the logits stay within ~1e-2 of an fp32 cache and greedy text is unchanged, see
    tests/test_generate_step.py) or fp32 (``KernelStep(model, kv_dtype=torch.float32)``).

    Slots are allocated uninitialized: a query reads only slots its own row wrote before it (the
    prompt's, then each decoded token's), never what an earlier request left in the row.
    """

    k: torch.Tensor
    v: torch.Tensor

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[3]


def kernel_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (values, scales) tensors corelm's C++ kernels read for a quantized layer (its own
    tensors, no copy), or None when the layer is not on those kernels."""
    get = getattr(module, "kernel_weights", None)
    return get() if callable(get) else None


class KernelStep:
    """A quantized llama-family decoder on corelm's C++ ``DecoderStep`` (CPU).

    Build it with :func:`step_for`, which checks :func:`kernel_step_supported` first.

    Args:
        model: a quantized llama-family decoder (every projection and the head on the kernel layout).
        kv_dtype: the cache's dtype, ``torch.float16``, ``torch.bfloat16`` or ``torch.float32``; default: the
            environment's ``CORELM_KV_DTYPE`` (``fp16``, ``bf16`` or ``fp32``), else fp16 (llama.cpp's default
            too: half of fp32's memory, and 7x closer to fp32's logits than bf16 on SmolLM2).
    """

    kind = "kernels"
    slot_of: Callable[[int], int] | None = None  # LoRA: cache row -> its adapter slot (see attach_lora)

    def __init__(self, model: nn.Module, kv_dtype: torch.dtype | None = None) -> None:
        if kv_dtype is None:
            name = os.environ.get("CORELM_KV_DTYPE", "fp16")
            kv_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(name)
            if kv_dtype is None:
                raise CorelmError(f"CORELM_KV_DTYPE must be fp16, bf16 or fp32, not {name!r}")
        if kv_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise CorelmError(f"the C++ step keeps its KV cache in float16, bfloat16 or float32, not {kv_dtype}")
        config = model.config
        self.model = model
        self.kv_dtype = kv_dtype
        self.config = config
        self._lora = False  # attach_lora registered adapter stacks
        self.embed = model.model.embed_tokens
        S = config.max_seq_len
        cos, sin = model.rope(torch.arange(S)[None], S - 1)  # (1, 1, S, rot) each
        tensors = {"cos": cos.reshape(S, -1).float().contiguous(), "sin": sin.reshape(S, -1).float().contiguous(),
                   "norm": model.model.norm.weight.detach().float()}
        tensors.update(_named("lm_head", model.lm_head))
        self.op = torch.classes.corelm.DecoderStep(tensors, config.n_head, config.n_kv_head,
                                                   float(model.model.norm.eps))
        for i, block in enumerate(model.model.layers):
            attn, mlp = block.self_attn, block.mlp
            layer = {"input_layernorm": block.input_layernorm.weight.detach().float(),
                     "post_attention_layernorm": block.post_attention_layernorm.weight.detach().float()}
            for name in PROJECTIONS:
                layer.update(_named(name, getattr(attn if name in PROJECTIONS[:4] else mlp, name)))
            for name in ("q_norm", "k_norm"):  # Qwen3: per-head RMSNorm (absent: no parameters)
                weight = getattr(getattr(attn, name, None), "weight", None)
                if weight is not None:
                    layer[name] = weight.detach().float()
            self.op.add_layer(layer, layer_window(config, i))

    def attach_lora(self, slot_of: Callable[[int], int] | None = None) -> int:
        """Run per-row LoRA adapters in the C++ step: every projection of the model that
        :func:`corelm.finetune.multi_lora.apply_multi_lora` has wrapped (after this step was built) hands
        its stacks ``lora_A (slots+1, r, in)``, ``lora_B (slots+1, out, r)`` and ``used_mask`` to the step by
        reference, so adapters loaded into or cleared from them later apply from the next call. From then
        on every call reads each token's slot from ``slot_of(cache row)`` (0: the base model; default: the
        :attr:`slot_of` set later, e.g. by the server's batcher). Returns the projections registered."""
        if slot_of is not None:
            self.slot_of = slot_of
        n = 0
        for i, block in enumerate(self.model.model.layers):
            for name in PROJECTIONS:
                layer = getattr(block.self_attn if name in PROJECTIONS[:4] else block.mlp, name)
                if getattr(layer, "lora_A", None) is not None:
                    self.op.set_lora(i, name, layer.lora_A, layer.lora_B, layer.used_mask)
                    n += 1
        self._lora = n > 0
        return n

    def new_cache(self, batch: int, max_len: int) -> KernelCache:
        shape = (self.config.n_layer, batch, self.config.n_kv_head, max_len, self.config.head_dim)
        return KernelCache(torch.empty(shape, dtype=self.kv_dtype), torch.empty(shape, dtype=self.kv_dtype))

    def _run(self, cache: KernelCache, tokens: Sequence[int] | torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
             out: torch.Tensor) -> torch.Tensor:
        x = self.embed(torch.as_tensor(tokens, dtype=torch.long)).float()  # (N, d)
        if self._lora and self.slot_of is not None:
            of = {r: self.slot_of(r) for r in set(rows.tolist())}
            if any(of.values()):  # else the plain call: rows without an adapter pay nothing
                slots = torch.tensor([of[r] for r in rows.tolist()], dtype=torch.long)  # (N,)
                return self.op.forward_lora(x, rows, pos, cache.k, cache.v, out, slots)
        return self.op.forward(x, rows, pos, cache.k, cache.v, out)

    def prefill(self, cache: KernelCache, prompts: Sequence[Sequence[int]],
                rows: Sequence[int] | None = None) -> torch.Tensor:
        """All prompts in one call: token ``t`` of prompt ``b`` at position ``t`` of row ``rows[b]``."""
        rows = list(range(len(prompts))) if rows is None else list(rows)
        lens = [len(p) for p in prompts]
        row_of = torch.repeat_interleave(torch.as_tensor(rows), torch.as_tensor(lens))
        pos = torch.cat([torch.arange(n) for n in lens])
        last = torch.as_tensor(lens).cumsum(0) - 1
        return self._run(cache, [t for p in prompts for t in p], row_of, pos, last)

    def extend(self, cache: KernelCache, row: int, tokens: Sequence[int], pos0: int,
               all_logits: bool = True) -> torch.Tensor:
        n = len(tokens)
        out = torch.arange(n) if all_logits else torch.tensor([n - 1])
        return self._run(cache, list(tokens), torch.full((n,), row), torch.arange(pos0, pos0 + n), out)

    def decode(self, cache: KernelCache, tokens: torch.Tensor, pos: torch.Tensor,
               rows: Sequence[int] | None = None) -> torch.Tensor:
        n = tokens.shape[0]
        return self._run(cache, tokens, _row_tensor(rows, n, torch.device("cpu")), pos, torch.arange(n))

    def reorder(self, cache: KernelCache, origins: torch.Tensor) -> None:
        cache.k.copy_(cache.k.index_select(1, origins))
        cache.v.copy_(cache.v.index_select(1, origins))

    def share_prefix(self, cache: KernelCache, n: int) -> None:
        cache.k[:, 1:, :, :n] = cache.k[:, :1, :, :n]
        cache.v[:, 1:, :, :n] = cache.v[:, :1, :, :n]

    def read_slots(self, cache: KernelCache, row: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return cache.k[:, row, :, start:stop].clone(), cache.v[:, row, :, start:stop].clone()

    def write_slots(self, cache: KernelCache, row: int, start: int, kv: tuple[torch.Tensor, torch.Tensor]) -> None:
        n = kv[0].shape[2]
        cache.k[:, row, :, start:start + n] = kv[0]
        cache.v[:, row, :, start:start + n] = kv[1]

    def mixed(self, cache: KernelCache, runs: Sequence[tuple[int, Sequence[int], int]]) -> torch.Tensor:
        """Runs ``(row, tokens, pos0)`` -- each row's ``tokens`` at positions ``pos0..`` -- in one call
        -> ``(len(runs), V)`` fp32 logits after each run's last token. A token's logits do not depend on
        the call's other tokens, so a run of one token is a decode step and a longer run a prefill chunk."""
        lens = [len(tokens) for _, tokens, _ in runs]
        row_of = torch.repeat_interleave(torch.as_tensor([row for row, _, _ in runs]), torch.as_tensor(lens))
        pos = torch.cat([torch.arange(pos0, pos0 + n) for (_, _, pos0), n in zip(runs, lens)])
        last = torch.as_tensor(lens).cumsum(0) - 1
        return self._run(cache, [t for _, tokens, _ in runs for t in tokens], row_of, pos, last)


def layer_window(config: object, i: int) -> int:
    """Layer ``i``'s sliding window (0: attends every earlier position): Mistral slides in every layer,
    models with ``layer_types`` only in their ``sliding_attention`` layers."""
    window = getattr(config, "sliding_window", None) or 0
    types = getattr(config, "layer_types", None)
    return int(window) if window and (types is None or types[i] == "sliding_attention") else 0


def _named(name: str, module: nn.Module) -> dict[str, torch.Tensor]:
    values, scales = kernel_weights(module)
    out = {f"{name}.values": values, f"{name}.scales": scales}
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        out[f"{name}.bias"] = bias.detach().float()
    return out


def kernel_step_supported(model: nn.Module) -> str | None:
    """Why ``model`` cannot run on :class:`KernelStep` (None when it can).

    It can when it is a llama-family decoder on the CPU whose every projection and head is a
    quantized layer on corelm's kernel layout, with one RMSNorm epsilon, SwiGLU and plain scaled
    dot-product attention, and the kernel library is built.
    """
    from corelm import kernels

    config = model.config
    if getattr(config, "family", None) != "llama":
        return f"the C++ step runs llama-family models, not {getattr(config, 'family', '?')}"
    if not getattr(model, "corelm_quantization", None):
        return "the model is not quantized"
    if model_device(model).type != "cpu":
        return "the model is not on the CPU"
    if getattr(config, "activation", "silu") != "silu":
        return f"the C++ step computes SwiGLU, not {config.activation}"
    rope_type = (getattr(config, "rope_scaling", None) or {}).get("rope_type", "default")
    if rope_type in ("dynamic", "longrope"):  # their tables change with the sequence's length
        return f"the C++ step reads one RoPE table; {rope_type} RoPE changes it with the length"
    layers = [getattr(b.self_attn if n in PROJECTIONS[:4] else b.mlp, n)
              for b in model.model.layers for n in PROJECTIONS]
    if any(kernel_weights(m) is None for m in [*layers, model.lm_head]):
        return "some layers are not on corelm's kernel layout"
    norms = {model.model.norm.eps, *(b.input_layernorm.eps for b in model.model.layers),
             *(b.post_attention_layernorm.eps for b in model.model.layers)}
    if len(norms) != 1:
        return "the model's RMSNorms use several epsilons"
    if not kernels.load(build_if_missing=False):
        return f"corelm's C++ kernels are not available ({kernels.load_error()})"
    return None


def step_for(model: nn.Module, compile: bool = False) -> ModelStep | KernelStep:
    """The step ``model`` decodes through: its :class:`KernelStep` (built once and kept on the model)
    when :func:`kernel_step_supported` says it can, else a :class:`ModelStep`."""
    if not compile and kernel_step_supported(model) is None:
        step = model.__dict__.get("_corelm_kernel_step")  # kept outside the module tree: not a submodule
        if step is None:
            step = model.__dict__["_corelm_kernel_step"] = KernelStep(model)
        return step
    return ModelStep(model, compile=compile)


def require_kernel_step(model: nn.Module) -> KernelStep:
    """:class:`KernelStep` for ``model``, or a CorelmError saying why it cannot run there."""
    why = kernel_step_supported(model)
    if why is not None:
        raise CorelmError(why)
    return step_for(model)

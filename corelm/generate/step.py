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
- :class:`KernelStep`: a decoder of the llama, Gemma, OLMo 2 or MoE family on CPU, quantized or with
  fp32/bf16 weights, through corelm's C++ ``DecoderStep`` (:mod:`corelm.kernels`): every layer and the
  head in one call, with no Python or dispatcher work per layer, every matmul on corelm's own thread pool
  (PyTorch's OpenMP regions each end in a barrier that a descheduled thread stalls: on a loaded 2-core
  machine the float forward decodes faster on one thread than on two). The model is described to it
  once, by name (``q_proj.values``, which norms sit where, the activation, soft-caps, windows, RoPE
  tables: see :func:`describe_layer`); a batched decode step of B requests is one call of B tokens, and a
  token's logits do not depend on the other tokens of the call (the server's rows equal the same request
  served alone).

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
from corelm.models import head_logits
from corelm.ops.kv_cache import KVCache

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Where each family's block keeps the norms the C++ step applies: ``attn_norm``/``mlp_norm`` before a
# sub-layer, ``attn_out_norm``/``mlp_out_norm`` on its output before the residual add (an absent or
# ``nn.Identity`` module: no such norm). The names are the HF checkpoints'; note Llama's
# ``post_attention_layernorm`` is its pre-MLP norm, Gemma 2's and OLMo 2's an output norm.
NORM_ROLES = {
    "llama": {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
    "gemma": {"attn_norm": "input_layernorm", "attn_out_norm": "post_attention_layernorm",
              "mlp_norm": "pre_feedforward_layernorm", "mlp_out_norm": "post_feedforward_layernorm"},
    "olmo2": {"attn_out_norm": "post_attention_layernorm", "mlp_out_norm": "post_feedforward_layernorm"},
    "moe": {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
}
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "relu": 3}  # the C++ step's MLP nonlinearities (Layer::act)


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
        return _head_logits(self.model, last)

    def extend(self, cache: KVCache, row: int, tokens: Sequence[int], pos0: int,
               all_logits: bool = True) -> torch.Tensor:
        """``tokens`` of row ``row`` at positions ``pos0..`` -> ``(T, V)`` fp32 logits of every one
        (``(1, V)`` for the last one when ``all_logits`` is False)."""
        ids = torch.as_tensor([list(tokens)], device=self.device)
        pos = torch.arange(pos0, pos0 + len(tokens), device=self.device)[None]
        view = cache if cache.batch == 1 else cache.rows(slice(row, row + 1))
        hidden = self.model.hidden_states(ids, input_pos=pos, kv_cache=view)[0]  # (T, d)
        return _head_logits(self.model, hidden if all_logits else hidden[-1:])

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


def _head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 next-token logits of final-norm hidden states, soft-capped where the model's forward caps
    them (Gemma 2's ``final_softcap``: the prefill's logits are then the forward's too)."""
    return head_logits(model, hidden).float()  # capped in the forward's dtype, as the forward caps


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


FLOAT_WEIGHTS = (torch.float32, torch.bfloat16)  # the float weights the C++ step reads as they are (fgemv.h)


def kernel_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (values, scales) tensors corelm's C++ kernels read for a layer (its own tensors, no copy), or
    None when the layer is not on those kernels: a quantized layer's packed values and scales, or a plain
    ``nn.Linear``'s (or a tied head's embedding) fp32 or bf16 weight with no scales (an empty tensor)."""
    from corelm.ops.tied import TiedLMHead

    get = getattr(module, "kernel_weights", None)
    if callable(get):
        return get()
    weight = getattr(module, "weight", None)  # exact types: a subclass (an adapter wrapper) may compute more
    if type(module) in (nn.Linear, TiedLMHead) and weight.dtype in FLOAT_WEIGHTS and weight.is_contiguous():
        return weight.detach(), torch.empty(0)
    return None


class KernelStep:
    """A decoder (llama family, Gemma 1/2/3, OLMo 2, MoE) on corelm's C++ ``DecoderStep`` (CPU), quantized or
    float.

    A float model's projections and head are read in place, in the model's dtype: fp32 stays fp32 and bf16
    stays bf16 (decode reads every weight once per step, so bf16 reads half of fp32's bytes); every product
    and sum is fp32 (fgemv.h). Build it with :func:`step_for`, which checks :func:`kernel_step_supported`.

    Args:
        model: a decoder of those families (every projection and the head quantized on the kernel layout, or a
            plain fp32/bf16 ``nn.Linear``).
        kv_dtype: the cache's dtype, ``torch.float16``, ``torch.bfloat16`` or ``torch.float32``; default: the
            environment's ``CORELM_KV_DTYPE`` (``fp16``, ``bf16`` or ``fp32``), else for a float model its own
            dtype (the cache its PyTorch forward keeps), for a quantized one fp16 (llama.cpp's default too:
            half of fp32's memory, and 7x closer to fp32's logits than bf16 on SmolLM2).
    """

    kind = "kernels"
    slot_of: Callable[[int], int] | None = None  # LoRA: cache row -> its adapter slot (see attach_lora)

    def __init__(self, model: nn.Module, kv_dtype: torch.dtype | None = None) -> None:
        if kv_dtype is None:
            default = "fp16"
            if not getattr(model, "corelm_quantization", None):  # a float model: the cache its forward keeps
                default = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(model_dtype(model), "fp16")
            name = os.environ.get("CORELM_KV_DTYPE", default)
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
        S = config.max_seq_len
        self.positions = None  # GPT-2: the learned (or sinusoidal) position table added to the embeddings
        if config.family == "gpt2":
            self.embed, self.positions, self.embed_scale = model.transformer.wte, model.transformer.wpe, None
            cos = sin = torch.zeros(S, 0)  # no RoPE
            tensors = {"cos": cos, "sin": sin, **_norm_tensors("norm", model.transformer.ln_f)}
            options = {"eps": float(model.transformer.ln_f.eps)}
            tensors.update(_named("lm_head", model.lm_head))
            self.op = torch.classes.corelm.DecoderStep(tensors, config.n_head, config.n_kv_head, options)
            for block in model.transformer.h:
                self.op.add_layer(*describe_gpt2_layer(config, block))
            return
        self.embed = model.model.embed_tokens
        self.embed_scale = getattr(model, "embed_scale", None)  # Gemma: embeddings times sqrt(d_model)
        cos, sin = _rope_rows(model.rope, S)
        tensors = {"cos": cos, "sin": sin, "norm": _norm_weight(model.model.norm)}
        options = {"eps": float(model.model.norm.eps)}
        if getattr(model, "final_softcap", None):
            options["final_softcap"] = float(model.final_softcap)
        original = int((model.rope.scaling or {}).get("original_max_position_embeddings") or S)
        if model.rope.rope_type == "longrope" and S > original:  # short factors up to `original`, long beyond
            tensors["cos"], tensors["sin"] = _rope_rows(model.rope, original)
            tensors["cos_long"], tensors["sin_long"] = cos, sin
            options["rope_long_from"] = float(original)
        tensors.update(_named("lm_head", model.lm_head))
        self.op = torch.classes.corelm.DecoderStep(tensors, config.n_head, config.n_kv_head, options)
        local = _rope_rows(model.rope_local, S) if getattr(model, "rope_local", None) is not None else None
        for block in model.model.layers:
            self.op.add_layer(*describe_layer(config, block, local))

    def attach_lora(self, slot_of: Callable[[int], int] | None = None) -> int:
        """Run per-row LoRA adapters in the C++ step: every projection of the model that
        :func:`corelm.finetune.multi_lora.apply_multi_lora` has wrapped (after this step was built) hands
        its stacks ``lora_A (slots+1, r, in)``, ``lora_B (slots+1, out, r)`` and ``used_mask`` to the step by
        reference, so adapters loaded into or cleared from them later apply from the next call. From then
        on every call reads each token's slot from ``slot_of(cache row)`` (0: the base model; default: the
        :attr:`slot_of` set later, e.g. by the server's batcher). Returns the projections registered: 0,
        and no adapter path, when some wrapped layer is not one of the step's projections (a MoE's experts),
        since the step could not apply its update."""
        if slot_of is not None:
            self.slot_of = slot_of
        if self.positions is not None:  # GPT-2's fused c_attn: its LoRA cannot be split into q, k and v here
            return 0
        found = []
        for i, block in enumerate(self.model.model.layers):
            for name in PROJECTIONS:
                layer = getattr(block.self_attn if name in PROJECTIONS[:4] else block.mlp, name, None)
                if getattr(layer, "lora_A", None) is not None:
                    found.append((i, name, layer))
        wrapped = sum(getattr(m, "lora_A", None) is not None for m in self.model.modules())
        if wrapped != len(found):
            return 0
        for i, name, layer in found:
            self.op.set_lora(i, name, layer.lora_A, layer.lora_B, layer.used_mask)
        self._lora = bool(found)
        return len(found)

    def new_cache(self, batch: int, max_len: int) -> KernelCache:
        shape = (self.config.n_layer, batch, self.config.n_kv_head, max_len, self.config.head_dim)
        return KernelCache(torch.empty(shape, dtype=self.kv_dtype), torch.empty(shape, dtype=self.kv_dtype))

    def _run(self, cache: KernelCache, tokens: Sequence[int] | torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
             out: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(tokens, dtype=torch.long)
        exact = getattr(self.embed, "rows", None)  # a GGUF block embedding: the file's values in fp32
        plain = self.embed_scale is None and self.positions is None
        x = exact(ids) if exact is not None and plain else self.embed(ids)  # (N, d)
        if self.positions is not None:  # GPT-2, as its forward: tokens + positions in the embedding dtype
            x = x + self.positions(pos[None])[0].to(x.dtype)
        if self.embed_scale is not None:  # rounded to the activation dtype first, as the model does
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        x = x.float()
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
               all_logits: bool = True, at: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens`` at positions ``pos0..`` of cache row ``row`` -> fp32 logits after each token, after the
        last (``all_logits=False``), or after the tokens indexed by ``at`` (only those go through the head)."""
        n = len(tokens)
        out = at if at is not None else torch.arange(n) if all_logits else torch.tensor([n - 1])
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


def describe_layer(config: object, block: nn.Module, local_rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                   ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One block as the C++ step's ``add_layer`` reads it: ``(tensors, options)``.

    Tensors: the seven projections (:func:`_named`; a MoE's gate/up/down are its shared expert's, or
    absent), the norms the family has in each role of :data:`NORM_ROLES` (as the step multiplies by
    them), the QK norms (per head: ``head_dim`` weights; OLMo 2's over the whole projection: one per row),
    for a sliding Gemma 3 layer its own RoPE table ``local_rope``, and for a sparse MoE layer its router and
    shared-expert gate (floats) and its routed experts (each expert's quantized gate, up and down, or the
    float stacks of a model that keeps them so). Options: the
    window, the attention scale and soft-cap, the activation, a MoE's ``top_k`` and ``norm_topk``.
    """
    family = getattr(config, "family", None)
    attn = block.self_attn
    tensors: dict[str, torch.Tensor] = {}
    options: dict[str, float] = {}
    mlp = _dense_mlp(block)
    for name in PROJECTIONS:
        if name in PROJECTIONS[:4] or mlp is not None:  # a MoE without a shared expert has no dense MLP
            tensors.update(_named(name, getattr(attn if name in PROJECTIONS[:4] else mlp, name)))
    if hasattr(block.mlp, "experts"):
        tensors.update(_routed(block.mlp))
        options.update(top_k=float(block.mlp.top_k), norm_topk=float(bool(block.mlp.norm_topk_prob)))
    for role, name in NORM_ROLES[family].items():
        if getattr(getattr(block, name, None), "weight", None) is not None:  # nn.Identity: no such norm
            tensors[role] = _norm_weight(getattr(block, name))
    for name in ("q_norm", "k_norm"):  # Qwen3, Gemma 3, OLMo 2 (absent or nn.Identity: no parameters)
        if getattr(getattr(attn, name, None), "weight", None) is not None:
            tensors[name] = _norm_weight(getattr(attn, name))
    if local_rope is not None and getattr(attn, "local_rope", False):
        tensors["cos"], tensors["sin"] = local_rope
    options.update(window=float(layer_window(config, attn.layer_idx)), act=float(ACTIVATIONS[config.activation]))
    if getattr(attn, "scale", None) is not None:  # Gemma: query_pre_attn_scalar ** -0.5
        options["attn_scale"] = float(attn.scale)
    if getattr(attn, "softcap", None):
        options["attn_softcap"] = float(attn.softcap)
    return tensors, options


def describe_gpt2_layer(config: object, block: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """A GPT-2 block as ``add_layer`` reads it: the fused ``c_attn`` split into q/k/v by rows (views of the
    quantized rows or of the records' groups of eight rows, no copies), ``c_proj``, the plain MLP's ``c_fc``
    (up) and ``c_proj`` (down), and the LayerNorms ``ln_1``/``ln_2`` with their biases; no RoPE (positions
    are added to the embeddings)."""
    attn, mlp = block.attn, block.mlp
    inner = attn.n_head * attn.head_dim
    tensors = {}
    fused = _named("qkv", attn.c_attn)
    values, scales = fused.pop("qkv.values"), fused.pop("qkv.scales")
    records = scales.dtype == torch.int64 and scales.numel() == 2  # (type, rows): rows eight to a group
    if records and inner % 8:  # a split inside a group: the layer's rows instead (a copy)
        values, scales = attn.c_attn.kernel_rows()
        records = False
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        if records:
            group = values.numel() // -(-int(scales[1]) // 8)  # bytes per group of eight rows
            tensors[f"{name}.values"] = values[i * inner // 8 * group:(i + 1) * inner // 8 * group]
            tensors[f"{name}.scales"] = torch.tensor([int(scales[0]), inner])
        else:
            tensors[f"{name}.values"] = values[i * inner:(i + 1) * inner]
            # a GGUF matrix's "scales" is its one-element type: shared by the three
            tensors[f"{name}.scales"] = scales if scales.dtype == torch.int64 else scales[i * inner:(i + 1) * inner]
        for part, t in fused.items():  # the bias
            tensors[name + part[len("qkv"):]] = t[i * inner:(i + 1) * inner]
    tensors.update(_named("o_proj", attn.c_proj))
    tensors.update(_named("up_proj", mlp.c_fc))
    tensors.update(_named("down_proj", mlp.c_proj))
    tensors.update(_norm_tensors("attn_norm", block.ln_1))
    tensors.update(_norm_tensors("mlp_norm", block.ln_2))
    return tensors, {"act": float(ACTIVATIONS[config.activation])}


def _norm_tensors(role: str, norm: nn.Module) -> dict[str, torch.Tensor]:
    """A LayerNorm as the step reads it: ``role`` (its weight, fp32) and ``role.bias`` when it has one."""
    out = {role: norm.weight.detach().float()}
    if getattr(norm, "bias", None) is not None:
        out[role + ".bias"] = norm.bias.detach().float()
    return out


def _dense_mlp(block: nn.Module) -> nn.Module | None:
    """The block's gated MLP on the quantized kernels: its ``mlp``, a MoE's shared expert, or None."""
    if hasattr(block.mlp, "experts"):
        return getattr(block.mlp, "shared_expert", None)
    return block.mlp


def _routed(moe: nn.Module) -> dict[str, torch.Tensor]:
    """A sparse MoE's router and (Qwen2-MoE) shared-expert gate, in floats as the quantized model keeps them
    (routing is decided on these weights; see corelm.quant.transform), and its routed experts: each expert's
    quantized ``experts.{e}.gate_proj`` ... (:class:`corelm.quant.experts.QuantizedExperts`), or the float
    stacks ``experts.gate_up`` / ``experts.down`` (:class:`corelm.models.moe.Experts`)."""
    out = {"router": moe.gate.weight.detach()}
    if hasattr(moe.experts, "gate_up_proj"):
        out.update({"experts.gate_up": moe.experts.gate_up_proj.detach(),
                    "experts.down": moe.experts.down_proj.detach()})
    else:
        for e, mlp in enumerate(moe.experts):
            for name in ("gate_proj", "up_proj", "down_proj"):
                out.update(_named(f"experts.{e}.{name}", getattr(mlp, name)))
    if hasattr(moe, "shared_expert_gate"):
        out["shared_expert_gate"] = moe.shared_expert_gate.weight.detach()
    return out


def _norm_weight(norm: nn.Module) -> torch.Tensor:
    """What an RMSNorm multiplies the normalised row by, fp32: Gemma's ``1 + weight`` folded in once."""
    from corelm.models.gemma import GemmaRMSNorm

    weight = norm.weight.detach().float()
    return 1.0 + weight if isinstance(norm, GemmaRMSNorm) else weight


def _rope_rows(rope: object, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rope``'s cos and sin rows for positions ``0..n-1``, ``(n, rotary_dim)`` fp32 each: the table a
    forward whose largest position is ``n - 1`` reads."""
    cos, sin = rope(torch.arange(n)[None], n - 1)  # (1, 1, n, rot) each
    return cos.reshape(n, -1).float().contiguous(), sin.reshape(n, -1).float().contiguous()


def _named(name: str, module: nn.Module) -> dict[str, torch.Tensor]:
    values, scales = kernel_weights(module)
    out = {f"{name}.values": values, f"{name}.scales": scales}
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        out[f"{name}.bias"] = bias.detach().float()
    return out


def kernel_step_supported(model: nn.Module) -> str | None:
    """Why ``model`` cannot run on :class:`KernelStep` (None when it can).

    It can when it is a decoder of a family in :data:`NORM_ROLES` (llama, gemma, olmo2, moe) or GPT-2 on
    the CPU whose every projection and head is a quantized layer on corelm's kernel layout or a plain
    fp32/bf16 ``nn.Linear`` (:func:`kernel_weights`), with one norm epsilon, an MLP nonlinearity of
    :data:`ACTIVATIONS`, a RoPE table that does not change with the length (LongRoPE's two tables are
    taken), and the kernel library is built. ``CORELM_STEP=pytorch`` in the environment keeps every model
    on its PyTorch forward (:class:`ModelStep`; e.g. to compare the paths); ``auto`` or unset is the
    default, and any other value is refused (:class:`CorelmError`), as are kernel settings the C++ kernels
    would not understand (:func:`corelm.kernels.check_settings`).
    """
    from corelm import kernels

    config = model.config
    family = getattr(config, "family", None)
    if family not in (*NORM_ROLES, "gpt2"):
        return f"the C++ step runs the {', '.join(NORM_ROLES)} and gpt2 families, not {family or '?'}"
    choice = os.environ.get("CORELM_STEP", "").strip().lower()
    if choice not in ("", "auto", "pytorch"):
        raise CorelmError(f"CORELM_STEP={os.environ['CORELM_STEP']!r}: set it to pytorch (the PyTorch forward) or "
                          "auto (the C++ step where the model can run on it), or leave it unset")
    if choice == "pytorch":
        return "CORELM_STEP=pytorch asks for the PyTorch forward"
    if model_device(model).type != "cpu":
        return "the model is not on the CPU"
    if getattr(config, "activation", "silu") not in ACTIVATIONS:
        return f"the C++ step computes {', '.join(ACTIVATIONS)} MLPs, not {config.activation}"
    if family != "gpt2" and model.rope.rope_type == "dynamic":  # its table changes with every length past the context
        return "the C++ step reads fixed RoPE tables; dynamic RoPE changes its table with the length"
    from corelm.models.moe import Experts
    from corelm.quant.experts import QuantizedExperts, expert_layers

    if family != "gpt2" and any(hasattr(b.mlp, "experts") and type(b.mlp.experts) not in (Experts, QuantizedExperts)
                                for b in model.model.layers):
        return "the routed experts are wrapped (LoRA): the C++ step reads plain or quantized experts"
    if any(kernel_weights(m) is None for m in [*_step_matrices(model), *expert_layers(model), model.lm_head]):
        if model_dtype(model) not in FLOAT_WEIGHTS:
            return f"the C++ step reads quantized, float32 or bfloat16 weights, not {model_dtype(model)}"
        return "some layers are neither on corelm's kernel layout nor plain float32/bfloat16 nn.Linear"
    norms = {float(m.eps) for m in model.modules() if "Norm" in type(m).__name__ and hasattr(m, "eps")}
    if len(norms) != 1:
        return "the model's norms use several epsilons"
    if not kernels.load(build_if_missing=False):
        return f"corelm's C++ kernels are not available ({kernels.load_error()})"
    kernels.check_settings()
    return None


def _step_matrices(model: nn.Module) -> list[nn.Module]:
    """The projections the C++ step reads (the head aside)."""
    if model.config.family == "gpt2":
        return [m for b in model.transformer.h for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
    layers = [getattr(b.self_attn, n) for b in model.model.layers for n in PROJECTIONS[:4]]
    return layers + [getattr(m, n) for m in map(_dense_mlp, model.model.layers) if m is not None
                     for n in PROJECTIONS[4:]]


def step_for(model: nn.Module, compile: bool = False) -> ModelStep | KernelStep:
    """The step ``model`` decodes through: its :class:`KernelStep` (built once and kept on the model,
    rebuilt when a parameter was replaced or changed in place since: the step reads the projections in
    place but keeps its own fp32 copies of some norms and biases) when :func:`kernel_step_supported` says
    it can, else a :class:`ModelStep`."""
    if not compile and kernel_step_supported(model) is None:
        slot = model.__dict__.setdefault("_corelm_kernel_step", _StepSlot())  # outside the module tree
        seen = _parameters_seen(model)
        if slot.step is None or slot.seen != seen:
            slot.step, slot.seen = KernelStep(model), seen
        return slot.step
    return ModelStep(model, compile=compile)


def _parameters_seen(model: nn.Module) -> tuple:
    """Each parameter's storage and version counter (bumped by every in-place write)."""
    try:
        return tuple((p.data_ptr(), p._version) for p in model.parameters())
    except RuntimeError:  # inference tensors (made under torch.inference_mode) keep no version counter
        return tuple(p.data_ptr() for p in model.parameters())


class _StepSlot:
    """Where :func:`step_for` keeps a model's :class:`KernelStep`. A copy of the model (``copy.deepcopy``,
    e.g. to make an fp32 reference of a bf16 model) gets an empty slot: its step reads its own weights."""

    step: KernelStep | None = None
    seen: tuple = ()  # the parameters' storage and version when the step was built

    def __deepcopy__(self, memo: dict) -> _StepSlot:
        return _StepSlot()


def require_kernel_step(model: nn.Module) -> KernelStep:
    """:class:`KernelStep` for ``model``, or a CorelmError saying why it cannot run there."""
    why = kernel_step_supported(model)
    if why is not None:
        raise CorelmError(why)
    return step_for(model)

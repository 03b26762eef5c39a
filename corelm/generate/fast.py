"""The fast decode path for llama-family models: static cache, one call per decode step.

Decoding one token of a 135M model reads every weight once and does little arithmetic, so it is
bound by memory bandwidth and, at this size, by per-operator overhead (30 layers x ~15 ops).
:class:`FastDecoder` removes both (the recipe of gpt-fast's ``generate.py``):

- a preallocated KV cache ``(n_kv_head, S, head_dim)`` per layer, written at the position;
- int4/int8 models on CPU (layers on corelm's C++ kernels, :mod:`corelm.kernels`): the whole step
  -- every layer and the head -- is one ``torch.ops.corelm.llama_forward`` call that reads the
  layers' own packed tensors. Prefill and speculative verify passes are the same call with T
  tokens, and each row equals a one-token step bit for bit. No compiler runs at decode time: the
  library is built once per machine and instruction set (``~/.cache/corelm/kernels``); while it
  does not exist, the first run starts its build in the background and decodes on the path below;
- otherwise (float models, PyTorch-packed layers, CUDA): the model's math written out with q/k/v and
  gate/up fused into one matrix each and a hand-written grouped-query attention over a fixed window,
  so every step has the same shapes and can be one ``torch.compile`` graph (inductor with
  ``freezing`` and ``cpp_wrapper``; CUDA graphs on GPU). Compilation costs minutes on 2 cores the
  first time; inductor's on-disk cache, one per instruction set under
  ``~/.cache/corelm/inductor/<capability>``, makes the next run take seconds. With
  ``compile="auto"`` a decoder compiles only when that cache is already warm and otherwise runs
  eager.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from corelm import cache
from corelm.compress.quant import Int4Linear, Int8Linear
from corelm.errors import CorelmError
from corelm.ops.sampling import sample_from_logits

WINDOW = 256  # the cache grows in windows of this many slots: one compiled graph per window count


def cpu_capability() -> str:
    """The instruction set ATen dispatches to on this CPU (``AVX512``, ``AVX2``, ``DEFAULT``)."""
    return torch.backends.cpu.get_cpu_capability()


def compile_cache_dir() -> Path:
    """Where compiled decode steps live across runs: one private, checked directory per instruction set
    (inductor loads the code it finds there, see :mod:`corelm.cache`)."""
    return cache.cache_subdir("inductor", cpu_capability().lower())


def _fuse(mods: list[nn.Module]) -> nn.Module:
    """Concatenate linear layers that read the same input along their outputs (q|k|v, gate|up)."""
    if all(isinstance(m, Int4Linear) for m in mods):
        parts = [m.quantized() for m in mods]
        fused = Int4Linear(mods[0].in_features, sum(m.out_features for m in mods), mods[0].group_size,
                           device=mods[0].scale_zeros.device)
        fused.set_quantized(*(torch.cat([p[i] for p in parts]) for i in range(3)))
        return fused
    if all(isinstance(m, Int8Linear) for m in mods):
        fused = Int8Linear(mods[0].in_features, sum(m.out_features for m in mods), device=mods[0].weight.device)
        fused.weight = torch.cat([m.weight for m in mods])
        fused.scales = torch.cat([m.scales for m in mods])
        return fused
    if all(type(m) is nn.Linear for m in mods):
        weight = torch.cat([m.weight.detach() for m in mods])
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
        fused.weight = nn.Parameter(weight, requires_grad=False)
        return fused
    raise CorelmError("cannot fuse projections of mixed kinds (some quantized, some not)")


def _kernel_weights(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (values, scales) tensors corelm's C++ kernels read for layer ``m`` (its own tensors, no
    copy), or None when the layer is not on those kernels (float, biased, PyTorch-packed int4)."""
    from corelm.compress.quant import Q8Linear

    if isinstance(m, Int4Linear) and m.kernel and m.bias is None:
        return m.packed, m.scale_zeros
    if isinstance(m, Q8Linear):
        return m.qweight, m.scales
    if isinstance(m, Int8Linear) and m.bias is None:
        return m.weight, m.scales
    return None


def _projections(block: nn.Module) -> list[nn.Module]:
    """A llama block's seven matrices in the order ``llama_forward`` takes them."""
    attn, mlp = block.self_attn, block.mlp
    return [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]


class _Concat(nn.Module):
    """Layers reading the same input, outputs concatenated (q|k|v, gate|up) without fusing weights."""

    def __init__(self, mods: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.parts], dim=-1)


class _Layer(nn.Module):
    def __init__(self, block: nn.Module, kernel: bool = False) -> None:
        super().__init__()
        attn, mlp = block.self_attn, block.mlp
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            if getattr(proj, "bias", None) is not None:
                raise CorelmError("the fast decode path supports llama models without biases")
        self.n_q, self.n_kv = attn.n_head * attn.head_dim, attn.n_kv_head * attn.head_dim
        self.d_ff = mlp.gate_proj.out_features
        if kernel:  # the C++ step reads the layers' own tensors; prefill calls the layers
            self.wqkv = _Concat([attn.q_proj, attn.k_proj, attn.v_proj])
            self.wo = attn.o_proj
            self.w13 = _Concat([mlp.gate_proj, mlp.up_proj])
            self.w2 = mlp.down_proj
            self.kernel_mats = _projections(block)
        else:
            self.wqkv = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
            self.wo = attn.o_proj
            self.w13 = _fuse([mlp.gate_proj, mlp.up_proj])
            self.w2 = mlp.down_proj
        self.norm1, self.eps1 = block.input_layernorm.weight.detach().float(), block.input_layernorm.eps
        self.norm2, self.eps2 = block.post_attention_layernorm.weight.detach().float(), block.post_attention_layernorm.eps


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # fp32 throughout: activations of the fast path are fp32, only the matmul inputs are bf16
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF layout) on ``(T, H, hd)`` with ``cos``/``sin`` of shape ``(T, 1, hd)``."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class FastDecoder(nn.Module):
    """Batch-1 generation for a llama-family model (float, int8 or int4), with a static cache.

    Args:
        model: a :class:`corelm.models.llama.Llama` (optionally transformed by ``quantize_model``).
            The decoder shares its (packed) weights; the fused q/k/v and gate/up matrices are new.
        max_seq_len: largest prompt + generation length; defaults to the model's context.
        compile: ``True`` compiles the decode step, ``False`` stays eager, ``"auto"`` compiles when
            this machine's compile cache already holds it (see module doc).
        kernels: ``"auto"`` runs an int4/int8 model on CPU through corelm's C++ step
            (:mod:`corelm.kernels`) when it builds or is built; ``False`` keeps PyTorch's kernels.
    """

    def __init__(self, model: nn.Module, max_seq_len: int | None = None, compile: bool | str = "auto",
                 kernels: bool | str = "auto") -> None:
        super().__init__()
        config = model.config
        if config.family != "llama":
            raise CorelmError(f"the fast decode path is for llama-family models, not {config.family}")
        self.config = config
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.max_seq_len = min(max_seq_len or config.max_seq_len, config.max_seq_len)
        self.embed = model.model.embed_tokens
        self.norm, self.eps = model.model.norm.weight.detach().float(), model.model.norm.eps
        device = self.norm.device
        self.kernel = bool(kernels) and self._kernel_ready(model, device)
        self.layers = nn.ModuleList(_Layer(block, self.kernel) for block in model.model.layers)
        self.head = model.lm_head
        inv_freq = model.rope.inv_freq.to(device)
        angles = torch.arange(self.max_seq_len, device=device).float()[:, None] * inv_freq[None]
        angles = torch.cat([angles, angles], dim=-1)  # (S, hd): rotate-half layout
        self.cos, self.sin = angles.cos(), angles.sin()
        shape = (config.n_kv_head, self.max_seq_len, config.head_dim)
        for layer in self.layers:  # one buffer per layer: index_put_ on it stays in place when compiled
            layer.register_buffer("k_cache", torch.zeros(shape, device=device), persistent=False)
            layer.register_buffer("v_cache", torch.zeros(shape, device=device), persistent=False)
        self.compile_mode = compile
        self._args: tuple | None = None  # the C++ step's argument lists, built once
        self.quantization = getattr(model, "corelm_quantization", None)
        self._compiled = None
        self.compile_seconds: float | None = None

    @staticmethod
    def _kernel_ready(model: nn.Module, device: torch.device) -> bool:
        from corelm import kernels

        if device.type != "cpu" or not getattr(model, "corelm_quantization", None):
            return False
        linears = [model.lm_head, *(m for block in model.model.layers for m in _projections(block))]
        if not all(_kernel_weights(m) is not None for m in linears):
            return False
        norms = {model.model.norm.eps, *(b.input_layernorm.eps for b in model.model.layers),
                 *(b.post_attention_layernorm.eps for b in model.model.layers)}
        return len(norms) == 1 and kernels.load(build_if_missing=False)

    def kernel_forward(self, tokens: list[int], pos0: int, all_logits: bool = False) -> torch.Tensor:
        """``tokens`` at positions ``pos0..`` through the model in one C++ call, writing the cache.

        Returns logits ``(len(tokens), V)``, or ``(1, V)`` for the last token when ``all_logits`` is
        False. Row ``t`` equals what a one-token call at ``pos0 + t`` returns, bit for bit.
        """
        if self._args is None:
            layers = self.layers
            mats = [_kernel_weights(m) for layer in layers for m in layer.kernel_mats] + [_kernel_weights(self.head)]
            self._args = ([q for q, _ in mats], [s for _, s in mats], [layer.norm1 for layer in layers],
                          [layer.norm2 for layer in layers], [layer.k_cache for layer in layers],
                          [layer.v_cache for layer in layers], self.cos, self.sin, self.norm, self.n_head,
                          self.n_kv_head, self.eps)
        if pos0 + len(tokens) > self.max_seq_len:
            raise CorelmError(f"positions up to {pos0 + len(tokens)} exceed the decoder's {self.max_seq_len}")
        x = self.embed(torch.tensor(tokens)).float().contiguous()  # (T, d)
        return torch.ops.corelm.llama_forward(x, pos0, *self._args, all_logits)

    def _kernel_step(self, token: int, pos: int) -> torch.Tensor:
        """One decode step: logits (V,) for ``token`` at ``pos``."""
        return self.kernel_forward([token], pos)[0]

    # ---- the math: T new tokens at positions start..start+T-1, attending a window of W slots ----
    def forward_tokens(self, tokens: torch.Tensor, pos: torch.Tensor, window: int) -> torch.Tensor:
        """Logits ``(T, V)`` for ``tokens`` (T,) at positions ``pos`` (T,), writing the cache.

        Attention reads cache slots ``0..window-1`` (``window`` fixed per compiled graph); a slot is
        visible to a query when its index is at most the query's position.
        """
        T, H, KV, hd = tokens.shape[0], self.n_head, self.n_kv_head, self.head_dim
        x = self.embed(tokens).float()  # (T, d)
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # (T, 1, hd)
        slots = torch.arange(window, device=tokens.device)
        mask = slots[None, :] <= pos[:, None]  # (T, W)
        for layer in self.layers:
            h = _rms(x, layer.norm1, layer.eps1)
            q, k, v = layer.wqkv(h).split([layer.n_q, layer.n_kv, layer.n_kv], dim=-1)
            q = _rope(q.view(T, H, hd), cos, sin)  # (T, H, hd)
            k = _rope(k.view(T, KV, hd), cos, sin)  # (T, KV, hd)
            layer.k_cache[:, pos] = k.transpose(0, 1)  # slots pos of (KV, S, hd)
            layer.v_cache[:, pos] = v.view(T, KV, hd).transpose(0, 1)
            keys, values = layer.k_cache[:, :window], layer.v_cache[:, :window]  # (KV, W, hd)
            q = q.view(T, KV, H // KV, hd).permute(1, 2, 0, 3)  # (KV, group, T, hd)
            scores = q @ keys.unsqueeze(1).transpose(-1, -2) * hd**-0.5  # (KV, group, T, W)
            scores = scores.masked_fill(~mask, float("-inf"))
            att = torch.softmax(scores, dim=-1) @ values.unsqueeze(1)  # (KV, group, T, hd)
            x = x + layer.wo(att.permute(2, 0, 1, 3).reshape(T, H * hd))
            h = _rms(x, layer.norm2, layer.eps2)
            gate, up = layer.w13(h).split([layer.d_ff, layer.d_ff], dim=-1)
            x = x + layer.w2(F.silu(gate) * up)
        return self.head(_rms(x, self.norm, self.eps)).float()  # (T, V)

    def _window(self, n: int) -> int:
        return min(self.max_seq_len, -(-n // WINDOW) * WINDOW)

    def signature(self, window: int) -> str:
        """Key of the compiled step: model shapes, quantization, window, torch version, device."""
        import hashlib
        import json

        spec = getattr(self, "quantization", None)
        key = json.dumps([self.config.to_dict(), spec, window, self.max_seq_len, torch.__version__,
                          str(self.norm.device.type)], sort_keys=True, default=str)
        return hashlib.sha1(key.encode()).hexdigest()[:16]

    def _step_fn(self, window: int):
        use = self.compile_mode
        marker = compile_cache_dir() / f"warm-{self.signature(window)}"
        if use == "auto":
            use = marker.exists()
        if not use:
            return self.forward_tokens
        if self._compiled is None:
            self._compiled = compile_step(self.forward_tokens, cuda=self.norm.is_cuda)

        def step(*args):
            out = self._compiled(*args)
            marker.touch()  # the next run's "auto" compiles: the cache holds this graph now
            return out

        return step

    @torch.inference_mode()
    def generate_ids(self, prompt: list[int], max_new_tokens: int, *, eos_token_id: int | None = None,
                     temperature: float = 0.0, top_k: int | None = None,
                     generator: torch.Generator | None = None,
                     pick: Callable[[torch.Tensor], int] | None = None) -> Iterator[int]:
        """Yield up to ``max_new_tokens`` token ids after ``prompt`` (greedy when ``temperature == 0``).

        ``pick(logits (V,)) -> token`` replaces the built-in greedy/top-k choice (the engine's sampler
        plugs in here). The next step is computed only when the caller asks for the next token.
        """
        if not prompt:
            raise CorelmError("the prompt is empty")
        total = len(prompt) + max_new_tokens
        if total > self.max_seq_len:
            raise CorelmError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds the "
                              f"decoder's {self.max_seq_len} positions")
        device = self.norm.device
        if self.kernel:
            logits = self.kernel_forward(list(prompt), 0)
        else:
            tokens = torch.tensor(prompt, device=device)
            logits = self.forward_tokens(tokens, torch.arange(len(prompt), device=device), self._window(len(prompt)))
        pos = torch.tensor([len(prompt)], device=device)
        window = self._window(total)  # one window for the whole generation: one compiled graph
        step = None if self.kernel else self._step_fn(window)
        next_logits = logits[-1]
        for _ in range(max_new_tokens):
            token = pick(next_logits) if pick else _pick(next_logits, temperature, top_k, generator)
            yield token
            if token == eos_token_id:
                return
            if pos.item() >= total:
                return
            if self.kernel:
                next_logits = self._kernel_step(token, int(pos))
            else:
                next_logits = step(torch.tensor([token], device=device), pos, window)[-1]
            pos += 1

    @torch.inference_mode()
    def warm_up(self, window: int | None = None) -> float:
        """Compile (or load from the cache) the decode step for ``window`` slots; returns seconds."""
        device = self.norm.device
        window = window or self._window(min(self.max_seq_len, WINDOW))
        start = time.perf_counter()
        if self.kernel:
            self._kernel_step(0, 0)
        else:
            self._step_fn(window)(torch.tensor([0], device=device), torch.tensor([0], device=device), window)
        self.compile_seconds = time.perf_counter() - start
        for layer in self.layers:
            layer.k_cache.zero_()
            layer.v_cache.zero_()
        return self.compile_seconds

    def weight_bytes(self) -> int:
        """Bytes of weights read per decoded token: every layer's matrices and the output head (the
        embedding row and the head's few refined rows are negligible)."""
        return sum(_read_bytes(m) for m in [*self.layers.modules(), self.head])


def _read_bytes(module: nn.Module) -> int:
    from corelm.compress.quant import Q8Linear

    if isinstance(module, Q8Linear):
        return module.qweight.numel() + module.scales.numel() * 2
    if isinstance(module, Int4Linear):
        return module.packed.numel() + module.scale_zeros.numel() * 2
    if isinstance(module, Int8Linear):
        return module.weight.numel() + module.scales.numel() * 2
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and (isinstance(module, nn.Linear) or not list(module.children())):
        return weight.numel() * weight.element_size()
    if isinstance(module, _Layer):
        return sum(t.numel() * 4 for t in (module.norm1, module.norm2))
    return 0


def decoder_for(model: nn.Module, need: int) -> FastDecoder | None:
    """The model's :class:`FastDecoder` on corelm's C++ kernels, for ``need`` positions (built once
    and kept on the model, cache sized in steps of 1024), or None when the model cannot use it."""
    if getattr(model.config, "family", None) != "llama" or not getattr(model, "corelm_quantization", None):
        return None
    if need > model.config.max_seq_len:
        return None
    dec = _decoder(model, need)
    return dec if dec.kernel else None


def _decoder(model: nn.Module, need: int) -> FastDecoder:
    dec = model.__dict__.get("_corelm_fast")  # kept outside the module tree: not a submodule
    if dec is None or dec.max_seq_len < need:
        size = min(model.config.max_seq_len, max(1024, -(-need // 1024) * 1024))
        dec = FastDecoder(model, max_seq_len=size, compile="auto")
        model.__dict__["_corelm_fast"] = dec
    return dec


def fast_stream(model: nn.Module, prompt_ids: list[int], params: object, *,
                eos_token_id: int | list[int] | None = None) -> Iterator[int]:
    """:func:`corelm.generate.engine.stream` on the fast path: same arguments, same tokens for greedy.

    The decoder (fused weights, static cache, compiled step) is built once per model and kept on it;
    its cache is sized in steps of 1024 positions. Stop tokens end the stream without being yielded.
    """
    from corelm.generate.engine import sample_next

    dec = _decoder(model, len(prompt_ids) + params.max_new_tokens)
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    stops = set(params.stop_token_ids) | set(eos)
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    history = list(prompt_ids)

    def pick(logits: torch.Tensor) -> int:
        return sample_next(logits, params, generator, history)

    for token in dec.generate_ids(list(prompt_ids), params.max_new_tokens, pick=pick):
        if token in stops and not params.ignore_eos:
            return
        history.append(token)
        yield token


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    return int(sample_from_logits(logits.reshape(1, -1), temperature, top_k or 0, 1.0, generator)[0])


def compile_step(fn, cuda: bool = False):
    """``torch.compile`` the decode step with a per-instruction-set cache that persists across runs.

    CPU: inductor with ``freezing`` and ``cpp_wrapper``. CUDA: ``reduce-overhead`` (CUDA graphs: the
    whole step is replayed as one launch; the static cache buffers make that legal).
    """
    where = compile_cache_dir() if not cuda else cache.cache_subdir("inductor", "cuda")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(where)  # inductor reads it at every cache lookup
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    if cuda:
        compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True, dynamic=False)
    else:
        inductor_config.freezing = True  # packed weights become constants of the generated code
        inductor_config.cpp_wrapper = True  # the graph is called from C++, not a Python launcher
        compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    return compiled

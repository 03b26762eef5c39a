"""Write corelm decoders as GGUF (llama.cpp's format): F32, F16, BF16, or a block mix as llama.cpp names it
(Q8_0, Q6_K, Q5_K_M, Q5_K_S, Q4_K_M, Q4_K_S, Q5_0, Q5_1, Q4_0, Q4_1).

The inverse of :mod:`corelm.io.gguf`, for every family it reads: each model is written under the
llama.cpp architecture that runs it (``llama`` -- with experts for Mixtral --, ``qwen2``, ``qwen3``,
``qwen2moe``, ``qwen3moe``, ``phi3``, ``gemma``, ``gemma2``, ``gemma3``, ``olmo2``), with llama.cpp's
tensor names and hyper-parameter keys and the converter's conventions (``convert_hf_to_gguf.py``):
Q/K rows permuted to interleaved RoPE order for ``llama`` only, Gemma norms stored as ``1 + w``,
Phi-3's q/k/v and gate/up fused, experts stacked ``(n_expert, rows, cols)`` with gate and up apart,
RoPE factors as ``rope_freqs``/``rope_factors_long``/``rope_factors_short`` tensors, sliding-window
layers as ``attention.sliding_window_pattern``. A config llama.cpp cannot express (a Mistral window in
the ``llama`` architecture, a Gemma query scale other than llama.cpp's, dense layers between MoE
layers, ...) is refused with one line naming it, never written as a file that runs differently.
Block quantization is :mod:`corelm.quant.gguf_quantize`: llama.cpp's reference quantizers' arithmetic,
and ``llama-quantize``'s choice of type per tensor for the mix (``Q4_K_M``: ``attn_v`` and ``ffn_down``
at Q6_K on about half the layers, the head at Q6_K, Q5_0/Q5_1/Q8_0 where rows are not whole
256-value super-blocks).

A model quantized by :func:`corelm.quant.transform.quantize_model` with int4 group 32 is written as
Q4_1 from its packed values, scales and zeros — no re-quantization (``d = scale``,
``m = zero - 8 * scale``) — and int8 layers as Q8_0 from their dequantized weights. Norms are F32.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from corelm.errors import CorelmError
from corelm.quant.gguf_quantize import BLOCK_SIZE, BLOCK_TYPES, MIXES, quantize_blocks, tensor_type

FLOAT_TYPES = ("F32", "F16", "BF16")
TYPES = FLOAT_TYPES + tuple(MIXES)
_FILE_TYPES = {"F32": 0, "F16": 1, "BF16": 32, **{name: ftype for name, (ftype, _) in MIXES.items()}}  # llama_ftype
# corelm (HF) block parameter -> llama.cpp tensor, shared by every architecture (src/llama-arch.cpp names)
_LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}
# Gemma 2/3 and OLMo 2 call the norm after attention post_attention_norm (llama's is the pre-MLP norm)
_POST_NORM_ARCHS = ("gemma2", "gemma3", "olmo2")
# llama.cpp token types
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


def _float_weight(module: nn.Module) -> torch.Tensor:
    """The float (N, K) weight of a Linear / Int8Linear / Int4Linear / tied head / embedding."""
    if hasattr(module, "dequantize"):
        return module.dequantize().float()
    return module.weight.detach().float()


def _q4_1_from_int4(module: nn.Module) -> np.ndarray:
    """An int4 layer (group 32) -> GGUF Q4_1 blocks, bit for bit from the packed values."""
    q, scales, zeros = module.quantized()  # (N, K) uint8, (N, K/32) bf16 x2
    n, k = q.shape
    d = scales.float()
    m = zeros.float() - 8.0 * d
    qb = q.reshape(n, k // 32, 32).numpy()
    qs = (qb[..., :16] | (qb[..., 16:] << 4)).astype(np.uint8)  # low nibble: elements 0..15
    head = np.stack([d.numpy().astype(np.float16), m.numpy().astype(np.float16)], -1).view(np.uint8)
    return np.concatenate([head.reshape(n, k // 32, 4), qs], -1).reshape(n, -1)


def _encode(name: str, module: nn.Module, weight: torch.Tensor, qtype: str, heads: int | None) -> tuple[Any, Any]:
    """Return (data, raw_dtype) for ``GGUFWriter.add_tensor``."""
    from gguf import GGMLQuantizationType, quants

    from corelm.io.gguf import permute_rows

    if qtype == "Q4_1" and type(module).__name__ in ("Int4Linear", "Int4PackedLinear") and module.group_size == 32:
        blocks = torch.from_numpy(_q4_1_from_int4(module))
        if heads:
            blocks = permute_rows(blocks.view(blocks.shape[0], -1, 20), heads).reshape(blocks.shape[0], -1)
        return blocks.numpy(), GGMLQuantizationType.Q4_1
    if heads:
        weight = permute_rows(weight, heads)
    data = weight.contiguous().numpy().astype(np.float32)
    if weight.dim() == 1 or qtype == "F32" or data.shape[-1] % 32:
        return data, None
    if qtype == "F16":
        return data.astype(np.float16), None
    if qtype == "BF16":
        gtype = GGMLQuantizationType.BF16
        return quants.quantize(data, gtype), gtype
    if qtype not in BLOCK_TYPES or data.shape[-1] % BLOCK_SIZE[qtype]:
        return data.astype(np.float16), None
    return quantize_blocks(weight, qtype).numpy(), getattr(GGMLQuantizationType, qtype)


def _tokenizer_metadata(tokenizer: Any, pre: str, vocab_size: int | None = None) -> dict[str, Any]:
    """``tokenizer.ggml.*`` for a byte-level BPE :class:`corelm.tokenizer.Tokenizer`."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise CorelmError("GGUF export writes byte-level BPE tokenizers only")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for content, tok in added.items():
        vocab.setdefault(content, tok["id"])
    n = max(vocab.values()) + 1
    if vocab_size is not None and n > vocab_size:
        raise CorelmError(f"the tokenizer has {n} tokens, more than the model's {vocab_size} embeddings")
    tokens = [""] * n
    for tok, i in vocab.items():
        tokens[i] = tok
    types = [(_CONTROL if added[t].get("special") else _USER_DEFINED) if t in added else _NORMAL for t in tokens]
    # llama.cpp wants one token per embedding row: the converter pads with unused [PADn] tokens (get_vocab_base)
    pad = range(n, vocab_size or n)
    tokens += [f"[PAD{i}]" for i in pad]
    types += [_UNUSED] * len(pad)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    out: dict[str, Any] = {"model": "gpt2", "pre": pre, "tokens": tokens, "token_type": types, "merges": merges}
    special = tokenizer.special_tokens_map
    for key, field in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                       ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        if special.get(key) in vocab:
            out[field] = vocab[special[key]]
    out["add_bos_token"] = bool(getattr(tokenizer, "add_bos_token", False))
    if tokenizer.chat_template:
        out["chat_template"] = tokenizer.chat_template
    return out


def gguf_arch(config: Any) -> str:
    """The llama.cpp architecture that runs ``config``, or a one-line refusal naming what it cannot run.

    The choice follows the HF ``model_type`` a checkpoint came with when there is one, else the
    config's features (QKV biases: ``qwen2``; QK norms: ``qwen3``; ...). The checks are those of
    llama.cpp's loaders and graphs (``src/models/<arch>.cpp``): what a file cannot say, or what
    llama.cpp would read and then compute differently, is refused.
    """
    from corelm.io.gguf import ARCHS, GEMMA_27B_LAYERS

    family, model_type = config.family, config.extra.get("model_type")
    by_type = {spec.model_type: arch for arch, spec in ARCHS.items()}
    if family == "llama":
        arch = by_type.get(model_type) if model_type in ("qwen2", "qwen3", "phi3") else None
        arch = arch or ("qwen2" if config.qkv_bias else "qwen3" if config.qk_norm else "llama")
    elif family == "gemma":
        arch = "gemma3" if config.qk_norm else "gemma2" if config.sandwich_norm else "gemma"
    elif family == "moe":
        arch = "qwen2moe" if config.shared_expert_d_ff or config.qkv_bias else "qwen3moe" if config.qk_norm else "llama"
    elif family == "olmo2":
        arch = "olmo2"
    else:
        raise CorelmError(f"GGUF export writes decoder families llama, gemma, moe and olmo2; this model is {family}")
    _refuse(config, arch, ARCHS[arch], GEMMA_27B_LAYERS)
    return arch


# one check per line: each is one thing a llama.cpp architecture cannot represent
def _refuse(config: Any, arch: str, spec: Any, gemma_27b: dict[str, int]) -> None:  # noqa: C901
    def no(feature: str) -> CorelmError:
        return CorelmError(f"GGUF export: llama.cpp's {arch} architecture has no {feature}; this model has it "
                           "(write an HF directory instead: corelm convert)")

    sliding = config.sliding_window is not None and any(map(config.is_sliding, range(config.n_layer)))
    rope = (config.rope_scaling or {}).get("rope_type", (config.rope_scaling or {}).get("type", "default"))
    if config.bias:
        raise no("biases on every linear layer")
    if config.qkv_bias != spec.qkv_bias:
        raise no("q/k/v biases" if config.qkv_bias else "unbiased q/k/v projections")
    if arch != "olmo2" and config.qk_norm != spec.qk_norm:
        raise no("QK norm" if config.qk_norm else "attention without QK norm")
    if sliding and arch in ("llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "gemma"):
        raise no("sliding window")
    if config.rotary_dim not in (None, config.head_dim) and arch in ("llama", "gemma", "gemma2", "gemma3"):
        raise no("partial rotary embedding")
    allowed = {"gemma": (), "gemma2": (), "olmo2": (), "gemma3": ("linear",)}.get(
        arch, ("linear", "yarn", "longrope", "llama3"))
    if rope != "default" and rope not in allowed:
        raise no(f"{rope} RoPE scaling")
    if config.family == "moe":
        if config.dense_layers:
            raise no("dense layers between the MoE layers")
        if config.norm_topk_prob != spec.norm_topk_prob:
            raise no("renormalised top-k router weights" if config.norm_topk_prob else "unnormalised top-k weights")
        if bool(config.shared_expert_d_ff) != (arch == "qwen2moe"):
            raise no("shared expert" if config.shared_expert_d_ff else "MoE without a shared expert")
    if arch in ("gemma2", "gemma3"):
        scalar = config.d_model // config.n_head if config.n_layer == gemma_27b[arch] else config.head_dim
        if (config.query_pre_attn_scalar or config.head_dim) != scalar:
            raise no(f"query scale query_pre_attn_scalar={config.query_pre_attn_scalar} (it uses {scalar} for "
                     f"{config.n_layer} layers)")
    if arch == "gemma2" and (config.attn_softcap is None or config.final_softcap is None):
        raise no("attention without soft-capping (it always caps Gemma 2's attention and output logits)")
    if arch == "gemma3" and config.attn_softcap:
        raise no("attention logit soft-capping")
    if arch == "gemma" and (config.sandwich_norm or config.final_softcap or config.attn_softcap):
        raise no("sandwich norms or soft-capping")
    if config.rope_local_theta not in (None, config.rope_theta) and arch not in ("gemma2", "gemma3"):
        raise no("separate RoPE base for sliding layers")
    if rope != "default" and sliding and arch == "olmo2":
        raise no("RoPE scaling together with sliding layers")


def _metadata(writer: Any, config: Any, arch: str, qtype: str) -> list[tuple[str, torch.Tensor]]:
    """Write the ``<arch>.*`` hyper-parameters; returns the RoPE factor tensors to write with the weights."""
    writer.add_block_count(config.n_layer)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_feed_forward_length(config.moe_d_ff if config.family == "moe" and arch == "llama" else config.d_ff)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_kv_head)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.rotary_dim or config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_FILE_TYPES[qtype])
    if config.family == "moe":
        writer.add_expert_count(config.n_experts)
        writer.add_expert_used_count(config.n_experts_per_tok)
        if arch != "llama":
            writer.add_expert_feed_forward_length(config.moe_d_ff)
        if config.shared_expert_d_ff:
            writer.add_expert_shared_feed_forward_length(config.shared_expert_d_ff)
    sliding = config.sliding_window is not None and any(map(config.is_sliding, range(config.n_layer)))
    if sliding:
        writer.add_sliding_window(config.sliding_window)
        if arch != "phi3":  # llama.cpp reads one bool per layer (True = sliding)
            writer.add_sliding_window_pattern([config.is_sliding(i) for i in range(config.n_layer)])
        if config.rope_local_theta is not None:
            writer.add_rope_freq_base_swa(config.rope_local_theta)
        elif arch == "gemma3":  # llama.cpp's default for Gemma 3's local layers is 10000, not the global base
            writer.add_rope_freq_base_swa(config.rope_theta)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_softcap)
    if config.final_softcap:
        writer.add_final_logit_softcapping(config.final_softcap)
    return _rope_metadata(writer, config)


def _rope_metadata(writer: Any, config: Any) -> list[tuple[str, torch.Tensor]]:
    """RoPE scaling as the converter writes it: keys for linear/YaRN, factor tensors for LongRoPE and Llama 3."""
    from gguf import RopeScalingType

    scaling = dict(config.rope_scaling or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
        for key, add in (("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if scaling.get(key) is not None:
                add(float(scaling[key]))
    elif kind == "llama3":  # convert_hf_to_gguf.py LlamaModel.generate_extra_tensors: per-frequency divisors
        from corelm.ops.rope import rope_inv_freq

        dim = config.rotary_dim or config.head_dim
        plain = rope_inv_freq(dim, config.rope_theta)
        return [("rope_freqs.weight", plain / rope_inv_freq(dim, config.rope_theta, scaling))]
    elif kind == "longrope":
        long, short = scaling["long_factor"], scaling["short_factor"]
        attention = scaling.get("attention_factor")
        if long == short and attention == 1.0:  # corelm's reading of a rope_freqs tensor: write it back as one
            return [("rope_freqs.weight", torch.tensor(long, dtype=torch.float32))]
        writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
        if attention is None:
            from corelm.ops.rope import RopeTable

            attention = RopeTable(config.head_dim, config.rope_theta, scaling, rotary_dim=config.rotary_dim,
                                  max_seq_len=config.max_seq_len).attention_factor
        writer.add_rope_scaling_attn_factors(float(attention))
        return [("rope_factors_long.weight", torch.tensor(long, dtype=torch.float32)),
                ("rope_factors_short.weight", torch.tensor(short, dtype=torch.float32))]
    return []


def _expert_stacks(block: nn.Module, params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A sparse block's routed experts as float stacks ``gate_up (E, 2F, d)``, ``down (E, d, F)``: the
    parameters, or what quantized experts (:mod:`corelm.quant.experts`) multiply with; None for a dense block."""
    if hasattr(getattr(block.mlp, "experts", None), "stacked"):
        return block.mlp.experts.stacked()
    if "mlp.experts.gate_up_proj" in params:
        return params["mlp.experts.gate_up_proj"].detach(), params["mlp.experts.down_proj"].detach()
    return None


def _tensors(model: nn.Module, config: Any, arch: str, qtype: str) -> list[tuple[str, Any, torch.Tensor, str, Any]]:
    """``(gguf name, module or None, float weight, type, heads to permute)`` for every tensor, in file order."""
    from corelm.io.gguf import ARCHS, permute_rows

    spec = ARCHS[arch]
    body = model.model
    emb = body.embed_tokens
    # token embedding: Q8_0 at most (llama.cpp's own converters keep it at 8 bits or more)
    emb_type = qtype if qtype in ("F32", "F16", "BF16") else "Q8_0"
    out = [("token_embd.weight", emb, _float_weight(emb), emb_type, None)]
    offset = spec.norm_offset
    for i, block in enumerate(body.layers):
        params = dict(block.named_parameters())
        modules = dict(block.named_modules())
        fused: dict[str, list[torch.Tensor]] = {}
        for name, module in modules.items():
            if name not in _LAYER:
                continue
            gg = _LAYER[name]
            if name == "post_attention_layernorm" and arch in _POST_NORM_ARCHS:
                gg = "post_attention_norm"
            if isinstance(module, nn.Identity):
                continue
            weight = _float_weight(module)
            if name.endswith("norm"):
                out.append((f"blk.{i}.{gg}.weight", None, weight + offset, "F32", None))
                continue
            kind = "F32" if name in ("mlp.gate", "mlp.shared_expert_gate") else qtype  # routers stay exact
            heads = None
            if spec.permute_qk and name.endswith(("q_proj", "k_proj")):
                heads = config.n_head if name.endswith("q_proj") else config.n_kv_head
            if arch == "phi3" and name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
                fused.setdefault("attn_qkv" if "attn" in name else "ffn_up", []).append(weight)
                continue
            out.append((f"blk.{i}.{gg}.weight", module, weight, kind, heads))
            bias = getattr(module, "bias", None)
            if bias is not None:
                b = bias.detach().float()
                out.append((f"blk.{i}.{gg}.bias", None, permute_rows(b, heads) if heads else b, "F32", None))
        for gg, parts in fused.items():  # Phi-3: rows q, k, v / gate, up (dict order is the module order)
            out.append((f"blk.{i}.{gg}.weight", None, torch.cat(parts), qtype, None))
        stacks = _expert_stacks(block, params)
        if stacks is not None:  # (E, 2F, d) -> llama.cpp's gate and up stacks (E, F, d)
            gate_up, down = stacks
            gate, up = gate_up.float().chunk(2, dim=1)
            out += [(f"blk.{i}.ffn_gate_exps.weight", None, gate, qtype, None),
                    (f"blk.{i}.ffn_up_exps.weight", None, up, qtype, None),
                    (f"blk.{i}.ffn_down_exps.weight", None, down.float(), qtype, None)]
    out.append(("output_norm.weight", None, body.norm.weight.detach().float() + offset, "F32", None))
    if not config.tie_embeddings:
        out.append(("output.weight", model.lm_head, _float_weight(model.lm_head), emb_type, None))
    if qtype in MIXES:  # llama-quantize's type for each matrix of the mix (kept F32: norms, routers)
        n_expert = config.n_experts if config.family == "moe" else 0
        n_gqa = config.n_head // (getattr(config, "n_kv_head", None) or config.n_head)
        out = [(name, module, weight, kind if kind == "F32" or weight.dim() < 2 else
                tensor_type(name, qtype, weight.shape[-1], config.n_layer, n_expert, config.tie_embeddings, n_gqa),
                heads) for name, module, weight, kind, heads in out]
    return out


# one linear sequence: checks, metadata, tokenizer, tensors, atomic write
def export_gguf(model: nn.Module, path: str | Path, qtype: str = "F16", tokenizer: Any = None,
                tokenizer_pre: str = "smollm", name: str | None = None) -> Path:
    """Write ``model`` (a corelm decoder, float or quantized) to ``path`` as GGUF.

    Args:
        model: a corelm llama, gemma, moe or olmo2 model, optionally quantized in place.
        path: output ``.gguf`` file; written to a temporary name and renamed, so a failure leaves
            nothing behind.
        qtype: F32, F16 or BF16 for every matrix, or a mix of :data:`TYPES` as llama.cpp names it
            (``Q4_K_M``, ``Q8_0``, ...): each matrix gets the type ``llama-quantize`` gives it
            (:func:`corelm.quant.gguf_quantize.tensor_type`). Norms and routers stay F32; a matrix whose
            width is not a multiple of 32 stays F32.
        tokenizer: a :class:`corelm.tokenizer.Tokenizer` (byte-level BPE) to embed; llama.cpp needs it.
        tokenizer_pre: llama.cpp's pre-tokenizer name (``smollm`` for SmolLM2's vocabulary).
        name: ``general.name``.

    Returns:
        The path written.

    Raises:
        CorelmError: an unknown type, a model llama.cpp cannot represent (:func:`gguf_arch` names the
            feature), or an output name without ``.gguf``.
    """
    from gguf import GGUFWriter

    if qtype not in TYPES:
        raise CorelmError(f"unknown GGUF type {qtype!r}; expected one of {', '.join(TYPES)}")
    config = getattr(model, "config", None)
    if config is None:
        raise CorelmError("GGUF export needs a corelm model (with a .config)")
    arch = gguf_arch(config)
    path = Path(path)
    if path.suffix != ".gguf":
        raise CorelmError(f"the output file must end in .gguf, got {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    writer = GGUFWriter(str(tmp), arch)
    try:
        writer.add_name(name or config.name or "corelm")
        extra_tensors = _metadata(writer, config, arch, qtype)
        if tokenizer is not None:
            _write_tokenizer(writer, _tokenizer_metadata(tokenizer, tokenizer_pre, config.vocab_size))
        for gname, factors in extra_tensors:
            writer.add_tensor(gname, factors.float().numpy())
        for gname, module, weight, kind, heads in _tensors(model, config, arch, qtype):
            data, raw = _encode(gname, module, weight, kind if weight.dim() >= 2 else "F32", heads)
            if raw is None:
                writer.add_tensor(gname, data)
            else:
                writer.add_tensor(gname, data, raw_shape=data.shape, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def _write_tokenizer(writer: Any, meta: dict[str, Any]) -> None:
    writer.add_tokenizer_model(meta["model"])
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["token_type"])
    writer.add_token_merges(meta["merges"])
    for field, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                       ("unknown_token_id", writer.add_unk_token_id), ("padding_token_id", writer.add_pad_token_id)):
        if field in meta:
            add(meta[field])
    writer.add_add_bos_token(meta["add_bos_token"])
    if "chat_template" in meta:
        writer.add_chat_template(meta["chat_template"])

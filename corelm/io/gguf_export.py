"""Write corelm llama-family models as GGUF (llama.cpp's format): F32, F16, Q8_0, Q4_0, Q4_1.

The inverse of :mod:`corelm.io.gguf`: HF names -> GGUF names, Q/K rows permuted to llama.cpp's
interleaved RoPE order, ``llama.*`` hyper-parameters and the ``tokenizer.ggml.*`` vocabulary, so
``llama.cpp`` (and ``llama-cpp-python``) load the file directly. Block quantization uses the
``gguf`` package's reference quantizer (the same code llama.cpp's converter runs).

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

TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")
_LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
# llama.cpp token types
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4


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
    gtype = getattr(GGMLQuantizationType, qtype)
    return quants.quantize(data, gtype), gtype


def _tokenizer_metadata(tokenizer: Any, pre: str) -> dict[str, Any]:
    """``tokenizer.ggml.*`` for a byte-level BPE :class:`corelm.tokenizer.Tokenizer`."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise CorelmError("GGUF export writes byte-level BPE tokenizers only")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for content, tok in added.items():
        vocab.setdefault(content, tok["id"])
    tokens = [""] * (max(vocab.values()) + 1)
    for tok, i in vocab.items():
        tokens[i] = tok
    types = [(_CONTROL if added[t].get("special") else _USER_DEFINED) if t in added else _NORMAL for t in tokens]
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


# one linear sequence: checks, metadata, tokenizer, tensors, atomic write
def export_gguf(model: nn.Module, path: str | Path, qtype: str = "F16", tokenizer: Any = None,  # noqa: C901
                tokenizer_pre: str = "smollm", name: str | None = None) -> Path:
    """Write ``model`` (a corelm llama, float or quantized) to ``path`` as GGUF.

    Args:
        model: :class:`corelm.models.llama.Llama`, optionally quantized in place.
        path: output ``.gguf`` file; written to a temporary name and renamed, so a failure leaves
            nothing behind.
        qtype: type of the 2-D weights: F32, F16, Q8_0, Q4_0 or Q4_1 (norms stay F32; a weight whose
            width is not a multiple of 32 stays F32).
        tokenizer: a :class:`corelm.tokenizer.Tokenizer` (byte-level BPE) to embed; llama.cpp needs it.
        tokenizer_pre: llama.cpp's pre-tokenizer name (``smollm`` for SmolLM2's vocabulary).
        name: ``general.name``.

    Returns:
        The path written.
    """
    from gguf import GGUFWriter

    if qtype not in TYPES:
        raise CorelmError(f"unknown GGUF type {qtype!r}; expected one of {', '.join(TYPES)}")
    config = getattr(model, "config", None)
    if config is None or config.family != "llama":
        raise CorelmError("GGUF export supports llama-family models")
    from corelm.compress.prune import llama_extras

    extras = llama_extras(config)
    if extras:  # written as plain llama tensors, these would be dropped without a word
        raise CorelmError(f"GGUF export writes plain llama blocks; this model has {', '.join(extras)} "
                          "(write an HF directory instead: corelm convert)")
    path = Path(path)
    if path.suffix != ".gguf":
        raise CorelmError(f"the output file must end in .gguf, got {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    writer = GGUFWriter(str(tmp), "llama")
    try:
        writer.add_name(name or config.name or "corelm")
        writer.add_block_count(config.n_layer)
        writer.add_context_length(config.max_seq_len)
        writer.add_embedding_length(config.d_model)
        writer.add_feed_forward_length(config.d_ff)
        writer.add_head_count(config.n_head)
        writer.add_head_count_kv(config.n_kv_head)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type({"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}[qtype])
        if config.head_dim * config.n_head != config.d_model:
            writer.add_key_length(config.head_dim)
            writer.add_value_length(config.head_dim)
        if tokenizer is not None:
            meta = _tokenizer_metadata(tokenizer, tokenizer_pre)
            writer.add_tokenizer_model(meta["model"])
            writer.add_tokenizer_pre(meta["pre"])
            writer.add_token_list(meta["tokens"])
            writer.add_token_types(meta["token_type"])
            writer.add_token_merges(meta["merges"])
            for field, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                               ("unknown_token_id", writer.add_unk_token_id),
                               ("padding_token_id", writer.add_pad_token_id)):
                if field in meta:
                    add(meta[field])
            writer.add_add_bos_token(meta["add_bos_token"])
            if "chat_template" in meta:
                writer.add_chat_template(meta["chat_template"])
        body = model.model
        tensors: list[tuple[str, nn.Module | None, torch.Tensor, str, int | None]] = []
        emb = body.embed_tokens
        # token embedding: Q8_0 at most (llama.cpp's own converters keep it at 8 bits or more)
        emb_type = qtype if qtype in ("F32", "F16") else "Q8_0"
        tensors.append(("token_embd.weight", emb, _float_weight(emb), emb_type, None))
        for i, block in enumerate(body.layers):
            for hf, gg in _LAYER.items():
                module = block.get_submodule(hf)
                heads = config.n_head if hf.endswith("q_proj") else config.n_kv_head if hf.endswith("k_proj") else None
                tensors.append((f"blk.{i}.{gg}.weight", module, _float_weight(module), qtype, heads))
        tensors.append(("output_norm.weight", body.norm, body.norm.weight.detach().float(), "F32", None))
        if not config.tie_embeddings:
            tensors.append(("output.weight", model.lm_head, _float_weight(model.lm_head), emb_type, None))
        for gname, module, weight, kind, heads in tensors:
            data, raw = _encode(gname, module, weight, kind if weight.dim() == 2 else "F32", heads)
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

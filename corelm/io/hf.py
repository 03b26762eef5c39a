"""Hugging Face checkpoints: config mapping, state-dict mapping tables, memory-mapped load, atomic save.

corelm parameter names already follow the HF checkpoints (docs/DESIGN.md), so the mapping is a
small table per family: HF name, corelm name, and whether the tensor is transposed (GPT-2's
``Conv1D`` stores ``(in, out)`` where ``nn.Linear`` stores ``(out, in)``). Every tensor's shape is
checked against the model the config describes.

Weights are read memory-mapped (``safetensors.safe_open``, ``torch.load(mmap=True,
weights_only=True)``) and the model is built on the ``meta`` device and then given the tensors
with ``load_state_dict(assign=True)``, so loading makes no second full copy.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from corelm.config import ModelConfig
from corelm.errors import CorelmError
from corelm.io import hf_seq2seq  # encoder-decoders (BART, mBART, Marian, T5): their own config and tensor table

# --------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# --------------------------------------------------------------------------------------------

# HF field names per family: (ModelConfig field, HF field, default or _REQUIRED).
_REQUIRED = object()
_HF_FIELDS: dict[str, list[tuple[str, str, Any]]] = {
    "gpt2": [
        ("vocab_size", "vocab_size", _REQUIRED),
        ("d_model", "n_embd", _REQUIRED),
        ("n_layer", "n_layer", _REQUIRED),
        ("n_head", "n_head", _REQUIRED),
        ("max_seq_len", "n_positions", 1024),
        ("d_ff", "n_inner", None),
        ("norm_eps", "layer_norm_epsilon", 1e-5),
        ("tie_embeddings", "tie_word_embeddings", True),
    ],
    "llama": [
        ("vocab_size", "vocab_size", _REQUIRED),
        ("d_model", "hidden_size", _REQUIRED),
        ("n_layer", "num_hidden_layers", _REQUIRED),
        ("n_head", "num_attention_heads", _REQUIRED),
        ("d_ff", "intermediate_size", _REQUIRED),
        ("n_kv_head", "num_key_value_heads", None),
        ("head_dim", "head_dim", None),
        ("max_seq_len", "max_position_embeddings", 2048),
        ("norm_eps", "rms_norm_eps", 1e-6),
        ("tie_embeddings", "tie_word_embeddings", False),
    ],
    "bert": [
        ("vocab_size", "vocab_size", _REQUIRED),
        ("d_model", "hidden_size", _REQUIRED),
        ("n_layer", "num_hidden_layers", _REQUIRED),
        ("n_head", "num_attention_heads", _REQUIRED),
        ("d_ff", "intermediate_size", _REQUIRED),
        ("max_seq_len", "max_position_embeddings", 512),
        ("norm_eps", "layer_norm_eps", 1e-12),
        ("type_vocab_size", "type_vocab_size", 2),
        ("pad_token_id", "pad_token_id", 0),
    ],
}
_HF_FIELDS["gemma"] = [row for row in _HF_FIELDS["llama"] if row[0] != "tie_embeddings"] + [
    ("tie_embeddings", "tie_word_embeddings", True),
]
_HF_FIELDS["olmo2"] = _HF_FIELDS["llama"]
_FAMILY_OF = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama",
              "phi3": "llama", "olmo2": "olmo2",
              "bert": "bert", "gemma": "gemma", "gemma2": "gemma", "gemma3_text": "gemma"}
# transformers' ACT2FN names -> corelm's (the same function; gelu_fast is gelu_new's formula written out)
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                "gelu": "gelu", "gelu_python": "gelu", "silu": "silu", "swish": "silu", "relu": "relu"}
# HF dropout fields -> (ModelConfig field, families that read it); GPT-2's embd_pdrop must equal resid_pdrop
_DROPOUTS = {"resid_pdrop": ("dropout", ("gpt2",)), "attn_pdrop": ("attn_dropout", ("gpt2",)),
             "attention_dropout": ("attn_dropout", ("llama", "gemma"))}
_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "bert": "BertForPreTraining",
                  "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM", "olmo2": "Olmo2ForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
_TOKEN_FIELDS = ("bos_token_id", "eos_token_id")
# Mixture-of-experts decoders (corelm/models/moe.py): Llama's fields and the attention options of
# their dense twin, plus the expert fields of _moe_options.
_HF_FIELDS["moe"] = _HF_FIELDS["llama"]
_FAMILY_OF.update(mixtral="moe", qwen2_moe="moe", qwen3_moe="moe")
_ARCHITECTURES.update(mixtral="MixtralForCausalLM", qwen2_moe="Qwen2MoeForCausalLM", qwen3_moe="Qwen3MoeForCausalLM")
_DENSE_TWIN = {"mixtral": "mistral", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3"}


# C901: one branch per family's extra fields; each is a few lines and they share the kwargs being built
def config_from_hf(hf_config: dict[str, Any]) -> ModelConfig:  # noqa: C901
    """Translate an HF ``config.json`` dict (gpt2, llama, mistral, bert) into a :class:`ModelConfig`.

    A ``"corelm"`` key (written by :func:`save_hf_dir`) is taken as the exact config.

    Raises:
        CorelmError: unknown ``model_type``, a required field is missing, or a feature corelm does
            not implement (attention biases, relative positions, ...).
    """
    if isinstance(hf_config.get("corelm"), dict):
        return ModelConfig.from_dict(hf_config["corelm"])
    model_type = hf_config.get("model_type")
    if model_type is None:
        raise CorelmError("config.json is missing required field 'model_type'")
    if model_type in hf_seq2seq.MODEL_TYPES:
        return hf_seq2seq.config_from_hf(hf_config)
    family = _FAMILY_OF.get(model_type)
    if family is None:
        raise CorelmError(f"unsupported model_type {model_type!r}; corelm reads {', '.join(_FAMILY_OF)}")
    kwargs: dict[str, Any] = {"family": family, "name": str(hf_config.get("_name_or_path", "") or "")}
    for field, hf_name, default in _HF_FIELDS[family]:
        value = hf_config.get(hf_name, default)
        if value is _REQUIRED:
            raise CorelmError(f"config.json ({model_type}) is missing required field {hf_name!r}")
        kwargs[field] = value
    act_key = "activation_function" if family == "gpt2" else "hidden_act"
    if family == "gemma" and hf_config.get("hidden_activation"):
        act_key = "hidden_activation"  # Gemma 2/3 name it so; Gemma 1 files may carry either
    default_act = {"gpt2": "gelu_new", "llama": "silu", "bert": "gelu",
                   "gemma": "gelu_pytorch_tanh"}.get(family, "silu")
    act = hf_config.get(act_key, default_act)
    if act not in _ACTIVATIONS:
        raise CorelmError(f"unsupported activation {act!r} in config.json ({act_key}); corelm implements "
                          f"{', '.join(_ACTIVATIONS)}")
    kwargs["activation"] = _ACTIVATIONS[act]
    kwargs.update(_dropout_options(family, hf_config))
    if family in ("llama", "gemma", "moe", "olmo2"):
        if hf_config.get("attention_bias") or hf_config.get("mlp_bias"):
            raise CorelmError(f"{model_type} configs with attention_bias/mlp_bias are not supported by corelm")
        if hf_config.get("use_bidirectional_attention"):
            raise CorelmError(f"{model_type} with bidirectional attention is not supported by corelm")
        kwargs["bias"] = False
        # transformers >= 5 writes `rope_parameters` (theta inside; Gemma 3 one dict per layer type);
        # older files `rope_theta` + `rope_scaling` (+ Gemma 3's `rope_local_base_freq`)
        rope = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
        if "full_attention" in rope:
            local = dict(rope.get("sliding_attention") or {})
            if local.get("rope_type", "default") != "default":
                raise CorelmError(f"RoPE scaling of sliding layers ({local['rope_type']!r}) is not supported")
            kwargs["rope_local_theta"] = float(local["rope_theta"]) if "rope_theta" in local else None
            rope = dict(rope["full_attention"])
        elif hf_config.get("rope_local_base_freq") is not None:
            kwargs["rope_local_theta"] = float(hf_config["rope_local_base_freq"])
        kwargs["rope_theta"] = float(rope.pop("rope_theta", hf_config.get("rope_theta", 10000.0)))
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        # Phi-4-mini rotates only part of each head (inside rope_parameters in transformers >= 5)
        partial = float(rope.pop("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0)))
        if partial != 1.0:
            head_dim = kwargs["head_dim"] or kwargs["d_model"] // kwargs["n_head"]
            kwargs["rotary_dim"] = int(head_dim * partial)
        if rope.get("rope_type") in ("longrope", "yarn") and "original_max_position_embeddings" not in rope:
            rope["original_max_position_embeddings"] = hf_config.get("original_max_position_embeddings")
        kwargs["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
        kwargs.update(_attention_options(_DENSE_TWIN.get(model_type, model_type), hf_config, kwargs["n_layer"]))
        if family == "moe":
            kwargs.update(_moe_options(model_type, hf_config, kwargs["n_layer"]))
    if family == "bert" and hf_config.get("position_embedding_type", "absolute") != "absolute":
        raise CorelmError("BERT with relative position embeddings is not supported by corelm")
    extra = {k: hf_config[k] for k in _TOKEN_FIELDS if hf_config.get(k) is not None}
    # kept so an export does not fall back to the class default (Phi-3: 32000)
    if family in ("llama", "gemma", "olmo2"):
        extra["pad_token_id"] = hf_config.get("pad_token_id")
    extra["model_type"] = model_type
    return ModelConfig(**kwargs, extra=extra)


def _dropout_options(family: str, hf: dict[str, Any]) -> dict[str, float]:
    """``dropout``/``attn_dropout`` from the HF fields (transformers' GPT-2 default is 0.1 each; they act
    only in train mode, so they change fine-tuning, never inference)."""
    out: dict[str, float] = {}
    for hf_name, (field, families) in _DROPOUTS.items():
        if family in families and hf.get(hf_name) is not None:
            out[field] = float(hf[hf_name])
    if family == "gpt2":
        out.setdefault("dropout", 0.1)
        out.setdefault("attn_dropout", 0.1)
        embd = float(hf.get("embd_pdrop", 0.1) if hf.get("embd_pdrop") is not None else out["dropout"])
        if embd != out["dropout"]:
            raise CorelmError(f"config.json has embd_pdrop={embd} but resid_pdrop={out['dropout']}; corelm's GPT-2 "
                              "uses one dropout for both (set them equal)")
    return out


def _attention_options(model_type: str, hf: dict[str, Any], n_layer: int) -> dict[str, Any]:
    """Sliding windows, per-layer types, biases, QK norms and Gemma's attention numerics of one model_type."""
    out: dict[str, Any] = {"qkv_bias": model_type == "qwen2", "qk_norm": model_type in ("qwen3", "gemma3_text")}
    window = hf.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        window = None  # Qwen files carry a window they do not use unless use_sliding_window is set
    if model_type not in ("mistral", "phi3", "qwen2", "qwen3", "gemma2", "gemma3_text"):
        window = None
    layer_types = hf.get("layer_types")
    if window is not None and layer_types is None:
        if model_type in ("qwen2", "qwen3"):  # the first max_window_layers layers stay global
            first = hf.get("max_window_layers", n_layer)
            layer_types = ["full_attention" if i < first else "sliding_attention" for i in range(n_layer)]
        elif model_type == "gemma2":  # even layers slide, odd ones are global
            layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layer)]
        elif model_type == "gemma3_text":  # every `sliding_window_pattern`-th layer is global
            pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
            layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layer)]
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        window, layer_types = None, None
    out["sliding_window"], out["layer_types"] = window, layer_types
    if model_type in ("gemma2", "gemma3_text"):
        out["sandwich_norm"] = True
        out["attn_softcap"] = hf.get("attn_logit_softcapping")
        out["final_softcap"] = hf.get("final_logit_softcapping")
        out["query_pre_attn_scalar"] = hf.get("query_pre_attn_scalar")
    return out


def _moe_options(model_type: str, hf: dict[str, Any], n_layer: int) -> dict[str, Any]:
    """Experts, top-k, expert widths and sparse layers of a Mixtral/Qwen2-MoE/Qwen3-MoE config.json."""
    n_experts = hf.get("num_local_experts", hf.get("num_experts"))
    out: dict[str, Any] = {
        "n_experts": n_experts, "n_experts_per_tok": hf.get("num_experts_per_tok", 2),
        "moe_d_ff": hf.get("moe_intermediate_size", hf["intermediate_size"]),  # Mixtral: intermediate_size
        "norm_topk_prob": model_type == "mixtral" or bool(hf.get("norm_topk_prob", False))}
    if model_type == "qwen2_moe":
        out["qkv_bias"] = bool(hf.get("qkv_bias", True))
        out["shared_expert_d_ff"] = hf.get("shared_expert_intermediate_size") or None
    if model_type != "mixtral":  # a layer is sparse iff not in mlp_only_layers and (i + 1) % step == 0
        step, only = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or ())
        out["dense_layers"] = [i for i in range(n_layer) if i in only or (i + 1) % step] or None
    return out


def _moe_to_hf(config: ModelConfig, model_type: str) -> dict[str, Any]:
    """The expert fields of a ``moe`` config.json (the inverse of :func:`_moe_options`)."""
    out: dict[str, Any] = {"num_experts_per_tok": config.n_experts_per_tok, "norm_topk_prob": config.norm_topk_prob}
    if model_type == "mixtral":
        if (config.moe_d_ff != config.d_ff or config.dense_layers or config.shared_expert_d_ff
                or not config.norm_topk_prob or config.qkv_bias or config.qk_norm):
            raise CorelmError("this moe config has features Mixtral lacks; "
                              "set extra['model_type'] to qwen2_moe/qwen3_moe")
        return {**out, "num_local_experts": config.n_experts}
    out.update(num_experts=config.n_experts, moe_intermediate_size=config.moe_d_ff, decoder_sparse_step=1,
               mlp_only_layers=list(config.dense_layers or []))
    if model_type == "qwen2_moe":
        out.update(shared_expert_intermediate_size=config.shared_expert_d_ff or 0, qkv_bias=config.qkv_bias)
    return out


# What each llama-family model_type of transformers implements: an export under a model_type
# lacking one of the config's features would load into a different model.
_LLAMA_FEATURES = {"llama": set(), "mistral": {"sliding_window"}, "qwen2": {"qkv_bias", "sliding_window"},
                   "qwen3": {"qk_norm", "sliding_window"}, "phi3": {"rotary_dim", "sliding_window"}}


def _check_llama_export(config: ModelConfig, model_type: str) -> None:
    used = {f for f in ("qkv_bias", "qk_norm", "sliding_window", "rotary_dim") if getattr(config, f)}
    missing = used - _LLAMA_FEATURES.get(model_type, set())
    if missing:
        raise CorelmError(f"cannot export as HF model_type {model_type!r}: it has no {', '.join(sorted(missing))}; "
                          "set config.extra['model_type'] to one that does (mistral, qwen2, qwen3, phi3)")


# C901: one branch per family's extra fields, in the order of config_from_hf
def config_to_hf(config: ModelConfig) -> dict[str, Any]:  # noqa: C901
    """The HF ``config.json`` dict of a corelm config (transformers' ``from_pretrained`` reads it)."""
    family = config.family
    if family in hf_seq2seq.FAMILIES:
        return hf_seq2seq.config_to_hf(config)
    model_type = config.extra.get("model_type", family) if family in ("llama", "gemma") else family
    if family == "moe":
        from corelm.io.hf_moe import hf_model_type

        model_type = hf_model_type(config)
    out: dict[str, Any] = {"architectures": [_ARCHITECTURES.get(model_type) or _ARCHITECTURES[family]],
                           "model_type": model_type}
    for field, hf_name, _ in _HF_FIELDS[family]:
        out[hf_name] = getattr(config, field)
    inverse = {"gelu_tanh": "gelu_new" if family == "gpt2" else "gelu_pytorch_tanh"}
    act_key = "activation_function" if family == "gpt2" else "hidden_act"
    out[act_key] = inverse.get(config.activation, config.activation)
    if family == "gpt2":
        out.update(resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.attn_dropout)
    elif family in ("llama", "gemma"):
        out["attention_dropout"] = config.attn_dropout
    if family == "gpt2":
        out["n_ctx"] = config.max_seq_len
        if config.head_dim * config.n_head != config.d_model:
            raise CorelmError("GPT-2 export needs head_dim * n_head == d_model (transformers' GPT-2 assumes it)")
    if family == "llama":
        _check_llama_export(config, model_type)
    if family in ("llama", "gemma", "moe", "olmo2"):
        out.update(attention_bias=False, mlp_bias=False, rope_theta=config.rope_theta,
                   rope_scaling=config.rope_scaling, sliding_window=config.sliding_window,
                   use_sliding_window=config.sliding_window is not None, max_window_layers=0)
        if config.layer_types is not None:
            out["layer_types"] = list(config.layer_types)
        elif config.sliding_window is not None and model_type != "mistral":
            out["layer_types"] = ["sliding_attention"] * config.n_layer
        if model_type in ("qwen2", "qwen3") and config.sliding_window is None:
            out["layer_types"] = ["full_attention"] * config.n_layer
        out["pad_token_id"] = config.extra.get("pad_token_id")
        if config.rotary_dim is not None:
            out["partial_rotary_factor"] = config.rotary_dim / config.head_dim
        if model_type == "phi3" and config.rope_scaling:
            out["original_max_position_embeddings"] = config.rope_scaling.get("original_max_position_embeddings")
        if model_type == "phi3":
            out["rope_parameters"] = {"rope_theta": config.rope_theta, "rope_type": "default",
                                      **(config.rope_scaling or {}),
                                      "partial_rotary_factor": (config.rotary_dim or config.head_dim) / config.head_dim}
        if family == "moe":
            out.update(_moe_to_hf(config, model_type))
        if family == "gemma":
            out["hidden_activation"] = out["hidden_act"]
            out.update(attn_logit_softcapping=config.attn_softcap, final_logit_softcapping=config.final_softcap,
                       query_pre_attn_scalar=config.query_pre_attn_scalar or config.head_dim)
            if config.rope_local_theta is not None:
                out["rope_local_base_freq"] = config.rope_local_theta
                out["rope_parameters"] = {
                    "full_attention": {"rope_type": "default", "rope_theta": config.rope_theta,
                                       **(config.rope_scaling or {})},
                    "sliding_attention": {"rope_type": "default", "rope_theta": config.rope_local_theta}}
    if family == "bert":
        out["position_embedding_type"] = "absolute"
        out["tie_word_embeddings"] = True
    for key in _TOKEN_FIELDS:
        if key in config.extra:
            out[key] = config.extra[key]
    return out


# --------------------------------------------------------------------------------------------
# state-dict mapping tables
# --------------------------------------------------------------------------------------------

# (HF name, corelm name, transposed[, needed]). "{i}" is the block index. Names that are the same on
# both sides are still listed: the table is the checklist of what a checkpoint must contain. The
# optional fourth entry says for which configs the row exists (Qwen2's biases, Qwen3's QK norms).
_GPT2_TABLE = [
    ("transformer.wte.weight", "transformer.wte.weight", False),
    ("transformer.wpe.weight", "transformer.wpe.weight", False, lambda c: c.positions == "learned"),
    ("transformer.h.{i}.ln_1.weight", "transformer.h.{i}.ln_1.weight", False),
    ("transformer.h.{i}.ln_1.bias", "transformer.h.{i}.ln_1.bias", False),
    ("transformer.h.{i}.attn.c_attn.weight", "transformer.h.{i}.attn.c_attn.weight", True),
    ("transformer.h.{i}.attn.c_attn.bias", "transformer.h.{i}.attn.c_attn.bias", False),
    ("transformer.h.{i}.attn.c_proj.weight", "transformer.h.{i}.attn.c_proj.weight", True),
    ("transformer.h.{i}.attn.c_proj.bias", "transformer.h.{i}.attn.c_proj.bias", False),
    ("transformer.h.{i}.ln_2.weight", "transformer.h.{i}.ln_2.weight", False),
    ("transformer.h.{i}.ln_2.bias", "transformer.h.{i}.ln_2.bias", False),
    ("transformer.h.{i}.mlp.c_fc.weight", "transformer.h.{i}.mlp.c_fc.weight", True),
    ("transformer.h.{i}.mlp.c_fc.bias", "transformer.h.{i}.mlp.c_fc.bias", False),
    ("transformer.h.{i}.mlp.c_proj.weight", "transformer.h.{i}.mlp.c_proj.weight", True),
    ("transformer.h.{i}.mlp.c_proj.bias", "transformer.h.{i}.mlp.c_proj.bias", False),
    ("transformer.ln_f.weight", "transformer.ln_f.weight", False),
    ("transformer.ln_f.bias", "transformer.ln_f.bias", False),
    ("lm_head.weight", "lm_head.weight", False),  # only when not tied
]
_LLAMA_TABLE = [
    ("model.embed_tokens.weight", "model.embed_tokens.weight", False),
    *[(f"model.layers.{{i}}.self_attn.{p}_proj.weight", f"model.layers.{{i}}.self_attn.{p}_proj.weight", False)
      for p in "qkvo"],
    *[(f"model.layers.{{i}}.mlp.{p}_proj.weight", f"model.layers.{{i}}.mlp.{p}_proj.weight", False)
      for p in ("gate", "up", "down")],
    *[(f"model.layers.{{i}}.self_attn.{p}_proj.bias", f"model.layers.{{i}}.self_attn.{p}_proj.bias", False,
       lambda c: c.qkv_bias and not c.bias) for p in "qkv"],
    *[(f"model.layers.{{i}}.self_attn.{p}_norm.weight", f"model.layers.{{i}}.self_attn.{p}_norm.weight", False,
       lambda c: c.qk_norm) for p in "qk"],
    ("model.layers.{i}.input_layernorm.weight", "model.layers.{i}.input_layernorm.weight", False),
    ("model.layers.{i}.post_attention_layernorm.weight", "model.layers.{i}.post_attention_layernorm.weight", False),
    ("model.norm.weight", "model.norm.weight", False),
    ("lm_head.weight", "lm_head.weight", False),  # only when not tied
]
# Gemma 1 calls its pre-MLP norm `post_attention_layernorm`; Gemma 2/3 use that name for the norm
# *after* attention and add `pre_feedforward_layernorm` / `post_feedforward_layernorm` around the MLP.
_GEMMA_TABLE = [
    ("model.embed_tokens.weight", "model.embed_tokens.weight", False),
    *[(f"model.layers.{{i}}.self_attn.{p}_proj.weight", f"model.layers.{{i}}.self_attn.{p}_proj.weight", False)
      for p in "qkvo"],
    *[(f"model.layers.{{i}}.mlp.{p}_proj.weight", f"model.layers.{{i}}.mlp.{p}_proj.weight", False)
      for p in ("gate", "up", "down")],
    *[(f"model.layers.{{i}}.self_attn.{p}_norm.weight", f"model.layers.{{i}}.self_attn.{p}_norm.weight", False,
       lambda c: c.qk_norm) for p in "qk"],
    ("model.layers.{i}.input_layernorm.weight", "model.layers.{i}.input_layernorm.weight", False),
    ("model.layers.{i}.post_attention_layernorm.weight", "model.layers.{i}.pre_feedforward_layernorm.weight", False,
     lambda c: not c.sandwich_norm),
    *[(f"model.layers.{{i}}.{n}.weight", f"model.layers.{{i}}.{n}.weight", False, lambda c: c.sandwich_norm)
      for n in ("post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")],
    ("model.norm.weight", "model.norm.weight", False),
    ("lm_head.weight", "lm_head.weight", False),  # only when not tied
]
_BERT_LAYER = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
               "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm"]
_BERT_TABLE = [
    *[(f"bert.embeddings.{n}.weight", f"embeddings.{n}.weight", False)
      for n in ("word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm")],
    ("bert.embeddings.LayerNorm.bias", "embeddings.LayerNorm.bias", False),
    *[(f"bert.encoder.layer.{{i}}.{n}.{w}", f"encoder.layer.{{i}}.{n}.{w}", False)
      for n in _BERT_LAYER for w in ("weight", "bias")],
    ("bert.pooler.dense.weight", "pooler.dense.weight", False),
    ("bert.pooler.dense.bias", "pooler.dense.bias", False),
    ("cls.predictions.bias", "cls.predictions.bias", False),
    *[(f"cls.predictions.transform.{n}.{w}", f"cls.predictions.transform.{n}.{w}", False)
      for n in ("dense", "LayerNorm") for w in ("weight", "bias")],
    ("cls.seq_relationship.weight", "cls.seq_relationship.weight", False),
    ("cls.seq_relationship.bias", "cls.seq_relationship.bias", False),
]
# OLMo 2 has no input norms: its norms follow attention and the MLP, and q/k are normalised whole.
_OLMO2_TABLE = [
    ("model.embed_tokens.weight", "model.embed_tokens.weight", False),
    *[(f"model.layers.{{i}}.self_attn.{p}_proj.weight", f"model.layers.{{i}}.self_attn.{p}_proj.weight", False)
      for p in "qkvo"],
    *[(f"model.layers.{{i}}.self_attn.{p}_norm.weight", f"model.layers.{{i}}.self_attn.{p}_norm.weight", False)
      for p in "qk"],
    *[(f"model.layers.{{i}}.mlp.{p}_proj.weight", f"model.layers.{{i}}.mlp.{p}_proj.weight", False)
      for p in ("gate", "up", "down")],
    ("model.layers.{i}.post_attention_layernorm.weight", "model.layers.{i}.post_attention_layernorm.weight", False),
    ("model.layers.{i}.post_feedforward_layernorm.weight", "model.layers.{i}.post_feedforward_layernorm.weight",
     False),
    ("model.norm.weight", "model.norm.weight", False),
    ("lm_head.weight", "lm_head.weight", False),  # only when not tied
]
_TABLES = {"gpt2": _GPT2_TABLE, "llama": _LLAMA_TABLE, "bert": _BERT_TABLE, "gemma": _GEMMA_TABLE,
           "olmo2": _OLMO2_TABLE}

# Checkpoint entries that carry no parameter of corelm (buffers, tied copies).
_IGNORED = re.compile(
    r"(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq|embeddings\.position_ids|"
    r"embeddings\.token_type_ids|cls\.predictions\.decoder\.(weight|bias))$")
# BERT parts a bare `BertModel` checkpoint (e.g. all-MiniLM) does not have; corelm initialises them.
OPTIONAL_PREFIXES = {"bert": ("pooler.", "cls.")}
# HF prefixes some checkpoints omit (the original GPT-2 files, `BertModel` saves).
_HF_PREFIX = {"gpt2": "transformer.", "bert": "bert.", "llama": "", "gemma": "", "olmo2": ""}


def _expand(config: ModelConfig) -> list[tuple[str, str, bool]]:
    rows = []
    for hf_name, name, transposed, *needed in _TABLES[config.family]:
        if name == "lm_head.weight" and config.tie_embeddings or needed and not needed[0](config):
            continue
        layers = range(config.n_layer) if "{i}" in name else [None]
        rows += [(hf_name.format(i=i), name.format(i=i), transposed) for i in layers]
    return rows


def expected_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Parameter shapes of the corelm model for ``config`` (built on ``meta``: no memory)."""
    from corelm.models import build_model

    with torch.device("meta"):
        model = build_model(config)
    return {k: v.shape for k, v in model.state_dict().items()}


# Phi-3 stores q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj` (rows stacked in that order).
# corelm splits them at import, so a Phi-3 is a llama-family model (same modules, same quantization
# and decode paths), and fuses them again at export. Row counts per part come from the config.
_FUSED = {"phi3": [("model.layers.{i}.self_attn.qkv_proj.weight", [("q_proj", "n_q"), ("k_proj", "n_kv"),
                                                                    ("v_proj", "n_kv")]),
                   ("model.layers.{i}.mlp.gate_up_proj.weight", [("gate_proj", "d_ff"), ("up_proj", "d_ff")])]}


def _fused_parts(config: ModelConfig, fused: str, i: int, parts: list[tuple[str, str]]) -> list[tuple[str, int]]:
    rows = {"n_q": config.n_head * config.head_dim, "n_kv": config.n_kv_head * config.head_dim, "d_ff": config.d_ff}
    base = fused.format(i=i).rsplit(".", 2)[0]  # model.layers.{i}.self_attn / .mlp
    return [(f"{base}.{name}.weight", rows[size]) for name, size in parts]


def _split_fused(config: ModelConfig, hf_state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Split Phi-3's fused projections into the llama names (views, no copy), checking their row counts."""
    fused = _FUSED.get(config.extra.get("model_type", ""))
    if not fused:
        return hf_state
    state = dict(hf_state)
    for i in range(config.n_layer):
        for name, parts in fused:
            key = name.format(i=i)
            if key not in state:
                raise CorelmError(f"checkpoint is missing tensor {key!r} for a {config.extra['model_type']} model")
            tensor = state.pop(key)
            split = _fused_parts(config, name, i, parts)
            if tensor.shape[0] != sum(n for _, n in split):
                raise CorelmError(f"tensor {key!r} has {tensor.shape[0]} rows, expected "
                                  f"{' + '.join(str(n) for _, n in split)} from config.json")
            for (part, _), chunk in zip(split, tensor.split([n for _, n in split])):
                state[part] = chunk
    return state


def _fuse(config: ModelConfig, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`_split_fused` on an HF-named state dict."""
    for i in range(config.n_layer):
        for name, parts in _FUSED.get(config.extra.get("model_type", ""), []):
            split = _fused_parts(config, name, i, parts)
            out[name.format(i=i)] = torch.cat([out.pop(part) for part, _ in split]).contiguous()
    return out


def state_dict_from_hf(config: ModelConfig, hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an HF checkpoint's tensors to corelm names, transposing GPT-2's Conv1D weights.

    Raises:
        CorelmError: a tensor is missing, has the wrong shape, or is not understood.
    """
    if config.family == "moe":  # per-expert tensors are stacked: the table lives with the model
        from corelm.io.hf_moe import state_dict_from_hf as moe_state_dict_from_hf

        return moe_state_dict_from_hf(config, hf_state, expected_shapes(config), _IGNORED)
    if config.family in hf_seq2seq.FAMILIES:
        return hf_seq2seq.state_dict_from_hf(config, hf_state, expected_shapes(config))
    prefix = _HF_PREFIX[config.family]
    hf_state = _split_fused(config, hf_state)
    hf = {(k if k.startswith((prefix, "cls.", "lm_head.")) else prefix + k): k for k in hf_state}
    shapes = expected_shapes(config)
    optional = OPTIONAL_PREFIXES.get(config.family, ())
    out: dict[str, torch.Tensor] = {}
    for hf_name, name, transposed in _expand(config):
        if hf_name not in hf:
            if name.startswith(optional):
                continue
            raise CorelmError(f"checkpoint is missing tensor {hf_name!r} for a {config.family} model")
        tensor = hf_state[hf.pop(hf_name)]
        if transposed:
            tensor = tensor.t().contiguous()
        if tensor.shape != shapes[name]:
            raise CorelmError(f"tensor {hf_name!r} has shape {tuple(tensor.shape)}, expected "
                              f"{tuple(shapes[name])} from config.json")
        out[name] = tensor
    unknown = [k for k in hf if not _IGNORED.search(k) and not (k == "lm_head.weight" and config.tie_embeddings)]
    if unknown:
        raise CorelmError(f"checkpoint has {len(unknown)} tensor(s) corelm does not know, e.g. {unknown[:3]}")
    return out


def state_dict_to_hf(config: ModelConfig, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`state_dict_from_hf`: HF names, Conv1D layout, contiguous tensors."""
    if config.family == "moe":  # one tensor per expert, as transformers saves them
        from corelm.io.hf_moe import state_dict_to_hf as moe_state_dict_to_hf

        return moe_state_dict_to_hf(config, state, expected_shapes(config))
    if config.family in hf_seq2seq.FAMILIES:
        return hf_seq2seq.state_dict_to_hf(config, state, expected_shapes(config))
    state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}  # a torch.compile wrapper's keys
    shapes = expected_shapes(config)
    out = {}
    for hf_name, name, transposed in _expand(config):
        if name not in state:
            raise CorelmError(f"model state is missing {name!r}")
        tensor = state[name]
        if tensor.shape != shapes[name]:
            raise CorelmError(f"{name!r} has shape {tuple(tensor.shape)}, expected {tuple(shapes[name])}")
        out[hf_name] = (tensor.t() if transposed else tensor).contiguous()
    return _fuse(config, out)


# --------------------------------------------------------------------------------------------
# reading weight files
# --------------------------------------------------------------------------------------------

def _read_safetensors(path: Path, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    _check_safetensors_size(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in names if names is not None else f.keys():
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorelmError(f"cannot read {path}: corrupt or truncated safetensors file ({exc})") from None


def _check_safetensors_size(path: Path) -> None:
    """Compare the header's data offsets with the file size: a truncated download fails here, clearly."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length out of range")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise CorelmError(f"cannot read {path}: not a valid safetensors file ({exc})") from None
    if 8 + n + end > size:
        raise CorelmError(f"cannot read {path}: truncated safetensors file ({size} bytes, header needs {8 + n + end})")


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    # weights_only=True: never unpickle arbitrary objects from a checkpoint.
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as exc:  # noqa: BLE001 - any unpickling error means a bad or unsafe file
        raise CorelmError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CorelmError(f"{path} does not hold a state dict")
    return state


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory or file, memory-mapped where the format allows.

    Looks for, in order: ``model.safetensors``, ``model.safetensors.index.json`` (shards),
    ``pytorch_model.bin``, ``pytorch_model.bin.index.json``; or reads ``path`` itself if it is a file.
    """
    path = Path(path)
    if path.is_file():
        return dict(_read_safetensors(path)) if path.suffix == ".safetensors" else _read_torch(path)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return read_weights(path / name)
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / name
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise CorelmError(f"cannot read shard index {index}: {exc}") from None
            by_file: dict[str, list[str]] = {}
            for tensor, file in weight_map.items():
                by_file.setdefault(file, []).append(tensor)
            state: dict[str, torch.Tensor] = {}
            for file, names in by_file.items():
                shard = path / file
                if not shard.is_file():
                    raise CorelmError(f"shard {shard} listed in {index.name} is missing")
                if shard.suffix == ".safetensors":
                    state.update(_read_safetensors(shard, names))
                else:
                    state.update({k: v for k, v in _read_torch(shard).items() if k in set(names)})
            return state
    raise CorelmError(f"no weights in {path}: expected model.safetensors, a shard index or pytorch_model.bin")


def load_hf_dir(path: str | Path, dtype: torch.dtype | None = None,
                device: str | torch.device = "cpu") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read an HF-layout directory into a corelm config and a corelm-named state dict.

    Args:
        path: directory with ``config.json`` and weights.
        dtype: cast floating tensors to this dtype; None keeps the checkpoint's dtype (no copy).
        device: where the tensors go.
    Returns:
        ``(config, state_dict)``; load with ``model.load_state_dict(state_dict, assign=True)``.
    """
    path = Path(path)
    if not path.exists():
        raise CorelmError(f"no such file or directory: {path}")
    if not path.is_dir():
        raise CorelmError(f"{path} is not a directory (expected config.json + model.safetensors)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CorelmError(f"{path} has no config.json")
    try:
        hf_config = json.loads(config_file.read_text())
    except ValueError as exc:
        raise CorelmError(f"cannot parse {config_file}: {exc}") from None
    config = config_from_hf(hf_config)
    state = state_dict_from_hf(config, read_weights(path))
    for name, tensor in state.items():
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        state[name] = tensor.to(device)
    return config, state


def model_from_state_dict(config: ModelConfig, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Build the model on ``meta`` and adopt ``state``'s tensors (no copy); missing optional heads
    (BERT's pooler/MLM/NSP in a bare encoder checkpoint) are initialised freshly."""
    from corelm.models import build_model

    with torch.device("meta"):
        model = build_model(config)
    result = model.load_state_dict(state, strict=False, assign=True)
    optional = OPTIONAL_PREFIXES.get(config.family, ())
    bad = [k for k in result.missing_keys if not k.startswith(optional)]
    if bad or result.unexpected_keys:
        raise CorelmError(f"state dict does not fit the {config.family} model: missing {bad[:3]}, "
                          f"unexpected {result.unexpected_keys[:3]}")
    if result.missing_keys:
        ref = next(iter(state.values()))
        _materialize_missing(model, result.missing_keys, ref.dtype, ref.device)
    return model.eval()


def _materialize_missing(model: nn.Module, names: list[str], dtype: torch.dtype, device: torch.device) -> None:
    """Give freshly initialised tensors to the parameters a checkpoint did not carry."""
    for name in names:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        old = getattr(module, attr)
        if attr == "bias" or old.dim() == 1 and "LayerNorm" not in module_name:
            new = torch.zeros(old.shape, dtype=dtype, device=device)
        elif "LayerNorm" in module_name:
            new = torch.ones(old.shape, dtype=dtype, device=device)
        else:
            new = torch.empty(old.shape, dtype=dtype, device=device).normal_(0.0, 0.02)
        setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))


def load_hf_model(path: str | Path, dtype: torch.dtype | None = None,
                  device: str | torch.device = "cpu") -> tuple[ModelConfig, nn.Module]:
    """:func:`load_hf_dir` then :func:`model_from_state_dict`: a ready model in eval mode."""
    config, state = load_hf_dir(path, dtype, device)
    return config, model_from_state_dict(config, state)


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------

def _replace_atomically(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)  # atomic on POSIX: readers see the old file or the whole new one


def save_hf_dir(model: nn.Module, config: ModelConfig, out_dir: str | Path, tokenizer: Any = None) -> Path:
    """Write an HF-layout checkpoint that ``transformers`` and :func:`load_hf_dir` both read.

    ``model.safetensors`` is written first and ``config.json`` last, each under a temporary name
    renamed into place, so a directory with a ``config.json`` is always complete.

    Args:
        model: a corelm model (a ``torch.compile`` wrapper is unwrapped).
        config: its config (saved as HF fields plus ``"corelm": {fields}``).
        out_dir: created if needed.
        tokenizer: a corelm ``Tokenizer`` (``.save(dir)``) or a ``tokenizers.Tokenizer``; optional.
    Returns:
        ``out_dir`` as a Path.
    """
    from corelm.io.atomic import save_safetensors

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "_orig_mod", model)
    state = state_dict_to_hf(config, model.state_dict())
    state = {k: v.detach().to("cpu") for k, v in state.items()}
    tmp = out / f".model.safetensors.tmp{os.getpid()}"
    try:
        save_safetensors(state, str(tmp), metadata={"format": "pt"})
        _replace_atomically(tmp, out / "model.safetensors")
    finally:
        tmp.unlink(missing_ok=True)
    if tokenizer is not None:
        try:
            from tokenizers import Tokenizer as RawTokenizer
        except ImportError:  # pragma: no cover - tokenizers is a dependency
            RawTokenizer = ()
        if isinstance(tokenizer, RawTokenizer):
            tmp_tok = out / f".tokenizer.json.tmp{os.getpid()}"
            tokenizer.save(str(tmp_tok))
            _replace_atomically(tmp_tok, out / "tokenizer.json")
        else:
            tokenizer.save(out)
    hf_config = config_to_hf(config)
    dtypes = {v.dtype for v in state.values()}
    hf_config["torch_dtype"] = str(dtypes.pop() if len(dtypes) == 1 else torch.float32).removeprefix("torch.")
    hf_config["corelm"] = config.to_dict()
    tmp_cfg = out / f".config.json.tmp{os.getpid()}"
    tmp_cfg.write_text(json.dumps(hf_config, indent=2, default=str) + "\n")
    _replace_atomically(tmp_cfg, out / "config.json")
    return out

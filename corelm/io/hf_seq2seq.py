"""Encoder-decoder checkpoints in Hugging Face's layout: BART, mBART and MarianMT (family ``bart``), T5, T5 v1.1
and mT5 (family ``t5``).

The three model types share one module tree (:mod:`corelm.models.bart`); their ``config.json`` says
which variant it is only through the model type, so the variant's fixed choices (position kind,
embedding LayerNorm, pre- or post-LN) are set here from ``model_type``. Every tensor's name is listed
in :func:`hf_table` and its shape checked against the model the config describes. The model itself
knows nothing of checkpoints.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from corelm.config import ModelConfig
from corelm.errors import CorelmError

BART_TYPES = ("bart", "mbart", "marian")
T5_TYPES = ("t5", "mt5")
MODEL_TYPES = BART_TYPES + T5_TYPES
FAMILIES = ("bart", "t5")
ARCHITECTURES = {"bart": "BartForConditionalGeneration", "mbart": "MBartForConditionalGeneration",
                 "marian": "MarianMTModel", "t5": "T5ForConditionalGeneration",
                 "mt5": "MT5ForConditionalGeneration"}
# What each model type fixes that its config.json does not say: (positions, layernorm_embedding, normalize_before).
_VARIANT = {"bart": ("learned", True, False), "mbart": ("learned", True, True), "marian": ("sinusoidal", False, False)}
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
                "swish": "silu", "silu": "silu"}
# (ModelConfig field, HF field); all required.
_FIELDS = [("vocab_size", "vocab_size"), ("d_model", "d_model"), ("n_layer", "decoder_layers"),
           ("n_encoder_layer", "encoder_layers"), ("n_head", "encoder_attention_heads"),
           ("d_ff", "encoder_ffn_dim"), ("max_seq_len", "max_position_embeddings"),
           ("decoder_start_token_id", "decoder_start_token_id")]
# Decoder fields corelm assumes equal to the encoder's (true of every published BART/Marian).
_SAME = [("decoder_attention_heads", "encoder_attention_heads"), ("decoder_ffn_dim", "encoder_ffn_dim")]
_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "forced_eos_token_id", "forced_bos_token_id")


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """A ``bart``-family :class:`ModelConfig` from a BART/mBART/Marian ``config.json`` dict.

    Raises:
        CorelmError: a required field is missing, or the checkpoint uses something corelm does not build
            (different encoder/decoder widths, Marian's separate target vocabulary, an unknown activation).
    """
    model_type = hf["model_type"]
    if model_type in T5_TYPES:
        return _t5_config_from_hf(hf)
    kwargs: dict[str, Any] = {"family": "bart", "name": str(hf.get("_name_or_path", "") or "")}
    hf = dict(hf)
    if hf.get("decoder_start_token_id") is None:  # generate() falls back to the BOS id (mBART configs)
        hf["decoder_start_token_id"] = hf.get("bos_token_id")
    for field, hf_name in _FIELDS:
        if hf.get(hf_name) is None:
            raise CorelmError(f"config.json ({model_type}) is missing required field {hf_name!r}")
        kwargs[field] = hf[hf_name]
    for dec, enc in _SAME:
        if hf.get(dec, hf[enc]) != hf[enc]:
            raise CorelmError(f"{model_type} with {dec}={hf[dec]} != {enc}={hf[enc]} is not supported by corelm")
    if model_type == "marian":
        if not hf.get("share_encoder_decoder_embeddings", True):
            raise CorelmError("Marian models with separate source/target embeddings are not supported by corelm")
        if hf.get("decoder_vocab_size") not in (None, hf["vocab_size"]):
            raise CorelmError("Marian models with a separate decoder vocabulary are not supported by corelm")
    act = hf.get("activation_function", "gelu")
    if act not in _ACTIVATIONS:
        raise CorelmError(f"unsupported activation {act!r} in config.json")
    positions, layernorm_embedding, normalize_before = _VARIANT[model_type]
    kwargs.update(activation=_ACTIVATIONS[act], positions=positions, layernorm_embedding=layernorm_embedding,
                  normalize_before=normalize_before, scale_embedding=bool(hf.get("scale_embedding", False)),
                  tie_embeddings=bool(hf.get("tie_word_embeddings", True)), pad_token_id=hf.get("pad_token_id"),
                  bias=True, norm_eps=1e-5)  # nn.LayerNorm's default: transformers passes no eps
    extra = {k: hf[k] for k in _TOKEN_FIELDS if hf.get(k) is not None}
    extra["model_type"] = model_type
    return ModelConfig(**kwargs, extra=extra)


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` dict of a ``bart`` or ``t5`` config (the inverse of :func:`config_from_hf`)."""
    if config.family == "t5":
        return _t5_config_to_hf(config)
    variant = (config.positions, config.layernorm_embedding, config.normalize_before)
    model_type = config.extra.get("model_type") or next((t for t, v in _VARIANT.items() if v == variant), None)
    if model_type not in _VARIANT or _VARIANT[model_type] != variant:
        raise CorelmError("this bart config matches none of BART, mBART, Marian (positions, layernorm_embedding, "
                          "normalize_before); transformers could not load it")
    inverse = {v: k for k, v in _ACTIVATIONS.items() if k not in ("gelu_new", "swish")}
    out: dict[str, Any] = {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
                           "is_encoder_decoder": True}
    for field, hf_name in _FIELDS:
        out[hf_name] = getattr(config, field)
    out.update(decoder_attention_heads=config.n_head, decoder_ffn_dim=config.d_ff,
               activation_function=inverse[config.activation], scale_embedding=config.scale_embedding,
               tie_word_embeddings=config.tie_embeddings, pad_token_id=config.pad_token_id)
    if model_type == "marian":
        out.update(share_encoder_decoder_embeddings=True, decoder_vocab_size=config.vocab_size)
    out.update({k: config.extra[k] for k in _TOKEN_FIELDS if k in config.extra})
    return out


def hf_table(config: ModelConfig) -> list[str]:
    """Every tensor name of a ``bart`` or ``t5`` checkpoint (HF and corelm names are the same)."""
    if config.family == "t5":
        return _t5_table(config)
    def norm(name: str) -> list[str]:
        return [f"{name}.weight", f"{name}.bias"]

    def attn(name: str) -> list[str]:
        projections = [f"{name}.{p}_proj.{w}" for p in ("q", "k", "v", "out") for w in ("weight", "bias")]
        return projections + norm(f"{name}_layer_norm")

    mlp = [*norm("fc1"), *norm("fc2"), *norm("final_layer_norm")]
    rows = ["model.shared.weight", "final_logits_bias"] + ([] if config.tie_embeddings else ["lm_head.weight"])
    for stack, n_layer, layer in (("encoder", config.n_encoder_layer, attn("self_attn") + mlp),
                                  ("decoder", config.n_layer, attn("self_attn") + attn("encoder_attn") + mlp)):
        p = f"model.{stack}."
        if config.positions == "learned":
            rows.append(p + "embed_positions.weight")
        if config.layernorm_embedding:
            rows += norm(p + "layernorm_embedding")
        if config.normalize_before:
            rows += norm(p + "layer_norm")
        rows += [f"{p}layers.{i}.{name}" for i in range(n_layer) for name in layer]
    return rows


_STACK_EMBEDDINGS = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")


def _ignored(config: ModelConfig) -> re.Pattern[str]:
    """Checkpoint entries with no corelm parameter: the stacks' copies of the shared embedding, a tied
    LM head, Marian's stored sinusoid tables (older saves), fairseq's ``version`` markers, the unused
    relative-bias table some T5 saves carry in the first cross-attention."""
    if config.family == "t5":
        names = [r"(encoder|decoder)\.embed_tokens\.weight",
                 r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight"]
        names += [r"lm_head\.weight"] if config.tie_embeddings else []
        return re.compile(rf"^({'|'.join(names)})$")
    names = [r"model\.(encoder|decoder)\.embed_tokens\.weight", r"\.version"]
    if config.tie_embeddings:
        names.append(r"lm_head\.weight")
    if config.positions == "sinusoidal":
        names.append(r"model\.(encoder|decoder)\.embed_positions\.weight")
    return re.compile(rf"^({'|'.join(names)})$|\.version$")


def state_dict_from_hf(config: ModelConfig, hf_state: Mapping[str, torch.Tensor],
                       shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Check and take a BART/mBART/Marian checkpoint's tensors (``shapes``: the corelm model's).

    Raises:
        CorelmError: a tensor is missing, has the wrong shape, or is not understood.
    """
    # Some saves put the bare model's keys at the top (`BartModel`: "encoder.*"); the LM bias may be absent
    # (transformers lists it in `_keys_to_ignore_on_load_missing` and starts it at zero).
    if config.family == "t5":
        hf = {k: k for k in hf_state}
    else:
        hf = {(k if k.startswith(("model.", "lm_head.", "final_logits_bias")) else "model." + k): k for k in hf_state}
    shared = "shared.weight" if config.family == "t5" else "model.shared.weight"
    out: dict[str, torch.Tensor] = {}
    for name in hf_table(config):
        if name not in hf:
            if name == "final_logits_bias":
                out[name] = torch.zeros(shapes[name], dtype=out["model.shared.weight"].dtype)  # listed first
                continue
            model_type = config.extra.get("model_type", config.family)
            raise CorelmError(f"checkpoint is missing tensor {name!r} for a {model_type} model")
        tensor = hf_state[hf.pop(name)]
        if tensor.shape != shapes[name]:
            raise CorelmError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(shapes[name])} "
                              "from config.json")
        out[name] = tensor
    for name in _STACK_EMBEDDINGS + _T5_STACK_EMBEDDINGS:  # copies of `shared` (transformers >= 5 may untie them)
        if name in hf and not torch.equal(hf_state[hf[name]], out[shared]):
            raise CorelmError(f"checkpoint's {name!r} differs from {shared}: separate encoder/decoder "
                              "embeddings are not supported by corelm")
    ignored = _ignored(config)
    unknown = [k for k in hf if not ignored.search(k)]
    if unknown:
        raise CorelmError(f"checkpoint has {len(unknown)} tensor(s) corelm does not know, e.g. {unknown[:3]}")
    return out


def state_dict_to_hf(config: ModelConfig, state: Mapping[str, torch.Tensor],
                     shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`state_dict_from_hf`: the same names, contiguous tensors, shapes checked."""
    state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}
    out = {}
    for name in hf_table(config):
        if name not in state:
            raise CorelmError(f"model state is missing {name!r}")
        if state[name].shape != shapes[name]:
            raise CorelmError(f"{name!r} has shape {tuple(state[name].shape)}, expected {tuple(shapes[name])}")
        out[name] = state[name].contiguous()
    if config.family == "t5":  # transformers ties the stacks' embeddings to `shared` whatever the head does
        return out
    if not config.tie_embeddings:  # transformers >= 5 then unties the stacks' embeddings too: write their copies
        out.update({name: out["model.shared.weight"].clone() for name in _STACK_EMBEDDINGS})
    return out


# ---- T5 ----------------------------------------------------------------------------------------------

_T5_ACTIVATIONS = {"relu": "relu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                   "gelu_python": "gelu", "silu": "silu", "swish": "silu"}
_T5_STACK_EMBEDDINGS = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# (ModelConfig field, HF field, default or None = required)
_T5_FIELDS = [("vocab_size", "vocab_size", None), ("d_model", "d_model", None), ("head_dim", "d_kv", None),
              ("d_ff", "d_ff", None), ("n_encoder_layer", "num_layers", None), ("n_head", "num_heads", None),
              ("relative_attention_num_buckets", "relative_attention_num_buckets", 32),
              ("relative_attention_max_distance", "relative_attention_max_distance", 128),
              ("norm_eps", "layer_norm_epsilon", 1e-6), ("pad_token_id", "pad_token_id", 0)]


def _t5_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """A ``t5`` config from a T5/mT5 ``config.json``: ``feed_forward_proj`` is ``relu`` (T5) or ``gated-gelu``
    (T5 v1.1, mT5: the gate's GELU is the tanh approximation, ``gelu_new``) or ``[gated-]<activation>``.

    The head: files written by transformers < 5 say ``tie_word_embeddings`` (true: the embedding as head, with
    the decoder output rescaled by ``d_model ** -0.5``); transformers >= 5 adds ``scale_decoder_outputs`` and
    may tie without rescaling (then the checkpoint has no ``lm_head.weight``).
    """
    model_type = hf["model_type"]
    kwargs: dict[str, Any] = {"family": "t5", "name": str(hf.get("_name_or_path", "") or "")}
    for field, hf_name, default in _T5_FIELDS:
        value = hf.get(hf_name, default)
        if value is None:
            raise CorelmError(f"config.json ({model_type}) is missing required field {hf_name!r}")
        kwargs[field] = value
    kwargs["n_layer"] = hf.get("num_decoder_layers") or kwargs["n_encoder_layer"]
    proj = str(hf.get("feed_forward_proj", "relu"))
    gated, _, act = proj.rpartition("-")
    act = "gelu_new" if proj == "gated-gelu" else act  # transformers' special case: v1.1's gate is gelu_new
    if gated not in ("", "gated") or act not in _T5_ACTIVATIONS:
        raise CorelmError(f"unsupported feed_forward_proj {proj!r} in config.json; corelm implements relu, "
                          "gated-gelu and [gated-]<one of " + ", ".join(_T5_ACTIVATIONS) + ">")
    tie = bool(hf.get("tie_word_embeddings", True))
    scale = hf.get("scale_decoder_outputs")
    start = hf.get("decoder_start_token_id")
    kwargs.update(activation=_T5_ACTIVATIONS[act], gated_mlp=gated == "gated",
                  tie_embeddings=tie, scale_decoder_outputs=tie if scale is None else bool(scale), bias=False,
                  decoder_start_token_id=kwargs["pad_token_id"] if start is None else start,  # T5 starts from pad
                  max_seq_len=int(hf.get("n_positions") or 512),  # no position table: the length trained at
                  dropout=float(hf.get("dropout_rate", 0.0)), attn_dropout=float(hf.get("dropout_rate", 0.0)))
    extra = {k: hf[k] for k in _TOKEN_FIELDS if hf.get(k) is not None}
    extra["model_type"] = model_type
    return ModelConfig(**kwargs, extra=extra)


def _t5_config_to_hf(config: ModelConfig) -> dict[str, Any]:
    model_type = config.extra.get("model_type") if config.extra.get("model_type") in T5_TYPES else "t5"
    # "gated-gelu" means the tanh GELU to transformers; the gated erf GELU is spelled with gelu_python
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu_python" if config.gated_mlp else "gelu"}.get(
        config.activation, config.activation)
    proj = "gated-gelu" if config.gated_mlp and act == "gelu_new" else ("gated-" if config.gated_mlp else "") + act
    out: dict[str, Any] = {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
                           "is_encoder_decoder": True, "feed_forward_proj": proj, "num_decoder_layers": config.n_layer,
                           "decoder_start_token_id": config.decoder_start_token_id,
                           "tie_word_embeddings": config.tie_embeddings,
                           "scale_decoder_outputs": config.scale_decoder_outputs, "n_positions": config.max_seq_len,
                           "dropout_rate": config.dropout}
    for field, hf_name, _ in _T5_FIELDS:
        out[hf_name] = getattr(config, field)
    out.update({k: config.extra[k] for k in _TOKEN_FIELDS if k in config.extra})
    return out


def _t5_table(config: ModelConfig) -> list[str]:
    mlp = ["DenseReluDense.wi_0.weight", "DenseReluDense.wi_1.weight"] if config.gated_mlp else \
        ["DenseReluDense.wi.weight"]
    mlp = [*mlp, "DenseReluDense.wo.weight", "layer_norm.weight"]

    def attn(name: str, first: bool) -> list[str]:
        return [f"{name}.{p}.weight" for p in "qkvo"] + ([f"{name}.relative_attention_bias.weight"] if first else [])

    rows = ["shared.weight"] + ([] if config.tie_embeddings else ["lm_head.weight"])
    for stack, n_layer in (("encoder", config.n_encoder_layer), ("decoder", config.n_layer)):
        for i in range(n_layer):
            p = f"{stack}.block.{i}.layer."
            layers = [attn("SelfAttention", i == 0) + ["layer_norm.weight"]]
            if stack == "decoder":
                layers.append(attn("EncDecAttention", False) + ["layer_norm.weight"])
            layers.append(mlp)
            rows += [f"{p}{j}.{name}" for j, names in enumerate(layers) for name in names]
        rows.append(f"{stack}.final_layer_norm.weight")
    return rows

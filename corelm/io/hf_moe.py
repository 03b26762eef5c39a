"""Mixture-of-experts checkpoints in Hugging Face's layout (Mixtral, Qwen2-MoE, Qwen3-MoE).

transformers 5 holds each layer's experts fused (``mlp.experts.gate_up_proj (E, 2F, d)``,
``mlp.experts.down_proj (E, d, F)``) but saves one tensor per expert; the importer stacks those (or
takes fused tensors as they are) and checks every shape, and the exporter writes per-expert tensors
again. The model itself (:mod:`corelm.models.moe`) knows nothing of checkpoints.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from corelm.config import ModelConfig
from corelm.errors import CorelmError

# Per-expert checkpoint names of the fused tensors: (gate, up, down) under `{layer}.{block}.experts.{e}.`
_EXPERT_NAMES = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
                 "qwen": ("mlp", ("gate_proj", "up_proj", "down_proj"))}


def hf_model_type(config: ModelConfig) -> str:
    """``mixtral``, ``qwen2_moe`` or ``qwen3_moe``: the checkpoint's, else the one whose features the config has."""
    return config.extra.get("model_type") or ("qwen2_moe" if config.shared_expert_d_ff else
                                              "qwen3_moe" if config.qk_norm else "mixtral")


def hf_table(config: ModelConfig) -> list[tuple[str, str]]:
    """(HF name, corelm name) of every tensor, fused-expert layout (transformers 5 module names)."""
    rows = [("model.embed_tokens.weight", "model.embed_tokens.weight"), ("model.norm.weight", "model.norm.weight")]
    if not config.tie_embeddings:
        rows.append(("lm_head.weight", "lm_head.weight"))
    attn = ["q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"]
    if config.qkv_bias and not config.bias:
        attn += ["q_proj.bias", "k_proj.bias", "v_proj.bias"]
    if config.qk_norm:
        attn += ["q_norm.weight", "k_norm.weight"]
    for i in range(config.n_layer):
        p = f"model.layers.{i}."
        names = [f"self_attn.{a}" for a in attn] + ["input_layernorm.weight", "post_attention_layernorm.weight"]
        if i in (config.dense_layers or ()):
            names += [f"mlp.{m}_proj.weight" for m in ("gate", "up", "down")]
        else:
            names += ["mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
            if config.shared_expert_d_ff:
                names += [f"mlp.shared_expert.{m}_proj.weight" for m in ("gate", "up", "down")]
                names += ["mlp.shared_expert_gate.weight"]
        rows += [(p + n, p + n) for n in names]
    return rows


def _fuse_experts(config: ModelConfig, hf: dict[str, torch.Tensor]) -> None:
    """Replace a checkpoint's per-expert tensors by the fused ``experts.gate_up_proj``/``down_proj``
    (in place); Mixtral's ``block_sparse_moe.gate`` becomes ``mlp.gate``."""
    block, (g, u, d) = _EXPERT_NAMES["mixtral" if hf_model_type(config) == "mixtral" else "qwen"]
    for i in range(config.n_layer):
        p = f"model.layers.{i}."
        if p + f"{block}.gate.weight" in hf and block != "mlp":
            hf[p + "mlp.gate.weight"] = hf.pop(p + f"{block}.gate.weight")
        first = p + f"{block}.experts.0.{g}.weight"
        if first not in hf:
            continue  # fused already, or a dense layer: the table says which
        gates, ups, downs = [], [], []
        for e in range(config.n_experts):
            names = [p + f"{block}.experts.{e}.{n}.weight" for n in (g, u, d)]
            missing = [n for n in names if n not in hf]
            if missing:
                raise CorelmError(f"checkpoint is missing tensor {missing[0]!r} for a {config.n_experts}-expert model")
            for out, n in zip((gates, ups, downs), names):
                out.append(hf.pop(n))
        try:
            hf[p + "mlp.experts.gate_up_proj"] = torch.cat([torch.stack(gates), torch.stack(ups)], dim=1)  # (E, 2F, d)
            hf[p + "mlp.experts.down_proj"] = torch.stack(downs)  # (E, d, F)
        except RuntimeError as exc:
            raise CorelmError(f"the experts of layer {i} have mismatched shapes: {exc}") from None


def state_dict_from_hf(config: ModelConfig, hf_state: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size],
                       ignored: re.Pattern) -> dict[str, torch.Tensor]:
    """Map a Mixtral/Qwen2-MoE/Qwen3-MoE checkpoint to corelm names, fusing per-expert tensors.

    Raises:
        CorelmError: a tensor is missing, has the wrong shape, or is not understood.
    """
    hf = {(k if k.startswith(("model.", "lm_head.")) else "model." + k): v for k, v in hf_state.items()}
    _fuse_experts(config, hf)
    out: dict[str, torch.Tensor] = {}
    for hf_name, name in hf_table(config):
        if hf_name not in hf:
            raise CorelmError(f"checkpoint is missing tensor {hf_name!r} for a {hf_model_type(config)} model")
        tensor = hf.pop(hf_name)
        if tensor.shape != shapes[name]:
            raise CorelmError(f"tensor {hf_name!r} has shape {tuple(tensor.shape)}, expected "
                              f"{tuple(shapes[name])} from config.json")
        out[name] = tensor
    unknown = [k for k in hf if not ignored.search(k) and not (k == "lm_head.weight" and config.tie_embeddings)]
    if unknown:
        raise CorelmError(f"checkpoint has {len(unknown)} tensor(s) corelm does not know, e.g. {unknown[:3]}")
    return out


def state_dict_to_hf(config: ModelConfig, state: Mapping[str, torch.Tensor],
                     shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`state_dict_from_hf`, one tensor per expert as transformers saves them."""
    state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}  # a torch.compile wrapper's keys
    block, (g, u, d) = _EXPERT_NAMES["mixtral" if hf_model_type(config) == "mixtral" else "qwen"]
    out: dict[str, torch.Tensor] = {}
    for hf_name, name in hf_table(config):
        if name not in state:
            raise CorelmError(f"model state is missing {name!r}")
        tensor = state[name]
        if tensor.shape != shapes[name]:
            raise CorelmError(f"{name!r} has shape {tuple(tensor.shape)}, expected {tuple(shapes[name])}")
        p, _, rest = hf_name.partition(".mlp.")
        if rest == "gate.weight":
            out[f"{p}.{block}.gate.weight"] = tensor.contiguous()
        elif rest == "experts.gate_up_proj":
            gate, up = tensor.chunk(2, dim=1)  # (E, F, d) each
            for e in range(config.n_experts):
                out[f"{p}.{block}.experts.{e}.{g}.weight"] = gate[e].contiguous()
                out[f"{p}.{block}.experts.{e}.{u}.weight"] = up[e].contiguous()
        elif rest == "experts.down_proj":
            for e in range(config.n_experts):
                out[f"{p}.{block}.experts.{e}.{d}.weight"] = tensor[e].contiguous()
        else:
            out[hf_name] = tensor.contiguous()
    return out

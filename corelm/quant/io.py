"""Quantized state dicts and checkpoint directories.

A quantized checkpoint is a directory: ``config.json`` (the HF fields, ``"corelm"``: the corelm
config, and ``"corelm_quantization"``: the spec :func:`~corelm.quant.transform.quantize_model`
recorded, which marks the directory as quantized), ``model.safetensors`` and the tokenizer. The
safetensors file holds what the layers' state dicts hold: int8 weights and scales, int4 layers as
portable nibbles, scales and zeros (never the packed bytes, whose layout depends on the running
CPU's instruction set or on the kernels), and float norms. A tied
:class:`~corelm.quant.layers.Int8Embedding` has no entries: it reads the head's matrix.
Loading builds the model on ``meta``, gives it the quantized structure and assigns the tensors; int4
layers pack for this machine as they load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from corelm.errors import CorelmError
from corelm.quant.transform import quantized_structure

QUANT_KEY = "corelm_quantization"  # config.json key that marks a quantized checkpoint


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict to save: int4 layers as portable nibbles, scales and zeros; a tied
    :class:`~corelm.quant.layers.Int8Embedding` has no entries (it reads the head's matrix)."""
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def load_quantized_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load :func:`quantized_state_dict` output into a model prepared by
    :func:`~corelm.quant.transform.quantized_structure` (works on ``meta`` models: tensors are
    assigned, int4 layers pack for this machine; a tied embedding reads the head it was tied to there)."""
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise CorelmError(f"quantized checkpoint does not match the model: missing {list(missing)[:3]}, "
                          f"unexpected {list(unexpected)[:3]}")
    return model


def save_quantized_dir(model: nn.Module, config: object, out_dir: str | Path, tokenizer: object = None) -> Path:
    """Write a quantized model as ``config.json`` (HF fields + ``"corelm"`` + ``"corelm_quantization"``),
    ``model.safetensors`` (int8 weights, int4 nibbles, scales, zeros, float norms) and the tokenizer.

    Files are written under temporary names and renamed, ``config.json`` last, so a directory with
    a ``config.json`` is always complete.
    """
    from corelm.io.atomic import save_safetensors
    from corelm.io.hf import config_to_hf

    spec = getattr(model, "corelm_quantization", None)
    if not spec:
        raise CorelmError("the model is not quantized")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in quantized_state_dict(model).items()}
    tmp = out / f".model.safetensors.tmp{os.getpid()}"
    try:
        save_safetensors(state, str(tmp), metadata={"format": "pt", "corelm_quantization": json.dumps(spec)})
        os.replace(tmp, out / "model.safetensors")
    finally:
        tmp.unlink(missing_ok=True)
    if tokenizer is not None:
        tokenizer.save(out)
    hf = config_to_hf(config)
    hf["corelm"] = config.to_dict()
    hf[QUANT_KEY] = spec
    tmp_cfg = out / f".config.json.tmp{os.getpid()}"
    tmp_cfg.write_text(json.dumps(hf, indent=2, default=str) + "\n")
    os.replace(tmp_cfg, out / "config.json")
    return out


def is_quantized_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory :func:`save_quantized_dir` wrote (its ``config.json`` has
    the ``corelm_quantization`` key)."""
    cfg = Path(path) / "config.json"
    try:
        return Path(path).is_dir() and cfg.is_file() and QUANT_KEY in json.loads(cfg.read_text())
    except ValueError:
        return False


def load_quantized_dir(path: str | Path, device: str | torch.device = "cpu") -> tuple[object, nn.Module]:
    """Read a directory written by :func:`save_quantized_dir`: ``(config, model)``, int4 packed
    for this machine."""
    from safetensors.torch import load_file

    from corelm.config import ModelConfig
    from corelm.models import build_model

    path = Path(path)
    if not is_quantized_dir(path):
        raise CorelmError(f"{path} is not a quantized corelm checkpoint (config.json lacks {QUANT_KEY!r})")
    hf = json.loads((path / "config.json").read_text())
    config = ModelConfig.from_dict(hf["corelm"])
    with torch.device("meta"):
        model = build_model(config)
    quantized_structure(model, hf[QUANT_KEY])
    state = load_file(str(path / "model.safetensors"), device=str(device))
    load_quantized_state_dict(model, state)
    return config, model.eval()

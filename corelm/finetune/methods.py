"""What a fine-tuning run is made of, shared by training (:mod:`corelm.finetune.run`) and loading
(:mod:`corelm.loading`): the task model over a backbone, the method applied to it, the run's files.

This module imports no loader and no trainer, so both can import it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from corelm.errors import CorelmError
from corelm.finetune.adalora import apply_adalora
from corelm.finetune.adapters import apply_adapters
from corelm.finetune.heads import SequenceClassifier, TokenClassifier
from corelm.finetune.lora import apply_lora, freeze, resolve_targets

TASKS = ("classify", "ner", "sft", "regression", "translate", "summarize")
METHODS = ("full", "head", "lora", "adalora", "adapter")
TASK_FILE = "corelm_task.json"
HEAD_FILE = "head.safetensors"
ADAPTER_FILE = "adapter.safetensors"


def pad_token_id(tokenizer: Any) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS, else 0."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else (getattr(tokenizer, "eos_token_id", None) or 0)


def build_task_model(task: str, backbone: nn.Module, config: Any, labels: list[str],
                     pooling: str | None) -> nn.Module:
    """The backbone under the task's head (``sft``: the LM itself)."""
    if task in ("classify", "regression"):  # regression: one output unit, trained with MSE
        pooling = pooling or ("mean" if config.is_encoder else "last")
        return SequenceClassifier(backbone, config.d_model, labels, pooling, config.is_encoder)
    if task == "ner":
        return TokenClassifier(backbone, config.d_model, labels, config.is_encoder)
    return backbone


def backbone_of(model: nn.Module) -> nn.Module:
    return getattr(model, "backbone", model)


def apply_method(model: nn.Module, config: Any, method: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Apply ``method`` to the backbone of ``model`` (the head always trains); returns what to save."""
    backbone = backbone_of(model)
    if method == "full":
        return {}
    if method == "head":
        if backbone is model:
            raise CorelmError("--method head needs a task with a head (classify or ner), not sft")
        freeze(backbone)
        return {}
    targets = settings.get("targets")
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    targets = resolve_targets(config.family, targets or None)  # attention (default) / mlp: the family's names
    if method == "lora":
        names = apply_lora(backbone, targets, settings["rank"], settings["alpha"], settings.get("dropout", 0.0))
        return {"modules": names, "rank": settings["rank"], "alpha": settings["alpha"],
                "dropout": settings.get("dropout", 0.0)}
    if method == "adalora":
        names = apply_adalora(backbone, targets, settings["init_rank"], settings["alpha"])
        return {"modules": names, "init_rank": settings["init_rank"], "target_rank": settings["target_rank"],
                "alpha": settings["alpha"]}
    if method == "adapter":
        names = apply_adapters(backbone, config.family, settings["size"])
        return {"modules": names, "size": settings["size"]}
    raise CorelmError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")


def load_into(module: nn.Module, tensors: dict[str, torch.Tensor], filename: str) -> None:
    own = dict(module.named_parameters())
    missing = [k for k in tensors if k not in own]
    if missing:
        raise CorelmError(f"{filename} does not match the model: unexpected tensor {missing[0]!r}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if own[name].shape != tensor.shape:
                raise CorelmError(f"{filename}: {name} has shape {tuple(tensor.shape)}, the model expects "
                                  f"{tuple(own[name].shape)}")
            own[name].copy_(tensor)

"""Transformer families written from first principles: one self-contained file each."""

from __future__ import annotations

import torch
from torch import nn

from corelm.config import ModelConfig


def build_model(config: ModelConfig) -> nn.Module:
    """Build the model of ``config.family`` (on the current default device, e.g. inside ``torch.device("meta")``).

    Returns:
        :class:`~corelm.models.gpt2.GPT2`, :class:`~corelm.models.llama.Llama`,
        :class:`~corelm.models.gemma.Gemma`, :class:`~corelm.models.moe.MoE`,
        :class:`~corelm.models.bert.Bert`, or the encoder-decoders :class:`~corelm.models.bart.Bart` and
        :class:`~corelm.models.t5.T5`.
    """
    if config.family == "gpt2":
        from corelm.models.gpt2 import GPT2

        return GPT2(config)
    if config.family == "llama":
        from corelm.models.llama import Llama

        return Llama(config)
    if config.family == "olmo2":
        from corelm.models.olmo2 import Olmo2

        return Olmo2(config)
    if config.family == "gemma":
        from corelm.models.gemma import Gemma

        return Gemma(config)
    if config.family == "moe":
        from corelm.models.moe import MoE

        return MoE(config)
    if config.family == "bart":
        from corelm.models.bart import Bart

        return Bart(config)
    if config.family == "t5":
        from corelm.models.t5 import T5

        return T5(config)
    from corelm.models.bert import Bert

    return Bert(config)


__all__ = ["build_model"]


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token logits of final-norm hidden states, as the model's ``forward`` makes them: the LM head,
    then Gemma 2's final soft-cap where the model has one (``cap * tanh(x / cap)``). For code that runs
    the head on selected rows only (losses, perplexity, the decode step), so none of it skips the cap."""
    logits = model.lm_head(hidden)
    cap = getattr(model, "final_softcap", None)
    return torch.tanh(logits / cap) * cap if cap else logits

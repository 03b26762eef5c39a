"""Losses and metrics that run the LM head on selected rows score what the forward's logits say.

Gemma 2 soft-caps its final logits (``cap * tanh(x / cap)``); perplexity and the SFT loss compute
logits from hidden states themselves (to skip the (B, T, vocab) tensor), and used to skip the cap.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from corelm.config import ModelConfig
from corelm.eval.perplexity import perplexity
from corelm.finetune.tasks import sft_loss
from corelm.models import build_model, head_logits


@pytest.fixture(scope="module")
def gemma2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(family="gemma", vocab_size=64, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=64,
                         max_seq_len=64, sandwich_norm=True, attn_softcap=5.0, final_softcap=0.5,
                         activation="gelu_tanh")
    model = build_model(config).eval()
    with torch.no_grad():  # logits well past the cap, so a skipped cap cannot go unnoticed
        model.lm_head.weight.mul_(40)
    return model


def test_head_logits_are_the_forwards(gemma2):
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = gemma2(ids)
        torch.testing.assert_close(head_logits(gemma2, gemma2.hidden_states(ids)), logits)
    assert logits.abs().max() <= 0.5 and gemma2.lm_head(gemma2.hidden_states(ids)).abs().max() > 1.0


def test_perplexity_and_sft_loss_use_the_capped_logits(gemma2):
    ids = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = F.cross_entropy(gemma2(ids)[0, :-1], ids[0, 1:])
        got = perplexity(gemma2, ids[0], window=20)
        assert got["tokens"] == 19
        assert math.isclose(got["nll"], reference.item(), rel_tol=1e-5)
        labels = ids.clone()
        labels[:, :5] = -100  # the prompt part is not scored
        loss, stats = sft_loss(gemma2, {"input_ids": ids, "labels": labels})
        expected = F.cross_entropy(gemma2(ids)[0, :-1][labels[0, 1:] != -100], labels[0, 1:][labels[0, 1:] != -100])
        torch.testing.assert_close(loss, expected)
        assert stats["n_tokens"] == 15

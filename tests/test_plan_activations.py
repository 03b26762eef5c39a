"""The activation formula against what corelm's own models save for backward, tensor by tensor."""

from __future__ import annotations

import pytest
import torch

from corelm.config import ModelConfig
from corelm.plan import bench as B
from corelm.plan import formulas as F


@pytest.mark.parametrize("family,extra", [("gpt2", {}), ("llama", {"n_kv_head": 2, "d_ff": 192}),
                                          ("llama", {"n_kv_head": 4, "d_ff": 192})])
def test_saved_activations_per_layer_match_the_formula(family, extra):
    """One more block must add exactly the formula's bytes (fp32): the difference between a 2- and a
    1-layer model cancels the embedding, the final norm and the loss head."""
    from corelm.models import build_model

    torch.manual_seed(0)
    B_, T = 2, 64
    saved = []
    for n_layer in (1, 2):
        cfg = ModelConfig(family=family, vocab_size=128, n_layer=n_layer, n_head=4, d_model=64, max_seq_len=64,
                          **extra)
        ids = torch.randint(0, 128, (B_, T))
        saved.append(B.saved_activation_bytes(build_model(cfg), ids))
    per_layer = saved[1] - saved[0]
    predicted = F.activation_bytes_per_layer(cfg, T, B_, act_bytes=4, **B.corelm_fusions(cfg))
    # Tiny extras the formula leaves out: LayerNorm's mean/rstd, RMSNorm's rstd, SDPA's log-sum-exp (B·T floats each).
    assert per_layer == pytest.approx(predicted, rel=0.03)
    # ... and the unfused-attention count is what the reference (non-SDPA) path would add: the s×s scores.
    unfused = F.activation_bytes_per_layer(cfg, T, B_, act_bytes=4, fused_attention=False, **{
        k: v for k, v in B.corelm_fusions(cfg).items() if k != "fused_attention"})
    assert unfused - predicted == cfg.n_head * T * T * B_ * 4


def test_loss_head_saves_one_fp32_logit_tensor():
    """Cross-entropy saves its log-softmax output (B·T·V fp32) for backward; the planner counts that plus
    the gradient pair alive at the start of backward (3 tensors)."""
    from corelm.models import build_model

    cfg = ModelConfig(family="gpt2", vocab_size=4096, n_layer=1, n_head=2, d_model=32, max_seq_len=64)
    small = ModelConfig(**{**cfg.to_dict(), "vocab_size": 2048})
    ids = torch.randint(0, 2048, (2, 64))
    big, little = (B.saved_activation_bytes(build_model(c), ids) for c in (cfg, small))
    assert big - little == 2 * 64 * (4096 - 2048) * 4
    assert F.logits_bytes(cfg, 64, 2) == 3 * 2 * 64 * 4096 * 4

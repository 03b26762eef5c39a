"""Objectives: MLM masking statistics (15% / 80-10-10), determinism, NSP pairs, causal LM loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from corelm.config import ModelConfig
from corelm.models import build_model
from corelm.objectives import IGNORE, MaskingSpec, MLMCollate, causal_lm_loss, mask_tokens, mlm_loss

V, MASK, CLS, SEP = 1000, 997, 998, 999


def test_masking_statistics():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 990, (400_000,), generator=g)
    ids[::50] = CLS  # special tokens are never selected
    spec = MaskingSpec(mask_id=MASK, vocab_size=V, special_ids=(CLS, SEP, MASK))
    inputs, labels = mask_tokens(ids, spec, g)
    selected = labels != IGNORE
    normal = ids != CLS
    assert not selected[~normal].any()
    rate = selected.sum() / normal.sum()
    assert abs(rate - 0.15) < 0.003, rate
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(inputs[~selected], ids[~selected])
    n = selected.sum()
    masked = (inputs[selected] == MASK).sum() / n
    kept = (inputs[selected] == ids[selected]).sum() / n
    random = 1 - masked - kept
    assert abs(masked - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(random - 0.1) < 0.01, (masked, kept)


def _windows(n=40, length=30):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 990, (length,), generator=g) for _ in range(n)]


def test_collate_is_per_example_deterministic_and_nsp_pairs():
    data = _windows()
    spec = MaskingSpec(mask_id=MASK, vocab_size=V, special_ids=(CLS, SEP, MASK))
    collate = MLMCollate(data, spec, CLS, SEP, seed=3, nsp=True)
    big = collate([data[i] for i in range(8)], indices=[(0, i) for i in range(8)])
    small = collate([data[i] for i in (4, 5)], indices=[(0, 4), (0, 5)])
    assert torch.equal(big["input_ids"][4:6], small["input_ids"])  # same example, same corruption
    assert big["input_ids"].shape == (8, 30 + 3)
    assert (big["input_ids"][:, 0] == CLS).all() and (big["input_ids"][:, -1] == SEP).all()
    assert torch.equal(big["token_type_ids"][:, :17], torch.zeros(8, 17, dtype=torch.long))
    assert (big["token_type_ids"][:, 17:] == 1).all()
    labels = collate(data, indices=[(0, i) for i in range(len(data))])["nsp_labels"]
    assert 0.25 < labels.float().mean() < 0.75  # roughly half the B sentences are random
    other_epoch = collate([data[4]], indices=[(1, 4)])
    assert not torch.equal(other_epoch["input_ids"][0], big["input_ids"][4])  # fresh masks each epoch


def test_mlm_loss_matches_full_vocab_reference():
    torch.manual_seed(0)
    model = build_model(ModelConfig(family="bert", vocab_size=V, n_layer=2, n_head=2, d_model=32, d_ff=64))
    spec = MaskingSpec(mask_id=MASK, vocab_size=V, special_ids=(CLS, SEP, MASK))
    data = _windows(4)
    batch = MLMCollate(data, spec, CLS, SEP, nsp=True)(data, indices=[(0, i) for i in range(4)])
    loss, metrics = mlm_loss(model, batch)
    hidden = model(batch["input_ids"], token_type_ids=batch["token_type_ids"])
    ref = F.cross_entropy(model.mlm_logits(hidden).flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)
    ref = ref + F.cross_entropy(model.nsp_logits(model.pooled(hidden)), batch["nsp_labels"])
    torch.testing.assert_close(loss, ref)
    assert metrics["n_tokens"] == int((batch["labels"] != IGNORE).sum())


def test_causal_lm_loss_shifts_targets():
    torch.manual_seed(0)
    model = build_model(ModelConfig(family="gpt2", vocab_size=50, n_layer=1, n_head=2, d_model=16, max_seq_len=16))
    window = torch.randint(0, 50, (2, 9))
    loss, info = causal_lm_loss(model, window)
    logits = model(window[:, :-1])
    ref = F.cross_entropy(logits.reshape(-1, 50), window[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ref)
    assert info["n_tokens"] == 16

"""The shared training loop: loss falls, exact resume, non-finite steps, checkpoints, precision."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from corelm.config import ModelConfig
from corelm.errors import CorelmError
from corelm.models import build_model
from corelm.objectives import causal_lm_loss
from corelm.train import ResumableLoader, TrainConfig, train
from corelm.train.checkpoint import checkpoint_dirs, latest_checkpoint, load_checkpoint
from corelm.train.optim import lr_factor, param_groups


def TinyLM(vocab: int = 64) -> nn.Module:
    """The real GPT-2 family at test size (2 blocks, width 32)."""
    return build_model(ModelConfig(family="gpt2", vocab_size=vocab, n_layer=2, n_head=2, d_model=32, max_seq_len=32))


def _data(n: int = 64, T: int = 16, vocab: int = 64) -> torch.Tensor:
    """Learnable sequences: each row counts up from a random start (mod vocab)."""
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    return (start + torch.arange(T + 1)) % vocab


def _run(tmp_path, steps: int, lr: float = 3e-3, **kw) -> tuple:
    torch.manual_seed(0)
    model = TinyLM()
    loader = ResumableLoader(_data(), batch_size=4, seed=3)
    cfg = TrainConfig(max_steps=steps, lr=lr, warmup_steps=2, out=str(tmp_path), progress=False,
                      tensorboard=False, measure_mfu=False, **kw)
    return model, train(model, causal_lm_loss, loader, cfg)


def test_loss_falls(tmp_path):
    _, res = _run(tmp_path, 30, lr=1e-2)
    first, last = res.losses[0][1], res.losses[-1][1]
    assert last < 0.5 * first, (first, last)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 31))
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_sigint_checkpoints_and_resumes_exactly(tmp_path):
    """SIGINT mid-run writes a checkpoint at the step boundary; resuming gives the uninterrupted curve."""
    import os
    import signal

    _, full = _run(tmp_path / "full", 8)

    def interrupting_loss(model, batch, calls=[0]):  # noqa: B006 - a counter shared across calls
        calls[0] += 1
        if calls[0] == 5:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would, during step 5
        return causal_lm_loss(model, batch)

    kw = {"max_steps": 8, "lr": 3e-3, "warmup_steps": 2, "out": str(tmp_path / "b"), "progress": False,
          "tensorboard": False, "measure_mfu": False}
    torch.manual_seed(0)
    cut = train(TinyLM(), interrupting_loss, ResumableLoader(_data(), batch_size=4, seed=3), TrainConfig(**kw))
    assert cut.stopped == "interrupted" and cut.step == 5
    assert [s for s, _ in checkpoint_dirs(tmp_path / "b")] == [5]
    torch.manual_seed(99)
    rest = train(TinyLM(), causal_lm_loss, ResumableLoader(_data(), batch_size=4, seed=3),
                 TrainConfig(resume=str(tmp_path / "b"), **kw))
    assert [v for _, v in cut.losses + rest.losses] == [v for _, v in full.losses]


def test_corrupt_checkpoint_falls_back(tmp_path):
    _run(tmp_path, 6, save_every=3)
    ckpts = checkpoint_dirs(tmp_path)
    assert [s for s, _ in ckpts] == [3, 6]
    weights = ckpts[-1][1] / "trainer_state" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as by a crash mid-write
    with pytest.raises(CorelmError, match="corrupt.*weights.safetensors"):
        load_checkpoint(ckpts[-1][1], model=TinyLM())
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        assert latest_checkpoint(tmp_path) == ckpts[0][1]
    load_checkpoint(ckpts[0][1], model=TinyLM())  # the previous one still loads


def test_non_finite_loss_stops(tmp_path):
    def bad_loss(model, batch):
        loss, info = causal_lm_loss(model, batch)
        return loss * float("nan"), info

    model = TinyLM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(max_steps=10, max_bad_steps=3, progress=False, tensorboard=False, measure_mfu=False)
    with pytest.raises(CorelmError, match="non-finite 3 steps"):
        train(model, bad_loss, ResumableLoader(_data(), batch_size=4), cfg)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_no_decay_on_norms_biases_embeddings():
    groups = param_groups(TinyLM(), 0.1)
    decayed = set(groups[0]["names"])
    assert "transformer.wte.weight" not in decayed and "transformer.wpe.weight" not in decayed
    assert "transformer.ln_f.weight" not in decayed
    assert all(n.endswith("weight") for n in decayed) and "transformer.h.0.mlp.c_fc.weight" in decayed
    n_decay = sum(p.numel() for p in groups[0]["params"])
    n_all = sum(p.numel() for g in groups for p in g["params"])
    assert n_all == sum(p.numel() for p in TinyLM().parameters())  # every parameter exactly once
    assert 0 < n_decay < n_all


def test_schedule_warmup_then_cosine():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, 10, 100) == pytest.approx(0.1)


@pytest.mark.parametrize("policy", ["bf16-mixed", "fp16-mixed", "bf16-true"])
def test_precision_policies_train(tmp_path, policy):
    model, res = _run(tmp_path, 8, precision=policy)
    assert res.losses[-1][1] < res.losses[0][1]
    expected = torch.bfloat16 if policy == "bf16-true" else torch.float32
    assert model.transformer.wte.weight.dtype == expected


def test_grad_accum_matches_big_batch(tmp_path):
    torch.manual_seed(0)
    m1 = TinyLM()
    m2 = TinyLM()
    m2.load_state_dict(m1.state_dict())
    kw = {"max_steps": 3, "lr": 1e-3, "progress": False, "tensorboard": False, "measure_mfu": False}
    r1 = train(m1, causal_lm_loss, ResumableLoader(_data(), batch_size=8, seed=1), TrainConfig(**kw))
    r2 = train(m2, causal_lm_loss, ResumableLoader(_data(), batch_size=4, seed=1), TrainConfig(grad_accum=2, **kw))
    # batch_size=4 x 2 micro-batches draws the same 8 examples per step only when the order matches:
    # the loader's global order is identical, consecutive draws of 4 == one draw of 8.
    torch.testing.assert_close(torch.tensor([v for _, v in r2.losses]), torch.tensor([v for _, v in r1.losses]),
                               rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_changes_memory_not_math(tmp_path):
    kw = {"max_steps": 3, "lr": 3e-3, "progress": False, "tensorboard": False, "measure_mfu": False}
    torch.manual_seed(0)
    plain, ac = TinyLM(), TinyLM()
    ac.load_state_dict(plain.state_dict())
    r1 = train(plain, causal_lm_loss, ResumableLoader(_data(), batch_size=4, seed=1), TrainConfig(**kw))
    r2 = train(ac, causal_lm_loss, ResumableLoader(_data(), batch_size=4, seed=1),
               TrainConfig(activation_checkpointing=True, **kw))
    torch.testing.assert_close(torch.tensor([v for _, v in r2.losses]), torch.tensor([v for _, v in r1.losses]),
                               rtol=1e-6, atol=1e-6)
    assert ac.state_dict().keys() == plain.state_dict().keys()  # wrapped on the instance: names unchanged


def test_one_non_finite_step_is_skipped_and_counted(tmp_path):
    def loss_with_one_nan(model, batch, calls=[0]):  # noqa: B006 - a counter shared across calls
        calls[0] += 1
        loss, info = causal_lm_loss(model, batch)
        return (loss * float("nan") if calls[0] == 2 else loss), info

    torch.manual_seed(0)
    model = TinyLM()
    seen = []
    cfg = TrainConfig(max_steps=4, lr=3e-3, out=str(tmp_path), progress=False, tensorboard=False, measure_mfu=False)

    class Spy(ResumableLoader):  # records the weights before each step's batch
        def __next__(self):
            seen.append(model.transformer.wte.weight.detach().clone())
            return super().__next__()

    res = train(model, loss_with_one_nan, Spy(_data(), batch_size=4), cfg)
    assert res.skipped_steps == 1 and res.step == 4
    assert torch.equal(seen[1], seen[2])  # step 2 changed nothing
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[2], seen[3])
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped", 0) for r in rows if "loss" in r] == [0, 1, 0, 0]
    assert all(torch.isfinite(p).all() for p in model.parameters())

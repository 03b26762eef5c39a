"""The precision policies: one set, offered by every training command, each training a tiny model on CPU; tf32 is
fp32 on CPU (the same losses, said in one line) and switches CUDA's float32 matmuls to TF32 for the run only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from corelm.commands.args import TRAIN_POLICIES
from corelm.train.precision import POLICIES, Precision


def _tiny():
    from corelm.config import ModelConfig
    from corelm.models import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(family="llama", vocab_size=64, d_model=32, n_layer=1, n_head=4, n_kv_head=2,
                                   d_ff=64, max_seq_len=32))


def _loss(model, batch):
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()), int(batch[:, 1:].numel())


class _Batches:
    def __init__(self) -> None:
        self.data = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))

    def __next__(self) -> torch.Tensor:
        return self.data


@pytest.fixture(scope="module")
def runs():
    """Three steps of every policy, from the same initial weights and batches."""
    from corelm.train.loop import TrainConfig, train

    out = {}
    for policy in POLICIES:
        model = _tiny()
        cfg = TrainConfig(max_steps=3, lr=1e-2, warmup_steps=0, precision=policy, progress=False, tensorboard=False,
                          measure_mfu=False)
        out[policy] = (model, train(model, _loss, _Batches(), cfg))
    return out


def test_one_set_of_policies_for_every_training_command():
    from corelm.commands import distill, finetune, pretrain

    assert POLICIES is TRAIN_POLICIES and set(POLICIES) == {"fp32", "tf32", "bf16-mixed", "fp16-mixed", "bf16-true"}
    required = {pretrain: ["--model", "m", "--data", "d"], finetune: ["--model", "m", "--task", "classify", "--data",
                                                                     "d", "--out", "o"],
                distill: ["--teacher", "t", "--data", "d", "--out", "o"]}
    for command, argv in required.items():
        parser = command.build_parser()
        (action,) = [a for a in parser._actions if "--precision" in a.option_strings]
        assert tuple(action.choices) == POLICIES, command.__name__
        for policy in POLICIES:
            assert parser.parse_args([*argv, "--precision", policy]).precision == policy


def test_every_policy_trains_a_tiny_model(runs):
    for policy, (model, result) in runs.items():
        losses = [loss for _, loss in result.losses]
        assert len(losses) == 3 and all(map(torch.isfinite, torch.tensor(losses))), policy
        assert losses[-1] < losses[0], policy
        assert next(model.parameters()).dtype == (torch.bfloat16 if policy == "bf16-true" else torch.float32)
    assert "loss_scale" in runs["fp16-mixed"][1].last_metrics  # the GradScaler ran
    assert "loss_scale" not in runs["bf16-mixed"][1].last_metrics
    # autocast changes the numbers: the mixed policies are not fp32 in disguise
    assert runs["bf16-mixed"][1].losses[-1][1] != runs["fp32"][1].losses[-1][1]


def test_tf32_is_fp32_on_cpu_and_says_so(runs):
    assert runs["tf32"][1].losses == runs["fp32"][1].losses
    assert Precision("tf32", "cpu").note() == "precision tf32: cpu has no TensorFloat-32 matmuls; this run is fp32"
    assert Precision("fp32", "cpu").note() is None and Precision("tf32", "cuda").note() is None


def test_tf32_switches_cuda_matmuls_for_the_run_only():
    # the switches are plain flags (settable without a GPU); fp32 leaves them alone
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
              torch.get_float32_matmul_precision())
    Precision("fp32", "cuda").set_matmul_mode()
    assert torch.get_float32_matmul_precision() == before[2]
    restore = Precision("tf32", "cuda").set_matmul_mode()
    try:
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        restore()
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision()) == before
    Precision("tf32", "cpu").set_matmul_mode()()  # off CUDA: nothing to switch or restore
    assert torch.get_float32_matmul_precision() == before[2]


def test_a_tf32_run_on_cpu_prints_that_it_is_fp32(capsys):
    from corelm.train.loop import TrainConfig, train

    cfg = TrainConfig(max_steps=1, warmup_steps=0, precision="tf32", progress=False, tensorboard=False,
                      measure_mfu=False)
    train(_tiny(), _loss, _Batches(), cfg)
    out = capsys.readouterr().out.splitlines()
    assert out.count("precision tf32: cpu has no TensorFloat-32 matmuls; this run is fp32") == 1

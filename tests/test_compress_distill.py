"""Distillation through the one training loop: a student distilled from a teacher reaches a lower
validation loss than the same student trained from scratch on the same tokens for the same steps."""

import pytest
import torch
import torch.nn.functional as F

from corelm.compress.distill import distill_loss_fn, kd_loss
from corelm.config import ModelConfig
from corelm.errors import CorelmError
from corelm.models import build_model
from corelm.objectives import causal_lm_loss
from corelm.train.loop import TrainConfig, train

V = 48
SHARPNESS = 4.0  # teacher val loss ~1.5 nats: soft targets carry information hard labels lack


def _model(seed, n_layer, d, vocab=V):
    torch.manual_seed(seed)
    config = ModelConfig(family="llama", vocab_size=vocab, n_layer=n_layer, n_head=4, n_kv_head=2, d_model=d,
                         d_ff=2 * d, max_seq_len=64)
    return build_model(config)


@torch.no_grad()
def _sample(teacher, n, length, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, 1), generator=g)
    for _ in range(length):
        probs = torch.softmax(teacher(ids)[:, -1].float(), -1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], 1)
    return ids


def _teacher():
    teacher = _model(0, 2, 64).eval()
    with torch.no_grad():  # a peaked, structured distribution for the data
        teacher.model.embed_tokens.weight.mul_(SHARPNESS)  # tied: also sharpens the head
    return teacher


def _val_loss(model, data):
    with torch.no_grad():
        return float(causal_lm_loss(model.eval(), data)[0])


def test_kd_loss_is_zero_kl_for_identical_logits_and_matches_ce_at_alpha_0():
    torch.manual_seed(0)
    z = torch.randn(2, 5, V)
    y = torch.randint(0, V, (2, 5))
    _, parts = kd_loss(z, z, y, temperature=3.0, alpha=1.0)
    assert abs(parts["kd"]) < 1e-5
    loss0, _ = kd_loss(z, torch.randn(2, 5, V), y, alpha=0.0)
    torch.testing.assert_close(loss0, F.cross_entropy(z.flatten(0, 1), y.flatten()))


def _kd_reference(s, t, y, temperature, alpha):
    """The textbook loss through autograd: KL at temperature T (times T^2) mixed with cross-entropy."""
    keep = y != -100
    s, t, y = s.float()[keep], t.float()[keep], y[keep]
    kd = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                  reduction="batchmean") * temperature**2
    return alpha * kd + (1 - alpha) * F.cross_entropy(s, y)


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (2.0, 0.3), (4.0, 1.0), (1.0, 0.0)])
def test_fused_kd_loss_and_gradient_equal_autograd_reference(temperature, alpha):
    torch.manual_seed(1)
    z = (3 * torch.randn(3, 7, V)).requires_grad_()  # 21 rows: three chunks of the fused loop, one partial
    teacher = (3 * torch.randn(3, 7, V)).bfloat16()  # a bf16 teacher, as `--teacher-dtype bf16` runs it
    y = torch.randint(0, V, (3, 7))
    y[0, :4] = -100
    expected = _kd_reference(z, teacher, y, temperature, alpha)
    (grad_expected,) = torch.autograd.grad(expected, z)
    loss, parts = kd_loss(z, teacher, y, temperature, alpha)
    (grad,) = torch.autograd.grad(2.5 * loss, z)  # a scaled upstream gradient must scale through
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, 2.5 * grad_expected)
    assert parts["ce"] == pytest.approx(float(_kd_reference(z.detach(), teacher, y, 1.0, 0.0)), rel=1e-5)


@pytest.mark.slow
def test_distilled_student_beats_scratch_student():
    teacher = _teacher()
    data = _sample(teacher, 96, 24, seed=1)  # (96, 25): the training tokens both students see
    val = _sample(teacher, 64, 24, seed=2)

    def run(loss_fn):
        student = _model(5, 1, 32)
        loader = iter([data[i % 12 * 8:(i % 12 + 1) * 8] for i in range(10_000)])
        cfg = TrainConfig(max_steps=60, lr=3e-3, warmup_steps=5, progress=False, tensorboard=False,
                          measure_mfu=False, seed=0)
        train(student, loss_fn, loader, cfg)
        return _val_loss(student, val)

    scratch = run(causal_lm_loss)
    distilled = run(distill_loss_fn(teacher, temperature=2.0, alpha=0.7))
    teacher_loss = _val_loss(teacher, val)
    assert distilled < scratch, (distilled, scratch, teacher_loss)


def test_vocab_mismatch_and_bad_parameters():
    from corelm.compress.distill import check_pair

    with pytest.raises(CorelmError, match="vocabularies differ"):
        check_pair(_model(0, 1, 32), _model(0, 1, 32, vocab=64))
    with pytest.raises(CorelmError, match="alpha"):
        distill_loss_fn(_model(0, 1, 32), alpha=1.5)


def test_cli_distills_into_a_loadable_run_directory(tmp_path, capsys):
    """`corelm distill` end to end on a tiny teacher: the run directory is a model; bad data is one line."""
    import json
    import random

    import corelm
    from corelm.cli import main as cli
    from corelm.data.prepare import prepare

    rng = random.Random(0)
    words = ["def", "read", "file", "return", "value", "list", "token", "layer", "the", "of"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) for _ in range(200)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare(tmp_path / "data", inputs=[str(tmp_path / "c.jsonl")], train_tokenizer_vocab=300, val_fraction=0.05,
            progress=False)
    tiny = {"family": "llama", "n_layer": 1, "n_head": 2, "n_kv_head": 1, "d_model": 32, "d_ff": 64,
            "max_seq_len": 64, "vocab_size": 8}  # vocabulary taken from the data
    (tmp_path / "tiny.json").write_text(json.dumps(tiny))
    common = ["--data", str(tmp_path / "data"), "--seq-len", "32", "--batch-size", "4", "--no-progress",
              "--eval-batches", "1"]
    assert cli(["pretrain", "--model", str(tmp_path / "tiny.json"), "--out", str(tmp_path / "teacher"),
                "--max-steps", "3", "--no-tensorboard", "--no-measure-mfu", *common]) == 0
    assert cli(["distill", "--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "tiny.json"),
                "--teacher-dtype", "fp32", "--temperature", "1", "--alpha", "0.5", "--max-steps", "3",
                "--out", str(tmp_path / "kd"), *common]) == 0
    rows = [json.loads(line) for line in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["kd"] and 0 < r["ce"] for r in rows if "loss" in r)  # both terms logged
    assert any("val_loss" in r for r in rows)
    saved = json.loads((tmp_path / "kd" / "run_config.json").read_text())
    assert saved["teacher_dtype"] == "float32" and saved["temperature"] == 1.0
    llm = corelm.load(str(tmp_path / "kd"), dtype="fp32")
    assert isinstance(llm.generate("def read", max_new_tokens=4, temperature=0.0), str)

    capsys.readouterr()
    assert cli(["distill", "--teacher", str(tmp_path / "teacher"), "--data", str(tmp_path / "data"),
                "--alpha", "1.5", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "alpha must be in [0, 1]" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad").exists()  # nothing written

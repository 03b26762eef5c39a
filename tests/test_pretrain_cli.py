"""`corelm prepare` + `corelm pretrain` end to end on tiny configs: the run directory is a model."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

import corelm
from corelm.cli import main as cli
from corelm.data.prepare import prepare
from corelm.train.checkpoint import checkpoint_dirs

TINY = {"gpt2": {"family": "gpt2", "n_layer": 2, "n_head": 2, "d_model": 32, "max_seq_len": 64, "vocab_size": 8},
        "bert": {"family": "bert", "n_layer": 2, "n_head": 2, "d_model": 32, "d_ff": 64, "max_seq_len": 64,
                 "vocab_size": 8}}


def make_tiny_data(root):
    """A few KB of text, its own small BPE, and tiny model configs (vocab is taken from the data)."""
    rng = random.Random(0)
    words = ["def", "read", "file", "return", "value", "list", "dict", "model", "token", "layer", "step", "loss",
             "the", "a", "of"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) for _ in range(300)]
    (root / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare(root / "data", inputs=[str(root / "c.jsonl")], train_tokenizer_vocab=300, val_fraction=0.05,
            progress=False)
    for name, cfg in TINY.items():
        (root / f"{name}.json").write_text(json.dumps(cfg))
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("pretrain"))


def _pretrain(tiny, out, *extra):
    args = ["pretrain", "--model", str(tiny / "gpt2.json"), "--data", str(tiny / "data"), "--seq-len", "32",
            "--batch-size", "4", "--out", str(out), "--no-progress", "--no-tensorboard", "--no-measure-mfu",
            "--eval-batches", "2", "--eval-every", "0", *extra]
    return cli(args)


def _losses(run):
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def test_run_directory_is_a_loadable_model(tiny, tmp_path):
    assert _pretrain(tiny, tmp_path / "a", "--max-steps", "4") == 0
    llm = corelm.load(str(tmp_path / "a"), dtype="fp32")
    text = llm.generate("def read", max_new_tokens=5, temperature=0.0)
    assert isinstance(text, str)
    # the top-level weights are the newest checkpoint's, bit for bit
    from safetensors.torch import load_file

    top = load_file(str(tmp_path / "a" / "model.safetensors"))
    ckpt = load_file(str(checkpoint_dirs(tmp_path / "a")[-1][1] / "model.safetensors"))
    assert top.keys() == ckpt.keys() and all(torch.equal(top[k], ckpt[k]) for k in top)
    assert (tmp_path / "a" / "loss.png").is_file()
    saved = json.loads((tmp_path / "a" / "run_config.json").read_text())
    assert saved["seq_len"] == 32 and saved["train"]["max_steps"] == 4


def test_cli_resume_continues_exactly(tiny, tmp_path):
    assert _pretrain(tiny, tmp_path / "full", "--max-steps", "6", "--save-every", "3") == 0
    assert _pretrain(tiny, tmp_path / "cut", "--max-steps", "6", "--save-every", "3") == 0
    shutil.rmtree(checkpoint_dirs(tmp_path / "cut")[-1][1])  # as if killed between step 3 and 6
    assert _pretrain(tiny, tmp_path / "cut", "--max-steps", "6", "--save-every", "3",
                     "--resume", str(tmp_path / "cut")) == 0
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full")


def test_bert_mlm_with_nsp(tiny, tmp_path):
    out = tmp_path / "b"
    code = cli(["pretrain", "--model", str(tiny / "bert.json"), "--objective", "mlm", "--nsp", "--data",
                str(tiny / "data"), "--seq-len", "32", "--batch-size", "4", "--max-steps", "3", "--out", str(out),
                "--no-progress", "--no-tensorboard", "--no-measure-mfu", "--eval-batches", "1"])
    assert code == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"mlm_loss", "mlm_acc", "nsp_loss"} <= set(rows[0])
    enc = corelm.load(str(out), dtype="fp32")
    assert enc.model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 32)


@pytest.mark.parametrize("args, message", [
    (["--objective", "mlm"], "decoder"),
    (["--seq-len", "999"], "exceeds the model's context"),
    (["--parallel", "ddp"], "torchrun"),
])
def test_bad_arguments_are_one_line_errors(tiny, tmp_path, capsys, args, message):
    assert _pretrain(tiny, tmp_path / "x", "--max-steps", "1", *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_existing_run_needs_resume(tiny, tmp_path, capsys):
    assert _pretrain(tiny, tmp_path / "a", "--max-steps", "1") == 0
    assert _pretrain(tiny, tmp_path / "a", "--max-steps", "1") == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["prepare", "pretrain"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli([command, "--help"])
    assert exc.value.code == 0 and "--out" in capsys.readouterr().out

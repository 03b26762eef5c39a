"""`corelm plan` from the command line: the issue's examples, JSON, plot, budget and one-line errors."""

from __future__ import annotations

import json

import pytest

from corelm.cli import main


def run(capsys, *argv):
    code = main(["plan", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_issue_examples_print_tables(capsys):
    code, out, _ = run(capsys, "--model", "llama-3-8b", "--task", "pretrain", "--tokens", "1e12", "--hardware",
                       "h100-sxm", "--count", "64")
    assert code == 0 and "h100-sxm" in out and "FSDP" in out and "cost $" in out
    code, out, _ = run(capsys, "--model", "llama-2-7b", "--task", "finetune", "--method", "lora", "--seq-len", "4096",
                       "--batch", "8", "--hardware", "a100-80gb")
    assert code == 0 and "lora" in out
    code, out, _ = run(capsys, "--model", "smollm2-135m", "--task", "infer", "--context", "8192", "--batch", "32",
                       "--hardware", "all")
    assert code == 0 and out.count(" yes ") >= 13 and "tpu-v5e" in out


def test_json_and_plot(capsys, tmp_path):
    png = tmp_path / "plan.png"
    code, out, _ = run(capsys, "--model", "llama-2-7b", "--task", "infer", "--context", "4096", "--hardware",
                       "l4,h100-sxm", "--count", "1", "--batch", "8", "--json", "--plot", str(png))
    assert code == 0
    data = json.loads(out)
    assert data["kv_cache_bytes"] == 8 * 2 * 2**30  # bf16 by default: 2 GiB per sequence, as fp16
    assert [d["fits"] for d in data["devices"]] == [False, True]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_file_and_budget(capsys, tmp_path):
    cfg = tmp_path / "my_model.yaml"
    cfg.write_text("family: llama\nvocab_size: 32000\nn_layer: 12\nn_head: 12\nd_model: 768\nd_ff: 2048\n"
                   "max_seq_len: 2048\n")
    code, out, _ = run(capsys, "--config", str(cfg), "--task", "pretrain", "--tokens", "2e10", "--budget-usd", "5000")
    assert code == 0 and "Rent:" in out and "my_model" in out


@pytest.mark.parametrize("argv,match", [
    (["--model", "llama-3-8x"], "did you mean"),
    (["--model", "gpt2", "--hardware", "h100"], "did you mean"),
    (["--model", "gpt2", "--batch", "0"], "batch"),
    (["--model", "gpt2", "--tokens", "-5"], "tokens"),
    (["--model", "llama-2-7b", "--tp", "3", "--count", "6"], "does not divide"),
    (["--config", "/nonexistent.yaml"], "not found"),
    (["--model", "gpt2", "--profile", "/nonexistent.json"], "profile not found"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, match):
    code, _out, err = run(capsys, *argv)
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_help_explains_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--model", "--task", "--hardware", "--budget-usd", "--profile", "--plot", "--json", "--recompute"):
        assert opt in out

"""The compression commands document themselves and turn bad input into one line, exit 2, no files."""

import pytest

from corelm.cli import main

COMMANDS = ["quantize", "prune", "distill", "export", "compare"]


@pytest.mark.parametrize("name", COMMANDS)
def test_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert "usage: corelm " + name in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["prune", "--model", "smollm2-135m-instruct", "--sparsity", "1.5", "--out", "OUT"], "sparsity must be in [0, 1)"),
    (["prune", "--model", "smollm2-135m-instruct", "--pattern", "4:2", "--out", "OUT"], "N:M needs 0 < N < M"),
    (["prune", "--model", "smollm2-135m-instruct", "--method", "wanda", "--out", "OUT"], "needs --calib"),
    (["compare", "smollm2-135m-instruct", "--data", "missing.txt"], "--data file not found"),
])
def test_bad_input_is_one_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_quantized_checkpoint_is_refused_by_prune(tmp_path, capsys):
    from corelm.config import ModelConfig
    from corelm.models import build_model
    from corelm.quant.io import load_quantized_dir, save_quantized_dir
    from corelm.quant.layers import Int8Linear
    from corelm.quant.transform import quantize_model

    config = ModelConfig(family="llama", vocab_size=64, n_layer=1, n_head=2, d_model=32, d_ff=64, max_seq_len=32)
    model = quantize_model(build_model(config), "int8")
    save_quantized_dir(model, config, tmp_path / "q8")
    assert main(["prune", "--model", str(tmp_path / "q8"), "--method", "magnitude", "--out", str(tmp_path / "p")]) == 2
    assert "is quantized" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
    # and the quantized directory loads back with the same structure
    _, back = load_quantized_dir(tmp_path / "q8")
    assert isinstance(back.model.layers[0].mlp.up_proj, Int8Linear)

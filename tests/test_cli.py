"""The foundation commands: --help everywhere, real runs on a tiny GGUF, and every bad input -> one line, exit 2."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from corelm.cli import COMMANDS, main
from tests.test_gguf import write_tiny_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()  # drop earlier output (e.g. transformers' progress bars)
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[loaded")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = f"corelm.commands.{COMMANDS[command][0]}"
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not written yet")
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"corelm {command}" in out and "--help" in out


def test_top_level_usage(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run([], capsys)
    assert code == 0 and all(name in out for name in COMMANDS)
    code, _, err = run(["generat"], capsys)
    assert_one_line_error(code, err, "did you mean: generate")


def test_generate_and_chat_on_gguf(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["generate", "--model", str(tiny), "--dtype", "fp32", "--max-new-tokens", "6",
                          "--ignore-eos", "the quick brown"], capsys)
    assert code == 0 and out.strip()
    assert "6 tokens" in err and "tok/s" in err
    code, _out2, _ = run(["generate", "--model", str(tiny), "--dtype", "fp32", "--max-new-tokens", "6", "--ignore-eos",
                         "--temperature", "0.8", "--top-p", "0.9", "--top-k", "20", "--seed", "1", "the quick brown"],
                        capsys)
    assert code == 0
    code, _out3, err = run(["generate", "--model", str(tiny), "--dtype", "fp32", "--max-new-tokens", "4",
                           "--beams", "2", "--stop", "zzz", "the quick brown"], capsys)
    assert code == 0 and "tokens" in err
    code, out, err = run(["chat", "--model", str(tiny), "--dtype", "fp32", "--max-new-tokens", "4", "--ignore-eos",
                          "--once", "hello"], capsys)
    assert code == 0 and "4 tokens" in err


def test_chat_interactive(tiny: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/reset\n/bogus\nthe fox\n"))  # then EOF
    code, _out, err = run(["chat", "--model", str(tiny), "--dtype", "fp32", "--max-new-tokens", "3", "--ignore-eos"],
                         capsys)
    assert code == 0
    assert err.count("3 tokens") == 2 and "[conversation cleared]" in err and "unknown command /bogus" in err


def test_convert_gguf_loads_in_transformers(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import corelm

    out_dir = tmp_path / "hf"
    code, _, err = run(["convert", str(tiny), str(out_dir)], capsys)
    assert code == 0 and "wrote" in err
    ref = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()
    llm = corelm.load(tiny, dtype="fp32")
    text = "the quick brown fox: def f(x): return 1"
    ids = llm.tokenizer.encode(text)
    assert AutoTokenizer.from_pretrained(str(out_dir)).encode(text, add_special_tokens=False) == ids
    with torch.inference_mode():
        torch.testing.assert_close(llm.model(torch.tensor([ids])), ref(torch.tensor([ids])).logits,
                                   atol=1e-5, rtol=1e-5)
    reloaded = corelm.load(out_dir, dtype="fp32")  # and corelm reads its own export
    with torch.inference_mode():
        torch.testing.assert_close(reloaded.model(torch.tensor([ids])), llm.model(torch.tensor([ids])))
    code, _, err = run(["convert", str(tiny), str(out_dir)], capsys)  # refuses to overwrite
    assert_one_line_error(code, err, "not empty")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_models_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["models"], capsys)
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("smollm2-135m-instruct"))
    assert "134.5M" in row and "llama" in row and "8192" in row
    code, out, _ = run(["models", "--json", "--family", "bert"], capsys)
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["minilm-l6"]["params"] == 22_713_216  # all-MiniLM-L6-v2's published parameter count


def test_tokenizer_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world, hello tokens. " * 100)
    code, out, _ = run(["tokenizer", "train", "--kind", "bpe", "--vocab-size", "300", str(corpus),
                        "--out", str(tmp_path / "tok")], capsys)
    assert code == 0 and "trained bpe tokenizer" in out
    code, out, _ = run(["tokenizer", "encode", "--model", str(tmp_path / "tok"), "--json", "hello world"], capsys)
    ids = json.loads(out)
    code, out, _ = run(["tokenizer", "decode", "--model", str(tmp_path / "tok"), *map(str, ids)], capsys)
    assert out.strip() == "hello world"
    code, _, err = run(["tokenizer", "train", "--kind", "bpe", str(tmp_path / "missing.txt"),
                        "--out", str(tmp_path / "t2")], capsys)
    assert_one_line_error(code, err, "training file not found")
    assert not (tmp_path / "t2").exists()


def _unsupported_quant_gguf(path: Path) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("block_count", 1), ("context_length", 64), ("embedding_length", 32),
                       ("feed_forward_length", 64), ("attention.head_count", 2)):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)  # a key llama.cpp requires of a llama file
    w.add_tensor("token_embd.weight", np.zeros((8, 40), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_bad_inputs(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gen = ["generate", "--dtype", "fp32", "--model"]
    cases = [
        (gen + ["/no/such/dir", "hi"], ["path not found"]),
        (gen + ["smollm2-135m-instrukt", "hi"], ["unknown model", "did you mean: smollm2-135m-instruct"]),
        (gen + [str(tiny), "--top-p", "0", "hi"], ["--top-p"]),
        (gen + [str(tiny), "--temperature", "-1", "hi"], ["--temperature"]),
        (gen + [str(tiny), "--max-new-tokens", "0", "hi"], ["--max-new-tokens"]),
        (gen + [str(tiny), "fox " * 300], ["context window"]),
        (gen + [str(tiny), "--max-new-tokens", "250", "fox " * 20], ["context window"]),
    ]
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    cases.append((gen + [str(junk), "hi"], ["not a GGUF file"]))
    mamba = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(mamba), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cases.append((gen + [str(mamba), "hi"], ["unsupported GGUF architecture 'mamba'"]))
    q81 = tmp_path / "q81.gguf"
    _unsupported_quant_gguf(q81)
    cases.append((gen + [str(q81), "hi"], ["unsupported GGUF tensor type Q8_1"]))
    # an HF directory with a truncated safetensors file, and one whose config.json lacks fields
    hf = tmp_path / "hf"
    assert main(["convert", str(tiny), str(hf)]) == 0
    capsys.readouterr()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((hf / "config.json").read_text())
    (broken / "model.safetensors").write_bytes((hf / "model.safetensors").read_bytes()[:5000])
    cases.append((gen + [str(broken), "hi"], ["model.safetensors"]))
    nofields = tmp_path / "nofields"
    nofields.mkdir()
    (nofields / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    (nofields / "model.safetensors").write_bytes((hf / "model.safetensors").read_bytes())
    cases.append((gen + [str(nofields), "hi"], ["missing required field"]))
    cases.append((["convert", "/no/such.gguf", str(tmp_path / "o")], ["path not found"]))
    cases.append((["tokenizer", "encode", "--model", "nope-model", "x"], ["unknown model"]))
    for argv, needles in cases:
        code, _, err = run(argv, capsys)
        assert_one_line_error(code, err, *needles)


def test_subprocess_error_is_one_line(tmp_path: Path) -> None:
    """The installed console script: exit status 2, a single stderr line, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "corelm.cli", "generate", "--model", str(tmp_path / "x.gguf"), "hi"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "path not found" in proc.stderr and "Traceback" not in proc.stderr


def test_on_off_flags_say_what_they_do_not_a_default(capsys: pytest.CaptureFixture[str]) -> None:
    """``--no-progress ... (default: True)`` read as if the flag were on by default: flags show no default."""
    from corelm.cli import COMMANDS, main

    for name in COMMANDS:
        with pytest.raises(SystemExit):
            main([name, "--help"])
        out = capsys.readouterr().out
        blocks = out.split("\n  -")
        for block in blocks:
            if block.startswith("-no-"):
                assert "(default: True)" not in block and "(default: False)" not in block, (name, block)


@pytest.mark.parametrize("argv", [
    ["convert", "a", "b", "--dtype", "int3"], ["merge", "r", "--out", "o", "--dtype", "float"],
    ["evaluate", "--model", "m", "--data", "d", "--dtype", "banana"], ["predict", "--model", "m", "--dtype", "x"],
    ["bench", "--decode", "--dtype", "fp8"], ["distill", "--precision", "fp8-mixed"],
    ["pretrain", "--device", "tpu"], ["bench", "--device", "tpu"],
])
def test_shared_dtype_precision_device_options_refuse_unknown_values(argv, capsys) -> None:
    """--dtype, --precision and --device are declared once (corelm.commands.args): every command refuses
    a value it does not know with one line, before loading anything."""
    from corelm.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("invalid choice" in err[0] or "must be auto, cpu, cuda" in err[0]), err


def test_generate_and_chat_take_threads(monkeypatch, capsys) -> None:
    """--threads sets torch's thread count; without it OMP_NUM_THREADS, else the physical cores."""
    import torch

    from corelm import cpu
    from corelm.cli import main

    before = torch.get_num_threads()
    try:
        assert main(["generate", "--model", "llama-tiny", "--dtype", "fp32", "--max-new-tokens", "2", "--threads", "2",
                     "hi"]) == 0
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert main(["chat", "--model", "llama-tiny", "--dtype", "fp32", "--max-new-tokens", "2", "--once", "hi"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu.default_threads() == cpu.physical_cores() >= 1

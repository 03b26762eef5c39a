"""The public Python API: names, load() sources and errors, stop strings, dtype choice, quantize hook."""

from __future__ import annotations

import os
import types
from pathlib import Path

import pytest
import torch

import corelm
from corelm.api import LLM, Encoder, default_dtype, load_tokenizer, resolve_dtype
from corelm.errors import CorelmError
from corelm.generate.text import StopMatcher, stream_text
from tests.test_gguf import write_tiny_gguf


def test_public_api() -> None:
    """The curated API is exactly these names; the commands' functions live in corelm.commands.<command>."""
    assert sorted(corelm.__all__) == ["CorelmError", "ModelConfig", "__version__", "load"]
    for name in corelm.__all__:
        assert hasattr(corelm, name), name
    public = {name for name, value in vars(corelm).items() if not name.startswith("_")
              and not isinstance(value, types.ModuleType) and name != "annotations"}  # from __future__
    assert public == set(corelm.__all__) - {"__version__"}
    for method in ("generate", "stream", "chat", "stream_chat"):
        assert callable(getattr(LLM, method))
    assert callable(Encoder.embed)


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(CorelmError, match=r"unknown model 'smollm2-135m-instrct'.*did you mean: smollm2-135m-instruct"):
        corelm.load("smollm2-135m-instrct")


def test_missing_path() -> None:
    with pytest.raises(CorelmError, match="path not found: /no/such/model.gguf"):
        corelm.load("/no/such/model.gguf")
    with pytest.raises(CorelmError, match="path not found"):
        corelm.load("./nowhere")


def test_directory_without_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CorelmError, match="no config.json"):
        corelm.load(tmp_path)


def test_not_gguf_file(tmp_path: Path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\x00" * 64)
    with pytest.raises(CorelmError, match="not a GGUF file"):
        corelm.load(f)


def test_preset_random_init_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    llm = corelm.load("llama-tiny", dtype="fp32")
    assert isinstance(llm, LLM) and llm.source == "random init"
    assert "random initialization" in capsys.readouterr().err
    assert llm.tokenizer is not None and llm.tokenizer.vocab_size == llm.config.vocab_size  # SmolLM2's vocabulary
    logits = llm.model(torch.tensor([llm.tokenizer.encode("hello")]))
    assert logits.shape == (1, 1, llm.config.vocab_size)
    enc = corelm.load("bert-tiny", dtype="fp32")
    assert isinstance(enc, Encoder)


def test_gguf_path_loads_and_generates(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    llm = corelm.load(str(path), dtype="fp32")
    ids = llm.tokenizer.encode("the quick brown fox")
    new = llm.generate_ids(ids, max_new_tokens=5, ignore_eos=True)
    assert len(new) == 5
    # greedy generation equals argmax of a full forward, step by step
    seq = list(ids)
    for token in new:
        with torch.inference_mode():
            assert int(llm.model(torch.tensor([seq]))[0, -1].argmax()) == token
        seq.append(token)
    assert llm.generate("the quick", max_new_tokens=5, ignore_eos=True) == \
        "".join(llm.stream("the quick", max_new_tokens=5, ignore_eos=True))
    with pytest.raises(CorelmError, match="context window"):
        llm.generate("fox " * 300, max_new_tokens=4)
    with pytest.raises(CorelmError, match="top_p"):
        llm.generate("the", top_p=0.0)
    with pytest.raises(CorelmError, match="temperature"):
        llm.generate("the", temperature=-1.0)
    assert load_tokenizer(str(path)).encode("fox") == llm.tokenizer.encode("fox")


class _CharTokenizer:
    """Each id is a character; enough of the Tokenizer interface for the stop-string logic."""

    def stream_decoder(self, skip_special_tokens: bool = True):
        class Dec:
            def push(self, i: int) -> str:
                return chr(i)

            def flush(self) -> str:
                return ""

        return Dec()


def _run(text: str, stops: list[str]) -> tuple[str, list[str], int]:
    consumed = 0

    def gen():
        nonlocal consumed
        for ch in text:
            consumed += 1
            yield ord(ch)

    pieces = list(stream_text(_CharTokenizer(), gen(), stops))
    return "".join(pieces), pieces, consumed


def test_stop_strings() -> None:
    out, pieces, consumed = _run("Hello world. More text", ["."])
    assert out == "Hello world" and consumed == len("Hello world.")  # generation stops at the stop string
    out, pieces, _ = _run("abc<|end|>def", ["<|end|>", "zzz"])
    assert out == "abc" and all("<" not in p for p in pieces)  # a partial stop string is never streamed
    out, _, _ = _run("ab<x", ["<|end|>"])  # held back text comes out at the end when it was no stop
    assert out == "ab<x"
    out, _, _ = _run("no stops here", [])
    assert out == "no stops here"
    m = StopMatcher(["<|end|>"])
    assert m.feed("abc<|e") == ("abc", False) and m.pending == "<|e"  # the server uses the same matcher
    assert m.feed("nd|> more") == ("", True)


def test_dtype_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype(torch.float32) is torch.float32
    with pytest.raises(CorelmError, match="unknown dtype"):
        resolve_dtype("int3")
    monkeypatch.setenv("CORELM_DTYPE", "bf16")
    assert resolve_dtype(None) is torch.bfloat16


def test_default_dtype_follows_the_cpu_flags_and_never_varies(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same machine gets the same dtype on every call (no timing probe): bf16 exactly where the CPU
    declares bf16 arithmetic."""
    from corelm import cpu

    monkeypatch.delenv("CORELM_DTYPE", raising=False)
    native = {"avx512_bf16", "amx_bf16"} & cpu.cpu_flags() and torch.backends.cpu.get_cpu_capability() == "AVX512"
    expected = torch.bfloat16 if native else torch.float32
    assert {default_dtype("cpu") for _ in range(5)} == {expected}
    assert cpu.native_bf16(frozenset({"avx2", "fma"})) is False  # Zen 3: emulated bf16
    assert cpu.native_bf16(frozenset({"avx512f", "avx512_bf16"})) is True  # Zen 4
    assert cpu.native_bf16(frozenset({"avx512f", "amx_bf16", "amx_tile"})) is True  # Sapphire Rapids
    monkeypatch.setattr(cpu, "native_bf16", lambda flags=None: False)
    monkeypatch.setattr("corelm.loading.native_bf16", cpu.native_bf16)
    assert default_dtype("cpu") is torch.float32


@pytest.mark.slow
def test_plain_generate_prints_the_same_kind_and_text_in_three_runs() -> None:
    """Three separate processes of the same plain command load the same dtype and print the same text."""
    import subprocess
    import sys

    runs = [subprocess.run([sys.executable, "-m", "corelm", "generate", "--max-new-tokens", "24",
                            "The three laws of thermodynamics are"],
                           capture_output=True, text=True, check=True, timeout=300,
                           env={**os.environ, "CORELM_DTYPE": ""}) for _ in range(3)]
    kinds = {next(ln for ln in r.stderr.splitlines() if ln.startswith("[loaded")).split("(")[1].split(")")[0]
             for r in runs}
    assert len(kinds) == 1 and {r.stdout for r in runs} == {runs[0].stdout}


def test_quantize_hook() -> None:
    plain = corelm.load("llama-tiny", dtype="fp32")
    q = corelm.load("llama-tiny", dtype="fp32", quantize="int8")
    assert any("Int8" in type(m).__name__ for m in q.model.modules())
    ids = torch.tensor([q.tokenizer.encode("hello world")])
    with torch.inference_mode():
        a, b = plain.model(ids), q.model(ids)
    assert (a - b).abs().max() < 0.1 * a.abs().max()  # close, not equal: weights are int8
    with pytest.raises(CorelmError):
        corelm.load("llama-tiny", quantize="int3")


def test_a_list_of_prompts_is_one_batch_equal_to_lone_runs(tmp_path: Path) -> None:
    """``llm.generate([...])`` decodes the prompts together; each text equals that prompt generated alone,
    greedy and seeded, with and without stop strings."""
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    llm = corelm.load(str(path), dtype="fp32")
    prompts = ["hello world", "a", "the cat sat on the mat and"]
    for kwargs in ({}, {"temperature": 0.8, "seed": 3}, {"stop": ["e"]}):
        batch = llm.generate(prompts, max_new_tokens=12, **kwargs)
        assert isinstance(batch, list) and len(batch) == len(prompts)
        assert batch == [llm.generate(p, max_new_tokens=12, **kwargs) for p in prompts], kwargs

"""corelm generate with --quantize, --lookup and --draft, through corelm.cli.main on llama-tiny (random, fp32)."""

from __future__ import annotations

import pytest

from corelm.cli import main

PROMPT = "a b c d e f a b c d e f a b c"
BASE = ["generate", "--model", "llama-tiny", "--dtype", "fp32", "--max-new-tokens", "12", "--ignore-eos"]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_lookup_and_draft_equal_plain_greedy(capsys):
    code, plain, _ = run(BASE + [PROMPT], capsys)
    assert code == 0 and plain.strip()
    code, lookup, err = run(BASE + ["--lookup", "3", "--draft-k", "3", PROMPT], capsys)
    assert code == 0 and lookup == plain
    assert "acceptance rate" in err.splitlines()[-1]
    # the same random model as its own draft: every proposal is accepted
    code, drafted, err = run(BASE + ["--draft", "llama-tiny", PROMPT], capsys)
    assert code == 0 and drafted == plain
    assert "acceptance rate 100%" in err.splitlines()[-1]


def test_quantize_int4_runs(capsys):
    code, out, err = run(BASE + ["--quantize", "int4", PROMPT], capsys)
    assert code == 0 and out.strip()
    assert "(int4, C++ step)" in err and "decode" in err.splitlines()[-1]


@pytest.mark.parametrize("extra, message", [
    (["--draft", "llama-tiny", "--beams", "2"], "--beams"),
    (["--draft", "llama-tiny", "--lookup", "2"], "give one of them"),
    (["--lookup", "0"], "--lookup must be at least 1"),
    (["--lookup", "2", "--draft-k", "0"], "--draft-k"),
    (["--lookup", "2", "--top-p", "0.5"], "--top-p"),
    (["--draft", "gpt2-tiny"], "vocabulary"),
])
def test_bad_combinations_are_one_line(extra, message, capsys):
    code, _, err = run(BASE + extra + [PROMPT], capsys)
    lines = [line for line in err.splitlines()
             if line.strip() and not line.startswith(("[loaded", "corelm: llama-tiny", "corelm: gpt2-tiny"))]
    assert code == 2 and len(lines) == 1, err
    assert message in lines[0] and "Traceback" not in err

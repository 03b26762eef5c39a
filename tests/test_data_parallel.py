"""Parallel corpora built offline (corelm.data.parallel): the number-spelling corpus of docs/translation.md."""

from __future__ import annotations

import builtins
import json

import pytest

from corelm.cli import main as cli
from corelm.data.parallel import build_numbers, read_parallel, sample_numbers
from corelm.errors import CorelmError

SIZES = {"train": 60, "val": 10, "test": 20}


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_sample_numbers_is_seeded_distinct_and_spans_digit_counts():
    a = sample_numbers(500, max_digits=6, seed=3)
    assert a == sample_numbers(500, max_digits=6, seed=3)
    assert a != sample_numbers(500, max_digits=6, seed=4)
    assert len(set(a)) == 500 and all(0 <= n < 10 ** 6 for n in a)
    assert {len(str(n)) for n in a} == {1, 2, 3, 4, 5, 6}  # the digit count is drawn first
    with pytest.raises(CorelmError, match="ask fewer"):
        sample_numbers(60, max_digits=2)


def test_build_numbers_is_deterministic_with_disjoint_splits(tmp_path):
    pytest.importorskip("num2words")
    info = build_numbers(tmp_path / "a", "en-fr", seed=0, sizes=SIZES)
    build_numbers(tmp_path / "b", "en-fr", seed=0, sizes=SIZES)
    assert info["pairs"] == SIZES and info["corpus"] == "numbers:en-fr" and info["num2words"]
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "text.txt", "corpus.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    splits = {s: _rows(tmp_path / "a" / f"{s}.jsonl") for s in SIZES}
    numbers = {s: {r["number"] for r in rows} for s, rows in splits.items()}
    assert {s: len(v) for s, v in numbers.items()} == SIZES
    assert not (numbers["train"] & numbers["val"] or numbers["train"] & numbers["test"] or
                numbers["val"] & numbers["test"])
    sources = {s: {r["source"] for r in rows} for s, rows in splits.items()}
    assert not (sources["train"] & sources["test"])
    row = {r["number"]: r for r in splits["train"] + splits["val"] + splits["test"]}
    some = next(iter(row.values()))
    from num2words import num2words

    assert some["source"] == num2words(some["number"], lang="en")
    assert some["target"] == num2words(some["number"], lang="fr")
    lines = (tmp_path / "a" / "text.txt").read_text(encoding="utf-8").splitlines()
    assert lines == [x for r in splits["train"] for x in (r["source"], r["target"])]
    assert read_parallel(tmp_path / "a" / "test.jsonl").items == [(r["source"], r["target"]) for r in splits["test"]]
    with pytest.raises(CorelmError, match="not empty"):
        build_numbers(tmp_path / "a", "en-fr", sizes=SIZES)


def test_digits_source_and_bad_pairs(tmp_path):
    pytest.importorskip("num2words")
    build_numbers(tmp_path / "d", "digits-de", sizes=SIZES)
    r = _rows(tmp_path / "d" / "test.jsonl")[0]
    assert r["source"] == str(r["number"])
    with pytest.raises(CorelmError, match="num2words has no language 'xx'"):
        build_numbers(tmp_path / "x", "en-xx", sizes=SIZES)
    with pytest.raises(CorelmError, match="<source>-<target>"):
        build_numbers(tmp_path / "y", "en", sizes=SIZES)


def test_missing_num2words_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_num2words(name, *args, **kwargs):
        if name == "num2words" or name.startswith("num2words."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_num2words)
    with pytest.raises(CorelmError, match=r"^the number-spelling corpus is written by the num2words package: "
                                          r"pip install num2words$"):
        build_numbers(tmp_path / "n", "en-fr", sizes=SIZES)
    assert cli(["prepare", "--corpus", "numbers:en-fr", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install num2words" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m").exists()

"""Data preparation: readers, EOS packing, shards, manifest, errors that name file and line, atomic output."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from corelm.data.corpus import python_docs
from corelm.data.prepare import prepare, read_manifest
from corelm.data.shards import TokenWindows
from corelm.errors import CorelmError
from corelm.tokenizer import Tokenizer

WORDS = ["the", "model", "reads", "a", "file", "and", "writes", "tokens", "to", "the", "data", "loader",
         "every", "step"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small byte-level BPE trained by prepare itself (the default path), reused as --tokenizer."""
    root = tmp_path_factory.mktemp("tok")
    text = root / "a.txt"
    text.write_text("\n".join(" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))) * 20)
    prepare(root / "out", inputs=[str(text)], train_tokenizer_vocab=300, progress=False)
    return root / "out"


def _no_leftovers(parent, name):
    return not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_text_jsonl_parquet_are_packed_with_eos(tmp_path, tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "one.txt").write_text("the model reads a file")
    (tmp_path / "two.jsonl").write_text(json.dumps({"body": "writes tokens", "id": 1}) + "\n\n"
                                        + json.dumps({"body": "to the data loader", "id": 2}) + "\n")
    pq.write_table(pa.table({"body": ["every step", "the file"]}), tmp_path / "three.parquet")
    tok = Tokenizer.from_dir(tokenizer_dir)
    m = prepare(tmp_path / "out", inputs=[str(tmp_path / "d"), str(tmp_path / "two.jsonl")], field="body",
                tokenizer=str(tokenizer_dir), val_fraction=0.0, progress=False)
    m2 = prepare(tmp_path / "pq", inputs=[str(tmp_path / "three.parquet")], field="body",
                 tokenizer=str(tokenizer_dir), val_fraction=0.0, progress=False)
    assert m["dtype"] == "uint16" and m["splits"]["train"]["documents"] == 3
    ids = np.fromfile(tmp_path / "out" / "train-00000.bin", dtype=np.uint16).tolist()
    eos = tok.eos_token_id
    expected = []
    for text in ["the model reads a file", "writes tokens", "to the data loader"]:
        expected += tok.encode(text) + [eos]
    assert ids == expected
    assert read_manifest(tmp_path / "pq")["splits"]["train"]["tokens"] == len(
        tok.encode("every step") + tok.encode("the file")) + 2
    assert m2["splits"]["train"]["documents"] == 2


def test_split_is_deterministic_and_windows_cover_tokens(tmp_path, tokenizer_dir):
    lines = [json.dumps({"text": f"{' '.join(WORDS[: 3 + i % 9])} {i}"}) for i in range(300)]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    a = prepare(tmp_path / "a", inputs=[str(tmp_path / "c.jsonl")], tokenizer=str(tokenizer_dir),
                val_fraction=0.1, shard_tokens=500, progress=False)
    b = prepare(tmp_path / "b", inputs=[str(tmp_path / "c.jsonl")], tokenizer=str(tokenizer_dir),
                val_fraction=0.1, shard_tokens=500, progress=False)
    assert a["splits"] == b["splits"]
    assert 10 <= a["splits"]["val"]["documents"] <= 50  # ~10% of 300
    assert len(a["splits"]["train"]["shards"]) > 1
    w = TokenWindows(tmp_path / "a", "train", 17, 16)
    # windows of T+1 stepping by T inside each shard: consecutive windows share one token
    assert w[0][-1] == w[1][0]
    first = np.fromfile(tmp_path / "a" / "train-00000.bin", dtype=np.uint16)
    assert w[0].tolist() == first[:17].tolist()


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": broken}\n', r"bad\.jsonl:2: invalid JSON"),
    ('{"text": "ok"}\n{"body": "no text field"}\n', r"bad\.jsonl:2: no field 'text'"),
    ('{"text": 5}\n', r"bad\.jsonl:1: field 'text' is int"),
    ("\n\n   \n", "corpus is empty"),
])
def test_malformed_input_names_file_and_line_and_leaves_nothing(tmp_path, tokenizer_dir, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(CorelmError, match=message):
        prepare(tmp_path / "out", inputs=[str(tmp_path / "bad.jsonl")], tokenizer=str(tokenizer_dir), progress=False)
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path, "out")


def test_unreadable_and_missing_inputs(tmp_path, tokenizer_dir):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CorelmError, match=r"latin1\.txt: not UTF-8"):
        prepare(tmp_path / "out", inputs=[str(tmp_path / "latin1.txt")], tokenizer=str(tokenizer_dir), progress=False)
    with pytest.raises(CorelmError, match="input not found"):
        prepare(tmp_path / "out", inputs=[str(tmp_path / "nope.txt")], tokenizer=str(tokenizer_dir), progress=False)
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path, "out")


def test_existing_output_needs_overwrite(tmp_path, tokenizer_dir):
    (tmp_path / "a.txt").write_text("the model reads a file")
    prepare(tmp_path / "out", inputs=[str(tmp_path / "a.txt")], tokenizer=str(tokenizer_dir), progress=False)
    with pytest.raises(CorelmError, match="--overwrite"):
        prepare(tmp_path / "out", inputs=[str(tmp_path / "a.txt")], tokenizer=str(tokenizer_dir), progress=False)


def test_default_tokenizer_has_mlm_specials_and_exact_vocab(tokenizer_dir):
    m = read_manifest(tokenizer_dir)
    ids = m["special_token_ids"]
    assert {"eos_token", "mask_token", "cls_token", "sep_token", "pad_token"} <= set(ids)
    tok = Tokenizer.from_dir(tokenizer_dir)
    assert m["vocab_size"] == tok.vocab_size <= 300
    assert tok.decode([ids["mask_token"]]) == "<mask>"


def test_python_docs_are_signatures_with_docstrings():
    docs = list(itertools.islice(python_docs(), 300))
    defs = [d for d in docs if d.startswith(("def ", "class "))]
    assert len(defs) > 100
    for d in defs:
        head, body = d.split("\n", 1)
        assert head.endswith(":") and body.lstrip().startswith('"""') and body.rstrip().endswith('"""')
        compile(d + "\n", "<doc>", "exec")  # every document is valid Python

"""Task-data readers, sub-word label alignment, chat loss masks and the demo sets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from corelm.data import tasks
from corelm.errors import CorelmError


def test_classification_csv_and_jsonl_with_bad_rows(tmp_path: Path) -> None:
    good = tmp_path / "a.csv"
    good.write_text('text,label\n"great, really",pos\nawful,neg\n', encoding="utf-8")
    assert tasks.read_classification(good).items == [("great, really", "pos"), ("awful", "neg")]

    bad = tmp_path / "b.csv"
    bad.write_text("text,label\nfine,pos\n,neg\nok,neg,extra\nyes,pos\n", encoding="utf-8")
    with pytest.raises(CorelmError, match=r"b\.csv:3: empty text"):
        tasks.read_classification(bad)
    rows = tasks.read_classification(bad, skip_bad=True)
    assert rows.items == [("fine", "pos"), ("yes", "pos")] and rows.skipped == 2
    assert "skipped 2 bad row(s)" in rows.note()

    jl = tmp_path / "c.jsonl"
    jl.write_text('{"t": "x y", "y": 1}\n\n{"t": "z"}\n{not json\n', encoding="utf-8")
    with pytest.raises(CorelmError, match=r"c\.jsonl:3: missing field 'y'"):
        tasks.read_classification(jl, "t", "y")
    rows = tasks.read_classification(jl, "t", "y", skip_bad=True)
    assert rows.items == [("x y", "1")] and rows.skipped == 2
    with pytest.raises(CorelmError, match="lacks"):
        tasks.read_classification(good, text_field="review")


def test_conll_reader_docstart_blank_lines_iob1_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "t.conll"
    f.write_text("-DOCSTART- -X- O O\n\nEU NNP B-NP I-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP I-MISC\n\n"
                 "Peter NNP B-NP I-PER\nBlackburn NNP B-NP I-PER\n", encoding="utf-8")
    rows = tasks.read_conll(f, scheme="iob1")
    assert rows.items == [(["EU", "rejects", "German"], ["B-ORG", "O", "B-MISC"]),
                          (["Peter", "Blackburn"], ["B-PER", "I-PER"])]
    assert tasks.ner_labels(rows.items) == ["O", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    g = tmp_path / "bad.conll"
    g.write_text("a O\nb X-PER\n\nc B-LOC\n", encoding="utf-8")
    with pytest.raises(CorelmError, match=r"bad\.conll:2: tag 'X-PER' is not BIO"):
        tasks.read_conll(g)
    rows = tasks.read_conll(g, skip_bad=True)
    assert rows.items == [(["c"], ["B-LOC"])] and rows.skipped == 1


def test_subword_alignment_equals_tokenizers_word_ids() -> None:
    """Labels sit on the first sub-word of each word, as with HF fast tokenizers' ``word_ids()``."""
    from tokenizers import Tokenizer as Raw

    from corelm.presets import embedded_path
    from corelm.tokenizer import Tokenizer

    path = embedded_path("minilm-l6")
    ours, raw = Tokenizer.from_dir(path), Raw.from_file(str(path / "tokenizer.json"))
    raw.no_padding()  # the file pads to 128 for sentence-transformers
    words = ["Raymond", "Hettinger", "visited", "Kuala", "Lumpur", "."]
    enc = tasks.encode_words(ours, words, max_len=64, word_labels=[1, 2, 0, 3, 4, 0])
    ref = raw.encode(words, is_pretokenized=True)
    assert enc["input_ids"] == ref.ids
    first = [w if w is not None and (i == 0 or ref.word_ids[i - 1] != w) else -1 for i, w in enumerate(ref.word_ids)]
    assert enc["word_index"] == first
    assert len(enc["input_ids"]) > len(words) + 2  # some words really are split into several pieces
    want = [[1, 2, 0, 3, 4, 0][w] if w >= 0 else tasks.IGNORE for w in first]
    assert enc["labels"] == want
    short = tasks.encode_words(ours, words, max_len=6)  # [CLS] + 4 pieces + [SEP]: later words cut off
    assert len(short["input_ids"]) <= 6 and short["input_ids"][-1] == ref.ids[-1]


def test_chat_loss_mask_covers_assistant_tokens_only(tmp_path: Path) -> None:
    from corelm.api import gguf_tokenizer
    from corelm.presets import embedded_path

    tok = gguf_tokenizer(str(embedded_path("smollm2-135m-instruct")))
    messages = [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."},
                {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Eleven."}]
    enc = tasks.encode_chat(tok, messages, max_len=512)
    # segment-wise encoding equals encoding the whole rendered conversation (ChatML: boundaries are tokens)
    assert enc["input_ids"] == tok.encode(tok.apply_chat_template(messages, add_generation_prompt=False))
    learned = [i for i, label in zip(enc["input_ids"], enc["labels"]) if label != tasks.IGNORE]
    assert tok.decode(learned) == "Seven.<|im_end|>\nEleven.<|im_end|>\n"
    assert all(label in (tasks.IGNORE, i) for i, label in zip(enc["input_ids"], enc["labels"]))

    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"messages": messages}) + "\n" + json.dumps([{"role": "user", "content": "hi"}]) + "\n")
    with pytest.raises(CorelmError, match=r"c\.jsonl:2: no assistant message"):
        tasks.read_chat(f)
    assert tasks.read_chat(f, skip_bad=True).skipped == 1


def test_collate_pads_right_and_ignores_padding() -> None:
    batch = tasks.collate([{"input_ids": [5, 6, 7], "labels": [1, -100, 2]}, {"input_ids": [8], "labels": [3]}], 0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[1, -100, 2], [3, -100, -100]]


def test_demo_sets_are_real_and_splits_disjoint() -> None:
    from corelm.data.demo import CLASSIFY_PACKAGES, resolve

    splits = {}
    for s in ("train", "val", "test"):
        with open(resolve(f"demo:packages:{s}"), encoding="utf-8") as f:
            splits[s] = list(csv.DictReader(f))
    texts = {s: {r["text"] for r in rows} for s, rows in splits.items()}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["val"]
    assert {r["label"] for r in splits["test"]} == set(CLASSIFY_PACKAGES)
    assert any("event loop" in t for t in texts["train"])  # stdlib docstrings, not synthetic text
    ner = tasks.read_conll(resolve("demo:ner:test")).items
    assert len(ner) == 150 and any(t.startswith("I-") for _, tags in ner for t in tags)
    pairs = tasks.read_pairs(resolve("demo:summaries:test")).items
    assert pairs and all(len(src.split()) >= 12 for src, _ in pairs)
    with pytest.raises(CorelmError, match="unknown demo set"):
        resolve("demo:pakages")

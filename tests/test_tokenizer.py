"""Tokenizer parity with transformers (ids, chat template, saved files), streaming and training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corelm.errors import CorelmError
from corelm.io.gguf import read_gguf
from corelm.presets import embedded_path
from corelm.tokenizer import Tokenizer, iter_texts, train_tokenizer

MIXED = (
    "The quick brown fox jumps over the lazy dog in 2024; it's 3.14159 times faster!\n"
    "def fibonacci(n: int) -> int:\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)  # O(2^n)\n"
    "机器学习是人工智能的一个分支。你好，世界！\t  Multiple   spaces and\ttabs.\n"
    "Emoji: 🤗🚀👩‍💻 🇫🇷 café naïve Zürich — “quotes” «guillemets» <|im_start|> user\n"
)
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 你好 🤗?"}],
]


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return Tokenizer.from_gguf(read_gguf(embedded_path("smollm2-135m-instruct")))


@pytest.fixture(scope="module")
def smol_ref():
    from transformers import AutoTokenizer

    path = embedded_path("smollm2-135m-instruct")
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def minilm() -> Tokenizer:
    return Tokenizer.from_dir(embedded_path("minilm-l6"))


def test_smollm2_ids_equal_transformers(smol: Tokenizer, smol_ref) -> None:
    for text in (MIXED, *MIXED.splitlines(), " leading space", "", "12345678"):
        assert smol.encode(text) == smol_ref.encode(text, add_special_tokens=False), text
    assert smol.decode(smol.encode(MIXED)) == MIXED


def test_smollm2_special_tokens(smol: Tokenizer, smol_ref) -> None:
    assert smol.eos_token_id == smol_ref.eos_token_id == smol.token_to_id("<|im_end|>")
    assert smol.bos_token_id == smol_ref.bos_token_id
    assert smol.vocab_size == len(smol_ref) == 49152
    assert smol.encode("<|im_start|>")[0] == smol.token_to_id("<|im_start|>")  # kept whole
    assert smol.decode(smol.encode("a<|im_end|>b"), skip_special_tokens=True) == "ab"


def test_digits_split_one_by_one(smol: Tokenizer) -> None:
    """llama.cpp's ``smollm`` pre-tokenizer splits every digit (``\\p{N}`` rule)."""
    ids = smol.encode("2024")
    assert [smol.decode([i]) for i in ids] == ["2", "0", "2", "4"]


def test_minilm_ids_equal_transformers(minilm: Tokenizer) -> None:
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(embedded_path("minilm-l6")))
    long_text = MIXED * 20  # longer than the tokenizer.json's built-in 128-token truncation
    for text in (MIXED, long_text, "Hello, World!"):
        assert minilm.encode(text, add_special_tokens=True) == ref.encode(text), text[:40]
        assert minilm.encode(text) == ref.encode(text, add_special_tokens=False)
    assert minilm.pad_token_id == ref.pad_token_id == 0


def test_chat_template_byte_identical(smol: Tokenizer, smol_ref) -> None:
    for messages in CONVERSATIONS:
        for gen in (True, False):
            ours = smol.apply_chat_template(messages, add_generation_prompt=gen)
            ref = smol_ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours == ref


def test_chat_template_environment_matches_transformers() -> None:
    """trim/lstrip blocks, raise_exception and a non-escaping tojson, as transformers renders them."""
    from transformers.utils.chat_template_utils import render_jinja_template

    template = ("{% for m in messages %}\n    {% if m['role'] == 'bad' %}{{ raise_exception('no bad roles') }}"
                "{% endif %}\n  <{{ m['role'] }}>{{ m | tojson }}\n{% endfor %}\n{{ bos_token }}")
    tok = Tokenizer.from_gguf(read_gguf(embedded_path("smollm2-135m-instruct")))
    tok.chat_template = template
    messages = [{"role": "user", "content": "<b>&'\"é"}]
    ref = render_jinja_template([messages], chat_template=template, add_generation_prompt=False,
                                bos_token=tok.special_tokens_map["bos_token"])[0][0]
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == ref
    with pytest.raises(CorelmError, match="no bad roles"):
        tok.apply_chat_template([{"role": "bad", "content": ""}])


def test_stream_decoder_never_emits_broken_utf8(smol: Tokenizer, minilm: Tokenizer) -> None:
    for tok in (smol, minilm):
        text = "Emoji 🤗🚀👩‍💻 and 机器学习 mixed, unbelievably ok."
        ids = tok.encode(text)
        pieces = list(iter_texts(tok, ids))
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
        assert len(pieces) > 5  # it streams, not one piece at the end
    emoji_ids = smol.encode("🤗")
    assert len(emoji_ids) > 1  # a multi-token character: the first pieces must be held back
    dec = smol.stream_decoder()
    assert [dec.push(i) for i in emoji_ids] == [""] * (len(emoji_ids) - 1) + ["🤗"]


def test_save_loads_in_transformers(smol: Tokenizer, smol_ref, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    smol.save(tmp_path)
    ref = AutoTokenizer.from_pretrained(str(tmp_path))
    assert ref.encode(MIXED, add_special_tokens=False) == smol.encode(MIXED)
    assert ref.eos_token == "<|im_end|>"
    msgs = CONVERSATIONS[1]
    assert ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        smol_ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    again = Tokenizer.from_dir(tmp_path)
    assert again.encode(MIXED) == smol.encode(MIXED) and again.chat_template == smol.chat_template
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_train_tokenizer(kind: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(("Transformers learn from tokens. Tokenizers split text into tokens; "
                       "byte-level BPE never needs an unknown token. 机器学习\n") * 50)
    tok = train_tokenizer([corpus], kind=kind, vocab_size=300, show_progress=False)
    assert tok.vocab_size <= 300
    text = "Tokenizers learn tokens"
    ids = tok.encode(text)
    assert len(ids) < len(text)  # merges were learned
    decoded = tok.decode(ids, skip_special_tokens=True)
    if kind == "bpe":
        assert decoded == text and tok.decode(tok.encode("unseen ⚡ text")) == "unseen ⚡ text"
    else:
        assert decoded == text.lower()
        with_special = tok.encode(text, add_special_tokens=True)
        assert with_special[0] == tok.token_to_id("[CLS]") and with_special[-1] == tok.token_to_id("[SEP]")
    tok.save(tmp_path / "out")
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tmp_path / "out")).encode(text, add_special_tokens=False) == ids


def test_bad_inputs(tmp_path: Path, smol: Tokenizer) -> None:
    with pytest.raises(CorelmError, match="training file not found"):
        train_tokenizer([tmp_path / "nope.txt"])
    with pytest.raises(CorelmError, match="unknown tokenizer kind"):
        (tmp_path / "a.txt").write_text("abc")
        train_tokenizer([tmp_path / "a.txt"], kind="unigram")
    with pytest.raises(CorelmError, match="tokenizer file not found"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
    md = dict(read_gguf(embedded_path("smollm2-135m-instruct")).metadata)
    md["tokenizer.ggml.pre"] = "mystery-pre"

    class Fake:
        metadata = md

    with pytest.raises(CorelmError, match="pre-tokenizer 'mystery-pre' is not supported"):
        Tokenizer.from_gguf(Fake())
    with pytest.raises(CorelmError, match="list of"):
        smol.apply_chat_template("hello")  # type: ignore[arg-type]

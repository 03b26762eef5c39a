"""The embedded models end to end against transformers: SmolLM2 (GGUF Q4_1, dequantized to fp32)
and all-MiniLM-L6-v2 (BERT encoder, sentence embeddings).

The SmolLM2 reference is transformers loading the directory ``corelm convert`` writes (seconds),
rather than transformers' own GGUF loader (tens of seconds). That loader is checked independently,
on a tiny file with every tensor type, in ``test_gguf.py``, together with corelm's dequantization
against ``gguf.quants.dequantize`` on the embedded file's own Q4_1/Q8_0/F32 tensors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import corelm
from corelm.api import LLM, Encoder
from corelm.commands.convert import convert
from corelm.presets import embedded_path

pytestmark = pytest.mark.slow

PROMPT = "The three laws of thermodynamics are"
LONG_TEXT = (
    "Thermodynamics studies heat, work and energy. The first law says energy is conserved; the second "
    "that entropy of an isolated system never decreases; the third that entropy approaches a constant "
    "as temperature approaches absolute zero. def carnot(t_hot, t_cold): return 1 - t_cold / t_hot\n"
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on the shared 2-core machine a second thread mostly waits (and 2x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llm() -> LLM:
    loaded = corelm.load("smollm2-135m-instruct", dtype="fp32")
    assert isinstance(loaded, LLM)
    return loaded


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert("smollm2-135m-instruct", tmp_path_factory.mktemp("export") / "smollm2-hf")


@pytest.fixture(scope="module")
def ref(exported: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32).eval()


def test_export_layout_and_tokenizer(exported: Path, llm: LLM) -> None:
    from transformers import AutoTokenizer

    assert {p.name for p in exported.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                     "tokenizer_config.json"}
    tok = AutoTokenizer.from_pretrained(str(exported))
    text = "Hello 世界 🤗 def f(x): return 42"
    assert tok.encode(text, add_special_tokens=False) == llm.tokenizer.encode(text)


def test_logits_match_transformers(llm: LLM, ref) -> None:
    ids = torch.tensor([llm.tokenizer.encode(PROMPT)])
    with torch.inference_mode():
        torch.testing.assert_close(llm.model(ids), ref(ids).logits, atol=1e-3, rtol=1e-3)


def test_long_context_logits_match_transformers(llm: LLM, ref) -> None:
    ids = llm.tokenizer.encode(LONG_TEXT * 40)[:1500]
    assert len(ids) == 1500
    x = torch.tensor([ids])
    with torch.inference_mode():
        # the far positions are where RoPE/attention errors show; project only those to the vocabulary
        ours = llm.model.lm_head(llm.model.hidden_states(x)[:, -256:])[0]
        theirs = ref(x, logits_to_keep=256).logits[0]
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-3)


def test_greedy_64_tokens_identical(llm: LLM, ref) -> None:
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Explain self-attention."}])
    ids = llm.tokenizer.encode(prompt)
    ours = llm.generate_ids(ids, max_new_tokens=64, ignore_eos=True)
    with torch.inference_mode():
        # The exported config names no EOS, so transformers runs all 64 steps, like ignore_eos.
        # (Not min_new_tokens: its EOS-masking processor changes transformers' own greedy choice here.)
        out = ref.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False)
    theirs = out[0, len(ids):].tolist()
    assert len(theirs) == len(ours) == 64
    assert ours == theirs


def test_generate_stream_chat_and_stop(llm: LLM) -> None:
    pieces = list(llm.stream(PROMPT, max_new_tokens=12, ignore_eos=True))
    text = "".join(pieces)
    assert len(pieces) > 3
    ids = llm.tokenizer.encode(PROMPT)
    assert text == llm.tokenizer.decode(llm.generate_ids(ids, max_new_tokens=12, ignore_eos=True))
    cut = text.strip().split()[2]  # a word the greedy continuation contains
    stopped = llm.generate(PROMPT, max_new_tokens=12, ignore_eos=True, stop=[cut])
    assert stopped == text[: text.index(cut)] and cut not in stopped
    reply = llm.chat([{"role": "user", "content": "Say hello."}], max_new_tokens=8)
    assert reply and "<|im_end|>" not in reply and "<|im_start|>" not in reply
    a = llm.generate(PROMPT, max_new_tokens=4, temperature=0.9, seed=7, ignore_eos=True)
    b = llm.generate(PROMPT, max_new_tokens=4, temperature=0.9, seed=7, ignore_eos=True)
    assert a == b


@pytest.fixture(scope="module")
def minilm() -> Encoder:
    enc = corelm.load("minilm-l6", dtype="fp32")
    assert isinstance(enc, Encoder)
    return enc


@pytest.fixture(scope="module")
def bert_ref():
    from transformers import BertModel

    return BertModel.from_pretrained(str(embedded_path("minilm-l6"))).eval()


SENTENCES = ["A man is eating food.", "Un homme mange.", "机器学习很有趣 🤗",
             "A much longer sentence about transformers, attention and padding masks, to force padding."]


def test_minilm_hidden_states_with_padding(minilm: Encoder, bert_ref) -> None:
    ids, mask = minilm.encode_batch(SENTENCES)
    assert (mask == 0).any()  # the batch really is padded
    with torch.inference_mode():
        ours = minilm.model(ids, attention_mask=mask)
        theirs = bert_ref(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)


def test_minilm_embed_is_mean_pool_then_normalize(minilm: Encoder, bert_ref) -> None:
    vecs = minilm.embed(SENTENCES)
    assert vecs.shape == (len(SENTENCES), 384)
    ids, mask = minilm.encode_batch(SENTENCES)
    with torch.inference_mode():
        hidden = bert_ref(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    torch.testing.assert_close(vecs, expected, atol=1e-4, rtol=1e-4)
    # one at a time (no padding) gives the same vectors as the padded batch
    torch.testing.assert_close(minilm.embed(SENTENCES[:1]), vecs[:1], atol=1e-5, rtol=1e-5)
    sims = vecs @ vecs.T
    assert sims[0, 1] > sims[0, 2]  # the French paraphrase is closer than the unrelated Chinese

"""GGUF reading: dequantization vs the gguf package, Q/K un-permutation and config vs transformers,
packed blocks, and clear errors for files corelm cannot read.

A tiny llama GGUF is written here with ``gguf.GGUFWriter`` from a random transformers Llama, its Q/K
rows permuted with llama.cpp's formula and its tensors in every supported type, so transformers'
own GGUF loader is an independent reference that runs in seconds.
"""

from __future__ import annotations

import functools
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import corelm
from corelm.errors import CorelmError
from corelm.io.gguf import config_from_gguf, dequantize, permute_rows, quant_blocks, read_gguf, unpermute_rows
from corelm.presets import embedded_path

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False}
# One tensor type per matrix, so every supported type is exercised by the logits check.
LAYER_TYPES = {"attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q8_0, "attn_output": Q.BF16,
               "ffn_gate": Q.Q4_0, "ffn_up": Q.Q4_1, "ffn_down": Q.F16}
HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py ``LlamaModel.permute``, written out independently of corelm."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


CHAT_TEMPLATE = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|endoftext|>assistant: {% endif %}")
CORPUS = ("The quick brown fox jumps over the lazy dog. Hello world, this is a tiny corpus for a tiny "
          "byte-level BPE used by GGUF tests. def f(x): return x * 2  # code\n") * 20


@functools.lru_cache(maxsize=1)
def tiny_vocab() -> dict:
    """A small byte-level BPE (tokens, merges, types) trained on a small corpus, GGUF-style."""
    import json
    import tempfile

    from corelm.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "corpus.txt"
        f.write_text(CORPUS)
        tok = train_tokenizer([f], kind="bpe", vocab_size=512, min_frequency=1, show_progress=False)
    model = json.loads(tok.backend.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    assert 300 < len(tokens) <= 512, len(tokens)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t == "<|endoftext|>" else 1 for t in tokens]
    return {"tokens": tokens, "merges": merges, "types": types}


def _add(writer: gguf.GGUFWriter, name: str, w: np.ndarray, qtype: Q) -> None:
    w = np.ascontiguousarray(w, dtype=np.float32)
    if qtype == Q.F32:
        writer.add_tensor(name, w)
    elif qtype == Q.F16:
        writer.add_tensor(name, w.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)


def write_tiny_gguf(path: Path, *, arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    """Write a tiny random llama (SmolLM2's tokenizer, so text works) and return the HF model it came from."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    vocab = tiny_vocab()
    hf = LlamaForCausalLM(LlamaConfig(**TINY, vocab_size=len(vocab["tokens"]))).eval()
    with torch.no_grad():  # norms away from 1 so a mix-up of norm tensors shows
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(TINY["num_hidden_layers"])
    w.add_context_length(TINY["max_position_embeddings"])
    w.add_embedding_length(TINY["hidden_size"])
    w.add_feed_forward_length(TINY["intermediate_size"])
    w.add_head_count(TINY["num_attention_heads"])
    w.add_head_count_kv(TINY["num_key_value_heads"])
    w.add_rope_freq_base(TINY["rope_theta"])
    w.add_layer_norm_rms_eps(TINY["rms_norm_eps"])
    w.add_rope_dimension_count(TINY["hidden_size"] // TINY["num_attention_heads"])
    w.add_vocab_size(len(vocab["tokens"]))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(vocab["tokens"])
    w.add_token_merges(vocab["merges"])
    w.add_token_types(vocab["types"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_chat_template(CHAT_TEMPLATE)
    _add(w, "token_embd.weight", sd["model.embed_tokens.weight"], Q.F16)
    for i in range(TINY["num_hidden_layers"]):
        p = f"model.layers.{i}."
        _add(w, f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"], Q.F32)
        _add(w, f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], Q.F32)
        for g, qtype in LAYER_TYPES.items():
            t = sd[p + HF_NAMES[g] + ".weight"]
            if g == "attn_q":
                t = llamacpp_permute(t, TINY["num_attention_heads"])
            elif g == "attn_k":
                t = llamacpp_permute(t, TINY["num_key_value_heads"])
            _add(w, f"blk.{i}.{g}.weight", t, qtype)
    _add(w, "output_norm.weight", sd["model.norm.weight"], Q.F32)
    _add(w, "output.weight", sd["lm_head.weight"], Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_tiny_gguf(path)
    return path


def test_tiny_gguf_logits_match_transformers_gguf_loader(tiny_gguf: Path) -> None:
    """corelm vs transformers, both reading the same GGUF (Q4_0/Q4_1/Q8_0/BF16/F16/F32, permuted Q/K)."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name,
                                               dtype=torch.float32).eval()
    llm = corelm.load(tiny_gguf, dtype="fp32")
    assert isinstance(llm, corelm.api.LLM)
    ids = torch.tensor([llm.tokenizer.encode("Hello world, the quick brown fox: def f(x): return 123")])
    assert ids.shape[1] > 8
    with torch.inference_mode():
        torch.testing.assert_close(llm.model(ids), ref(ids).logits, atol=1e-5, rtol=1e-5)


def test_tiny_gguf_close_to_original_weights(tiny_gguf: Path) -> None:
    """Un-permuted Q/K equal the original HF rows up to quantization error (a wrong permutation is O(1) off)."""
    hf = write_tiny_gguf(tiny_gguf.with_name("again.gguf"))
    g = read_gguf(tiny_gguf.with_name("again.gguf"))
    for name, heads in (("attn_q", TINY["num_attention_heads"]), ("attn_k", TINY["num_key_value_heads"])):
        ours = unpermute_rows(g.tensor(f"blk.0.{name}.weight"), heads)
        orig = hf.state_dict()[f"model.layers.0.{HF_NAMES[name]}.weight"]
        assert (ours - orig).abs().max() < 0.25 * orig.abs().max()  # 4-bit error bound, not a row swap
        wrong = g.tensor(f"blk.0.{name}.weight")  # still permuted
        assert (wrong - orig).abs().max() > (ours - orig).abs().max()


def test_permutation_round_trip() -> None:
    w = torch.randn(8 * 16, 5)
    torch.testing.assert_close(unpermute_rows(permute_rows(w, 8), 8), w, atol=0, rtol=0)
    torch.testing.assert_close(permute_rows(w, 8), torch.from_numpy(llamacpp_permute(w.numpy(), 8)))


def test_config_from_gguf(tiny_gguf: Path) -> None:
    cfg = config_from_gguf(read_gguf(tiny_gguf))
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.d_ff, cfg.head_dim) == (2, 64, 4, 2, 128, 16)
    assert cfg.max_seq_len == 256 and cfg.vocab_size == len(tiny_vocab()["tokens"]) and not cfg.tie_embeddings
    assert cfg.norm_eps == pytest.approx(1e-5) and cfg.rope_theta == 10000.0
    emb = config_from_gguf(read_gguf(embedded_path("smollm2-135m-instruct")))
    assert emb.tie_embeddings and (emb.n_layer, emb.n_head, emb.n_kv_head, emb.rope_theta) == (30, 9, 3, 100000.0)


def test_reader_agrees_with_gguf_reader(tiny_gguf: Path) -> None:
    """corelm's parser finds the same tensors (name, shape, type, bytes) and metadata as ``gguf.GGUFReader``."""
    reader = gguf.GGUFReader(str(tiny_gguf))
    ours = read_gguf(tiny_gguf)
    assert [t.name for t in reader.tensors] == list(ours.tensors)
    for t in reader.tensors:
        info = ours.tensors[t.name]
        assert info.qtype == t.tensor_type and info.shape == tuple(int(d) for d in reversed(t.shape))
        np.testing.assert_array_equal(ours.raw(t.name), np.asarray(t.data).reshape(-1).view(np.uint8))
    for key in ("llama.block_count", "llama.attention.head_count_kv", "tokenizer.ggml.tokens",
                "tokenizer.ggml.merges", "tokenizer.chat_template"):
        assert ours.metadata[key] == reader.fields[key].contents()


def test_tokenizer_from_gguf_reader(tiny_gguf: Path) -> None:
    """``Tokenizer.from_gguf`` also takes the gguf package's own reader."""
    from corelm.tokenizer import Tokenizer

    ours = Tokenizer.from_gguf(read_gguf(tiny_gguf))
    theirs = Tokenizer.from_gguf(gguf.GGUFReader(str(tiny_gguf)))
    text = "the quick brown fox: def f(x): return 1"
    assert ours.encode(text) == theirs.encode(text) and theirs.chat_template == CHAT_TEMPLATE


def test_dequantize_equals_gguf_reference_every_type(tiny_gguf: Path) -> None:
    """Each tensor type, in the embedded model (Q4_1, Q8_0, F32) and the tiny file (Q4_0, BF16, F16, ...),
    dequantizes exactly as ``gguf.quants.dequantize``."""
    seen = set()
    embedded = read_gguf(embedded_path("smollm2-135m-instruct"))
    tiny = read_gguf(tiny_gguf)
    picks = [(embedded, n) for n in ("token_embd.weight", "blk.0.ffn_gate.weight", "blk.0.attn_norm.weight")]
    picks += [(tiny, n) for n in tiny.tensors]
    for g, name in picks:
        info = g.tensors[name]
        raw = g.raw(name)
        rows = info.shape[0] if len(info.shape) == 2 else 1
        if name == "token_embd.weight" and g is embedded:  # the first 2,048 rows keep it quick
            rows = 2048
            raw = raw[: rows * info.nbytes // info.shape[0]]
        ref = gguf.quants.dequantize(raw.reshape(rows, -1), info.qtype).astype(np.float32)
        mine = dequantize(raw, info.qtype, (rows, -1)).float().numpy()
        np.testing.assert_array_equal(mine, ref.reshape(rows, -1), err_msg=name)
        seen.add(info.qtype)
    assert {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1} <= seen


def test_quant_blocks_rebuild_the_dequantized_weight(tiny_gguf: Path) -> None:
    g = read_gguf(tiny_gguf)
    for name, qtype in (("blk.0.attn_q.weight", Q.Q4_0), ("blk.0.attn_k.weight", Q.Q4_1),
                        ("blk.0.attn_v.weight", Q.Q8_0)):
        heads = {"attn_q": 4, "attn_k": 2}.get(name.split(".")[2])
        qb = quant_blocks(g, name, unpermute_heads=heads)
        assert qb.qtype == qtype
        rows, cols = qb.shape
        if qtype == Q.Q8_0:
            q = qb.qs.float().view(rows, cols // 32, 32)
        else:
            packed = qb.qs.view(rows, cols // 32, 16)
            q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).float()  # (rows, blocks, 32)
            q = q - 8 if qtype == Q.Q4_0 else q
        w = q * qb.scales.float()[..., None]
        if qb.mins is not None:
            w = w + qb.mins.float()[..., None]
        expected = g.tensor(name)
        if heads:
            expected = unpermute_rows(expected, heads)
        torch.testing.assert_close(w.reshape(rows, cols), expected, atol=0, rtol=0)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not gguf" * 10)
    with pytest.raises(CorelmError, match="not a GGUF file"):
        read_gguf(bad)
    with pytest.raises(CorelmError, match="GGUF file not found"):
        read_gguf(tmp_path / "missing.gguf")


def test_truncated_gguf(tiny_gguf: Path, tmp_path: Path) -> None:
    data = tiny_gguf.read_bytes()
    for cut in (10, 5000, len(data) - 1000):
        short = tmp_path / f"cut{cut}.gguf"
        short.write_bytes(data[:cut])
        with pytest.raises(CorelmError, match="truncated|corrupt"):
            read_gguf(short)


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CorelmError, match="unsupported GGUF architecture 'mamba'"):
        config_from_gguf(read_gguf(path))


def test_unsupported_quant_type() -> None:
    raw = np.zeros(40, dtype=np.uint8)  # one Q8_1 block: gguf.quants has no dequantizer for it
    with pytest.raises(CorelmError, match="unsupported GGUF tensor type Q8_1"):
        dequantize(raw, Q.Q8_1, (32,))


# Block layouts of ggml-common.h: byte offsets of each block's fp16 scale fields (d, dmin) per type.
_F16_FIELDS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,), Q.Q2_K: (80, 82),
               Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.IQ4_NL: (0,), Q.IQ4_XS: (0,)}
EVERY_TYPE = [Q.F32, Q.F16, Q.BF16, *_F16_FIELDS]


def _blocks(qtype: Q, rows: int, cols: int, seed: int) -> np.ndarray:
    """Raw bytes of a ``(rows, cols)`` tensor of ``qtype``: gguf-py's quantizer where it has one, else random
    valid blocks (random codes, finite random fp16 scales)."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((rows, cols)).astype(np.float32)
    if qtype == Q.F32:
        return values.view(np.uint8).reshape(-1)
    try:
        return np.ascontiguousarray(gguf.quants.quantize(values, qtype)).view(np.uint8).reshape(-1)
    except NotImplementedError:
        pass
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * cols // block, block_bytes), dtype=np.uint8)
    for offset in _F16_FIELDS[qtype]:
        raw[:, offset:offset + 2] = rng.uniform(-0.1, 0.1, (raw.shape[0], 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(-1)


@pytest.mark.parametrize("qtype", EVERY_TYPE, ids=[t.name for t in EVERY_TYPE])
def test_dequantize_is_bit_exact_against_gguf_py(qtype: Q) -> None:
    """Every tensor type corelm promises reads exactly as gguf-py's reference ``gguf.quants.dequantize``."""
    rows, cols = 3, 512
    raw = _blocks(qtype, rows, cols, seed=qtype.value)
    assert raw.nbytes == rows * cols // gguf.GGML_QUANT_SIZES[qtype][0] * gguf.GGML_QUANT_SIZES[qtype][1]
    if qtype == Q.F32:
        ref = raw.view(np.float32).reshape(rows, cols)
    elif qtype == Q.F16:
        ref = raw.view(np.float16).reshape(rows, cols).astype(np.float32)
    else:
        ref = gguf.quants.dequantize(raw.reshape(rows, -1), qtype).astype(np.float32)
    mine = dequantize(raw, qtype, (rows, cols)).float().numpy()
    assert np.isfinite(ref).all() and np.count_nonzero(ref) > rows * cols // 2  # real values, not all zero
    np.testing.assert_array_equal(mine, ref)


def test_unsupported_type_lists_what_corelm_reads() -> None:
    with pytest.raises(CorelmError) as info:
        dequantize(np.zeros(36, dtype=np.uint8), Q.Q8_1, (32,))
    message = str(info.value)
    assert "\n" not in message
    for name in ("F32", "BF16", "Q4_0", "Q5_1", "Q2_K", "Q6_K", "IQ4_NL", "IQ4_XS"):
        assert name in message

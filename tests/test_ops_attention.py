"""Attention paths, RoPE tables and the KV cache."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from corelm.config import ModelConfig
from corelm.errors import CorelmError
from corelm.models import build_model
from corelm.ops.attention import causal_mask, reference_attention, sdpa_attention, set_attention_impl
from corelm.ops.kv_cache import KVCache
from corelm.ops.rope import rope_inv_freq


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_reference_and_sdpa_agree(n_kv_head):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 16, generator=g)
    k = torch.randn(2, n_kv_head, 9, 16, generator=g)
    v = torch.randn(2, n_kv_head, 9, 16, generator=g)
    torch.testing.assert_close(reference_attention(q, k, v, is_causal=True), sdpa_attention(q, k, v, is_causal=True))
    pad = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])  # row 1 right-padded
    mask = causal_mask(torch.arange(9)[None].expand(2, 9), 9, pad)
    out_ref, out_fast = reference_attention(q, k, v, mask), sdpa_attention(q, k, v, mask)
    torch.testing.assert_close(out_ref, out_fast)
    assert torch.isfinite(out_ref).all()
    # and both equal the formula written with explicit loops for one query
    b, h, t = 1, 3, 4
    kh = h // (4 // n_kv_head)
    w = torch.softmax(q[b, h, t] @ k[b, kh, : t + 1].T / 4.0, dim=-1)
    torch.testing.assert_close(out_ref[b, h, t], w @ v[b, kh, : t + 1])


def test_unknown_attention_impl_is_a_clear_error():
    with pytest.raises(CorelmError, match="reference"):
        set_attention_impl("flash9")


def test_causal_mask_semantics():
    pos = torch.tensor([[2], [0]])
    mask = causal_mask(pos, 4)  # (B, 1, T, S)
    assert mask.shape == (2, 1, 1, 4)
    assert mask[0, 0, 0].tolist() == [True, True, True, False]
    assert mask[1, 0, 0].tolist() == [True, False, False, False]


@pytest.mark.parametrize("scaling", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "linear", "factor": 4.0},
])
def test_rope_scaling_matches_transformers(scaling):
    hf_config = transformers.LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_theta=500000.0,
                                         rope_scaling=dict(scaling), max_position_embeddings=131072)
    expected, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf_config, "cpu")
    torch.testing.assert_close(rope_inv_freq(64, 500000.0, scaling), expected, atol=0, rtol=1e-6)
    assert not torch.allclose(rope_inv_freq(64, 500000.0, None), expected)


def test_unknown_rope_scaling_is_a_clear_error():
    with pytest.raises(CorelmError, match="longrope"):
        rope_inv_freq(64, 10000.0, {"rope_type": "ntk-by-parts-9", "factor": 2.0})


LONG = [1.0 + 0.1 * i for i in range(12)]
SHORT = [1.0 + 0.01 * i for i in range(12)]


@pytest.mark.parametrize("params, partial", [
    ({"rope_type": "default"}, 1.0),
    ({"rope_type": "default"}, 0.75),  # partial rotary (Phi-4-mini): only 24 of 32 channels rotate
    ({"rope_type": "linear", "factor": 4.0}, 1.0),
    ({"rope_type": "dynamic", "factor": 2.0}, 1.0),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64}, 1.0),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, 1.0),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16,
      "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5}, 1.0),
    ({"rope_type": "longrope", "long_factor": LONG, "short_factor": SHORT,
      "original_max_position_embeddings": 64}, 0.75),
])
@pytest.mark.parametrize("seq_len", [None, 100, 300])  # within and beyond the 256 (and original 64) positions
def test_rope_variants_match_transformers(params, partial, seq_len):
    """Inverse frequencies and attention factor equal transformers' rope init functions, for any length."""
    from corelm.ops.rope import RopeTable, rope_parameters

    head_dim = 32
    hf_config = transformers.LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=256,
                                         rope_parameters={"rope_theta": 10000.0, **params,
                                                          "partial_rotary_factor": partial})
    rope_type = params["rope_type"]
    expected, factor = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu", seq_len=seq_len) if rope_type != "default" \
        else (1.0 / 10000.0 ** (torch.arange(0, int(head_dim * partial), 2).float() / int(head_dim * partial)), 1.0)
    scaling = None if rope_type == "default" else params
    rot = int(head_dim * partial)
    inv_freq, ours = rope_parameters(rot, 10000.0, scaling, max_seq_len=256, seq_len=seq_len)
    torch.testing.assert_close(inv_freq, expected.float(), atol=0, rtol=1e-6)
    assert ours == pytest.approx(factor, rel=1e-9)
    # the table a forward reads follows the length as HF's dynamic/longrope update does
    n = seq_len or 10
    table = RopeTable(head_dim, 10000.0, scaling, rotary_dim=rot, max_seq_len=256)
    cos, sin = table(torch.arange(n)[None])
    want = torch.arange(n).float()[:, None] * (
        ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu", seq_len=n)[0] if rope_type != "default" else expected)
    want = torch.cat((want, want), -1)
    torch.testing.assert_close(cos[0, 0], want.cos() * factor, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sin[0, 0], want.sin() * factor, atol=1e-5, rtol=1e-5)


def test_cache_rows_view_writes_parent():
    cache = KVCache(n_layer=1, batch=3, n_kv_head=2, max_seq_len=8, head_dim=4)
    view = cache.rows(slice(1, 2))
    new = torch.ones(1, 2, 2, 4)
    view.update(0, torch.tensor([[3, 4]]), new, 2 * new, n_keys=5)
    assert cache.k[0][1, :, 3:5].eq(1).all() and cache.v[0][1, :, 3:5].eq(2).all()
    assert cache.k[0][[0, 2]].eq(0).all() and cache.k[0][1, :, :3].eq(0).all()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_decoding_equals_full_forward(family):
    """Right-padded prefill of two prompts, then one token at a time per row, equals a full forward."""
    torch.manual_seed(0)
    config = ModelConfig(family=family, vocab_size=61, n_layer=2, n_head=4, n_kv_head=2 if family == "llama" else None,
                         d_model=32, max_seq_len=64)
    model = build_model(config).eval()
    seqs = [torch.randint(0, 61, (14,)), torch.randint(0, 61, (11,))]
    prompt_lens = [6, 3]
    cache = KVCache.for_model(config, batch=2, max_seq_len=32, dtype=torch.float32)
    T = max(prompt_lens)
    prompt = torch.zeros(2, T, dtype=torch.long)
    for b, n in enumerate(prompt_lens):
        prompt[b, :n] = seqs[b][:n]
    with torch.no_grad():
        logits = model(prompt, kv_cache=cache)  # positions 0..T-1 for both rows
        got = [[logits[b, n - 1]] for b, n in enumerate(prompt_lens)]
        for step in range(8):
            pos = torch.tensor([[n + step] for n in prompt_lens])
            ids = torch.stack([seqs[b][n + step] for b, n in enumerate(prompt_lens)])[:, None]
            out = model(ids, input_pos=pos, kv_cache=cache)
            for b in range(2):
                got[b].append(out[b, 0])
        for b, n in enumerate(prompt_lens):
            full = model(seqs[b][None, : n + 8])[0, n - 1:]
            torch.testing.assert_close(torch.stack(got[b]), full, atol=1e-5, rtol=1e-5)

"""GGUF export of every family: written under llama.cpp's architecture and names, read back by corelm.

Per family, a tiny random transformers checkpoint -> ``corelm.load`` -> ``export_gguf`` (F32 and Q8_0)
-> ``corelm.load`` of the file: F32 logits equal transformers' (atol 1e-5), Q8_0 logits within the
8-bit rounding. The file's architecture and tensor names are llama.cpp's (what ``gguf-py``'s tensor
map knows for that architecture). Configs llama.cpp cannot represent are refused with one line.
(That llama.cpp itself loads and runs these files is a dev check: benchmarks/llamacpp_convert_check.py.)
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import transformers

import corelm
from corelm.config import ModelConfig
from corelm.errors import CorelmError
from corelm.io.gguf import read_gguf
from corelm.io.gguf_export import export_gguf
from corelm.models import build_model

transformers.logging.set_verbosity_error()
VOCAB, WINDOW = 96, 8
COMMON = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
          "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
MOE = {"num_experts_per_tok": 2, "num_experts": 4, "moe_intermediate_size": 32}
# family -> (model_type, config overrides, llama.cpp architecture)
FAMILIES = {
    "llama": ("llama", {"tie_word_embeddings": False}, "llama"),
    "llama3-rope": ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 16}}, "llama"),
    "mixtral": ("mixtral", {"num_experts_per_tok": 2, "num_local_experts": 4}, "llama"),
    "qwen2": ("qwen2", {"tie_word_embeddings": False}, "qwen2"),
    "qwen3": ("qwen3", {"head_dim": 24}, "qwen3"),
    "qwen2_moe": ("qwen2_moe", {**MOE, "shared_expert_intermediate_size": 32, "norm_topk_prob": False}, "qwen2moe"),
    "qwen3_moe": ("qwen3_moe", {**MOE, "head_dim": 16, "norm_topk_prob": True}, "qwen3moe"),
    "gemma": ("gemma", {"head_dim": 16, "hidden_act": "gelu_pytorch_tanh"}, "gemma"),
    "gemma2": ("gemma2", {"head_dim": 16, "sliding_window": WINDOW, "query_pre_attn_scalar": 16,
                          "attn_logit_softcapping": 5.0, "final_logit_softcapping": 30.0}, "gemma2"),
    "gemma3_text": ("gemma3_text", {"head_dim": 16, "sliding_window": WINDOW, "query_pre_attn_scalar": 16,
                                    "num_hidden_layers": 3,
                                    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                                    "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                           "rope_theta": 100000.0},
                                                        "sliding_attention": {"rope_type": "default",
                                                                              "rope_theta": 1000.0}}}, "gemma3"),
    "phi3": ("phi3", {"tie_word_embeddings": False, "original_max_position_embeddings": 8, "sliding_window": WINDOW,
                      "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                                          "long_factor": [1.0 + 0.2 * i for i in range(6)],
                                          "short_factor": [1.0 + 0.05 * i for i in range(6)]}}, "phi3"),
    "olmo2": ("olmo2", {"tie_word_embeddings": False}, "olmo2"),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, transformers model, corelm model, work directory) of one family."""
    model_type, options, _ = FAMILIES[request.param]
    config = transformers.AutoConfig.for_model(model_type, **{**COMMON, **options})
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every parameter off its init (norms of 1, zero routers) so each one matters
        for name, p in hf.named_parameters():
            scale = 0.5 if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")) else 0.05
            p.add_(torch.randn(p.shape, generator=g) * scale)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path / "hf")
    return request.param, hf, corelm.load(path / "hf", dtype="fp32").model, path


IDS = torch.randint(0, VOCAB, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(1))


def test_f32_export_reloads_with_the_source_logits(family):
    name, hf, model, path = family
    out = export_gguf(model, path / "f32.gguf", "F32")
    g = read_gguf(out)
    arch = FAMILIES[name][2]
    assert g.metadata["general.architecture"] == arch
    # every tensor name is one llama.cpp's tensor map knows for this architecture
    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    known = {t for t in gguf.MODEL_TENSORS[arch_enum]}
    names = {gguf.TENSOR_NAMES[t].format(bid=i) for t in known for i in range(model.config.n_layer)}
    assert {n.rsplit(".", 1)[0] for n in g.tensors} <= names
    g.close()
    back = corelm.load(out, dtype="fp32")
    assert back.config.extra["model_type"] == (FAMILIES[name][0] if name != "llama3-rope" else "llama")
    with torch.no_grad():
        torch.testing.assert_close(back.model(IDS), hf(IDS).logits, atol=1e-5, rtol=1e-5)


def test_q8_0_export_reloads_close(family):
    name, hf, model, path = family
    out = export_gguf(model, path / "q8.gguf", "Q8_0")
    g = read_gguf(out)
    kinds = {t.qtype.name for n, t in g.tensors.items() if n.startswith("blk.") and len(t.shape) >= 2}
    g.close()
    assert "Q8_0" in kinds
    back = corelm.load(out, dtype="fp32")
    with torch.no_grad():
        ours, ref = back.model(IDS), hf(IDS).logits
    err = (ours - ref).abs().max().item()
    assert 0 < err < 0.1 * ref.abs().max().item(), (name, err)  # MoE: an 8-bit router may pick other experts


def _config(family: str, **options) -> ModelConfig:
    return ModelConfig(family=family, vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64,
                       max_seq_len=32, **options)


@pytest.mark.parametrize("family, options, feature", [
    ("llama", {"sliding_window": 8}, "sliding window"),  # Mistral: llama.cpp's llama has no window
    ("llama", {"qkv_bias": True, "qk_norm": True}, "QK norm"),
    ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic RoPE scaling"),
    ("llama", {"rotary_dim": 4}, "partial rotary"),
    ("gemma", {"sandwich_norm": True, "query_pre_attn_scalar": 20, "attn_softcap": 5.0, "final_softcap": 3.0},
     "query scale"),
    ("gemma", {"sandwich_norm": True}, "soft-capping"),
    ("gemma", {"qk_norm": True, "sandwich_norm": True, "attn_softcap": 5.0}, "attention logit soft-capping"),
    ("moe", {"n_experts": 4, "n_experts_per_tok": 2, "dense_layers": [0]}, "dense layers"),
    ("moe", {"n_experts": 4, "n_experts_per_tok": 2, "norm_topk_prob": False}, "unnormalised top-k"),
    ("moe", {"n_experts": 4, "n_experts_per_tok": 2, "qk_norm": True, "sliding_window": 4}, "sliding window"),
])
def test_export_refuses_what_llama_cpp_cannot_represent(tmp_path, family, options, feature):
    model = build_model(_config(family, **options))
    with pytest.raises(CorelmError, match=feature) as info:
        export_gguf(model, tmp_path / "x.gguf", "F32")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_llama3_rope_is_written_as_llama_cpp_rope_freqs(tmp_path):
    """Llama 3 scaling travels as the converter's per-frequency divisors and reads back exactly."""
    config = _config("llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8})
    torch.manual_seed(0)
    model = build_model(config).eval()
    out = export_gguf(model, tmp_path / "m.gguf", "F32")
    g = read_gguf(out)
    factors = g.tensor("rope_freqs.weight").clone()
    g.close()
    # head_dim 8, original context 8: the three lowest frequencies are divided by the full factor, the highest
    # one by a smoothed 4.89
    torch.testing.assert_close(factors, torch.tensor([4.8853, 8.0, 8.0, 8.0]), atol=1e-4, rtol=0)
    again = export_gguf(corelm.load(out, dtype="fp32").model, tmp_path / "again.gguf", "F32")
    g = read_gguf(again)
    torch.testing.assert_close(g.tensor("rope_freqs.weight").clone(), factors, atol=0, rtol=0)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_default_load_runs_the_files_blocks_in_hf_row_order(family, qtype):
    """Loaded without a dtype, a block-quantized file runs on its own blocks (GGUF block layers);
    Q/K rows are un-permuted for llama.cpp's ``llama`` architecture only, Qwen2's biases kept, Phi-3's fused
    matrices split by rows: the logits stay those of the dequantized file, up to the activation dtype."""
    name, _, model, path = family
    out = export_gguf(model, path / f"native-{qtype}.gguf", qtype)
    native, dequantized = corelm.load(out), corelm.load(out, dtype="fp32")
    with torch.no_grad():
        ours, ref = native.model(IDS).float(), dequantized.model(IDS)
    assert (ours - ref).abs().max() < 0.05 * ref.abs().max(), name


def _rewrite(source, path, arch: str, skip: str | None = None, fuse_qkv: bool = False) -> None:
    """Copy a GGUF file's numeric metadata and tensors (raw blocks) to ``path``, without the key ``skip``,
    and with each layer's attn_q/attn_k/attn_v rows concatenated into attn_qkv when ``fuse_qkv`` (what
    ``convert_hf_to_gguf.py --fuse-qkv`` writes)."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in source.metadata.items():
        if key == skip or key.startswith(("general.", "GGUF.")):
            continue
        kind = gguf.GGUFValueType.FLOAT32 if isinstance(value, float) else gguf.GGUFValueType.UINT32
        w.add_key_value(key, value, kind)
    for name, info in source.tensors.items():
        kind = name.split(".")[2] if name.startswith("blk.") else ""
        if fuse_qkv and kind in ("attn_k", "attn_v"):
            continue
        raw, tensor_name = source.raw(name).copy(), name
        if fuse_qkv and kind == "attn_q":
            parts = [source.raw(name.replace("attn_q", k)).copy() for k in ("attn_q", "attn_k", "attn_v")]
            rows = [source.tensors[name.replace("attn_q", k)].shape[0] for k in ("attn_q", "attn_k", "attn_v")]
            raw = np.concatenate([p.reshape(r, -1) for p, r in zip(parts, rows)])
            tensor_name = name.replace("attn_q", "attn_qkv")
        shape = (sum(rows), info.shape[1]) if tensor_name != name else info.shape
        block, block_bytes = gguf.GGML_QUANT_SIZES[info.qtype]
        byte_shape = (*shape[:-1], shape[-1] // block * block_bytes)
        w.add_tensor(tensor_name, raw.reshape(byte_shape), raw_shape=byte_shape, raw_dtype=info.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("qtype", ["F32", "Q4_0"])
def test_fused_qkv_of_a_llama_file_is_split_and_unpermuted(tmp_path, qtype):
    """``--fuse-qkv`` files: llama.cpp permutes q and k rows, then concatenates; corelm splits, then un-permutes
    (fp32 load, and the block layers on the file's own Q4_0 blocks)."""
    torch.manual_seed(0)
    model = build_model(_config("llama", tie_embeddings=False)).eval()
    source = read_gguf(export_gguf(model, tmp_path / "plain.gguf", qtype))
    _rewrite(source, tmp_path / "fused.gguf", "llama", fuse_qkv=True)
    assert "blk.0.attn_qkv.weight" in read_gguf(tmp_path / "fused.gguf").tensors
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = corelm.load(tmp_path / "plain.gguf", dtype="fp32").model(ids)
        torch.testing.assert_close(corelm.load(tmp_path / "fused.gguf", dtype="fp32").model(ids), ref,
                                   atol=1e-6, rtol=0)
        if qtype == "Q4_0":  # the default load runs the Q4_0 blocks: q/k rows of the fused matrix un-permuted too
            native = corelm.load(tmp_path / "fused.gguf").model
            assert native.corelm_quantization["method"] == "gguf"
            assert (native(ids).float() - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("drop, message", [
    ("qwen2moe.expert_count", "lacks qwen2moe.expert_count, which a qwen2moe model needs"),
    ("qwen2moe.attention.layer_norm_rms_epsilon", "lacks qwen2moe.attention.layer_norm_rms_epsilon"),
    ("qwen2moe.block_count", "lacks qwen2moe.block_count"),
])
def test_a_missing_required_key_is_named(tmp_path, drop, message):
    """A key llama.cpp requires and the file lacks: one line naming it (not a default that may be wrong)."""
    model = build_model(_config("moe", n_experts=4, n_experts_per_tok=2, qkv_bias=True, shared_expert_d_ff=32,
                                norm_topk_prob=False))
    source = read_gguf(export_gguf(model, tmp_path / "full.gguf", "F32"))
    _rewrite(source, tmp_path / "cut.gguf", "qwen2moe", skip=drop)
    with pytest.raises(CorelmError, match=message) as info:
        corelm.load(tmp_path / "cut.gguf", dtype="fp32")
    assert "\n" not in str(info.value)

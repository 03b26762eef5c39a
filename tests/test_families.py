"""Checkpoints of more model_types, written by transformers, load into corelm with exact parity.

For each family: a tiny random checkpoint saved with ``save_pretrained`` -> ``corelm.load`` -> full
forward logits equal transformers' (fp32), greedy generation through corelm's engine (static KV
cache, prompts longer than any sliding window) equals ``generate(do_sample=False)``, and
``save_hf_dir`` writes a checkpoint transformers reads back to the same logits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers

import corelm
from corelm.generate.engine import SamplingParams, generate
from corelm.io.hf import save_hf_dir
from corelm.ops.attention import set_attention_impl

transformers.logging.set_verbosity_error()
TOL = {"atol": 2e-5, "rtol": 1e-5}
VOCAB = 160
WINDOW = 8  # shorter than every prompt below: the window changes the logits
COMMON = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
          "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}

CONFIGS = {
    "qwen2": {"tie_word_embeddings": False},
    "qwen2-window": {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": WINDOW,
                     "max_window_layers": 1},
    "mistral": {"sliding_window": WINDOW, "head_dim": 16, "tie_word_embeddings": False},
    "qwen3": {"head_dim": 24, "tie_word_embeddings": True},  # head_dim * n_head != hidden_size
    "gemma": {"head_dim": 16, "hidden_act": "gelu_pytorch_tanh"},
    "gemma2": {"head_dim": 16, "sliding_window": WINDOW, "query_pre_attn_scalar": 20, "attn_logit_softcapping": 5.0,
                   "final_logit_softcapping": 3.0},
    "gemma3_text": {"head_dim": 16, "sliding_window": WINDOW, "query_pre_attn_scalar": 20, "num_hidden_layers": 4,
                    "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                    "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                           "rope_theta": 100000.0},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}},
    # LongRoPE switches to its long factors past 8 positions; every prompt below is longer, so
    # transformers' generate (which recomputes its cache at the switch) and corelm's agree throughout
    "phi3": {"tie_word_embeddings": False, "original_max_position_embeddings": 8, "max_position_embeddings": 64,
             "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                                 "long_factor": [1.0 + 0.2 * i for i in range(6)],
                                 "short_factor": [1.0 + 0.05 * i for i in range(6)]}},
    "phi3-window": {"model_type": "phi3", "sliding_window": WINDOW},
    "olmo2": {"tie_word_embeddings": False},
}


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every parameter off its init (norm weights of 0 or 1, zero biases) so each one is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    """(name, transformers model, checkpoint directory) of one family."""
    options = dict(COMMON, **CONFIGS[request.param])
    model_type = options.pop("model_type", request.param)
    torch.manual_seed(0)
    hf_config = transformers.AutoConfig.for_model(model_type, **options)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()
    _randomize(hf)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, path


def _logits_diff(model, hf, ids):
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    return ours, ref, (ours - ref).abs().max().item()


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
def test_forward_matches_transformers(checkpoint, impl):
    name, hf, path = checkpoint
    llm = corelm.load(path, dtype="fp32")
    ids = torch.randint(0, VOCAB, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(1))
    set_attention_impl(impl)
    try:
        ours, ref, diff = _logits_diff(llm.model, hf, ids)
    finally:
        set_attention_impl("sdpa")
    print(f"{name} [{impl}]: max |logit diff| = {diff:.2e}")
    torch.testing.assert_close(ours, ref, **TOL)


def test_left_padded_batch_matches_transformers(checkpoint):
    """attention_mask hides left padding; the window counts slots as transformers does."""
    _, hf, path = checkpoint
    llm = corelm.load(path, dtype="fp32")
    ids = torch.randint(0, VOCAB, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        ours, ref = llm.model(ids, attention_mask=mask), hf(ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], **TOL)


def test_sliding_window_changes_the_logits(checkpoint):
    """The window is not a no-op at these lengths: without it the same weights give other logits."""
    import dataclasses

    from corelm.models import build_model

    name, hf, path = checkpoint
    llm = corelm.load(path, dtype="fp32")
    if llm.config.sliding_window is None:
        assert name in ("qwen2", "qwen3", "gemma", "phi3", "olmo2")
        return
    unwindowed = build_model(dataclasses.replace(llm.config, sliding_window=None, layer_types=None)).eval()
    unwindowed.load_state_dict(llm.model.state_dict())
    ids = torch.randint(0, VOCAB, (1, 3 * WINDOW), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (unwindowed(ids) - hf(ids).logits).abs().max() > 1e-3


def test_cached_decoding_matches_transformers_generate(checkpoint):
    name, hf, path = checkpoint
    llm = corelm.load(path, dtype="fp32")
    prompts = [[5, 17, 3, 99, 42, 7, 1, 150, 64, 33, 12, 8], [9, 4, 120, 77, 2, 61, 13, 101, 45, 6]]
    assert min(map(len, prompts)) > WINDOW
    params = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)
    ours = generate(llm.model, prompts, params)
    for prompt, new in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, min_new_tokens=10,
                              pad_token_id=0)
        assert new == ref[0, len(prompt):].tolist(), name


def test_compiled_shape_decode_matches_eager(checkpoint):
    """The static-shape decode (all cache slots attended, as under torch.compile) gives the same tokens."""
    _, _, path = checkpoint
    llm = corelm.load(path, dtype="fp32")
    from corelm.ops.kv_cache import KVCache

    prompt = torch.tensor([[5, 17, 3, 99, 42, 7, 1, 150, 64, 33, 12]])
    logits = []
    for full in (False, True):
        cache = KVCache.for_model(llm.config, 1, 32, torch.float32)
        cache.full_window = full
        with torch.no_grad():
            llm.model(prompt, input_pos=torch.arange(11), kv_cache=cache)
            out = [llm.model(torch.tensor([[t]]), input_pos=torch.tensor([11 + i]), kv_cache=cache)
                   for i, t in enumerate([3, 8, 90, 4])]
        logits.append(torch.cat(out, 1))
    torch.testing.assert_close(logits[0], logits[1], **TOL)
    full = torch.cat([prompt, torch.tensor([[3, 8, 90, 4]])], 1)
    with torch.no_grad():
        torch.testing.assert_close(logits[0], llm.model(full)[:, 11:], **TOL)


def test_save_hf_dir_round_trips_through_transformers(checkpoint, tmp_path):
    name, hf, path = checkpoint
    llm = corelm.load(path, dtype="fp32")
    save_hf_dir(llm.model, llm.config, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(back) is type(hf), name
    ids = torch.randint(0, VOCAB, (1, 3 * WINDOW), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, **TOL)


# ---- GGUF: a tiny file written with the `gguf` package as llama.cpp's converter would -------------
GGUF_CONFIGS = {
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 24}),
    "gemma": ("gemma", {"head_dim": 16}),
    "gemma2": ("gemma2", {"head_dim": 16, "sliding_window": WINDOW, "query_pre_attn_scalar": 16,
                          "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0}),
    # llama.cpp's conventions: every 6th layer global, local RoPE base 10000 (written as freq_base_swa)
    "gemma3": ("gemma3_text", {"head_dim": 16, "sliding_window": WINDOW, "query_pre_attn_scalar": 16,
                               "num_hidden_layers": 6,
                               "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                   "sliding_attention": {"rope_type": "default",
                                                                         "rope_theta": 10000.0}}}),
    "llama": ("llama", {"tie_word_embeddings": False}),  # Q/K rows permuted as the converter does
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),  # llama + expert stacks
    "qwen2moe": ("qwen2_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                               "shared_expert_intermediate_size": 48, "norm_topk_prob": False}),
    "qwen3moe": ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                               "head_dim": 16, "norm_topk_prob": True}),
    "olmo2": ("olmo2", {"tie_word_embeddings": False}),
    "phi3": ("phi3", {"original_max_position_embeddings": 8, "max_position_embeddings": 64,
                      "sliding_window": WINDOW, "tie_word_embeddings": False,
                      "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                                          "long_factor": [1.0 + 0.2 * i for i in range(6)],
                                          "short_factor": [1.0 + 0.05 * i for i in range(6)]}}),
}


def _write_gguf(path, arch: str, hf) -> None:
    import gguf

    cfg = hf.config
    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    names = gguf.get_tensor_name_map(arch_enum, cfg.num_hidden_layers)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    if arch == "gemma3":
        w.add_rope_freq_base_swa(cfg.rope_parameters["sliding_attention"]["rope_theta"])
    if getattr(cfg, "sliding_window", None):
        w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if arch == "phi3":
        w.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
        factor = cfg.max_position_embeddings / cfg.original_max_position_embeddings
        orig_ctx = cfg.original_max_position_embeddings
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(factor) / math.log(orig_ctx)))
        w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
    n_experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    if n_experts:
        w.add_expert_count(n_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        if arch != "llama":  # Mixtral's experts are feed_forward_length wide
            w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if getattr(cfg, "shared_expert_intermediate_size", None):
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    for name, tensor in hf.state_dict().items():
        base, _, suffix = name.rpartition(".")
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # (E, 2F, d) / (E, d, F) stacks
            layer = name.split(".")[2]
            parts = (("gate", "up"), tensor.chunk(2, dim=1)) if suffix == "gate_up_proj" else (("down",), (tensor,))
            for kind, part in zip(*parts):
                w.add_tensor(f"blk.{layer}.ffn_{kind}_exps.weight", part.float().contiguous().numpy())
            continue
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            # convert_hf_to_gguf.py LlamaModel.permute: each head's two rotary halves interleaved
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            tensor = tensor.reshape(heads, 2, tensor.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(tensor.shape)
        target = names.get_name(base)
        assert target is not None, name
        data = tensor.float().numpy()
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            data = data + 1.0  # convert_hf_to_gguf.py's Gemma converters store 1 + w
        w.add_tensor(f"{target}.{suffix}", data.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", list(GGUF_CONFIGS))
def test_gguf_architectures_load_with_parity(arch, tmp_path):
    model_type, options = GGUF_CONFIGS[arch]
    options = dict(COMMON, **options)
    torch.manual_seed(0)
    hf_config = transformers.AutoConfig.for_model(model_type, **options)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()
    _randomize(hf)
    _write_gguf(tmp_path / "tiny.gguf", {"mixtral": "llama"}.get(arch, arch), hf)
    llm = corelm.load(tmp_path / "tiny.gguf", dtype="fp32")
    assert llm.config.extra["model_type"] == model_type
    ids = torch.randint(0, VOCAB, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(4))
    ours, ref, diff = _logits_diff(llm.model, hf, ids)
    print(f"gguf {arch}: max |logit diff| = {diff:.2e}")
    torch.testing.assert_close(ours, ref, **TOL)


@pytest.mark.parametrize("family, options", [
    ("gemma", {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"], "qk_norm": True,
               "sandwich_norm": True, "attn_softcap": 5.0, "final_softcap": 3.0, "rope_local_theta": 1000.0}),
    ("llama", {"sliding_window": 4, "qk_norm": True, "qkv_bias": True, "rotary_dim": 12,
               "rope_scaling": {"rope_type": "longrope", "long_factor": [1.5] * 6, "short_factor": [1.0] * 6,
                                "original_max_position_embeddings": 8}}),
])
def test_decode_step_traces_without_graph_breaks(family, options):
    """The static-shape decode step (what the engine compiles) has no data-dependent Python branch."""
    from corelm.config import ModelConfig
    from corelm.models import build_model
    from corelm.ops.kv_cache import KVCache

    config = ModelConfig(family=family, vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, head_dim=16,
                         d_ff=48, max_seq_len=64, **options)
    torch.manual_seed(0)
    model = build_model(config).eval()
    cache = KVCache.for_model(config, 1, 16, torch.float32)
    cache.full_window = True
    torch._dynamo.reset()
    step = torch.compile(lambda ids, pos: model(ids, input_pos=pos, kv_cache=cache), backend="eager",
                         fullgraph=True, dynamic=False)
    with torch.no_grad():
        model(torch.arange(1, 10)[None], input_pos=torch.arange(9), kv_cache=cache)
        traced = step(torch.tensor([[3]]), torch.tensor([[9]]))
        torch.testing.assert_close(traced, model(torch.tensor([[3]]), input_pos=torch.tensor([[9]]), kv_cache=cache))


def test_export_refuses_a_model_type_without_the_configs_features():
    from corelm.config import ModelConfig
    from corelm.errors import CorelmError
    from corelm.io.hf import config_to_hf

    config = ModelConfig(family="llama", vocab_size=64, n_layer=2, n_head=4, d_model=32, qk_norm=True)
    with pytest.raises(CorelmError, match="qk_norm"):
        config_to_hf(config)
    config.extra["model_type"] = "qwen3"
    assert config_to_hf(config)["model_type"] == "qwen3"


@pytest.mark.parametrize("name, n_params", [
    # published parameter counts of the checkpoints the presets describe
    ("mistral-7b", 7_241_732_096), ("qwen2.5-0.5b", 494_032_768), ("qwen3-0.6b", 596_049_920),
    ("phi-3-mini-4k", 3_821_079_552), ("gemma-2-2b", 2_614_341_888), ("gemma-3-1b", 999_885_952),
])
def test_family_presets_match_their_checkpoints(name, n_params):
    """Each preset has the published size, in corelm and in the transformers model its export describes."""
    from corelm.io.hf import config_from_hf, config_to_hf
    from corelm.models import build_model
    from corelm.presets import preset

    config = preset(name)
    hf_dict = config_to_hf(config)
    with torch.device("meta"):
        ours = sum(p.numel() for p in build_model(config).parameters())
        hf_config = transformers.AutoConfig.for_model(hf_dict.pop("model_type"), **hf_dict)
        theirs = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(hf_config).parameters())
    assert ours == theirs == n_params
    back = config_from_hf(hf_config.to_dict())  # and the export reads back to the same attention layout
    assert back.sliding_window == config.sliding_window
    assert [back.is_sliding(i) for i in range(back.n_layer)] == [config.is_sliding(i) for i in range(config.n_layer)]

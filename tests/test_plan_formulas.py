"""Planner formulas against hand-computed and published figures, and against reference implementations."""

from __future__ import annotations

import pytest
import torch

from corelm.config import ModelConfig
from corelm.errors import CorelmError
from corelm.plan import formulas as F
from corelm.presets import preset


def test_gpt2_small_parameter_count_is_124_4m_tied():
    # wte 50257·768 + wpe 1024·768 + 12 × (attention 2,362,368 + MLP 4,722,432 + 2 LayerNorms 3,072) + ln_f 1,536
    assert F.param_count(preset("gpt2")) == 124_439_808


@pytest.mark.parametrize("name", ["gpt2", "gpt2-medium", "smollm2-135m", "llama-tiny", "bert-tiny", "gpt2-tiny"])
def test_param_count_equals_the_built_corelm_model(name):
    import torch

    from corelm.models import build_model

    cfg = preset(name)
    with torch.device("meta"):
        model = build_model(cfg)
    # tied weights are one Parameter; BERT's pre-training heads (cls.*) are not part of BertModel
    counted = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("cls."))
    assert F.param_count(cfg) == counted


@pytest.mark.parametrize("name,hf", [
    ("llama-2-7b", 6_738_415_616), ("llama-3-8b", 8_030_261_248), ("llama-3.2-1b", 1_235_814_400),
    ("mistral-7b", 7_241_732_096), ("bert-base", 109_482_240), ("llama-3.1-405b", 405_853_388_800),
])
def test_param_count_matches_transformers_on_meta(name, hf):
    """The published sizes, recounted by instantiating the Hugging Face architecture on the meta device."""
    import torch
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    cfg = preset(name)
    if name == "llama-3.1-405b":  # too many layers to instantiate quickly: the published count
        assert F.param_count(cfg) == hf
        return
    with torch.device("meta"):
        if cfg.family == "bert":
            ref = BertModel(BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                                       num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                                       intermediate_size=cfg.d_ff))
        else:
            ref = LlamaForCausalLM(LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                                               intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layer,
                                               num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                                               tie_word_embeddings=cfg.tie_embeddings))
    assert sum(p.numel() for p in ref.parameters()) == F.param_count(cfg) == hf


def test_gpt3_175b_on_300b_tokens_is_3_14e23_flops():
    cfg = preset("gpt3-175b")
    six_nd = F.train_flops(cfg, 300e9, 2048, attention=False)
    assert six_nd == pytest.approx(3.14e23, rel=0.005)  # Brown et al. 2020, appendix D
    # PaLM's attention term adds 12·L·d·T FLOPs per token (d = n_head·head_dim = 12288 here).
    extra = F.train_flops(cfg, 300e9, 2048) - six_nd
    assert extra == pytest.approx(12 * 96 * 12288 * 2048 * 300e9, rel=1e-12)


def test_train_flops_per_token_is_three_forwards_and_recompute_adds_one():
    cfg = preset("llama-3-8b")
    fwd = F.forward_flops_per_token(cfg, 8192)
    assert F.train_flops_per_token(cfg, 8192) == pytest.approx(3 * fwd)
    assert F.train_flops_per_token(cfg, 8192, "full") == pytest.approx(4 * fwd)
    with pytest.raises(CorelmError):
        F.train_flops(cfg, -1, 2048)


def test_llama2_7b_fp16_weights_13_5_gb_and_kv_cache_2_gib():
    cfg = preset("llama-2-7b")
    assert F.weight_bytes(cfg, "fp16") == pytest.approx(13.5e9, rel=0.01)
    assert F.kv_cache_bytes(cfg, 4096, 1, "fp16") == 2 * 2**30  # 2 · 32 layers · 32 heads · 128 · 4096 · 2 B
    # GQA: Llama-3-8B keeps 8 of its 32 heads, a quarter of the cache at the same shape.
    assert F.kv_cache_bytes(preset("llama-3-8b"), 4096, 1, "fp16") == 2**30 // 2


def test_mixed_precision_adamw_is_16_bytes_per_parameter():
    assert F.bytes_per_param_training("bf16-mixed", "adamw") == 16  # torch AMP: 4 + 4 + 8
    assert F.bytes_per_param_training("bf16-mixed-master", "adamw") == 16  # ZeRO: 2 + 2 + 12
    assert F.bytes_per_param_training("fp32", "sgd") == 12
    assert F.bytes_per_param_training("bf16-true", "adamw") == 8
    assert F.bytes_per_param_training("bf16-mixed", "adamw-8bit") == pytest.approx(10, abs=0.01)


def test_zero_stages_reproduce_the_zero_paper_example():
    """ZeRO §5.1 / figure 1: Ψ = 7.5B, N_d = 64, K = 12: 120 GB, 31.4 GB, 16.6 GB, 1.9 GB per device."""
    psi = 7.5e9
    totals = [sum(F.sharded_state_bytes(psi, psi, precision="bf16-mixed-master", optimizer="adamw",
                                        zero=z, dp=64).values()) / 1e9 for z in range(4)]
    assert totals == pytest.approx([120, 31.4, 16.6, 1.875], abs=0.06)


def test_activations_reproduce_korthikanti_per_layer():
    """Korthikanti et al. 2022: sbh(34 + 5as/h) bytes (16-bit, dropout, unfused attention); with TP t
    and no sequence parallelism sbh(10 + 24/t + 5as/(ht)); with it everything / t; full recompute 2sbh."""
    cfg = ModelConfig(family="gpt2", vocab_size=50257, n_layer=24, n_head=16, d_model=1024)
    s, b, h, a = 2048, 4, 1024, 16
    kw = {"act_bytes": 2, "dropout": True, "fused_attention": False}
    assert F.activation_bytes_per_layer(cfg, s, b, **kw) == s * b * h * (34 + 5 * a * s / h)
    for t in (2, 4, 8):
        no_sp = F.activation_bytes_per_layer(cfg, s, b, tp=t, sequence_parallel=False, **kw)
        assert no_sp == pytest.approx(s * b * h * (10 + 24 / t + 5 * a * s / (h * t)))
        sp = F.activation_bytes_per_layer(cfg, s, b, tp=t, **kw)
        assert sp == pytest.approx(s * b * h * (34 + 5 * a * s / h) / t)
    assert F.activation_bytes_per_layer(cfg, s, b, recompute="full", act_bytes=2) == 2 * s * b * h
    # Selective recomputation drops exactly the a·s²·b terms.
    assert F.activation_bytes_per_layer(cfg, s, b, recompute="selective", act_bytes=2, dropout=True) == 34 * s * b * h


def test_lora_parameter_count_matches_peft():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = ModelConfig(family="llama", vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=160)
    with torch.device("meta"):
        ref = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(ref, LoraConfig(r=8, target_modules=targets))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert F.lora_params(cfg, 8, "all") == trainable
    with pytest.raises(CorelmError):
        F.lora_params(cfg, 0)


def test_tensor_parallel_degree_must_divide_heads():
    F.check_tp(preset("llama-2-7b"), 8)
    with pytest.raises(CorelmError, match="does not divide"):
        F.check_tp(preset("llama-2-7b"), 3)
    with pytest.raises(CorelmError, match="does not divide"):
        F.check_tp(preset("llama-3-8b"), 16)  # 8 KV heads


def test_planning_modules_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; import corelm.plan.planner, corelm.plan.formulas, corelm.plan.hardware; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_mfu_is_model_flops_per_wall_second_over_peak():
    from corelm.plan import formulas as F

    assert F.mfu(6e9, 100.0, 1.2e12) == 0.5  # 6e11 FLOP/s achieved on a 1.2e12 peak
    with pytest.raises(CorelmError):
        F.mfu(6e9, 100.0, 0.0)


HF_TINY = {  # one tiny transformers config per family corelm imports; sizes chosen so every term shows
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 160, "n_positions": 64},
    "llama": {"tie_word_embeddings": False},
    "qwen2": {"tie_word_embeddings": False},
    "qwen3": {"head_dim": 24},
    "mistral": {"head_dim": 16, "tie_word_embeddings": False},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16},
    "gemma3_text": {"head_dim": 16},
    "phi3": {"tie_word_embeddings": False, "pad_token_id": None},
    "olmo2": {"tie_word_embeddings": False, "pad_token_id": None},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "tie_word_embeddings": False},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 48, "mlp_only_layers": [1], "tie_word_embeddings": False},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
}
DECODER = {"vocab_size": 160, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}


@pytest.mark.parametrize("model_type", list(HF_TINY))
def test_param_count_equals_the_transformers_model(model_type):
    """The planner's parameter formula for every imported family equals the parameters transformers builds."""
    transformers = pytest.importorskip("transformers")
    from corelm.io.hf import config_from_hf

    options = dict(HF_TINY[model_type]) if model_type == "gpt2" else dict(DECODER, **HF_TINY[model_type])
    hf_config = transformers.AutoConfig.for_model(model_type, **options)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config)
    cfg = config_from_hf(hf_config.to_dict())
    assert F.param_count(cfg) == sum(p.numel() for p in hf.parameters()), model_type


@pytest.mark.parametrize("model_type", ["bart", "marian", "mbart"])
def test_param_count_of_encoder_decoders_equals_the_transformers_model(model_type):
    """Trainable parameters: Marian's sinusoidal position tables are buffers-as-parameters in transformers
    (requires_grad False) and nothing in corelm."""
    transformers = pytest.importorskip("transformers")
    from corelm.io.hf import config_from_hf

    options = {"vocab_size": 160, "d_model": 64, "encoder_layers": 2, "decoder_layers": 3, "encoder_attention_heads": 4,
               "decoder_attention_heads": 4, "encoder_ffn_dim": 96, "decoder_ffn_dim": 96,
               "max_position_embeddings": 64, "pad_token_id": 1, "decoder_start_token_id": 2}
    hf_config = transformers.AutoConfig.for_model(model_type, **options)
    with torch.device("meta"):
        hf = transformers.AutoModelForSeq2SeqLM.from_config(hf_config)
    cfg = config_from_hf(hf_config.to_dict())
    assert F.param_count(cfg) == sum(p.numel() for p in hf.parameters() if p.requires_grad), model_type

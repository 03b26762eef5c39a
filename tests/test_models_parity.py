"""corelm's GPT-2, Llama and BERT against transformers' implementations on tiny random weights (fp32)."""

from __future__ import annotations

import pytest
import torch
import transformers

from corelm.config import ModelConfig
from corelm.io.hf import config_from_hf, state_dict_from_hf
from corelm.models import build_model
from corelm.ops.attention import set_attention_impl

transformers.logging.set_verbosity_error()
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every parameter off its init (norm weights of 1, zero biases) so each one is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _corelm_from(hf_model: torch.nn.Module) -> tuple[ModelConfig, torch.nn.Module]:
    config = config_from_hf(hf_model.config.to_dict())
    model = build_model(config).eval()
    model.load_state_dict(state_dict_from_hf(config, hf_model.state_dict()), strict=True)
    return config, model


@pytest.fixture(params=["sdpa", "reference"])
def attention_impl(request):
    set_attention_impl(request.param)
    yield request.param
    set_attention_impl("sdpa")


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}


@pytest.mark.parametrize("tie, n_kv_head, scaling, impl", [
    (False, 2, None, "reference"),      # grouped-query attention, separate LM head, formula path
    (False, 2, None, "sdpa"),
    (True, 4, None, "sdpa"),            # multi-head, tied embeddings
    (True, 2, LLAMA3_SCALING, "sdpa"),  # Llama 3.1 RoPE scaling
    (False, 1, {"rope_type": "linear", "factor": 2.0}, "sdpa"),  # multi-query, linear RoPE scaling
])
def test_llama_matches_transformers(tie, n_kv_head, scaling, impl):
    set_attention_impl(impl)
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv_head, max_position_embeddings=128, rope_theta=500.0, rms_norm_eps=1e-6,
        tie_word_embeddings=tie, rope_scaling=scaling)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    _randomize(hf)
    config, model = _corelm_from(hf)
    assert config.n_kv_head == n_kv_head and config.tie_embeddings == tie
    ids = torch.randint(0, 97, (2, 48))  # 48 > original_max_position_embeddings: scaling matters
    try:
        with torch.no_grad():
            ref = hf(ids, output_hidden_states=True)
            torch.testing.assert_close(model(ids), ref.logits, **TOL)
            torch.testing.assert_close(model.hidden_states(ids), ref.hidden_states[-1], **TOL)
    finally:
        set_attention_impl("sdpa")


def test_gpt2_matches_transformers(attention_impl):
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                        bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    _randomize(hf)
    _, model = _corelm_from(hf)
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        torch.testing.assert_close(model(ids), ref.logits, **TOL)
        torch.testing.assert_close(model.hidden_states(ids), ref.hidden_states[-1], **TOL)


def test_gpt2_padding_mask_matches_transformers():
    """Left padding: positions count real tokens and padded keys are hidden, as in HF generate()."""
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=97, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)).eval()
    _, model = _corelm_from(hf)
    ids = torch.randint(0, 97, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        ours = model(ids, attention_mask=mask)
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], **TOL)


def test_bert_matches_transformers_with_padding(attention_impl):
    torch.manual_seed(0)
    hf_config = transformers.BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=128, max_position_embeddings=64)
    hf = transformers.BertForPreTraining(hf_config).eval()
    _randomize(hf)
    _, model = _corelm_from(hf)
    ids = torch.randint(1, 97, (3, 24))
    mask = torch.ones(3, 24, dtype=torch.long)
    mask[1, 15:] = 0
    mask[2, 5:] = 0
    ids = ids * mask  # pad id 0
    segments = torch.zeros_like(ids)
    segments[:, 12:] = 1
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, token_type_ids=segments, output_hidden_states=True)
        hidden = model(ids, attention_mask=mask, token_type_ids=segments)
        torch.testing.assert_close(hidden, ref.hidden_states[-1], **TOL)
        torch.testing.assert_close(model.mlm_logits(hidden), ref.prediction_logits, **TOL)
        torch.testing.assert_close(model.nsp_logits(model.pooled(hidden)), ref.seq_relationship_logits, **TOL)
        # padding never leaks: changing padded tokens leaves real positions unchanged
        noisy = torch.where(mask.bool(), ids, torch.randint(1, 97, ids.shape))
        torch.testing.assert_close(model(noisy, attention_mask=mask, token_type_ids=segments)[mask.bool()],
                                   hidden[mask.bool()], **TOL)


def test_bert_model_checkpoint_without_heads_loads():
    """A bare BertModel state dict (all-MiniLM style: no `bert.` prefix, no cls.*) maps and loads."""
    from corelm.io.hf import model_from_state_dict

    hf = transformers.BertModel(transformers.BertConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32)).eval()
    _randomize(hf)
    config = config_from_hf(hf.config.to_dict())
    model = model_from_state_dict(config, state_dict_from_hf(config, hf.state_dict()))
    ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).last_hidden_state, **TOL)
    assert model.cls.predictions.bias.device.type == "cpu"  # the missing heads were materialised


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_meta_build_then_assign(family):
    config = ModelConfig(family=family, vocab_size=64, n_layer=2, n_head=4, d_model=32,
                         n_kv_head=2 if family == "llama" else None, max_seq_len=32)
    torch.manual_seed(0)
    ref = build_model(config).eval()
    with torch.device("meta"):
        model = build_model(config)
    model.load_state_dict(ref.state_dict(), assign=True)
    assert all(p.device.type == "cpu" for p in model.parameters())
    ids = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), ref(ids), atol=0, rtol=0)
    if family != "bert":
        assert model.lm_head.weight.data_ptr() == \
            model.state_dict()[next(k for k in model.state_dict() if "wte" in k or "embed_tokens" in k)].data_ptr()


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_blocks_live_in_module_lists(family):
    config = ModelConfig(family=family, vocab_size=64, n_layer=3, n_head=2, d_model=16, max_seq_len=16)
    model = build_model(config)
    path = {"gpt2": "transformer.h", "llama": "model.layers", "bert": "encoder.layer"}[family]
    blocks = model.get_submodule(path)
    assert isinstance(blocks, torch.nn.ModuleList) and len(blocks) == 3
    assert model.layers is blocks


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_input_longer_than_learned_positions_is_a_clear_error(family):
    from corelm.errors import CorelmError

    model = build_model(ModelConfig(family=family, vocab_size=64, n_layer=1, n_head=2, d_model=16, max_seq_len=8))
    with pytest.raises(CorelmError, match="9 tokens"):
        model(torch.zeros(1, 9, dtype=torch.long))
